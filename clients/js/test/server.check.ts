// Compiled by `tsc --strict --noEmit` in `npm test`: herald-gateway/server's
// types must type real use (a webhook handler answering with runs, `await
// using`, the AI SDK bridge) and refuse wrong use.
import { Herald, HeraldError, InvalidSignature, allowSubscribe, denySubscribe, mintToken, verifyWebhook, type Published, type SubscribeAnswer, type Run, type StreamGrants, type StreamPresence, type PresenceUser, type WebhookEvent } from '../server.js';

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
    case 'subscribe_request': {
      // A stream the token does not grant: the answer is the response body.
      const answer: SubscribeAnswer = event.stream.startsWith('room:') ? allowSubscribe({ write: true }) : denySubscribe();
      // @ts-expect-error: a subscribe request names no run
      void event.runId;
      return Response.json(answer);
    }
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

// Shared streams: publishing to one, runs in one, removing a member, grants.
export async function sharedStreams(event: WebhookEvent) {
  const r: Published = await herald.publish({ stream: 'thread:t1', event: 'note', data: { n: 1 } });
  void r;
  await herald.publishMany([{ stream: 'thread:t1', event: 'a' }, { userId: 'u', event: 'b' }]);
  // @ts-expect-error: a user or a stream, not both
  await herald.publish({ userId: 'u', stream: 'thread:t1', event: 'x' });
  // @ts-expect-error: a stream is a string
  await herald.publish({ stream: 1, event: 'x' });
  if (event.type === 'user_message' || event.type === 'cancel') {
    const stream: string | undefined = event.stream; // absent: the user's own stream
    void stream;
  }
  if (event.type === 'user_message') {
    await herald.run(event, {}, async (run) => {
      const where: string | undefined = run.stream; // the message's stream, if any
      const asker: string | undefined = run.userId;
      void where; void asker;
      run.text('on it');
    });
  }
  const run: Run = await herald.run({ stream: 'room:ops' }, { threadId: 'daily' });
  await run.complete();
  await herald.run({ stream: 'room:ops' }, async (r2) => { r2.text('hi'); });
  // @ts-expect-error: a run's stream is a string
  await herald.run({ stream: 5 });
  // @ts-expect-error: a run's userId may be undefined (a run in a stream)
  const user: string = run.userId;
  void user;
  const removed: number = await herald.unsubscribe('thread:t1', 'bob', { signal: AbortSignal.timeout(1000) });
  void removed;
  const here: StreamPresence = await herald.presence('room:lobby');
  const firstUser: PresenceUser | undefined = here.users[0];
  const totals: [string, number, number] = [here.stream, here.total_users, here.total_connections];
  void firstUser; void totals;
  await herald.presence('room:lobby', { limit: 10 }, { signal: AbortSignal.timeout(1000) });
  // @ts-expect-error: a limit is a number
  await herald.presence('room:lobby', { limit: '10' });
  // @ts-expect-error: a user's connections are a number
  const n: string = here.users[0].connections;
  void n;
  const grants: StreamGrants = { 'thread:t1': 'rw', 'room:*': 'r' };
  const token: string = await mintToken('secret', 'ana', { streams: grants });
  void token;
  // @ts-expect-error: a grant is 'r' or 'rw'
  await mintToken('secret', 'ana', { streams: { 'thread:t1': 'w' } });
}
