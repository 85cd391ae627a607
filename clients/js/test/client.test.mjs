// Unit tests of the browser client against a real Herald (Node's test runner,
// Node's WebSocket: run with --experimental-websocket on Node 20).
import { test, before, after } from 'node:test';
import http from 'node:http';
import net from 'node:net';
import assert from 'node:assert/strict';
import { HeraldClient, HeraldClosedError } from '../herald.js';
import { startHerald, mintToken, api, until, freshTokens, helloRecorder } from './helpers.mjs';

let h;
before(async () => { h = await startHerald({ HERALD_JWT_HS256_SECRET: 'node-secret-0123456789-abcdefghijklmn', HERALD_API_KEY: 'node-key-0123456789ab' }); });
after(async () => { await h.stop(); });

const url = () => `ws://${h.addr}/ws`;

test('connects, says hello, and reports state changes', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n1') });
  const states = [];
  c.on('state', (s) => states.push(s));
  const welcome = new Promise((r) => c.on('welcome', r));
  c.connect();
  const w = await welcome;
  assert.equal(w.user_id, 'n1');
  assert.deepEqual(states, ['connecting', 'open']);
  assert.equal(c.position.epoch, w.epoch);
  c.close();
  assert.equal(c.state, 'closed');
});

test('sendMessage resolves on ack and the demo agent run arrives in order', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n2') });
  const events = [];
  const texts = [];
  c.on('event', (e) => events.push(e));
  c.on('text', (t) => texts.push(t));
  let assembled = null;
  const done = new Promise((r) => c.on('agent_completed', (e) => {
    assembled = c.text(e.run_id); // still there while the event is handled
    r(e);
  }));
  c.connect();
  await until(() => c.state === 'open');
  const ack = await c.sendMessage('t1', 'hello agent');
  assert.ok(ack.id);
  const final = await done;
  assert.match(final.data.final_response, /hello agent/);
  const names = [...new Set(events.map((e) => e.event))];
  assert.deepEqual(names, ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_text_delta', 'agent_completed']);
  // The answer, assembled from its deltas, is the final response.
  assert.ok(texts.length > 10, `${texts.length} text updates`);
  assert.equal(texts.at(-1).text, final.data.final_response);
  assert.equal(texts.map((t) => t.delta).join(''), final.data.final_response);
  assert.ok(texts.every((t) => t.part === 'answer' && t.runId === final.run_id && !t.replayed));
  assert.equal(assembled, final.data.final_response);
  assert.equal(c.text(final.run_id), '', 'forgotten once the run closed');
  const seqs = events.map((e) => e.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
  c.close();
});

test('a kick (4409) stops a client with a fixed token: no second hello, state closed, error kicked', async () => {
  const rec = helloRecorder();
  const token = mintToken(h.secret, 'n3k');
  // backoffBaseMs: 20 — a reconnect, were there one, would come at once.
  const c = new HeraldClient({ url: url(), token, WebSocket: rec.WebSocket, backoffBaseMs: 20, network: null });
  const closes = [];
  const errors = [];
  const states = [];
  c.on('close', (e) => closes.push(e.code));
  c.on('error', (e) => errors.push(e.code));
  c.on('state', (s) => states.push(s));
  c.connect();
  await until(() => c.state === 'open');
  assert.equal((await api(h, '/api/v1/disconnect', { user_id: 'n3k' })).disconnected, 1);
  await until(() => closes.length === 1, 5000, 'the kick');
  await new Promise((r) => setTimeout(r, 1000));
  assert.deepEqual(rec.hellos, [token], 'no second hello with the kicked token');
  assert.deepEqual(closes, [4409]);
  assert.deepEqual(errors, ['kicked']);
  assert.deepEqual(states, ['connecting', 'open', 'closed']);
  assert.deepEqual(await connectionsOf('n3k'), []);
  // An explicit connect() is the app's decision, and is honoured.
  c.connect();
  await until(() => c.state === 'open', 5000, 'reopened by connect()');
  assert.equal(rec.hellos.length, 2);
  c.close();
});

test('a kick stops a client whose getToken gives back the kicked token', async () => {
  const rec = helloRecorder();
  const token = mintToken(h.secret, 'n3c');
  let calls = 0;
  const c = new HeraldClient({ url: url(), getToken: async () => { calls += 1; return token; }, WebSocket: rec.WebSocket, backoffBaseMs: 20, network: null });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  // An app calling connect() again while the client reconnects (a remount)
  // does not lift the kick.
  c.on('state', (s) => { if (s === 'reconnecting') queueMicrotask(() => c.connect()); });
  c.connect();
  await until(() => c.state === 'open');
  await api(h, '/api/v1/disconnect', { user_id: 'n3c' });
  await until(() => c.state === 'closed', 5000, 'closed');
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(rec.hellos, [token], 'no second hello with the kicked token');
  assert.equal(calls, 2, 'asked once for a new token');
  assert.deepEqual(errors, ['kicked']);
  assert.equal(c.state, 'closed');
});

test('after a kick, a new token from getToken reconnects and resumes with no lost or duplicated event', async () => {
  const rec = helloRecorder();
  const getToken = freshTokens(h.secret, 'n3');
  const c = new HeraldClient({ url: url(), getToken, WebSocket: rec.WebSocket, backoffBaseMs: 50 });
  const seqs = [];
  const closes = [];
  c.on('event', (e) => seqs.push(e.seq));
  c.on('close', (e) => closes.push(e.code));
  c.connect();
  await until(() => c.state === 'open');
  const pub = (n) => api(h, '/api/v1/events', { events: Array.from({ length: n }, () => ({ user_id: 'n3', event: 'note' })) });
  await pub(3);
  await until(() => seqs.length === 3, 5000, '3 events');
  await api(h, '/api/v1/disconnect', { user_id: 'n3' });
  await pub(4); // published while the client is away or reconnecting
  await until(() => seqs.length === 7, 10000, '7 events');
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(closes, [4409]);
  assert.equal(c.state, 'open');
  assert.equal(getToken.calls, 2);
  assert.equal(rec.hellos.length, 2);
  assert.notEqual(rec.hellos[1], rec.hellos[0], 'reconnected with the new token, not the kicked one');
  c.close();
});

test('text parts are assembled across a reconnect: the missed deltas arrive as one frame, no word twice', async () => {
  // A kick reconnects only with a new token (getToken).
  const c = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n3t'), backoffBaseMs: 50 });
  const updates = [];
  c.on('text', (t) => updates.push(t));
  c.connect();
  await until(() => c.state === 'open');
  const words = Array.from({ length: 30 }, (_, i) => `w${i} `);
  const delta = (i) => ({ user_id: 'n3t', event: 'agent_text_delta', run_id: 'r1', data: { part: 'answer', index: i, text: words[i] } });
  await api(h, '/api/v1/events', { user_id: 'n3t', event: 'agent_started', run_id: 'r1' });
  await api(h, '/api/v1/events', { events: [0, 1, 2, 3, 4].map(delta) });
  await until(() => c.text('r1') === words.slice(0, 5).join(''), 5000, 'five words');
  await api(h, '/api/v1/disconnect', { user_id: 'n3t' });
  await api(h, '/api/v1/events', { events: words.slice(5, 20).map((_, i) => delta(i + 5)) });
  await until(() => c.text('r1').length === words.slice(0, 20).join('').length, 10000, 'twenty words');
  assert.equal(c.text('r1'), words.slice(0, 20).join(''));
  // The fifteen words published while away came back as one replayed frame.
  const replayed = updates.filter((u) => u.replayed);
  assert.deepEqual(replayed.map((u) => u.delta), [words.slice(5, 20).join('')]);
  await api(h, '/api/v1/events', { events: words.slice(20).map((_, i) => delta(i + 20)) });
  await until(() => updates.at(-1).text === words.join(''), 5000, 'all words');
  assert.equal(updates.map((u) => u.delta).join(''), words.join(''));
  c.close();
});

test('stops on 4401 without a token callback', async () => {
  const c = new HeraldClient({ url: url(), token: 'garbage' });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  c.connect();
  await until(() => c.state === 'closed', 5000, 'closed');
  assert.deepEqual(errors, ['unauthorized']);
});

test('asks the token callback again after 4403 and then connects', async () => {
  let calls = 0;
  const c = new HeraldClient({
    url: url(),
    getToken: async () => (++calls === 1 ? mintToken(h.secret, 'n4', -60) : mintToken(h.secret, 'n4')),
    backoffBaseMs: 20,
  });
  const closes = [];
  c.on('close', (e) => closes.push(e.code));
  c.connect();
  await until(() => c.state === 'open', 5000, 'open');
  assert.equal(calls, 2);
  assert.deepEqual(closes, [4403]);
  c.close();
});

test('a drain (1012) is followed by a reconnect after reconnect_after_ms', async () => {
  const env = { HERALD_JWT_HS256_SECRET: 's2-0123456789-abcdefghijklmnopqrst', HERALD_API_KEY: 'k2-0123456789abcdef', HERALD_DRAIN_WINDOW: '1s' };
  const h2 = await startHerald(env);
  // Record when each connection attempt starts.
  const attempts = [];
  class Recording extends globalThis.WebSocket {
    constructor(...args) { super(...args); attempts.push(Date.now()); }
  }
  // backoffBaseMs: 1 — were the hint ignored, the retry would come at once.
  const c = new HeraldClient({ url: `ws://${h2.addr}/ws`, token: mintToken(h2.secret, 'n5'), WebSocket: Recording, backoffBaseMs: 1 });
  const welcomes = [];
  c.on('welcome', (w) => welcomes.push(w));
  const closing = new Promise((r) => c.on('closing', r));
  let closedAt = 0;
  const closed = new Promise((r) => c.on('close', (e) => { closedAt = Date.now(); r(e); }));
  c.connect();
  await until(() => c.state === 'open');
  h2.proc.kill('SIGTERM');
  const f = await closing;
  assert.equal(f.reason, 'shutdown');
  const hint = f.reconnect_after_ms;
  assert.ok(hint >= 250 && hint <= 1250, `hint ${hint}`);
  assert.equal((await closed).code, 1012);
  assert.equal(c.state, 'reconnecting');
  // The redeployed server comes up on the same address.
  await h2.stop();
  const h3 = await startHerald({ ...env, HERALD_ADDR: h2.addr });
  try {
    await until(() => welcomes.length === 2 && c.state === 'open', 10000, 'reconnected to the new server');
    assert.equal(attempts.length >= 2, true);
    const waited = attempts[1] - closedAt;
    assert.ok(waited >= hint - 1, `retried after ${waited} ms, before the ${hint} ms hint`);
    assert.ok(waited < hint + 1000, `retried after ${waited} ms, long after the ${hint} ms hint`);
    // The new server has no history: the client is told it starts over.
    assert.equal(welcomes[1].reset, true);
    assert.notEqual(welcomes[1].epoch, welcomes[0].epoch);
  } finally {
    c.close();
    await h3.stop();
  }
});

/** The server's live connections of `user`. */
async function connectionsOf(user) {
  const r = await fetch(`http://${h.addr}/api/v1/connections?user_id=${user}`, { headers: { authorization: `Bearer ${h.apiKey}` } });
  return (await r.json()).connections;
}

test('connect/close churn with a slow getToken leaves exactly one socket', async () => {
  let fetches = 0;
  const getToken = async () => {
    fetches += 1;
    await new Promise((r) => setTimeout(r, 150));
    return mintToken(h.secret, 'n7');
  };
  const c = new HeraldClient({ url: url(), getToken });
  const seqs = [];
  const welcomes = [];
  c.on('event', (e) => seqs.push(e.seq));
  c.on('welcome', (w) => welcomes.push(w));
  // React StrictMode's double mount, and then some: every token fetch of an
  // earlier generation resolves after the close that orphaned it.
  c.connect();
  c.connect();
  c.close();
  c.connect();
  await new Promise((r) => setTimeout(r, 50));
  c.close();
  c.connect();
  await until(() => c.state === 'open', 5000, 'open');
  await new Promise((r) => setTimeout(r, 400)); // every orphaned fetch has resolved
  assert.equal(fetches, 3, 'one fetch per connect after a close');
  assert.equal(welcomes.length, 1);
  assert.equal((await connectionsOf('n7')).length, 1, 'exactly one server-side connection');
  await api(h, '/api/v1/events', { events: [1, 2, 3].map(() => ({ user_id: 'n7', event: 'note' })) });
  await until(() => seqs.length >= 3, 5000, '3 events');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(seqs, [1, 2, 3], 'each event once');
  c.close();
  await until(async () => (await connectionsOf('n7')).length === 0, 5000, 'the server sees the close');
});

test('close() rejects sends still waiting for their ack', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n8'), ackTimeoutMs: 60000 });
  // Not connected: the send waits (it would be sent on the next welcome).
  const pending = c.sendMessage('t1', 'never acked');
  c.close();
  await assert.rejects(pending, (e) => e instanceof HeraldClosedError && e.code === 'closed' && typeof e.id === 'string');
});

