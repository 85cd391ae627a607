// Types for herald.js (Herald protocol v1 browser client).

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/**
 * The client's clock: the time token expiries are compared with, and the
 * timers of every delay (reconnect backoff, token refresh, liveness, ack
 * timeouts). Its methods are called on the object, so wrap the globals:
 * `{ now: () => Date.now() + skewMs, setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) }`.
 */
export interface HeraldClock {
  /** Milliseconds since the epoch (as `Date.now()`). */
  now(): number;
  /** Run `fn` once after `ms` milliseconds; returns a handle for `clearTimeout`. */
  setTimeout(fn: () => void, ms: number): unknown;
  /** Cancel a timer; called with handles this clock returned, or `null`. */
  clearTimeout(handle: unknown): void;
}

export interface HeraldOptions {
  /** WebSocket URL, e.g. `wss://chat.example.com/ws`. */
  url: string;
  /**
   * A JWT. Either this or `getToken`. With only a token, a kick (close
   * 4409, `POST /api/v1/disconnect`) stops the client: `close` with code
   * 4409, `error` with code `kicked`, state `closed`.
   */
  token?: string;
  /**
   * Fetches a token, at connect and before the current one expires (the
   * client sends `refresh`, so the connection never ends for expiry), and
   * after a 4401/4403/4409 close. Resolve `null` to stop: the client closes
   * and emits `error` with code `unauthorized`. A rejection is retried.
   * After a kick (4409) the client reconnects only with a token different
   * from the kicked one; the same token stops it (`error` `kicked`).
   */
  getToken?: () => Promise<string | null>;
  /** Replay the events of open agent runs on a fresh connection (default true). */
  replayActiveRuns?: boolean;
  /** Persist the resume position (epoch, seq) under this key (sessionStorage by default). */
  storageKey?: string;
  /** Storage for the resume position (defaults to sessionStorage when `storageKey` is set). */
  storage?: { getItem(k: string): string | null; setItem(k: string, v: string): void };
  /** WebSocket constructor (defaults to the global one). */
  WebSocket?: typeof WebSocket;
  /** How long `sendMessage` waits for an ack (default 15000). */
  ackTimeoutMs?: number;
  /**
   * With nothing received for this long, send an app-level `ping` (browsers
   * cannot see WebSocket pings); default 20000, below the server's
   * heartbeat. 0 turns liveness checks off.
   */
  livenessMs?: number;
  /** No frame this long after that ping: the socket is dead; reconnect with resume (default 5000). */
  pongTimeoutMs?: number;
  /**
   * Source of `online`/`offline` events (default: the global object when it
   * has `addEventListener`, i.e. the window). Reconnects at once on
   * `online`; makes no attempt while offline. `null` turns this off.
   */
  network?: EventTarget | null;
  /** First reconnect backoff cap in ms (default 500); doubles per attempt. */
  backoffBaseMs?: number;
  /** Largest reconnect backoff in ms (default 15000). */
  backoffMaxMs?: number;
  /**
   * With `getToken`: how long before the current token's `exp` a new one is
   * fetched and sent as `refresh`, in ms — at most half the token's
   * remaining lifetime. Default: a fifth of the remaining lifetime, between
   * 1 s and 60 s.
   */
  refreshMarginMs?: number;
  /**
   * The clock and timers the client uses (default: `Date.now` and the
   * global timers). An app whose device clock may be off can pass a `now`
   * corrected by the server's time (a token's `exp` is the server's time);
   * tests pass a fake clock and step it.
   */
  clock?: HeraldClock;
}

/** An event frame; `D` is the shape of its `data`. */
export interface HeraldEvent<D = Record<string, unknown>> {
  type: 'event';
  seq: number;
  /** The shared stream the event belongs to (`thread:t1`); absent on the user's own stream's events. */
  stream?: string;
  event: string;
  thread_id?: string;
  run_id?: string;
  data: D;
  ts: string;
  /** Present on events replayed from history (missed, or an open run's), not on live ones. */
  replayed?: true;
  /** A frame covering several text deltas of one part (from history, or joined live for a socket that fell behind): its first seq (`seq` is the last). */
  from_seq?: number;
}

/** A run's text part grew (`on('text', …)`). */
export interface TextUpdate {
  runId: string;
  part: string;
  /** The part's text so far. */
  text: string;
  /** What this frame appended (several deltas' text when it came from history). */
  delta: string;
  seq: number;
  replayed: boolean;
}

