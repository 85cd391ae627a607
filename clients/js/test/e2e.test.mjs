// End-to-end: the demo page served by a zero-config `herald serve`, driven in
// Debian's headless Chromium with playwright-core (no browser download).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startHerald, api, joinDeltas } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const SHOTS = path.resolve(here, '../../../target/e2e');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

let h, browser, page;

before(async () => {
  h = await startHerald({}); // zero config: dev secret, dev API key, demo page, demo agent
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.on('pageerror', (e) => console.error('page error:', e));
});

after(async () => {
  await browser?.close();
  await h?.stop();
});

const runCards = () => page.locator('.run');
const lastRun = () => runCards().last();

/** The demo agent's answer to `text`. */
const answerTo = (text) => `You said: \u201c${text}\u201d. I am Herald's built-in demo agent; set HERALD_WEBHOOK_URL to connect your own.`;

/**
 * Record, from now on, the event frames the page's client hands out
 * (`from_seq` included); `frames()` reads them back.
 */
const recordFrames = () => page.evaluate(() => {
  window.__frames = [];
  window.__herald.client.on('event', (e) => window.__frames.push(e));
});
const frames = () => page.evaluate(() => window.__frames);

async function send(text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

test('type a message and see the run rendered, its answer written word by word', async () => {
  await page.goto(`http://${h.addr}/`);
  await page.fill('#name', 'pat');
  await page.press('#name', 'Enter');
  await page.waitForSelector('#status[data-state="open"]');
  await recordFrames();
  await send('plan my trip to Lisbon');
  await page.waitForSelector('.msg.user[data-pending="false"]'); // acked
  await page.waitForSelector('.run[data-status="completed"]', { timeout: 10000 });
  const run = lastRun();
  // started, 3 × thinking, tool executing + completed, the answer's words,
  // completed: seqs 1..N, each once (deltas that reached the page together
  // come joined in one frame, covering from_seq…seq), each frame shown once.
  const got = await frames();
  joinDeltas(got);
  assert.equal(got[0].from_seq ?? got[0].seq, 1);
  const seqs = await page.evaluate(() => window.__herald.seqs);
  assert.deepEqual(seqs, got.map((e) => e.seq));
  assert.ok(seqs.at(-1) > 17, `${seqs.at(-1)} seqs`);
  assert.equal(await run.locator('[data-event="agent_thinking"]').count(), 3);
  assert.equal(await run.locator('.tool[data-status="done"]').count(), 1);
  assert.equal(await run.locator('.answer').innerText(), answerTo('plan my trip to Lisbon'));
  assert.equal(await run.locator('.final > *').count(), 1, 'the final response is not shown twice');
  assert.equal(await run.locator('.badge').innerText(), 'done');
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, 'demo-chat.png'), fullPage: true });
});

test('reload mid-run shows the whole run', async () => {
  await send('a question to reload during');
  await page.waitForSelector('.run[data-started="true"][data-status="running"] [data-event="agent_thinking"]');
  const runId = await lastRun().getAttribute('data-run-id');
  await page.reload();
  await page.waitForSelector('#status[data-state="open"]');
  const card = page.locator(`.run[data-run-id="${runId}"]`);
  await card.waitFor();
  // The run is rebuilt from agent_started: its first thinking line is there.
  await page.waitForSelector(`.run[data-run-id="${runId}"][data-status="completed"]`, { timeout: 10000 });
  assert.equal(await card.getAttribute('data-started'), 'true');
  assert.match(await card.locator('.thinking').innerText(), /Reading your message/);
  assert.equal(await card.locator('.tool[data-status="done"]').count(), 1);
  // The reload resumed from the stored position (storageKey) and still got
  // the whole run, each event once.
  assert.equal(await card.locator('[data-event="agent_thinking"]').count(), 3);
  const seqs = await page.evaluate(() => window.__herald.seqs);
  assert.equal(new Set(seqs).size, seqs.length, `duplicates after reload: ${seqs}`);
  // The question that started the run is shown with it, once, before it.
  const asked = page.locator('.msg.user', { hasText: 'a question to reload during' });
  assert.equal(await asked.count(), 1);
  assert.ok(await precedes(asked, card), 'the question comes before its run');
});

/** Whether `a`'s element comes before `b`'s in the document. */
async function precedes(a, b) {
  const other = await b.elementHandle();
  return a.evaluate((x, y) => Boolean(x.compareDocumentPosition(y) & Node.DOCUMENT_POSITION_FOLLOWING), other);
}

