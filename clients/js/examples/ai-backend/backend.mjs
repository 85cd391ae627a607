// An agent backend written with the AI SDK and herald-gateway/server:
// Herald hands it each chat turn of its `GET /ai` endpoint (a signed
// `chat_request` webhook; a `user_message` from `/ws` is answered the same
// way), it runs `streamText` and pipes the UI message chunks
// (`toUIMessageStream()`) into the run, through Herald's UI chunk ingest. A
// `cancel` webhook (the user pressed Stop) aborts the generation through
// the run's signal; the stream then ends with `abort`.
//
// Offline it answers with the SDK's mock model (`ai/test`): reasoning, a
// `weather` tool call, then text. With AI_GATEWAY_API_KEY set it uses a
// real model through the AI Gateway (AI_MODEL, default openai/gpt-4o-mini).
//
//   cd clients/js && npm ci
//   HERALD_URL=http://127.0.0.1:8080 HERALD_API_KEY=… WEBHOOK_SECRET=… \
//     node examples/ai-backend/backend.mjs          # listens on :8090/hook
//   herald serve with HERALD_WEBHOOK_URL=http://127.0.0.1:8090/hook and
//     HERALD_WEBHOOK_SECRET=… (the same secret)
import http from 'node:http';
import {
  convertToModelMessages, jsonSchema, stepCountIs, streamText, tool, toUIMessageStream, validateUIMessages,
} from 'ai';
import { MockLanguageModelV4, simulateReadableStream } from 'ai/test';
import { Herald, InvalidSignature, verifyWebhook } from '../../server.js';

/** The SDK's mock model: reasoning and a tool call, then the answer to the last user message, word by word. */
export function mockModel({ delayMs = 20 } = {}) {
  const usage = { inputTokens: { total: 1, noCache: 1 }, outputTokens: { total: 1, text: 1 } };
  const finish = (unified) => ({ type: 'finish', finishReason: { unified, raw: undefined }, usage });
  return new MockLanguageModelV4({
    doStream: async (options) => {
      const hadTool = options.prompt.some((m) => m.role === 'tool');
      const lastUser = [...options.prompt].reverse().find((m) => m.role === 'user');
      const text = lastUser?.content.filter((p) => p.type === 'text').map((p) => p.text).join(' ') ?? '';
      const chunks = hadTool
        ? [
          { type: 'text-start', id: 't1' },
          ...`It is 3 degrees in Oslo. You said: “${text}”.`.split(/(?<= )/).map((delta) => ({ type: 'text-delta', id: 't1', delta })),
          { type: 'text-end', id: 't1' },
          finish('stop'),
        ]
        : [
          { type: 'reasoning-start', id: 'r1' },
          { type: 'reasoning-delta', id: 'r1', delta: 'The user asks about ' },
          { type: 'reasoning-delta', id: 'r1', delta: 'the weather.' },
          { type: 'reasoning-end', id: 'r1' },
          { type: 'tool-call', toolCallId: 'call-1', toolName: 'weather', input: JSON.stringify({ city: 'Oslo' }) },
          finish('tool-calls'),
        ];
      return { stream: simulateReadableStream({ chunks, chunkDelayInMs: delayMs }) };
    },
  });
}

const weather = tool({
  description: 'The weather in a city',
  inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }),
  execute: async ({ city }) => ({ city, celsius: 3 }),
});

/** The UI messages of a turn: a chat_request's, or one user message's. */
function messagesOf(event) {
  if (event.type === 'chat_request') return event.messages;
  return [{ id: event.messageId, role: 'user', parts: [{ type: 'text', text: event.text }] }];
}

/**
 * Start the backend: `{ herald: base URL, apiKey, secret, port, model }`.
 * Resolves `{ port, url, close(), runs }` (`runs`: what each run did, for tests).
 */
export async function startBackend({ herald: url, apiKey, secret, port = 0, model = mockModel() }) {
  const herald = new Herald({ url, apiKey });
  const seen = new Set(); // delivery ids: Herald retries a request with the same id
  const runs = new Map(); // run id → { status, report | error }

  async function answer(event) {
    try {
      await herald.run(event, {}, async (run) => {
        runs.set(run.id, { status: 'streaming' });
        const messages = await validateUIMessages({ messages: messagesOf(event) });
        const result = streamText({
          model, messages: await convertToModelMessages(messages), tools: { weather },
          stopWhen: stepCountIs(3), abortSignal: run.signal, // Stop reaches the model call
        });
        const report = await run.pipe(toUIMessageStream({
          stream: result.stream, tools: { weather }, originalMessages: messages, sendReasoning: true,
          // The assistant message's id is the run's: what Herald's `start` said.
          generateMessageId: () => run.id,
        }));
        runs.set(run.id, { status: 'done', report });
      });
    } catch (error) {
      runs.set(event.runId ?? event.messageId, { status: 'failed', error: String(error) });
    }
  }

  const server = http.createServer((req, res) => {
    const parts = [];
    req.on('data', (d) => parts.push(d));
    req.on('end', async () => {
      let event;
      try {
        event = await verifyWebhook(secret, req.headers, Buffer.concat(parts));
      } catch (e) {
        res.writeHead(e instanceof InvalidSignature ? 401 : 400);
        return res.end();
      }
      res.writeHead(200);
      res.end();
      if (seen.has(event.deliveryId)) return;
      seen.add(event.deliveryId);
      if (event.type === 'cancel') herald.cancelled(event);
      else answer(event);
    });
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const bound = server.address().port;
  return {
    port: bound,
    url: `http://127.0.0.1:${bound}/hook`,
    runs,
    close: () => new Promise((resolve) => { server.close(resolve); server.closeAllConnections(); }),
  };
}

// Run as a program: the configuration from the environment.
if (import.meta.url === `file://${process.argv[1]}`) {
  const { gateway } = await import('ai');
  const model = process.env.AI_GATEWAY_API_KEY ? gateway(process.env.AI_MODEL ?? 'openai/gpt-4o-mini') : mockModel();
  const b = await startBackend({
    herald: process.env.HERALD_URL ?? 'http://127.0.0.1:8080',
    apiKey: process.env.HERALD_API_KEY,
    secret: process.env.WEBHOOK_SECRET,
    port: Number(process.env.PORT ?? 8090),
    model,
  });
  console.log(`agent backend on ${b.url} (${process.env.AI_GATEWAY_API_KEY ? 'AI Gateway' : 'mock model'})`);
}
