// Types of herald-gateway/server (server.js): Herald for agent backends.

/** An error the HTTP API answered. */
export declare class HeraldError extends Error {
  readonly status: number;
  /** Herald's error code, e.g. `invalid_field`, `broker_unavailable`. */
  readonly code: string;
  /** The field a refusal names, e.g. `events[3].user_id`. */
  readonly field?: string;
  /** For `delta_out_of_order`: the part's next index. */
  readonly expected?: number;
  /** The answer's JSON, as sent. */
  readonly body?: unknown;
}

/** A run's text (or UI chunks) could not be delivered; the run ended with `agent_error`. */
export declare class TextStreamError extends HeraldError {
  readonly runId: string;
}

/** A webhook request that does not verify (any malformed input included). */
export declare class InvalidSignature extends Error {}

/**
 * Where an event goes: a user's own stream (`userId`) or a shared stream
 * (`stream`, e.g. `thread:t1`) — exactly one of the two.
 */
export type PublishTarget =
  | { userId: string; stream?: undefined }
  | { /** A shared stream's name, `<namespace>:<name>`, e.g. `thread:t1`. */ stream: string; userId?: undefined };

/** An event to publish: its fields, and its target (`userId` or `stream`). */
export type EventIn = EventFields & PublishTarget;

/** An event's fields, besides where it goes. */
export interface EventFields {
  /** 1–64 of `[A-Za-z0-9_.:-]`, e.g. `agent_thinking`. */
  event: string;
  runId?: string;
  threadId?: string;
  /** An object, serialized ≤ 64 KiB. */
  data?: Record<string, unknown>;
  /** The same key within 10 minutes is stored once; a random one when omitted. */
  idempotencyKey?: string;
}

/** Where a published event went. */
export interface Published {
  seq: number;
  epoch: string;
  delivered: number;
  duplicate?: boolean;
}

/** One row of `connections()`. */
export interface ConnectionInfo {
  conn_id: string;
  node: string;
  user_id: string | null;
  state: string;
  age_ms: number;
  queue_depth: number;
  queued_bytes: number;
  acked_seq: number;
}

/** One user of `presence()`: how many of their connections read the stream. */
export interface PresenceUser {
  user_id: string;
  connections: number;
}

/** Who is in a shared stream (`presence()`). */
export interface StreamPresence {
  stream: string;
  /** Sorted by id; at most `limit` (default and cap: the server's `presence_max_listed`, 100). */
  users: PresenceUser[];
  /** Every user in the stream, listed or not. */
  total_users: number;
  /** Every connection reading the stream. */
  total_connections: number;
}

export interface CallOptions {
  signal?: AbortSignal;
}

/** A `user_message` webhook. */
export interface UserMessage {
  type: 'user_message';
  /** The sender. */
  userId: string;
  /**
   * The shared stream it was written to (e.g. `thread:t1`): every member
   * saw the question there, and `herald.run(message)` answers there.
   * Absent for a message to the sender's own stream.
   */
  stream?: string;
  threadId: string;
  messageId: string;
  text: string;
  data: Record<string, unknown>;
  connId: string;
  receivedAt: string;
  /** The same on every retry of one request: deduplicate on it. */
  deliveryId: string;
}

/** A `chat_request` webhook: an AI SDK chat turn; Herald opened run `runId`. */
export interface ChatRequest {
  type: 'chat_request';
  userId: string;
  chatId: string;
  /** The chat id (the run's thread). */
  threadId: string;
  runId: string;
  trigger: 'submit-message' | 'regenerate-message';
  messageId: string | null;
  /** The chat's UI messages, as the client sent them. */
  messages: Array<Record<string, unknown>>;
  body: Record<string, unknown>;
  metadata: unknown;
  /** The last user message's text parts, joined. */
  text: string;
  connId: string;
  receivedAt: string;
  deliveryId: string;
}

/** A `cancel` webhook: the user stopped run `runId`. */
export interface Cancel {
  type: 'cancel';
  /** Who stopped it: the run's user, or for a shared stream's run any member who may write to it. */
  userId: string;
  /** The shared stream the run is in; absent for the user's own stream. */
  stream?: string;
  runId: string;
  connId: string;
  receivedAt: string;
  deliveryId: string;
}

/**
 * A `subscribe_request` webhook (Herald's `subscribe_proxy`): a socket asked
 * for a shared stream its token does not grant. Answer it in the response
 * body with `allowSubscribe()` or `denySubscribe()` — every time, retries
 * included.
 */
export interface SubscribeRequest {
  type: 'subscribe_request';
  userId: string;
  /** The shared stream asked for, e.g. `thread:t1`. */
  stream: string;
  connId: string;
  receivedAt: string;
  deliveryId: string;
}

/** The answer to a `subscribe_request`. */
export interface SubscribeAnswer {
  allow: boolean;
  write?: true;
}

export type WebhookEvent = UserMessage | ChatRequest | Cancel | SubscribeRequest;

/** A run in a shared stream that answers no message: `herald.run({ stream: 'thread:t1' })`. */
export interface StreamTarget {
  stream: string;
}

/** Whom a run answers: a user id, a shared stream, or the webhook event it answers. */
export type RunTarget = string | StreamTarget | UserMessage | ChatRequest;

export interface RunOptions {
  /** The run's thread (a chat); taken from the event when answering one. */
  threadId?: string;
  /** Your own run id (a random one otherwise). */
  runId?: string;
  /** Whether the run is open already (no `agent_started` is published). */
  started?: boolean;
  /** Aborting it stops the run (`agent_cancelled` in the callback form). */
  signal?: AbortSignal;
}