test('a caller-chosen id retried after a timeout reaches the backend once', async () => {
  // A backend that takes 1.5 s to answer, counting what it receives.
  const seen = [];
  const backend = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      seen.push(JSON.parse(body).message_id);
      setTimeout(() => { res.writeHead(200); res.end(); }, 1500);
    });
  });
  await new Promise((r) => backend.listen(0, '127.0.0.1', r));
  const hw = await startHerald({
    HERALD_JWT_HS256_SECRET: 'w-secret-0123456789-abcdefghijklmnop', HERALD_API_KEY: 'w-key-0123456789abcd',
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${backend.address().port}/hook`, HERALD_WEBHOOK_SECRET: 'w-hook-0123456789abcd',
  });
  const c = new HeraldClient({ url: `ws://${hw.addr}/ws`, token: mintToken(hw.secret, 'n9'), ackTimeoutMs: 300 });
  try {
    c.connect();
    await until(() => c.state === 'open');
    await assert.rejects(c.sendMessage('t1', 'slow', {}, { id: 'my-id-1' }), (e) => e.code === 'timeout' && e.id === 'my-id-1');
    // The app retries with the same id once the backend has answered: acked
    // as a duplicate, not forwarded again.
    await new Promise((r) => setTimeout(r, 1500));
    assert.deepEqual(await c.sendMessage('t1', 'slow', {}, { id: 'my-id-1' }), { id: 'my-id-1' });
    assert.deepEqual(seen, ['my-id-1']);
  } finally {
    c.close();
    await hw.stop();
    backend.close();
  }
});

