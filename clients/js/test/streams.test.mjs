// Shared streams in the browser client (`client.subscribe`), against a real
// Herald (zero-config: the demo agent answers): routing, writing, resume
// across reconnects and reloads, refusals, unsubscribe.
// Run: HERALD_BIN=… node --experimental-websocket --test test/streams.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { HeraldClient, Subscription } from '../herald.js';
import { startHerald, mintTokenWithStreams, api, until, wsRecorder, fakeClock, joinDeltas } from './helpers.mjs';

let h;
before(async () => { h = await startHerald({}); });
after(async () => { await h.stop(); });

const url = () => `ws://${h.addr}/ws`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** Publish `n` `note` events to shared stream `stream` through the API. */
const pubStream = (stream, n, data = {}) =>
  api(h, '/api/v1/events', { events: Array.from({ length: n }, (_, i) => ({ stream, event: 'note', data: { ...data, i } })) });
/** A `getToken` minting a different token (same grants) on every call: a kick is survived. */
function streamTokens(sub, streams) {
  let calls = 0;
  return async () => { calls += 1; return mintTokenWithStreams(h.secret, sub, streams, 3600 + calls); };
}
/** A storage in memory (what sessionStorage is to a page). */
function memoryStorage() {
  const m = new Map();
  return { map: m, getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => { m.set(k, String(v)); } };
}
const subscribesOf = (rec, stream) => rec.sent.filter((f) => f.type === 'subscribe' && f.stream === stream);

test('a subscription gets its stream\'s events; the client\'s own handlers do not, and own events stay on the client', async () => {
  const c = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'sa1', { 'thread:s1': 'rw' }) });
  const own = [];
  const ownNotes = [];
  c.on('event', (e) => own.push(e));
  c.on('note', (e) => ownNotes.push(e));
  const sub = c.subscribe('thread:s1');
  assert.ok(sub instanceof Subscription);
  assert.equal(c.subscribe('thread:s1'), sub, 'one Subscription per stream');
  assert.equal(sub.stream, 'thread:s1');
  assert.equal(sub.state, 'subscribing');
  const subscribed = [];
  const events = [];
  const notes = [];
  const caughtUp = [];
  sub.on('subscribed', (f) => subscribed.push(f));
  sub.on('event', (e) => events.push(e));
  sub.on('note', (e) => notes.push(e));
  sub.on('caught_up', (f) => caughtUp.push(f));
  c.connect();
  await until(() => sub.state === 'subscribed', 5000, 'subscribed');
  assert.equal(subscribed.length, 1);
  assert.equal(subscribed[0].stream, 'thread:s1');
  assert.equal(sub.write, true);
  assert.deepEqual(sub.position, { epoch: subscribed[0].epoch, seq: subscribed[0].seq });
  assert.deepEqual(caughtUp, [{ seq: subscribed[0].seq, stream: 'thread:s1' }]);

  await pubStream('thread:s1', 2);
  await until(() => events.length === 2, 5000, 'two stream events');
  assert.deepEqual(events.map((e) => [e.seq, e.stream, e.event, e.data.i]), [[1, 'thread:s1', 'note', 0], [2, 'thread:s1', 'note', 1]]);
  assert.equal(notes.length, 2, 'dispatched by name on the subscription');
  assert.deepEqual(sub.position, { epoch: subscribed[0].epoch, seq: 2 });

  // An event of the user's own stream: the client's, not the subscription's.
  await api(h, '/api/v1/events', { user_id: 'sa1', event: 'note', data: { own: true } });
  await until(() => own.length === 1, 5000, 'the own event');
  await sleep(200);
  assert.equal(own[0].stream, undefined);
  assert.equal(own[0].data.own, true);
  assert.equal(ownNotes.length, 1);
  assert.equal(events.length, 2, 'the own event is not the subscription\'s');
  assert.ok(own.every((e) => e.stream == null), 'no shared-stream event on the client\'s handlers');
  c.close();
});

