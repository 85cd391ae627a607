// Compiled by `tsc --strict --noEmit` in `npm test`: herald-gateway/server's
// types must type real use (a webhook handler answering with runs, `await
// using`, the AI SDK bridge) and refuse wrong use.
import { Herald, HeraldError, InvalidSignature, mintToken, verifyWebhook, type Run, type WebhookEvent } from '../server.js';

const herald = new Herald({ url: 'http://127.0.0.1:8080', apiKey: 'k' });

export async function handle(req: Request): Promise<Response> {
  let event: WebhookEvent;
  try {
    event = await verifyWebhook('secret', req.headers, new Uint8Array(await req.arrayBuffer()));
  } catch (e) {
    if (e instanceof InvalidSignature) return new Response(null, { status: 401 });
    throw e;
  }
  switch (event.type) {
    case 'cancel':
      herald.cancelled(event);
      break;
    case 'chat_request': {
      // `await using`: a run left without complete() ends agent_error.
      await using run = await herald.run(event);
      const call = await run.tool('search', { q: event.text });
      await call.done({ results: 3 });
      run.text('Hello', { part: 'answer' });
      await run.complete();
      break;
    }
    case 'user_message': {
      const answer: string = await herald.run(event, {}, async (run: Run) => {
        const answers: string | undefined = run.messageId; // named in its agent_started
        void answers;
        await run.thinking(`about ${event.text}`);
        run.text(event.text);
        return event.text;
      });
      void answer;
      break;
    }
  }
  return new Response(null, { status: 200 });
}

export async function publishAndBridge(chunks: ReadableStream<unknown>) {
  const r = await herald.publish({ userId: 'u', event: 'agent_note', data: { n: 1 } });
  const seq: number = r.seq;
  void seq;
  try {
    await herald.publishMany([{ userId: 'u', event: 'x', idempotencyKey: 'k1' }], { signal: AbortSignal.timeout(1000) });
  } catch (e) {
    if (e instanceof HeraldError) { const code: string = e.code; void code; }
  }
  await herald.run('u', { threadId: 't' }, async (run) => {
    const answer = await run.pipe(chunks);
    void answer;
  });
  const token: string = await mintToken('secret', 'alice', { ttl: 60 });
  void token;
  // @ts-expect-error: an event needs a user
  await herald.publish({ event: 'x' });
  // @ts-expect-error: text takes a string
  (await herald.run('u')).text(5);
}
