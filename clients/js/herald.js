// Herald browser client: protocol v1 over WebSocket, with resume, automatic
// reconnect (exponential backoff with jitter, honouring close codes), acked
// messages, cancel and shared streams (`subscribe`, with presence and
// typing). Dependency-free ES module; types in herald.d.ts.

/** Close codes after which reconnecting with the same token is pointless. */
const AUTH_CODES = new Set([4401, 4403]);
/** Close codes that mean "the client is broken"; reconnecting would loop. */
const FATAL_CODES = new Set([1002, 1003, 1007, 1009, 4000]);
/**
 * A kick (`POST /api/v1/disconnect`): the server wants this user off. The
 * client never reconnects with the token it was kicked with; only a
 * different token from `getToken` reconnects.
 */
const KICKED = 4409;
/** Refusals of a `subscribe` that the same token would get again: not retried. */
const FINAL_REFUSALS = new Set(['forbidden', 'too_many_streams', 'invalid_field']);
/** `Subscription.typing()` sends at most one `typing` per this (the server relays one a second). */
const TYPING_EVERY_MS = 1000;

/** The clock of a client without a `clock` option: `Date` and the global timers. */
const SYSTEM_CLOCK = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
};

/**
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} ConnectionState
 */

export class HeraldClient {
  /**
   * @param {import('./herald').HeraldOptions} options
   */
  constructor(options) {
    if (!options || !options.url) throw new Error('HeraldClient: `url` is required');
    if (!options.token && !options.getToken) throw new Error('HeraldClient: `token` or `getToken` is required');
    this.url = options.url;
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._replayActiveRuns = options.replayActiveRuns !== false;
    this._storageKey = options.storageKey || null;
    this._storage = options.storage || (this._storageKey && globalThis.sessionStorage) || null;
    this._ackTimeoutMs = options.ackTimeoutMs ?? 15000;
    this._backoff = { baseMs: options.backoffBaseMs ?? 500, maxMs: options.backoffMaxMs ?? 15000 };
    /** Every timer of the client, and the time token expiries are compared with. */
    this._clock = options.clock || SYSTEM_CLOCK;
    /** How long before a token's `exp` it is refreshed (null: a fifth of its remaining lifetime, 1–60 s). */
    this._refreshMarginMs = options.refreshMarginMs ?? null;
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {Map<string, {frame: object, resolve: Function, reject: Function, timer: any, promise: Promise<{id: string}>}>} */
    this._pending = new Map();
    /** @type {Map<string, {resolve: Function, reject: Function, promise: Promise<void>}>} */
    this._cancels = new Map();
    this._ws = null;
    this._state = /** @type {ConnectionState} */ ('idle');
    this._attempt = 0;
    this._retryTimer = null;
    this._nextDelayMs = null;
    this._stopped = false;
    /** A welcome was received (later hellos do not ask for run replay). */
    this._welcomed = false;
    /** Bumped by `close()`: opens of an older generation give up. */
    this._generation = 0;
    /** An open is in progress (fetching a token, before the socket exists). */
    this._opening = false;
    /** The generation whose socket close is being handled (`close` handlers run). */
    this._closingGeneration = -1;
    /** When the current token is refreshed (with `getToken`). */
    this._refreshTimer = null;
    /** The token of a kicked connection (4409): `getToken` must return another one. */
    this._kickedToken = null;
    this._livenessMs = options.livenessMs ?? 20000;
    this._pongTimeoutMs = options.pongTimeoutMs ?? 5000;
    this._livenessTimer = null;
    /** Where `online`/`offline` events come from (the window in a browser). */
    this._network = options.network !== undefined
      ? options.network
      : (typeof globalThis.addEventListener === 'function' ? globalThis : null);
    this._offline = false;
    this._onOnline = () => this._networkChanged(true);
    this._onOffline = () => this._networkChanged(false);
    this.position = this._load() || { epoch: null, seq: 0 };
    /** Text parts of open runs, assembled from `agent_text_delta`: "run\u0000part" → text. */
    this._texts = new Map();
    /** Shared-stream subscriptions by stream name (live, failed or unsubscribed). */
    this._subs = new Map();
    /** Subscriptions whose `unsubscribe` is on the wire, awaiting `unsubscribed`: stream → Subscription. */
    this._leaving = new Map();
    /** Positions of shared streams read by this client, when there is no storage: stream → {epoch, seq}. */
    this._streamPositions = new Map();
    this.connId = null;
    this.userId = null;
  }

  /** Current connection state. */
  get state() { return this._state; }

