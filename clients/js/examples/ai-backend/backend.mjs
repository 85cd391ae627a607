// An agent backend written with the AI SDK: Herald hands it each chat turn
// of its `GET /ai` endpoint (a signed `chat_request` webhook), it runs
// `streamText` and streams the UI message chunks (`toUIMessageStream()`)
// into the run Herald opened, through `POST /api/v1/runs/{run}/ui`, as the
// SSE the SDK writes. A `cancel` webhook (the user pressed Stop) aborts the
// generation; the stream then ends with `abort`.
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
import { createHmac, timingSafeEqual } from 'node:crypto';
import {
  JsonToSseTransformStream, convertToModelMessages, jsonSchema, stepCountIs, streamText, tool,
  toUIMessageStream, validateUIMessages,
} from 'ai';
import { MockLanguageModelV4, simulateReadableStream } from 'ai/test';

/** The SDK's mock model: reasoning and a tool call, then the answer to `text`, word by word. */
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

/** Whether Herald signed this webhook request (`X-Herald-Signature: v2=…`). */
export function verified(secret, headers, body, nowSec = Date.now() / 1000) {
  const ts = Number(headers['x-herald-timestamp']);
  const delivery = headers['x-herald-delivery'] ?? '';
  const sig = String(headers['x-herald-signature'] ?? '').replace(/^v2=/, '');
  if (!Number.isFinite(ts) || Math.abs(nowSec - ts) > 300) return false;
  const want = createHmac('sha256', secret).update(`${ts}.${delivery}.`).update(body).digest('hex');
  return sig.length === want.length && timingSafeEqual(Buffer.from(sig), Buffer.from(want));
}

/**
 * Start the backend: `{ herald: base URL, apiKey, secret, port, model }`.
 * Resolves `{ port, url, close(), runs }` (`runs`: what each run did, for tests).
 */
export async function startBackend({ herald, apiKey, secret, port = 0, model = mockModel() }) {
  const active = new Map(); // run id → AbortController
  const seen = new Set(); // delivery ids (Herald retries with the same id)
  const runs = new Map(); // run id → { status, error }

  async function answer(turn) {
    const abort = new AbortController();
    active.set(turn.run_id, abort);
    runs.set(turn.run_id, { status: 'streaming' });
    try {
      const messages = await validateUIMessages({ messages: turn.messages });
      const result = streamText({
        model, messages: await convertToModelMessages(messages), tools: { weather },
        stopWhen: stepCountIs(3), abortSignal: abort.signal,
      });
      const chunks = toUIMessageStream({
        stream: result.stream, tools: { weather }, originalMessages: messages, sendReasoning: true,
        // The assistant message's id is the run's: what Herald's `start` said.
        generateMessageId: () => turn.run_id,
      });
      const query = new URLSearchParams({ user_id: turn.user_id, thread_id: turn.chat_id });
      const res = await fetch(`${herald}/api/v1/runs/${encodeURIComponent(turn.run_id)}/ui?${query}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'text/event-stream' },
        body: chunks.pipeThrough(new JsonToSseTransformStream()).pipeThrough(new TextEncoderStream()),
        duplex: 'half',
      });
      const report = await res.json();
      runs.set(turn.run_id, { status: res.ok ? 'done' : 'failed', report });
    } catch (error) {
      runs.set(turn.run_id, { status: 'failed', error: String(error) });
    } finally {
      active.delete(turn.run_id);
    }
  }

  const server = http.createServer((req, res) => {
    const parts = [];
    req.on('data', (d) => parts.push(d));
    req.on('end', () => {
      const body = Buffer.concat(parts);
      if (!verified(secret, req.headers, body)) { res.writeHead(401); return res.end(); }
      res.writeHead(200);
      res.end();
      const delivery = req.headers['x-herald-delivery'];
      if (seen.has(delivery)) return;
      seen.add(delivery);
      const msg = JSON.parse(body);
      if (msg.type === 'chat_request') answer(msg);
      if (msg.type === 'cancel') active.get(msg.run_id)?.abort();
    });
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const bound = server.address().port;
  return {
    port: bound,
    url: `http://127.0.0.1:${bound}/hook`,
    runs,
    close: () => new Promise((resolve) => { for (const a of active.values()) a.abort(); server.close(resolve); server.closeAllConnections(); }),
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
