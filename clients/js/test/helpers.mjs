// Shared helpers for the client tests: a real `herald serve` on 127.0.0.1:0.
import assert from 'node:assert/strict';
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

/**
 * An HS256 JWT for `sub`, expiring `ttlSec` from now (negative: already
 * expired); `nowMs` is "now" (a fake clock's time, ahead of the server's).
 */
export function mintToken(secret, sub, ttlSec = 3600, nowMs = Date.now()) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, exp: Math.floor(nowMs / 1000) + ttlSec });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/**
 * An HS256 JWT for `sub` with a `streams` claim (`{"thread:t1": "rw",
 * "room:*": "r"}`): the shared streams it may read or write.
 */
export function mintTokenWithStreams(secret, sub, streams, ttlSec = 3600, nowMs = Date.now()) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, exp: Math.floor(nowMs / 1000) + ttlSec, streams });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A `getToken` minting a different token for `sub` on every call (`.calls` counts them). */
export function freshTokens(secret, sub) {
  const getToken = async () => { getToken.calls += 1; return mintToken(secret, sub, 3600 + getToken.calls); };
  getToken.calls = 0;
  return getToken;
}

/** The `exp` claim (seconds) of a JWT. */
export const expOf = (token) => JSON.parse(Buffer.from(token.split('.')[1], 'base64url')).exp;

/**
 * A WebSocket class recording what goes through it: `hellos` (the token of
 * every `hello`), `sent` and `received` frames, `constructed` sockets and
 * `held` — sockets neither closed by the client nor by the peer — with its
 * highest value, `maxHeld` (a client holds at most one socket).
 */
export function wsRecorder() {
  const rec = { hellos: [], sent: [], received: [], sockets: [], constructed: 0, held: 0, maxHeld: 0 };
  class Recording extends globalThis.WebSocket {
    constructor(...args) {
      super(...args);
      rec.sockets.push(this);
      rec.constructed += 1;
      rec.held += 1;
      rec.maxHeld = Math.max(rec.maxHeld, rec.held);
      this.released = false;
      // Registered before the client's handlers: counted before they run.
      this.addEventListener('close', () => this.release());
      this.addEventListener('message', (m) => rec.received.push(JSON.parse(m.data)));
    }
    release() {
      if (this.released) return;
      this.released = true;
      rec.held -= 1;
    }
    send(data) {
      const f = JSON.parse(data);
      rec.sent.push(f);
      if (f.type === 'hello') rec.hellos.push(f.token);
      super.send(data);
    }
    close(...args) {
      this.release();
      super.close(...args);
    }
  }
  rec.WebSocket = Recording;
  return rec;
}

/** A WebSocket class recording the token of every `hello` sent through it. */
export const helloRecorder = wsRecorder;

/**
 * A clock for `HeraldClient`'s `clock` option that moves only when told:
 * `advance(ms)` / `advanceTo(t)` run the timers falling due, in order, each
 * at its own time; `pending()` lists the due times of the armed timers.
 */
export function fakeClock(start = Date.now()) {
  let now = start;
  let nextId = 1;
  const timers = new Map();
  return {
    now: () => now,
    setTimeout(fn, ms) {
      const id = nextId++;
      timers.set(id, { due: now + Math.max(0, Number(ms) || 0), fn });
      return id;
    },
    clearTimeout(id) { timers.delete(id); },
    pending: () => [...timers.values()].map((t) => t.due).sort((a, b) => a - b),
    advanceTo(t) {
      for (;;) {
        let next = null;
        for (const [id, timer] of timers) if (timer.due <= t && (!next || timer.due < next[1].due)) next = [id, timer];
        if (!next) break;
        timers.delete(next[0]);
        now = Math.max(now, next[1].due);
        next[1].fn();
      }
      now = Math.max(now, t);
    },
    advance(ms) { this.advanceTo(now + ms); },
  };
}

/** The server's live connections of `user`. */
export async function connectionsOf(h, user) {
  const r = await fetch(`http://${h.addr}/api/v1/connections?user_id=${user}`, { headers: { authorization: `Bearer ${h.apiKey}` } });
  if (!r.ok) throw new Error(`connections: HTTP ${r.status} ${await r.text()}`);
  return (await r.json()).connections;
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

/**
 * One turn of the event loop: promise continuations already queued run (a
 * `getToken` resolving without I/O, the client's open after it). Not a wait
 * for anything that takes time.
 */
export const settle = () => new Promise((r) => setImmediate(r));

/** Resolve when `predicate()` holds, polling; reject after `ms`. */
export async function until(predicate, ms = 10000, what = 'condition') {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * The event frames of a socket as what is promised of them, whatever Herald
 * joined: it may join a run part's unsent text deltas into one frame
 * (`from_seq`…`seq`, their texts joined), live as in history, so how many
 * frames a text takes is not promised. Asserts that the frames cover every
 * seq once, in order (per stream: each frame's `from_seq`, or `seq`, is the
 * previous frame's `seq` + 1), and returns them with each series of
 * consecutive `agent_text_delta` frames of one run and part joined into one
 * frame, as Herald joins them: compare these, not frame counts.
 */
export function joinDeltas(frames) {
  const last = new Map(); // stream ('' the user's own) → seq of its last frame
  const joined = [];
  for (const f of frames) {
    const stream = f.stream ?? '';
    const from = f.from_seq ?? f.seq;
    assert.ok(from <= f.seq, `from_seq after seq: ${JSON.stringify(f).slice(0, 200)}`);
    if (last.has(stream)) assert.equal(from, last.get(stream) + 1, `every seq once, in order: ${JSON.stringify(f).slice(0, 200)}`);
    last.set(stream, f.seq);
    const prev = joined.at(-1);
    if (f.event === 'agent_text_delta' && prev?.event === 'agent_text_delta' && (prev.stream ?? '') === stream
      && prev.run_id === f.run_id && prev.data?.part === f.data?.part && prev.replayed === f.replayed) {
      joined[joined.length - 1] = { ...prev, from_seq: prev.from_seq ?? prev.seq, seq: f.seq, data: { ...prev.data, text: prev.data.text + f.data.text } };
    } else joined.push(f);
  }
  return joined;
}