test('a message sent to the stream is acked and the demo agent answers inside the stream, once each, in seq order', async () => {
  const c = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'sa2', { 'thread:s2': 'rw' }) });
  const own = [];
  const ownTexts = [];
  c.on('event', (e) => own.push(e));
  c.on('text', (t) => ownTexts.push(t));
  c.connect();
  await until(() => c.state === 'open', 5000, 'open');
  // A reader with read-only access sees the same turn.
  const reader = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'sb2', { 'thread:*': 'r' }) });
  const readSub = reader.subscribe('thread:s2');
  const read = [];
  readSub.on('event', (e) => read.push(e));
  reader.connect();
  await until(() => readSub.state === 'subscribed', 5000, 'reader subscribed');
  assert.equal(readSub.write, false);

  const sub = c.subscribe('thread:s2'); // subscribed at once: already open
  const events = [];
  const texts = [];
  sub.on('event', (e) => events.push(e));
  sub.on('text', (t) => texts.push(t));
  let final = null;
  sub.on('agent_completed', (e) => { final = e; });
  const ack = await c.sendMessage('t1', 'hello thread', {}, { stream: 'thread:s2' });
  assert.equal(sub.state, 'subscribed');
  await until(() => final, 10000, 'the answer in the stream');
  assert.match(final.data.final_response, /hello thread/);
  assert.deepEqual(events[0].data, { id: ack.id, text: 'hello thread', data: {}, user_id: 'sa2' });
  assert.equal(events[0].event, 'user_message');
  assert.equal(events[0].thread_id, 't1');
  const names = [...new Set(events.map((e) => e.event))];
  assert.deepEqual(names, ['user_message', 'agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_text_delta', 'agent_completed']);
  assert.equal(events[1].data.message_id, ack.id);
  assert.ok(events.every((e) => e.stream === 'thread:s2'));
  // Every seq once, in order (a frame of joined deltas covers from_seq…seq).
  const turn = joinDeltas(events);
  // The text helper works per subscription.
  assert.equal(texts.at(-1).text, final.data.final_response);
  assert.equal(texts.map((t) => t.delta).join(''), final.data.final_response);
  assert.equal(sub.text(final.run_id), '', 'forgotten once the run closed');
  // Nothing of it on the client's own handlers.
  assert.deepEqual(own, []);
  assert.deepEqual(ownTexts, []);
  // The reader saw the same events and text (its socket may have joined
  // other deltas: how many frames they took is its own).
  await until(() => read.at(-1)?.seq === events.at(-1).seq, 5000, 'the reader has the turn');
  assert.deepEqual(joinDeltas(read), turn);
  // A read-only member may not write: nack forbidden.
  await assert.rejects(reader.sendMessage('t1', 'me too', {}, { stream: 'thread:s2' }), (err) => err.code === 'forbidden');
  c.close();
  reader.close();
});

test('after a kick, the subscription resumes: every seq of the stream once, contiguous, none lost', async () => {
  const rec = wsRecorder();
  const c = new HeraldClient({ url: url(), getToken: streamTokens('sa3', { 'thread:s3': 'rw', 'thread:s3b': 'r' }), WebSocket: rec.WebSocket, backoffBaseMs: 50 });
  const sub = c.subscribe('thread:s3');
  const other = c.subscribe('thread:s3b');
  const seqs = [];
  const otherSeqs = [];
  const subscribed = [];
  const resets = [];
  sub.on('event', (e) => seqs.push(e.seq));
  sub.on('subscribed', (f) => subscribed.push(f));
  sub.on('reset', (f) => resets.push(f));
  other.on('event', (e) => otherSeqs.push(e.seq));
  const whileAway = [];
  c.on('state', (s) => { if (s === 'reconnecting') whileAway.push(sub.state); });
  c.connect();
  await until(() => sub.state === 'subscribed' && other.state === 'subscribed', 5000, 'subscribed');
  await pubStream('thread:s3', 3);
  await pubStream('thread:s3b', 2);
  await until(() => seqs.length === 3 && otherSeqs.length === 2, 5000, 'the first events');
  assert.equal((await api(h, '/api/v1/disconnect', { user_id: 'sa3' })).disconnected, 1);
  // Published while the client is away or reconnecting, interleaved.
  await pubStream('thread:s3', 2);
  await pubStream('thread:s3b', 1);
  await pubStream('thread:s3', 2);
  await until(() => seqs.length >= 7 && otherSeqs.length >= 3, 10000, 'the missed events');
  await pubStream('thread:s3', 1); // and live again after the resubscribe
  await until(() => seqs.length >= 8, 5000, 'a live event');
  await sleep(200);
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.deepEqual(otherSeqs, [1, 2, 3], 'each stream its own seq');
  assert.equal(rec.hellos.length, 2, 'one reconnect');
  const resubscribe = subscribesOf(rec, 'thread:s3')[1];
  assert.deepEqual(resubscribe.resume, { epoch: subscribed[0].epoch, seq: 3 }, 'resumed from the last seq processed');
  assert.equal(subscribed.length, 2);
  assert.equal(subscribed[1].resumed, true);
  assert.deepEqual(resets, []);
  assert.deepEqual(whileAway, ['subscribing'], 'subscribing again while the client reconnects');
  assert.equal(sub.state, 'subscribed');
  assert.deepEqual(sub.position, { epoch: subscribed[0].epoch, seq: 8 });
  c.close();
});

