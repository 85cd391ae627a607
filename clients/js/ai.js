// HeraldChatTransport: the Vercel AI SDK's `ChatTransport` (for `useChat`)
// over a HeraldClient. A user message goes out as a Herald `user_message`
// (thread = the chat id, id = the UI message's id); the agent run that
// answers it comes back as a stream of UI message chunks. Dependency-free:
// the AI SDK is needed only for its types (herald-gateway/ai's .d.ts).

/** Events that end a run. */
const CLOSING = new Set(['agent_completed', 'agent_error', 'agent_cancelled']);
/** Closed runs remembered for `reconnectToStream` and late subscribers. */
const KEEP_CLOSED = 32;

/**
 * Turns one run's events into UI message chunks: agent_started → start +
 * start-step; agent_thinking → reasoning; agent_text_delta → text-start (once
 * per part) and text-delta; tool_executing / tool_completed → tool input /
 * output (paired by `tool_call_id`, else by order per tool name);
 * agent_completed → finish (with `final_response` as text when no text was
 * streamed); agent_error → error; agent_cancelled → abort. Any other event
 * ends the open text parts first.
 */
export function runChunker(runId) {
  const reasoningId = `${runId}:reasoning`;
  const textId = `${runId}:text`;
  let reasoning = false;
  let n = 0;
  /** Tool calls without an id, waiting for their completion, by tool name. */
  const unnamed = new Map();
  /** Text parts open now, and whether any text was streamed. */
  const texts = new Set();
  let streamed = false;
  const closeReasoning = (out) => {
    if (reasoning) out.push({ type: 'reasoning-end', id: reasoningId });
    reasoning = false;
  };
  const closeTexts = (out) => {
    for (const id of texts) out.push({ type: 'text-end', id });
    texts.clear();
  };
  return (e) => {
    const out = [];
    const data = e.data ?? {};
    if (e.event !== 'agent_text_delta') closeTexts(out);
    switch (e.event) {
      case 'agent_text_delta': {
        closeReasoning(out);
        const id = `${runId}:${data.part ?? 'answer'}`;
        if (!texts.has(id)) out.push({ type: 'text-start', id });
        texts.add(id);
        streamed = true;
        out.push({ type: 'text-delta', id, delta: String(data.text ?? '') });
        break;
      }
      case 'agent_started':
        out.push({ type: 'start', messageId: runId }, { type: 'start-step' });
        break;
      case 'agent_thinking':
        if (!reasoning) out.push({ type: 'reasoning-start', id: reasoningId });
        reasoning = true;
        out.push({ type: 'reasoning-delta', id: reasoningId, delta: `${data.text ?? ''}\n` });
        break;
      case 'tool_executing': {
        closeReasoning(out);
        const tool = String(data.tool ?? 'tool');
        let toolCallId = data.tool_call_id;
        if (!toolCallId) {
          toolCallId = `${runId}:${tool}:${n++}`;
          if (!unnamed.has(tool)) unnamed.set(tool, []);
          unnamed.get(tool).push(toolCallId);
        }
        out.push({ type: 'tool-input-available', toolCallId, toolName: tool, input: data.input ?? {}, dynamic: true });
        break;
      }
      case 'tool_completed': {
        const tool = String(data.tool ?? 'tool');
        const toolCallId = data.tool_call_id ?? unnamed.get(tool)?.shift() ?? `${runId}:${tool}:${n++}`;
        if (data.error) {
          const errorText = typeof data.error === 'string' ? data.error : (data.error.message ?? JSON.stringify(data.error));
          out.push({ type: 'tool-output-error', toolCallId, errorText, dynamic: true });
        } else {
          out.push({ type: 'tool-output-available', toolCallId, output: data.output ?? null, dynamic: true });
        }
        break;
      }
      case 'agent_completed': {
        closeReasoning(out);
        const final = data.final_response;
        if (final != null && !streamed) {
          const text = typeof final === 'string' ? final : JSON.stringify(final);
          out.push({ type: 'text-start', id: textId }, { type: 'text-delta', id: textId, delta: text }, { type: 'text-end', id: textId });
        }
        out.push({ type: 'finish-step' }, { type: 'finish' });
        break;
      }
      case 'agent_error':
        closeReasoning(out);
        out.push({ type: 'error', errorText: String(data.message ?? data.reason ?? data.error ?? 'the agent failed') });
        break;
      case 'agent_cancelled':
        closeReasoning(out);
        out.push({ type: 'abort', reason: data.reason });
        break;
      default:
        break;
    }
    return out;
  };
}

/** The AI SDK's `ChatTransport` over a `HeraldClient`. */
export class HeraldChatTransport {
  /**
   * @param {{ client: import('./herald.js').HeraldClient, cancelOnAbort?: boolean }} options
   *   `client`: a HeraldClient (connected by the caller). `cancelOnAbort`:
   *   an aborted request (useChat's `stop()`) also sends `cancel` for the
   *   run. Default false: an abort only detaches the stream (the run goes on
   *   and `reconnectToStream` finds it); `cancel(chatId)` stops the run.
   */
  constructor({ client, cancelOnAbort = false }) {
    this.client = client;
    this.cancelOnAbort = cancelOnAbort;
    /** `reconnectToStream` replays the run from its start (useChat resets the message). */
    this.resumeStreamIsReplay = true;
    /** @type {Map<string, {thread?: string, events: object[], seqs: Set<number>, closed: boolean, listeners: Set<Function>}>} */
    this._runs = new Map();
    /** Waiting for the run that answers a message: thread → {messageId, take}. */
    this._waiting = new Map();
    this._caughtUp = false;
    this._caughtUpWaiters = [];
    client.on('welcome', () => { this._caughtUp = false; });
    client.on('caught_up', () => {
      this._caughtUp = true;
      for (const w of this._caughtUpWaiters.splice(0)) w();
    });
    client.on('event', (e) => this._record(e));
  }