  /**
   * Subscribe. Names: any event name (`user_message` — a message Herald
   * accepted, the sender's own included —, `agent_started`,
   * `agent_thinking`, …), `event` (every event), `text` (a run's text part grew: `{runId, part, text, delta, seq,
   * replayed}`, `text` being the part so far), `state`, `welcome`, `reset`,
   * `caught_up` (after each welcome, once the replay is over), `closing`,
   * `error`, `close`.
   * @returns {() => void} unsubscribe
   */
  on(name, handler) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(handler);
    return () => this._handlers.get(name)?.delete(handler);
  }

  /**
   * Open the connection (idempotent): whatever the order and timing of
   * `connect()`, `close()`, token fetches and the client's own events (a
   * `connect()` from a `close`, `error` or `state` handler included), a
   * client holds at most one socket. While the client is connected,
   * connecting or reconnecting (a backoff wait, or a `close` being handled)
   * it does nothing: the reconnect keeps its backoff and its token rules.
   */
  connect() {
    // Starting again after a stop (a kick included) is the app's decision;
    // a connect() while still reconnecting keeps the kick in force.
    if (this._stopped) this._kickedToken = null;
    this._stopped = false;
    if (this._network && !this._listening) {
      this._network.addEventListener('online', this._onOnline);
      this._network.addEventListener('offline', this._onOffline);
      this._listening = true;
    }
    if (this._ws || this._retryTimer || this._opening) return;
    // A close being handled decides itself between a retry and a stop.
    if (this._closingGeneration === this._generation) return;
    this._open();
  }

  /**
   * Close for good (no reconnect). Sends still waiting for their ack are
   * rejected with a `HeraldClosedError` (code `closed`).
   */
  close() {
    this._halt(true);
    this._setState('closed');
  }

  /**
   * Send a chat message; resolves with the ack, rejects on nack or timeout.
   * `options.id` sets the message id (the server forwards an id once, so a
   * retry after a timeout or a nack with the same id cannot reach the agent
   * twice); one is generated when absent. Unacked messages are re-sent with
   * the same id after a reconnect. The ack timeout counts only while the
   * message is actually on an open socket.
   * @returns {Promise<{id: string}>}
   */
  sendMessage(threadId, text, data = {}, options = {}) {
    const id = options.id ?? newId();
    const existing = this._pending.get(id);
    if (existing) return existing.promise;
    const frame = { type: 'user_message', id, thread_id: threadId, text, data };
    if (options.stream != null) frame.stream = options.stream;
    const entry = { frame, resolve: null, reject: null, timer: null, promise: null };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this._pending.set(id, entry);
    this._transmit(id, entry);
    return entry.promise;
  }

  /**
   * Ask the agent to stop a run. Sent at once when connected, else queued
   * and sent after the next welcome; resolves once written to the socket,
   * rejects with `HeraldClosedError` if `close()` comes first. With
   * `{stream}`, a run of that shared stream (a write subscription needed).
   * @param {string} runId
   * @param {{stream?: string}} [options]
   * @returns {Promise<void>}
   */
  cancel(runId, { stream } = {}) {
    const frame = { type: 'cancel', run_id: runId };
    if (stream != null) frame.stream = stream;
    if (this._isOpen()) {
      this._ws.send(JSON.stringify(frame));
      return Promise.resolve();
    }
    const queued = this._cancels.get(runId);
    if (queued) return queued.promise;
    const entry = { frame, resolve: null, reject: null, promise: null };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this._cancels.set(runId, entry);
    return entry.promise;
  }

  /**
   * The text of `runId`'s `part` so far (from `agent_text_delta`), or `''`.
   * Kept while the run is open; a closed run's parts are forgotten.
   */
  text(runId, part = 'answer') {
    return this._texts.get(`${runId}\u0000${part}`) ?? '';
  }

  /**
   * Read a shared stream (`thread:t1`) on this connection too; the token's
   * `streams` claim must grant it. Returns its `Subscription`: its events
   * go to the subscription's handlers, never to the client's. Subscribed at
   * once when connected, else after the next welcome; resubscribed after
   * every reconnect from the position it reached, so each event of the
   * stream is delivered once, in seq order (or a `reset` says a gap could
   * not be filled). While a subscription of `stream` is live (subscribing or
   * subscribed), calling `subscribe` again returns it; after it failed or
   * was unsubscribed, a new one is made.
   * @param {string} stream
   * @param {{replayActiveRuns?: boolean}} [options]
   * @returns {Subscription}
   */
  subscribe(stream, { replayActiveRuns = false } = {}) {
    const existing = this._subs.get(stream);
    if (existing && existing._live()) return existing;
    const sub = new Subscription(this, stream, replayActiveRuns);
    this._subs.set(stream, sub);
    const problem = streamNameProblem(stream);
    if (problem) {
      // Refused here as the server would (its refusal would not name the
      // stream): failed, told once the caller had a chance to listen.
      sub.state = 'failed';
      const error = { type: 'error', code: 'invalid_field', message: `subscribe: field \`stream\` ${problem}`, stream };
      queueMicrotask(() => sub._emit('error', error));
      return sub;
    }
    if (this._isOpen()) this._sendSubscribe(sub);
    return sub;
  }

  // -- internals ------------------------------------------------------------

  /**
   * Assemble text parts. Each seq reaches the client once per connection —
   * a frame from history may cover several deltas (`from_seq`…`seq`) and
   * then holds their text joined — so appending every delta frame is exact,
   * across reconnects and reloads alike.
   */
  _onRunEvent(f) {
    assembleText(this._texts, f, (t) => this._emit('text', t));
  }

  /** Put `subscribe` for `sub` on the open socket (once per socket). */
  _sendSubscribe(sub) {
    const ws = this._ws;
    this._clock.clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    if (!this._isOpen() || sub._sentOn === ws || !sub._live()) return;
    sub._sentOn = ws;
    const frame = { type: 'subscribe', stream: sub.stream };
    if (sub.position?.epoch) frame.resume = { epoch: sub.position.epoch, seq: sub.position.seq };
    // As for the own stream: open runs are replayed on the first subscribe
    // (a fresh or reloaded page), not on a reconnect of a page showing them.
    sub._askedRuns = sub._replayActiveRuns && !sub._everSubscribed;
    if (sub._askedRuns) frame.replay_active_runs = true;
    ws.send(JSON.stringify(frame));
  }

  /** A frame about shared stream `f.stream`: to its subscription. */
  _onStreamFrame(f) {
    const leaving = this._leaving.get(f.stream);
    if (leaving && (f.type === 'unsubscribed' || (f.type === 'error' && f.code === 'not_subscribed'))) {
      this._leaving.delete(f.stream);
      leaving._emit('unsubscribed', { type: 'unsubscribed', stream: f.stream, reason: f.reason ?? 'client' });
      return;
    }
    const sub = this._subs.get(f.stream);
    // Nothing of ours reads it (an event before `unsubscribed` came, the
    // answer to a subscribe given up): dropped. The client's own handlers
    // never hear of shared streams.
    if (!sub || !sub._live()) return;
    switch (f.type) {
      case 'subscribed': sub._onSubscribed(f); break;
      case 'event': sub._onEvent(f); break;
      case 'caught_up':
        sub._replayingRuns = false;
        sub._emit('caught_up', { seq: f.seq, stream: f.stream });
        break;
      case 'error': sub._onError(f); break;
      case 'unsubscribed':
        // Not asked by this client (a server-side end): not resubscribed.
        sub.state = 'unsubscribed';
        sub._ended(streamRequestError(f.stream, 'not_subscribed', `unsubscribed (${f.reason})`));
        sub._emit('unsubscribed', f);
        break;
      case 'presence': sub._onPresence(f); break;
      case 'presence_join':
      case 'presence_leave': sub._onPresenceNotice(f); break;
      case 'typing': sub._emit('typing', f); break;
      default: break;
    }
  }

  /**
   * The socket is gone: live subscriptions wait for the next welcome; leaving
   * ones are left. `presence()` requests on the wire lost their answer:
   * rejected (those not sent yet wait for the next `subscribed`).
   */
  _streamsDisconnected() {
    for (const sub of this._subs.values()) {
      this._clock.clearTimeout(sub._retryTimer);
      sub._retryTimer = null;
      sub._sentOn = null;
      if (sub.state === 'subscribed') sub.state = 'subscribing';
      sub._rejectPresence(true, streamRequestError(sub.stream, 'closed', 'the connection closed before the presence answer'));
    }
    const leaving = [...this._leaving.values()];
    this._leaving.clear();
    // No connection reads them any more.
    for (const sub of leaving) sub._emit('unsubscribed', { type: 'unsubscribed', stream: sub.stream, reason: 'client' });
  }

  /**
   * The only place a socket is made. At most one socket per client: an open
   * starts only with no socket, no other open and no stop, and gives up as
   * soon as its generation is over (`close()`, also from an event handler).
   */
  async _open() {
    if (this._ws || this._opening || this._stopped) return;
    this._clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const generation = this._generation;
    this._opening = true;
    this._setState(this._attempt === 0 ? 'connecting' : 'reconnecting');
    // A state handler called close() (and maybe connect(), which is another open).
    if (generation !== this._generation) return;
    let token = this._token;
    if (this._getToken && (!token || this._needFreshToken)) {
      try {
        token = await this._getToken();
      } catch (err) {
        if (generation !== this._generation) return;
        this._opening = false;
        // Scheduled before the app hears of it: a connect() from an `error`
        // handler waits for the retry.
        this._scheduleReconnect();
        this._emit('error', { code: 'token_unavailable', message: String(err) });
        return;
      }
      if (generation !== this._generation) return;
      if (token == null) {
        this._opening = false;
        this._stopForToken();
        return;
      }
      if (this._kickedToken != null && token === this._kickedToken) {
        // The provider handed back the kicked token (a cached one): the
        // server disconnected this session, so it stays disconnected.
        this._opening = false;
        this._stop({ code: 'kicked', message: 'kicked; getToken returned the same token' }, true);
        return;
      }
      this._token = token;
      this._needFreshToken = false;
    }
    this._opening = false;
    if (this._stopped || this._ws) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, ['herald.v1']);
    } catch (err) {
      this._scheduleReconnect();
      this._emit('error', { code: 'connect_failed', message: String(err) });
      return;
    }
    this._ws = ws;
    // Only the client's current socket may speak to it.
    ws.onopen = () => {
      if (this._ws !== ws) return;
      // Open runs are replayed on the first hello of this client (a fresh or
      // reloaded page, which shows nothing yet); a reconnect of a page that
      // still shows them only resumes.
      const hello = { type: 'hello', token, replay_active_runs: this._replayActiveRuns && !this._welcomed };
      if (this.position.epoch) hello.resume = { epoch: this.position.epoch, seq: this.position.seq };
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (msg) => {
      if (this._ws !== ws) return;
      this._armLiveness();
      this._onFrame(ws, msg.data);
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
  }

  _onFrame(ws, data) {
    let f;
    try { f = JSON.parse(data); } catch { return; }
    switch (f.type) {
      case 'welcome':
        this._attempt = 0;
        this._nextDelayMs = null;
        this.connId = f.conn_id;
        this.userId = f.user_id;
        if (!f.resumed) {
          // A fresh stream position: live from the welcome on.
          if (f.reset) {
            this._emit('reset', f);
            if (this._ws !== ws) return; // a handler closed the client
          }
          this.position = { epoch: f.epoch, seq: f.seq };
          this._save();
        }
        this._welcomed = true;
        this._kickedToken = null;
        this._setState('open');
        if (this._ws !== ws) return;
        this._scheduleRefresh();
        this._armLiveness();
        // Every live subscription again, from its position; before the
        // pending messages, which may need a write subscription.
        for (const sub of [...this._subs.values()]) this._sendSubscribe(sub);
        this._emit('welcome', f);
        if (this._ws !== ws) return;
        if (!f.replaying) {
          this._emit('caught_up', { seq: f.seq });
          if (this._ws !== ws) return;
        }
        for (const c of this._cancels.values()) {
          ws.send(JSON.stringify(c.frame));
          c.resolve();
        }
        this._cancels.clear();
        for (const [id, p] of this._pending) this._transmit(id, p);
        break;
      case 'subscribed':
      case 'unsubscribed':
      case 'presence':
      case 'presence_join':
      case 'presence_leave':
      case 'typing':
        if (f.stream != null) this._onStreamFrame(f);
        break;
      case 'event': {
        if (f.stream != null) { this._onStreamFrame(f); break; }
        // Replayed run events may be older than the position; everything else
        // arrives in increasing seq order.
        if (f.seq > this.position.seq) {
          this.position = { epoch: this.position.epoch, seq: f.seq };
          this._save();
        }
        this._emit(f.event, f);
        this._emit('event', f);
        if (f.run_id != null) this._onRunEvent(f);
        break;
      }
      case 'ack': {
        const p = this._pending.get(f.id);
        if (p) { this._clock.clearTimeout(p.timer); this._pending.delete(f.id); p.resolve({ id: f.id }); }
        break;
      }
      case 'nack': {
        const p = this._pending.get(f.id);
        if (p) {
          this._clock.clearTimeout(p.timer);
          this._pending.delete(f.id);
          p.reject(Object.assign(new Error(f.message || f.error), { code: f.error, id: f.id, retryAfterMs: f.retry_after_ms }));
        }
        break;
      }
      case 'caught_up':
        if (f.stream != null) { this._onStreamFrame(f); break; }
        // The replay announced by the welcome is over (replayed events carry
        // `replayed: true`); live events follow.
        this._emit('caught_up', { seq: f.seq });
        break;
      case 'closing':
        this._nextDelayMs = f.reconnect_after_ms;
        this._emit('closing', f);
        break;
      case 'error':
        if (f.stream != null) { this._onStreamFrame(f); break; }
        this._emit('error', f);
        break;
      default:
        break;
    }
  }

  _onClose(ws, code, reason) {
    if (this._ws !== ws) return;
    this._ws = null;
    this._clock.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._clock.clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    // Messages in flight are not any more: their ack timers stop until resent.
    for (const p of this._pending.values()) { this._clock.clearTimeout(p.timer); p.timer = null; }
    this._streamsDisconnected();
    // What follows is decided before the app hears of the close, so that a
    // `close` handler meets the decision: its connect() neither opens a
    // second socket beside the retry nor reconnects with a kicked token.
    let stop = null;
    if (FATAL_CODES.has(code)) {
      stop = { code: 'protocol', message: `closed ${code}: ${reason}` };
    } else if (code === KICKED) {
      // Never again with this token: without `getToken` the client stops;
      // with it, it reconnects only if `getToken` gives a different token.
      if (this._getToken) {
        this._needFreshToken = true;
        this._kickedToken = this._token;
      } else {
        stop = { code: 'kicked', message: reason };
      }
    } else if (AUTH_CODES.has(code)) {
      if (this._getToken) this._needFreshToken = true;
      else stop = { code: code === 4403 ? 'token_expired' : 'unauthorized', message: reason };
    }
    const generation = this._generation;
    this._closingGeneration = generation;
    this._emit('close', { code, reason });
    this._closingGeneration = -1;
    // A handler called close() (and maybe connect() after it: a new start).
    if (generation !== this._generation) return;
    if (this._stopped) { this._setState('closed'); return; }
    // A kick stops as close() does (pending sends rejected); 4401/4403
    // without `getToken` and protocol errors keep them for a later connect().
    if (stop) { this._stop(stop, code === KICKED); return; }
    this._scheduleReconnect(code);
  }

  /**
   * Arm the one retry. Nothing when the client is stopped, has a socket, an
   * open in progress or a retry already armed: at most one of each.
   */
  _scheduleReconnect(code) {
    if (this._stopped || this._ws || this._opening || this._retryTimer) return;
    // Offline: no attempts until the network is back (`online` opens at once).
    if (!this._offline) {
      let delay;
      if (code === 1012 && this._nextDelayMs != null) {
        delay = this._nextDelayMs; // the server's jittered drain hint
      } else {
        const cap = Math.min(this._backoff.maxMs, this._backoff.baseMs * 2 ** this._attempt);
        delay = Math.random() * cap; // full jitter
        if (code === 1008 || code === 1013) delay = Math.max(delay, 5000);
      }
      this._nextDelayMs = null;
      this._attempt += 1;
      this._retryTimer = this._clock.setTimeout(() => { this._retryTimer = null; this._open(); }, delay);
    }
    // Armed before the state is told: a connect() from a `state` handler waits for it.
    this._setState('reconnecting');
  }

  /**
   * With `getToken`: fetch a fresh token `refreshMarginMs` before the
   * current one expires (by default a fifth of its remaining lifetime,
   * between 1 s and 60 s) and send `refresh`, so the connection never ends
   * for expiry. Times are the client clock's.
   */
  _scheduleRefresh() {
    this._clock.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._getToken) return;
    const exp = tokenExpiry(this._token);
    if (exp == null) return;
    const left = exp * 1000 - this._clock.now();
    this._refreshTimer = this._clock.setTimeout(() => this._refresh(), Math.max(0, left - refreshMargin(left, this._refreshMarginMs)));
  }

  async _refresh() {
    this._refreshTimer = null;
    const ws = this._ws;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      if (this._ws !== ws || this._stopped) return;
      // Try again shortly; the server closes with 4403 at expiry otherwise.
      this._refreshTimer = this._clock.setTimeout(() => this._refresh(), 1000);
      this._emit('error', { code: 'token_unavailable', message: String(err) });
      return;
    }
    if (this._ws !== ws || this._stopped) return;
    if (token == null) {
      this._stopForToken();
      return;
    }
    this._token = token;
    if (this._isOpen()) this._ws.send(JSON.stringify({ type: 'refresh', token }));
    this._scheduleRefresh();
  }

  /**
   * Liveness: after `livenessMs` with nothing received, send an app-level
   * `ping`; no frame within `pongTimeoutMs` means the socket is half-open
   * (sleep, network switch): drop it and reconnect with resume.
   */
  _armLiveness() {
    this._clock.clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    if (!this._livenessMs) return;
    this._livenessTimer = this._clock.setTimeout(() => {
      this._livenessTimer = null;
      if (!this._isOpen()) return;
      this._ws.send(JSON.stringify({ type: 'ping' }));
      this._livenessTimer = this._clock.setTimeout(() => this._dropDeadSocket(), this._pongTimeoutMs);
    }, this._livenessMs);
  }

  _dropDeadSocket() {
    this._livenessTimer = null;
    const ws = this._ws;
    if (!ws) return;
    // Do not wait for a close handshake the peer will never answer; closed
    // first, so that the socket is let go of before anything reconnects.
    try { ws.close(); } catch { /* already closing */ }
    this._onClose(ws, 1006, 'no pong in time');
  }

  _networkChanged(online) {
    this._offline = !online;
    if (!online) {
      // Stop retrying; an open socket stays (liveness tells if it died).
      this._clock.clearTimeout(this._retryTimer);
      this._retryTimer = null;
      return;
    }
    if (this._stopped || this._ws || this._opening) return;
    if (this._closingGeneration === this._generation) return; // the close decides
    this._clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._attempt = 0;
    this._open();
  }

  /**
   * Stop: no socket, no open in progress, no timer. Every open in progress
   * (a token fetch that resolves later) is orphaned.
   */
  _halt(rejectPending) {
    this._stopped = true;
    this._generation += 1;
    this._opening = false;
    this._clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._clock.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._clock.clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    if (this._listening) {
      this._network.removeEventListener('online', this._onOnline);
      this._network.removeEventListener('offline', this._onOffline);
      this._listening = false;
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try { ws.close(1000, 'client closed'); } catch { /* already closing */ }
    }
    this._streamsDisconnected();
    if (!rejectPending) return;
    for (const [id, p] of this._pending) {
      this._clock.clearTimeout(p.timer);
      p.reject(new HeraldClosedError(id));
    }
    this._pending.clear();
    for (const [runId, c] of this._cancels) c.reject(new HeraldClosedError(runId));
    this._cancels.clear();
    for (const sub of this._subs.values()) {
      sub._rejectPresence(false, streamRequestError(sub.stream, 'closed', 'the client was closed before the presence answer'));
    }
  }

  /**
   * Stop for good: stopped first, then `error`, then state `closed` — unless
   * an `error` handler started the client again (`connect()`, the app's
   * decision). `rejectPending`: as `close()`, sends waiting for an ack fail.
   */
  _stop(error, rejectPending) {
    this._halt(rejectPending);
    this._emit('error', error);
    if (this._stopped) this._setState('closed');
  }

  /** `getToken` returned null: the user is gone; stop for good. */
  _stopForToken() {
    this._stop({ code: 'unauthorized', message: 'getToken returned null: stopped' }, true);
  }

  _isOpen() {
    return this._ws && this._state === 'open' && this._ws.readyState === 1;
  }

  /** Put a pending message on the socket, if open, and start its ack timer. */
  _transmit(id, p) {
    if (!this._isOpen()) return; // re-sent on the next welcome
    this._ws.send(JSON.stringify(p.frame));
    if (p.timer) return;
    p.timer = this._clock.setTimeout(() => {
      if (this._pending.get(id) !== p) return;
      this._pending.delete(id);
      p.reject(Object.assign(new Error('no ack in time'), { code: 'timeout', id }));
    }, this._ackTimeoutMs);
  }

  _setState(s) {
    if (this._state === s) return;
    this._state = s;
    this._emit('state', s);
  }

  _emit(name, payload) {
    const hs = this._handlers.get(name);
    if (!hs) return;
    for (const h of hs) {
      try { h(payload); } catch (err) { console.error('herald handler failed', err); }
    }
  }

  _load() {
    if (!this._storage || !this._storageKey) return null;
    try { return JSON.parse(this._storage.getItem(this._storageKey)); } catch { return null; }
  }

  _save() {
    if (!this._storage || !this._storageKey) return;
    try { this._storage.setItem(this._storageKey, JSON.stringify(this.position)); } catch { /* quota: ignore */ }
  }

  /** The stored position of shared stream `stream`, or null. */
  _loadStream(stream) {
    if (this._storage && this._storageKey) {
      try {
        const p = JSON.parse(this._storage.getItem(`${this._storageKey}:stream:${stream}`));
        if (p && typeof p.epoch === 'string' && typeof p.seq === 'number') return p;
      } catch { /* unreadable: fresh */ }
    }
    return this._streamPositions.get(stream) ?? null;
  }

  _saveStream(stream, position) {
    this._streamPositions.set(stream, position);
    if (!this._storage || !this._storageKey) return;
    try { this._storage.setItem(`${this._storageKey}:stream:${stream}`, JSON.stringify(position)); } catch { /* quota: ignore */ }
  }
}

