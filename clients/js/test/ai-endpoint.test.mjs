// The AI SDK's own WebSocketChatTransport (from `ai`, not a copy) against a
// real `herald serve` on GET /ai: no Herald code on the client side.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocketChatTransport, readUIMessageStream } from 'ai';
import { startHerald, mintToken, until } from './helpers.mjs';

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
