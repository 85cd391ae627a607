// Compiled by `tsc --noEmit` in `npm test`: the .d.ts must type real use,
// and must refuse wrong use (each @ts-expect-error fails the check if the
// line below it compiles).
import { HeraldClient, HeraldClosedError, Subscription, type AgentEvents, type HeraldClock, type HeraldEvent, type SendOptions, type StreamError, type Subscribed, type SubscriptionState, type UserMessageEvent, type Member, type Presence, type PresenceNotice, type PresenceUser, type StreamRequestError, type TypingNotice } from '../herald.js';

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

// Shared streams: a subscription with its own handlers, typed by the client's event map.
const sub: Subscription = c.subscribe('thread:t1', { replayActiveRuns: true });
const same: Subscription = c.subscribe('thread:t1');
void same;
const subState: SubscriptionState = sub.state;
const canWrite: boolean = sub.write;
const streamName: string = sub.stream;
const at: { epoch: string; seq: number } | null = sub.position;
void subState; void canWrite; void streamName; void at;
sub.on('subscribed', (f: Subscribed) => { const w: boolean = f.write; const e: string = f.epoch; void w; void e; });
sub.on('reset', (f) => { const r: boolean | undefined = f.reset; void r; });
sub.on('caught_up', (f) => { const s: string = f.stream; const n: number = f.seq; void s; void n; });
sub.on('error', (e: StreamError) => { if (e.code === 'forbidden') { const s: string = e.stream; void s; } });
sub.on('unsubscribed', (u) => { const why: string = u.reason; void why; });
sub.on('event', (e) => { const s: string = e.stream; const n: number = e.seq; void s; void n; });
sub.on('user_message', (e) => { const sender: string = e.data.user_id; const s: string = e.stream; void sender; void s; });
sub.on('text', (t) => { const text: string = t.text; void text; });
const partSoFar: string = sub.text('run_1', 'answer');
void partSoFar;
sub.unsubscribe();
// An own-stream event may name no stream.
c.on('event', (e) => { const s: string | undefined = e.stream; void s; });
const mySub = mine.subscribe('room:acme.support');
mySub.on('note', (e) => { const body: string = e.data.body; void body; });
async function sendsToStream(): Promise<void> {
  const opts: SendOptions = { stream: 'thread:t1' };
  await c.sendMessage('t1', 'hi all', {}, opts);
  await c.sendMessage('t1', 'hi all', {}, { id: 'm2', stream: 'thread:t1' });
  // @ts-expect-error: a stream is a string
  await c.sendMessage('t1', 'hi', {}, { stream: 1 });
}
void sendsToStream;
// @ts-expect-error: replayActiveRuns is a boolean
c.subscribe('thread:t1', { replayActiveRuns: 'yes' });
// @ts-expect-error: not an event of the map
sub.on('agent_thinkin', () => {});
// @ts-expect-error: a subscription is made by the client
new Subscription();
// @ts-expect-error: the state is the client's to change
sub.state = 'subscribed';

// Presence and typing in a shared stream.
sub.on('presence_join', (f: PresenceNotice) => { const who: string = f.user_id; const s: string = f.stream; void who; void s; });
sub.on('presence_leave', (f) => { const kind: 'presence_join' | 'presence_leave' = f.type; const who: string = f.user_id; void kind; void who; });
sub.on('typing', (f: TypingNotice) => { const who: string = f.user_id; void who; });
sub.on('members', (m) => { for (const [id, info] of m) { const n: number = info.connections; void id; void n; } });
const members: ReadonlyMap<string, Member> = sub.members;
const bobHere: boolean = sub.members.has('bob');
void members; void bobHere;
async function whoIsThere(): Promise<void> {
  const p: Presence = await sub.presence();
  const first: PresenceUser | undefined = p.users[0];
  const counts: [number, number] = [p.total_users, p.total_connections];
  void first; void counts;
  try {
    await sub.presence();
  } catch (err) {
    const e = err as StreamRequestError;
    const code: string = e.code;
    const s: string = e.stream;
    void code; void s;
  }
  // @ts-expect-error: the answer's users are objects, not ids
  const ids: string[] = p.users;
  void ids;
}
void whoIsThere;
const sent: boolean = sub.typing();
void sent;
// @ts-expect-error: members are the client's to keep
sub.members.set('mallory', { connections: 1 });
// @ts-expect-error: typing takes no text
sub.typing('hello');
// @ts-expect-error: a typing notice names the user
sub.on('typing', (f) => { const n: number = f.user_id; void n; });

// The transport is an AI SDK ChatTransport.
import type { ChatTransport, UIMessage } from 'ai';
import { HeraldChatTransport } from '../ai.js';
const transport: ChatTransport<UIMessage> = new HeraldChatTransport({ client: c });
void transport;
// @ts-expect-error: a client is required
new HeraldChatTransport({});
