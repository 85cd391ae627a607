// herald-gateway/server: Herald for agent backends written in TypeScript or
// JavaScript — publish events, run agent runs with a lifecycle guarantee,
// stream answer text, bridge the AI SDK's UI message streams, verify
// webhooks. No dependencies: only fetch, ReadableStream, TextEncoder and
// WebCrypto, so it runs on Node >= 20, Bun, Deno and edge runtimes.
//
// The wire contract is docs/PROTOCOL.md (HTTP API, the text and UI chunk
// ingests, the webhook); the Python SDK (clients/python) is the same design.

/** Attempts after the first, for a request that failed in a way a retry can fix. */
const RETRIES = 4;
/** First wait before a retry; doubles, with full jitter, up to MAX_BACKOFF_MS. */
const BASE_BACKOFF_MS = 200;
const MAX_BACKOFF_MS = 5000;
/** A delta index past any real one: a probe Herald refuses with where the part stands. */
const PROBE_INDEX = 2 ** 53;
/** Lines one text request carries at most before the next one goes on. */
const MAX_REQUEST_LINES = 20000;

/** An error the HTTP API answered: `status`, `code`, `field` and `message` as Herald sent them. */
export class HeraldError extends Error {
  constructor(status, code, message, { field, expected, body } = {}) {
    super(`${code}: ${message}`);
    this.name = 'HeraldError';
    this.status = status;
    this.code = code;
    this.field = field;
    this.expected = expected;
    this.body = body;
  }
}

/** A run's text (or UI chunks) could not be delivered; the run ended with `agent_error`. */
export class TextStreamError extends HeraldError {
  constructor(status, code, message, runId, extra = {}) {
    super(status, code, message, extra);
    this.name = 'TextStreamError';
    this.runId = runId;
  }
}

/** A webhook request that does not verify (any malformed input included). */
export class InvalidSignature extends Error {
  constructor(message) {
    super(message);
    this.name = 'InvalidSignature';
  }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  if (signal?.aborted) return reject(signal.reason);
  const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
  const onAbort = () => { clearTimeout(t); reject(signal.reason); };
  signal?.addEventListener('abort', onAbort, { once: true });
});

/** The wait before retry `attempt` (1-based), or what `Retry-After` asked (capped). */
function backoff(attempt, retryAfter) {
  if (retryAfter != null) return Math.min(retryAfter * 1000, MAX_BACKOFF_MS);
  const cap = Math.min(BASE_BACKOFF_MS * 2 ** (attempt - 1), MAX_BACKOFF_MS);
  return Math.random() * cap;
}

const retryable = (status) => status === 429 || status >= 500;

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return new HeraldError(response.status, body?.error ?? `http_${response.status}`, body?.message ?? response.statusText, {
    field: body?.field, expected: body?.expected, body,
  });
}

const randomId = () => globalThis.crypto.randomUUID();

/** The client of Herald's HTTP API. */
export class Herald {
  #url;
  #apiKey;
  #fetch;
  #timeoutMs;
  /** Open runs by id: their cancel signal. */
  #runs = new Map();

  /**
   * @param {{url: string, apiKey: string, fetch?: typeof fetch, timeoutMs?: number}} options
   */
  constructor({ url, apiKey, fetch = globalThis.fetch, timeoutMs = 10000 }) {
    if (!url || !apiKey) throw new TypeError('Herald needs `url` and `apiKey`');
    this.#url = url.replace(/\/+$/, '');
    this.#apiKey = apiKey;
    this.#fetch = fetch;
    this.#timeoutMs = timeoutMs;
  }