/** A WebSocket delivering every shared-stream event twice (a duplicated delivery). */
function duplicatingWebSocket() {
  return class extends globalThis.WebSocket {
    set onmessage(fn) {
      super.onmessage = (m) => {
        fn(m);
        const f = JSON.parse(m.data);
        if (f.type === 'event' && f.stream) fn(m);
      };
    }
    get onmessage() { return super.onmessage; }
  };
}

test('a stream event delivered twice is processed once (dedupe by seq per stream)', async () => {
  const c = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'sa4', { 'thread:s4': 'r' }), WebSocket: duplicatingWebSocket() });
  const sub = c.subscribe('thread:s4');
  const seqs = [];
  sub.on('event', (e) => seqs.push(e.seq));
  c.connect();
  await until(() => sub.state === 'subscribed', 5000, 'subscribed');
  await pubStream('thread:s4', 3);
  await until(() => seqs.length >= 3, 5000, 'three events');
  await sleep(200);
  assert.deepEqual(seqs, [1, 2, 3]);
  c.close();
});

test('a reload resumes a stream from the stored position; an unknown epoch is told as reset', async () => {
  const storage = memoryStorage();
  const token = mintTokenWithStreams(h.secret, 'sa5', { 'thread:s5': 'r' });
  const first = new HeraldClient({ url: url(), token, storage, storageKey: 'herald:sa5' });
  const sub1 = first.subscribe('thread:s5');
  const seen1 = [];
  sub1.on('event', (e) => seen1.push(e.seq));
  first.connect();
  await until(() => sub1.state === 'subscribed', 5000, 'subscribed');
  await pubStream('thread:s5', 3);
  await until(() => seen1.length === 3, 5000, 'three events');
  first.close();
  assert.deepEqual(JSON.parse(storage.getItem('herald:sa5:stream:thread:s5')), sub1.position);
  await pubStream('thread:s5', 2); // while the page is away

  // The reloaded page subscribes again: exactly the missed events.
  const second = new HeraldClient({ url: url(), token, storage, storageKey: 'herald:sa5' });
  const sub2 = second.subscribe('thread:s5');
  assert.deepEqual(sub2.position, sub1.position, 'loaded from storage');
  const seen2 = [];
  const subscribed = [];
  sub2.on('event', (e) => seen2.push([e.seq, e.replayed === true]));
  sub2.on('subscribed', (f) => subscribed.push(f));
  second.connect();
  await until(() => seen2.length === 2, 5000, 'the missed events');
  assert.deepEqual(seen2, [[4, true], [5, true]]);
  assert.equal(subscribed[0].resumed, true);
  second.close();

  // A position of another epoch (the stream lost its history): reset.
  storage.setItem('herald:sa5:stream:thread:s5', JSON.stringify({ epoch: 'gone', seq: 2 }));
  const third = new HeraldClient({ url: url(), token, storage, storageKey: 'herald:sa5' });
  const sub3 = third.subscribe('thread:s5');
  const resets = [];
  sub3.on('reset', (f) => resets.push(f));
  third.connect();
  await until(() => sub3.state === 'subscribed', 5000, 'subscribed');
  assert.equal(resets.length, 1);
  assert.equal(resets[0].reset, true);
  assert.deepEqual(sub3.position, { epoch: sub1.position.epoch, seq: 5 });
  third.close();
});

