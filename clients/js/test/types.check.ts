// Compiled by `tsc --noEmit` in `npm test`: the .d.ts must type real use,
// and must refuse wrong use (each @ts-expect-error fails the check if the
// line below it compiles).
import { HeraldClient, HeraldClosedError, type AgentEvents, type HeraldClock, type HeraldEvent, type UserMessageEvent } from '../herald.js';

const c = new HeraldClient({ url: 'ws://localhost/ws', getToken: async () => null });
c.on('agent_thinking', (e) => {
  const text: string | undefined = e.data.text;
  const seq: number = e.seq;
  void text; void seq;
});
c.on('tool_completed', (e) => {
  const tool: string = e.data.tool;
  const id: string | undefined = e.data.tool_call_id;
  void tool; void id;
});
c.on('event', (e) => { const name: string = e.event; void name; });
// Every accepted message is an event; its run's agent_started names it.
c.on('user_message', (e) => {
  const id: string = e.data.id;
  const text: string = e.data.text;
  const data: Record<string, unknown> = e.data.data;
  const sender: string = e.data.user_id;
  const thread: string = e.thread_id;
  void id; void text; void data; void sender; void thread;
});
c.on('agent_started', (e) => { const answers: string | undefined = e.data.message_id; void answers; });
// @ts-expect-error: a message's id is a string
c.on('user_message', (e) => { const n: number = e.data.id; void n; });
c.on('closing', (f) => { const ms: number = f.reconnect_after_ms; void ms; });
// @ts-expect-error: not an event of the map
c.on('agent_thinkin', () => {});
// @ts-expect-error: agent_thinking's text is a string
c.on('agent_thinking', (e) => { const n: number = e.data.text; void n; });

// The timing knobs: a clock (a fake one in tests, a corrected `now` in an
// app) and the refresh margin.
const clock: HeraldClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};
new HeraldClient({ url: 'ws://localhost/ws', getToken: async () => null, clock, refreshMarginMs: 30000 });
// @ts-expect-error: a clock has timers too
new HeraldClient({ url: 'ws://localhost/ws', token: 't', clock: { now: () => 0 } });

// A custom event map extends the default one.
interface MyEvents { note: HeraldEvent<{ body: string }> }
const mine = new HeraldClient<AgentEvents & MyEvents>({ url: 'ws://localhost/ws', token: 't' });
mine.on('note', (e) => { const body: string = e.data.body; void body; });
mine.on('agent_completed', (e) => { void e.data.final_response; });
const question = (e: UserMessageEvent): string => `${e.data.user_id}: ${e.data.text}`;
mine.on('user_message', (e) => { void question(e); });

async function sends(): Promise<void> {
  const ack: { id: string } = await c.sendMessage('t1', 'hi', {}, { id: 'm1' });
  void ack;
  const done: Promise<void> = c.cancel('run_1');
  void done;
  try {
    await c.sendMessage('t1', 'hi');
  } catch (err) {
    if (err instanceof HeraldClosedError) { const code: 'closed' = err.code; void code; }
  }
  // @ts-expect-error: options is an object
  await c.sendMessage('t1', 'hi', {}, 'm1');
}
void sends;

// The transport is an AI SDK ChatTransport.
import type { ChatTransport, UIMessage } from 'ai';
import { HeraldChatTransport } from '../ai.js';
const transport: ChatTransport<UIMessage> = new HeraldChatTransport({ client: c });
void transport;
// @ts-expect-error: a client is required
new HeraldChatTransport({});
