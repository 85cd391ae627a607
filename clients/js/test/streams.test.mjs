// Shared streams in the browser client (`client.subscribe`), against a real
// Herald (zero-config: the demo agent answers): routing, writing, resume
// across reconnects and reloads, refusals, unsubscribe.
// Run: HERALD_BIN=… node --experimental-websocket --test test/streams.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { HeraldClient, Subscription } from '../herald.js';
import { startHerald, mintTokenWithStreams, api, until, wsRecorder } from './helpers.mjs';

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
  const seqs = events.map((e) => e.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i), 'contiguous, each once');
  // The text helper works per subscription.
  assert.equal(texts.at(-1).text, final.data.final_response);
  assert.equal(texts.map((t) => t.delta).join(''), final.data.final_response);
  assert.equal(sub.text(final.run_id), '', 'forgotten once the run closed');
  // Nothing of it on the client's own handlers.
  assert.deepEqual(own, []);
  assert.deepEqual(ownTexts, []);
  // The reader saw the same frames.
  await until(() => read.length === events.length, 5000, 'the reader has the turn');
  assert.deepEqual(read.map((e) => e.seq), seqs);
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
