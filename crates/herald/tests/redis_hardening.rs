//! Issue 37's Redis findings, each against a real `redis-server`: key names
//! that cannot collide between users, runs and parts (7, 8, 9).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_server::*;
use common::*;
use herald::Config;
use herald::broker::redis::{RedisConfig, RedisNodes};
use serde_json::{Value, json};

fn node_config(redis: &Redis) -> Config {
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(redis.url()),
        prefix: "t".into(),
    });
    cfg
}

/// Finding 7: user `a` publishing with idempotency key `x}:meta` named the
/// key `t:{user:a}:idem:x}:meta`, which is the meta hash of user
/// `a}:idem:x`: the publish was refused 503 (WRONGTYPE) and could have
/// overwritten the other user's stream. A user id's `}` is escaped now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_names_do_not_collide_between_users() {
    let redis = Redis::start();
    let node = start_with(node_config(&redis)).await;
    let victim = "a}:idem:x";
    let first = publish(&node, victim, "note", json!({"n": 1})).await;
    assert_eq!(first["seq"], 1);
    let (status, body) = post(
        &node,
        "/api/v1/events",
        json!({"user_id": "a", "event": "note", "idempotency_key": "x}:meta"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["seq"], 1);
    assert_ne!(body["results"][0]["duplicate"], true);
    // The victim's stream goes on in the same epoch.
    let second = publish(&node, victim, "note", json!({"n": 2})).await;
    assert_eq!(second["seq"], 2);
    assert_eq!(second["epoch"], first["epoch"]);
    // A socket of the victim's gets both from history.
    let (mut ws, welcome) = connect(&node, victim).await;
    assert_eq!(welcome["seq"], 2);
    drop(welcome);
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

/// The open runs' events a fresh hello replays, as (run, part, text).
async fn replayed_deltas(
    node: &herald::Server,
    user: &str,
    n: usize,
) -> Vec<(String, String, String)> {
    let mut ws = open(node, &[], None).await;
    let hello = json!({"type": "hello", "token": token(user), "replay_active_runs": true});
    send_json(&mut ws, hello).await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let mut out = Vec::new();
    while out.len() < n {
        let e: Value = event_of(&mut ws).await;
        if e["event"] == "agent_text_delta" {
            out.push((
                e["run_id"].as_str().unwrap().to_owned(),
                e["data"]["part"].as_str().unwrap().to_owned(),
                e["data"]["text"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out.sort();
    out
}

/// Finding 8: (run `a`, part `b\tc`) and (run `a\tb`, part `c`) were one
/// `run\tpart` in the script: the second's text joined the first's entry
/// (a resume showed it under the other run), and a numbered delta of the
/// second was skipped as a duplicate of the first's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_and_part_holding_a_tab_do_not_collide() {
    let redis = Redis::start();
    let node = start_with(node_config(&redis)).await;
    for (run, part, text) in [("a", "b\tc", "one"), ("a\tb", "c", "two")] {
        let (status, body) = post(
            &node,
            "/api/v1/events",
            json!({"user_id": "tab", "event": "agent_text_delta", "run_id": run,
                   "data": {"part": part, "text": text, "index": 0}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["results"][0]["duplicate"], true, "{run:?} {part:?}");
    }
    assert_eq!(
        replayed_deltas(&node, "tab", 2).await,
        vec![
            ("a".into(), "b\tc".into(), "one".into()),
            ("a\tb".into(), "c".into(), "two".into()),
        ]
    );
}

/// Finding 9: a run named `*` shared the field that holds all open runs'
/// total: opening and closing it drove the total negative, and the
/// stream's open runs then outgrew their bound together unseen. With five
/// runs of 9 KB and a bound of 4 × 10 KB, the largest must be closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_named_star_does_not_corrupt_the_open_runs_total() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.stream_limits.max_run_bytes = 10_000;
    cfg.stream_limits.max_runs_bytes = 40_000;
    let node = start_with(cfg).await;
    let blob = "x".repeat(9_000);
    let send = |run: &str, event: &str, data: Value| json!({"user_id": "star", "event": event, "run_id": run, "data": data});
    for e in [
        send("*", "agent_thinking", json!({"t": blob})),
        send("*", "agent_completed", json!({})),
    ] {
        let (status, body) = post(&node, "/api/v1/events", e).await;
        assert_eq!(status, 200, "{body}");
    }
    let (mut ws, _) = connect(&node, "star").await;
    for r in 0..5 {
        let (status, body) = post(
            &node,
            "/api/v1/events",
            send(&format!("r{r}"), "agent_thinking", json!({"t": blob})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut closed = Vec::new();
    for _ in 0..6 {
        let e = event_of(&mut ws).await;
        if e["event"] == "agent_error" {
            closed.push((e["run_id"].clone(), e["data"]["reason"].clone()));
        }
    }
    assert_eq!(closed, vec![(json!("r0"), json!("run_too_large"))]);
    let total = redis.cli(&["HGET", "t:{user:star}:runbytes", "*"]);
    let total: i64 = total.parse().unwrap();
    assert!((36_000..=40_000).contains(&total), "total {total}");
}