test('a question sent in one tab appears in the other before its answer', async () => {
  const other = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  other.on('pageerror', (e) => console.error('page error (second tab):', e));
  try {
    await other.goto(`http://${h.addr}/`);
    await other.fill('#name', 'pat');
    await other.press('#name', 'Enter');
    await other.waitForSelector('#status[data-state="open"]');
    const text = 'asked in one tab, seen in both';
    await send(text);
    const there = other.locator('.msg.user', { hasText: text });
    await there.waitFor();
    await other.waitForSelector('.run[data-status="completed"] >> nth=-1');
    const card = other.locator('.run').last();
    assert.ok(await precedes(there, card), 'the question is above the run that answers it');
    const questionSeq = Number(await there.getAttribute('data-seq'));
    const seqs = await other.evaluate(() => window.__herald.seqs);
    const at = seqs.indexOf(questionSeq);
    assert.ok(at >= 0, `question seq ${questionSeq} in ${seqs}`);
    assert.ok(seqs.slice(at + 1).length > 5, 'the run followed the question');
    assert.equal(await there.count(), 1);
    // The sending tab shows its own bubble once: the stored event matched it.
    await page.waitForSelector(`.run[data-status="completed"] >> nth=-1`);
    const mine = page.locator('.msg.user', { hasText: text });
    assert.equal(await mine.count(), 1);
    assert.equal(await mine.getAttribute('data-stored'), 'true');
    assert.equal(await mine.getAttribute('data-pending'), 'false');
    mkdirSync(SHOTS, { recursive: true });
    await other.screenshot({ path: path.join(SHOTS, 'demo-second-tab.png'), fullPage: true });
  } finally {
    await other.close();
  }
});

test('reload mid-answer shows the answer text once', async () => {
  // A long message makes a long answer (the demo writes a word every 30 ms),
  // so the reload lands mid-answer even on a busy machine.
  const message = `reload while you write ${'and keep writing '.repeat(12).trim()}`;
  await send(message);
  await page.waitForSelector('.run[data-status="running"] .answer');
  const runId = await lastRun().getAttribute('data-run-id');
  const partial = await lastRun().locator('.answer').innerText();
  await page.reload();
  await page.waitForSelector('#status[data-state="open"]');
  const card = page.locator(`.run[data-run-id="${runId}"]`);
  await page.waitForSelector(`.run[data-run-id="${runId}"][data-status="completed"]`, { timeout: 10000 });
  const answer = answerTo(message);
  assert.ok(answer.startsWith(partial) && partial.length < answer.length, `reloaded at: ${partial}`);
  assert.equal(await card.locator('.answer').innerText(), answer);
  assert.equal(await card.locator('[data-event="agent_thinking"]').count(), 3);
  const seqs = await page.evaluate(() => window.__herald.seqs);
  assert.equal(new Set(seqs).size, seqs.length, `duplicates after reload: ${seqs}`);
});

test('a kick through the API reconnects with no lost events', async () => {
  await recordFrames();
  await send('keep going through a kick');
  await page.waitForSelector('.run[data-status="running"] [data-event="agent_thinking"]');
  const runId = await lastRun().getAttribute('data-run-id');
  const kicked = await api(h, '/api/v1/disconnect', { user_id: 'pat' });
  assert.equal(kicked.disconnected, 1);
  await page.waitForSelector(`.run[data-run-id="${runId}"][data-status="completed"]`, { timeout: 10000 });
  const { seqs, closes, state } = await page.evaluate(() => ({ seqs: window.__herald.seqs, closes: window.__herald.closes, state: window.__herald.client.state }));
  assert.ok(closes.includes(4409), `closes: ${closes}`);
  assert.equal(state, 'open');
  // No duplicates, and the frames of the turn, across the kick, cover
  // every seq once, in order.
  assert.equal(new Set(seqs).size, seqs.length);
  joinDeltas(await frames());
  const card = page.locator(`.run[data-run-id="${runId}"]`);
  assert.equal(await card.locator('[data-event="agent_thinking"]').count(), 3);
  assert.equal(await card.locator('.tool[data-status="done"]').count(), 1);
  assert.equal(await card.locator('.answer').innerText(), answerTo('keep going through a kick'));
});

test('the Stop button cancels the run', async () => {
  await send('stop me');
  await page.waitForSelector('#stop:not([hidden])');
  await page.waitForSelector('.run[data-status="running"][data-started="true"]');
  await page.click('#stop');
  await page.waitForSelector('.run[data-status="cancelled"]', { timeout: 5000 });
  assert.equal(await lastRun().locator('.badge').innerText(), 'stopped');
  await page.screenshot({ path: path.join(SHOTS, 'demo-chat-stopped.png'), fullPage: true });
});

