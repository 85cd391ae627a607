//! Issue 12, item 4: every way a client can hold the server is bounded, and
//! while one client abuses it the server keeps serving everyone else; once
//! the abuse ends the process is back to its file-descriptor baseline.
//!
//! - an HTTP request whose head never completes (slowloris): closed after
//!   `http_header_timeout`;
//! - an idle keep-alive HTTP connection: closed after the same bound;
//! - WebSockets that never say `hello`: bounded in number
//!   (`max_pending_connections`, HTTP 503 beyond) and in time
//!   (`hello_timeout`, close 4408);
//! - a flood of publishes to many distinct users: history held to
//!   `history_max_bytes`, a connection that does not read held to its queue
//!   bound (closed 4001), a reading one sees every event in order.
//!
//! The tests share the process's file descriptors, so they run one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One test at a time: they count the process's open descriptors.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Wait until the process holds no more descriptors than `baseline`.
async fn back_to(baseline: usize) {
    for _ in 0..500 {
        if open_fds() <= baseline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} descriptors open, baseline {baseline}", open_fds());
}

/// Read until the peer closes; the bytes read. Fails if it stays open `limit`.
async fn read_to_eof(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .expect("read");
    out
}

/// A server, a user connected with hello, and the descriptor count with
/// both open (the baseline the abuse must come back to).
async fn serving(config: herald::Config) -> (herald::Server, Ws, usize) {
    let server = start_with(config).await;
    let (ws, _) = connect(&server, "bystander").await;
    // Warm up what the server opens lazily (the HTTP API, a publish).
    publish(&server, "bystander", "warmup", json!({})).await;
    let mut ws = ws;
    assert_eq!(next_json(&mut ws).await["event"], "warmup");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline = open_fds();
    (server, ws, baseline)
}

/// Everyone else is served: the API answers, the connected user gets an event.
async fn others_are_served(server: &herald::Server, ws: &mut Ws, n: u64) {
    let (status, _) = get_json(server, "/healthz").await;
    assert_eq!(status, 200);
    let seq = publish(server, "bystander", "still_here", json!({"n": n})).await["seq"].clone();
    let event = next_json(ws).await;
    assert_eq!(event["event"], "still_here");
    assert_eq!(event["seq"], seq);
}

