// The admin page (/admin) of a three-node fleet sharing one real redis-server,
// driven in Debian's headless Chromium with playwright-core: the strict CSP,
// signing in, the nodes and their charts, the connections and their filters,
// the stream inspector, publishing a test event and kicking a user — checked
// against real WebSocket connections on every node.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startHerald, mintToken, api, until } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const SHOTS = path.resolve(here, '../../../target/e2e');
const DOCS_IMG = path.resolve(here, '../../../docs/img');
const DOCS_SHOTS = process.env.HERALD_DOCS_SHOTS === '1';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

// Production-mode settings, the same on every node; the admin secret differs from the others.
const JWT_SECRET = randomBytes(24).toString('hex'); // 48 characters
const API_KEY = randomBytes(12).toString('hex'); // 24 characters
const ADMIN_SECRET = randomBytes(12).toString('hex'); // 24 characters
const WRONG_SECRET = randomBytes(12).toString('hex');

let redisBin = '';
try { redisBin = execFileSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' }).trim(); } catch { /* none */ }
const skip = redisBin ? false : 'redis-server is not installed (scripts/test.sh installs it)';

let redis;
const nodes = []; // the three herald processes
const nodeIds = []; // their node ids, in the same order
const sockets = []; // every WebSocket opened here
let alice = []; // alice's sockets: one on each node
let bob; // bob's socket, on the second node
let browser, context, page;
const requests = []; // every request the page made: {method, url}
const refused = []; // the page's requests answered 403
const cspViolations = [];
const pageErrors = [];

/** A free TCP port on 127.0.0.1. */
async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** Whether something accepts connections on 127.0.0.1:`port`. */
function listening(port) {
  return new Promise((res) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => { c.destroy(); res(true); });
    c.once('error', () => res(false));
  });
}

/** A welcomed `/ws` socket of `user` on `node`, recording its events and its close code. */
async function connect(node, user) {
  const ws = new WebSocket(`ws://${node.addr}/ws`, ['herald.v1']);
  const s = { ws, user, node, events: [], welcome: null, closeCode: null };
  sockets.push(s);
  s.closed = new Promise((res) => ws.addEventListener('close', (e) => { s.closeCode = e.code; res(e.code); }));
  ws.addEventListener('message', (m) => {
    const f = JSON.parse(m.data);
    if (f.type === 'welcome') s.welcome = f;
    if (f.type === 'event') s.events.push(f);
  });
  await new Promise((res, rej) => {
    ws.addEventListener('open', res, { once: true });
    ws.addEventListener('error', () => rej(new Error(`no WebSocket to ${node.addr}`)), { once: true });
  });
  ws.send(JSON.stringify({ type: 'hello', token: mintToken(JWT_SECRET, user) }));
  await until(() => s.welcome !== null || s.closeCode !== null, 5000, `the welcome of ${user}`);
  assert.ok(s.welcome, `${user} welcomed on ${node.addr} (closed with ${s.closeCode})`);
  return s;
}

/** Stops a herald node, SIGKILL after 5 s. */
async function stopNode(n) {
  const killer = setTimeout(() => n.proc.kill('SIGKILL'), 5000);
  await n.stop();
  clearTimeout(killer);
}

const admin = (p = '') => `http://${nodes[0].addr}/admin${p}`;

/** A request to the first node's admin API from outside the page (no cookie unless given). */
async function adminFetch(p, init = {}) {
  const r = await fetch(admin(`/api${p}`), { ...init, headers: { 'x-herald-admin': '1', 'content-type': 'application/json', ...init.headers } });
  const text = await r.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, body, text };
}

/** The page's session cookie, as a Cookie header. */
async function sessionCookie() {
  return (await context.cookies(admin())).map((c) => `${c.name}=${c.value}`).join('; ');
}

/** The rows of the connections table: [{conn, user}]. */
const connectionRows = () => page.$$eval('#connections tbody tr', (trs) => trs.map((tr) => ({ conn: tr.dataset.conn, user: tr.dataset.user })));

