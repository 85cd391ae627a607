//! Streams that lose nothing: resume, replay racing live publishes, reset,
//! agent runs, run timeouts, idempotent publish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn hello(server: &herald::Server, body: Value) -> (Ws, Value) {
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, body).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

async fn resume(server: &herald::Server, user: &str, epoch: &str, seq: u64) -> (Ws, Value) {
    hello(
        server,
        json!({"type": "hello", "token": token(user), "resume": {"epoch": epoch, "seq": seq}}),
    )
    .await
}

async fn publish_n(server: &herald::Server, user: &str, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|_| json!({"user_id": user, "event": "agent_note"}))
        .collect();
    let (status, body) = post(server, "/api/v1/events", json!({ "events": events })).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "event" {
            return v;
        }
    }
}

#[tokio::test]
async fn tcp_drop_then_resume_gets_exactly_the_missed_events_then_live() {
    let server = start().await;
    let (mut ws, welcome) = connect(&server, "ana").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    publish_n(&server, "ana", 10).await;
    for want in 1..=10 {
        assert_eq!(next_event(&mut ws).await["seq"], want);
    }
    drop(ws); // TCP gone, no close frame
    publish_n(&server, "ana", 20).await;

    let (mut ws, welcome) = resume(&server, "ana", &epoch, 10).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["seq"].as_u64()),
        (Some(true), Some(30))
    );
    assert!(welcome.get("reset").is_none());
    for want in 11..=30 {
        let e = next_event(&mut ws).await;
        assert_eq!(e["seq"], want);
        assert_eq!(e["event"], "agent_note");
    }
    publish_n(&server, "ana", 2).await;
    assert_eq!(next_event(&mut ws).await["seq"], 31);
    assert_eq!(next_event(&mut ws).await["seq"], 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_zero_while_1000_events_are_published_concurrently() {
    let mut cfg = config();
    cfg.stream_limits.max_events = 5000;
    let server = std::sync::Arc::new(start_with(cfg).await);
    let first = publish_n(&server, "bea", 1).await;
    let epoch = first["results"][0]["epoch"].as_str().unwrap().to_owned();

    let mut publishers = Vec::new();
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(4);
    for _ in 0..4 {
        let server = server.clone();
        let started_tx = started_tx.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..25 {
                publish_n(&server, "bea", 10).await;
                if i == 0 {
                    let _ = started_tx.send(()).await;
                }
            }
        }));
    }
    // Resume from 0 once the publishers are under way.
    started.recv().await;
    let (mut ws, welcome) = resume(&server, "bea", &epoch, 0).await;
    assert_eq!(welcome["resumed"], true);
    // The race happened: the welcome came while the publishers were
    // publishing (issue 17, finding 6). A machine too slow for that fails
    // here rather than passing without testing the race.
    let at = welcome["seq"].as_u64().unwrap();
    assert!(
        at > 1 && at < 1 + 4 * 25 * 10,
        "the resume did not race the publishes (welcome seq {at})"
    );
    for p in publishers {
        p.await.unwrap();
    }
    let total = 1 + 4 * 25 * 10;
    let mut last = 0;
    for _ in 0..total {
        let seq = next_event(&mut ws).await["seq"].as_u64().unwrap();
        assert_eq!(
            seq,
            last + 1,
            "gap or duplicate (welcome seq was {})",
            welcome["seq"]
        );
        last = seq;
    }
    assert_eq!(last, total as u64);
    // Nothing more is pending.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

#[tokio::test]
async fn wrong_epoch_or_evicted_resume_point_resets() {
    let mut cfg = config();
    cfg.stream_limits.max_events = 5;
    let server = start_with(cfg).await;
    let first = publish_n(&server, "cy", 12).await;
    let epoch = first["results"][0]["epoch"].as_str().unwrap().to_owned();

    let (_ws, w) = resume(&server, "cy", "not-the-epoch", 3).await;
    assert_eq!(
        (
            w["resumed"].as_bool(),
            w["reset"].as_bool(),
            w["seq"].as_u64()
        ),
        (Some(false), Some(true), Some(12))
    );
    // Events 1..=7 were evicted (count bound 5): a resume from 3 cannot be served.
    let (mut ws, w) = resume(&server, "cy", &epoch, 3).await;
    assert_eq!(
        (w["resumed"].as_bool(), w["reset"].as_bool()),
        (Some(false), Some(true))
    );
    // After a reset, the client is live from now: the next event is 13.
    publish_n(&server, "cy", 1).await;
    assert_eq!(next_event(&mut ws).await["seq"], 13);
    // Resuming inside the window still works.
    let (mut ws, w) = resume(&server, "cy", &epoch, 9).await;
    assert_eq!(w["resumed"], true);
    for want in 10..=13 {
        assert_eq!(next_event(&mut ws).await["seq"], want);
    }
}

