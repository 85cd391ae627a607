// herald-gateway/server against a real `herald serve` (and, for the
// restart, a real redis-server): publishing with idempotency keys, runs and
// their lifecycle, text and the AI SDK bridge, webhook checks, shared streams.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { Herald, HeraldError, InvalidSignature, TextStreamError, allowSubscribe, denySubscribe, mintToken, verifyWebhook } from '../server.js';
import { joinDeltas, startHerald, until } from './helpers.mjs';

const SECRET = 'srv-secret-0123456789-abcdefghijklmno';
const API_KEY = 'srv-key-0123456789abcd';
let h;
before(async () => { h = await startHerald({ HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: API_KEY }); });
after(async () => { await h.stop(); });

const heraldOf = (server, options = {}) => new Herald({ url: `http://${server.addr}`, apiKey: API_KEY, ...options });

/** A `/ws` socket of `user` (token from mintToken), welcomed, recording its events (and its `caught_up`). */
async function watch(server, user, hello = {}) {
  const ws = new WebSocket(`ws://${server.addr}/ws`, ['herald.v1']);
  const events = [];
  let welcome;
  let caughtUp;
  ws.addEventListener('message', (m) => {
    const f = JSON.parse(m.data);
    if (f.type === 'event') events.push(f);
    if (f.type === 'welcome') welcome = f;
    if (f.type === 'caught_up') caughtUp = f;
  });
  await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
  ws.send(JSON.stringify({ type: 'hello', token: await mintToken(SECRET, user), ...hello }));
  await until(() => welcome !== undefined, 5000, 'the welcome');
  return { ws, events, welcome, get caughtUp() { return caughtUp; }, close: () => ws.close() };
}

/** The text of `part` the events show, joined. */
const textOf = (events, part = 'answer') => events
  .filter((e) => e.event === 'agent_text_delta' && e.data.part === part).map((e) => e.data.text).join('');

test('a publish whose answer was lost is retried with the same key and stored once', async () => {
  const w = await watch(h, 'p1');
  let calls = 0;
  // The first answer is lost after Herald stored the event.
  const lossy = async (url, init) => {
    const response = await fetch(url, init);
    if (++calls === 1) throw new TypeError('fetch failed: the answer was lost');
    return response;
  };
  const herald = heraldOf(h, { fetch: lossy });
  const r = await herald.publish({ userId: 'p1', event: 'agent_note', data: { n: 1 } });
  assert.equal(calls, 2);
  assert.equal(r.duplicate, true, 'the retry found the key: nothing stored twice');
  await until(() => w.events.length >= 1, 5000, 'the event');
  await new Promise((res) => setTimeout(res, 100));
  assert.equal(w.events.filter((e) => e.event === 'agent_note').length, 1);
  // A refusal is a HeraldError naming the field.
  await assert.rejects(herald.publish({ userId: '', event: 'x' }), (e) => e instanceof HeraldError && e.status === 400 && e.code === 'invalid_field' && e.field === 'events[0].user_id');
  // A wrong key: 401, not retried.
  calls = 0;
  const wrong = new Herald({ url: `http://${h.addr}`, apiKey: 'wrong-key-0123456789', fetch: async (u, i) => { calls++; return fetch(u, i); } });
  await assert.rejects(wrong.publish({ userId: 'p1', event: 'x' }), (e) => e.status === 401);
  assert.equal(calls, 1);
  // An aborted call stops at once.
  const stop = new AbortController();
  stop.abort(new Error('stopped'));
  await assert.rejects(herald.publish({ userId: 'p1', event: 'x' }, { signal: stop.signal }), /stopped/);
  w.close();
});