test('replayActiveRuns: a page opened mid-run is replayed the stream\'s open run', async () => {
  const ev = (event, data = {}) => ({ stream: 'thread:s6', event, run_id: 'r6', thread_id: 't6', data });
  await api(h, '/api/v1/events', { events: [{ stream: 'thread:s6', event: 'note' }, ev('agent_started'), ev('agent_text_delta', { part: 'answer', text: 'Hel' })] });
  const c = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'sa6', { 'thread:s6': 'r' }) });
  const sub = c.subscribe('thread:s6', { replayActiveRuns: true });
  const got = [];
  const texts = [];
  let caughtUp = null;
  sub.on('event', (e) => got.push([e.seq, e.event, e.replayed === true]));
  sub.on('text', (t) => texts.push(t.text));
  sub.on('caught_up', (f) => { caughtUp = f; });
  c.connect();
  await until(() => caughtUp, 5000, 'caught up');
  assert.deepEqual(got, [[2, 'agent_started', true], [3, 'agent_text_delta', true]]);
  await api(h, '/api/v1/events', ev('agent_text_delta', { part: 'answer', text: 'lo' }));
  await until(() => got.length === 3, 5000, 'a live delta');
  assert.deepEqual(texts, ['Hel', 'Hello']);
  assert.equal(sub.text('r6'), 'Hello');
  c.close();
});

test('a refused subscribe fails for good: error forbidden (or invalid_field), no retry, not resubscribed after a reconnect', async () => {
  const rec = wsRecorder();
  const c = new HeraldClient({ url: url(), getToken: streamTokens('sa7', { 'thread:s7': 'r' }), WebSocket: rec.WebSocket, backoffBaseMs: 50 });
  const denied = c.subscribe('thread:secret');
  const invalid = c.subscribe('user:someone');
  const ok = c.subscribe('thread:s7');
  const errors = [];
  const clientErrors = [];
  denied.on('error', (e) => errors.push(['denied', e.code, e.stream]));
  invalid.on('error', (e) => errors.push(['invalid', e.code, e.stream]));
  c.on('error', (e) => clientErrors.push(e));
  c.connect();
  await until(() => denied.state === 'failed' && invalid.state === 'failed' && ok.state === 'subscribed', 5000, 'answers');
  assert.deepEqual(errors.slice().sort(), [['denied', 'forbidden', 'thread:secret'], ['invalid', 'invalid_field', 'user:someone']]);
  assert.deepEqual(clientErrors, [], 'a stream\'s refusal is its subscription\'s');
  await sleep(500);
  await api(h, '/api/v1/disconnect', { user_id: 'sa7' });
  await until(() => rec.hellos.length === 2 && ok.state === 'subscribed', 10000, 'reconnected');
  await sleep(300);
  assert.equal(subscribesOf(rec, 'thread:secret').length, 1, 'no retry of a forbidden subscribe');
  assert.equal(subscribesOf(rec, 'user:someone').length, 0, 'an invalid name is refused without asking');
  assert.equal(subscribesOf(rec, 'thread:s7').length, 2);
  assert.equal(errors.length, 2);
  assert.equal(denied.state, 'failed');
  // A failed subscription is not handed out again: subscribe() asks anew.
  const again = c.subscribe('thread:secret');
  assert.notEqual(again, denied);
  await until(() => again.state === 'failed', 5000, 'refused again');
  assert.equal(subscribesOf(rec, 'thread:secret').length, 2);
  c.close();
});