#[tokio::test]
async fn mid_run_connect_replays_the_run_and_abandoned_runs_time_out() {
    let mut cfg = config();
    cfg.stream_limits.max_events = 3;
    cfg.stream_limits.run_ttl = Duration::from_millis(1500);
    let server = start_with(cfg).await;
    let ev = |event: &str, run: &str, data: Value| json!({"user_id": "dee", "event": event, "run_id": run, "thread_id": "t1", "data": data});
    let batch = vec![
        ev("agent_started", "r1", json!({})),
        ev("agent_thinking", "r1", json!({"text": "a"})),
        json!({"user_id": "dee", "event": "agent_note"}),
        json!({"user_id": "dee", "event": "agent_note"}),
        json!({"user_id": "dee", "event": "agent_note"}),
        ev("tool_executing", "r1", json!({"tool": "search"})),
    ];
    let (status, _) = post(&server, "/api/v1/events", json!({ "events": batch })).await;
    assert_eq!(status, 200);

    // A page opened mid-run sees the run from agent_started (seq 1), even
    // though the count bound (3) evicted it from the resume window.
    let (mut ws, w) = hello(
        &server,
        json!({"type": "hello", "token": token("dee"), "replay_active_runs": true}),
    )
    .await;
    assert_eq!(w["seq"], 6);
    let replayed = [
        next_event(&mut ws).await,
        next_event(&mut ws).await,
        next_event(&mut ws).await,
    ];
    assert!(
        replayed.iter().all(|e| e["replayed"] == true),
        "{replayed:?}"
    );
    let got: Vec<(u64, String)> = replayed
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "agent_started".into()),
            (2, "agent_thinking".into()),
            (6, "tool_executing".into())
        ]
    );
    assert_eq!(w["replaying"], true);
    // Replayed events say so, and the replay's end is marked.
    let caught_up = next_json(&mut ws).await;
    assert_eq!(
        (caught_up["type"].as_str(), caught_up["seq"].as_u64()),
        (Some("caught_up"), Some(6))
    );
    // Without replay_active_runs, nothing is replayed.
    let (mut plain, w) = connect(&server, "dee").await;
    assert_eq!(w.get("replaying"), None);

    // The run goes silent (on tokio's paused clock, past run_ttl and a sweep):
    // the server closes it with agent_error {reason: run_timeout}.
    skip(Duration::from_millis(2600)).await;
    for ws in [&mut ws, &mut plain] {
        let e = tokio::time::timeout(Duration::from_secs(6), next_event(ws))
            .await
            .expect("run timeout event");
        assert_eq!(
            (e["event"].as_str(), e["run_id"].as_str(), e["seq"].as_u64()),
            (Some("agent_error"), Some("r1"), Some(7))
        );
        assert_eq!(e["data"]["reason"], "run_timeout");
        assert_eq!(e["thread_id"], "t1");
    }
    // The run is closed: a new page has nothing to replay.
    let (mut late, _) = hello(
        &server,
        json!({"type": "hello", "token": token("dee"), "replay_active_runs": true}),
    )
    .await;
    assert_eq!(next_json(&mut late).await["type"], "caught_up");
    send_json(&mut late, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut late).await["type"], "pong");
}

#[tokio::test]
async fn duplicate_idempotency_key_appends_once() {
    let server = start().await;
    let (mut ws, _) = connect(&server, "eve").await;
    let body = json!({"user_id": "eve", "event": "agent_note", "idempotency_key": "k-1"});
    let (_, first) = post(&server, "/api/v1/events", body.clone()).await;
    let (_, again) = post(&server, "/api/v1/events", body).await;
    assert_eq!(first["results"][0]["seq"], 1);
    assert_eq!(first["results"][0]["delivered"], 1);
    assert_eq!(again["results"][0]["seq"], 1);
    assert_eq!(again["results"][0]["duplicate"], true);
    assert_eq!(again["results"][0]["delivered"], 0);
    publish_n(&server, "eve", 1).await;
    assert_eq!(next_event(&mut ws).await["seq"], 1);
    assert_eq!(
        next_event(&mut ws).await["seq"],
        2,
        "the duplicate was not appended"
    );
}

