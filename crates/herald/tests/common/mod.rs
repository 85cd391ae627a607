//! Helpers shared by the integration tests: a real server on 127.0.0.1:0 and
//! real WebSocket / HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod redis_server;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::{Config, Server};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
pub const API_KEY: &str = "test-api-key-0123456789";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An event sink for a broker driven directly, with no node listening: the
/// broker only stores.
#[derive(Debug)]
pub struct NoSink;

impl herald::broker::EventSink for NoSink {
    fn deliver(
        &self,
        _: &str,
        _: &str,
        _: &[herald::broker::StoredEvent],
        _: std::time::Instant,
    ) -> usize {
        0
    }
    fn resync(&self, _: &str, _: &str, _: u64) {}
    fn answer(&self, _: &herald::broker::FleetRequest) -> herald::broker::FleetReply {
        herald::broker::FleetReply::default()
    }
}

pub fn config() -> Config {
    Config::for_tests(SECRET, API_KEY)
}

pub async fn start() -> Server {
    start_with(config()).await
}

/// A server on the given config. Its logs (`RUST_LOG`, else `herald=info`)
/// go to the test's captured output, shown when the test fails.
pub async fn start_with(config: Config) -> Server {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("herald=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    Server::start(config).await.expect("server starts")
}

pub fn token(user: &str) -> String {
    herald::auth::mint_hs256(SECRET, user, Duration::from_secs(3600)).unwrap()
}

pub fn ws_url(server: &Server) -> String {
    format!("ws://{}/ws", server.local_addr())
}

pub fn http_url(server: &Server, path: &str) -> String {
    format!("http://{}{}", server.local_addr(), path)
}

/// Open a WebSocket offering `herald.v1` (plus any extra subprotocols / headers).
pub async fn open(server: &Server, extra_protocols: &[&str], auth_header: Option<&str>) -> Ws {
    let mut req = ws_url(server).into_client_request().unwrap();
    let mut protocols = vec!["herald.v1".to_owned()];
    protocols.extend(extra_protocols.iter().map(|s| s.to_string()));
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&protocols.join(", ")).unwrap(),
    );
    if let Some(a) = auth_header {
        req.headers_mut()
            .insert("Authorization", HeaderValue::from_str(a).unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "herald.v1"
    );
    ws
}

/// Open, send hello with a token for `user`, and return the socket and welcome.
pub async fn connect(server: &Server, user: &str) -> (Ws, Value) {
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": token(user)})).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// Connect to a server by address (e.g. a spawned binary), send hello with
/// `token`, and return the socket and the welcome.
pub async fn hello_at(addr: &str, token: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("upgrade");
    send_json(&mut ws, json!({"type": "hello", "token": token})).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next text frame as JSON (fails on close or timeout).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10s")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Text frames until `pred` holds for one (returned last).
pub async fn until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = next_json(ws).await;
        let done = pred(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
}

/// The next `event` frame within `limit`, for waits longer than the 10 s
/// [`next_json`] allows one frame; panics naming `what`.
pub async fn event_within(ws: &mut Ws, limit: Duration, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no event within {limit:?}"))
            .expect("stream open")
            .expect("no error");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "event" {
                return v;
            }
        }
    }
}

/// Read until the server's close frame; return its code and reason. Text
/// frames before it are returned too.
pub async fn read_until_close(ws: &mut Ws) -> (Option<u16>, String, Vec<Value>) {
    let mut texts = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close within 10s");
        match msg {
            Some(Ok(Message::Text(t))) => texts.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                // Like a well-behaved client: keep polling so the close reply is sent.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while ws.next().await.is_some() {}
                })
                .await;
                return (
                    f.as_ref().map(|f| u16::from(f.code)),
                    f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    texts,
                );
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => return (None, String::new(), texts),
        }
    }
}

pub async fn expect_close(ws: &mut Ws, code: u16) -> String {
    let (got, reason, _) = read_until_close(ws).await;
    assert_eq!(got, Some(code), "close code (reason: {reason})");
    reason
}