test('unsubscribe: unsubscribed comes, later events are not delivered, and a reconnect does not resubscribe', async () => {
  const rec = wsRecorder();
  const c = new HeraldClient({ url: url(), getToken: streamTokens('sa8', { 'thread:s8': 'r' }), WebSocket: rec.WebSocket, backoffBaseMs: 50 });
  const sub = c.subscribe('thread:s8');
  const seqs = [];
  const unsubscribed = [];
  sub.on('event', (e) => seqs.push(e.seq));
  sub.on('unsubscribed', (f) => unsubscribed.push(f));
  c.connect();
  await until(() => sub.state === 'subscribed', 5000, 'subscribed');
  await pubStream('thread:s8', 1);
  await until(() => seqs.length === 1, 5000, 'an event');
  sub.unsubscribe();
  assert.equal(sub.state, 'unsubscribed');
  await until(() => unsubscribed.length === 1, 5000, 'unsubscribed');
  assert.deepEqual(unsubscribed[0], { type: 'unsubscribed', stream: 'thread:s8', reason: 'client' });
  await pubStream('thread:s8', 2);
  await api(h, '/api/v1/disconnect', { user_id: 'sa8' });
  await until(() => rec.hellos.length === 2 && c.state === 'open', 10000, 'reconnected');
  await pubStream('thread:s8', 1);
  await sleep(300);
  assert.deepEqual(seqs, [1]);
  assert.equal(subscribesOf(rec, 'thread:s8').length, 1, 'not resubscribed');
  assert.deepEqual(rec.sent.filter((f) => f.type === 'unsubscribe'), [{ type: 'unsubscribe', stream: 'thread:s8' }]);
  assert.equal(rec.received.filter((f) => f.type === 'event' && f.stream === 'thread:s8').length, 1, 'the server sent nothing more');
  assert.equal(unsubscribed.length, 1);
  c.close();
});

// ---- presence and typing ----

