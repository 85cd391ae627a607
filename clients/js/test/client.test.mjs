// Unit tests of the browser client against a real Herald (Node's test runner,
// Node's WebSocket: run with --experimental-websocket on Node 20).
import { test, before, after } from 'node:test';
import http from 'node:http';
import net from 'node:net';
import assert from 'node:assert/strict';
import { HeraldClient, HeraldClosedError } from '../herald.js';
import { startHerald, mintToken, api, until, settle, freshTokens, helloRecorder, wsRecorder, fakeClock, expOf, joinDeltas, connectionsOf as connectionsAt } from './helpers.mjs';

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
  // The accepted message is in the stream first (published before the
  // agent sees it), then the run that names it.
  assert.deepEqual(names, ['user_message', 'agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_text_delta', 'agent_completed']);
  assert.equal(events.filter((e) => e.event === 'user_message').length, 1);
  assert.deepEqual(events[0].data, { id: ack.id, text: 'hello agent', data: {}, user_id: 'n2' });
  assert.equal(events[0].thread_id, 't1');
  assert.equal(events[0].run_id, undefined);
  assert.equal(events[1].data.message_id, ack.id);
  // The answer, assembled from its deltas, is the final response: one text
  // update per delta frame (deltas that reached the socket together come
  // joined in one frame).
  assert.deepEqual(texts.map((t) => t.seq), events.filter((e) => e.event === 'agent_text_delta').map((e) => e.seq));
  assert.equal(texts.at(-1).text, final.data.final_response);
  assert.equal(texts.map((t) => t.delta).join(''), final.data.final_response);
  assert.ok(texts.every((t) => t.part === 'answer' && t.runId === final.run_id && !t.replayed));
  assert.equal(assembled, final.data.final_response);
  assert.equal(c.text(final.run_id), '', 'forgotten once the run closed');
  // Every seq once, in order (a frame of joined deltas covers from_seq…seq).
  joinDeltas(events);
  c.close();
});

test('a kick (4409) stops a client with a fixed token: no second hello, state closed, error kicked', async () => {
  const rec = helloRecorder();
  const token = mintToken(h.secret, 'n3k');
  // Every timer of the client is on this clock: nothing armed on it, no
  // socket and no token to wait for means no reconnect can ever come.
  const clock = fakeClock();
  const c = new HeraldClient({ url: url(), token, WebSocket: rec.WebSocket, clock, network: null });
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
  assert.deepEqual(clock.pending(), [], 'no retry armed');
  assert.equal(rec.held, 0, 'no socket');
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
  const clock = fakeClock();
  const c = new HeraldClient({ url: url(), getToken: async () => { calls += 1; return token; }, WebSocket: rec.WebSocket, clock, network: null });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  // An app calling connect() again while the client reconnects (a remount)
  // does not lift the kick.
  c.on('state', (s) => { if (s === 'reconnecting') queueMicrotask(() => c.connect()); });
  c.connect();
  await until(() => c.state === 'open');
  await api(h, '/api/v1/disconnect', { user_id: 'n3c' });
  await until(() => c.state === 'reconnecting', 5000, 'the kick');
  clock.advance(500); // the retry (backoffBaseMs): it asks getToken
  await until(() => c.state === 'closed', 5000, 'closed');
  assert.deepEqual(clock.pending(), [], 'no retry armed');
  assert.equal(rec.held, 0, 'no socket');
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
  const rec = wsRecorder();
  const clock = fakeClock();
  // backoffBaseMs: 1 — were the hint ignored, the retry would come at once.
  const c = new HeraldClient({ url: `ws://${h2.addr}/ws`, token: mintToken(h2.secret, 'n5'), WebSocket: rec.WebSocket, backoffBaseMs: 1, clock, network: null });
  const welcomes = [];
  c.on('welcome', (w) => welcomes.push(w));
  const closing = new Promise((r) => c.on('closing', r));
  const closed = new Promise((r) => c.on('close', r));
  c.connect();
  await until(() => c.state === 'open');
  h2.proc.kill('SIGTERM');
  const f = await closing;
  assert.equal(f.reason, 'shutdown');
  const hint = f.reconnect_after_ms;
  assert.ok(hint >= 250 && hint <= 1250, `hint ${hint}`);
  assert.equal((await closed).code, 1012);
  assert.equal(c.state, 'reconnecting');
  // The one timer armed is the retry, at the hint on the client's clock.
  const closedAt = clock.now();
  assert.deepEqual(clock.pending(), [closedAt + hint]);
  // The redeployed server comes up on the same address.
  await h2.stop();
  const h3 = await startHerald({ ...env, HERALD_ADDR: h2.addr });
  try {
    clock.advance(hint - 1);
    assert.equal(rec.constructed, 1, 'no retry before the hint');
    clock.advance(1);
    assert.equal(rec.constructed, 2, 'the retry at the hint');
    await until(() => welcomes.length === 2 && c.state === 'open', 10000, 'reconnected to the new server');
    // The new server has no history: the client is told it starts over.
    assert.equal(welcomes[1].reset, true);
    assert.notEqual(welcomes[1].epoch, welcomes[0].epoch);
  } finally {
    c.close();
    await h3.stop();
  }
});

