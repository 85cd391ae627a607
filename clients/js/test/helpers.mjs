// Shared helpers for the client tests: a real `herald serve` on 127.0.0.1:0.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import readline from 'node:readline';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.HERALD_BIN ?? path.resolve(here, '../../../target/debug/herald');

/** Start herald; resolves with {addr, apiKey, secret, proc, stop()}. */
export function startHerald(env = {}) {
  const proc = spawn(BIN, ['serve'], {
    env: { PATH: process.env.PATH, HERALD_ADDR: '127.0.0.1:0', HERALD_LOG: 'warn', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const lines = readline.createInterface({ input: proc.stderr });
  const info = { proc, secret: env.HERALD_JWT_HS256_SECRET, apiKey: env.HERALD_API_KEY };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('herald did not start')), 20000);
    proc.on('exit', (code) => reject(new Error(`herald exited early: ${code}`)));
    lines.on('line', (line) => {
      const t = line.trim();
      if (t.startsWith('HERALD_JWT_HS256_SECRET=')) info.secret = t.split('=')[1];
      if (t.startsWith('HERALD_API_KEY=')) info.apiKey = t.split('=')[1];
      if (t.startsWith('herald listening on ')) {
        clearTimeout(timer);
        info.addr = t.slice('herald listening on '.length);
        info.stop = () => new Promise((res) => { if (proc.exitCode !== null) return res(); proc.once('exit', res); proc.kill('SIGTERM'); });
        resolve(info);
      }
    });
  });
}

const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT for `sub`, expiring `ttlSec` from now (negative: already expired). */
export function mintToken(secret, sub, ttlSec = 3600) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlSec });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A `getToken` minting a different token for `sub` on every call (`.calls` counts them). */
export function freshTokens(secret, sub) {
  const getToken = async () => { getToken.calls += 1; return mintToken(secret, sub, 3600 + getToken.calls); };
  getToken.calls = 0;
  return getToken;
}

/** A WebSocket class recording the token of every `hello` sent through it. */
export function helloRecorder() {
  const hellos = [];
  class Recording extends globalThis.WebSocket {
    send(data) {
      const f = JSON.parse(data);
      if (f.type === 'hello') hellos.push(f.token);
      super.send(data);
    }
  }
  return { hellos, WebSocket: Recording };
}

export async function api(h, path, body) {
  const r = await fetch(`http://${h.addr}${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${h.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

/** Resolve when `predicate()` holds, polling; reject after `ms`. */
export async function until(predicate, ms = 10000, what = 'condition') {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