  /**
   * One API request, retried on a connection error, a timeout, 5xx or 429
   * (the same body, so the same idempotency keys); other answers throw
   * HeraldError. Resolves the answer's JSON.
   */
  async request(method, path, { body, signal, retries = RETRIES } = {}) {
    for (let attempt = 0; ; attempt++) {
      signal?.throwIfAborted();
      let response;
      let failure;
      const timeout = AbortSignal.timeout(this.#timeoutMs);
      try {
        response = await this.#fetch(`${this.#url}${path}`, {
          method,
          headers: { authorization: `Bearer ${this.#apiKey}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
        });
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        failure = e;
      }
      if (response?.ok) return response.json();
      if (response && !retryable(response.status)) throw await errorOf(response);
      if (attempt >= retries) throw response ? await errorOf(response) : failure;
      const after = response ? Number(response.headers.get('retry-after')) : NaN;
      await sleep(backoff(attempt + 1, Number.isFinite(after) && after >= 0 ? after : null), signal);
    }
  }

  /**
   * Publish one event to a user (`userId`) or to a shared stream (`stream`,
   * e.g. `thread:t1`): exactly one of the two, else a TypeError. It carries
   * an idempotency key (yours, or a random one), so a retry after a lost
   * answer is stored once.
   */
  async publish(event, { signal } = {}) {
    const [result] = await this.publishMany([event], { signal });
    return result;
  }

  /** Publish events (up to 1,000) in one request, each with an idempotency key. */
  async publishMany(events, { signal } = {}) {
    const body = { events: events.map(wireEvent) };
    const answer = await this.request('POST', '/api/v1/events', { body, signal });
    return answer.results;
  }

  /**
   * End every subscription of `userId` to the shared `stream`, on every
   * node (each socket is told `unsubscribed`, reason `removed`); resolves
   * how many. What the user's token grants is unchanged.
   */
  async unsubscribe(stream, userId, { signal } = {}) {
    const body = { stream, user_id: userId };
    return (await this.request('POST', '/api/v1/streams/unsubscribe', { body, signal })).removed;
  }

  /**
   * Who is in the shared `stream`, on every node: `{ stream, users:
   * [{ user_id, connections }], total_users, total_connections }` — `users`
   * sorted by id, at most `limit` of them (default and cap: the server's
   * `presence_max_listed`, 100); the totals count everyone.
   */
  async presence(stream, { limit } = {}, { signal } = {}) {
    const q = new URLSearchParams({ stream });
    if (limit !== undefined) q.set('limit', String(limit));
    return this.request('GET', `/api/v1/streams/presence?${q}`, { signal });
  }

  /** Close every connection of `userId` on every node (4409); resolves how many. */
  async disconnect(userId, { signal } = {}) {
    return (await this.request('POST', '/api/v1/disconnect', { body: { user_id: userId }, signal })).disconnected;
  }

  /** The live connections (of `userId`, if given), at most `limit`. */
  async connections({ userId, limit } = {}, { signal } = {}) {
    const q = new URLSearchParams();
    if (userId !== undefined) q.set('user_id', userId);
    if (limit !== undefined) q.set('limit', String(limit));
    return this.request('GET', `/api/v1/connections${q.size ? `?${q}` : ''}`, { signal });
  }

  /**
   * An agent run. `to` is a user id, a shared stream (`{ stream:
   * 'thread:t1' }`), or the webhook event it answers (a `user_message`: its
   * user and thread — and its stream, when it was written to a shared one —
   * and its `agent_started` names the message, `{message_id}`, so Herald
   * keeps the question with the run; a `chat_request` is answered in the
   * run Herald opened: its id and chat, no second `agent_started`). With `body`, the callback form: the run
   * ends `agent_completed` when it resolves (its value as the final
   * response if `complete` was not called), `agent_error` when it throws
   * (rethrown), `agent_cancelled` when the run's signal aborted. Without,
   * resolves the started Run, for `await using`.
   */
  async run(to, options = {}, body) {
    if (typeof options === 'function') [options, body] = [{}, options];
    const run = new Run(this, target(to, options));
    await run.start();
    if (!body) return run;
    try {
      const value = await body(run);
      if (!run.ended) await run.complete(value);
      return value;
    } catch (error) {
      if (!run.ended) {
        const ending = run.signal.aborted ? run.cancel(run.signal.reason?.message ?? 'aborted') : run.fail(error);
        await ending.catch(() => {});
      }
      throw error;
    }
  }

  /**
   * A `cancel` webhook arrived: abort the signal of the run it names, if
   * this process runs it. Returns whether it did.
   */
  cancelled(event) {
    const runId = typeof event === 'string' ? event : event?.runId;
    const controller = this.#runs.get(runId);
    if (!controller) return false;
    controller.abort(new DOMException('the user stopped the run', 'AbortError'));
    return true;
  }

  /** @internal */
  track(runId, controller) {
    if (controller) this.#runs.set(runId, controller); else this.#runs.delete(runId);
  }

  /** @internal a streaming POST of `body` (a ReadableStream of bytes) to `path`. */
  async stream(path, body) {
    const response = await this.#fetch(`${this.#url}${path}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${this.#apiKey}`, 'content-type': 'application/x-ndjson' },
      body,
      duplex: 'half',
    });
    let answer = null;
    try { answer = await response.json(); } catch { /* not JSON */ }
    return { status: response.status, ok: response.ok, answer, retryAfter: Number(response.headers.get('retry-after')) };
  }
}

/** Where an event goes: `{user_id}` (the user's own stream) or `{stream}` (a shared one), exactly one. */
function destination(userId, stream, what) {
  if ((userId === undefined) === (stream === undefined)) {
    throw new TypeError(`${what} goes to a user (userId) or to a shared stream (stream): give exactly one, not ${userId === undefined ? 'neither' : 'both'}`);
  }
  return userId !== undefined ? { user_id: userId } : { stream };
}

function wireEvent(e, i) {
  const out = { ...destination(e.userId, e.stream, `events[${i}]`), event: e.event, idempotency_key: e.idempotencyKey ?? randomId() };
  if (e.runId !== undefined) out.run_id = e.runId;
  if (e.threadId !== undefined) out.thread_id = e.threadId;
  if (e.data !== undefined) out.data = e.data;
  return out;
}

/** Whom a run answers, from `run()`'s arguments. */
function target(to, { threadId, runId, started, signal }) {
  if (to && typeof to === 'object' && to.type === 'chat_request') {
    if (threadId !== undefined || runId !== undefined) {
      throw new TypeError('a run answering a chat_request uses its runId and chatId: pass neither');
    }
    return { userId: to.userId, threadId: to.chatId, runId: to.runId, started: started ?? true, signal };
  }
  if (to && typeof to === 'object' && to.type === 'user_message') {
    // Its agent_started names the message: Herald keeps the question with
    // the run. A message written to a shared stream is answered there.
    return { userId: to.userId, stream: to.stream, threadId: to.threadId, runId: runId ?? newRunId(), started: started ?? false, signal, messageId: to.messageId };
  }
  if (to && typeof to === 'object' && to.type === undefined) {
    if (typeof to.stream !== 'string' || to.stream === '' || to.userId !== undefined) {
      throw new TypeError('a run in a shared stream is run({ stream: name }), without a userId');
    }
    return { stream: to.stream, threadId, runId: runId ?? newRunId(), started: started ?? false, signal };
  }
  if (typeof to !== 'string' || to === '') throw new TypeError('a run answers a user id, a { stream }, a user_message or a chat_request');
  return { userId: to, threadId, runId: runId ?? newRunId(), started: started ?? false, signal };
}

/** The query naming a run's stream for the text and UI ingests (and its thread). */
function ingestQuery(run) {
  const q = new URLSearchParams(run.stream !== undefined ? { stream: run.stream } : { user_id: run.userId });
  if (run.threadId !== undefined) q.set('thread_id', run.threadId);
  return q;
}

const newRunId = () => `run_${randomId().replaceAll('-', '')}`;

const segment = (v) => encodeURIComponent(v);

/**
 * One agent run: opened with `agent_started` (unless Herald opened it; with
 * `{message_id}` when it answers a `user_message`), ended with exactly one of `agent_completed`, `agent_error`,
 * `agent_cancelled`. Text is confirmed before any other event of the run is
 * published, so events keep their order.
 */
export class Run {
  #herald;
  #controller = new AbortController();
  #text = null;
  #calls = 0;

  constructor(herald, { userId, stream, threadId, runId, started, signal, messageId }) {
    this.#herald = herald;
    /** The user the run answers (a stream's message: its sender); undefined for `run({ stream })`. */
    this.userId = userId;
    /** The shared stream the run publishes to; undefined: the user's own. */
    this.stream = stream;
    this.threadId = threadId;
    this.id = runId;
    /** The id of the user message the run answers (named in its `agent_started`), if any. */
    this.messageId = messageId;
    this.ended = false;
    this.opened = started;
    if (signal) signal.addEventListener('abort', () => this.#controller.abort(signal.reason), { once: true });
  }

  /** Aborted when the user stops the run (`herald.cancelled(event)`) or the caller's signal aborts. */
  get signal() { return this.#controller.signal; }

  /** @internal */
  async start() {
    this.#herald.track(this.id, this.#controller);
    if (!this.opened) await this.#publish('agent_started', this.messageId === undefined ? {} : { message_id: this.messageId });
    this.opened = true;
  }

  async #publish(event, data) {
    if (this.ended) throw new TypeError(`run ${this.id} has ended`);
    await this.#text?.flush();
    await this.#herald.publish({ ...this.#to(), event, runId: this.id, threadId: this.threadId, data });
  }

  /** Where the run's events go: the shared stream, or the user's own. */
  #to() {
    return this.stream !== undefined ? { stream: this.stream } : { userId: this.userId };
  }

  /** A thought, shown as reasoning. */
  thinking(text) { return this.#publish('agent_thinking', { text }); }

  /** A tool call: `tool_executing` now; `done(output)` or `fail(error)` publishes `tool_completed`. */
  async tool(name, input = {}, { callId } = {}) {
    const id = callId ?? `${this.id}-call-${++this.#calls}`;
    await this.#publish('tool_executing', { tool: name, tool_call_id: id, input });
    return {
      id,
      name,
      done: (output) => this.#publish('tool_completed', { tool: name, tool_call_id: id, output }),
      fail: (error) => this.#publish('tool_completed', { tool: name, tool_call_id: id, error: String(error?.message ?? error) }),
    };
  }

  /**
   * Append `delta` to the answer part `part` (default `answer`): streamed
   * over one long request, numbered, resent from the first unconfirmed
   * delta if the request fails. Throws the TextStreamError of text that
   * could not be delivered.
   */
  text(delta, { part = 'answer' } = {}) {
    if (this.ended) throw new TypeError(`run ${this.id} has ended`);
    this.#text ??= new TextStream(this.#herald, this);
    this.#text.push(part, delta);
  }

  /** Wait until every delta so far is stored (a run's other events do this themselves). */
  async flush() { await this.#text?.flush(); }

  /**
   * Stream an AI SDK UI message stream (`toUIMessageStream()`'s chunks)
   * into the run through the UI chunk ingest; the stream's `finish`,
   * `error` or `abort` ends the run. Resolves the ingest's answer.
   */
  async pipe(chunks) {
    await this.#text?.flush();
    const answer = await pipeChunks(this.#herald, this, chunks);
    this.ended = true;
    this.#herald.track(this.id, null);
    return answer;
  }

  /** End with `agent_completed` (and `final_response`, if given). */
  async complete(finalResponse) {
    await this.#end('agent_completed', finalResponse === undefined ? {} : { final_response: finalResponse });
  }

  /** End with `agent_error`. */
  async fail(error) {
    const message = String(error?.message ?? error ?? 'failed');
    await this.#end('agent_error', { error: error?.name ?? 'Error', message });
  }

  /** End with `agent_cancelled`. */
  async cancel(reason = 'cancelled') {
    await this.#end('agent_cancelled', { reason: String(reason) });
  }

  async #end(event, data) {
    if (this.ended) return;
    let textError = null;
    try {
      await this.#text?.flush();
    } catch (e) {
      textError = e;
      if (event === 'agent_completed') [event, data] = ['agent_error', { error: e.name, message: e.message }];
    }
    this.ended = true;
    this.#herald.track(this.id, null);
    await this.#herald.publish({ ...this.#to(), event, runId: this.id, threadId: this.threadId, data });
    if (textError) throw textError;
  }

  /**
   * For `await using run = await herald.run(…)`: a run left without
   * `complete()` (a throw, an early return) ends `agent_error`, or
   * `agent_cancelled` if its signal aborted.
   */
  async [Symbol.asyncDispose]() {
    if (this.ended) return;
    if (this.signal.aborted) await this.cancel(this.signal.reason?.message ?? 'aborted');
    else await this.#end('agent_error', { error: 'NotCompleted', message: 'the run ended without complete()' });
  }
}

/**
 * A run's text over `POST /api/v1/runs/{run}/text`: one long request whose
 * body is written as deltas come; confirmed (the request ended and
 * answered) before the run's next event. On a failure, each part's
 * position is probed and only the rest is sent again.
 */
class TextStream {
  #herald;
  #run;
  #url;
  #next = new Map();
  /** Lines sent or being sent, not confirmed: {part, index, line}. */
  #pending = [];
  #controller = null;
  /** The requests carrying the pending lines, in order. */
  #requests = [];
  #sent = 0;
  #error = null;
  #encoder = new TextEncoder();

  constructor(herald, run) {
    this.#herald = herald;
    this.#run = run;
    this.#url = `/api/v1/runs/${segment(run.id)}/text?${ingestQuery(run)}`;
  }

  push(part, text) {
    if (this.#error) throw this.#error;
    const index = this.#next.get(part) ?? 0;
    this.#next.set(part, index + 1);
    const item = { part, index, line: `${JSON.stringify({ part, index, text })}\n` };
    this.#pending.push(item);
    if (!this.#controller || this.#sent >= MAX_REQUEST_LINES) this.#open([item]);
    else this.#write([item]);
  }

  /** Lines written in this turn of the event loop, sent together at its end. */
  #lines = [];

  #write(items) {
    this.#sent += items.length;
    for (const i of items) this.#lines.push(i.line);
    if (this.#lines.length === items.length) queueMicrotask(() => this.#drain());
  }

  /** Hand the lines written so far to the request's body, as one chunk. */
  #drain() {
    if (this.#lines.length === 0 || !this.#controller) return;
    this.#controller.enqueue(this.#encoder.encode(this.#lines.join('')));
    this.#lines = [];
  }

  /** Start a request carrying `items` first (and what comes next). */
  #open(items) {
    this.#drain();
    this.#controller?.close();
    let controller;
    const body = new ReadableStream({ start(c) { controller = c; } });
    this.#controller = controller;
    this.#sent = 0;
    this.#write(items);
    this.#requests.push(this.#herald.stream(this.#url, body).catch((e) => ({ status: 0, ok: false, answer: null, failure: e })));
  }

  /** End the request and wait until every delta is stored; throws a TextStreamError if it cannot be. */
  async flush() {
    if (this.#error) throw this.#error;
    if (!this.#controller) return;
    this.#drain();
    this.#controller.close();
    this.#controller = null;
    for (let failures = 0; ;) {
      const results = await Promise.all(this.#requests.splice(0));
      const failed = results.find((r) => !r.ok);
      if (!failed) {
        this.#pending = [];
        return;
      }
      failures += 1;
      if ((failed.status && !retryable(failed.status) && failed.status !== 408) || failures > RETRIES) {
        const a = failed.answer;
        this.#error = new TextStreamError(failed.status, a?.error ?? 'unavailable', a?.message ?? String(failed.failure ?? 'text stream failed'), this.#run.id, { body: a, expected: a?.expected });
        throw this.#error;
      }
      const after = failed.retryAfter;
      await sleep(backoff(failures, Number.isFinite(after) && after > 0 ? after : null));
      try {
        await this.#locate();
      } catch (e) {
        if (e instanceof TextStreamError) { this.#error = e; throw e; }
        // The probe failed too: count it and try again after the next wait.
        this.#requests.push(Promise.resolve({ status: 0, ok: false, answer: null, failure: e }));
        continue;
      }
      if (this.#pending.length === 0) return;
      this.#open(this.#pending);
      this.#drain();
      this.#controller.close();
      this.#controller = null;
    }
  }

  /** Ask where each unconfirmed part stands; drop the deltas Herald has. */
  async #locate() {
    for (const part of new Set(this.#pending.map((i) => i.part))) {
      const probe = this.#encoder.encode(`${JSON.stringify({ part, index: PROBE_INDEX, text: '' })}\n`);
      const r = await this.#herald.stream(this.#url, probe);
      if (r.status !== 409 || r.answer?.error !== 'delta_out_of_order') throw new Error(`probe answered ${r.status}`);
      const expected = r.answer.expected;
      const first = this.#pending.find((i) => i.part === part).index;
      if (expected < first) {
        throw new TextStreamError(409, 'delta_out_of_order', `Herald expects delta ${expected} of part ${part}, but deltas up to ${first - 1} were confirmed: the part was reset (its run closed?)`, this.#run.id, { expected });
      }
      this.#pending = this.#pending.filter((i) => i.part !== part || i.index >= expected);
    }
  }
}

/**
 * Send UI message chunks (a ReadableStream or async iterable) to the UI
 * chunk ingest as NDJSON, as they come; on a failure, send them all again
 * from the first (Herald stores nothing twice).
 */
async function pipeChunks(herald, run, chunks) {
  const url = `/api/v1/runs/${segment(run.id)}/ui?${ingestQuery(run)}`;
  const encoder = new TextEncoder();
  const seen = [];
  const source = chunks[Symbol.asyncIterator] ? chunks[Symbol.asyncIterator]() : chunks.getReader();
  // A read not taken yet (it lost the race against the end of a turn).
  let waiting = null;
  const nextChunk = () => {
    const read = waiting ?? (source.next ? source.next() : source.read()).then((r) => (r.done ? null : r.value));
    waiting = null;
    return read;
  };
  const TURN = Symbol('turn');
  /** The next chunk if the source has one at hand, else TURN (the read is kept for later). */
  const readyChunk = async () => {
    const read = nextChunk();
    const turn = new Promise((resolve) => setTimeout(resolve, 0, TURN));
    const first = await Promise.race([read, turn]);
    if (first === TURN) waiting = read;
    return first;
  };
  let ended = false;
  for (let attempt = 0; ; attempt++) {
    const replay = seen.slice();
    const body = new ReadableStream({
      async pull(controller) {
        if (replay.length) {
          controller.enqueue(encoder.encode(replay.splice(0).map((c) => `${JSON.stringify(c)}\n`).join('')));
          return;
        }
        if (ended) { controller.close(); return; }
        // The next chunk, and those the source has at hand in this turn of
        // the event loop: one write for a burst, one per chunk when they trickle.
        const batch = [];
        for (let chunk = await nextChunk(); ; chunk = await readyChunk()) {
          if (chunk === TURN) break;
          if (chunk === null) { ended = true; break; }
          seen.push(chunk);
          batch.push(`${JSON.stringify(chunk)}\n`);
          if (batch.length >= 256) break;
        }
        if (batch.length) controller.enqueue(encoder.encode(batch.join('')));
        if (ended) controller.close();
      },
    });
    let result;
    try {
      result = await herald.stream(url, body);
    } catch (e) {
      result = { status: 0, ok: false, answer: null, failure: e };
    }
    if (result.ok) return result.answer;
    if ((result.status && !retryable(result.status) && result.status !== 408) || attempt >= RETRIES) {
      const a = result.answer;
      throw new TextStreamError(result.status, a?.error ?? 'unavailable', a?.message ?? String(result.failure ?? 'ui stream failed'), run.id, { body: a });
    }
    // Read the rest of the source before resending, so the retry carries it all.
    while (!ended) {
      const chunk = await nextChunk();
      if (chunk === null) ended = true; else seen.push(chunk);
    }
    await sleep(backoff(attempt + 1, null));
  }
}

// ---- webhooks ----

const TIMESTAMP = 'x-herald-timestamp';
const DELIVERY = 'x-herald-delivery';
const SIGNATURE = 'x-herald-signature';

function header(headers, name) {
  if (headers == null) return undefined;
  if (typeof headers.get === 'function') return headers.get(name) ?? undefined;
  const entries = Array.isArray(headers) ? headers : Object.entries(headers);
  for (const [k, v] of entries) {
    if (String(k).toLowerCase() === name) return Array.isArray(v) ? v[0] : v == null ? undefined : String(v);
  }
  return undefined;
}

const toBytes = (v) => (typeof v === 'string' ? new TextEncoder().encode(v) : v instanceof Uint8Array ? v : v instanceof ArrayBuffer ? new Uint8Array(v) : null);

async function hmacSha256(secret, data) {
  const key = await globalThis.crypto.subtle.importKey('raw', toBytes(secret), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  return new Uint8Array(await globalThis.crypto.subtle.sign('HMAC', key, data));
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

/** Constant time for equal lengths. */
function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/**
 * The answer to a `subscribe_request` webhook (Herald's `subscribe_proxy`)
 * that grants the stream: read, or with `{ write: true }` read and write.
 * Send it as the response's JSON body.
 */
export const allowSubscribe = ({ write = false } = {}) => (write ? { allow: true, write: true } : { allow: true });

/** The answer to a `subscribe_request` that refuses the stream (the socket gets `forbidden`). */
export const denySubscribe = () => ({ allow: false });

const str = (payload, name, fallback) => {
  const v = payload[name] ?? fallback;
  if (typeof v !== 'string') throw new InvalidSignature(`signed body: \`${name}\` is missing or not a string`);
  return v;
};

/**
 * Check a webhook request (`X-Herald-Signature: v2=…` over
 * `<timestamp>.<delivery id>.<raw body>`, the timestamp within `tolerance`
 * seconds) and parse it: a `user_message`, `chat_request`, `cancel` or
 * `subscribe_request` event (camelCase fields, `deliveryId` to deduplicate
 * on; a `subscribe_request` is answered with `allowSubscribe()` or
 * `denySubscribe()` every time, retries included). Rejects with
 * InvalidSignature on any input that does not verify, malformed ones
 * included; a verified body of an unknown type rejects with TypeError.
 */
export async function verifyWebhook(secret, headers, rawBody, { tolerance = 300, now = Date.now() / 1000 } = {}) {
  const key = toBytes(secret);
  const body = toBytes(rawBody);
  if (!key || key.length === 0) throw new InvalidSignature('the secret must be a non-empty string or bytes');
  if (!body) throw new InvalidSignature('the body must be the raw bytes (a string, Uint8Array or ArrayBuffer)');
  const ts = header(headers, TIMESTAMP);
  if (typeof ts !== 'string' || !/^\d{1,15}$/.test(ts)) throw new InvalidSignature('missing or malformed X-Herald-Timestamp');
  if (Math.abs(now - Number(ts)) > tolerance) throw new InvalidSignature('timestamp outside the tolerance window');
  const delivery = header(headers, DELIVERY);
  if (typeof delivery !== 'string' || delivery === '') throw new InvalidSignature('missing X-Herald-Delivery');
  const signature = header(headers, SIGNATURE);
  if (typeof signature !== 'string' || !/^v2=[0-9a-fA-F]{64}$/.test(signature)) throw new InvalidSignature('missing or malformed X-Herald-Signature');
  const prefix = new TextEncoder().encode(`${ts}.${delivery}.`);
  const signed = new Uint8Array(prefix.length + body.length);
  signed.set(prefix);
  signed.set(body, prefix.length);
  const expected = new TextEncoder().encode(hex(await hmacSha256(key, signed)));
  if (!sameBytes(expected, new TextEncoder().encode(signature.slice(3).toLowerCase()))) throw new InvalidSignature('signature mismatch');
  let payload;
  try {
    payload = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body));
  } catch (e) {
    throw new InvalidSignature(`signed body is not JSON: ${e.message}`);
  }
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) throw new InvalidSignature('signed body is not a JSON object');
  const common = {
    userId: str(payload, 'user_id'),
    connId: str(payload, 'conn_id', ''),
    receivedAt: str(payload, 'received_at', ''),
    deliveryId: delivery,
  };
  // The shared stream a user_message was written to, or a cancelled run is
  // in; absent for the user's own stream.
  const stream = payload.stream ?? undefined;
  if (stream !== undefined && typeof stream !== 'string') throw new InvalidSignature('signed body: `stream` is not a string');
  const inStream = stream === undefined ? {} : { stream };
  switch (payload.type) {
    case 'user_message': {
      const data = payload.data ?? {};
      if (typeof data !== 'object' || Array.isArray(data)) throw new InvalidSignature('signed body: `data` is not an object');
      return { type: 'user_message', ...common, ...inStream, threadId: str(payload, 'thread_id'), messageId: str(payload, 'message_id'), text: str(payload, 'text'), data };
    }
    case 'chat_request': {
      const trigger = str(payload, 'trigger');
      if (trigger !== 'submit-message' && trigger !== 'regenerate-message') throw new InvalidSignature('signed body: `trigger` is not one of the AI SDK\'s');
      const messageId = payload.message_id ?? null;
      if (messageId !== null && typeof messageId !== 'string') throw new InvalidSignature('signed body: `message_id` is not a string');
      const messages = payload.messages;
      if (!Array.isArray(messages) || messages.some((m) => m === null || typeof m !== 'object' || Array.isArray(m))) throw new InvalidSignature('signed body: `messages` is not a list of objects');
      const extra = payload.body ?? {};
      if (typeof extra !== 'object' || Array.isArray(extra)) throw new InvalidSignature('signed body: `body` is not an object');
      const chatId = str(payload, 'chat_id');
      return {
        type: 'chat_request', ...common, chatId, threadId: chatId, runId: str(payload, 'run_id'), trigger, messageId, messages,
        body: extra, metadata: payload.metadata ?? null, text: lastUserText(messages),
      };
    }
    case 'cancel':
      return { type: 'cancel', ...common, ...inStream, runId: str(payload, 'run_id') };
    case 'subscribe_request':
      return { type: 'subscribe_request', ...common, stream: str(payload, 'stream') };
    default:
      throw new TypeError(`unknown webhook type ${JSON.stringify(payload.type)}`);
  }
}

/** The text of the last user message (its text parts joined). */
function lastUserText(messages) {
  const last = [...messages].reverse().find((m) => m.role === 'user');
  if (!last || !Array.isArray(last.parts)) return '';
  return last.parts.filter((p) => p?.type === 'text' && typeof p.text === 'string').map((p) => p.text).join('\n');
}

// ---- tokens ----

const b64url = (bytes) => {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replaceAll('+', '-').replaceAll('/', '_').replace(/=+$/, '');
};

/**
 * An HS256 client token for `userId`, valid `ttl` seconds (default an hour),
 * signed with Herald's `jwt_hs256_secret`: for development and tests (in
 * production the app's auth issues them). `streams` grants shared streams,
 * by name or prefix ending in `*`: `{ 'thread:t1': 'rw', 'room:*': 'r' }`.
 */
export async function mintToken(secret, userId, { ttl = 3600, now = Date.now() / 1000, streams } = {}) {
  const claims = { sub: userId, exp: Math.floor(now + ttl) };
  if (streams !== undefined) {
    for (const [name, grant] of Object.entries(streams)) {
      if (grant !== 'r' && grant !== 'rw') throw new TypeError(`streams[${JSON.stringify(name)}] is ${JSON.stringify(grant)}: a grant is 'r' or 'rw'`);
    }
    claims.streams = { ...streams };
  }
  const enc = new TextEncoder();
  const head = b64url(enc.encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' })));
  const body = b64url(enc.encode(JSON.stringify(claims)));
  const sig = b64url(await hmacSha256(secret, enc.encode(`${head}.${body}`)));
  return `${head}.${body}.${sig}`;
}