test('runs: completed, failed (rethrown), cancelled; tools and thoughts in order', async () => {
  const w = await watch(h, 'r1');
  const herald = heraldOf(h);
  const value = await herald.run('r1', { threadId: 't1' }, async (run) => {
    await run.thinking('hmm');
    const call = await run.tool('search', { q: 'x' });
    await call.done({ n: 3 });
    run.text('Hel');
    run.text('lo');
    return 'Hello';
  });
  assert.equal(value, 'Hello');
  await assert.rejects(herald.run('r1', { threadId: 't1' }, async (run) => {
    run.text('partial');
    throw new RangeError('the model broke');
  }), RangeError);
  const stop = new AbortController();
  await assert.rejects(herald.run('r1', { signal: stop.signal }, async (run) => {
    await run.thinking('working');
    stop.abort(new Error('user stopped'));
    run.signal.throwIfAborted();
  }), /user stopped/);
  // `await using`'s disposal: a run left without complete() is an error.
  const left = await herald.run('r1');
  await left[Symbol.asyncDispose]();
  await until(() => w.events.filter((e) => ['agent_completed', 'agent_error', 'agent_cancelled'].includes(e.event)).length === 4, 5000, 'four run ends');
  // Every seq once, in order; the text's deltas joined (how many frames
  // they took is not promised: deltas queued together arrive as one).
  const runs = new Map();
  for (const e of joinDeltas(w.events)) runs.set(e.run_id, [...(runs.get(e.run_id) ?? []), e]);
  const [ok, failed, cancelled, unfinished] = [...runs.values()].map((es) => es.map((e) => e.event));
  assert.deepEqual(ok, ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_text_delta', 'agent_completed']);
  assert.equal(textOf([...runs.values()][0]), 'Hello');
  assert.deepEqual(failed, ['agent_started', 'agent_text_delta', 'agent_error']);
  assert.equal([...runs.values()][1].at(-1).data.message, 'the model broke');
  assert.deepEqual(cancelled, ['agent_started', 'agent_thinking', 'agent_cancelled']);
  assert.deepEqual(unfinished, ['agent_started', 'agent_error']);
  // herald.cancelled(event) aborts the run's signal (a `cancel` webhook).
  const run = await herald.run('r1');
  assert.equal(herald.cancelled({ type: 'cancel', runId: run.id }), true);
  assert.equal(run.signal.aborted, true);
  await run[Symbol.asyncDispose]();
  assert.equal(herald.cancelled({ type: 'cancel', runId: run.id }), false, 'ended: no longer tracked');
  w.close();
});

test('a run of a user_message names it in agent_started; runs of a user id or a chat_request do not', async () => {
  const w = await watch(h, 'um1');
  const herald = heraldOf(h);
  const message = { type: 'user_message', userId: 'um1', threadId: 't1', messageId: 'msg-42', text: 'hi', data: {} };
  // The callback form and `await using`'s, of a message; then of a user id.
  const answered = await herald.run(message, async (run) => { assert.equal(run.messageId, 'msg-42'); return run.id; });
  const open = await herald.run(message, { runId: 'run_um1_open' });
  await open.complete();
  const plain = await herald.run('um1', { threadId: 't1' });
  assert.equal(plain.messageId, undefined);
  await plain.complete();
  await until(() => w.events.filter((e) => e.event === 'agent_completed').length === 3, 5000, 'three runs');
  const started = w.events.filter((e) => e.event === 'agent_started').map((e) => [e.run_id, e.thread_id, e.data]);
  assert.deepEqual(started, [
    [answered, 't1', { message_id: 'msg-42' }],
    ['run_um1_open', 't1', { message_id: 'msg-42' }],
    [plain.id, 't1', {}],
  ]);
  // A chat_request's run is Herald's (nothing published on opening), and
  // opened again on request it names no message.
  const bodies = [];
  const recording = new Herald({
    url: 'http://herald.test', apiKey: API_KEY,
    fetch: async (url, init) => {
      bodies.push(...JSON.parse(init.body).events);
      return new Response(JSON.stringify({ results: [{ seq: bodies.length, epoch: 'e', delivered: 0 }] }), { status: 200 });
    },
  });
  const chat = { type: 'chat_request', userId: 'um1', chatId: 'c1', threadId: 'c1', runId: 'run_c', trigger: 'regenerate-message', messageId: 'm-old', messages: [] };
  await recording.run(chat, async () => {});
  await recording.run(chat, { started: false }, async () => {});
  await recording.run(message, { runId: 'run_s', started: true }, async () => {});
  assert.deepEqual(bodies.map((e) => [e.event, e.run_id, e.data]), [
    ['agent_completed', 'run_c', {}],
    ['agent_started', 'run_c', {}],
    ['agent_completed', 'run_c', {}],
    ['agent_completed', 'run_s', {}],
  ]);
  w.close();
});

test('a page opened mid-run is replayed the user_message, then the run that answers it (run(event) of the webhook)', async () => {
  const hookSecret = 'srv-turns-hook-0123456789';
  const deliveries = [];
  const hook = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (d) => chunks.push(d));
    req.on('end', () => {
      deliveries.push({ headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(200);
      res.end();
    });
  });
  await new Promise((r) => hook.listen(0, '127.0.0.1', r));
  const hw = await startHerald({
    HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: API_KEY,
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${hook.address().port}/hook`, HERALD_WEBHOOK_SECRET: hookSecret,
  });
  let page;
  try {
    const sender = await watch(hw, 'kai');
    sender.ws.send(JSON.stringify({ type: 'user_message', id: 'q-1', thread_id: 't9', text: 'what time is it?', data: { lang: 'en' } }));
    await until(() => deliveries.length === 1, 5000, 'the webhook delivery');
    const message = await verifyWebhook(hookSecret, deliveries[0].headers, new Uint8Array(deliveries[0].body));
    assert.equal(message.type, 'user_message');
    assert.equal(message.messageId, 'q-1');
    // The backend answers with the SDK's run of the message, left open.
    const run = await heraldOf(hw).run(message);
    await run.thinking('looking at the clock');
    await until(() => sender.events.length === 3, 5000, 'the live events');
    assert.deepEqual(sender.events.map((e) => e.event), ['user_message', 'agent_started', 'agent_thinking']);
    // A new page asks for the open runs (no resume).
    page = await watch(hw, 'kai', { replay_active_runs: true });
    assert.equal(page.welcome.replaying, true);
    await until(() => page.caughtUp !== undefined, 5000, 'caught_up');
    const replayed = page.events.slice();
    assert.deepEqual(replayed.map((e) => e.event), ['user_message', 'agent_started', 'agent_thinking'], 'the question first, then the run');
    const [question, started, thinking] = replayed;
    assert.deepEqual(question.data, { id: 'q-1', text: 'what time is it?', data: { lang: 'en' }, user_id: 'kai' });
    assert.equal(question.thread_id, 't9');
    assert.equal(question.run_id, undefined);
    assert.deepEqual([started.run_id, thinking.run_id], [run.id, run.id]);
    assert.deepEqual(started.data, { message_id: 'q-1' });
    const seqs = replayed.map((e) => e.seq);
    assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b), 'each once, in seq order');
    assert.deepEqual(seqs, sender.events.map((e) => e.seq), 'the events the sender saw live');
    assert.ok(replayed.every((e) => e.replayed === true));
    assert.equal(page.caughtUp.seq, seqs.at(-1));
    // Nothing comes a second time; the run's end arrives live, once.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(page.events.length, 3);
    await run.complete('noon');
    await until(() => page.events.length === 4, 5000, 'the end of the run');
    assert.deepEqual([page.events[3].event, page.events[3].run_id, page.events[3].replayed], ['agent_completed', run.id, undefined]);
    sender.close();
  } finally {
    page?.close();
    await hw.stop();
    hook.close();
  }
});

test('5,000 text deltas through run.text and through the AI SDK bridge arrive whole and in order', async () => {
  const herald = heraldOf(h);
  const words = Array.from({ length: 5000 }, (_, i) => `w${i} `);
  await herald.run('b1', { threadId: 'c' }, async (run) => {
    for (const word of words) run.text(word);
  });
  // The bridge: a UI message stream (what toUIMessageStream() writes) piped in.
  const chunks = [
    { type: 'start' }, { type: 'start-step' }, { type: 'text-start', id: 'bridge' },
    ...words.map((delta) => ({ type: 'text-delta', id: 'bridge', delta })),
    { type: 'text-end', id: 'bridge' }, { type: 'finish-step' }, { type: 'finish', finishReason: 'stop' },
  ];
  const stream = new ReadableStream({
    start(c) { for (const chunk of chunks) c.enqueue(chunk); c.close(); },
  });
  const run = await herald.run('b1', { threadId: 'c2' });
  const answer = await run.pipe(stream);
  assert.equal(answer.duplicates, 0);
  assert.equal(run.ended, true, 'the stream\'s finish ended the run');
  // The stream's history from its first event (a live socket could be
  // closed as a slow consumer on a loaded machine: 10,000 events at once).
  const events = await replay(h, 'b1', 2);
  assert.equal(textOf(events), words.join(''));
  assert.equal(textOf(events, 'bridge'), words.join(''));
  // Every seq once, in order: each frame starts right after the one before.
  joinDeltas(events);
  const bridged = events.filter((e) => e.run_id === run.id).map((e) => e.event);
  assert.equal(bridged.at(-1), 'agent_completed');
});

/** Every event of `user`'s stream, from a socket that resumes from seq 0 of its epoch, until `runs` runs completed. */
async function replay(server, user, runs = 1) {
  const first = await watch(server, user);
  const { epoch } = first.welcome;
  first.close();
  const again = await watch(server, user, { resume: { epoch, seq: 0 } });
  await until(() => again.events.filter((e) => e.event === 'agent_completed').length >= runs, 10000, 'the replayed runs');
  again.close();
  return again.events;
}

/** A free TCP port on 127.0.0.1. */
async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

test('a server restart in the middle of a text stream: resumed without a duplicated or missing delta', async (t) => {
  let redisBin;
  try { redisBin = execFileSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' }).trim(); } catch { /* none */ }
  if (!redisBin) return t.skip('redis-server is not installed (scripts/test.sh installs it)');
  const rport = await freePort();
  const redis = spawn(redisBin, ['--port', String(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const port = await freePort();
  const env = { HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: API_KEY, HERALD_REDIS_URL: `redis://127.0.0.1:${rport}`, HERALD_ADDR: `127.0.0.1:${port}`, HERALD_DRAIN_WINDOW: '200ms' };
  let node;
  try {
    await until(async () => { try { node = await startHerald(env); return true; } catch { return false; } }, 10000, 'herald on redis');
    // Count the text requests and the probes that located the parts after the restart.
    const text = { requests: 0, probes: 0 };
    const counting = async (url, init) => {
      if (String(url).includes('/text?')) {
        text.requests += 1;
        if (init.body instanceof Uint8Array && new TextDecoder().decode(init.body).includes('9007199254740992')) text.probes += 1;
      }
      return fetch(url, init);
    };
    const herald = new Herald({ url: `http://127.0.0.1:${port}`, apiKey: API_KEY, fetch: counting });
    const words = Array.from({ length: 3000 }, (_, i) => `t${i} `);
    const run = await herald.run('rs1', { threadId: 'c' });
    for (const word of words.slice(0, 1500)) run.text(word);
    await new Promise((r) => setTimeout(r, 300));
    // The node goes away mid-request (a redeploy) and comes back on the same address.
    await node.stop();
    node = await startHerald(env);
    for (const word of words.slice(1500)) run.text(word);
    await run.complete();
    // The stream's history from its first event: the text whole, each delta once.
    const history = await replay({ addr: `127.0.0.1:${port}` }, 'rs1');
    assert.equal(textOf(history), words.join(''), 'every delta once, in order');
    assert.ok(text.probes >= 1 && text.requests >= 3, `the stream was located and resent: ${JSON.stringify(text)}`);
  } finally {
    await node?.stop();
    redis.kill('SIGKILL');
  }
});

/** A webhook request as Herald signs it. */
function signed(body, { secret = 'hook-secret-0123456789', ts = Math.floor(Date.now() / 1000), delivery = 'd-1' } = {}) {
  const mac = createHmac('sha256', secret).update(`${ts}.${delivery}.${body}`).digest('hex');
  return { 'x-herald-timestamp': String(ts), 'x-herald-delivery': delivery, 'x-herald-signature': `v2=${mac}` };
}

test('verifyWebhook: every event type parsed; forged, stale, replayed with a new id and malformed inputs rejected', async () => {
  const secret = 'hook-secret-0123456789';
  const chat = JSON.stringify({
    type: 'chat_request', user_id: 'u1', chat_id: 'c1', run_id: 'run_1', trigger: 'submit-message', message_id: null,
    messages: [{ id: 'm1', role: 'user', parts: [{ type: 'text', text: 'hi' }, { type: 'text', text: 'there' }] }],
    body: { k: 1 }, metadata: null, conn_id: 'x', received_at: 'now',
  });
  const e = await verifyWebhook(secret, signed(chat), chat);
  assert.deepEqual([e.type, e.userId, e.chatId, e.threadId, e.runId, e.trigger, e.messageId, e.text, e.deliveryId], ['chat_request', 'u1', 'c1', 'c1', 'run_1', 'submit-message', null, 'hi\nthere', 'd-1']);
  const msg = JSON.stringify({ type: 'user_message', user_id: 'u1', thread_id: 't', message_id: 'm', text: 'yo', data: { a: 1 } });
  assert.deepEqual(await verifyWebhook(secret, new Headers(signed(msg)), new TextEncoder().encode(msg)), {
    type: 'user_message', userId: 'u1', threadId: 't', messageId: 'm', text: 'yo', data: { a: 1 }, connId: '', receivedAt: '', deliveryId: 'd-1',
  });
  const cancel = JSON.stringify({ type: 'cancel', user_id: 'u1', run_id: 'r' });
  assert.equal((await verifyWebhook(secret, Object.entries(signed(cancel)), cancel)).runId, 'r');
  const rejected = async (headers, body, why) => {
    await assert.rejects(verifyWebhook(secret, headers, body), (err) => err instanceof InvalidSignature, why);
  };
  await rejected(signed(msg, { secret: 'another-secret-0123456' }), msg, 'forged (another secret)');
  await rejected(signed(msg), msg.replace('yo', 'yo!'), 'the body changed');
  await rejected(signed(msg, { ts: Math.floor(Date.now() / 1000) - 301 }), msg, 'stale');
  await rejected({ ...signed(msg), 'x-herald-delivery': 'd-2' }, msg, 'replayed under a new delivery id');
  for (const [headers, why] of [
    [{}, 'no headers'],
    [{ ...signed(msg), 'x-herald-timestamp': 'abc' }, 'timestamp not digits'],
    [{ ...signed(msg), 'x-herald-signature': 'v1=00' }, 'old scheme'],
    [{ ...signed(msg), 'x-herald-signature': 'v2=zz' }, 'not hex'],
    [{ ...signed(msg), 'x-herald-delivery': '' }, 'empty delivery'],
  ]) await rejected(headers, msg, why);
  for (const body of ['not json', '[1]', '{"type":"user_message"}', JSON.stringify({ type: 'chat_request', user_id: 'u', chat_id: 'c', run_id: 'r', trigger: 'resubmit', messages: [] })]) {
    await rejected(signed(body), body, body);
  }
  await rejected(signed(msg), 42, 'a body that is not bytes');
  await assert.rejects(verifyWebhook(secret, signed('{"type":"typing","user_id":"u"}'), '{"type":"typing","user_id":"u"}'), TypeError);
});

test('text that cannot be delivered throws from the run, which ends agent_error', async () => {
  const w = await watch(h, 'x1');
  const herald = heraldOf(h);
  // A part name over 128 bytes: Herald refuses the line (400 invalid_line).
  await assert.rejects(herald.run('x1', async (run) => {
    run.text('fine');
    run.text('refused', { part: 'p'.repeat(200) });
    await run.thinking('after the text');
  }), (e) => e instanceof TextStreamError && e.status === 400 && e.code === 'invalid_line');
  await until(() => w.events.some((e) => e.event === 'agent_error'), 5000, 'agent_error');
  const events = w.events.map((e) => e.event);
  assert.deepEqual(events, ['agent_started', 'agent_text_delta', 'agent_error']);
  assert.ok(!events.includes('agent_thinking'), 'nothing after the failed text');
  w.close();
});

test('publishMany, connections and disconnect', async () => {
  const w = await watch(h, 'd1');
  const herald = heraldOf(h);
  const results = await herald.publishMany([
    { userId: 'd1', event: 'agent_note', data: { n: 1 } },
    { userId: 'd1', event: 'agent_note', data: { n: 2 }, idempotencyKey: 'd1-k2' },
  ]);
  assert.deepEqual(results.map((r) => r.seq - results[0].seq), [0, 1]);
  const again = await herald.publish({ userId: 'd1', event: 'agent_note', data: { n: 2 }, idempotencyKey: 'd1-k2' });
  assert.equal(again.duplicate, true);
  const listed = await herald.connections({ userId: 'd1' });
  assert.equal(listed.total, 1);
  assert.equal(listed.connections[0].user_id, 'd1');
  const closed = new Promise((res) => w.ws.addEventListener('close', (e) => res(e.code)));
  assert.equal(await herald.disconnect('d1'), 1);
  assert.equal(await closed, 4409);
  assert.deepEqual(w.events.map((e) => e.data.n), [1, 2]);
  await assert.rejects(herald.connections({ limit: 0 }), (e) => e instanceof HeraldError && e.status === 400 && e.field === 'limit');
});

// ---- shared streams ----

/**
 * A `/ws` socket of `user` whose token (the SDK's mintToken) grants
 * `grants`, subscribed to each of `streams`; records its events and every
 * other frame.
 */
async function member(server, user, grants, streams = []) {
  const ws = new WebSocket(`ws://${server.addr}/ws`, ['herald.v1']);
  const events = [];
  const frames = [];
  ws.addEventListener('message', (m) => {
    const f = JSON.parse(m.data);
    if (f.type === 'event') events.push(f); else frames.push(f);
  });
  await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
  ws.send(JSON.stringify({ type: 'hello', token: await mintToken(SECRET, user, { streams: grants }) }));
  await until(() => frames.some((f) => f.type === 'welcome'), 5000, 'the welcome');
  for (const stream of streams) {
    ws.send(JSON.stringify({ type: 'subscribe', stream }));
    await until(() => {
      const refused = frames.find((f) => f.type === 'error');
      if (refused) throw new Error(`subscribe ${stream}: ${JSON.stringify(refused)}`);
      return frames.some((f) => f.type === 'subscribed' && f.stream === stream);
    }, 5000, `subscribed to ${stream}`);
  }
  return { ws, events, frames, close: () => ws.close() };
}

/** The events of `m` up to its `n`th run end (`agent_completed` / `agent_cancelled`). */
async function runsOf(m, n = 1) {
  const ends = () => m.events.filter((e) => ['agent_completed', 'agent_cancelled', 'agent_error'].includes(e.event)).length;
  await until(() => ends() >= n, 5000, `${n} run end(s)`);
  return m.events.slice();
}

const quiet = () => new Promise((r) => setTimeout(r, 300));

test('shared streams: publish({stream}) and publishMany reach every member; bad targets throw', async () => {
  const ana = await member(h, 'sa', { 'thread:p1': 'rw' }, ['thread:p1']);
  const bob = await member(h, 'sb', { 'thread:*': 'r' }, ['thread:p1']);
  const herald = heraldOf(h);
  const one = await herald.publish({ stream: 'thread:p1', event: 'note', data: { n: 1 }, threadId: 't1', idempotencyKey: 'sk1' });
  const again = await herald.publish({ stream: 'thread:p1', event: 'note', data: { n: 1 }, idempotencyKey: 'sk1' });
  const many = await herald.publishMany([{ stream: 'thread:p1', event: 'a', data: { n: 2 } }, { userId: 'sa', event: 'own' }]);
  // The stream has its own seq; the key stored the event once.
  assert.deepEqual([one.seq, one.duplicate ?? false, again.seq, again.duplicate], [1, false, 1, true]);
  assert.deepEqual(many.map((r) => r.seq), [2, 1]);
  await until(() => ana.events.length === 3 && bob.events.length === 2, 5000, 'the events');
  assert.deepEqual(ana.events.filter((e) => e.stream === 'thread:p1').map((e) => [e.seq, e.event, e.data]), [[1, 'note', { n: 1 }], [2, 'a', { n: 2 }]]);
  assert.deepEqual(ana.events.filter((e) => !('stream' in e)).map((e) => [e.seq, e.event]), [[1, 'own']]);
  assert.deepEqual(bob.events.map((e) => [e.stream, e.seq, e.event]), [['thread:p1', 1, 'note'], ['thread:p1', 2, 'a']]);
  // Both targets, or neither: refused before anything is sent.
  await assert.rejects(herald.publish({ userId: 'sa', stream: 'thread:p1', event: 'x' }), (e) => e instanceof TypeError && /exactly one/.test(e.message));
  await assert.rejects(herald.publish({ event: 'x' }), (e) => e instanceof TypeError && /events\[0\].*neither/.test(e.message));
  await assert.rejects(herald.publishMany([{ stream: 'thread:p1', event: 'a' }, { event: 'b' }]), (e) => e instanceof TypeError && /events\[1\]/.test(e.message));
  await assert.rejects(herald.run({ stream: 'thread:p1', userId: 'sa' }), TypeError);
  await assert.rejects(herald.run({}), TypeError);
  // A name Herald refuses: 400 naming the field.
  for (const bad of ['user:sa', 'no namespace', '']) {
    await assert.rejects(herald.publish({ stream: bad, event: 'x' }), (e) => e instanceof HeraldError && e.status === 400 && e.field === 'events[0].stream', bad);
  }
  await assert.rejects(herald.unsubscribe('user:sb', 'sb'), (e) => e instanceof HeraldError && e.status === 400 && e.field === 'stream');
  await assert.rejects(mintToken(SECRET, 'sa', { streams: { 'thread:p1': 'w' } }), TypeError);
  await quiet();
  assert.equal(bob.events.length, 2, 'nothing else reached the stream');
  ana.close();
  bob.close();
});

test('a run of a user_message written to a stream answers in it; a run({stream}) pipes UI chunks into it; a member\'s cancel names the stream', async () => {
  const hookSecret = 'srv-streams-hook-0123456789';
  const deliveries = [];
  const hook = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (d) => chunks.push(d));
    req.on('end', () => {
      deliveries.push({ headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(200);
      res.end();
    });
  });
  await new Promise((r) => hook.listen(0, '127.0.0.1', r));
  const hw = await startHerald({
    HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: API_KEY,
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${hook.address().port}/hook`, HERALD_WEBHOOK_SECRET: hookSecret,
  });
  const delivered = async (n) => {
    await until(() => deliveries.length >= n, 5000, `webhook delivery ${n}`);
    const d = deliveries[n - 1];
    return verifyWebhook(hookSecret, d.headers, new Uint8Array(d.body));
  };
  try {
    const ana = await member(hw, 'ana', { 'thread:t1': 'rw' }, ['thread:t1']);
    const bob = await member(hw, 'bob', { 'thread:t1': 'rw' }, ['thread:t1']);
    ana.ws.send(JSON.stringify({ type: 'user_message', id: 'q-1', thread_id: 't1', text: 'who is on call?', stream: 'thread:t1' }));
    const message = await delivered(1);
    assert.deepEqual([message.type, message.userId, message.stream, message.messageId], ['user_message', 'ana', 'thread:t1', 'q-1']);
    const herald = heraldOf(hw);
    const run = await herald.run(message);
    assert.deepEqual([run.stream, run.userId, run.messageId], ['thread:t1', 'ana', 'q-1']);
    await run.thinking('checking the rota');
    const call = await run.tool('rota', { day: 'today' });
    await call.done('bob');
    run.text('Bo');
    run.text('b.');
    await run.complete('Bob.');
    for (const m of [ana, bob]) {
      const got = joinDeltas(await runsOf(m));
      // Everything is in the stream (ana's socket reads her own stream too:
      // nothing of the run went there).
      assert.ok(got.every((e) => e.stream === 'thread:t1'), JSON.stringify(got));
      assert.deepEqual(got.map((e) => e.event), ['user_message', 'agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_text_delta', 'agent_completed']);
      assert.equal(got[0].data.user_id, 'ana');
      assert.deepEqual([got[1].data, got[1].thread_id], [{ message_id: 'q-1' }, 't1']);
      assert.ok(got.slice(1).every((e) => e.run_id === run.id));
      assert.equal(textOf(got), 'Bob.');
    }

    // A run in the stream answering no message, its UI chunks through the
    // UI ingest (their `start` opens it).
    ana.events.length = 0;
    const piped = await herald.run({ stream: 'thread:t1' }, { threadId: 'daily', started: true });
    assert.deepEqual([piped.stream, piped.userId], ['thread:t1', undefined]);
    const chunks = [
      { type: 'start' }, { type: 'text-start', id: 'x' },
      { type: 'text-delta', id: 'x', delta: 'all ' }, { type: 'text-delta', id: 'x', delta: 'green' },
      { type: 'text-end', id: 'x' }, { type: 'finish', finishReason: 'stop' },
    ];
    await piped.pipe(new ReadableStream({ start(c) { for (const chunk of chunks) c.enqueue(chunk); c.close(); } }));
    const ui = joinDeltas(await runsOf(ana));
    assert.ok(ui.every((e) => e.stream === 'thread:t1' && e.run_id === piped.id && e.thread_id === 'daily'), JSON.stringify(ui));
    assert.deepEqual(ui.map((e) => e.event), ['agent_started', 'agent_text_delta', 'ui_chunk', 'agent_completed']);
    assert.equal(textOf(ui, 'x'), 'all green');

    // Bob, another member who may write, stops the run of ana's question.
    ana.ws.send(JSON.stringify({ type: 'user_message', id: 'q-2', thread_id: 't1', text: 'a long one', stream: 'thread:t1' }));
    const second = await delivered(2);
    const open = await herald.run(second);
    bob.ws.send(JSON.stringify({ type: 'cancel', run_id: open.id, stream: 'thread:t1' }));
    const cancel = await delivered(3);
    assert.deepEqual([cancel.type, cancel.userId, cancel.runId, cancel.stream], ['cancel', 'bob', open.id, 'thread:t1']);
    assert.equal(herald.cancelled(cancel), true);
    assert.equal(open.signal.aborted, true);
    await open[Symbol.asyncDispose]();
    const stopped = joinDeltas(await runsOf(bob, 3));
    assert.deepEqual([stopped.at(-1).event, stopped.at(-1).run_id, stopped.at(-1).stream], ['agent_cancelled', open.id, 'thread:t1']);
    ana.close();
    bob.close();
  } finally {
    await hw.stop();
    hook.close();
  }
});

test('unsubscribe(stream, userId) removes a member on every socket', async () => {
  const ana = await member(h, 'ua', { 'thread:u1': 'rw' }, ['thread:u1']);
  const bob = await member(h, 'ub', { 'thread:u1': 'r' }, ['thread:u1']);
  const bob2 = await member(h, 'ub', { 'thread:u1': 'r' }, ['thread:u1']);
  const herald = heraldOf(h);
  assert.equal(await herald.unsubscribe('thread:u1', 'ub'), 2);
  assert.equal(await herald.unsubscribe('thread:u1', 'ub'), 0);
  for (const m of [bob, bob2]) {
    await until(() => m.frames.some((f) => f.type === 'unsubscribed'), 5000, 'unsubscribed');
    assert.deepEqual(m.frames.filter((f) => f.type === 'unsubscribed'), [{ type: 'unsubscribed', stream: 'thread:u1', reason: 'removed' }]);
  }
  await herald.publish({ stream: 'thread:u1', event: 'after' });
  await until(() => ana.events.length === 1, 5000, 'the member who stays reads on');
  await quiet();
  assert.deepEqual([bob.events.length, bob2.events.length], [0, 0]);
  ana.close();
  bob.close();
  bob2.close();
});

test('presence(stream, {limit}) lists the members of a stream on every socket, with counts; the totals count all', async () => {
  const room = 'room:pr1';
  const ana = await member(h, 'pra', { 'room:*': 'rw' }, [room]);
  const ana2 = await member(h, 'pra', { 'room:*': 'rw' }, [room]);
  const bob = await member(h, 'prb', { [room]: 'r' }, [room]);
  const herald = heraldOf(h);
  // Presence is recorded a moment after each subscribe.
  let p;
  await until(async () => { p = await herald.presence(room); return p.total_connections === 3; }, 5000, 'three connections counted');
  assert.deepEqual(p, {
    stream: room,
    users: [{ user_id: 'pra', connections: 2 }, { user_id: 'prb', connections: 1 }],
    total_users: 2,
    total_connections: 3,
  });
  // At most `limit` listed; the totals count everyone.
  const one = await herald.presence(room, { limit: 1 }, { signal: AbortSignal.timeout(5000) });
  assert.deepEqual([one.users, one.total_users, one.total_connections], [[{ user_id: 'pra', connections: 2 }], 2, 3]);
  // A stream nobody reads; a name Herald refuses.
  assert.deepEqual(await herald.presence('room:empty'), { stream: 'room:empty', users: [], total_users: 0, total_connections: 0 });
  await assert.rejects(herald.presence('user:pra'), (e) => e instanceof HeraldError && e.status === 400 && e.field === 'stream');
  // Bob's last socket goes: he is out; ana's second one goes: one left.
  bob.close();
  ana2.close();
  await until(async () => { p = await herald.presence(room); return p.total_connections === 1; }, 5000, 'two connections gone');
  assert.deepEqual([p.users, p.total_users], [[{ user_id: 'pra', connections: 1 }], 1]);
  ana.close();
});

test('verifyWebhook: the stream of a user_message or a cancel, absent for the own stream; not a string: InvalidSignature', async () => {
  const secret = 'hook-secret-0123456789';
  const parse = (payload) => { const body = JSON.stringify(payload); return verifyWebhook(secret, signed(body), body); };
  const msg = { type: 'user_message', user_id: 'u1', thread_id: 't', message_id: 'm', text: 'yo' };
  const cancel = { type: 'cancel', user_id: 'u1', run_id: 'r' };
  assert.equal((await parse({ ...msg, stream: 'thread:t1' })).stream, 'thread:t1');
  assert.equal((await parse({ ...cancel, stream: 'thread:t1' })).stream, 'thread:t1');
  assert.ok(!('stream' in await parse(msg)) && !('stream' in await parse(cancel)));
  for (const bad of [{ ...msg, stream: 5 }, { ...cancel, stream: ['thread:t1'] }]) {
    await assert.rejects(parse(bad), InvalidSignature);
  }
});

test('a subscribe_request the backend answers with verifyWebhook and allowSubscribe/denySubscribe: write granted, the other forbidden', async () => {
  const hookSecret = 'srv-subscribe-hook-0123456789';
  const asked = [];
  const hook = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (d) => chunks.push(d));
    req.on('end', async () => {
      let answer;
      try {
        const request = await verifyWebhook(hookSecret, req.headers, new Uint8Array(Buffer.concat(chunks)));
        asked.push(request);
        answer = request.type === 'subscribe_request' && request.stream.startsWith('room:') ? allowSubscribe({ write: true }) : denySubscribe();
      } catch (e) {
        asked.push(e);
        res.writeHead(401);
        return res.end();
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(answer));
    });
  });
  await new Promise((r) => hook.listen(0, '127.0.0.1', r));
  const hp = await startHerald({
    HERALD_JWT_HS256_SECRET: SECRET, HERALD_API_KEY: API_KEY, HERALD_SUBSCRIBE_PROXY: 'true',
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${hook.address().port}/hook`, HERALD_WEBHOOK_SECRET: hookSecret,
  });
  try {
    const cy = await member(hp, 'cy'); // a token without a `streams` claim
    cy.ws.send(JSON.stringify({ type: 'subscribe', stream: 'room:ops' }));
    await until(() => cy.frames.some((f) => f.type === 'subscribed' || f.type === 'error'), 5000, 'the answer for room:ops');
    const subscribed = cy.frames.find((f) => f.type === 'subscribed' || f.type === 'error');
    assert.deepEqual([subscribed.type, subscribed.stream, subscribed.write], ['subscribed', 'room:ops', true]);
    cy.ws.send(JSON.stringify({ type: 'subscribe', stream: 'thread:secret' }));
    await until(() => cy.frames.some((f) => f.type === 'error'), 5000, 'the answer for thread:secret');
    const refused = cy.frames.find((f) => f.type === 'error');
    assert.deepEqual([refused.code, refused.stream], ['forbidden', 'thread:secret']);
    assert.deepEqual(asked.map((r) => [r.type, r.userId, r.stream]), [['subscribe_request', 'cy', 'room:ops'], ['subscribe_request', 'cy', 'thread:secret']]);
    assert.ok(asked.every((r) => r.connId && r.receivedAt && r.deliveryId));
    assert.deepEqual([allowSubscribe(), allowSubscribe({ write: true }), denySubscribe()], [{ allow: true }, { allow: true, write: true }, { allow: false }]);
    cy.close();
  } finally {
    await hp.stop();
    hook.close();
  }
});
