//! Operations: heartbeats, slow consumers, SIGTERM drain of the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn silent_client_is_pinged_then_closed_for_heartbeat_timeout() {
    let mut cfg = config();
    cfg.lifecycle.heartbeat_interval = Duration::from_millis(100);
    cfg.lifecycle.heartbeat_timeout = Duration::from_millis(450);
    let server = start_with(cfg).await;
    // A raw client sends hello, then never sends anything again (no pongs).
    let hello = json!({"type": "hello", "token": token("quiet")}).to_string();
    let bytes = raw_frames(&server, &[client_frame(0x1, hello.as_bytes())]).await;
    let frames = parse_server_frames(&bytes);
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    assert!(
        pings >= 2,
        "expected pings before the timeout, got {frames:?}"
    );
    assert_eq!(close_code_of(&bytes), Some(1001));
    assert_eq!(
        frames.last().map(|f| f.0),
        Some(0x8),
        "the close frame is the last frame"
    );
    wait_for_no_connections(&server).await;

    // A client that answers pings (tungstenite does) stays connected.
    let (mut ws, _) = connect(&server, "lively").await;
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        let _ = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
    }
    assert_eq!(server.hub().len(), 1);
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4001_while_a_fast_one_gets_everything() {
    let mut cfg = config();
    cfg.lifecycle.max_queue_bytes = 256 * 1024;
    cfg.lifecycle.close_timeout = Duration::from_secs(3);
    let bound = cfg.lifecycle.max_queue_bytes;
    let server = start_with(cfg).await;

    // The slow client: hello, then it never reads.
    let mut slow = raw_hello(&server, "sam").await;
    let (mut fast, _) = connect(&server, "sam").await;

    let reader = tokio::spawn(async move {
        let mut last = 0;
        let mut n = 0;
        while let Some(Ok(m)) = fast.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "gap or duplicate for the fast client");
                last = seq;
                n += 1;
                if v["data"]["last"] == true {
                    break;
                }
            }
        }
        n
    });

    let blob = "x".repeat(16 * 1024);
    let mut max_queued = 0;
    let mut published = 0;
    let mut slow_state = String::new();
    for round in 0..1000 {
        let events: Vec<Value> = (0..8)
            .map(|_| json!({"user_id": "sam", "event": "agent_note", "data": {"blob": blob}}))
            .collect();
        let (status, _) = post(&server, "/api/v1/events", json!({ "events": events })).await;
        assert_eq!(status, 200);
        published += 8;
        let (_, conns) = get_json(&server, "/api/v1/connections?user_id=sam").await;
        for c in conns["connections"].as_array().unwrap() {
            max_queued = max_queued.max(c["queued_bytes"].as_u64().unwrap() as usize);
        }
        let rows = conns["connections"].as_array().unwrap().len();
        let states: Vec<_> = conns["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].to_string())
            .collect();
        if rows < 2 || states.iter().any(|s| s.contains("closing")) {
            slow_state = format!("after {round} rounds: {states:?}");
            break;
        }
    }
    assert!(!slow_state.is_empty(), "the slow consumer was never closed");
    // Start reading the slow socket now: its backlog, then the 4001 close frame.
    let mut backlog = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut backlog)).await;
    assert_eq!(close_code_of(&backlog), Some(4001), "{slow_state}");
    assert_eq!(parse_server_frames(&backlog).last().map(|f| f.0), Some(0x8));

    let r = publish(&server, "sam", "agent_note", json!({"last": true})).await;
    assert_eq!(r["delivered"], 1);
    let received = reader.await.unwrap();
    assert_eq!(received, published + 1, "the fast client missed events");
    // The queue never held more than its bound (plus one frame in flight).
    assert!(
        max_queued <= bound + 17 * 1024,
        "queued {max_queued} > bound {bound}"
    );
    eprintln!(
        "slow consumer closed {slow_state}; max queued bytes seen {max_queued} (bound {bound})"
    );
}