/** A development token (`POST /dev/token`, zero-config only): `room:*` read and write. */
async function devToken(user) {
  const r = await fetch(`http://${h.addr}/dev/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
  if (!r.ok) throw new Error(`/dev/token: HTTP ${r.status} ${await r.text()}`);
  return (await r.json()).token;
}
/** Record a subscription's presence notices, typing notices, errors and `members` events. */
function watchPresence(sub) {
  const seen = { joins: [], leaves: [], typing: [], errors: [], members: [] };
  sub.on('presence_join', (f) => seen.joins.push(f.user_id));
  sub.on('presence_leave', (f) => seen.leaves.push(f.user_id));
  sub.on('typing', (f) => seen.typing.push(f));
  sub.on('error', (e) => seen.errors.push(e));
  sub.on('members', (m) => seen.members.push([...m.keys()].sort()));
  return seen;
}
/** `promise`, or a rejection `timed out: what` after `ms` (a request never settled fails its test, not hangs it). */
function within(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}
/** The members map as sorted [user, connections] pairs. */
const membersOf = (sub) => [...sub.members].map(([id, m]) => [id, m.connections]).sort();
/** A client's own (not stream) handlers never hear of presence or typing. */
function watchClient(c) {
  const heard = [];
  for (const name of ['presence', 'presence_join', 'presence_leave', 'typing', 'members', 'event', 'error']) c.on(name, (f) => heard.push([name, f]));
  return heard;
}

test('presence: each user sees the other\'s join and leave; presence() lists both with counts; members follows', async () => {
  const room = 'room:p1';
  const rec = wsRecorder();
  const ana = new HeraldClient({ url: url(), token: await devToken('pa'), WebSocket: rec.WebSocket, backoffBaseMs: 50 });
  const anaHeard = watchClient(ana);
  const a = ana.subscribe(room);
  const aSeen = watchPresence(a);
  // Asked before there is a connection: sent once subscribed.
  const early = a.presence();
  ana.connect();
  // Presence is recorded a moment after `subscribed`: the answer may not
  // list ana yet; her join notice follows it, and members with it.
  const first = await within(early, 5000, 'the early presence');
  assert.equal(first.type, 'presence');
  assert.equal(first.stream, room);
  assert.ok(Array.isArray(first.users) && first.total_users <= 1, JSON.stringify(first));
  await until(() => aSeen.joins.length === 1, 5000, 'ana told of her own join');
  assert.deepEqual(aSeen.joins, ['pa']);
  assert.deepEqual(membersOf(a), [['pa', 1]]);
  // The early request made the answer; no second one was asked for members.
  assert.equal(rec.sent.filter((f) => f.type === 'presence').length, 1);

  const bob = new HeraldClient({ url: url(), token: await devToken('pb') });
  const b = bob.subscribe(room);
  const bSeen = watchPresence(b);
  bob.connect();
  await until(() => aSeen.joins.includes('pb'), 5000, 'ana told of bob\'s join');
  // Bob's members come from the presence() his subscription asked itself.
  await until(() => b.members.size === 2 && bSeen.joins.length === 1, 5000, 'bob\'s members complete');
  assert.deepEqual(membersOf(b), [['pa', 1], ['pb', 1]]);
  assert.deepEqual(bSeen.joins, ['pb'], 'bob was not there when ana joined');
  assert.deepEqual(membersOf(a), [['pa', 1], ['pb', 1]]);
  assert.deepEqual(aSeen.members.at(-1), ['pa', 'pb']);

  // Ana leaves and comes back: bob sees her leave, then her join.
  a.unsubscribe();
  await until(() => bSeen.leaves.includes('pa'), 5000, 'bob told of ana\'s leave');
  assert.deepEqual(membersOf(b), [['pb', 1]]);
  assert.deepEqual(bSeen.members.at(-1), ['pb']);
  assert.equal(a.members.size, 0, 'an ended subscription knows nobody');
  await assert.rejects(within(a.presence(), 5000, 'a presence of an ended subscription'), (e) => e instanceof Error && e.code === 'not_subscribed' && e.stream === room);
  const a2 = ana.subscribe(room);
  const a2Seen = watchPresence(a2);
  await until(() => bSeen.joins.includes('pa'), 5000, 'bob told of ana\'s join');
  assert.deepEqual(bSeen.joins, ['pb', 'pa']);
  await until(() => a2.members.size === 2, 5000, 'ana\'s members complete');

  // A second connection of bob: counted, not announced.
  const bob2 = new HeraldClient({ url: url(), token: await devToken('pb') });
  const b2 = bob2.subscribe(room);
  bob2.connect();
  await until(async () => b2.state === 'subscribed' && (await a2.presence()).total_connections === 3, 5000, 'bob\'s second tab counted');
  const answered = [];
  const [p, again] = await Promise.all([a2.presence(), a2.presence()].map((q, i) => q.then((r) => { answered.push(i); return r; })));
  assert.deepEqual(answered, [0, 1], 'answered in order');
  for (const answer of [p, again]) {
    assert.deepEqual(answer.users, [{ user_id: 'pa', connections: 1 }, { user_id: 'pb', connections: 2 }]);
    assert.deepEqual([answer.total_users, answer.total_connections], [2, 3]);
  }
  assert.deepEqual(membersOf(a2), [['pa', 1], ['pb', 2]], 'members from the answer');
  assert.deepEqual(a2Seen.joins.filter((u) => u === 'pb'), [], 'no join for a second connection');
  assert.deepEqual(bSeen.joins, ['pb', 'pa']);

  // Bob's first tab closes: still there. His last: gone.
  bob.close();
  await sleep(300);
  assert.deepEqual(a2Seen.leaves, []);
  assert.ok(a2.members.has('pb'));
  bob2.close();
  await until(() => a2Seen.leaves.includes('pb'), 5000, 'ana told of bob\'s leave');
  assert.deepEqual(membersOf(a2), [['pa', 1]]);
  assert.deepEqual(a2Seen.members.at(-1), ['pa']);
  const alone = await a2.presence();
  assert.deepEqual([alone.users, alone.total_users, alone.total_connections], [[{ user_id: 'pa', connections: 1 }], 1, 1]);

  // A request on the wire when the connection drops: rejected. One asked
  // while the client reconnects is sent after the resubscribe.
  const closed = (e) => e instanceof Error && e.code === 'closed' && e.stream === room;
  const lost = a2.presence();
  rec.sockets.at(-1).close();
  await assert.rejects(within(lost, 5000, 'the lost presence'), closed);
  const back = await within(a2.presence(), 5000, 'the presence after the reconnect');
  assert.equal(back.stream, room);
  assert.equal(rec.hellos.length, 2, 'reconnected');
  assert.equal(a2.state, 'subscribed');
  // close() rejects a request still waiting for its subscribe.
  const waiting = new Promise((resolve) => {
    const off = ana.on('state', (s) => {
      if (s !== 'reconnecting') return;
      off();
      assert.equal(a2.state, 'subscribing');
      resolve(a2.presence());
      ana.close();
    });
  });
  rec.sockets.at(-1).close();
  await assert.rejects(within(waiting, 5000, 'the presence waiting at close()'), closed);
  assert.deepEqual(anaHeard, [], 'the client\'s own handlers hear nothing of it');
});

test('typing: relayed to the other users, not to the typist; throttled to one a second; a reader\'s typing is refused on its subscription', async () => {
  const room = 'room:p2';
  const rec = wsRecorder();
  // Ana's throttle runs on a clock the test steps.
  const clock = fakeClock();
  const ana = new HeraldClient({ url: url(), token: await devToken('ta'), WebSocket: rec.WebSocket, clock });
  const bob = new HeraldClient({ url: url(), token: await devToken('tb') });
  const cy = new HeraldClient({ url: url(), token: mintTokenWithStreams(h.secret, 'tc', { 'room:*': 'r' }) });
  const heard = [ana, bob, cy].map(watchClient);
  const [a, b, c] = [ana, bob, cy].map((client) => client.subscribe(room));
  const [aSeen, bSeen, cSeen] = [a, b, c].map(watchPresence);
  assert.equal(a.typing(), false, 'not subscribed yet: nothing sent');
  for (const client of [ana, bob, cy]) client.connect();
  await until(() => [a, b, c].every((s) => s.state === 'subscribed' && s.members.size === 3) , 5000, 'all three in the room');
  assert.deepEqual([a.write, b.write, c.write], [true, true, false]);

  assert.equal(a.typing(), true);
  assert.equal(a.typing(), false, 'throttled');
  clock.advance(999);
  assert.equal(a.typing(), false, 'still throttled');
  await until(() => bSeen.typing.length === 1 && cSeen.typing.length === 1, 5000, 'typing relayed');
  assert.deepEqual(bSeen.typing[0], { type: 'typing', stream: room, user_id: 'ta' });
  assert.deepEqual(cSeen.typing[0], { type: 'typing', stream: room, user_id: 'ta' }, 'a reader sees who types');
  clock.advance(1);
  assert.equal(a.typing(), true, 'a second later');
  assert.deepEqual(rec.sent.filter((f) => f.type === 'typing'), [{ type: 'typing', stream: room }, { type: 'typing', stream: room }], 'two frames went out');

  // Bob types: ana sees it, bob does not.
  assert.equal(b.typing(), true);
  await until(() => aSeen.typing.length === 1, 5000, 'bob\'s typing at ana');

  // The reader may not type: forbidden, on its subscription, which stays.
  assert.equal(c.typing(), true, 'sent: the server decides');
  await until(() => cSeen.errors.length === 1, 5000, 'the refusal');
  assert.deepEqual([cSeen.errors[0].code, cSeen.errors[0].stream], ['forbidden', room]);
  assert.equal(c.state, 'subscribed', 'a refused typing does not end the subscription');
  const p = await c.presence();
  assert.equal(p.total_users, 3, 'and it still answers');
  await sleep(300);
  assert.deepEqual(aSeen.typing.map((f) => f.user_id), ['tb'], 'nothing of the reader, nothing of ana herself');
  // Ana's second frame came well within the server's second: not relayed.
  assert.deepEqual(bSeen.typing.map((f) => f.user_id), ['ta']);
  assert.deepEqual(cSeen.typing.map((f) => f.user_id), ['ta', 'tb']);
  assert.deepEqual([aSeen.errors, bSeen.errors], [[], []]);
  assert.deepEqual(heard, [[], [], []], 'never on the clients\' own handlers');
  for (const client of [ana, bob, cy]) client.close();
});
