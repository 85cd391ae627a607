// The AI SDK's own WebSocketChatTransport (from `ai`, not a copy) against a
// real `herald serve` on GET /ai: no Herald code on the client side.
import http from 'node:http';
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocketChatTransport, readUIMessageStream } from 'ai';
import { startHerald, mintToken, until, api } from './helpers.mjs';

let h;
before(async () => { h = await startHerald({ HERALD_JWT_HS256_SECRET: 'aiws-secret-0123456789-abcdefghijklm', HERALD_API_KEY: 'aiws-key-0123456789abc' }); });
after(async () => { await h.stop(); });

const userMessage = (id, text) => ({ id, role: 'user', parts: [{ type: 'text', text }] });

/** The stock transport for `user`, its token in the `bearer.` subprotocol. */
const transportFor = (user, options = {}) => new WebSocketChatTransport({
  url: `ws://${h.addr}/ai`, protocols: ['bearer.' + mintToken(h.secret, user)], ...options,
});

const submit = (transport, chatId, text, abortSignal) => transport.sendMessages({
  trigger: 'submit-message', chatId, messageId: undefined,
  messages: [userMessage('m-' + chatId, text)], abortSignal,
});

/** Read a chunk stream to its end: the chunks, and the UI message they make. */
async function collect(stream) {
  const chunks = [];
  const [a, b] = stream.tee();
  const reading = (async () => { for await (const c of a) chunks.push(c); })();
  let message;
  for await (const m of readUIMessageStream({ stream: b })) message = m;
  await reading;
  return { chunks, message };
}

const textOf = (message) => message.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');

test('a send streams the demo agent\'s whole answer: reasoning, a tool call, the text', async () => {
  const t = transportFor('s1');
  const { chunks, message } = await collect(await submit(t, 'chat-1', 'hello there'));
  t.close();
  assert.equal(chunks[0].type, 'start');
  assert.equal(chunks.at(-1).type, 'finish');
  const kinds = message.parts.map((p) => p.type);
  assert.ok(kinds.includes('reasoning'), kinds.join());
  assert.ok(kinds.includes('tool-search'), kinds.join());
  assert.match(textOf(message), /^You said: “hello there”\. I am Herald's built-in demo agent/);
});

/** A raw `/ws` socket of `user`, recording the events of its stream. */
async function watch(user, server = h) {
  const ws = new WebSocket(`ws://${server.addr}/ws`, ['herald.v1']);
  const events = [];
  ws.addEventListener('message', (m) => {
    const f = JSON.parse(m.data);
    if (f.type === 'event') events.push(f);
  });
  await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
  ws.send(JSON.stringify({ type: 'hello', token: mintToken(server.secret, user) }));
  await until(() => ws.readyState === WebSocket.OPEN);
  return { ws, events, close: () => ws.close() };
}

/** Read `stream` until its assembled text holds `n` characters (or it ends). */
async function readSome(stream, n) {
  const reader = stream.getReader();
  let text = 0;
  const chunks = [];
  while (text < n) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    if (value.type === 'text-delta') text += value.delta.length;
  }
  return { reader, chunks };
}

test('reconnectToStream mid-answer gets the answer whole and once; both sockets follow it to the end', async () => {
  const a = transportFor('s2');
  const first = await submit(a, 'chat-2', 'resume me please');
  const [mine, shown] = first.tee();
  const { reader, chunks: seen } = await readSome(mine, 20);
  // Another tab (another socket) of the same user resumes the chat.
  const b = transportFor('s2');
  const resumed = await b.reconnectToStream({ chatId: 'chat-2' });
  assert.ok(resumed, 'a stream, not no-active');
  const { chunks, message } = await collect(resumed);
  // The first socket's stream ends too, with the same text.
  for (;;) { const { value, done } = await reader.read(); if (done) break; seen.push(value); }
  const whole = (cs) => cs.filter((c) => c.type === 'text-delta').map((c) => c.delta).join('');
  assert.equal(textOf(message), whole(seen));
  assert.match(textOf(message), /^You said: “resume me please”.*connect your own\.$/);
  // Once: one start with the run's stable id, one text part, no delta twice.
  assert.equal(chunks.filter((c) => c.type === 'start').length, 1);
  assert.equal(chunks[0].messageId, seen[0].messageId);
  assert.equal(chunks.filter((c) => c.type === 'text-start').length, 1);
  assert.equal(message.parts.filter((p) => p.type === 'text').length, 1);
  for await (const _ of shown) { /* drained */ }
  a.close(); b.close();
});