#[tokio::test]
async fn events_for_an_offline_user_are_delivered_on_resume() {
    let server = start().await;
    let (ws, w) = connect(&server, "fay").await;
    let epoch = w["epoch"].as_str().unwrap().to_owned();
    drop(ws);
    wait_for_no_connections(&server).await;
    let r = publish_n(&server, "fay", 3).await;
    assert_eq!(r["results"][0]["delivered"], 0);
    let (mut ws, _) = resume(&server, "fay", &epoch, 0).await;
    for want in 1..=3 {
        assert_eq!(next_event(&mut ws).await["seq"], want);
    }
    // The ack is recorded per connection.
    send_json(&mut ws, json!({"type": "ack", "seq": 3})).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    while let Some(Ok(m)) = ws.next().await {
        if matches!(m, Message::Text(ref t) if t.contains("pong")) {
            break;
        }
    }
    let (_, conns) = get_json(&server, "/api/v1/connections?user_id=fay").await;
    assert_eq!(conns["connections"][0]["acked_seq"], 3);
}

/// Issue 14, finding 1: an open run's events used to escape every history
/// bound and, past `history_max_bytes`, every append emptied every other
/// user's window. Now a run outgrowing `run_max_bytes` is closed with
/// `agent_error {reason: "run_too_large"}`, the history gauge stays under the
/// bound, and another user's offline events survive.
#[tokio::test]
async fn a_run_outgrowing_its_bound_is_closed_and_spares_other_users() {
    let mut cfg = config();
    cfg.history_max_bytes = 2_000_000;
    // Below half the history bound (1 MB, where the total rule would close
    // it), so this pins the per-run bound.
    cfg.stream_limits.max_run_bytes = 400_000;
    cfg.stream_limits.max_runs_bytes = 4_000_000;
    // Alice reads only after the 8 MB burst: her queue must hold it, or a
    // slow machine closes her as a slow consumer before she sees the close.
    cfg.lifecycle.max_queue_bytes = 64 << 20;
    cfg.lifecycle.max_queue_frames = 4096;
    let server = start_with(cfg).await;
    let (_, bob) = connect(&server, "bob").await;
    let epoch = bob["epoch"].as_str().unwrap().to_owned();
    publish_n(&server, "bob", 5).await;
    let (mut alice, _) = connect(&server, "alice").await;
    let blob = "x".repeat(8_000);
    let (status, _) = post(
        &server,
        "/api/v1/events",
        json!({"user_id": "alice", "event": "agent_started", "run_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..20 {
        let events: Vec<Value> = (0..50)
            .map(|_| json!({"user_id": "alice", "event": "agent_thinking", "run_id": "r1", "data": {"t": blob}}))
            .collect();
        let (status, body) = post(&server, "/api/v1/events", json!({ "events": events })).await;
        assert_eq!(status, 200, "{body}");
    }
    // Alice sees her run closed as too large (the first time right after
    // the event that took it past 400 KB: ~50 events of 8 KB), in order.
    let mut closes = 0;
    let mut first_close = None;
    let mut last = 0;
    loop {
        let e = tokio::time::timeout(Duration::from_secs(2), next_event(&mut alice)).await;
        let Ok(e) = e else { break };
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last, "in order");
        last = seq;
        if e["event"] == "agent_error" {
            assert_eq!(e["run_id"], "r1");
            assert_eq!(e["data"]["reason"], "run_too_large");
            first_close.get_or_insert(seq);
            closes += 1;
        }
    }
    assert!(closes >= 1, "the run was closed as too large");
    let first_close = first_close.unwrap();
    assert!(
        (50..=55).contains(&first_close),
        "closed at the per-run bound, not later: seq {first_close}"
    );
    // This server's own figure: the gauge is process-wide, and other tests
    // of this file run servers holding far more.
    let charged = server.broker_stats().charged_bytes;
    assert!(
        charged <= 2_000_000,
        "history {charged} bytes within the bound"
    );
    // Bob's five offline events are all still there.
    let (mut ws, welcome) = resume(&server, "bob", &epoch, 0).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    for seq in 1..=5 {
        assert_eq!(next_event(&mut ws).await["seq"], seq);
    }
}

/// Issue 17, finding 12: history evicted in the middle of a catch-up closes
/// the connection with 4001 (never a silent gap), and the next resume is
/// told `reset`. The client stops reading while its first page (256 events
/// of 60 KB, more than the socket buffers hold) is being written; meanwhile
/// 300 new events push the rest of its backlog out of the 300-event window.
#[tokio::test]
async fn history_evicted_during_the_catch_up_closes_4001_then_resets() {
    let mut cfg = config();
    cfg.stream_limits.max_events = 300;
    cfg.history_max_bytes = 256 << 20;
    let server = start_with(cfg).await;
    let (ws, welcome) = connect(&server, "rex").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    drop(ws);
    let big = "x".repeat(60 * 1024);
    let publish_big = |n: usize| {
        let events: Vec<Value> = (0..n)
            .map(|_| json!({"user_id": "rex", "event": "agent_note", "data": {"pad": big}}))
            .collect();
        post(&server, "/api/v1/events", json!({ "events": events }))
    };
    for _ in 0..30 {
        assert_eq!(publish_big(10).await.0, 200);
    }
    // Resume from 0 and do not read: the first page blocks in the socket.
    let mut ws = open(&server, &[], None).await;
    send_json(
        &mut ws,
        json!({"type": "hello", "token": token("rex"), "resume": {"epoch": epoch, "seq": 0}}),
    )
    .await;
    let mut stuck = false;
    for _ in 0..500 {
        if server.hub().list(None).iter().any(|c| c.queue_depth > 0) {
            stuck = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stuck, "the first page is waiting in the queue");
    for _ in 0..30 {
        assert_eq!(publish_big(10).await.0, 200);
    }
    // Now read: the welcome, the first page in order, then the close.
    let (code, reason, frames) = read_until_close(&mut ws).await;
    assert_eq!(frames[0]["type"], "welcome");
    let seqs: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=256).collect::<Vec<_>>());
    assert_eq!(code, Some(4001));
    assert_eq!(reason, "history evicted during replay; resume again");
    let (_ws, welcome) = resume(&server, "rex", &epoch, 256).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reset"].as_bool()),
        (Some(false), Some(true)),
        "{welcome}"
    );
}

