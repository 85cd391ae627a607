//! Stress: 200 connections and 4 concurrent publishers while connections are
//! closed from every side at once. Asserts I1 (no frame after close, counted
//! in the server's writer and checked by every client), I2 (cleanup exactly
//! once per connection), I3 within a connection (gap-free, increasing seq)
//! and I4 (live count and open file descriptors back to baseline).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const USERS: usize = 40;
const PER_USER: usize = 5;
const PUBLISHERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sends a close frame.
    ClientClose,
    /// The client drops TCP without a close frame.
    TcpDrop,
    /// The client waits for the API kick.
    AwaitKick,
    /// The client sends a close frame at the moment the kick is issued.
    CloseRacingKick,
    /// The client stops reading and then drops.
    StopReadingThenDrop,
}

const ENDINGS: [Ending; PER_USER] = [
    Ending::ClientClose,
    Ending::TcpDrop,
    Ending::AwaitKick,
    Ending::CloseRacingKick,
    Ending::StopReadingThenDrop,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_from_every_side_keeps_the_invariants() {
    let server = Arc::new(start().await);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let fd_baseline = open_fds();

    let total = USERS * PER_USER;
    let barrier = Arc::new(Barrier::new(total + 1));
    let client_violations = Arc::new(AtomicU64::new(0));
    let events_seen = Arc::new(AtomicU64::new(0));
    // When each user is kicked, after the start: the CloseRacingKick client
    // sends its close frame within 20 ms after that instant, so its close and
    // the kick cross (issue 17, finding 11).
    let kick_at: Arc<Vec<Duration>> = Arc::new(
        (0..USERS)
            .map(|_| Duration::from_millis(rand::rng().random_range(0..400)))
            .collect(),
    );
    // Racing closes the kick reached first / the client's close reached first.
    let races = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut clients = Vec::new();
    for u in 0..USERS {
        for (k, ending) in ENDINGS.iter().copied().enumerate() {
            let server = server.clone();
            let barrier = barrier.clone();
            let violations = client_violations.clone();
            let seen = events_seen.clone();
            let (kick_at, races) = (kick_at.clone(), races.clone());
            clients.push(tokio::spawn(async move {
                let (mut ws, welcome) = connect(&server, &format!("user{u}")).await;
                let mut last = welcome["seq"].as_u64().unwrap();
                barrier.wait().await;
                let delay = match ending {
                    // Around the kick's arrival (its HTTP request takes a few ms).
                    Ending::CloseRacingKick => {
                        kick_at[u] + Duration::from_millis(rand::rng().random_range(0..20))
                    }
                    _ => Duration::from_millis(rand::rng().random_range(0..400) + 7 * k as u64),
                };
                let until = tokio::time::Instant::now() + delay;
                // Read live events until it is time to end this connection.
                let mut closed_by_server = None;
                loop {
                    let msg = match ending {
                        Ending::AwaitKick => {
                            tokio::time::timeout(Duration::from_secs(10), ws.next())
                                .await
                                .ok()
                                .flatten()
                        }
                        _ => match tokio::time::timeout_at(until, ws.next()).await {
                            Ok(m) => m,
                            Err(_) => break,
                        },
                    };
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                            if v["type"] == "event" {
                                let seq = v["seq"].as_u64().unwrap();
                                if seq != last + 1 {
                                    violations.fetch_add(1, Ordering::Relaxed);
                                }
                                last = seq;
                                seen.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            closed_by_server = f.map(|f| u16::from(f.code));
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
                if ending == Ending::CloseRacingKick {
                    races[usize::from(closed_by_server.is_none())].fetch_add(1, Ordering::Relaxed);
                }
                match (ending, closed_by_server) {
                    (_, Some(_)) => {}
                    (Ending::ClientClose | Ending::CloseRacingKick, None) => {
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: 1000.into(),
                                reason: "bye".into(),
                            })))
                            .await;
                    }
                    (Ending::TcpDrop, None) => {
                        drop(ws);
                        return;
                    }
                    (Ending::StopReadingThenDrop, None) => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        drop(ws);
                        return;
                    }
                    (Ending::AwaitKick, None) => {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // After a close in either direction, the server must send nothing
                // but (at most) its close frame: tungstenite reports any frame
                // after the peer's close as a protocol error.
                let drain = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(m) = ws.next().await {
                        match m {
                            Ok(Message::Text(_)) | Ok(Message::Binary(_)) => {
                                if closed_by_server.is_some() {
                                    violations.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(_) => {}
                            Err(tokio_tungstenite::tungstenite::Error::Protocol(p)) => {
                                eprintln!("protocol error after close: {p}");
                                violations.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                });
                let _ = drain.await;
            }));
        }
    }

    // Publishers: batches of 10 to random users, until the clients are done.
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        let (stop, http, addr) = (stop.clone(), http.clone(), server.local_addr());
        publishers.push(tokio::spawn(async move {
            let mut published = 0u64;
            for _ in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let events: Vec<_> = (0..10)
                    .map(|_| json!({"user_id": format!("user{}", rand::rng().random_range(0..USERS)), "event": "agent_note", "data": {"x": 1}}))
                    .collect();
                let r = http
                    .post(format!("http://{addr}/api/v1/events"))
                    .bearer_auth(API_KEY)
                    .json(&json!({ "events": events }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                published += 10;
            }
            published
        }));
    }

    barrier.wait().await;
    // Kicks race the clients' own closes.
    let mut kicks = Vec::new();
    for u in 0..USERS {
        let (http, addr, delay) = (http.clone(), server.local_addr(), kick_at[u]);
        kicks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let r = http
                .post(format!("http://{addr}/api/v1/disconnect"))
                .bearer_auth(API_KEY)
                .json(&json!({ "user_id": format!("user{u}") }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }));
    }
    for k in kicks {
        k.await.unwrap();
    }
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut published = 0;
    for p in publishers {
        published += p.await.unwrap();
    }

    wait_for_no_connections(&server).await;
    let s = server.stats();
    eprintln!(
        "published {published}, events seen by clients {}, closes racing the kick: \
         {} reached by the kick first, {} sent first, stats {s:?}",
        events_seen.load(Ordering::Relaxed),
        races[0].load(Ordering::Relaxed),
        races[1].load(Ordering::Relaxed),
    );
    assert_eq!(
        races[0].load(Ordering::Relaxed) + races[1].load(Ordering::Relaxed),
        USERS as u64,
        "every racing close ran"
    );
    assert!(
        published > 0 && events_seen.load(Ordering::Relaxed) > 0,
        "the load must actually run"
    );
    assert_eq!(
        s.frames_after_close, 0,
        "I1: writer asked to write after close"
    );
    assert_eq!(
        client_violations.load(Ordering::Relaxed),
        0,
        "I1/I3 as seen by clients"
    );
    assert_eq!(s.opened, total as u64);
    assert_eq!(s.cleanups, total as u64, "I2: one cleanup per connection");
    assert_eq!(s.duplicate_cleanups, 0, "I2: no second cleanup");
    assert!(server.connections().is_empty());

    // I4: file descriptors back to baseline (sockets of both ends are gone).
    let mut fds = open_fds();
    for _ in 0..100 {
        if fds <= fd_baseline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        fds = open_fds();
    }
    assert!(
        fds <= fd_baseline,
        "open fds {fds} > baseline {fd_baseline}"
    );
}