/**
 * A shared stream read through a `HeraldClient` (`client.subscribe(stream)`):
 * its own position, handlers, text parts, members (presence) and typing.
 * States: `subscribing` (sent, or waiting for a connection), `subscribed`,
 * `failed` (refused for good: `forbidden`, `too_many_streams`,
 * `invalid_field`), `unsubscribed`.
 */
export class Subscription {
  constructor(client, stream, replayActiveRuns) {
    this.client = client;
    this.stream = stream;
    /** The stream's epoch and the highest seq processed, or null before the first `subscribed`. */
    this.position = client._loadStream(stream);
    /** The user may write to the stream (`sendMessage(…, {stream})`), once subscribed. */
    this.write = false;
    /** @type {'subscribing'|'subscribed'|'failed'|'unsubscribed'} */
    this.state = 'subscribing';
    this._replayActiveRuns = replayActiveRuns;
    this._handlers = new Map();
    this._texts = new Map();
    /** The socket the current `subscribe` went out on (one per socket). */
    this._sentOn = null;
    this._everSubscribed = false;
    this._askedRuns = false;
    /** Between `subscribed {replaying}` and `caught_up` of a subscribe that asked for open runs. */
    this._replayingRuns = false;
    this._attempt = 0;
    this._retryTimer = null;
    /**
     * Who is in the stream: user id → `{connections}`. Filled from the last
     * `presence()` answer (the subscription asks one after every
     * `subscribed`), then kept by `presence_join` / `presence_leave`; a user
     * who joined since the answer counts `connections: 1` (later connections
     * of a user are not announced). Empty until the first answer.
     * @type {Map<string, {connections: number}>}
     */
    this.members = new Map();
    /** `presence()` requests in order: `sentOn` the socket it went out on, null while waiting for `subscribed`. */
    this._presenceWaiters = [];
    /** When `typing()` last sent (the client clock's ms), or null. */
    this._typingAt = null;
  }