test('the ack timer runs only while the message is on a socket', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n10'), ackTimeoutMs: 300 });
  // Sent while disconnected, longer ago than the timeout: not a timeout.
  const sent = c.sendMessage('t1', 'queued while offline', {}, { id: 'offline-1' });
  await new Promise((r) => setTimeout(r, 500));
  c.connect();
  assert.deepEqual(await sent, { id: 'offline-1' });
  c.close();
});

test('cancel while disconnected is sent after the welcome, or rejected by close()', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n11') });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  const cancelled = c.cancel('run_nope');
  c.connect();
  await cancelled;
  // The server got it: an unknown run is answered with an error frame.
  await until(() => errors.includes('unknown_run'), 5000, 'unknown_run');
  c.close();
  const later = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n11') });
  const dropped = later.cancel('run_x');
  later.close();
  await assert.rejects(dropped, (e) => e instanceof HeraldClosedError);
});

test('with getToken, a 5-second token is refreshed: one connection outlives three lifetimes', async () => {
  let fetches = 0;
  const getToken = async () => { fetches += 1; return mintToken(h.secret, 'n12', 5); };
  const c = new HeraldClient({ url: url(), getToken });
  const welcomes = [];
  const closes = [];
  c.on('welcome', (w) => welcomes.push(w.conn_id));
  c.on('close', (e) => closes.push(e.code));
  c.connect();
  await until(() => c.state === 'open');
  await new Promise((r) => setTimeout(r, 16000));
  assert.deepEqual(closes, [], 'no 4403');
  assert.equal(welcomes.length, 1, 'the same connection');
  assert.ok(fetches >= 4, `${fetches} token fetches`);
  // Still served.
  const seqs = [];
  c.on('event', (e) => seqs.push(e.seq));
  await api(h, '/api/v1/events', { user_id: 'n12', event: 'note' });
  await until(() => seqs.length === 1, 5000, 'an event');
  c.close();
});