#[tokio::test]
async fn an_http_head_that_never_completes_is_closed_after_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.http_header_timeout = Duration::from_millis(800);
    let (server, mut ws, baseline) = serving(cfg).await;
    // 40 slowloris sockets: a request line and one header, then nothing.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // A socket that connects and sends nothing at all is bounded too.
    slow.push(TcpStream::connect(server.local_addr()).await.unwrap());
    // The server accepted and holds every one of them (its end and ours).
    let held = baseline + 2 * slow.len();
    for _ in 0..500 {
        if open_fds() >= held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(open_fds() >= held, "{} open, {held} expected", open_fds());
    others_are_served(&server, &mut ws, 1).await;
    for s in &mut slow {
        let answer = read_to_eof(s, Duration::from_secs(5)).await;
        // Closed without a response to the unfinished request, or with a 408.
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    drop(slow);
    back_to(baseline).await;
    others_are_served(&server, &mut ws, 2).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.http_header_timeout = Duration::from_millis(800);
    let (server, mut ws, baseline) = serving(cfg).await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    // Two requests on one connection: keep-alive works...
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&read_head(&mut s).await).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
    }
    // ...then silence: the server closes the idle connection.
    others_are_served(&server, &mut ws, 1).await;
    assert!(read_to_eof(&mut s, Duration::from_secs(5)).await.is_empty());
    drop(s);
    back_to(baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn websockets_without_hello_are_bounded_in_number_and_time() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.max_pending_connections = 8;
    cfg.lifecycle.hello_timeout = Duration::from_millis(800);
    let (server, mut ws, baseline) = serving(cfg).await;
    let mut anonymous = Vec::new();
    for _ in 0..8 {
        anonymous.push(raw_upgrade(&server).await);
    }
    // The ninth is refused at once: 503, JSON error `pending`.
    let mut ninth = TcpStream::connect(server.local_addr()).await.unwrap();
    ninth.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = String::from_utf8(read_to_eof(&mut ninth, Duration::from_secs(5)).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""error":"pending""#), "{answer}");
    drop(ninth);
    others_are_served(&server, &mut ws, 1).await;
    // The hello timeout closes each with 4408, and the server drops them.
    for s in &mut anonymous {
        let bytes = read_to_eof(s, Duration::from_secs(5)).await;
        assert_eq!(close_code_of(&bytes), Some(4408));
    }
    drop(anonymous);
    back_to(baseline).await;
    // The places came back.
    let (mut late, _) = connect(&server, "late").await;
    send_json(&mut late, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut late).await["type"], "pong");
    drop(late);
    back_to(baseline).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_publish_flood_to_many_users_stays_within_the_memory_bounds() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.history_max_bytes = 2_000_000;
    cfg.lifecycle.max_queue_bytes = 64 * 1024;
    let (server, mut ws, baseline) = serving(cfg).await;
    // A connected user that never reads, in the middle of the flood.
    let (mut stuck, _) = connect(&server, "u7").await;
    let data = json!({"text": "x".repeat(1000)});
    // 20 batches of 500 events to 5,000 distinct users: ~11 MB published.
    for batch in 0..20 {
        let events: Vec<_> = (0..500)
            .map(|i| json!({"user_id": format!("u{}", (batch * 500 + i) % 5000), "event": "flood", "data": data}))
            .collect();
        let (status, body) = post(&server, "/api/v1/events", json!({ "events": events })).await;
        assert_eq!(status, 200, "{body}");
        // Everyone else is served during the flood.
        others_are_served(&server, &mut ws, batch).await;
        let held = server.broker_stats().charged_bytes;
        assert!(
            held <= 2_000_000,
            "history holds {held} bytes over its 2 MB bound"
        );
    }
    // u7 got 2 events and read none: well within its queue, still open...
    // then a burst to it alone overflows its 64 KiB queue: closed 4001, not grown.
    let burst: Vec<_> = (0..200)
        .map(|_| json!({"user_id": "u7", "event": "burst", "data": data}))
        .collect();
    let (status, _) = post(&server, "/api/v1/events", json!({ "events": burst })).await;
    assert_eq!(status, 200);
    let (code, _, _) = read_until_close(&mut stuck).await;
    assert_eq!(code, Some(4001));
    drop(stuck);
    others_are_served(&server, &mut ws, 99).await;
    back_to(baseline).await;
    server.shutdown().await;
}

/// Queues large enough that only the socket, not the queue bound, holds a
/// reader back.
fn roomy_queues(mut cfg: herald::Config) -> herald::Config {
    cfg.lifecycle.max_queue_bytes = 64 << 20;
    cfg.lifecycle.max_queue_frames = 10_000;
    cfg.history_max_bytes = 256 << 20;
    cfg
}

/// Publish 100 events of 60 KiB (`data.n` = 0..100) to `user` in batches of
/// 10, checking after each that everyone else is served; returns the padding.
async fn publish_6_mb(server: &herald::Server, ws: &mut Ws, user: &str) -> String {
    let pad = "p".repeat(60 * 1024);
    for batch in 0..10u64 {
        let events: Vec<_> = (0..10)
            .map(|i| json!({"user_id": user, "event": "big", "data": {"n": batch * 10 + i, "pad": pad}}))
            .collect();
        let (status, body) = post(server, "/api/v1/events", json!({ "events": events })).await;
        assert_eq!(status, 200, "{body}");
        others_are_served(server, ws, batch).await;
    }
    pad
}