/** The server's live connections of `user`. */
const connectionsOf = (user) => connectionsAt(h, user);

test('connect/close churn with a slow getToken leaves exactly one socket', async () => {
  // Token fetches that the test answers, in the order it chooses.
  const fetches = [];
  const getToken = () => new Promise((resolve) => fetches.push(() => resolve(mintToken(h.secret, 'n7'))));
  const rec = wsRecorder();
  const c = new HeraldClient({ url: url(), getToken, WebSocket: rec.WebSocket });
  const seqs = [];
  const welcomes = [];
  c.on('event', (e) => seqs.push(e.seq));
  c.on('welcome', (w) => welcomes.push(w));
  // React StrictMode's double mount, and then some: every close orphans a
  // token fetch still in flight.
  c.connect();
  c.connect();
  c.close();
  c.connect();
  c.close();
  c.connect();
  assert.equal(fetches.length, 3, 'one fetch per connect after a close');
  // An orphaned fetch resolves before the current one, the other after it.
  fetches[0]();
  await settle();
  assert.equal(rec.constructed, 0, 'an orphaned fetch opens nothing');
  fetches[2]();
  await until(() => c.state === 'open', 5000, 'open');
  fetches[1]();
  await settle();
  assert.equal(rec.constructed, 1, 'one socket made');
  assert.equal(welcomes.length, 1);
  assert.equal((await connectionsOf('n7')).length, 1, 'exactly one server-side connection');
  await api(h, '/api/v1/events', { events: [1, 2, 3].map(() => ({ user_id: 'n7', event: 'note' })) });
  // A fourth event marks the end: anything doubled would come before it.
  await until(() => seqs.length >= 3, 5000, '3 events');
  await api(h, '/api/v1/events', { user_id: 'n7', event: 'note' });
  await until(() => seqs.includes(4), 5000, 'the 4th event');
  assert.deepEqual(seqs, [1, 2, 3, 4], 'each event once');
  c.close();
  await until(async () => (await connectionsOf('n7')).length === 0, 5000, 'the server sees the close');
});

test('connect() from close, state and error handlers after a kick opens no second socket: one server-side connection, a new token', async () => {
  const rec = wsRecorder();
  const clock = fakeClock();
  const c = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n17'), WebSocket: rec.WebSocket, clock, network: null, livenessMs: 0 });
  const welcomes = [];
  const closes = [];
  c.on('welcome', (w) => welcomes.push(w.conn_id));
  c.on('close', (e) => closes.push(e.code));
  // An app that calls connect() on whatever it hears, at once, twice.
  for (const name of ['close', 'state', 'error']) c.on(name, () => { c.connect(); c.connect(); });
  c.connect();
  await until(() => c.state === 'open');
  await api(h, '/api/v1/disconnect', { user_id: 'n17' });
  await until(() => closes.length === 1, 5000, 'the kick');
  // Any socket a handler made is through its handshake (and hello) first.
  await until(() => rec.sockets.every((ws) => ws.readyState !== WebSocket.CONNECTING), 5000, 'handshakes');
  c.connect(); // during the backoff wait
  clock.advance(500); // the retry (within backoffBaseMs)
  await settle();
  await until(() => welcomes.length >= 2 && c.state === 'open', 5000, 'reconnected');
  assert.deepEqual((await connectionsOf('n17')).map((x) => x.conn_id), [c.connId], 'one server-side connection');
  assert.equal(rec.maxHeld, 1, `${rec.constructed} sockets made, ${rec.maxHeld} held at once`);
  assert.equal(rec.constructed, 2);
  assert.equal(welcomes.length, 2);
  assert.notEqual(rec.hellos[1], rec.hellos[0], 'reconnected with a new token, not the kicked one');
  assert.deepEqual(clock.pending(), [expOf(rec.hellos[1]) * 1000 - 60000], 'nothing armed but the token refresh');
  c.close();
});