  /**
   * Handlers: `subscribed` (after every (re)subscribe), `event` (every event
   * of the stream), any event name, `text` (a run's text part grew),
   * `caught_up`, `reset`, `error` (a refusal for this stream: of the
   * subscribe, or of a `typing` without write permission), `unsubscribed`,
   * `presence_join` / `presence_leave` (`{type, stream, user_id}`: a user's
   * first connection joined, its last left), `members` (`members` changed;
   * called with the map) and `typing` (`{type, stream, user_id}`: another
   * user is typing).
   * @returns {() => void} removes the handler
   */
  on(name, handler) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(handler);
    return () => this._handlers.get(name)?.delete(handler);
  }

  /** The text of `runId`'s `part` in this stream so far, or `''` (as `client.text`). */
  text(runId, part = 'answer') {
    return this._texts.get(`${runId}\u0000${part}`) ?? '';
  }

  /**
   * Ask who is in the stream: resolves the `presence` answer, `{type,
   * stream, users: [{user_id, connections}], total_users,
   * total_connections}` (`users` sorted by id, at most 100 listed; the
   * totals count everyone), and updates `members` from it. Sent at once
   * when subscribed, else after the next `subscribed`; several in flight are
   * answered in order. Rejects with an `Error` carrying `{type: 'error',
   * code, stream}`: the server's refusal (`broker_unavailable`), `closed`
   * (the connection or the client closed before the answer),
   * `not_subscribed` (the subscription was not live, or ended), or the
   * subscribe's refusal (`forbidden`, …) when it failed meanwhile.
   * @returns {Promise<object>}
   */
  presence() {
    if (!this._live()) {
      return Promise.reject(streamRequestError(this.stream, 'not_subscribed', `the subscription is ${this.state}`));
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, sentOn: null };
      this._presenceWaiters.push(waiter);
      this._sendPresence(waiter);
    });
  }

  /**
   * Tell the stream's other users this user is typing (`{type: 'typing',
   * stream, user_id}` on their subscriptions); call it on input, it sends at
   * most one frame a second. Returns whether a frame was sent: false when
   * not subscribed on an open connection or within a second of the last.
   * Needs write permission: without it the server answers `error`
   * `forbidden` on this subscription (which stays subscribed).
   * @returns {boolean}
   */
  typing() {
    const c = this.client;
    if (!this._onSocket()) return false;
    const now = c._clock.now();
    if (this._typingAt != null && now >= this._typingAt && now - this._typingAt < TYPING_EVERY_MS) return false;
    this._typingAt = now;
    c._ws.send(JSON.stringify({ type: 'typing', stream: this.stream }));
    return true;
  }

  /**
   * Stop reading the stream: sends `unsubscribe` when connected (then
   * `unsubscribed` comes), and it is never resubscribed. Without a
   * connection, `unsubscribed` is emitted at once.
   */
  unsubscribe() {
    if (!this._live()) return;
    const c = this.client;
    const wasSent = this._sentOn != null && this._sentOn === c._ws && c._isOpen();
    c._clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this.state = 'unsubscribed';
    this._sentOn = null;
    this._ended(streamRequestError(this.stream, 'not_subscribed', 'unsubscribed'));
    if (c._subs.get(this.stream) === this) c._subs.delete(this.stream);
    if (wasSent) {
      c._leaving.set(this.stream, this);
      c._ws.send(JSON.stringify({ type: 'unsubscribe', stream: this.stream }));
    } else {
      this._emit('unsubscribed', { type: 'unsubscribed', stream: this.stream, reason: 'client' });
    }
  }

  // -- internals ------------------------------------------------------------

  _live() { return this.state === 'subscribing' || this.state === 'subscribed'; }

  /** Subscribed on the client's open socket: requests about the stream may go out. */
  _onSocket() {
    const c = this.client;
    return this.state === 'subscribed' && this._sentOn != null && this._sentOn === c._ws && c._isOpen();
  }

  /** Put a waiting `presence` request on the socket, if subscribed there. */
  _sendPresence(waiter) {
    if (waiter.sentOn != null || !this._onSocket()) return;
    const ws = this.client._ws;
    waiter.sentOn = ws;
    ws.send(JSON.stringify({ type: 'presence', stream: this.stream }));
  }

  /** Reject the `presence()` requests on the wire (`sentOnly`), or all of them. */
  _rejectPresence(sentOnly, error) {
    const keep = [];
    const rejected = [];
    for (const w of this._presenceWaiters) (sentOnly && w.sentOn == null ? keep : rejected).push(w);
    this._presenceWaiters = keep;
    for (const w of rejected) w.reject(error);
  }

  /** The subscription failed or ended: its requests are refused, nobody is known to be in it. */
  _ended(error) {
    this._rejectPresence(false, error);
    if (this.members.size > 0) {
      this.members.clear();
      this._emit('members', this.members);
    }
  }

  /** A `presence` answer: the oldest request on the wire gets it; `members` becomes its list. */
  _onPresence(f) {
    const i = this._presenceWaiters.findIndex((w) => w.sentOn != null);
    const waiter = i >= 0 ? this._presenceWaiters.splice(i, 1)[0] : null;
    const next = new Map();
    for (const u of Array.isArray(f.users) ? f.users : []) next.set(u.user_id, { connections: u.connections });
    let changed = next.size !== this.members.size;
    for (const [id, m] of next) if (this.members.get(id)?.connections !== m.connections) changed = true;
    if (changed) {
      // The same Map, kept live for whoever holds it.
      this.members.clear();
      for (const [id, m] of next) this.members.set(id, m);
      this._emit('members', this.members);
    }
    waiter?.resolve(f);
  }

  /** `presence_join` / `presence_leave`: `members` follows, then the handlers are told. */
  _onPresenceNotice(f) {
    let changed = false;
    if (f.type === 'presence_join' && !this.members.has(f.user_id)) {
      this.members.set(f.user_id, { connections: 1 });
      changed = true;
    } else if (f.type === 'presence_leave' && this.members.has(f.user_id)) {
      this.members.delete(f.user_id);
      changed = true;
    }
    this._emit(f.type, f);
    if (changed && this._live()) this._emit('members', this.members);
  }

  _onSubscribed(f) {
    this._attempt = 0;
    if (!f.resumed || !this.position) {
      // A fresh position: live from `seq` on (told when a resume failed).
      if (f.reset) {
        this._emit('reset', f);
        if (!this._live()) return;
      }
      this.position = { epoch: f.epoch, seq: f.seq };
      this.client._saveStream(this.stream, this.position);
    }
    this.write = f.write === true;
    this.state = 'subscribed';
    this._everSubscribed = true;
    // Open runs replayed on request may be older than the position.
    this._replayingRuns = f.replaying === true && this._askedRuns;
    this._emit('subscribed', f);
    if (!f.replaying && this._live()) this._emit('caught_up', { seq: f.seq, stream: this.stream });
    // Requests that waited for the subscription go out now; with none on
    // the wire, one is asked so that `members` is complete (join and leave
    // notices tell only what changes from here on).
    for (const w of this._presenceWaiters) this._sendPresence(w);
    if (this._onSocket() && !this._presenceWaiters.some((w) => w.sentOn != null)) {
      this.presence().catch(() => { /* members stays as it is; a later subscribe asks again */ });
    }
  }

  _onEvent(f) {
    if (this.state !== 'subscribed') return;
    const pos = this.position;
    // Each seq once per stream: an event at or before the position was
    // processed already — unless it is an open run replayed on request.
    if (f.seq <= pos.seq && !(this._replayingRuns && f.replayed === true)) return;
    if (f.seq > pos.seq) {
      this.position = { epoch: pos.epoch, seq: f.seq };
      this.client._saveStream(this.stream, this.position);
    }
    this._emit(f.event, f);
    this._emit('event', f);
    if (f.run_id != null) assembleText(this._texts, f, (t) => this._emit('text', t));
  }

  _onError(f) {
    if (this.state === 'subscribed') {
      // The subscribe was answered: this refuses a later request. A
      // `presence` is refused only when the broker is unavailable (a
      // subscriber may always ask), so `forbidden` refuses a `typing`.
      const i = f.code === 'forbidden' ? -1 : this._presenceWaiters.findIndex((w) => w.sentOn != null);
      if (i >= 0) {
        this._presenceWaiters.splice(i, 1)[0].reject(streamRequestError(this.stream, f.code, f.message, f));
        return;
      }
      this._emit('error', f);
      return;
    }
    if (FINAL_REFUSALS.has(f.code)) {
      this.state = 'failed';
      this._sentOn = null;
      this._ended(streamRequestError(this.stream, f.code, f.message, f));
      this._emit('error', f);
      return;
    }
    this._emit('error', f);
    if (f.code !== 'broker_unavailable' || !this._live()) return;
    // Not subscribed: ask again after the client's backoff (full jitter).
    const c = this.client;
    const ws = this._sentOn;
    const cap = Math.min(c._backoff.maxMs, c._backoff.baseMs * 2 ** this._attempt);
    this._attempt += 1;
    c._clock.clearTimeout(this._retryTimer);
    this._retryTimer = c._clock.setTimeout(() => {
      this._retryTimer = null;
      if (!this._live() || c._ws !== ws) return; // a reconnect resubscribes anyway
      this._sentOn = null;
      c._sendSubscribe(this);
    }, Math.random() * cap);
  }

  _emit(name, payload) {
    const hs = this._handlers.get(name);
    if (!hs) return;
    for (const h of hs) {
      try { h(payload); } catch (err) { console.error('herald handler failed', err); }
    }
  }
}