test('a reload right after a response completed still shows the whole answer (ai_replay_window)', async () => {
  const t = transportFor('s3b');
  const first = await collect(await submit(t, 'chat-3b', 'just finished'));
  t.close();
  // A new page (a new socket) resumes the chat after the answer ended.
  const reloaded = transportFor('s3b');
  const again = await collect(await reloaded.reconnectToStream({ chatId: 'chat-3b' }));
  reloaded.close();
  assert.equal(textOf(again.message), textOf(first.message));
  assert.equal(again.message.id, first.message.id, 'the same message: useChat replaces it, no duplicate');
  assert.deepEqual(again.message.parts.map((p) => p.type), first.message.parts.map((p) => p.type));
  assert.equal(again.chunks.at(-1).type, 'finish');
});

test('no active response: reconnectToStream resolves null', async () => {
  const t = transportFor('s3');
  assert.equal(await t.reconnectToStream({ chatId: 'never-started' }), null);
  t.close();
});

test('a second send while the chat answers is refused with the transport\'s error', async () => {
  const t = transportFor('s4');
  const first = await submit(t, 'chat-4', 'one');
  const second = await submit(t, 'chat-4', 'two');
  await assert.rejects(collect(second), /already active for this chat/);
  const { message } = await collect(first);
  assert.match(textOf(message), /“one”/);
  t.close();
});

test('a malformed frame closes the socket with 1008', async () => {
  for (const bad of ['{"type":"send","requestId":"r"}', 'not json', '{"type":"typing","requestId":"r"}']) {
    const ws = new WebSocket(`ws://${h.addr}/ai`, ['bearer.' + mintToken(h.secret, 's5')]);
    await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
    const closed = new Promise((res) => { ws.onclose = (e) => res(e.code); });
    ws.send(bad);
    assert.equal(await closed, 1008, bad);
  }
});

test('abort of a send reaches the backend: the run ends agent_cancelled for every follower', async () => {
  const w = await watch('s6');
  const t = transportFor('s6');
  const stop = new AbortController();
  const stream = await submit(t, 'chat-6', 'stop me', stop.signal);
  const { reader } = await readSome(stream, 1);
  stop.abort();
  await until(() => w.events.some((e) => e.event === 'agent_cancelled'), 10000, 'agent_cancelled');
  const run = w.events.find((e) => e.event === 'agent_cancelled').run_id;
  assert.ok(w.events.some((e) => e.event === 'agent_started' && e.run_id === run && e.thread_id === 'chat-6'));
  reader.releaseLock();
  // A reload right after Stop shows the stopped answer again, ending in `abort`.
  const again = await collect(await t.reconnectToStream({ chatId: 'chat-6' }));
  assert.equal(again.chunks[0].type, 'start');
  assert.equal(again.chunks.at(-1).type, 'abort');
  t.close(); w.close();
});

test('a replaced resume does not stop the answer; Stop after a resume does', async () => {
  const w = await watch('s7');
  const a = transportFor('s7');
  const first = await submit(a, 'chat-7', 'keep going');
  await readSome(first, 1);
  // What useChat does when resumeStream() is called twice: the first
  // resume's signal is aborted, then a new resume is sent.
  const b = transportFor('s7');
  const one = new AbortController();
  await b.reconnectToStream({ chatId: 'chat-7', abortSignal: one.signal });
  one.abort();
  const two = new AbortController();
  const again = await b.reconnectToStream({ chatId: 'chat-7', abortSignal: two.signal });
  const { message } = await collect(again);
  assert.match(textOf(message), /connect your own\.$/, 'the answer ran to its end');
  assert.ok(!w.events.some((e) => e.event === 'agent_cancelled'));
  // Stop after a resume (the resume's signal aborted, no resume follows):
  // the run stops after the grace (1 s), long before this answer ends.
  const second = await submit(a, 'chat-7b', 'stop me later ' + 'word '.repeat(150));
  await readSome(second, 1);
  const three = new AbortController();
  const resumed = await b.reconnectToStream({ chatId: 'chat-7b', abortSignal: three.signal });
  await readSome(resumed, 1);
  three.abort();
  await until(() => w.events.some((e) => e.event === 'agent_cancelled' && e.thread_id === 'chat-7b'), 10000, 'the cancel');
  a.close(); b.close(); w.close();
});