/// A page reloaded mid-run (resume from its stored position, with
/// `replay_active_runs`) gets the open run's events up to that position,
/// then the events it missed, each once and marked replayed, then
/// `caught_up`, then live events.
#[tokio::test]
async fn a_page_reloaded_mid_run_gets_the_whole_run_once() {
    let server = start().await;
    let ev =
        |event: &str| json!({"user_id": "rae", "event": event, "run_id": "r1", "thread_id": "t1"});
    let (ws, w) = connect(&server, "rae").await;
    let epoch = w["epoch"].as_str().unwrap().to_owned();
    let batch = vec![
        ev("agent_started"),
        json!({"user_id": "rae", "event": "note"}),
        ev("agent_thinking"),
    ];
    assert_eq!(
        post(&server, "/api/v1/events", json!({ "events": batch }))
            .await
            .0,
        200
    );
    // The page saw up to seq 3 and was reloaded; meanwhile the run went on.
    drop(ws);
    let batch = vec![
        ev("tool_executing"),
        json!({"user_id": "rae", "event": "note"}),
    ];
    assert_eq!(
        post(&server, "/api/v1/events", json!({ "events": batch }))
            .await
            .0,
        200
    );
    let (mut ws, w) = hello(
        &server,
        json!({"type": "hello", "token": token("rae"), "resume": {"epoch": epoch, "seq": 3}, "replay_active_runs": true}),
    )
    .await;
    assert_eq!(
        (w["resumed"].as_bool(), w["replaying"].as_bool()),
        (Some(true), Some(true))
    );
    let mut got = Vec::new();
    loop {
        let f = next_json(&mut ws).await;
        if f["type"] == "caught_up" {
            assert_eq!(f["seq"], 5);
            break;
        }
        assert_eq!(f["replayed"], true, "{f}");
        got.push((
            f["seq"].as_u64().unwrap(),
            f["event"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (1, "agent_started".to_owned()),
            (3, "agent_thinking".to_owned()),
            (4, "tool_executing".to_owned()),
            (5, "note".to_owned())
        ]
    );
    publish_n(&server, "rae", 1).await;
    let live = next_event(&mut ws).await;
    assert_eq!(
        (live["seq"].as_u64(), live.get("replayed")),
        (Some(6), None)
    );
}
