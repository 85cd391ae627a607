// The example's app server: what a product's own backend does for Herald.
// It serves the built page and mints Herald tokens (HS256 JWTs, the secret
// shared with `herald serve`) for its signed-in user. The page talks to
// Herald directly over WebSocket; this server never sees the chat traffic.
//
//   HERALD_JWT_HS256_SECRET=...  the secret Herald verifies tokens with (required)
//   HERALD_URL=ws://127.0.0.1:8080/ws  where the page connects
//   HERALD_AI_URL=ws://127.0.0.1:8080/ai  where the stock-transport page (/stock) connects
//                                (default: HERALD_URL with /ws replaced by /ai)
//   PORT=3000                    where this server listens (0: any free port)
//   ALLOWED_HOSTS=chat.example.com,...  more `Host` values it answers (behind a proxy)
//
// It answers only requests whose `Host` is one it serves (127.0.0.1:<port>,
// localhost:<port>, ALLOWED_HOSTS) and whose `Origin`, when present, is that
// same host: 403 otherwise. Without this a page on another site could mint
// tokens through DNS rebinding (evil.example resolving to 127.0.0.1).
import { createServer } from 'node:http';
import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const secret = process.env.HERALD_JWT_HS256_SECRET;
if (!secret) {
  console.error('react-chat: set HERALD_JWT_HS256_SECRET (as printed by `herald serve`)');
  process.exit(2);
}
const heraldUrl = process.env.HERALD_URL ?? 'ws://127.0.0.1:8080/ws';
const aiUrl = process.env.HERALD_AI_URL ?? heraldUrl.replace(/\/ws$/, '/ai');
const TOKEN_TTL_S = Number(process.env.TOKEN_TTL_S ?? 600);
const ALLOWED_HOSTS = (process.env.ALLOWED_HOSTS ?? '')
  .split(',').map((h) => h.trim().toLowerCase()).filter(Boolean);

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
/** An HS256 JWT for `sub`, valid for TOKEN_TTL_S (the client refreshes it before it ends). */
function mint(sub) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + TOKEN_TTL_S });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

const files = {
  '/': ['index.html', 'text/html; charset=utf-8'],
  '/app.js': ['dist/main.js', 'text/javascript; charset=utf-8'],
  // The same chat on the AI SDK's own WebSocketChatTransport (GET /ai).
  '/stock': ['index.html', 'text/html; charset=utf-8'],
  '/stock.js': ['dist/stock.js', 'text/javascript; charset=utf-8'],
};

/** Reads a small JSON body; null when it is not JSON. */
async function json(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 4096) return null;
  }
  try { return JSON.parse(body); } catch { return null; }
}

/** The `Host` values this server answers: its own address and port, and ALLOWED_HOSTS. */
function servedHosts() {
  const { port } = server.address();
  const own = port === 80 ? ['127.0.0.1', 'localhost'] : []; // browsers omit the default port
  return new Set([`127.0.0.1:${port}`, `localhost:${port}`, ...own, ...ALLOWED_HOSTS]);
}

/**
 * Why the request must be refused, or null: its `Host` is not one this
 * server serves (DNS rebinding), or its `Origin` is another site's.
 */
function refusal(req) {
  const host = String(req.headers.host ?? '').toLowerCase();
  if (!servedHosts().has(host)) return 'forbidden host';
  const origin = req.headers.origin;
  if (origin === undefined) return null; // not sent by a browser, or a same-origin GET
  let originHost;
  try {
    const u = new URL(origin);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') return 'cross-origin request';
    originHost = u.host.toLowerCase();
  } catch {
    return 'cross-origin request'; // `null`, or garbage
  }
  return originHost === host ? null : 'cross-origin request';
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const send = (status, type, body) => { res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' }); res.end(body); };
  try {
    const refused = refusal(req);
    if (refused) return send(403, 'application/json', JSON.stringify({ error: refused }));
    if (req.method === 'GET' && files[url.pathname]) {
      const [file, type] = files[url.pathname];
      let body = await readFile(path.join(here, file));
      // The same page, with the stock transport's script.
      if (url.pathname === '/stock') body = body.toString().replace('/app.js', '/stock.js');
      return send(200, type, body);
    }
    if (req.method === 'GET' && url.pathname === '/config.json') {
      return send(200, 'application/json', JSON.stringify({ heraldUrl, aiUrl }));
    }
    if (req.method === 'POST' && url.pathname === '/token') {
      // A real app takes the user from its session; the example trusts the name.
      const body = await json(req);
      const user = typeof body?.user === 'string' ? body.user.trim() : '';
      if (!/^[\w.-]{1,64}$/.test(user)) return send(400, 'application/json', '{"error":"bad user"}');
      return send(200, 'application/json', JSON.stringify({ token: mint(user) }));
    }
    send(404, 'application/json', '{"error":"not found"}');
  } catch (err) {
    send(500, 'application/json', JSON.stringify({ error: String(err?.message ?? err) }));
  }
});

server.listen(Number(process.env.PORT ?? 3000), '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`react-chat listening on http://${address}:${port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