  _record(e) {
    if (!e.run_id) return;
    let run = this._runs.get(e.run_id);
    if (!run) {
      run = { thread: e.thread_id, events: [], seqs: new Set(), closed: false, listeners: new Set() };
      this._runs.set(e.run_id, run);
      this._prune();
    }
    if (run.seqs.has(e.seq)) return; // seen (a replay)
    run.seqs.add(e.seq);
    run.events.push(e);
    if (CLOSING.has(e.event)) run.closed = true;
    if (e.event === 'agent_started' && e.thread_id != null) {
      const w = this._waiting.get(e.thread_id);
      if (w && (e.data?.message_id == null || e.data.message_id === w.messageId)) {
        this._waiting.delete(e.thread_id);
        w.take(e.run_id);
      }
    }
    for (const l of run.listeners) l(e);
  }

  _prune() {
    const closed = [...this._runs].filter(([, r]) => r.closed && r.listeners.size === 0);
    for (const [id] of closed.slice(0, Math.max(0, closed.length - KEEP_CLOSED))) this._runs.delete(id);
  }

  /** The open run of a chat (thread), if any. */
  _openRun(chatId) {
    for (const [id, r] of this._runs) if (r.thread === chatId && !r.closed) return id;
    return null;
  }

  /**
   * A stream of `runId`'s chunks: what was recorded, then live, until it
   * ends. An abort (or the reader's cancel) detaches it, even one that comes
   * before the run is known; nothing is enqueued after that.
   */
  _streamRun(runIdPromise, abortSignal) {
    let detach = () => {};
    let done = false;
    const stop = () => { done = true; detach(); };
    return new ReadableStream({
      start: async (controller) => {
        const end = () => {
          stop();
          try { controller.close(); } catch { /* cancelled by the reader */ }
        };
        let runId;
        try {
          runId = await runIdPromise;
        } catch (err) {
          if (!done) controller.enqueue({ type: 'error', errorText: String(err?.message ?? err) });
          end();
          return;
        }
        if (runId == null || done || abortSignal?.aborted) { end(); return; }
        const run = this._runs.get(runId);
        const chunk = runChunker(runId);
        const feed = (e) => {
          if (done) return;
          for (const c of chunk(e)) controller.enqueue(c);
          if (CLOSING.has(e.event)) end();
        };
        detach = () => run.listeners.delete(feed);
        for (const e of [...run.events].sort((a, b) => a.seq - b.seq)) feed(e);
        if (done) return;
        run.listeners.add(feed);
        abortSignal?.addEventListener('abort', () => {
          if (done) return;
          end();
          if (this.cancelOnAbort) this.client.cancel(runId).catch(() => {});
        }, { once: true });
      },
      cancel: stop,
    });
  }

  /**
   * Send the chat's last user message; the stream carries the run that
   * answers it (the run whose `agent_started` names the message in
   * `data.message_id`, or the next run of this chat when the backend does not
   * say).
   */
  async sendMessages({ chatId, messages, abortSignal, trigger }) {
    const message = [...messages].reverse().find((m) => m.role === 'user');
    if (!message) throw new Error('HeraldChatTransport: no user message to send');
    const text = (message.parts ?? []).filter((p) => p.type === 'text').map((p) => p.text).join('');
    // A regeneration is a new request: a new id (the server forwards an id once).
    const id = trigger === 'regenerate-message' ? `${message.id}:${Date.now().toString(36)}` : message.id;
    let take;
    const runId = new Promise((resolve) => { take = resolve; });
    this._waiting.set(chatId, { messageId: id, take });
    const sent = this.client.sendMessage(chatId, text, {}, { id }).catch((err) => {
      if (this._waiting.get(chatId)?.take === take) this._waiting.delete(chatId);
      throw err;
    });
    // The run, unless the send fails first.
    const first = Promise.race([runId, sent.then(() => runId)]);
    return this._streamRun(first, abortSignal);
  }

  /**
   * After a reload: the chat's open run from its `agent_started` (replayed by
   * the server), then live; `null` when no run of this chat is open. Waits
   * for the client's catch-up (`caught_up`) to know.
   */
  async reconnectToStream({ chatId, abortSignal }) {
    if (!this._caughtUp) await new Promise((resolve) => this._caughtUpWaiters.push(resolve));
    const runId = this._openRun(chatId);
    if (runId == null) return null;
    return this._streamRun(Promise.resolve(runId), abortSignal);
  }

  /** Stop the chat's open run (sends `cancel`); resolves false when none is open. */
  async cancel(chatId) {
    const runId = this._openRun(chatId);
    if (runId == null) return false;
    await this.client.cancel(runId);
    return true;
  }
}