test('getToken returning null stops the client with an error', async () => {
  let calls = 0;
  const c = new HeraldClient({ url: url(), getToken: async () => { calls += 1; return calls === 1 ? mintToken(h.secret, 'n13', 3) : null; } });
  const errors = [];
  let welcomed = false;
  c.on('error', (e) => errors.push(e.code));
  c.on('welcome', () => { welcomed = true; });
  c.connect();
  await until(() => welcomed, 5000, 'welcome');
  // The refresh (about 1 s before expiry) gets null: stop, no reconnect.
  await until(() => c.state === 'closed', 5000, 'stopped');
  assert.deepEqual(errors, ['unauthorized']);
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(calls, 2, 'no further fetches');
  assert.equal(c.state, 'closed');
});

/** A TCP proxy to Herald whose open connections can be frozen: nothing moves
 * either way and nothing is closed (a half-open socket); new connections
 * pass. */
async function freezableProxy(target) {
  const [host, port] = target.split(':');
  const live = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(Number(port), host);
    const pair = { down, up, frozen: false };
    live.add(pair);
    down.on('data', (d) => { if (!pair.frozen) up.write(d); });
    up.on('data', (d) => { if (!pair.frozen) down.write(d); });
    const end = () => { live.delete(pair); down.destroy(); up.destroy(); };
    down.on('error', end); up.on('error', end); down.on('close', end); up.on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    freeze: () => { for (const p of live) p.frozen = true; },
    close: () => { for (const p of live) { p.down.destroy(); p.up.destroy(); } server.close(); },
  };
}

