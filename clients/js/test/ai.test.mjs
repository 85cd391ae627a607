// HeraldChatTransport against a real `herald serve` and its demo agent, read
// with the AI SDK's own `readUIMessageStream` (what useChat does).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readUIMessageStream } from 'ai';
import { HeraldClient } from '../herald.js';
import { HeraldChatTransport } from '../ai.js';
import { startHerald, mintToken, until, joinDeltas } from './helpers.mjs';

let h;
before(async () => { h = await startHerald({ HERALD_JWT_HS256_SECRET: 'ai-secret-0123456789-abcdefghijklmno', HERALD_API_KEY: 'ai-key-0123456789abcd' }); });
after(async () => { await h.stop(); });

const url = () => `ws://${h.addr}/ws`;
const userMessage = (id, text) => ({ id, role: 'user', parts: [{ type: 'text', text }] });

/** A connected client for `user` and a transport over it. */
async function connected(user) {
  const client = new HeraldClient({ url: url(), token: mintToken(h.secret, user) });
  const transport = new HeraldChatTransport({ client });
  client.connect();
  await until(() => client.state === 'open');
  return { client, transport };
}

/** `useChat` submitting the UI message `id` with `text` in chat `chatId`. */
const submit = (transport, chatId, id, text) => transport.sendMessages({
  trigger: 'submit-message', chatId, messageId: undefined,
  messages: [userMessage(id, text)], abortSignal: undefined,
});

/** The final UI message a stream assembles to. */
async function assemble(stream) {
  let last;
  for await (const m of readUIMessageStream({ stream })) last = m;
  return last;
}

test('a message streams the demo run as reasoning, a tool call and the answer', async () => {
  const { client, transport } = await connected('a1');
  const stream = await submit(transport, 'chat-1', 'ui-msg-1', 'plan my trip');
  const msg = await assemble(stream);
  assert.equal(msg.role, 'assistant');
  const kinds = msg.parts.map((p) => p.type);
  assert.deepEqual(kinds.filter((k) => k !== 'step-start'), ['reasoning', 'dynamic-tool', 'reasoning', 'text']);
  assert.match(msg.parts.find((p) => p.type === 'reasoning').text, /Reading your message/);
  const tool = msg.parts.find((p) => p.type === 'dynamic-tool');
  assert.equal(tool.toolName, 'search');
  assert.equal(tool.state, 'output-available');
  assert.equal(tool.output.results, 3);
  assert.match(msg.parts.find((p) => p.type === 'text').text, /plan my trip/);
  client.close();
});

test('the streamed answer maps to one text part: text-start, its deltas, text-end', async () => {
  const { client, transport } = await connected('a1b');
  const frames = [];
  client.on('event', (e) => frames.push(e));
  const stream = await submit(transport, 'chat-1b', 'ui-msg-1b', 'count my words');
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  const text = chunks.filter((c) => c.type.startsWith('text-'));
  assert.equal(text[0].type, 'text-start');
  assert.equal(text.at(-1).type, 'text-end');
  const deltas = text.slice(1, -1);
  // A text-delta per delta frame (deltas that reached the socket together
  // come joined in one, covering from_seq…seq): the answer whole.
  assert.ok(deltas.every((c) => c.type === 'text-delta' && c.id === text[0].id));
  joinDeltas(frames);
  assert.deepEqual(deltas.map((c) => c.delta), frames.filter((e) => e.event === 'agent_text_delta').map((e) => e.data.text));
  const answer = deltas.map((c) => c.delta).join('');
  assert.equal(answer, 'You said: \u201ccount my words\u201d. I am Herald\'s built-in demo agent; set HERALD_WEBHOOK_URL to connect your own.');
  // Ended before the finish; the final response is not sent again as text.
  assert.ok(chunks.findIndex((c) => c.type === 'text-end') < chunks.findIndex((c) => c.type === 'finish'));
  assert.equal(chunks.filter((c) => c.type === 'text-start').length, 1);
  client.close();
});

test('reconnectToStream resumes the open run after a reload, or returns null', async () => {
  const { client: first, transport: t1 } = await connected('a2');
  const stream = await submit(t1, 'chat-2', 'ui-msg-2', 'a long question');
  const reader = stream.getReader();
  await reader.read(); // the run started
  reader.releaseLock();
  first.close(); // the page reloads mid-run
  const page = new HeraldClient({ url: url(), token: mintToken(h.secret, 'a2') });
  const t2 = new HeraldChatTransport({ client: page });
  page.connect();
  assert.equal(await t2.reconnectToStream({ chatId: 'chat-other' }), null, 'no open run in another chat');
  const resumed = await t2.reconnectToStream({ chatId: 'chat-2' });
  assert.ok(resumed, 'the open run');
  const msg = await assemble(resumed);
  // The whole run, from agent_started: the first thinking line is there.
  assert.match(msg.parts.find((p) => p.type === 'reasoning').text, /Reading your message/);
  assert.match(msg.parts.find((p) => p.type === 'text').text, /a long question/);
  assert.equal(await t2.reconnectToStream({ chatId: 'chat-2' }), null, 'finished: nothing to resume');
  page.close();
});

test('cancel stops the run: the stream ends with abort', async () => {
  const { client, transport } = await connected('a3');
  const stream = await submit(transport, 'chat-3', 'ui-msg-3', 'stop me');
  const chunks = [];
  const reading = (async () => { for await (const c of stream) chunks.push(c.type); })();
  await until(() => chunks.includes('start'), 5000, 'run started');
  assert.equal(await transport.cancel('chat-3'), true);
  await reading;
  assert.equal(chunks.at(-1), 'abort');
  assert.ok(!chunks.includes('finish'));
  assert.equal(await transport.cancel('chat-3'), false, 'nothing open any more');
  client.close();
});

test('a failed send ends the stream with an error chunk', async () => {
  const { client, transport } = await connected('a4');
  // An empty thread id is refused by the server (nack invalid_field).
  const stream = await submit(transport, '', 'ui-msg-4', 'hi');
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.equal(chunks.length, 1);
  assert.equal(chunks[0].type, 'error');
  assert.match(chunks[0].errorText, /thread_id/);
  client.close();
});

test('an abort before the run starts detaches: the run goes on, nothing reaches the closed stream', async () => {
  const { client, transport } = await connected('a5');
  const abort = new AbortController();
  // useChat aborts a request it replaces (StrictMode's second resume, a stop)
  // possibly before the run that answers it is known.
  const stream = await transport.sendMessages({
    trigger: 'submit-message', chatId: 'chat-5', messageId: undefined,
    messages: [userMessage('ui-msg-5', 'abort early')], abortSignal: abort.signal,
  });
  abort.abort();
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.deepEqual(chunks, [], 'an aborted stream ends empty');
  // The run was not cancelled (an abort only detaches) and completes; its
  // events reach the transport without an error from the closed stream.
  const events = [];
  client.on('event', (e) => events.push(e.event));
  await until(() => events.includes('agent_completed'), 5000, 'the run completed');
  assert.ok(!events.includes('agent_cancelled'));
  client.close();
});