/**
 * The `data` of a `user_message` event: a chat message Herald accepted (the
 * frame `sendMessage` sent, with its sender).
 */
export interface UserMessageData {
  /** The message id: `sendMessage`'s (its ack's `id`). */
  id: string;
  text: string;
  /** The message's `data` object, as sent (`{}` when none). */
  data: Record<string, unknown>;
  /** The sender (the token's `sub`). */
  user_id: string;
}

/**
 * A chat message Herald accepted: published in the sender's stream (in its
 * thread, with no `run_id`) once per message id, before it is forwarded to
 * the agent, so every tab (the sender's included) sees the question before
 * the answer. A run answering it names it in `agent_started.data.message_id`;
 * a page opened mid-run is replayed this event first, then the run.
 */
export type UserMessageEvent = HeraldEvent<UserMessageData> & { event: 'user_message'; thread_id: string };

/**
 * The events of docs/PROTOCOL.md, by name: the default event map — the
 * accepted `user_message`s and the agent events.
 */
export interface AgentEvents {
  /** A message Herald accepted (see `UserMessageEvent`). */
  user_message: UserMessageEvent;
  /** A run opened; `message_id` names the `user_message` it answers. */
  agent_started: HeraldEvent<{ message_id?: string; agent?: string; [k: string]: unknown }>;
  agent_thinking: HeraldEvent<{ text?: string; [k: string]: unknown }>;
  tool_executing: HeraldEvent<{ tool: string; tool_call_id?: string; input?: unknown; [k: string]: unknown }>;
  tool_completed: HeraldEvent<{
    tool: string;
    tool_call_id?: string;
    output?: unknown;
    error?: { type: string; message: string };
    [k: string]: unknown;
  }>;
  /** Text appended to part `part` of the run (docs/PROTOCOL.md, "Answer text"). */
  agent_text_delta: HeraldEvent<{ part: string; text: string }>;
  agent_completed: HeraldEvent<{ final_response?: unknown; [k: string]: unknown }>;
  agent_error: HeraldEvent<{ error?: string; message?: string; reason?: string; [k: string]: unknown }>;
  agent_cancelled: HeraldEvent<{ reason?: string; [k: string]: unknown }>;
}

export interface Welcome {
  type: 'welcome';
  conn_id: string;
  user_id: string;
  epoch: string;
  seq: number;
  resumed: boolean;
  reset?: boolean;
  heartbeat_ms: number;
  /** Replayed events follow; `caught_up` marks their end. */
  replaying?: boolean;
}

export interface HeraldError {
  /**
   * `unauthorized`, `token_expired`, `kicked` (closed with 4409; the client
   * stopped), `protocol`, `token_unavailable`, `connect_failed`, or the
   * code of a server `error` frame.
   */
  code: string;
  message?: string;
}

/** Options of `sendMessage`. */
export interface SendOptions {
  /** The message id (generated when absent); the same id is forwarded once. */
  id?: string;
  /** Write to this shared stream (needs a subscription with `write`). */
  stream?: string;
}

/** Options of `subscribe`. */
export interface SubscribeOptions {
  /**
   * On the first subscribe of this subscription (a fresh or reloaded page),
   * replay the stream's open agent runs (default false). Reconnects never ask.
   */
  replayActiveRuns?: boolean;
}

export type SubscriptionState = 'subscribing' | 'subscribed' | 'failed' | 'unsubscribed';

/** A shared stream's `subscribed` frame (after every subscribe, reconnects included). */
export interface Subscribed {
  type: 'subscribed';
  stream: string;
  epoch: string;
  /** The stream's latest seq. */
  seq: number;
  /** The resume position was honoured: the missed events follow. */
  resumed: boolean;
  /** The resume position could not be honoured: live from `seq` on. */
  reset?: boolean;
  /** Replayed events follow; `caught_up` marks their end. */
  replaying?: boolean;
  /** The user may write to the stream (`sendMessage(…, { stream })`). */
  write: boolean;
}

/**
 * A refusal of a subscribe: `forbidden` (not granted, or no such stream),
 * `too_many_streams`, `invalid_field` (a bad name: refused by the client
 * without asking) — the subscription is then `failed` and not retried —
 * or `broker_unavailable`, retried with the client's backoff.
 */
export interface StreamError {
  type: 'error';
  code: 'forbidden' | 'too_many_streams' | 'invalid_field' | 'broker_unavailable' | (string & {});
  message?: string;
  stream: string;
}

