// The React example (examples/react-chat: useChat + HeraldChatTransport,
// and its /stock page: useChat + the AI SDK's own WebSocketChatTransport on
// GET /ai), built with esbuild and served by its own app server, against a
// real `herald serve` and its demo agent, in Debian's headless Chromium.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import http from 'node:http';
import { existsSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startHerald, mintToken, until } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const EXAMPLE = path.resolve(here, '../examples/react-chat');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SECRET = 'react-secret-0123456789-abcdefghijklmn';

let h, app, browser, page;

/** Starts the example's app server on a free port; resolves with its base URL. */
function startApp(heraldAddr, env = {}) {
  const proc = spawn(process.execPath, [path.join(EXAMPLE, 'server.mjs')], {
    env: { PATH: process.env.PATH, PORT: '0', HERALD_URL: `ws://${heraldAddr}/ws`, HERALD_JWT_HS256_SECRET: SECRET, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the example server did not start')), 10000);
    proc.on('exit', (code) => reject(new Error(`the example server exited: ${code}`)));
    readline.createInterface({ input: proc.stdout }).on('line', (line) => {
      const m = /^react-chat listening on (\S+)/.exec(line);
      if (m) { clearTimeout(timer); resolve({ proc, url: m[1] }); }
    });
  });
}

before(async () => {
  // Installed by scripts/test.sh (npm ci in the example); built here so the
  // test always runs the current source of the example and of the client.
  assert.ok(existsSync(path.join(EXAMPLE, 'node_modules/.bin/esbuild')),
    'examples/react-chat has no node_modules: run `npm ci` there (scripts/test.sh does)');
  execFileSync('npm', ['run', '--silent', 'build'], { cwd: EXAMPLE, stdio: 'inherit' });
  h = await startHerald({ HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: 'react-key-0123456789ab' });
  app = await startApp(h.addr);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
});

after(async () => {
  await browser?.close();
  app?.proc.kill('SIGTERM');
  await h?.stop();
});

/** useChat's state as the page holds it. */
const chat = () => page.evaluate(() => window.__chat);
const assistant = (m) => m.messages.filter((x) => x.role === 'assistant');
const partsOf = (msg, type) => msg.parts.filter((p) => p.type === type);

async function send(text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

test('a message sent through useChat streams the demo run: reasoning, a tool call, the answer', async () => {
  await page.goto(`${app.url}/?user=rita&chat=c1`);
  await page.waitForSelector('#conn[data-state="open"]');
  await send('plan my trip to Porto');
  await page.waitForSelector('#messages[data-status="streaming"]');
  await page.waitForSelector('#messages[data-status="ready"] .msg.assistant .text', { timeout: 10000 });
  const state = await chat();
  assert.deepEqual(state.messages.map((m) => m.role), ['user', 'assistant']);
  const [answer] = assistant(state);
  const reasoning = partsOf(answer, 'reasoning').map((p) => p.text).join('');
  assert.deepEqual(reasoning.trim().split('\n'), ['Reading your message', 'Thinking about “plan my trip to Porto”', 'Writing the answer']);
  const tools = partsOf(answer, 'dynamic-tool');
  assert.equal(tools.length, 1);
  assert.equal(tools[0].toolName, 'search');
  assert.equal(tools[0].state, 'output-available');
  assert.match(partsOf(answer, 'text')[0].text, /plan my trip to Porto/);
  assert.equal(await page.locator('.tool[data-state="output-available"]').count(), 1);
});

test('a reload mid-run resumes it: the whole run, each part once', async () => {
  await send('a question to reload during');
  // The run is streaming: its first reasoning line is on the page.
  await page.waitForFunction(() => {
    const a = window.__chat?.messages.at(-1);
    return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
  });
  const before = await chat();
  assert.ok(!assistant(before).at(-1).parts.some((p) => p.type === 'text'), 'the run already ended before the reload');
  await page.reload();
  await page.waitForSelector('#messages[data-status="ready"] .msg.assistant:nth-child(4) .text', { timeout: 10000 });
  const after = await chat();
  assert.deepEqual(after.messages.map((m) => m.role), ['user', 'assistant', 'user', 'assistant']);
  assert.equal(after.messages[2].parts[0].text, 'a question to reload during');
  const resumed = after.messages[3];
  const reasoning = partsOf(resumed, 'reasoning').map((p) => p.text).join('');
  // From agent_started: the first line, streamed before the reload, is there, once.
  assert.deepEqual(reasoning.trim().split('\n'), ['Reading your message', 'Thinking about “a question to reload during”', 'Writing the answer']);
  assert.equal(partsOf(resumed, 'dynamic-tool').length, 1);
  assert.equal(partsOf(resumed, 'text').length, 1);
  assert.match(partsOf(resumed, 'text')[0].text, /a question to reload during/);
});

test('Stop cancels the run at the agent', async () => {
  // Every event of the page's client, as it arrives (a second listener).
  await page.evaluate(() => {
    window.__events = [];
    window.__herald.client.on('event', (e) => window.__events.push({ run: e.run_id, event: e.event }));
  });
  await send('stop me please');
  await page.waitForFunction(() => {
    const a = window.__chat?.messages.at(-1);
    return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
  });
  await page.click('#stop');
  await page.waitForSelector('#messages[data-status="ready"]');
  // The agent ended the run with agent_cancelled, and nothing after it.
  await page.waitForFunction(() => window.__events.some((e) => e.event === 'agent_cancelled'), null, { timeout: 5000 });
  const events = await page.evaluate(() => window.__events);
  const runId = events.find((e) => e.event === 'agent_started').run;
  const run = events.filter((e) => e.run === runId).map((e) => e.event);
  assert.equal(run.at(-1), 'agent_cancelled', `the run's events: ${run}`);
  assert.ok(!run.includes('agent_completed'), `the run's events: ${run}`);
  const stopped = (await chat()).messages.at(-1);
  assert.equal(stopped.role, 'assistant');
  assert.equal(partsOf(stopped, 'text').length, 0, 'no answer after Stop');
  assert.equal(await page.locator('#send').count(), 1, 'the form is ready for the next message');
});

/** POST /token to the app server at `base`, with these headers over the defaults; resolves {status, type, body}. */
function postToken(base, headers) {
  const u = new URL(base);
  const body = JSON.stringify({ user: 'mallory' });
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: u.hostname, port: u.port, path: '/token', method: 'POST',
      headers: { host: u.host, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers },
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { text += d; });
      res.on('end', () => resolve({ status: res.statusCode, type: res.headers['content-type'], body: JSON.parse(text) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

test('the app server mints tokens for its own host and origin only (no DNS rebinding)', async () => {
  const { host, port } = new URL(app.url); // 127.0.0.1:<port>
  const same = await postToken(app.url, { origin: `http://${host}` });
  assert.equal(same.status, 200, JSON.stringify(same.body));
  assert.match(same.body.token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  assert.equal((await postToken(app.url, {})).status, 200, 'no Origin: not a cross-site browser request');
  assert.equal((await postToken(app.url, { host: `localhost:${port}`, origin: `http://localhost:${port}` })).status, 200);
  for (const headers of [
    { host: 'evil.example' },
    { host: `evil.example:${port}` },
    { host: 'evil.example', origin: 'http://evil.example' },
    { origin: 'http://evil.example' },
    { origin: `http://evil.example:${port}` },
    { origin: 'null' },
    { host: `localhost:${port}`, origin: `http://${host}` },
  ]) {
    const r = await postToken(app.url, headers);
    assert.equal(r.status, 403, `${JSON.stringify(headers)} got ${r.status} ${JSON.stringify(r.body)}`);
    assert.equal(r.type, 'application/json');
    assert.equal(r.body.token, undefined);
    assert.match(r.body.error, /forbidden host|cross-origin/);
  }
  // Behind a proxy: the public name is allowed by ALLOWED_HOSTS.
  const proxied = await startApp(h.addr, { ALLOWED_HOSTS: 'chat.example.test' });
  try {
    const ok = await postToken(proxied.url, { host: 'chat.example.test', origin: 'https://chat.example.test' });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.equal((await postToken(proxied.url, { host: 'chat.example.test', origin: 'https://evil.example' })).status, 403);
    assert.equal((await postToken(proxied.url, { host: 'evil.example' })).status, 403);
  } finally {
    proxied.proc.kill('SIGTERM');
  }
});

/** The events of `user`'s stream, from a raw `/ws` socket (what the agent side sees). */
async function watchEvents(user) {
  const ws = new WebSocket(`ws://${h.addr}/ws`, ['herald.v1']);
  const events = [];
  ws.addEventListener('message', (m) => { const f = JSON.parse(m.data); if (f.type === 'event') events.push(f); });
  await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
  ws.send(JSON.stringify({ type: 'hello', token: mintToken(SECRET, user) }));
  return { events, close: () => ws.close() };
}

const toolParts = (msg) => msg.parts.filter((p) => p.type.startsWith('tool-'));

test('stock transport: a message streams reasoning, a tool call and the answer (no Herald code in the page)', async () => {
  await page.goto(`${app.url}/stock?user=sam&chat=s1`);
  await page.waitForSelector('#messages[data-status="ready"]', { state: 'attached' });
  assert.equal(await page.evaluate(() => 'HeraldClient' in window || !!window.__herald), false);
  await send('stock transport to Lisbon');
  await page.waitForSelector('#messages[data-status="streaming"]');
  await page.waitForSelector('#messages[data-status="ready"] .msg.assistant .text', { timeout: 10000 });
  const [answer] = assistant(await chat());
  const reasoning = partsOf(answer, 'reasoning').map((p) => p.text).join('');
  assert.deepEqual(reasoning.split(/(?=Thinking|Writing)/), ['Reading your message', 'Thinking about “stock transport to Lisbon”', 'Writing the answer']);
  const tools = toolParts(answer);
  assert.deepEqual(tools.map((t) => [t.type, t.state]), [['tool-search', 'output-available']]);
  assert.match(partsOf(answer, 'text')[0].text, /^You said: “stock transport to Lisbon”/);
});

test('stock transport: a reload mid-answer resumes it (resume: true), each part once', async () => {
  await send('reload me mid answer');
  await page.waitForFunction(() => {
    const a = window.__chat?.messages.at(-1);
    return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
  });
  assert.ok(!assistant(await chat()).at(-1).parts.some((p) => p.type === 'text'), 'still answering at the reload');
  await page.reload();
  await page.waitForSelector('#messages[data-status="ready"] .msg.assistant:nth-child(4) .text', { timeout: 10000 });
  const after = await chat();
  assert.deepEqual(after.messages.map((m) => m.role), ['user', 'assistant', 'user', 'assistant']);
  const resumed = after.messages[3];
  const reasoning = partsOf(resumed, 'reasoning').map((p) => p.text).join('');
  assert.deepEqual(reasoning.split(/(?=Thinking|Writing)/), ['Reading your message', 'Thinking about “reload me mid answer”', 'Writing the answer']);
  assert.equal(toolParts(resumed).length, 1);
  assert.equal(partsOf(resumed, 'text').length, 1);
  assert.match(partsOf(resumed, 'text')[0].text, /^You said: “reload me mid answer”.*connect your own\.$/);
});

test('stock transport: Stop reaches the agent (the run ends agent_cancelled)', async () => {
  const w = await watchEvents('sam');
  try {
    await send('stop this one');
    await page.waitForFunction(() => {
      const a = window.__chat?.messages.at(-1);
      return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
    });
    await page.click('#stop');
    await page.waitForSelector('#messages[data-status="ready"]');
    await until(() => w.events.some((e) => e.event === 'agent_cancelled' && e.thread_id === 's1'), 5000, 'agent_cancelled');
    const run = w.events.find((e) => e.event === 'agent_cancelled').run_id;
    assert.ok(!w.events.some((e) => e.run_id === run && e.event === 'agent_completed'));
  } finally {
    w.close();
  }
});

test('stock transport: useChat\'s resumeStream() twice in a row does not stop the answer; Stop after a resume does', async () => {
  const w = await watchEvents('sam');
  try {
    await send('resume me twice ' + 'word '.repeat(40));
    await page.waitForFunction(() => {
      const a = window.__chat?.messages.at(-1);
      return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
    });
    // The second call, once the first one's resume is on the wire, aborts
    // it (the same frame as Stop); Herald's grace keeps the answer going.
    await page.evaluate(async () => {
      window.__resumeStream();
      await new Promise((r) => setTimeout(r, 300));
      window.__resumeStream();
    });
    await page.waitForSelector('#messages[data-status="ready"] .msg.assistant:last-child .text', { timeout: 15000 });
    const done = (await chat()).messages.at(-1);
    assert.match(partsOf(done, 'text')[0].text, /connect your own\.$/, 'the answer ran to its end');
    assert.equal(partsOf(done, 'text').length, 1);
    const run = w.events.filter((e) => e.event === 'agent_started').at(-1).run_id;
    assert.ok(!w.events.some((e) => e.run_id === run && e.event === 'agent_cancelled'), 'not cancelled');
    // Stop after a resume: a reload mid-answer resumes it, then Stop.
    await send('stop after reload ' + 'word '.repeat(60));
    await page.waitForFunction(() => {
      const a = window.__chat?.messages.at(-1);
      return a?.role === 'assistant' && a.parts.some((p) => p.type === 'reasoning');
    });
    await page.reload();
    await page.waitForSelector('#messages[data-status="streaming"]', { timeout: 10000 });
    await page.click('#stop');
    await until(() => w.events.some((e) => e.event === 'agent_cancelled' && e.thread_id === 's1'), 5000, 'the stop after the resume');
  } finally {
    w.close();
  }
});