test('a half-open socket is detected by app-level ping and resumed with nothing lost', async () => {
  const proxy = await freezableProxy(h.addr);
  const c = new HeraldClient({ url: `ws://${proxy.addr}/ws`, token: mintToken(h.secret, 'n14'), livenessMs: 400, pongTimeoutMs: 400, backoffBaseMs: 50, network: null });
  const seqs = [];
  const welcomes = [];
  c.on('event', (e) => seqs.push(e.seq));
  c.on('welcome', (w) => welcomes.push(w));
  try {
    c.connect();
    await until(() => c.state === 'open');
    const pub = (n) => api(h, '/api/v1/events', { events: Array.from({ length: n }, () => ({ user_id: 'n14', event: 'note' })) });
    await pub(2);
    await until(() => seqs.length === 2, 5000, '2 events');
    // Idle pings are answered: the connection stays.
    await new Promise((r) => setTimeout(r, 1200));
    assert.equal(welcomes.length, 1, 'answered pings keep the connection');
    proxy.freeze();
    const frozenAt = Date.now();
    await pub(3); // never reaches the frozen socket
    await until(() => welcomes.length === 2, 5000, 'reconnected');
    const detectedIn = Date.now() - frozenAt;
    assert.ok(detectedIn < 400 + 400 + 1000, `detected after ${detectedIn} ms`);
    assert.equal(welcomes[1].resumed, true);
    await until(() => seqs.length === 5, 5000, 'the 3 missed events');
    assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
  } finally {
    c.close();
    proxy.close();
  }
});

test('offline stops reconnect attempts; online reconnects at once', async () => {
  const network = new EventTarget();
  const c = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n15'), backoffBaseMs: 60000, network });
  const welcomes = [];
  c.on('welcome', (w) => welcomes.push(w));
  c.connect();
  await until(() => c.state === 'open');
  network.dispatchEvent(new Event('offline'));
  await api(h, '/api/v1/disconnect', { user_id: 'n15' });
  await until(() => c.state === 'reconnecting', 5000, 'reconnecting');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(welcomes.length, 1, 'no attempt while offline');
  // A 60 s backoff would apply; online reconnects now.
  network.dispatchEvent(new Event('online'));
  await until(() => welcomes.length === 2, 3000, 'reconnected on online');
  c.close();
});

test('a client reloaded mid-run with storageKey shows the whole run once, marked replayed, then caught_up', async () => {
  const storage = new Map();
  const store = { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, v) };
  const ev = (event) => ({ user_id: 'n16', event, run_id: 'r1', thread_id: 't1' });
  const first = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n16'), storageKey: 'k', storage: store });
  const seen1 = [];
  first.on('event', (e) => seen1.push(e.seq));
  first.connect();
  await until(() => first.state === 'open');
  await api(h, '/api/v1/events', { events: [ev('agent_started'), { user_id: 'n16', event: 'note' }, ev('agent_thinking')] });
  await until(() => seen1.length === 3, 5000, '3 events');
  first.close(); // the page goes away; its position (seq 3) is stored
  await api(h, '/api/v1/events', { events: [ev('tool_executing')] });
  // The reloaded page: a new client on the same storage.
  const page = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n16'), storageKey: 'k', storage: store });
  const got = [];
  const order = [];
  page.on('event', (e) => { got.push([e.seq, e.event, e.replayed === true]); order.push('event'); });
  page.on('caught_up', (c) => order.push(`caught_up:${c.seq}`));
  page.connect();
  await until(() => order.includes('caught_up:4'), 5000, 'caught_up');
  assert.deepEqual(got, [[1, 'agent_started', true], [3, 'agent_thinking', true], [4, 'tool_executing', true]]);
  assert.deepEqual(order, ['event', 'event', 'event', 'caught_up:4']);
  // A reconnect of the same page does not replay the run again.
  await api(h, '/api/v1/disconnect', { user_id: 'n16' });
  await until(() => order.filter((o) => o.startsWith('caught_up')).length === 2, 10000, 'second caught_up');
  await api(h, '/api/v1/events', { events: [ev('agent_completed')] });
  await until(() => got.length === 4, 5000, 'live event');
  assert.deepEqual(got[3], [5, 'agent_completed', false]);
  page.close();
});