export interface Unsubscribed {
  type: 'unsubscribed';
  stream: string;
  reason: string;
}

/** One user in a shared stream, with how many connections of theirs read it (fleet-wide). */
export interface PresenceUser {
  user_id: string;
  connections: number;
}

/** The answer to `sub.presence()`: who is in the stream. */
export interface Presence {
  type: 'presence';
  stream: string;
  /** Sorted by id; at most `presence_max_listed` (100) are listed. */
  users: PresenceUser[];
  /** Every user in the stream, listed or not. */
  total_users: number;
  /** Every connection reading the stream. */
  total_connections: number;
}

/**
 * A user's first connection to the stream joined (`presence_join`; the
 * user's own connections are told too) or its last one left
 * (`presence_leave`; also when its node died). Not stored, no seq.
 */
export interface PresenceNotice {
  type: 'presence_join' | 'presence_leave';
  stream: string;
  user_id: string;
}

/** Another user of the stream is typing (show it for a few seconds after the last one). */
export interface TypingNotice {
  type: 'typing';
  stream: string;
  user_id: string;
}

/** An entry of `sub.members`. */
export interface Member {
  /** The user's connections to the stream at the last `presence()` answer (1 for a user who joined since). */
  connections: number;
}

/**
 * The rejection of `sub.presence()`: an `Error` with the fields of an
 * `error` frame. `code` is the server's refusal (`broker_unavailable`),
 * `closed` (the connection or the client closed before the answer),
 * `not_subscribed` (the subscription is not live, or ended), or the
 * subscribe's refusal (`forbidden`, …) when it failed meanwhile.
 */
export interface StreamRequestError extends Error {
  type: 'error';
  code: 'broker_unavailable' | 'closed' | 'not_subscribed' | 'forbidden' | 'too_many_streams' | (string & {});
  stream: string;
}

/**
 * A shared stream read through a client (`client.subscribe(stream)`), with
 * its own resume position (persisted under `${storageKey}:stream:${stream}`
 * when the client has a `storageKey`), handlers and text parts.
 */
export class Subscription<Events extends { [K in keyof Events]: HeraldEvent<any> } = AgentEvents> {
  private constructor();
  readonly client: HeraldClient<Events>;
  readonly stream: string;
  /** The stream's epoch and the highest seq processed; null before the first `subscribed` (unless stored). */
  readonly position: { epoch: string; seq: number } | null;
  /** The user may write to the stream, once subscribed. */
  readonly write: boolean;
  readonly state: SubscriptionState;
  /**
   * Who is in the stream, live: user id → `{connections}`, from the last
   * `presence()` answer plus the joins and leaves since. Complete only once
   * an answer came: the subscription asks `presence()` itself after every
   * `subscribed`, so it is complete from that answer on — up to the 100
   * users an answer lists. Empty before.
   * The same `Map` throughout (emptied when the subscription fails or ends).
   */
  readonly members: ReadonlyMap<string, Member>;
  /** After every (re)subscribe; `reset` comes first when the resume position was lost. */
  on(name: 'subscribed' | 'reset', handler: (f: Subscribed) => void): () => void;
  /** After each subscribe, once replayed events (if any) are all delivered. */
  on(name: 'caught_up', handler: (c: { seq: number; stream: string }) => void): () => void;
  /** A refusal of the subscribe (then `failed`), or of a `typing()` without write permission (`forbidden`; still subscribed). */
  on(name: 'error', handler: (e: StreamError) => void): () => void;
  on(name: 'unsubscribed', handler: (u: Unsubscribed) => void): () => void;
  /** A user's first connection joined the stream / its last one left; `members` is updated first. */
  on(name: 'presence_join' | 'presence_leave', handler: (f: PresenceNotice) => void): () => void;
  /** `members` changed (an answer, a join, a leave, the end of the subscription). */
  on(name: 'members', handler: (members: ReadonlyMap<string, Member>) => void): () => void;
  /** Another user is typing (never this user's own connections). */
  on(name: 'typing', handler: (f: TypingNotice) => void): () => void;
  /** A run's text part grew, in this stream. */
  on(name: 'text', handler: (t: TextUpdate) => void): () => void;
  /** Every event of the stream. */
  on(name: 'event', handler: (e: (Events[keyof Events] | HeraldEvent) & { stream: string }) => void): () => void;
  /** Events of the stream by name, typed by the event map. */
  on<K extends keyof Events & string>(name: K, handler: (e: Events[K] & { stream: string }) => void): () => void;
  /** The text of an open run's part in this stream so far (`''` when none). */
  text(runId: string, part?: string): string;
  /**
   * Who is in the stream (and `members` updated from it). Sent at once when
   * subscribed, else after the next `subscribed`; several in flight are
   * answered in order. Rejects with a `StreamRequestError`.
   */
  presence(): Promise<Presence>;
  /**
   * Tell the other users this user is typing; at most one frame a second
   * (the server relays no more). Returns whether a frame was sent (false when
   * not subscribed on an open connection, or throttled). Without write
   * permission the server answers `error` `forbidden` on the subscription.
   */
  typing(): boolean;
  /** Stop reading the stream (`unsubscribed` follows); it is never resubscribed. */
  unsubscribe(): void;
}