/** Waits until the connections table shows exactly the connections `conns` (any order). */
async function expectConnections(conns, what) {
  const want = [...conns].sort();
  let got = [];
  try {
    await until(async () => {
      got = (await connectionRows()).map((r) => r.conn).sort();
      return JSON.stringify(got) === JSON.stringify(want);
    }, 15000, what);
  } catch (e) {
    assert.fail(`${what}: the table shows ${JSON.stringify(got)}, expected ${JSON.stringify(want)} (${e.message})`);
  }
}

async function shoot(name, { docs } = {}) {
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `admin-${name}.png`), fullPage: true });
  if (docs && DOCS_SHOTS) {
    mkdirSync(DOCS_IMG, { recursive: true });
    await page.screenshot({ path: path.join(DOCS_IMG, `admin-${docs}.png`), fullPage: true });
  }
}

before(async () => {
  if (skip) return;
  const rport = await freePort();
  redis = spawn(redisBin, ['--port', String(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  await until(() => listening(rport), 10000, 'redis-server');
  const env = {
    HERALD_REDIS_URL: `redis://127.0.0.1:${rport}`,
    HERALD_JWT_HS256_SECRET: JWT_SECRET,
    HERALD_API_KEY: API_KEY,
    HERALD_ADMIN_SECRET: ADMIN_SECRET,
    HERALD_DRAIN_WINDOW: '200ms',
  };
  for (let i = 0; i < 3; i += 1) nodes.push(await startHerald(env));

  // alice on every node, bob on the second.
  alice = [];
  for (const n of nodes) alice.push(await connect(n, 'alice'));
  bob = await connect(nodes[1], 'bob');

  // The node of each: from the backend API's fleet-wide connection list.
  let rows = [];
  await until(async () => {
    const r = await fetch(`http://${nodes[0].addr}/api/v1/connections`, { headers: { authorization: `Bearer ${API_KEY}` } });
    if (!r.ok) return false;
    rows = (await r.json()).connections;
    return [...alice, bob].every((s) => rows.some((row) => row.conn_id === s.welcome.conn_id));
  }, 15000, 'the four connections listed across the fleet');
  for (const s of alice) nodeIds.push(rows.find((row) => row.conn_id === s.welcome.conn_id).node);
  assert.equal(new Set(nodeIds).size, 3, `three distinct node ids: ${nodeIds}`);
  assert.equal(rows.find((row) => row.conn_id === bob.welcome.conn_id).node, nodeIds[1]);

  // An agent run of bob's that stays open (no terminal event follows).
  await api(nodes[0], '/api/v1/events', { user_id: 'bob', event: 'agent_started', run_id: 'run-open-1', data: {} });

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on('pageerror', (e) => { pageErrors.push(String(e)); console.error('page error:', e); });
  page.on('console', (m) => {
    if (/Content Security Policy/i.test(m.text())) {
      cspViolations.push(m.text());
      console.error('CSP violation:', m.text());
    }
  });
  page.on('request', (r) => requests.push({ method: r.method(), url: r.url() }));
  page.on('response', (r) => { if (r.status() === 403) refused.push(r.url()); });
});

after(async () => {
  await browser?.close().catch(() => {});
  for (const s of sockets) if (s.closeCode === null) s.ws.close();
  await Promise.all(nodes.map((n) => stopNode(n).catch(() => {})));
  redis?.kill('SIGKILL');
});

test('the page is served under a strict CSP and asks for the secret', { skip, timeout: 30000 }, async () => {
  const response = await page.goto(admin());
  assert.equal(response.status(), 200);
  const csp = response.headers()['content-security-policy'] ?? '';
  assert.match(csp, /script-src 'self'/, `CSP: ${csp}`);
  assert.match(csp, /default-src 'none'/, `CSP: ${csp}`);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/, `CSP: ${csp}`);
  for (const asset of ['/admin.js', '/admin.css']) {
    const r = await fetch(admin(asset));
    assert.equal(r.status, 200, `GET /admin${asset}`);
  }
  await page.locator('#login').waitFor({ state: 'visible' });
  assert.equal(await page.isVisible('#secret'), true);
  assert.equal(await page.isHidden('#dev-signin'), true, 'production mode: no sign-in without the secret');
  assert.equal(await page.isHidden('#dashboard'), true);
  assert.equal(await page.isHidden('#signout'), true);
  const session = await adminFetch('/session');
  assert.equal(session.status, 200);
  assert.deepEqual(session.body, { signed_in: false, needs_secret: true });
  await shoot('login', { docs: 'login' });
});

test('a wrong secret is refused, and the API answers nothing without a session', { skip, timeout: 30000 }, async () => {
  await page.fill('#secret', WRONG_SECRET);
  await page.click('#login-form button[type=submit]');
  await page.locator('#login-error').waitFor({ state: 'visible' });
  assert.match(await page.innerText('#login-error'), /wrong secret/i);
  assert.equal(await page.isHidden('#dashboard'), true);
  assert.equal(await page.isVisible('#login'), true);
  await shoot('login-error');

  const wrong = await adminFetch('/session', { method: 'POST', body: JSON.stringify({ secret: WRONG_SECRET }) });
  assert.equal(wrong.status, 401, wrong.text);
  assert.equal(wrong.body?.error, 'bad_secret');
  const nodesList = await adminFetch('/nodes');
  assert.equal(nodesList.status, 401, nodesList.text);
  assert.equal(nodesList.body?.error, 'not_signed_in');
});

test('the right secret shows the three nodes', { skip, timeout: 60000 }, async () => {
  await page.fill('#secret', ADMIN_SECRET);
  await page.click('#login-form button[type=submit]');
  await page.locator('#dashboard').waitFor({ state: 'visible' });
  await page.waitForFunction(() => window.__adminReady === true);
  assert.equal(await page.isHidden('#login'), true);
  assert.equal(await page.isVisible('#signout'), true);
  assert.equal(await page.inputValue('#secret'), '', 'the secret is not kept in the form');

  let shown = [];
  try {
    await until(async () => {
      shown = await page.$$eval('#nodes tbody tr', (trs) => trs.map((tr) => tr.dataset.node));
      return shown.length === 3 && [...shown].sort().join() === [...nodeIds].sort().join();
    }, 20000, 'the three nodes');
  } catch {
    assert.fail(`#nodes shows ${JSON.stringify(shown)}, expected ${JSON.stringify(nodeIds)}`);
  }
  // The node filter offers every node.
  const options = await page.$$eval('#filter-node option', (os) => os.map((o) => o.value));
  for (const id of nodeIds) assert.ok(options.includes(id), `node ${id} in ${options}`);

  // The session cookie: HttpOnly, SameSite=Strict, and not the secret itself.
  const cookies = await context.cookies(admin());
  assert.ok(cookies.length >= 1, 'a session cookie is set');
  for (const c of cookies) {
    assert.equal(c.httpOnly, true, `${c.name} is HttpOnly`);
    assert.equal(c.sameSite, 'Strict', `${c.name} is SameSite=Strict`);
    assert.ok(!c.value.includes(ADMIN_SECRET), `${c.name} does not carry the secret`);
  }
  assert.equal(await page.evaluate(() => document.cookie), '', 'the page cannot read the session cookie');

  // Signed in, a request without the X-Herald-Admin header is still refused.
  const bare = await page.evaluate(async () => {
    const r = await fetch('/admin/api/nodes', { credentials: 'same-origin' });
    return { status: r.status, body: await r.json().catch(() => null) };
  });
  assert.equal(bare.status, 403);
  assert.equal(bare.body?.error, 'missing_admin_header');
});

test('the connections table lists every socket and filters by user and node', { skip, timeout: 60000 }, async () => {
  const all = [...alice, bob].map((s) => s.welcome.conn_id);
  await page.selectOption('#filter-state', 'ready');
  await expectConnections(all, 'the four ready sockets');
  const rows = await connectionRows();
  for (const s of [...alice, bob]) assert.equal(rows.find((r) => r.conn === s.welcome.conn_id).user, s.user);
  assert.match(await page.innerText('#connections-summary'), /4/);

  await page.fill('#filter-user', 'alice');
  await expectConnections(alice.map((s) => s.welcome.conn_id), "alice's three sockets");
  assert.ok((await connectionRows()).every((r) => r.user === 'alice'));

  await page.fill('#filter-user', '');
  await page.selectOption('#filter-node', nodeIds[1]);
  await expectConnections([alice[1].welcome.conn_id, bob.welcome.conn_id], 'the sockets on the second node');
  await page.selectOption('#filter-node', nodeIds[2]);
  await expectConnections([alice[2].welcome.conn_id], 'the socket on the third node');

  await page.selectOption('#filter-node', 'all');
  await page.selectOption('#filter-state', 'all');
  await expectConnections(all, 'every socket again');
});

test("the stream inspector shows bob's open run", { skip, timeout: 30000 }, async () => {
  await page.fill('#stream-name', 'user:bob');
  await page.click('#stream-show');
  await page.locator('#stream-runs li[data-run="run-open-1"]').waitFor();
  assert.equal(await page.locator('#stream-runs li').count(), 1);
  const position = await page.innerText('#stream-position');
  assert.match(position, /user:bob/);
  const events = await page.$$eval('#stream-events tbody tr', (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  const started = events.find((cells) => cells[1] === 'agent_started');
  assert.ok(started, `agent_started listed: ${JSON.stringify(events)}`);
  assert.equal(started[2], 'run-open-1');

  // A stream nothing was published to: the page shows what the server says
  // (404 no_such_stream: an error; else an empty stream).
  const unknown = await adminFetch('/stream?name=room:nobody-here', { headers: { cookie: await sessionCookie() } });
  await page.fill('#stream-name', 'room:nobody-here');
  await page.click('#stream-show');
  if (unknown.status === 404) {
    assert.equal(unknown.body?.error, 'no_such_stream');
    await page.locator('#stream-error').waitFor({ state: 'visible' });
    assert.match(await page.innerText('#stream-error'), /no stream/i);
    assert.equal(await page.isHidden('#stream-view'), true);
  } else {
    assert.equal(unknown.status, 200, unknown.text);
    await page.waitForFunction(() => /nobody-here/.test(document.getElementById('stream-position').textContent));
    assert.equal(await page.locator('#stream-runs li').count(), 0);
    assert.equal(await page.isVisible('#stream-no-runs'), true);
    assert.equal(await page.isVisible('#stream-no-events'), true);
  }
  // A name the server refuses: its message is shown.
  const tooLong = `room:${'x'.repeat(300)}`;
  const refusal = await adminFetch(`/stream?name=${tooLong}`, { headers: { cookie: await sessionCookie() } });
  assert.equal(refusal.status, 400, refusal.text);
  await page.fill('#stream-name', tooLong);
  await page.click('#stream-show');
  await page.locator('#stream-error').waitFor({ state: 'visible' });
  assert.equal(await page.innerText('#stream-error'), refusal.body.message);
  assert.equal(await page.isHidden('#stream-view'), true);
  await page.fill('#stream-name', 'user:bob');
  await page.click('#stream-show');
  await page.locator('#stream-runs li[data-run="run-open-1"]').waitFor();
});

test("a test event published from the page reaches bob's socket", { skip, timeout: 30000 }, async () => {
  assert.equal(await page.inputValue('#publish-event'), 'admin_test');
  const publishes = () => requests.filter((r) => r.url.endsWith('/admin/api/publish')).length;

  // Invalid JSON: an error, and nothing sent.
  await page.fill('#publish-target', 'bob');
  await page.fill('#publish-data', '{"text": oops');
  await page.click('#publish-button');
  await page.locator('#publish-result').waitFor({ state: 'visible' });
  assert.match(await page.innerText('#publish-result'), /JSON/);
  assert.equal(publishes(), 0, 'invalid JSON is not sent');

  await page.fill('#publish-data', '{"text":"hello from admin"}');
  await page.click('#publish-button');
  await page.locator('#publish-result[data-seq]').waitFor();
  const seq = Number(await page.getAttribute('#publish-result', 'data-seq'));
  assert.ok(Number.isInteger(seq) && seq > 0, `seq ${seq}`);
  assert.match(await page.innerText('#publish-result'), new RegExp(`\\b${seq}\\b`));
  await until(() => bob.events.some((e) => e.event === 'admin_test' && e.seq === seq), 5000, 'the event on bob\'s socket');
  const got = bob.events.find((e) => e.event === 'admin_test');
  assert.deepEqual(got.data, { text: 'hello from admin' });
  assert.equal(publishes(), 1);
  assert.ok(alice.every((s) => !s.events.some((e) => e.event === 'admin_test')), 'only bob got it');
});

test('the dashboard, with its charts', { skip, timeout: 120000 }, async () => {
  if (DOCS_SHOTS) await docsTraffic();
  // Let the charts gather a few samples (bounded), then take the picture.
  const chartState = () => page.$$eval('#chart-connections, #chart-deliveries', (cs) => cs.map((c) => ({ points: Number(c.dataset.points ?? 0), latest: c.dataset.latest })));
  await until(async () => {
    const [conns, deliveries] = await chartState();
    return conns.points >= 5 && deliveries.points >= 5 && conns.latest === '4';
  }, 30000, 'chart samples').catch(() => {});
  for (const id of ['chart-connections', 'chart-deliveries']) {
    const points = Number(await page.getAttribute(`#${id}`, 'data-points'));
    assert.ok(points >= 1, `${id}: ${points} points`);
    assert.equal(await page.locator(`#${id} path.line`).count(), 1, `${id} draws a line`);
  }
  assert.equal(await page.getAttribute('#chart-connections', 'data-latest'), '4', 'the fleet total: four connections');
  assert.equal(await page.innerText('#chart-connections-now'), '4');
  // The inspector again, now with the test event.
  await page.click('#stream-show');
  await page.locator('#stream-events tbody tr', { hasText: 'admin_test' }).waitFor();
  await page.evaluate(() => window.scrollTo(0, 0));
  await shoot('dashboard', { docs: 'dashboard' });
});

/**
 * For the documentation's picture: 40 s of traffic — events to alice (three
 * sockets, on three nodes) in waves, and a visitor's two sockets coming and
 * going — so the charts have something to show.
 */
async function docsTraffic() {
  const start = Date.now();
  const visitor = [];
  for (let i = 0; Date.now() - start < 40000; i += 1) {
    const at = Date.now() - start;
    if (at > 8000 && visitor.length === 0) visitor.push(await connect(nodes[2], 'carol'), await connect(nodes[0], 'carol'));
    if (at > 24000 && visitor.length === 2) visitor.pop().ws.close();
    if (at > 32000 && visitor.length === 1) visitor.pop().ws.close();
    const burst = 1 + Math.round(3 + 3 * Math.sin(i / 5));
    const events = Array.from({ length: burst }, (_, j) => ({ user_id: 'alice', event: 'agent_note', data: { n: i, j } }));
    await api(nodes[i % 3], '/api/v1/events', { events });
    await new Promise((r) => setTimeout(r, 250));
  }
}

test('kicking alice closes her socket on every node; bob stays', { skip, timeout: 30000 }, async () => {
  // A kick the confirmation dialog cancels sends nothing.
  const kicks = () => requests.filter((r) => r.url.endsWith('/admin/api/kick')).length;
  page.once('dialog', (d) => d.dismiss());
  await page.click(`#connections tbody tr[data-conn="${bob.welcome.conn_id}"] button.kick`);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(kicks(), 0);
  assert.equal(bob.closeCode, null);

  await page.fill('#kick-user', 'alice');
  let asked = '';
  page.once('dialog', (d) => { asked = d.message(); d.accept(); });
  await page.click('#kick-button');
  await page.locator('#kick-result[data-closed]').waitFor();
  assert.match(asked, /alice/);
  assert.equal(await page.getAttribute('#kick-result', 'data-closed'), '3');
  assert.match(await page.innerText('#kick-result'), /3/);

  const codes = await Promise.race([
    Promise.all(alice.map((s) => s.closed)),
    new Promise((_, rej) => setTimeout(() => rej(new Error(`alice's sockets not all closed: ${alice.map((s) => s.closeCode)}`)), 10000)),
  ]);
  assert.deepEqual(codes, [4409, 4409, 4409]);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(bob.closeCode, null, 'bob stays connected');
  assert.equal(bob.ws.readyState, WebSocket.OPEN);
  await expectConnections([bob.welcome.conn_id], 'only bob left');
  await shoot('after-kick');
});

test('signing out shows the login form; the old session is gone', { skip, timeout: 30000 }, async () => {
  await page.click('#signout');
  await page.locator('#login').waitFor({ state: 'visible' });
  assert.equal(await page.isHidden('#dashboard'), true);
  assert.equal(await page.locator('#connections tbody tr').count(), 0, 'nothing of the dashboard is left');
  const status = await page.evaluate(async () => {
    const r = await fetch('/admin/api/nodes', { credentials: 'same-origin', headers: { 'X-Herald-Admin': '1' } });
    return r.status;
  });
  assert.equal(status, 401);
});

test('development mode on a loopback address: signing in needs no secret', { skip, timeout: 30000 }, async () => {
  const dev = await startHerald({}); // zero config: development mode
  nodes.push(dev);
  const devContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  try {
    const devPage = await devContext.newPage();
    devPage.setDefaultTimeout(15000);
    devPage.on('pageerror', (e) => pageErrors.push(String(e)));
    devPage.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) cspViolations.push(m.text()); });
    const devAdmin = `http://${dev.addr}/admin`;
    await devPage.goto(devAdmin);
    await devPage.locator('#dev-signin').waitFor({ state: 'visible' });
    assert.equal(await devPage.isHidden('#secret'), true, 'no secret field');
    await devPage.click('#dev-signin');
    await devPage.locator('#dashboard').waitFor({ state: 'visible' });
    await devPage.waitForFunction(() => window.__adminReady === true);
    await devPage.waitForFunction(() => document.querySelectorAll('#nodes tbody tr').length === 1);
    assert.equal(await devPage.locator('#nodes tbody tr .badge', { hasText: 'none' }).count(), 1, 'no Redis in development mode');
  } finally {
    await devContext.close();
  }
});

test('the secret never appears in a URL or in storage; no CSP violation, no page error', { skip, timeout: 30000 }, async () => {
  assert.ok(!page.url().includes(ADMIN_SECRET), page.url());
  assert.ok(requests.length > 5, `${requests.length} requests seen`);
  const leaked = requests.filter((r) => r.url.includes(ADMIN_SECRET) || r.url.includes(WRONG_SECRET));
  assert.deepEqual(leaked, []);
  // Every API call of the page's own carried the admin header: the one 403 is the test's bare fetch.
  assert.equal(refused.length, 1, `403 answers: ${JSON.stringify(refused)}`);
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
  assert.ok(!stored.includes(ADMIN_SECRET), 'not in web storage');
  assert.deepEqual(cspViolations, []);
  assert.deepEqual(pageErrors, []);
});
