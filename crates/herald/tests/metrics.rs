//! `/metrics` after a scripted sequence: the counters equal what happened.
//! (One test in this binary: the Prometheus registry is process-wide.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use futures_util::SinkExt;
use herald::Server;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Parse Prometheus text into `name{sorted labels}` → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (key, value) = line.rsplit_once(' ').unwrap();
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => key.to_owned(),
        };
        out.insert(key, value.parse().unwrap());
    }
    out
}

/// Poll `name` on `/metrics` (the sweep sets gauges every second) until
/// `ok` holds, bounded at 10 s; returns the value that satisfied it.
async fn gauge_until(server: &Server, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = None;
    for _ in 0..100 {
        last = parse(&metrics_text(server).await).get(name).copied();
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{name} is {last:?} after 10 s");
}

#[tokio::test]
async fn counters_equal_what_happened() {
    let server = start().await;
    // The fewest tasks over two sweeps (a sweep that runs while a scrape is
    // in flight also counts the scrape's tasks).
    let mut tasks_before = f64::MAX;
    for _ in 0..12 {
        tasks_before = tasks_before.min(gauge_until(&server, "herald_tasks_alive", |_| true).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (mut a1, _) = connect(&server, "alice").await;
    let (mut a2, _) = connect(&server, "alice").await;
    let (mut b, _) = connect(&server, "bob").await;
    let mut bad = open(&server, &[], None).await;
    send_json(&mut bad, json!({"type": "hello", "token": "garbage"})).await;
    expect_close(&mut bad, 4401).await;
    // Each open WebSocket is a task of the server's runtime.
    let tasks_open = gauge_until(&server, "herald_tasks_alive", |v| v >= tasks_before + 3.0).await;

    for _ in 0..3 {
        publish(&server, "alice", "agent_note", json!({})).await;
    }
    for ws in [&mut a1, &mut a2] {
        for _ in 0..3 {
            assert_eq!(next_json(ws).await["type"], "event");
        }
    }
    // A publish to a user with no connection delivers nothing.
    publish(&server, "nobody", "agent_note", json!({})).await;

    // 50 text deltas of one part in one request reach carol's queue
    // together and leave as one frame: 49 of them joined another.
    let (mut c, _) = connect(&server, "carol").await;
    let started = json!({"user_id": "carol", "event": "agent_started", "run_id": "r1"});
    assert_eq!(post(&server, "/api/v1/events", started).await.0, 200);
    assert_eq!(next_json(&mut c).await["event"], "agent_started");
    let deltas: Vec<_> = (0..50)
        .map(|i| {
            json!({"user_id": "carol", "event": "agent_text_delta", "run_id": "r1",
                        "data": {"part": "answer", "text": format!("w{i} ")}})
        })
        .collect();
    let (status, _) = post(&server, "/api/v1/events", json!({ "events": deltas })).await;
    assert_eq!(status, 200);
    let frame = next_json(&mut c).await;
    assert_eq!(
        (frame["from_seq"].as_u64(), frame["seq"].as_u64()),
        (Some(2), Some(51)),
        "{frame}"
    );
    let (status, _) = post(&server, "/api/v1/disconnect", json!({"user_id": "carol"})).await;
    assert_eq!(status, 200);
    expect_close(&mut c, 4409).await;

    let (status, _) = post(&server, "/api/v1/disconnect", json!({"user_id": "alice"})).await;
    assert_eq!(status, 200);
    expect_close(&mut a1, 4409).await;
    expect_close(&mut a2, 4409).await;
    b.send(Message::Close(Some(CloseFrame {
        code: 1000.into(),
        reason: "".into(),
    })))
    .await
    .unwrap();
    let _ = read_until_close(&mut b).await;
    wait_for_no_connections(&server).await;
    // Their three tasks have ended.
    gauge_until(&server, "herald_tasks_alive", |v| v <= tasks_open - 3.0).await;

    let text = metrics_text(&server).await;
    let m = parse(&text);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    assert_eq!(get("herald_connections_opened_total"), 5.0);
    assert_eq!(get("herald_connections_live"), 0.0);
    assert_eq!(
        get(r#"herald_connections_closed_total{initiator="server",reason="kicked"}"#),
        3.0
    );
    assert_eq!(
        get(r#"herald_connections_closed_total{initiator="client",reason="client_close"}"#),
        1.0
    );
    assert_eq!(
        get(r#"herald_connections_closed_total{initiator="client",reason="unauthorized"}"#),
        1.0
    );
    assert_eq!(get("herald_events_published_total"), 55.0);
    assert_eq!(get("herald_event_deliveries_total"), 57.0);
    // 4 welcomes + 6 events to alice + carol's agent_started and one
    // frame for her 50 deltas.
    assert_eq!(get("herald_frames_out_total"), 12.0);
    assert_eq!(get("herald_text_deltas_joined_total"), 49.0);
    // Their payloads: each event frame is ~90 bytes of JSON, a welcome
    // ~150, the joined frame ~400.
    let bytes = get("herald_bytes_out_total");
    assert!(
        (6.0 * 60.0 + 300.0..=12.0 * 400.0).contains(&bytes),
        "{bytes} bytes out"
    );
    // A joined frame is timed once.
    assert_eq!(get("herald_publish_to_write_seconds_count"), 8.0);
    assert_eq!(get(r#"herald_connections{state="ready"}"#), 0.0);
    assert_eq!(get("herald_queued_frames"), 0.0);
    assert!(
        !text.contains("herald_invariant_violations_total"),
        "no violations recorded"
    );
    let s = server.stats();
    assert_eq!((s.opened, s.cleanups, s.frames_out), (5, 5, 12));
}