/// Issue 15: the write path when a socket fills. A client that stops reading
/// while 6 MB are published to it (more than the socket buffers hold) keeps
/// the rest queued — the frames cut mid-way by a partial write included —
/// while everyone else is served; once it reads again it gets every event
/// once, in order, whole.
#[tokio::test]
async fn a_reader_that_pauses_gets_every_event_in_order_when_it_resumes() {
    let _serial = SERIAL.lock().await;
    let (server, mut ws, baseline) = serving(roomy_queues(config())).await;
    let (mut paused, _) = connect(&server, "pauser").await;
    let pad = publish_6_mb(&server, &mut ws, "pauser").await;
    let queued: usize = server
        .hub()
        .list(None)
        .iter()
        .filter(|c| c.user_id.as_deref() == Some("pauser"))
        .map(|c| c.queue_depth)
        .sum();
    assert!(
        queued > 0,
        "the socket is full and the rest waits in the queue"
    );
    for n in 0..100u64 {
        let event = next_json(&mut paused).await;
        assert_eq!(event["seq"], n + 1);
        assert_eq!(event["data"]["n"], n);
        assert_eq!(event["data"]["pad"].as_str().map(str::len), Some(pad.len()));
    }
    drop(paused);
    others_are_served(&server, &mut ws, 100).await;
    back_to(baseline).await;
    server.shutdown().await;
}

/// Issue 15: a socket that never drains is dropped once a write has waited
/// `write_timeout` (counted as a slow consumer), however large its queue
/// bound; the server serves everyone else meanwhile.
#[tokio::test]
async fn a_socket_that_never_drains_is_dropped_after_the_write_timeout() {
    let _serial = SERIAL.lock().await;
    let mut cfg = roomy_queues(config());
    cfg.write_timeout = Duration::from_millis(500);
    let (server, mut ws, baseline) = serving(cfg).await;
    let before = slow_consumer_closes(&server).await;
    let (stuck, _) = connect(&server, "stuck").await;
    publish_6_mb(&server, &mut ws, "stuck").await;
    // The bystander stays; the stuck socket goes.
    wait_for_connections(&server, 1).await;
    // The metrics recorder is the process's: count this close only.
    assert_eq!(slow_consumer_closes(&server).await, before + 1);
    drop(stuck);
    others_are_served(&server, &mut ws, 10).await;
    back_to(baseline).await;
    server.shutdown().await;
}

