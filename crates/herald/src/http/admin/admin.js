// Herald admin page. Served under a strict CSP (no inline code or styles), so
// everything is built with the DOM API, and every string the server sends —
// user ids, stream names, event data are attacker-controlled — is written
// with textContent, never as markup.

const API = '/admin/api';
const NODES_EVERY_MS = 2000;
const CONNECTIONS_EVERY_MS = 5000;
const CHART_WINDOW_MS = 5 * 60 * 1000;
const BUCKET_MS = 2000;
const CONNECTIONS_LIMIT = 200;
const DATA_CHARS = 120;
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- requests

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * A request to the admin API: JSON in and out, the session cookie, and the
 * `X-Herald-Admin` header the server wants on every call (CSRF defence).
 * Rejects with an ApiError carrying the server's `error` code and `message`.
 */
async function call(method, path, body) {
  const init = {
    method,
    credentials: 'same-origin',
    cache: 'no-store',
    headers: { 'X-Herald-Admin': '1', Accept: 'application/json' },
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch {
    throw new ApiError(0, 'network', 'Could not reach the server.');
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!res.ok) {
    const code = data && typeof data.error === 'string' ? data.error : '';
    const message = data && typeof data.message === 'string' && data.message
      ? data.message
      : `${code || 'error'} (HTTP ${res.status})`;
    if (res.status === 401 && !path.startsWith('/session')) signedOut();
    throw new ApiError(res.status, code, message);
  }
  return data;
}

// ---------------------------------------------------------------- formatting

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const DASH = '\u2014';

function fmtInt(v) {
  return isNum(v) ? Math.round(v).toLocaleString('en-US') : DASH;
}

function fmtDecimal(v) {
  if (!isNum(v)) return DASH;
  if (v === 0) return '0';
  if (Math.abs(v) < 10) return v.toFixed(2).replace(/\.?0+$/, '');
  if (Math.abs(v) < 100) return v.toFixed(1).replace(/\.0$/, '');
  return fmtInt(v);
}

function fmtDuration(ms) {
  if (!isNum(ms)) return DASH;
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

function fmtBytes(v) {
  if (!isNum(v)) return DASH;
  if (v < 1024) return `${v} B`;
  if (v < 1024 * 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${(v / (1024 * 1024)).toFixed(1)} MiB`;
}

function fmtTime(ms) {
  return new Date(ms).toLocaleTimeString('en-GB', { hour12: false });
}

/** `value` as one line of JSON, cut to `max` characters. */
function compactJson(value, max = DATA_CHARS) {
  let s;
  try { s = JSON.stringify(value); } catch { s = String(value); }
  if (s === undefined) s = 'null';
  return s.length > max ? `${s.slice(0, max - 1)}\u2026` : s;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

// ---------------------------------------------------------------- DOM helpers

function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (className) e.className = className;
  return e;
}

function cell(text, className) {
  return el('td', text, className);
}

function badge(text, tone) {
  return el('span', text, tone ? `badge ${tone}` : 'badge');
}

function badgeCell(text, tone) {
  const td = el('td');
  td.append(badge(text, tone));
  return td;
}

/** Shows `text` in a result line, green or (`failed`) red. */
function showResult(target, text, failed = false) {
  target.textContent = text;
  target.classList.toggle('failed', failed);
  target.hidden = false;
}

function showNotice(text) {
  const n = $('notice');
  n.textContent = text;
  n.hidden = !text;
}

// ---------------------------------------------------------------- session

let signedIn = false;
/** Bumped on every sign-in and sign-out: answers to an older one are dropped. */
let generation = 0;
let timers = [];

function stopPolling() {
  for (const t of timers) clearInterval(t);
  timers = [];
}

function showLogin(needsSecret) {
  signedIn = false;
  generation += 1;
  stopPolling();
  clearDashboard();
  $('dashboard').hidden = true;
  $('signout').hidden = true;
  $('status').textContent = '';
  showNotice('');
  $('login').hidden = false;
  $('secret-field').hidden = !needsSecret;
  $('login-submit').hidden = !needsSecret;
  $('secret').required = needsSecret;
  $('dev-signin').hidden = needsSecret;
  $('login-hint').hidden = !needsSecret;
  $('login-hint-dev').hidden = needsSecret;
  (needsSecret ? $('secret') : $('dev-signin')).focus();
}

function loginError(text) {
  const e = $('login-error');
  e.textContent = text;
  e.hidden = !text;
}

/** The server answered "not signed in": back to the login form. */
let askingSession = false;
async function signedOut() {
  if (!signedIn || askingSession) return;
  signedIn = false;
  generation += 1;
  stopPolling();
  askingSession = true;
  let needsSecret = true;
  try {
    const s = await call('GET', '/session');
    needsSecret = s.needs_secret !== false;
  } catch { /* keep the secret form */ } finally {
    askingSession = false;
  }
  showLogin(needsSecret);
  loginError('Your session ended. Sign in again.');
}

async function signIn(body) {
  loginError('');
  const buttons = [$('login-submit'), $('dev-signin')];
  for (const b of buttons) b.disabled = true;
  try {
    await call('POST', '/session', body);
    $('secret').value = '';
    await enterDashboard();
  } catch (e) {
    if (e.status === 401) loginError('Wrong secret');
    else if (e.status === 429) loginError('Too many attempts. Wait a minute, then try again.');
    else loginError(e.message);
    $('secret').select();
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

async function signOut() {
  $('signout').disabled = true;
  try {
    await call('DELETE', '/session');
    let needsSecret = true;
    try { needsSecret = (await call('GET', '/session')).needs_secret !== false; } catch { /* keep the form */ }
    showLogin(needsSecret);
  } catch (e) {
    showNotice(`Could not sign out: ${e.message}`);
  } finally {
    $('signout').disabled = false;
  }
}

// ---------------------------------------------------------------- dashboard

async function enterDashboard() {
  signedIn = true;
  generation += 1;
  stopPolling();
  loginError('');
  $('login').hidden = true;
  $('dashboard').hidden = false;
  $('signout').hidden = false;
  const gen = generation;
  await Promise.allSettled([pollNodes(), refreshConnections()]);
  if (!signedIn || gen !== generation) return;
  window.__adminReady = true;
  timers.push(setInterval(pollNodes, NODES_EVERY_MS));
  timers.push(setInterval(() => refreshConnections(true), CONNECTIONS_EVERY_MS));
}

/** Forget what the signed-out page showed. */
function clearDashboard() {
  $('nodes').tBodies[0].replaceChildren();
  $('connections').tBodies[0].replaceChildren();
  $('stream-events').tBodies[0].replaceChildren();
  $('stream-runs').replaceChildren();
  $('stream-position').replaceChildren();
  $('stream-view').hidden = true;
  for (const id of ['kick-result', 'publish-result', 'stream-error']) $(id).hidden = true;
  for (const id of ['nodes-summary', 'connections-summary', 'chart-connections-now', 'chart-deliveries-now']) $(id).textContent = '';
  for (const id of ['chart-connections', 'chart-deliveries']) $(id).replaceChildren();
  lastNodes = null;
  connectionKeys = '';
}

// ---- nodes and charts

let lastNodes = null;
let nodesBusy = false;

async function pollNodes() {
  if (nodesBusy || !signedIn) return;
  nodesBusy = true;
  const gen = generation;
  try {
    const data = await call('GET', '/nodes');
    if (gen !== generation) return;
    lastNodes = data;
    renderNodes(data);
    $('status').textContent = `Updated ${fmtTime(Date.now())}`;
    $('status').classList.remove('stale');
    showNotice('');
  } catch (e) {
    if (gen !== generation || e.status === 401) return;
    $('status').classList.add('stale');
    showNotice(`Could not load the nodes: ${e.message}`);
  } finally {
    nodesBusy = false;
  }
}

const REDIS_TONE = { ok: 'ok', unavailable: 'bad', none: '' };

function renderNodes(data) {
  const nodes = (Array.isArray(data?.nodes) ? data.nodes : [])
    .filter((n) => n && typeof n.node === 'string')
    .sort((a, b) => a.node.localeCompare(b.node));
  const rows = nodes.map((n) => {
    const tr = el('tr');
    tr.dataset.node = n.node;
    tr.append(
      cell(n.node, 'mono'),
      cell(n.version ?? DASH),
      cell(fmtDuration(isNum(n.uptime_s) ? n.uptime_s * 1000 : NaN), 'num'),
      cell(fmtInt(n.connections), 'num'),
      cell(fmtDecimal(n.deliveries_per_s), 'num'),
      cell(n.p99_ms === null || n.p99_ms === undefined ? DASH : fmtDecimal(n.p99_ms), 'num'),
      badgeCell(String(n.redis ?? DASH), REDIS_TONE[n.redis] ?? 'warn'),
      n.draining ? badgeCell('draining', 'warn') : badgeCell('no'),
    );
    return tr;
  });
  $('nodes').tBodies[0].replaceChildren(...rows);
  const conns = nodes.reduce((s, n) => s + (isNum(n.connections) ? n.connections : 0), 0);
  const rate = nodes.reduce((s, n) => s + (isNum(n.deliveries_per_s) ? n.deliveries_per_s : 0), 0);
  $('nodes-summary').textContent = `${plural(nodes.length, 'node')} \u00b7 ${plural(conns, 'connection')}`;
  $('chart-connections-now').textContent = fmtInt(conns);
  $('chart-deliveries-now').textContent = `${fmtDecimal(rate)}/s`;
  fillNodeFilter(nodes.map((n) => n.node));
  drawCharts(nodes);
}

/** The node filter's options: "all" and every node (and the one chosen, even if gone). */
function fillNodeFilter(ids) {
  const select = $('filter-node');
  const chosen = select.value;
  const want = ['all', ...ids];
  if (chosen !== 'all' && !ids.includes(chosen)) want.push(chosen);
  const have = [...select.options].map((o) => o.value);
  if (have.length === want.length && have.every((v, i) => v === want[i])) return;
  select.replaceChildren(...want.map((id) => {
    const o = el('option', id);
    o.value = id;
    return o;
  }));
  select.value = chosen;
}

/**
 * The fleet's total of `key` per 2 s bucket: each node's samples put in the
 * bucket of their rounded time (the latest wins), a node's missing bucket
 * filled with its previous sample while it reports, summed across nodes, up
 * to the newest bucket every current node has reported.
 */
function fleetSeries(nodes, key) {
  const perNode = [];
  for (const n of nodes) {
    const m = new Map();
    for (const s of Array.isArray(n.series) ? n.series : []) {
      if (!s || !isNum(s.t) || !isNum(s[key])) continue;
      m.set(Math.round(s.t / BUCKET_MS) * BUCKET_MS, s[key]);
    }
    if (m.size) {
      const keys = [...m.keys()];
      perNode.push({ m, first: Math.min(...keys), last: Math.max(...keys) });
    }
  }
  if (!perNode.length) return [];
  const newest = Math.max(...perNode.map((p) => p.last));
  // Nodes more than a few samples behind have stopped: they do not hold the end back.
  const current = perNode.filter((p) => p.last >= newest - 3 * BUCKET_MS);
  const end = Math.min(...current.map((p) => p.last));
  const start = Math.max(Math.min(...perNode.map((p) => p.first)), end - CHART_WINDOW_MS);
  const carried = perNode.map(() => undefined);
  const points = [];
  for (let b = start; b <= end; b += BUCKET_MS) {
    let sum = 0;
    perNode.forEach((p, i) => {
      if (p.m.has(b)) carried[i] = p.m.get(b);
      if (b >= p.first && b <= p.last && carried[i] !== undefined) sum += carried[i];
    });
    points.push({ t: b, v: sum });
  }
  return points;
}

/** A round number at or above `v` (1, 2, 2.5, 5 × 10^k). */
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawCharts(nodes) {
  drawChart($('chart-connections'), fleetSeries(nodes, 'connections'), fmtInt);
  drawChart($('chart-deliveries'), fleetSeries(nodes, 'deliveries_per_s'), (v) => `${fmtDecimal(v)}/s`);
}

/**
 * A line chart of `points` on `root`, sized to its box: the last 5 minutes
 * ending at the newest sample, or, while the fleet has less history than
 * that, the whole minutes it has.
 */
function drawChart(root, points, fmt) {
  const box = root.getBoundingClientRect();
  const w = Math.max(200, Math.round(box.width || 480));
  const h = Math.max(100, Math.round(box.height || 170));
  root.setAttribute('viewBox', `0 0 ${w} ${h}`);
  root.classList.toggle('deliveries', root.id === 'chart-deliveries');
  const left = 6;
  const right = w - 6;
  const top = 20;
  const bottom = h - 20;
  const parts = [];
  const max = niceMax(Math.max(0, ...points.map((p) => p.v)));
  for (const f of [0, 0.5, 1]) {
    const y = bottom - (bottom - top) * f;
    parts.push(svg('line', { x1: left, x2: right, y1: y, y2: y, class: f === 0 ? 'axis' : 'grid' }));
  }
  parts.push(svg('text', { x: left, y: top - 6, class: 'label' }, `max ${fmt(max)}`));
  const newest = points.length ? points[points.length - 1].t : 0;
  const history = points.length ? newest - points[0].t : 0;
  const minutes = Math.min(CHART_WINDOW_MS / 60000, Math.max(1, Math.ceil(history / 60000)));
  const span = minutes * 60000;
  parts.push(svg('text', { x: left, y: h - 4, class: 'label' }, `${minutes} min ago`));
  parts.push(svg('text', { x: right, y: h - 4, class: 'label end' }, 'now'));
  if (points.length) {
    const end = newest;
    const x = (t) => right - ((end - t) / span) * (right - left);
    const y = (v) => bottom - (v / max) * (bottom - top);
    const line = points.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ');
    const area = `${line} L${x(end).toFixed(1)},${bottom} L${x(points[0].t).toFixed(1)},${bottom} Z`;
    parts.push(svg('path', { d: area, class: 'area' }));
    parts.push(svg('path', { d: line, class: 'line' }));
    if (points.length === 1) parts.push(svg('circle', { cx: x(end), cy: y(points[0].v), r: 3, class: 'line' }));
  } else {
    parts.push(svg('text', { x: w / 2, y: (top + bottom) / 2, class: 'nodata' }, 'no samples yet'));
  }
  root.replaceChildren(...parts);
  root.dataset.points = String(points.length);
  root.dataset.max = String(max);
  root.dataset.minutes = String(minutes);
  root.dataset.latest = points.length ? String(points[points.length - 1].v) : '';
}

// ---- connections

let connectionsSeq = 0;
let connectionsBusy = false;
/** The conn_ids shown, in order: rows are updated in place while it stays the same. */
let connectionKeys = '';

/** Loads the connections the filters select; `timer`: a periodic refresh, skipped while one is under way. */
async function refreshConnections(timer = false) {
  if (!signedIn || (timer && connectionsBusy)) return;
  const q = new URLSearchParams();
  const user = $('filter-user').value.trim();
  const node = $('filter-node').value;
  const state = $('filter-state').value;
  if (user) q.set('user', user);
  if (node && node !== 'all') q.set('node', node);
  if (state && state !== 'all') q.set('state', state);
  q.set('limit', String(CONNECTIONS_LIMIT));
  const seq = ++connectionsSeq;
  const gen = generation;
  connectionsBusy = true;
  try {
    const data = await call('GET', `/connections?${q}`);
    if (seq !== connectionsSeq || gen !== generation) return;
    renderConnections(data);
  } catch (e) {
    if (seq !== connectionsSeq || gen !== generation || e.status === 401) return;
    $('connections-summary').textContent = `Could not load the connections: ${e.message}`;
  } finally {
    if (seq === connectionsSeq) connectionsBusy = false;
  }
}

const STATE_TONE = { ready: 'ok', handshaking: 'warn', closing: 'bad', closed: 'bad' };

function connectionCells(c) {
  const user = typeof c.user_id === 'string' ? c.user_id : null;
  const kick = el('button', 'Kick user', 'kick small');
  kick.type = 'button';
  if (user === null) kick.disabled = true;
  else kick.addEventListener('click', () => kickUser(user));
  const action = el('td', undefined, 'num');
  action.append(kick);
  return [
    cell(c.conn_id, 'mono'),
    cell(c.node ?? DASH, 'mono'),
    user === null ? cell('(anonymous)', 'muted') : cell(user),
    badgeCell(String(c.state ?? DASH), STATE_TONE[c.state] ?? ''),
    cell(fmtDuration(c.age_ms), 'num'),
    cell(fmtInt(c.queue_depth), 'num'),
    cell(fmtBytes(c.queued_bytes), 'num'),
    cell(isNum(c.acked_seq) ? fmtInt(c.acked_seq) : DASH, 'num'),
    action,
  ];
}

function connectionRow(c) {
  const tr = el('tr');
  tr.dataset.conn = String(c.conn_id);
  if (typeof c.user_id === 'string') tr.dataset.user = c.user_id;
  tr.append(...connectionCells(c));
  return tr;
}

function renderConnections(data) {
  const list = (Array.isArray(data?.connections) ? data.connections : []).filter((c) => c && c.conn_id !== undefined);
  const tbody = $('connections').tBodies[0];
  const keys = list.map((c) => String(c.conn_id)).join('\n');
  if (keys === connectionKeys && tbody.rows.length === list.length) {
    // The same connections in the same order: update the cells that changed,
    // leaving the rows (and a button about to be clicked) in place.
    list.forEach((c, i) => {
      const tr = tbody.rows[i];
      const user = typeof c.user_id === 'string' ? c.user_id : undefined;
      if (tr.dataset.user !== user) {
        tbody.replaceChild(connectionRow(c), tr);
        return;
      }
      const cells = connectionCells(c);
      for (let j = 0; j < cells.length - 1; j += 1) {
        const old = tr.cells[j];
        if (old.textContent !== cells[j].textContent || old.className !== cells[j].className) tr.replaceChild(cells[j], old);
      }
    });
  } else {
    tbody.replaceChildren(...list.map(connectionRow));
    connectionKeys = keys;
  }
  const total = isNum(data?.total) ? data.total : list.length;
  const summary = $('connections-summary');
  summary.dataset.total = String(total);
  summary.textContent = list.length === total ? plural(total, 'connection') : `${list.length} of ${plural(total, 'connection')}`;
  if (list.length === 0) summary.textContent = 'No connections match';
  if (data?.truncated) summary.append(el('span', 'truncated', 'flag'));
}

async function kickUser(user) {
  const result = $('kick-result');
  if (!user) {
    showResult(result, 'Enter a user id to kick.', true);
    return;
  }
  if (!window.confirm(`Close every connection of user \u201c${user}\u201d on every node?`)) return;
  delete result.dataset.closed;
  try {
    const r = await call('POST', '/kick', { user });
    const closed = isNum(r?.closed) ? r.closed : 0;
    result.dataset.closed = String(closed);
    showResult(result, `Closed ${plural(closed, 'connection')} of ${user}.`);
    refreshConnections();
  } catch (e) {
    if (e.status !== 401) showResult(result, `Kick failed: ${e.message}`, true);
  }
}

// ---- stream inspector

async function showStream() {
  const err = $('stream-error');
  err.hidden = true;
  let name = $('stream-name').value.trim();
  if (!name) {
    err.textContent = 'Enter a stream name, e.g. user:alice or room:lobby.';
    err.hidden = false;
    return;
  }
  if (!name.includes(':')) name = `user:${name}`;
  const gen = generation;
  try {
    const s = await call('GET', `/stream?${new URLSearchParams({ name })}`);
    if (gen !== generation) return;
    renderStream(s);
  } catch (e) {
    if (gen !== generation || e.status === 401) return;
    $('stream-view').hidden = true;
    err.textContent = e.code === 'no_such_stream' ? `No stream named ${name}.` : e.message;
    err.hidden = false;
  }
}

function renderStream(s) {
  const pos = $('stream-position');
  const item = (label, value) => {
    const d = el('div');
    d.append(el('dt', label), el('dd', value ?? DASH));
    return d;
  };
  pos.replaceChildren(
    item('stream', s?.stream),
    item('epoch', s?.epoch),
    item('last seq', isNum(s?.last_seq) ? s.last_seq : DASH),
    item('oldest seq', isNum(s?.oldest_seq) ? s.oldest_seq : DASH),
  );
  const runs = Array.isArray(s?.open_runs) ? s.open_runs : [];
  const list = $('stream-runs');
  list.replaceChildren(...runs.map((r) => {
    const li = el('li', r.thread_id ? `${r.run_id} \u00b7 ${r.thread_id}` : r.run_id);
    li.dataset.run = String(r.run_id);
    if (r.thread_id) li.title = `thread ${r.thread_id}`;
    return li;
  }));
  $('stream-no-runs').hidden = runs.length > 0;
  const events = Array.isArray(s?.events) ? s.events : [];
  $('stream-events').tBodies[0].replaceChildren(...events.map((e) => {
    const tr = el('tr');
    tr.dataset.seq = String(e.seq);
    const data = cell(compactJson(e.data), 'data');
    data.title = compactJson(e.data, 4000);
    const event = cell(e.event, 'mono');
    if (e.ts) event.title = String(e.ts);
    tr.append(cell(e.seq, 'num'), event, cell(e.run_id ?? DASH, 'mono'), data);
    return tr;
  }));
  $('stream-no-events').hidden = events.length > 0;
  $('stream-view').hidden = false;
}

// ---- publish

async function publish() {
  const result = $('publish-result');
  delete result.dataset.seq;
  const target = $('publish-target').value.trim();
  const event = $('publish-event').value.trim();
  const raw = $('publish-data').value;
  if (!target) return showResult(result, 'Enter a user id or a stream name (a name with a colon, like room:lobby).', true);
  if (!event) return showResult(result, 'Enter an event name.', true);
  let data;
  try {
    data = raw.trim() ? JSON.parse(raw) : {};
  } catch (e) {
    return showResult(result, `The data is not valid JSON: ${e.message}`, true);
  }
  const body = target.includes(':') ? { stream: target, event, data } : { user: target, event, data };
  const button = $('publish-button');
  button.disabled = true;
  try {
    const r = await call('POST', '/publish', body);
    result.dataset.seq = String(r?.seq);
    showResult(result, `Published ${event} to ${r?.stream ?? target} at seq ${r?.seq}.`);
  } catch (e) {
    if (e.status !== 401) showResult(result, `Publish failed: ${e.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

function wire() {
  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    signIn({ secret: $('secret').value });
  });
  $('dev-signin').addEventListener('click', () => signIn({}));
  $('signout').addEventListener('click', signOut);

  let typing;
  $('filter-user').addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(() => refreshConnections(), 250);
  });
  for (const id of ['filter-node', 'filter-state']) $(id).addEventListener('change', () => refreshConnections());

  $('kick-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    kickUser($('kick-user').value.trim());
  });
  $('stream-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    showStream();
  });
  $('publish-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    publish();
  });

  let resizing;
  window.addEventListener('resize', () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (lastNodes && signedIn) renderNodes(lastNodes); }, 150);
  });
  $('login-submit').disabled = false;
}

async function boot() {
  wire();
  try {
    const s = await call('GET', '/session');
    if (s?.signed_in) await enterDashboard();
    else showLogin(s?.needs_secret !== false);
  } catch (e) {
    showLogin(true);
    loginError(e.message);
  }
}

boot();