test('parallel calls of one tool are paired by tool_call_id', async () => {
  const ev = (event, data) => ({ user_id: 'pat', event, run_id: 'run_par', thread_id: 'demo-thread', data });
  await api(h, '/api/v1/events', { events: [
    ev('agent_started', {}),
    ev('tool_executing', { tool: 'search', tool_call_id: 'call_a', input: { q: 'a' } }),
    ev('tool_executing', { tool: 'search', tool_call_id: 'call_b', input: { q: 'b' } }),
    ev('tool_completed', { tool: 'search', tool_call_id: 'call_b', output: { summary: 'b done' } }),
  ] });
  const card = page.locator('.run[data-run-id="run_par"]');
  await card.locator('.tool[data-status="done"]').first().waitFor();
  assert.equal(await card.locator('.tool').count(), 2);
  assert.equal(await card.locator('.tool[data-status="done"]').count(), 1);
  assert.match(await card.locator('.tool').nth(1).innerText(), /b done/, 'the second call is the one done');
  await api(h, '/api/v1/events', { events: [ev('tool_completed', { tool: 'search', tool_call_id: 'call_a', output: { summary: 'a done' } }), ev('agent_completed', { final_response: 'ok' })] });
  await page.waitForSelector('.run[data-run-id="run_par"][data-status="completed"]');
  assert.equal(await card.locator('.tool[data-status="done"]').count(), 2);
  assert.match(await card.locator('.tool').nth(0).innerText(), /a done/);
});

test('a shared room: two people and the demo agent, presence, typing, a stopped run', async () => {
  const open = async (name) => {
    const p = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    p.on('pageerror', (e) => console.error(`page error (${name}):`, e));
    await p.goto(`http://${h.addr}/?room=lobby`);
    await p.fill('#name', name);
    await p.press('#name', 'Enter');
    await p.waitForSelector('#status[data-state="open"]');
    return p;
  };
  const ana = await open('ana');
  const bob = await open('bob');
  try {
    // Each sees both in the room (the answer to presence, then the join).
    for (const p of [ana, bob]) {
      await p.waitForFunction(() => document.querySelector('#room')?.dataset.members === 'ana,bob', null, { timeout: 10000 });
    }
    // Bob types: Ana sees it; Bob does not see himself typing.
    await bob.type('#text', 'hel');
    await ana.waitForSelector('#typing:not([hidden])');
    assert.equal(await ana.getAttribute('#typing', 'data-user'), 'bob');
    assert.equal(await bob.isHidden('#typing'), true);
    // Ana asks in the room: Bob sees her question, with her name, and the
    // demo agent's run in the room; Ana sees her own bubble once.
    await ana.fill('#text', 'what shall we build?');
    await ana.press('#text', 'Enter');
    const asked = bob.locator('.msg.other', { hasText: 'what shall we build?' });
    await asked.waitFor();
    assert.equal(await asked.getAttribute('data-from'), 'ana');
    for (const p of [ana, bob]) {
      await p.waitForSelector('.run[data-status="completed"]', { timeout: 15000 });
      assert.equal(await p.locator('.run').count(), 1, 'one run, in the room');
      assert.equal(await p.locator('.msg', { hasText: 'what shall we build?' }).count(), 1);
    }
    const seqs = await bob.evaluate(() => window.__herald.sub.position.seq);
    assert.ok(seqs > 5, `room seq ${seqs}`);
    mkdirSync(SHOTS, { recursive: true });
    await bob.screenshot({ path: path.join(SHOTS, 'demo-room.png'), fullPage: true });
    // Bob stops Ana's next run: a member with write may.
    await ana.fill('#text', 'a long one to stop');
    await ana.press('#text', 'Enter');
    await bob.waitForSelector('.run[data-status="running"][data-started="true"]', { timeout: 10000 });
    await bob.click('#stop');
    for (const p of [ana, bob]) await p.waitForSelector('.run[data-status="cancelled"]', { timeout: 10000 });
    // Bob leaves: Ana sees only herself.
    await bob.close();
    await ana.waitForFunction(() => document.querySelector('#room')?.dataset.members === 'ana', null, { timeout: 10000 });
  } finally {
    await ana.close();
    if (!bob.isClosed()) await bob.close();
  }
});