test('the token may come in the frame\'s headers (a fresh one per frame) or in params; another user\'s is refused', async () => {
  let n = 0;
  const byHeader = new WebSocketChatTransport({
    url: `ws://${h.addr}/ai`,
    headers: async () => ({ Authorization: `Bearer ${mintToken(h.secret, 's8', 3600 + ++n)}` }),
  });
  const { message } = await collect(await submit(byHeader, 'chat-8', 'by header'));
  assert.match(textOf(message), /“by header”/);
  const { message: again } = await collect(await submit(byHeader, 'chat-8', 'fresh token'));
  assert.match(textOf(again), /“fresh token”/);
  assert.equal(n, 2, 'a token per frame');
  // The socket is s8's: a frame with s9's token is answered with an error.
  const other = await byHeader.sendMessages({
    trigger: 'submit-message', chatId: 'chat-8', messageId: undefined,
    messages: [userMessage('x', 'not mine')], abortSignal: undefined,
    headers: { authorization: `Bearer ${mintToken(h.secret, 's9')}` },
  });
  await assert.rejects(collect(other), /token refused/);
  byHeader.close();
  const byParams = new WebSocketChatTransport({ url: `ws://${h.addr}/ai`, params: async () => ({ token: mintToken(h.secret, 's8') }) });
  const { message: third } = await collect(await submit(byParams, 'chat-8p', 'by params'));
  assert.match(textOf(third), /“by params”/);
  byParams.close();
  // No token anywhere: closed 4401 at the first frame.
  const none = new WebSocketChatTransport({ url: `ws://${h.addr}/ai` });
  await assert.rejects(collect(await submit(none, 'c', 'x')), /4401/);
  none.close();
});

test('a backend that falls silent mid-answer, or refuses the turn, ends the stream with error (never a stuck spinner)', async () => {
  // A webhook backend: streams two deltas of each chat_request's run, then
  // goes silent ("chat-silent"), or refuses the request ("chat-refused").
  const requests = [];
  let hw;
  const backend = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', async () => {
      const r = JSON.parse(body);
      requests.push(r);
      if (r.type !== 'chat_request') { res.writeHead(200); return res.end(); }
      if (r.chat_id === 'chat-refused') { res.writeHead(400); return res.end(); }
      res.writeHead(200);
      res.end();
      for (const [i, text] of ['Half ', 'an answer'].entries()) {
        await api(hw, '/api/v1/events', { user_id: r.user_id, event: 'agent_text_delta', run_id: r.run_id, thread_id: r.chat_id, data: { part: 'answer', text, index: i } });
      }
    });
  });
  await new Promise((r) => backend.listen(0, '127.0.0.1', r));
  hw = await startHerald({
    HERALD_JWT_HS256_SECRET: 'ai-hook-secret-0123456789-abcdefghij', HERALD_API_KEY: 'ai-hook-key-0123456789',
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${backend.address().port}/hook`, HERALD_WEBHOOK_SECRET: 'ai-hook-0123456789abcd',
    HERALD_RUN_TTL: '2s',
  });
  const t = new WebSocketChatTransport({ url: `ws://${hw.addr}/ai`, protocols: ['bearer.' + mintToken(hw.secret, 'b1')] });
  try {
    const started = Date.now();
    const stream = await submit(t, 'chat-silent', 'hello');
    const chunks = [];
    await assert.rejects((async () => { for await (const c of stream) chunks.push(c); })(), /run_timeout/);
    const waited = Date.now() - started;
    assert.ok(waited < 10000, `ended after ${waited} ms (run_ttl 2 s, swept each second)`);
    assert.deepEqual(chunks.filter((c) => c.type === 'text-delta').map((c) => c.delta), ['Half ', 'an answer']);
    // What the backend was sent: the chat, the run Herald opened, the UI messages.
    const req = requests.find((r) => r.chat_id === 'chat-silent');
    assert.equal(req.type, 'chat_request');
    assert.equal(req.user_id, 'b1');
    assert.equal(req.trigger, 'submit-message');
    assert.match(req.run_id, /^run_[0-9a-f]{24}$/);
    assert.deepEqual(req.messages, [userMessage('m-chat-silent', 'hello')]);
    // A backend that refuses the turn: the run is closed and the stream errors.
    await assert.rejects(collect(await submit(t, 'chat-refused', 'hi')), /backend_rejected/);
    // And the chat is free again: nothing active, and a failed response is
    // not offered to a resume (a retry starts a new one).
    assert.equal(await t.reconnectToStream({ chatId: 'chat-refused' }), null);
  } finally {
    t.close();
    await hw.stop();
    backend.close();
  }
});