test('connect() twice, from error and state handlers and during the backoff after a failed token fetch: one socket', async () => {
  const rec = wsRecorder();
  const clock = fakeClock();
  let calls = 0;
  const getToken = async () => {
    calls += 1;
    if (calls === 1) throw new Error('token service down');
    return mintToken(h.secret, 'n18');
  };
  const c = new HeraldClient({ url: url(), getToken, WebSocket: rec.WebSocket, clock, network: null, livenessMs: 0 });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  for (const name of ['error', 'state']) c.on(name, () => { c.connect(); c.connect(); });
  c.connect();
  c.connect();
  await until(() => errors.length === 1, 5000, 'the failed fetch');
  assert.deepEqual(errors, ['token_unavailable']);
  c.connect(); // during the backoff wait
  clock.advance(500); // the retry (within backoffBaseMs)
  await settle();
  await until(() => c.state === 'open', 5000, 'open');
  assert.equal(rec.maxHeld, 1, `${rec.constructed} sockets made, ${rec.maxHeld} held at once`);
  assert.equal((await connectionsOf('n18')).length, 1, 'one server-side connection');
  assert.equal(rec.constructed, 1);
  assert.equal(calls, 2, 'one fetch for the retry, none for the handlers');
  assert.equal(clock.pending().length, 1, 'nothing armed but the token refresh');
  c.close();
});

test('close() and connect() from a close handler start the client again: one socket, a new token', async () => {
  const rec = wsRecorder();
  const clock = fakeClock();
  const c = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n19'), WebSocket: rec.WebSocket, clock, network: null, livenessMs: 0 });
  const welcomes = [];
  let restarted = false;
  c.on('welcome', (w) => welcomes.push(w.conn_id));
  c.on('close', () => { if (!restarted) { restarted = true; c.close(); c.connect(); } });
  c.connect();
  await until(() => c.state === 'open');
  await api(h, '/api/v1/disconnect', { user_id: 'n19' });
  await until(() => welcomes.length === 2 && c.state === 'open', 5000, 'started again');
  clock.advance(15000); // any retry armed (backoffMaxMs)
  await settle();
  assert.equal(rec.maxHeld, 1, `${rec.constructed} sockets made, ${rec.maxHeld} held at once`);
  assert.deepEqual((await connectionsOf('n19')).map((x) => x.conn_id), [c.connId], 'one server-side connection');
  assert.equal(rec.constructed, 2);
  assert.notEqual(rec.hellos[1], rec.hellos[0], 'started again with a new token, not the kicked one');
  c.close();
});

test('close() rejects sends still waiting for their ack', async () => {
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n8'), ackTimeoutMs: 60000 });
  // Not connected: the send waits (it would be sent on the next welcome).
  const pending = c.sendMessage('t1', 'never acked');
  c.close();
  await assert.rejects(pending, (e) => e instanceof HeraldClosedError && e.code === 'closed' && typeof e.id === 'string');
});

test('a caller-chosen id retried after a timeout reaches the backend once', async () => {
  // A backend that answers when the test says so, recording what it receives.
  const seen = [];
  const held = [];
  const backend = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      seen.push(JSON.parse(body).message_id);
      held.push(res);
    });
  });
  await new Promise((r) => backend.listen(0, '127.0.0.1', r));
  const hw = await startHerald({
    HERALD_JWT_HS256_SECRET: 'w-secret-0123456789-abcdefghijklmnop', HERALD_API_KEY: 'w-key-0123456789abcd',
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${backend.address().port}/hook`, HERALD_WEBHOOK_SECRET: 'w-hook-0123456789abcd',
  });
  const rec = wsRecorder();
  const clock = fakeClock();
  const c = new HeraldClient({ url: `ws://${hw.addr}/ws`, token: mintToken(hw.secret, 'n9'), ackTimeoutMs: 300, WebSocket: rec.WebSocket, clock });
  try {
    c.connect();
    await until(() => c.state === 'open');
    const first = c.sendMessage('t1', 'slow', {}, { id: 'my-id-1' });
    await until(() => seen.length === 1, 5000, 'the message at the backend');
    clock.advance(300); // the ack timeout, with the backend still busy
    await assert.rejects(first, (e) => e.code === 'timeout' && e.id === 'my-id-1');
    // The backend answers; Herald acks the message to a client that gave up on it.
    held[0].writeHead(200);
    held[0].end();
    await until(() => rec.received.some((f) => f.type === 'ack' && f.id === 'my-id-1'), 5000, 'the late ack');
    // The app retries with the same id: acked as a duplicate, not forwarded again.
    assert.deepEqual(await c.sendMessage('t1', 'slow', {}, { id: 'my-id-1' }), { id: 'my-id-1' });
    assert.deepEqual(seen, ['my-id-1']);
  } finally {
    for (const res of held) if (!res.writableEnded) { res.writeHead(200); res.end(); }
    c.close();
    await hw.stop();
    backend.close();
  }
});

