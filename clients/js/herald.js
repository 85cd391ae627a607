// Herald browser client: protocol v1 over WebSocket, with resume, automatic
// reconnect (exponential backoff with jitter, honouring close codes), acked
// messages and cancel. Dependency-free ES module; types in herald.d.ts.

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
    this.connId = null;
    this.userId = null;
  }

  /** Current connection state. */
  get state() { return this._state; }

  /**
   * Subscribe. Names: any event name (`agent_thinking`, …), `event` (every
   * event), `text` (a run's text part grew: `{runId, part, text, delta, seq,
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
   * `connect()`, `close()` and token fetches, a client holds at most one socket.
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
    this._open();
  }

  /**
   * Close for good (no reconnect). Sends still waiting for their ack are
   * rejected with a `HeraldClosedError` (code `closed`).
   */
  close() {
    this._stopped = true;
    // Orphans any open in progress (a token fetch that resolves later).
    this._generation += 1;
    this._opening = false;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    clearTimeout(this._livenessTimer);
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
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new HeraldClosedError(id));
    }
    this._pending.clear();
    for (const [runId, c] of this._cancels) c.reject(new HeraldClosedError(runId));
    this._cancels.clear();
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
   * rejects with `HeraldClosedError` if `close()` comes first.
   * @returns {Promise<void>}
   */
  cancel(runId) {
    if (this._isOpen()) {
      this._ws.send(JSON.stringify({ type: 'cancel', run_id: runId }));
      return Promise.resolve();
    }
    const queued = this._cancels.get(runId);
    if (queued) return queued.promise;
    const entry = { resolve: null, reject: null, promise: null };
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

  // -- internals ------------------------------------------------------------

  /**
   * Assemble text parts. Each seq reaches the client once per connection —
   * a frame from history may cover several deltas (`from_seq`…`seq`) and
   * then holds their text joined — so appending every delta frame is exact,
   * across reconnects and reloads alike.
   */
  _onRunEvent(f) {
    if (f.event === 'agent_text_delta') {
      const part = String(f.data?.part ?? '');
      const delta = String(f.data?.text ?? '');
      const key = `${f.run_id}\u0000${part}`;
      const text = (this._texts.get(key) ?? '') + delta;
      this._texts.set(key, text);
      this._emit('text', { runId: f.run_id, part, text, delta, seq: f.seq, replayed: f.replayed === true });
    } else if (f.event === 'agent_completed' || f.event === 'agent_error' || f.event === 'agent_cancelled') {
      const prefix = `${f.run_id}\u0000`;
      for (const key of [...this._texts.keys()]) if (key.startsWith(prefix)) this._texts.delete(key);
    }
  }

  async _open() {
    // Each open belongs to a generation; `close()` starts a new one, so an
    // open that resumes after it (its token fetch was slow) gives up.
    const generation = this._generation;
    this._opening = true;
    this._setState(this._attempt === 0 ? 'connecting' : 'reconnecting');
    let token = this._token;
    if (this._getToken && (!token || this._needFreshToken)) {
      try {
        token = await this._getToken();
      } catch (err) {
        if (generation !== this._generation) return;
        this._opening = false;
        this._emit('error', { code: 'token_unavailable', message: String(err) });
        this._scheduleReconnect();
        return;
      }
      if (generation !== this._generation) return;
      if (token == null) {
        this._stopForToken();
        return;
      }
      if (this._kickedToken != null && token === this._kickedToken) {
        // The provider handed back the kicked token (a cached one): the
        // server disconnected this session, so it stays disconnected.
        this._opening = false;
        this._stop({ code: 'kicked', message: 'kicked; getToken returned the same token' });
        return;
      }
      this._token = token;
      this._needFreshToken = false;
    }
    this._opening = false;
    if (this._stopped) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, ['herald.v1']);
    } catch (err) {
      this._emit('error', { code: 'connect_failed', message: String(err) });
      this._scheduleReconnect();
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
      this._onFrame(msg.data);
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
  }

  _onFrame(data) {
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
          if (f.reset) this._emit('reset', f);
          this.position = { epoch: f.epoch, seq: f.seq };
          this._save();
        }
        this._welcomed = true;
        this._kickedToken = null;
        this._setState('open');
        this._scheduleRefresh();
        this._armLiveness();
        this._emit('welcome', f);
        if (!f.replaying) this._emit('caught_up', { seq: f.seq });
        for (const [runId, c] of this._cancels) {
          this._ws.send(JSON.stringify({ type: 'cancel', run_id: runId }));
          c.resolve();
        }
        this._cancels.clear();
        for (const [id, p] of this._pending) this._transmit(id, p);
        break;
      case 'event': {
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
        if (p) { clearTimeout(p.timer); this._pending.delete(f.id); p.resolve({ id: f.id }); }
        break;
      }
      case 'nack': {
        const p = this._pending.get(f.id);
        if (p) {
          clearTimeout(p.timer);
          this._pending.delete(f.id);
          p.reject(Object.assign(new Error(f.message || f.error), { code: f.error, id: f.id, retryAfterMs: f.retry_after_ms }));
        }
        break;
      }
      case 'caught_up':
        // The replay announced by the welcome is over (replayed events carry
        // `replayed: true`); live events follow.
        this._emit('caught_up', { seq: f.seq });
        break;
      case 'closing':
        this._nextDelayMs = f.reconnect_after_ms;
        this._emit('closing', f);
        break;
      case 'error':
        this._emit('error', f);
        break;
      default:
        break;
    }
  }

  _onClose(ws, code, reason) {
    if (this._ws !== ws) return;
    this._ws = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    // Messages in flight are not any more: their ack timers stop until resent.
    for (const p of this._pending.values()) { clearTimeout(p.timer); p.timer = null; }
    this._emit('close', { code, reason });
    if (this._stopped) { this._setState('closed'); return; }
    if (AUTH_CODES.has(code)) {
      if (!this._getToken) {
        this._emit('error', { code: code === 4403 ? 'token_expired' : 'unauthorized', message: reason });
        this._stopped = true;
        this._setState('closed');
        return;
      }
      this._needFreshToken = true;
    }
    if (code === KICKED) {
      // Never again with this token: without `getToken` the client stops;
      // with it, it reconnects only if `getToken` gives a different token.
      if (!this._getToken) {
        this._stop({ code: 'kicked', message: reason });
        return;
      }
      this._needFreshToken = true;
      this._kickedToken = this._token;
    }
    if (FATAL_CODES.has(code)) {
      this._emit('error', { code: 'protocol', message: `closed ${code}: ${reason}` });
      this._stopped = true;
      this._setState('closed');
      return;
    }
    this._scheduleReconnect(code);
  }

  _scheduleReconnect(code) {
    if (this._stopped) return;
    this._setState('reconnecting');
    // Offline: no attempts until the network is back (`online` opens at once).
    if (this._offline) return;
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
    this._retryTimer = setTimeout(() => { this._retryTimer = null; this._open(); }, delay);
  }

  /**
   * With `getToken`: fetch a fresh token before the current one expires (a
   * fifth of its remaining lifetime before, between 1 s and 60 s) and send
   * `refresh`, so the connection never ends for expiry.
   */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._getToken) return;
    const exp = tokenExpiry(this._token);
    if (exp == null) return;
    const left = exp * 1000 - Date.now();
    const margin = Math.min(60000, Math.max(1000, left / 5));
    this._refreshTimer = setTimeout(() => this._refresh(), Math.max(0, left - margin));
  }

  async _refresh() {
    this._refreshTimer = null;
    const ws = this._ws;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      if (this._ws !== ws || this._stopped) return;
      this._emit('error', { code: 'token_unavailable', message: String(err) });
      // Try again shortly; the server closes with 4403 at expiry otherwise.
      this._refreshTimer = setTimeout(() => this._refresh(), 1000);
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
    clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    if (!this._livenessMs) return;
    this._livenessTimer = setTimeout(() => {
      if (!this._isOpen()) return;
      this._ws.send(JSON.stringify({ type: 'ping' }));
      this._livenessTimer = setTimeout(() => this._dropDeadSocket(), this._pongTimeoutMs);
    }, this._livenessMs);
  }

  _dropDeadSocket() {
    this._livenessTimer = null;
    const ws = this._ws;
    if (!ws) return;
    // Do not wait for a close handshake the peer will never answer.
    this._onClose(ws, 1006, 'no pong in time');
    try { ws.close(); } catch { /* already closing */ }
  }

  _networkChanged(online) {
    this._offline = !online;
    if (!online) {
      // Stop retrying; an open socket stays (liveness tells if it died).
      if (this._retryTimer) { clearTimeout(this._retryTimer); this._retryTimer = null; }
      return;
    }
    if (this._stopped || this._ws || this._opening) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._attempt = 0;
    this._open();
  }

  /** Stop for good (as `close()`: pending sends are rejected), emitting `error` first. */
  _stop(error) {
    this._emit('error', error);
    this.close();
  }

  /** `getToken` returned null: the user is gone; stop for good. */
  _stopForToken() {
    this.close();
    this._emit('error', { code: 'unauthorized', message: 'getToken returned null: stopped' });
  }

  _isOpen() {
    return this._ws && this._state === 'open' && this._ws.readyState === 1;
  }

  /** Put a pending message on the socket, if open, and start its ack timer. */
  _transmit(id, p) {
    if (!this._isOpen()) return; // re-sent on the next welcome
    this._ws.send(JSON.stringify(p.frame));
    if (p.timer) return;
    p.timer = setTimeout(() => {
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