/** A tool call in progress. */
export interface ToolCall {
  readonly id: string;
  readonly name: string;
  /** `tool_completed` with `output`. */
  done(output: unknown): Promise<void>;
  /** `tool_completed` with `error`. */
  fail(error: unknown): Promise<void>;
}

/** Anything a UI message stream can be read from. */
export type ChunkSource = ReadableStream<unknown> | AsyncIterable<unknown>;

/**
 * One agent run: opened with `agent_started` (unless Herald opened it; with
 * `{ message_id }` when it answers a `user_message`), ended with exactly one
 * of `agent_completed`, `agent_error`, `agent_cancelled`.
 */
export declare class Run implements AsyncDisposable {
  readonly id: string;
  /** The user the run answers (a shared stream's message: its sender); `undefined` for `run({ stream })`. */
  readonly userId: string | undefined;
  /** The shared stream the run publishes to (and streams its text into); `undefined`: the user's own. */
  readonly stream: string | undefined;
  readonly threadId: string | undefined;
  /**
   * The id of the `user_message` the run answers (`herald.run(message)`),
   * sent as `message_id` in its `agent_started` so Herald keeps the question
   * with the run; `undefined` otherwise.
   */
  readonly messageId: string | undefined;
  /** True once the run's closing event was published (or a piped stream ended it). */
  readonly ended: boolean;
  /** Aborted when the user stops the run (`herald.cancelled(event)`) or your signal aborts: pass it to `streamText`. */
  readonly signal: AbortSignal;
  thinking(text: string): Promise<void>;
  tool(name: string, input?: unknown, options?: { callId?: string }): Promise<ToolCall>;
  /** Append to a part of the answer (default `answer`); throws the TextStreamError of text that could not be delivered. */
  text(delta: string, options?: { part?: string }): void;
  /** Wait until every delta so far is stored. */
  flush(): Promise<void>;
  /** Stream the AI SDK's UI message chunks (`toUIMessageStream()`) into the run; they end it. Resolves the ingest's answer. */
  pipe(chunks: ChunkSource): Promise<Record<string, unknown>>;
  complete(finalResponse?: unknown): Promise<void>;
  fail(error: unknown): Promise<void>;
  cancel(reason?: string): Promise<void>;
  /** A run left without `complete()` ends `agent_error` (or `agent_cancelled` if its signal aborted). */
  [Symbol.asyncDispose](): Promise<void>;
}

/** The client of Herald's HTTP API. */
export declare class Herald {
  constructor(options: { url: string; apiKey: string; fetch?: typeof fetch; timeoutMs?: number });
  /** One API request, retried on connection errors, timeouts, 5xx and 429; other answers throw HeraldError. */
  request(method: string, path: string, options?: { body?: unknown; signal?: AbortSignal; retries?: number }): Promise<any>;
  publish(event: EventIn, options?: CallOptions): Promise<Published>;
  publishMany(events: EventIn[], options?: CallOptions): Promise<Published[]>;
  /**
   * End every subscription of `userId` to the shared `stream`, on every
   * node (each socket is told `unsubscribed`, reason `removed`); resolves
   * how many. What the user's token grants is unchanged.
   */
  unsubscribe(stream: string, userId: string, options?: CallOptions): Promise<number>;
  /**
   * Who is in the shared `stream` (its subscribers on every node, with
   * their connection counts): `users` sorted by id, at most `limit`; the
   * totals count everyone. A name Herald refuses is a `HeraldError` with
   * `field` `stream`.
   */
  presence(stream: string, filter?: { limit?: number }, options?: CallOptions): Promise<StreamPresence>;
  disconnect(userId: string, options?: CallOptions): Promise<number>;
  connections(filter?: { userId?: string; limit?: number }, options?: CallOptions): Promise<{ connections: ConnectionInfo[]; total: number; truncated: boolean }>;
  /**
   * The started run, for `await using`. A run of a `UserMessage` opens with
   * `agent_started` `{ message_id: messageId }` (in its `stream`, when it
   * was written to a shared one); a `ChatRequest`'s is Herald's run (no
   * second `agent_started`); `{ stream }` runs in a shared stream.
   */
  run(to: RunTarget, options?: RunOptions): Promise<Run>;
  /** The callback form: the run ends with the callback (completed, error, cancelled); resolves its value. */
  run<T>(to: RunTarget, options: RunOptions, body: (run: Run) => Promise<T>): Promise<T>;
  run<T>(to: RunTarget, body: (run: Run) => Promise<T>): Promise<T>;
  /** A `cancel` webhook arrived: abort the run it names, if this process runs it. */
  cancelled(event: Cancel | string): boolean;
}

/** Check a webhook request's signature and parse it; rejects with InvalidSignature on any input that does not verify. */
export declare function verifyWebhook(
  secret: string | Uint8Array,
  headers: Headers | Record<string, string | string[] | undefined> | Array<[string, string]>,
  rawBody: string | Uint8Array | ArrayBuffer,
  options?: { tolerance?: number; now?: number },
): Promise<WebhookEvent>;

/** Grant a `subscribe_request`'s stream: read (`{ allow: true }`), or with `write` read and write. */
export declare function allowSubscribe(options?: { write?: boolean }): SubscribeAnswer;

/** Refuse a `subscribe_request`'s stream (`{ allow: false }`): the socket gets `forbidden`. */
export declare function denySubscribe(): SubscribeAnswer;

/** A `streams` claim: a stream's name, or a prefix ending in `*`, to read (`r`) or read and write (`rw`). */
export type StreamGrants = Record<string, 'r' | 'rw'>;

/** An HS256 client token for development and tests; `streams` grants shared streams. */
export declare function mintToken(
  secret: string,
  userId: string,
  options?: { ttl?: number; now?: number; streams?: StreamGrants },
): Promise<string>;