pub fn close_code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POST a JSON body to the API with the test key; returns status and JSON body.
pub async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(http_url(server, path))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub async fn publish(server: &Server, user: &str, event: &str, data: Value) -> Value {
    let (status, body) = post(
        server,
        "/api/v1/events",
        json!({"user_id": user, "event": event, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["results"][0].clone()
}

pub async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let resp = client()
        .get(http_url(server, path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Let `d` of server time pass without waiting for it: pause tokio's clock
/// (the server's clock, see `herald::clock`), advance it in small steps so
/// every timer due on the way fires in order, then let it run again. Needs
/// the current-thread runtime (`#[tokio::test]`'s default). Sockets are not
/// waited on while the clock is paused (tokio would auto-advance it).
pub async fn skip(d: Duration) {
    const STEP: Duration = Duration::from_millis(10);
    tokio::time::pause();
    let mut left = d;
    while !left.is_zero() {
        let step = left.min(STEP);
        tokio::time::advance(step).await;
        left -= step;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::resume();
}

/// The server's `/metrics` text.
pub async fn metrics_text(server: &Server) -> String {
    client()
        .get(http_url(server, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Wait until the server has no live connection (bounded).
pub async fn wait_for_no_connections(server: &Server) {
    wait_for_connections(server, 0).await;
}

/// Wait until the server holds exactly `n` connections (bounded: 10 s).
pub async fn wait_for_connections(server: &Server, n: usize) {
    for _ in 0..500 {
        if server.hub().len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} connections live, expected {n}", server.hub().len());
}

/// A masked client frame with FIN set.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Read an HTTP response head from a raw socket, up to its blank line.
pub async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    head
}

/// Open file descriptors of this process. Fails where `/proc` is missing
/// rather than reading 0 (which would make an fd check pass vacuously;
/// issue 17, finding 11).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("the fd check needs /proc/self/fd (Linux)")
        .count()
}

/// Upgrade a raw TCP socket to a WebSocket (no subprotocol) and return it,
/// positioned after the 101 response.
pub async fn raw_upgrade(server: &Server) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A raw WebSocket that has sent its `hello` for `user` (the welcome not yet
/// read): a client whose reads and close frames the test controls.
pub async fn raw_hello(server: &Server, user: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = raw_upgrade(server).await;
    let hello = json!({"type": "hello", "token": token(user)}).to_string();
    s.write_all(&client_frame(0x1, hello.as_bytes()))
        .await
        .unwrap();
    s
}

/// Poll `done` every 50 ms until it holds; past `limit`, panic with `what()`.
pub async fn wait_until(
    limit: Duration,
    mut done: impl FnMut() -> bool,
    what: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Upgrade over a raw TCP socket, write `frames`, return everything the server
/// sent after the 101 response until it closed the connection.
pub async fn raw_frames(server: &Server, frames: &[Vec<u8>]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = raw_upgrade(server).await;
    for f in frames {
        s.write_all(f).await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// Split raw server bytes into (opcode, payload) frames (server frames are unmasked).
pub fn parse_server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let opcode = b[0] & 0x0f;
        let (len, hdr) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => break,
        };
        if b.len() < hdr + len {
            break;
        }
        out.push((opcode, b[hdr..hdr + len].to_vec()));
        b = &b[hdr + len..];
    }
    out
}

/// The close code of the first close frame in raw server bytes.
pub fn close_code_of(bytes: &[u8]) -> Option<u16> {
    parse_server_frames(bytes)
        .into_iter()
        .find(|(op, _)| *op == 0x8)
        .and_then(|(_, p)| (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
}

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// Start `herald serve` with `env` and read its stderr until it prints the
/// listening address; returns the child, the address and what it printed.
pub fn serve(env: &[(&str, &str)]) -> (Child, String, String) {
    let (child, addr, printed, _later) = serve_with_logs(env);
    (child, addr, printed)
}

/// Like [`serve`], and the stderr lines printed after the listening line
/// arrive on the returned channel.
pub fn serve_with_logs(
    env: &[(&str, &str)],
) -> (Child, String, String, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    cmd.env_remove("PORT")
        .env_remove("HERALD_API_KEY")
        .env_remove("HERALD_JWT_HS256_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        printed.push_str(&line);
        printed.push('\n');
        if let Some(addr) = line.strip_prefix("herald listening on ") {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    // Nobody listening any more is fine: keep draining the pipe.
                    let _ = tx.send(line);
                }
            });
            return (child, addr.trim().to_owned(), printed, rx);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no listening line: {printed}");
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
