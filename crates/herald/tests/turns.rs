//! Every turn in the stream (issue 39, item 1): an accepted `user_message`
//! is published into the sender's stream once, before it is forwarded, so
//! every tab sees the question before the answer; a run that names the
//! message it answers (`agent_started.data.message_id`) keeps it, so a page
//! opened mid-run is shown the question with the run. On one node and on
//! two nodes sharing a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::redis_server::{Redis, node_config};
use common::*;
use serde_json::{Value, json};

fn is_event(v: &Value, name: &str) -> bool {
    v["type"] == "event" && v["event"] == name
}

fn events(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|v| v["type"] == "event").collect()
}

/// Tab A sends a message; tab B (on `b_server`) sees the question, then the
/// demo agent's run naming it; a page opened mid-run (on `late_server`)
/// is replayed the question and the run, each once, in seq order.
async fn one_question_in_every_tab(a_server: &herald::Server, b_server: &herald::Server) {
    let (mut a, _) = connect(a_server, "ana").await;
    let (mut b, _) = connect(b_server, "ana").await;
    send_json(
        &mut a,
        json!({"type": "user_message", "id": "q-1", "thread_id": "t1", "text": "what is up", "data": {"k": 1}}),
    )
    .await;
    // Tab B: the question first, then the run that answers it.
    let seen = until(&mut b, |v| is_event(v, "agent_started")).await;
    let evs = events(&seen);
    assert_eq!(evs.len(), 2, "{seen:?}");
    let q = evs[0];
    assert_eq!(q["event"], "user_message", "{q}");
    assert_eq!(q["thread_id"], "t1");
    assert_eq!(q["run_id"], Value::Null);
    assert_eq!(
        q["data"],
        json!({"id": "q-1", "text": "what is up", "data": {"k": 1}, "user_id": "ana"})
    );
    let started = evs[1];
    assert_eq!(started["data"]["message_id"], "q-1");
    assert!(started["seq"].as_u64() > q["seq"].as_u64());

    // Tab A sees its own question in the stream too, and its ack.
    let seen = until(&mut a, |v| v["type"] == "ack").await;
    assert_eq!(seen.last().unwrap()["id"], "q-1");
    let mine = until(&mut a, |v| {
        is_event(v, "user_message") || is_event(v, "agent_started")
    })
    .await;
    let first = seen
        .iter()
        .chain(&mine)
        .find(|v| v["type"] == "event")
        .unwrap();
    assert_eq!(
        first["event"], "user_message",
        "the question comes before the run"
    );

    // A page opened mid-run (no resume) is replayed the question and the run.
    let mut late = open(b_server, &[], None).await;
    send_json(
        &mut late,
        json!({"type": "hello", "token": token("ana"), "replay_active_runs": true}),
    )
    .await;
    let welcome = next_json(&mut late).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let replayed = until(&mut late, |v| is_event(v, "agent_completed")).await;
    let evs = events(&replayed);
    assert_eq!(evs[0]["event"], "user_message", "{evs:?}");
    assert_eq!(evs[0]["data"]["id"], "q-1");
    assert_eq!(evs[1]["event"], "agent_started");
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {seqs:?}"
    );
    let questions = evs.iter().filter(|e| e["event"] == "user_message").count();
    assert_eq!(questions, 1);

    // The same id again: acked, neither stored nor forwarded twice.
    send_json(
        &mut a,
        json!({"type": "user_message", "id": "q-1", "thread_id": "t1", "text": "what is up"}),
    )
    .await;
    until(&mut a, |v| v["type"] == "ack" && v["id"] == "q-1").await;
    let marker = publish(a_server, "ana", "marker", json!({})).await;
    let marker_seq = marker["seq"].as_u64().unwrap();
    let rest = until(&mut b, |v| is_event(v, "marker")).await;
    let names: HashSet<&str> = events(&rest)
        .iter()
        .filter(|e| e["seq"].as_u64() < Some(marker_seq))
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(!names.contains("user_message"), "{names:?}");
    assert!(
        !names.contains("agent_started"),
        "not answered twice: {names:?}"
    );
}

#[tokio::test]
async fn a_question_is_in_every_tab_and_in_the_replay_of_its_run() {
    let server = start().await;
    one_question_in_every_tab(&server, &server).await;
}

#[tokio::test]
async fn a_question_is_in_every_tab_across_nodes_on_redis() {
    let redis = Redis::start();
    let one = start_with(node_config(&redis)).await;
    let two = start_with(node_config(&redis)).await;
    one_question_in_every_tab(&one, &two).await;
    // The run's copy of the question went with the run.
    wait_until(
        Duration::from_secs(10),
        || redis.cli(&["KEYS", "t:{user:ana}:run:*"]).trim().is_empty(),
        || "the closed run's list is gone".into(),
    )
    .await;
    assert_eq!(
        redis
            .cli(&["EXISTS", "t:{user:ana}:ans:herald:msg:q-1"])
            .trim(),
        "1",
        "the message is marked as answered by one run"
    );
}

/// A message Herald cannot store (Redis down) is refused, not forwarded:
/// `nack broker_unavailable` with a retry hint.
#[tokio::test]
async fn a_message_that_cannot_be_stored_is_not_forwarded() {
    let redis = Redis::start();
    let server = start_with(node_config(&redis)).await;
    let (mut ws, _) = connect(&server, "ana").await;
    drop(redis);
    send_json(
        &mut ws,
        json!({"type": "user_message", "id": "q-2", "thread_id": "t1", "text": "hello?"}),
    )
    .await;
    let seen = until(&mut ws, |v| v["type"] == "nack" || v["type"] == "ack").await;
    let last = seen.last().unwrap();
    assert_eq!(last["type"], "nack", "{seen:?}");
    assert_eq!(last["error"], "broker_unavailable");
    assert_eq!(last["retry_after_ms"], 1000);
}