/** A send rejected because `close()` was called before its ack came. */
export class HeraldClosedError extends Error {
  readonly code: 'closed';
  /** The message id. */
  readonly id: string;
}

/**
 * The client. `Events` maps event names to their frames: the agent events by
 * default; extend it with your own (`HeraldClient<AgentEvents & MyEvents>`).
 */
export class HeraldClient<Events extends { [K in keyof Events]: HeraldEvent<any> } = AgentEvents> {
  constructor(options: HeraldOptions);
  readonly state: ConnectionState;
  /** Resume position: the stream epoch and the highest seq seen. */
  position: { epoch: string | null; seq: number };
  connId: string | null;
  userId: string | null;
  on(name: 'state', handler: (s: ConnectionState) => void): () => void;
  on(name: 'welcome' | 'reset', handler: (w: Welcome) => void): () => void;
  /** After each welcome, once replayed events (if any) are all delivered. */
  on(name: 'caught_up', handler: (c: { seq: number }) => void): () => void;
  on(name: 'closing', handler: (f: { reason: string; reconnect_after_ms: number }) => void): () => void;
  on(name: 'close', handler: (c: { code: number; reason: string }) => void): () => void;
  on(name: 'error', handler: (e: HeraldError) => void): () => void;
  /** A run's text part grew: its text so far, assembled across reconnects and reloads. */
  on(name: 'text', handler: (t: TextUpdate) => void): () => void;
  /** Every event, whatever its name. */
  on(name: 'event', handler: (e: Events[keyof Events] | HeraldEvent) => void): () => void;
  /** Events by name, typed by the event map. */
  on<K extends keyof Events & string>(name: K, handler: (e: Events[K]) => void): () => void;
  /**
   * Open the connection. Idempotent: at most one socket per client, whatever
   * the timing — also when called from the client's own `close`, `error` or
   * `state` handlers. While connected, connecting or reconnecting (the
   * backoff wait, a close being handled) it does nothing; after a stop it
   * starts the client again.
   */
  connect(): void;
  /**
   * Close for good; pending sends are rejected with `HeraldClosedError`.
   * The client also stops by itself (state `closed`, after an `error`) on a
   * kick it may not reconnect from, on 4401/4403 without `getToken` and on
   * a protocol error; `connect()` starts it again.
   */
  close(): void;
  /**
   * Send a chat message; resolves on ack, rejects on nack, timeout (counted
   * only while on an open socket) or `close()`. Pass `options.id` to retry a
   * message with the same id: the server forwards an id once. With
   * `options.stream` the message goes to that shared stream (every member
   * sees it, and the agent answers there): it needs a subscription with
   * `write` — else a nack with code `forbidden`.
   */
  sendMessage(
    threadId: string,
    text: string,
    data?: Record<string, unknown>,
    options?: SendOptions,
  ): Promise<{ id: string }>;
  /**
   * Read a shared stream (`thread:t1`) the token's `streams` claim grants.
   * Its events go to the returned subscription's handlers, never to the
   * client's. Subscribed now when connected, else after the next welcome,
   * and again after every reconnect from the position reached (each event
   * once, in seq order, or `reset`). While a subscription of the stream is
   * live (`subscribing` / `subscribed`), the same one is returned; after it
   * failed or was unsubscribed, a new one.
   */
  subscribe(stream: string, options?: SubscribeOptions): Subscription<Events>;
  /**
   * Ask the agent to stop a run; queued while disconnected, resolves once
   * sent. With `stream`, a run of that shared stream (write permission).
   */
  cancel(runId: string, options?: { stream?: string }): Promise<void>;
  /** The text of an open run's part so far (`''` when none). */
  text(runId: string, part?: string): string;
}