test('the ack timer runs only while the message is on a socket', async () => {
  const clock = fakeClock();
  const c = new HeraldClient({ url: url(), token: mintToken(h.secret, 'n10'), ackTimeoutMs: 300, clock });
  // Sent while disconnected: no timer armed, so ten timeouts later it still waits.
  const sent = c.sendMessage('t1', 'queued while offline', {}, { id: 'offline-1' });
  assert.deepEqual(clock.pending(), [], 'no ack timer while on no socket');
  clock.advance(3000);
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

/**
 * A client refreshing its tokens on a fake clock, each token minted for
 * `ttls[i]` seconds from the clock's now, and recording its frames.
 */
async function refreshingClient(user, ttls, options = {}) {
  const clock = fakeClock();
  const rec = wsRecorder();
  const tokens = [];
  const getToken = async () => {
    const token = mintToken(h.secret, user, ttls[Math.min(tokens.length, ttls.length - 1)], clock.now());
    tokens.push(token);
    return token;
  };
  const c = new HeraldClient({ url: url(), getToken, clock, WebSocket: rec.WebSocket, network: null, livenessMs: 0, ...options });
  const welcomes = [];
  const closes = [];
  c.on('welcome', (w) => welcomes.push(w.conn_id));
  c.on('close', (e) => closes.push(e.code));
  c.connect();
  await until(() => c.state === 'open');
  const sent = (type) => rec.sent.filter((f) => f.type === type);
  const got = (type) => rec.received.filter((f) => f.type === type);
  return {
    c, clock, rec, tokens, welcomes, closes,
    /**
     * The refresh timer is the one armed, due at `due(exp, left)`; not a
     * millisecond early, the client fetches the next token and sends it;
     * the server handles that refresh without an error (the pong to a ping
     * sent after it comes, and no `invalid_token` before it).
     */
    async step(i, due) {
      const exp = expOf(tokens[i]) * 1000;
      const at = due(exp, exp - clock.now());
      assert.deepEqual(clock.pending(), [at], `token ${i + 1}: the one timer is its refresh`);
      clock.advanceTo(at - 1);
      assert.equal(tokens.length, i + 1, `token ${i + 1}: not refreshed before exp - margin`);
      clock.advanceTo(at);
      await until(() => sent('refresh').length === i + 1, 5000, `refresh ${i + 1}`);
      assert.equal(tokens.length, i + 2);
      assert.equal(sent('refresh')[i].token, tokens[i + 1], 'the refresh carries the new token');
      rec.sockets.at(-1).send(JSON.stringify({ type: 'ping' }));
      await until(() => got('pong').length === i + 1, 5000, `pong ${i + 1}`);
      assert.deepEqual(got('error'), [], 'the server accepted the refresh');
    },
  };
}

test('with getToken, each token is refreshed a fifth of its remaining lifetime (1–60 s) before exp, by the client clock, on the same connection', async () => {
  // Lifetimes hitting the 60 s cap, the fifth, and the 1 s floor.
  const r = await refreshingClient('n12', [3600, 100, 3, 3600]);
  const fifth = (exp, left) => exp - Math.min(60000, Math.max(1000, left / 5));
  for (let i = 0; i < 3; i += 1) await r.step(i, fifth);
  assert.deepEqual(r.closes, []);
  assert.equal(r.welcomes.length, 1, 'the same connection');
  assert.deepEqual((await connectionsOf('n12')).map((x) => x.conn_id), [r.c.connId]);
  // Still served.
  const seqs = [];
  r.c.on('event', (e) => seqs.push(e.seq));
  await api(h, '/api/v1/events', { user_id: 'n12', event: 'note' });
  await until(() => seqs.length === 1, 5000, 'an event');
  r.c.close();
});

test('refreshMarginMs sets how long before exp a token is refreshed, at most half its remaining lifetime', async () => {
  const r = await refreshingClient('n12m', [3600, 40, 3600], { refreshMarginMs: 30000 });
  const margin = (exp, left) => exp - Math.min(30000, left / 2);
  await r.step(0, margin); // exp - 30 s
  await r.step(1, margin); // a 40 s token: exp - 20 s
  assert.deepEqual(r.closes, []);
  assert.equal(r.welcomes.length, 1, 'the same connection');
  r.c.close();
});

test('getToken returning null stops the client with an error', async () => {
  const clock = fakeClock();
  let calls = 0;
  let first = null;
  const getToken = async () => {
    calls += 1;
    if (calls > 1) return null;
    first = mintToken(h.secret, 'n13', 3, clock.now());
    return first;
  };
  const c = new HeraldClient({ url: url(), getToken, clock });
  const errors = [];
  let welcomed = false;
  c.on('error', (e) => errors.push(e.code));
  c.on('welcome', () => { welcomed = true; });
  c.connect();
  await until(() => welcomed, 5000, 'welcome');
  // The refresh (1 s before expiry) gets null: stop, no reconnect.
  clock.advanceTo(expOf(first) * 1000 - 1000);
  await until(() => c.state === 'closed', 5000, 'stopped');
  assert.deepEqual(errors, ['unauthorized']);
  assert.deepEqual(clock.pending(), [], 'nothing armed: no further fetch, however long');
  clock.advance(3600e3);
  await settle();
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
  const clock = fakeClock();
  const rec = wsRecorder();
  const c = new HeraldClient({ url: `ws://${proxy.addr}/ws`, token: mintToken(h.secret, 'n14'), livenessMs: 400, pongTimeoutMs: 400, backoffBaseMs: 50, network: null, clock, WebSocket: rec.WebSocket });
  const seqs = [];
  const welcomes = [];
  c.on('event', (e) => seqs.push(e.seq));
  c.on('welcome', (w) => welcomes.push(w));
  const pings = () => rec.sent.filter((f) => f.type === 'ping').length;
  const pongs = () => rec.received.filter((f) => f.type === 'pong').length;
  try {
    c.connect();
    await until(() => c.state === 'open');
    const pub = (n) => api(h, '/api/v1/events', { events: Array.from({ length: n }, () => ({ user_id: 'n14', event: 'note' })) });
    await pub(2);
    await until(() => seqs.length === 2, 5000, '2 events');
    // Idle pings, each after livenessMs of silence, are answered: the
    // connection stays, and the pong arms the next ping, not a drop.
    for (let i = 1; i <= 2; i += 1) {
      assert.deepEqual(clock.pending(), [clock.now() + 400], 'the next ping armed');
      clock.advance(399);
      assert.equal(pings(), i - 1, 'no ping before livenessMs of silence');
      clock.advance(1);
      assert.equal(pings(), i, 'a ping after livenessMs of silence');
      await until(() => pongs() === i, 5000, `pong ${i}`);
    }
    assert.equal(welcomes.length, 1, 'answered pings keep the connection');
    proxy.freeze();
    await pub(3); // never reaches the frozen socket
    clock.advance(400);
    assert.equal(pings(), 3, 'the ping into the frozen socket');
    clock.advance(399);
    assert.equal(c.state, 'open', 'not dropped before pongTimeoutMs');
    clock.advance(1);
    assert.equal(c.state, 'reconnecting', 'dropped after pongTimeoutMs without a frame');
    assert.equal(rec.held, 0, 'the dead socket let go');
    clock.advance(50); // the retry (backoffBaseMs)
    await until(() => welcomes.length === 2, 5000, 'reconnected');
    assert.equal(rec.maxHeld, 1);
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
  const clock = fakeClock();
  const rec = wsRecorder();
  const c = new HeraldClient({ url: url(), getToken: freshTokens(h.secret, 'n15'), network, clock, WebSocket: rec.WebSocket });
  const welcomes = [];
  c.on('welcome', (w) => welcomes.push(w));
  c.connect();
  await until(() => c.state === 'open');
  network.dispatchEvent(new Event('offline'));
  await api(h, '/api/v1/disconnect', { user_id: 'n15' });
  await until(() => c.state === 'reconnecting', 5000, 'reconnecting');
  // No retry armed and no socket: no attempt until the network is back.
  assert.deepEqual(clock.pending(), [], 'no retry armed while offline');
  assert.equal(rec.held, 0);
  assert.equal(welcomes.length, 1, 'no attempt while offline');
  // Online reconnects at once, the client's clock standing still.
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