test('an AI SDK backend (streamText, mock model) streams its UI chunks in through the ingest: the same UI message reaches useChat, resumable', async () => {
  const { startBackend, mockModel } = await import('../examples/ai-backend/backend.mjs');
  const secret = 'ai-backend-hook-0123456789';
  let hw;
  const backend = await startBackend({ herald: 'http://placeholder', apiKey: 'placeholder', secret, model: mockModel({ delayMs: 40 }) });
  await backend.close();
  // The backend needs Herald's address and Herald the backend's: start the
  // backend on a known port after Herald picked its own.
  hw = await startHerald({
    HERALD_JWT_HS256_SECRET: 'ai-be-secret-0123456789-abcdefghijkl', HERALD_API_KEY: 'ai-be-key-0123456789ab',
    HERALD_WEBHOOK_URL: `http://127.0.0.1:${backend.port}/hook`, HERALD_WEBHOOK_SECRET: secret,
  });
  const b = await startBackend({ herald: `http://${hw.addr}`, apiKey: hw.apiKey, secret, port: backend.port, model: mockModel({ delayMs: 40 }) });
  const t = new WebSocketChatTransport({ url: `ws://${hw.addr}/ai`, protocols: ['bearer.' + mintToken(hw.secret, 'be1')] });
  try {
    const stream = await submit(t, 'chat-be', 'weather please');
    const [mine, rest] = stream.tee();
    const { reader } = await readSome(mine, 5);
    reader.releaseLock();
    // Mid-answer, another socket resumes: the same message, once.
    const other = new WebSocketChatTransport({ url: `ws://${hw.addr}/ai`, protocols: ['bearer.' + mintToken(hw.secret, 'be1')] });
    const resumed = await other.reconnectToStream({ chatId: 'chat-be' });
    const [live, again] = await Promise.all([collect(rest), collect(resumed)]);
    other.close();
    for (const { message } of [live, again]) {
      const kinds = message.parts.map((p) => p.type);
      assert.deepEqual(kinds.filter((k) => k !== 'step-start'), ['reasoning', 'tool-weather', 'text'], kinds.join());
      assert.equal(message.parts.find((p) => p.type === 'reasoning').text, 'The user asks about the weather.');
      const call = message.parts.find((p) => p.type === 'tool-weather');
      assert.deepEqual([call.state, call.input, call.output], ['output-available', { city: 'Oslo' }, { city: 'Oslo', celsius: 3 }]);
      assert.equal(textOf(message), 'It is 3 degrees in Oslo. You said: “weather please”.');
    }
    assert.equal(live.message.id, again.message.id, 'one stable message id');
    assert.equal(again.chunks.filter((c) => c.type === 'start').length, 1);
    await until(() => [...b.runs.values()].some((r) => r.status === 'done'), 5000, 'the ingest answer');
    const report = [...b.runs.values()][0].report;
    assert.equal(report.duplicates, 0);
    assert.ok(report.appended > 10, JSON.stringify(report));
    // Stop: the cancel webhook aborts streamText, whose `abort` chunk ends
    // the run (agent_cancelled) long before its 100 words would.
    const w = await watch('be1', hw);
    const stop = new AbortController();
    const stopped = await submit(t, 'chat-be-stop', 'stop ' + 'word '.repeat(100), stop.signal);
    const { reader: r2 } = await readSome(stopped, 5);
    stop.abort();
    r2.releaseLock();
    await until(() => w.events.some((e) => e.event === 'agent_cancelled' && e.thread_id === 'chat-be-stop'), 3000, 'agent_cancelled');
    w.close();
  } finally {
    t.close();
    await b.close();
    await hw.stop();
  }
});