/**
 * Why `name` is not a shared stream's name, or null: 1–200 bytes of
 * `A–Z a–z 0–9 _ . : @ -`, `<namespace>:<name>`, not `user:…` (the
 * server's rule, docs/PROTOCOL.md "Shared streams").
 */
function streamNameProblem(name) {
  if (typeof name !== 'string' || name.length === 0 || name.length > 200) return 'must be 1 to 200 bytes';
  if (!/^[A-Za-z0-9_.:@-]+$/.test(name)) return 'may hold only A-Z a-z 0-9 _ . : @ -';
  const colon = name.indexOf(':');
  if (colon > 0 && name.slice(0, colon) === 'user') return "names a user's own stream (`user:`), which is not shared";
  if (colon <= 0 || colon === name.length - 1) return 'must be `<namespace>:<name>`, e.g. `thread:abc`';
  return null;
}

/**
 * The rejection of a request about shared stream `stream`: an `Error`
 * carrying the fields of an `error` frame (`frame`, when the server sent
 * one).
 */
function streamRequestError(stream, code, message, frame) {
  return Object.assign(new Error(message || code), frame ?? {}, { type: 'error', code, stream });
}

/**
 * Assemble the text parts of runs into `texts` ("run\u0000part" → text)
 * and tell `emit` each growth; a closed run's parts are forgotten. Each seq
 * reaches a reader once, so appending every delta frame is exact.
 */