/// A closing connection whose peer has stopped reading gets the close
/// timeout to take its last bytes, not the (longer) write timeout: a slow
/// consumer closed with 4001 is dropped about `close_timeout` after its
/// socket filled. Mutation testing found the close timeout unpinned
/// (`write_pending` using `write_timeout` while closing survived).
#[tokio::test]
async fn a_closing_socket_that_stays_full_gets_the_close_timeout_not_the_write_timeout() {
    let mut cfg = config();
    cfg.lifecycle.max_queue_bytes = 256 * 1024;
    cfg.lifecycle.close_timeout = Duration::from_secs(1);
    cfg.write_timeout = Duration::from_secs(120);
    let server = start_with(cfg).await;
    let mut slow = raw_hello(&server, "sid").await;
    wait_for_connections(&server, 1).await;
    let blob = "x".repeat(16 * 1024);
    let mut closing = None;
    for _ in 0..1000 {
        let events: Vec<Value> = (0..8)
            .map(|_| json!({"user_id": "sid", "event": "agent_note", "data": {"blob": blob}}))
            .collect();
        let (status, _) = post(&server, "/api/v1/events", json!({ "events": events })).await;
        assert_eq!(status, 200);
        let (_, conns) = get_json(&server, "/api/v1/connections?user_id=sid").await;
        let rows = conns["connections"].as_array().unwrap();
        if rows.is_empty() || rows[0]["state"] == "closing" {
            closing = Some(Instant::now());
            break;
        }
    }
    let closing = closing.expect("the slow consumer was never closed");
    // The peer still reads nothing. With the close timeout (1 s) the
    // connection is gone in about a second; with the write timeout it would
    // stay for two minutes. 30 s leaves room for a slow machine.
    wait_until(
        Duration::from_secs(30),
        || server.hub().is_empty(),
        || "a full closing socket was held past its close timeout".into(),
    )
    .await;
    eprintln!("dropped {:?} after the close", closing.elapsed());
    // The server let go of the TCP connection: after the backlog, EOF.
    let mut backlog = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut backlog))
        .await
        .expect("the TCP connection was dropped")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_300_clients_with_closing_and_1012() {
    const CLIENTS: usize = 300;
    let (mut child, addr, _) = serve(&[
        ("HERALD_ADDR", "127.0.0.1:0"),
        ("HERALD_JWT_HS256_SECRET", SECRET),
        ("HERALD_API_KEY", API_KEY),
        ("HERALD_DRAIN_WINDOW", "2s"),
    ]);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (addr, barrier) = (addr.clone(), barrier.clone());
        clients.push(tokio::spawn(async move {
            let (mut ws, _) = hello_at(&addr, &token(&format!("d{}", i % 50))).await;
            barrier.wait().await;
            // Expect `closing`, then close 1012, then nothing (tungstenite
            // reports any frame after the close as a protocol error).
            let (mut closing, mut code, mut after_close) = (None, None, 0);
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if code.is_some() {
                            after_close += 1;
                        }
                        if v["type"] == "closing" {
                            closing = Some(v);
                        }
                    }
                    Ok(Message::Close(f)) => code = f.map(|f| u16::from(f.code)),
                    Ok(_) => {}
                    Err(tokio_tungstenite::tungstenite::Error::Protocol(_)) => after_close += 1,
                    Err(_) => break,
                }
            }
            (closing, code, after_close)
        }));
    }
    barrier.wait().await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    sigterm(&child);
    // Readiness must turn 503 during the drain; new upgrades are refused.
    let mut saw_503 = false;
    let mut upgrade_refused = false;
    while started.elapsed() < Duration::from_secs(2) && !(saw_503 && upgrade_refused) {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await {
            saw_503 |= r.status() == 503;
        }
        if saw_503 && !upgrade_refused {
            match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    upgrade_refused = resp.status() == 503
                }
                Err(_) => {}
                Ok(_) => panic!("upgrade accepted while draining"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/readyz never returned 503 during the drain");
    assert!(
        upgrade_refused,
        "no upgrade was refused with 503 during the drain"
    );

    let mut delays = Vec::new();
    for c in clients {
        let (closing, code, after_close) = c.await.unwrap();
        let closing = closing.expect("every client gets `closing`");
        assert_eq!(closing["reason"], "shutdown");
        delays.push(closing["reconnect_after_ms"].as_u64().unwrap());
        assert_eq!(code, Some(1012));
        assert_eq!(after_close, 0, "frames after the close frame");
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(3),
        "drain took {took:?}; window 2s + 1s grace"
    );
    delays.sort();
    assert!(
        delays[0] < delays[delays.len() - 1],
        "reconnect_after_ms is jittered"
    );
    eprintln!("drained {CLIENTS} clients in {took:?}");
}