/// Connections closed as slow consumers so far (the process's recorder).
async fn slow_consumer_closes(server: &herald::Server) -> u64 {
    metrics_text(server)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("herald_connections_closed_total{")
                && l.contains(r#"reason="slow_consumer""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Issue 37, finding 1: a request without a valid API key is refused from its
/// head, before its body is read: 300 keyless clients that send part of a
/// 1 MiB body and stall are each answered 401 at once and closed, and the
/// API and `/healthz` answer meanwhile.
#[tokio::test]
async fn keyless_requests_are_refused_before_their_body_is_read() {
    let _serial = SERIAL.lock().await;
    let (server, mut ws, baseline) = serving(config()).await;
    let mut slow = Vec::new();
    for i in 0..300 {
        let path = if i % 2 == 0 {
            "/api/v1/events"
        } else {
            "/api/v1/disconnect"
        };
        let key = if i % 3 == 0 {
            "Authorization: Bearer wrong-key-0123456789\r\n"
        } else {
            ""
        };
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b' '; 4096]).await.unwrap();
        slow.push(s);
    }
    others_are_served(&server, &mut ws, 1).await;
    for s in &mut slow {
        // The hang guard: today's code waited for the whole body first.
        let answer = read_to_eof(s, Duration::from_secs(10)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains(r#""error":"unauthorized""#), "{answer}");
    }
    drop(slow);
    back_to(baseline).await;
    others_are_served(&server, &mut ws, 2).await;
    server.shutdown().await;
}

/// Issue 37, finding 1: a body that does not arrive within
/// `http_body_timeout` is answered 408 `body_timeout` (the client has the
/// key; without the deadline it held its buffer for as long as it liked).
#[tokio::test]
async fn a_body_that_stalls_is_answered_408_at_its_deadline() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.http_body_timeout = Duration::from_millis(500);
    let (server, mut ws, baseline) = serving(cfg).await;
    for path in ["/api/v1/events", "/api/v1/disconnect"] {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n{{\"user_id\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let answer = read_to_eof(&mut s, Duration::from_secs(10)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains(r#""error":"body_timeout""#), "{answer}");
    }
    // A declared length over the limit is refused from the head.
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 2000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_to_eof(&mut s, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""error":"body_too_large""#), "{answer}");
    drop(s);
    back_to(baseline).await;
    others_are_served(&server, &mut ws, 1).await;
    server.shutdown().await;
}

/// `n` keep-alive HTTP connections, each served one request and then left
/// idle, holding its place under `max_http_connections`.
async fn hold_keepalive(server: &herald::Server, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&read_head(&mut s).await).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    held
}

/// A client refused at the cap while it is still sending (a streaming ingest
/// request whose body goes on, as the token benchmark's 1,025th answer was)
/// reads the 503 `overloaded` answer, not a connection reset: the server
/// sends a FIN after the answer and reads and drops the client's input
/// before it closes.
#[tokio::test]
async fn a_refused_client_still_sending_reads_the_503() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.max_http_connections = 2;
    let (server, mut ws, baseline) = serving(cfg).await;
    let held = hold_keepalive(&server, 2).await;
    for attempt in 0..5 {
        // Lines of blanks, 1 KiB every 10 ms for half a second: 50 KiB,
        // within what the server reads and drops before its close.
        let body = futures_util::stream::unfold(0, |i| async move {
            (i < 50).then_some(())?;
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, std::io::Error>(vec![b'\n'; 1024]), i + 1))
        });
        let answer = client()
            .post(http_url(&server, "/api/v1/runs/r1/text?user_id=u1"))
            .bearer_auth(API_KEY)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e:?}"));
        assert_eq!(answer.status(), 503, "attempt {attempt}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"], "overloaded", "attempt {attempt}");
    }
    drop(held);
    others_are_served(&server, &mut ws, 1).await;
    back_to(baseline).await;
    server.shutdown().await;
}

/// Issue 37, finding 1: at most `max_http_connections` HTTP connections are
/// served at once; one more is answered 503 `overloaded` and closed at once,
/// so a flood of idle connections holds a bounded number of descriptors, and
/// the API answers again as soon as a place is free. Upgraded WebSockets do
/// not hold a place.
#[tokio::test]
async fn http_connections_beyond_the_cap_are_answered_503_and_closed() {
    let _serial = SERIAL.lock().await;
    let mut cfg = config();
    cfg.max_http_connections = 8;
    let (server, mut ws, baseline) = serving(cfg).await;
    // Three more WebSockets: upgraded, they hold no HTTP place.
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(connect(&server, &format!("ws{i}")).await.0);
    }
    wait_until(
        Duration::from_secs(10),
        || server.http_connections() == 0,
        || format!("{} HTTP connections still open", server.http_connections()),
    )
    .await;
    // Eight keep-alive connections, each served a request and then idle.
    let held = hold_keepalive(&server, 8).await;
    assert_eq!(server.http_connections(), 8);
    // A flood beyond them: each is answered 503 and closed by the server.
    // (The first sends nothing: it is answered when the server stops
    // waiting for its request; the others send theirs, as clients do.)
    for i in 0..100 {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        if i > 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
        }
        let answer = read_to_eof(&mut s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "overloaded");
    }
    // Only the held ones (both ends) and the WebSockets stay open (a
    // refused connection being closed gently is gone within seconds).
    let bound = baseline + 2 * (held.len() + sockets.len());
    wait_until(
        Duration::from_secs(10),
        || open_fds() <= bound,
        || format!("{} open, more than {bound}", open_fds()),
    )
    .await;
    drop(held);
    wait_until(
        Duration::from_secs(10),
        || server.http_connections() == 0,
        || format!("{} idle connections still open", server.http_connections()),
    )
    .await;
    others_are_served(&server, &mut ws, 1).await;
    drop(sockets);
    back_to(baseline).await;
    server.shutdown().await;
}