function assembleText(texts, f, emit) {
  if (f.event === 'agent_text_delta') {
    const part = String(f.data?.part ?? '');
    const delta = String(f.data?.text ?? '');
    const key = `${f.run_id}\u0000${part}`;
    const text = (texts.get(key) ?? '') + delta;
    texts.set(key, text);
    emit({ runId: f.run_id, part, text, delta, seq: f.seq, replayed: f.replayed === true });
  } else if (f.event === 'agent_completed' || f.event === 'agent_error' || f.event === 'agent_cancelled') {
    const prefix = `${f.run_id}\u0000`;
    for (const key of [...texts.keys()]) if (key.startsWith(prefix)) texts.delete(key);
  }
}

/**
 * How long before its expiry a token with `leftMs` to live is refreshed:
 * `marginMs` when given (at most half of `leftMs`, so that short tokens are
 * not refreshed back to back), else a fifth of `leftMs` between 1 s and 60 s.
 */
function refreshMargin(leftMs, marginMs) {
  if (marginMs != null) return Math.min(marginMs, leftMs / 2);
  return Math.min(60000, Math.max(1000, leftMs / 5));
}

/** The `exp` claim (seconds) of a JWT, or null when it has none or cannot be read. */
function tokenExpiry(token) {
  try {
    const part = String(token).split('.')[1];
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/'));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}

/** A send rejected because the client was closed before its ack came. */
export class HeraldClosedError extends Error {
  constructor(id) {
    super('client closed before the message was acknowledged');
    this.name = 'HeraldClosedError';
    this.code = 'closed';
    this.id = id;
  }
}

function newId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `m-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}
