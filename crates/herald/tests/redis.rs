//! Several Herald nodes on one real `redis-server` (started by the test on a
//! free loopback port): fan-out across nodes, resume on another node,
//! idempotency across nodes, run replay and run timeouts across the fleet,
//! pub/sub connections killed under load, Redis stopped and restarted empty.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Weak;
use std::time::Duration;

use common::redis_server::*;
use common::*;
use futures_util::StreamExt;
use herald::Server;
use herald::broker::memory::MemoryBroker;
use herald::broker::redis::{RedisBroker, RedisConfig, RedisNodes, RedisTiming};
use herald::broker::{Broker, BrokerError, NewEvent, user_stream};
use herald_core::stream::StreamLimits;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn node(redis: &Redis) -> Server {
    start_with(node_config(redis)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_stream_in_publish_order() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis).await, node(&redis).await, node(&redis).await);
    let (mut on_a, wa) = connect(&a, "ann").await;
    let (mut on_b, wb) = connect(&b, "ann").await;
    assert_eq!(wa["epoch"], wb["epoch"], "one stream, one epoch");

    let r = publish(&c, "ann", "note", json!({"n": 0})).await;
    assert_eq!(r["seq"], 1);
    for ws in [&mut on_a, &mut on_b] {
        let e = event_of(ws).await;
        assert_eq!(
            (e["seq"].as_u64(), e["data"]["n"].as_u64()),
            (Some(1), Some(0))
        );
    }
    let nodes = [&a, &b, &c];
    for n in 1..=50u64 {
        publish(nodes[n as usize % 3], "ann", "note", json!({ "n": n })).await;
    }
    for ws in [&mut on_a, &mut on_b] {
        for n in 1..=50u64 {
            let e = event_of(ws).await;
            assert_eq!(
                (e["seq"].as_u64(), e["data"]["n"].as_u64()),
                (Some(n + 1), Some(n))
            );
        }
    }
}

/// A stream's last connection leaving unsubscribes the node from it; a node
/// that shuts down lets go of its Redis connections, and its pub/sub
/// task stops with it — also while Redis is down, when the task is not
/// waiting on the hub's requests and only the broker's drop stops it
/// (mutation testing found `unsubscribe` and `Drop for RedisBroker` unpinned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_leaves_no_redis_connection_behind() {
    // CLIENT LIST counts redis-cli's own connection each time.
    let clients = |r: &Redis| r.cli(&["CLIENT", "LIST"]).lines().count();
    let redis = Redis::start();
    let before = clients(&redis);
    let server = node(&redis).await;
    let (mut ws, _) = connect(&server, "ann").await;
    publish(&server, "ann", "note", json!({})).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    let during = clients(&redis);
    assert!(
        during >= before + 2,
        "a node holds a command and a pub/sub connection: {before} -> {during}"
    );
    // The stream's last connection leaves: the node unsubscribes.
    let numsub = || redis.cli(&["PUBSUB", "NUMSUB", "t:{user:ann}:ch"]);
    assert_eq!(numsub(), "t:{user:ann}:ch\n1");
    drop(ws);
    wait_until(
        Duration::from_secs(10),
        || numsub() == "t:{user:ann}:ch\n0",
        || format!("still subscribed: {}", numsub()),
    )
    .await;
    server.shutdown().await;
    wait_until(
        Duration::from_secs(10),
        || clients(&redis) <= before,
        || {
            format!(
                "connections left behind: {}",
                redis.cli(&["CLIENT", "LIST"])
            )
        },
    )
    .await;

    // Redis down: the node shuts down while its pub/sub task is retrying,
    // and every task it started ends (the runtime's live tasks come back to
    // what they were before the node started).
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let base = tasks();
    let server = node(&redis).await;
    let (ws, _) = connect(&server, "bea").await;
    redis.stop();
    // A hello for a new stream is refused (1013) once Redis is gone.
    let mut late = open(&server, &[], None).await;
    send_json(&mut late, json!({"type": "hello", "token": token("cy")})).await;
    expect_close(&mut late, 1013).await;
    drop((ws, late));
    server.shutdown().await;
    wait_until(
        Duration::from_secs(10),
        || tasks() <= base,
        || {
            format!(
                "{} tasks left of a shut-down node",
                tasks().saturating_sub(base)
            )
        },
    )
    .await;
}

/// A catch-up page is served only when it starts right after the reader's
/// position; one the trimmed window (or another epoch) would open with a gap
/// is `Gone`, the same on both brokers. A hello compares the resume point
/// with the window first, so only a trim racing a paged catch-up reaches
/// this check; here the broker is asked directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_would_skip_events_is_gone_on_both_brokers() {
    let redis = Redis::start();
    let limits = StreamLimits {
        max_events: 5,
        ..StreamLimits::default()
    };
    let memory = MemoryBroker::new(limits.clone(), usize::MAX, Weak::<NoSink>::new());
    let cfg = RedisConfig {
        nodes: RedisNodes::Single(redis.url()),
        prefix: "t".into(),
        timing: Default::default(),
    };
    let on_redis = RedisBroker::new(&cfg, "n1", limits, Weak::<NoSink>::new()).unwrap();
    let stream = user_stream("pager");
    for (name, broker) in [("memory", &memory as &dyn Broker), ("redis", &on_redis)] {
        for i in 0..10 {
            let event = NewEvent::new(
                "note".into(),
                None,
                None,
                json!({ "i": i }),
                "2026-12-02T00:00:00.000Z".into(),
            );
            broker.publish(&stream, vec![event]).await.unwrap();
        }
        let pos = broker.position(&stream).await.unwrap();
        assert_eq!((pos.first_seq, pos.last_seq), (6, 10), "{name}");
        let page = |after, limit| broker.history(&stream, &pos.epoch, after, 10, limit);
        let covered = |page: Vec<_>| -> Vec<(u64, u64)> {
            page.iter()
                .map(|e: &herald::broker::StoredEvent| (e.from, e.seq))
                .collect()
        };
        let all: Vec<_> = (6..=10).map(|s| (s, s)).collect();
        assert_eq!(covered(page(5, 100).await.unwrap()), all, "{name}");
        assert_eq!(
            covered(page(7, 2).await.unwrap()),
            [(8, 8), (9, 9)],
            "{name}"
        );
        assert_eq!(page(10, 100).await, Ok(Vec::new()), "{name}");
        for after in [0, 3, 4] {
            assert!(
                matches!(page(after, 100).await, Err(BrokerError::Gone { .. })),
                "{name}: a page after {after} would start at 6"
            );
        }
        let stale = broker.history(&stream, "another-epoch", 5, 10, 100).await;
        assert!(matches!(stale, Err(BrokerError::Gone { .. })), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_gets_exactly_the_missed_events() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis).await, node(&redis).await, node(&redis).await);
    let (mut ws, w) = connect(&a, "bo").await;
    publish(&b, "bo", "note", json!({})).await;
    let seen = event_of(&mut ws).await["seq"].as_u64().unwrap();
    drop(ws);
    for _ in 0..5 {
        publish(&b, "bo", "note", json!({})).await;
    }
    let mut ws = open(&c, &[], None).await;
    send_json(
        &mut ws,
        json!({"type": "hello", "token": token("bo"), "resume": {"epoch": w["epoch"], "seq": seen}}),
    )
    .await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["seq"].as_u64()),
        (Some(true), Some(6))
    );
    for seq in 2..=6 {
        assert_eq!(event_of(&mut ws).await["seq"], seq);
    }
    publish(&a, "bo", "note", json!({})).await;
    assert_eq!(event_of(&mut ws).await["seq"], 7, "then live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_and_run_replay_hold_across_nodes() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.stream_limits.max_events = 3;
    let a = start_with(cfg.clone()).await;
    let b = start_with(cfg).await;
    let body = json!({"user_id": "cy", "event": "note", "idempotency_key": "k1"});
    let (_, first) = post(&a, "/api/v1/events", body.clone()).await;
    let (_, again) = post(&b, "/api/v1/events", body).await;
    assert_eq!(first["results"][0]["seq"], 1);
    assert_eq!(again["results"][0]["seq"], 1);
    assert_eq!(again["results"][0]["duplicate"], true);

    let ev =
        |event: &str| json!({"user_id": "cy", "event": event, "run_id": "r1", "thread_id": "t"});
    post(
        &a,
        "/api/v1/events",
        json!({"events": [ev("agent_started"), ev("agent_thinking")]}),
    )
    .await;
    for _ in 0..4 {
        publish(&a, "cy", "note", json!({})).await;
    }
    // The count bound (3) evicted the run's start; a page opened on the other
    // node still replays the whole open run.
    let mut ws = open(&b, &[], None).await;
    send_json(
        &mut ws,
        json!({"type": "hello", "token": token("cy"), "replay_active_runs": true}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["seq"], 7);
    let run: Vec<(Value, Value)> = vec![event_of(&mut ws).await, event_of(&mut ws).await]
        .into_iter()
        .map(|e| (e["seq"].clone(), e["event"].clone()))
        .collect();
    assert_eq!(
        run,
        vec![
            (json!(2), json!("agent_started")),
            (json!(3), json!("agent_thinking"))
        ]
    );
}

/// Three sweepers, one close: a run silent past `run_ttl` gets one
/// `agent_error`, counted once. An index entry whose run is gone (a ghost)
/// is dropped without publishing or counting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_run_is_closed_once_across_the_fleet() {
    let redis = Redis::start();
    let ghost = "user:ghost\nr-ghost";
    redis.cli(&["ZADD", "t:runs", "0", ghost]);
    let mut cfg = node_config(&redis);
    cfg.stream_limits.run_ttl = Duration::from_millis(800);
    let nodes = [
        start_with(cfg.clone()).await,
        start_with(cfg.clone()).await,
        start_with(cfg).await,
    ];
    let (mut ws, _) = connect(&nodes[0], "di").await;
    post(
        &nodes[1],
        "/api/v1/events",
        json!({"user_id": "di", "event": "agent_started", "run_id": "r9", "thread_id": "t9"}),
    )
    .await;
    assert_eq!(event_of(&mut ws).await["event"], "agent_started");
    let e = event_of(&mut ws).await;
    assert_eq!(
        (
            e["event"].as_str(),
            e["run_id"].as_str(),
            e["thread_id"].as_str()
        ),
        (Some("agent_error"), Some("r9"), Some("t9"))
    );
    assert_eq!(e["data"]["reason"], "run_timeout");
    // Three sweepers, one close: once every node has swept twice more
    // (a whole pass after the close), the next event is seq 3.
    wait_for_sweeps(&nodes.iter().collect::<Vec<_>>()).await;
    let r = publish(&nodes[2], "di", "note", json!({})).await;
    assert_eq!(r["seq"], 3);
    assert_eq!(event_of(&mut ws).await["seq"], 3);
    wait_until(
        Duration::from_secs(5),
        || redis.cli(&["ZSCORE", "t:runs", ghost]).is_empty(),
        || "the sweepers dropped the ghost's index entry".into(),
    )
    .await;
    assert_eq!(redis.cli(&["EXISTS", "t:{user:ghost}:log"]), "0");
    // The recorder is the process's; no other test here times a run out.
    let text = metrics_text(&nodes[0]).await;
    let timed_out = text
        .lines()
        .find_map(|l| l.strip_prefix("herald_runs_timed_out_total "))
        .map(str::to_owned);
    assert_eq!(timed_out.as_deref(), Some("1"), "{text}");
}

/// A run whose only events are text deltas stays open past `run_ttl`: its
/// deltas record its activity (once per `run_ttl` / 8 here, not per delta),
/// which the sweepers' silence check honours. The run is closed by its
/// agent, so this test times nothing out (the one above counts that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_deltas_alone_keep_a_run_open_past_run_ttl() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.stream_limits.run_ttl = Duration::from_millis(600);
    let node = start_with(cfg).await;
    let (mut ws, _) = connect(&node, "tex").await;
    post(
        &node,
        "/api/v1/events",
        json!({"user_id": "tex", "event": "agent_started", "run_id": "rt"}),
    )
    .await;
    // Deltas for three times run_ttl, one every 50 ms; the sweeper runs
    // every second meanwhile.
    let deltas = 40;
    for i in 0..deltas {
        let (status, _) = post(
            &node,
            "/api/v1/events",
            json!({"user_id": "tex", "event": "agent_text_delta", "run_id": "rt",
                   "data": {"part": "answer", "text": format!("{i} ")}}),
        )
        .await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    post(
        &node,
        "/api/v1/events",
        json!({"user_id": "tex", "event": "agent_done", "run_id": "rt"}),
    )
    .await;
    // Every seq once, in order: agent_started, the deltas (some perhaps
    // joined into one frame), agent_done; no run_timeout between them.
    let mut next = 1;
    loop {
        let e = event_of(&mut ws).await;
        let from = e["from_seq"].as_u64().unwrap_or(e["seq"].as_u64().unwrap());
        assert_eq!(from, next, "{e}");
        next = e["seq"].as_u64().unwrap() + 1;
        match e["event"].as_str() {
            Some("agent_done") => break,
            Some("agent_started") | Some("agent_text_delta") => {}
            _ => panic!("the run was closed while its deltas streamed: {e}"),
        }
    }
    assert_eq!(next, deltas + 3);
}

/// Issue 14, finding 1, on Redis: a run outgrowing `run_max_bytes` is
/// closed with `agent_error {reason: "run_too_large"}` right after the event
/// that crossed the bound, and its events are no longer kept as a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_outgrowing_its_bound_is_closed_on_redis() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.stream_limits.max_run_bytes = 20_000;
    let node = start_with(cfg).await;
    let (mut ws, _) = connect(&node, "ron").await;
    let blob = "x".repeat(4_000);
    post(
        &node,
        "/api/v1/events",
        json!({"user_id": "ron", "event": "agent_started", "run_id": "big", "thread_id": "tb"}),
    )
    .await;
    // Five: the fifth crosses the bound, and nothing reopens the run after
    // its close (a sixth event of `big` would open it again).
    for _ in 0..5 {
        post(
            &node,
            "/api/v1/events",
            json!({"user_id": "ron", "event": "agent_thinking", "run_id": "big", "data": {"t": blob}}),
        )
        .await;
    }
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(event_of(&mut ws).await);
    }
    let close = seen
        .iter()
        .position(|e| e["event"] == "agent_error")
        .expect("the run was closed");
    assert_eq!(seen[close]["data"]["reason"], "run_too_large");
    assert_eq!(seen[close]["thread_id"], "tb");
    // agent_started, then 4 KB events: the fifth pushes the run past 20,000 bytes.
    assert_eq!(
        close, 6,
        "closed right after the event that crossed the bound"
    );
    // Issue 41, finding 5: the closed run is gone from the open runs
    // (the script's HDEL; `1` was accepted here before).
    assert_eq!(redis.cli(&["HLEN", "t:{user:ron}:runs"]), "0");
    let bytes = redis.cli(&["HGET", "t:{user:ron}:runbytes", "*"]);
    assert!(bytes.parse::<u64>().unwrap_or(0) < 20_000, "{bytes}");
}

/// A node's pub/sub connection killed while events are published: the
/// events published while it was down reach its socket through the resync
/// (catch-up from the log), in order, each once. Issue 41, finding 7: the
/// kills used to land at fixed times against a publisher done in 0.4 s, so a
/// resync made a no-op passed 2 runs of 15. Now node A connects as its own
/// ACL user, which is switched off while its connections are killed, so A
/// cannot come back until the test lets it: 40 events are published in
/// each such window, and only the resync can deliver them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_pubsub_connections_under_load_loses_nothing() {
    let redis = Redis::start();
    let alice = |state: &str| {
        redis.cli(&[
            "ACL",
            "SETUSER",
            "alice",
            state,
            ">pw-0123456789",
            "~*",
            "&*",
            "+@all",
        ]);
    };
    alice("on");
    let url = format!("redis://alice:pw-0123456789@127.0.0.1:{}", redis.port);
    let (a, b) = (node_at(url).await, node(&redis).await);
    let (mut ws, _) = connect(&a, "ed").await;
    let mut seq = 0;
    let mut publish_some = async |n: u64| {
        for _ in 0..n {
            seq += 1;
            assert_eq!(
                publish(&b, "ed", "note", json!({"n": seq})).await["seq"],
                seq
            );
        }
    };
    // A's pub/sub connection (flag P) is back.
    let subscribed = || {
        redis
            .cli(&["CLIENT", "LIST"])
            .lines()
            .any(|l| l.contains(" flags=P ") && l.contains(" user=alice "))
    };
    for _ in 0..3 {
        wait_until(Duration::from_secs(10), subscribed, || {
            "A resubscribed".into()
        })
        .await;
        publish_some(20).await;
        alice("off");
        let killed = redis.cli(&["CLIENT", "KILL", "USER", "alice"]);
        assert_ne!(killed, "0", "node A's connections existed");
        publish_some(40).await;
        alice("on");
    }
    publish_some(20).await;
    expect_seqs(&mut ws, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_and_redis_back_empty_is_a_reset() {
    let redis = Redis::start();
    let a = node(&redis).await;
    let (mut ws, w) = connect(&a, "flo").await;
    publish(&a, "flo", "note", json!({})).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);

    let port = redis.stop();
    // Answered, not hung: the bound is a hang guard far above the 2 s
    // command timeout, not a speed figure.
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(30),
        post(
            &a,
            "/api/v1/events",
            json!({"user_id": "flo", "event": "note"}),
        ),
    )
    .await
    .expect("a publish with Redis down is answered");
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    let mut ready = 200;
    for _ in 0..50 {
        ready = get_json(&a, "/readyz").await.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 503, "readyz reports the broker down");
    assert_eq!(get_json(&a, "/healthz").await.0, 200);
    // Live sockets stay open.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    // A new hello cannot be served: 1013.
    let mut late = open(&a, &[], None).await;
    send_json(&mut late, json!({"type": "hello", "token": token("gus")})).await;
    expect_close(&mut late, 1013).await;

    // Redis comes back empty: publishing works again by itself, in a new epoch.
    let _redis = Redis::start_on(port);
    let mut status = 0;
    for _ in 0..100 {
        status = post(
            &a,
            "/api/v1/events",
            json!({"user_id": "flo", "event": "note"}),
        )
        .await
        .0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "recovers when Redis returns");
    let mut again = open(&a, &[], None).await;
    send_json(
        &mut again,
        json!({"type": "hello", "token": token("flo"), "resume": {"epoch": w["epoch"], "seq": 1}}),
    )
    .await;
    let welcome = next_json(&mut again).await;
    assert_eq!(welcome["reset"], true, "{welcome}");
    assert_ne!(welcome["epoch"], w["epoch"]);
    let metrics = metrics_text(&a).await;
    assert!(
        metrics.contains(r#"herald_resets_total{cause="unknown_epoch"}"#),
        "the reset is counted by cause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_and_listing_reach_every_node() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis).await, node(&redis).await, node(&redis).await);
    let (mut on_a, _) = connect(&a, "gil").await;
    let (mut on_b, _) = connect(&b, "gil").await;
    let (_other, _) = connect(&b, "hana").await;

    // Listed from a node that holds none of them, each row naming its node.
    let (status, list) = get_json(&c, "/api/v1/connections?user_id=gil").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 2, "{list}");
    let nodes: std::collections::BTreeSet<String> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes.len(), 2, "two nodes hold gil's sockets: {list}");
    let (_, all) = get_json(&c, "/api/v1/connections").await;
    assert_eq!(all["total"], 3, "{all}");

    // Kicked through the third node: both sockets close with 4409.
    let (status, body) = post(&c, "/api/v1/disconnect", json!({"user_id": "gil"})).await;
    assert_eq!((status, body["disconnected"].as_u64()), (200, Some(2)));
    expect_close(&mut on_a, 4409).await;
    expect_close(&mut on_b, 4409).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_dedupe_and_demo_cancel_hold_across_nodes() {
    let redis = Redis::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let (mut on_a, _) = connect(&a, "ivo").await;
    let (mut on_b, _) = connect(&b, "ivo").await;
    let msg = json!({"type": "user_message", "id": "m1", "thread_id": "t1", "text": "hello"});
    send_json(&mut on_a, msg.clone()).await;
    // The demo agent on node A answers; both sockets see the run start.
    let run_id = loop {
        let v = next_json(&mut on_a).await;
        if v["event"] == "agent_started" {
            break v["run_id"].as_str().unwrap().to_owned();
        }
    };
    // The same id again, through the other node: acked, not forwarded again.
    send_json(&mut on_b, msg).await;
    let mut started = 0;
    let mut acked = false;
    loop {
        let v = next_json(&mut on_b).await;
        if v["type"] == "ack" && v["id"] == "m1" {
            acked = true;
            // Cancel through node B a run that executes on node A.
            send_json(&mut on_b, json!({"type": "cancel", "run_id": run_id})).await;
        }
        if v["event"] == "agent_started" {
            started += 1;
        }
        if v["event"] == "agent_completed" {
            panic!("the run should have been cancelled: {v}");
        }
        if v["event"] == "agent_cancelled" {
            break;
        }
    }
    assert!(acked);
    assert_eq!(started, 1, "one run for one message id");
}

async fn node_at(url: String) -> Server {
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(url),
        prefix: "t".into(),
        timing: Default::default(),
    });
    start_with(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_the_url_authenticates() {
    let port = free_port();
    let _redis = Redis::start_with(
        port,
        &["--requirepass", "s3cret-pw"],
        &["-a", "s3cret-pw", "--no-auth-warning"],
    );
    let a = node_at(format!("redis://:s3cret-pw@127.0.0.1:{port}")).await;
    let (mut ws, _) = connect(&a, "jo").await;
    publish(&a, "jo", "note", json!({})).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    // A wrong password is an honest 503, not a success.
    let wrong = node_at(format!("redis://:nope@127.0.0.1:{port}")).await;
    let (status, body) = post(
        &wrong,
        "/api/v1/events",
        json!({"user_id": "jo", "event": "note"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_connects_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(made.success());
    let port = free_port();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let _redis = Redis::start_with(
        port,
        &[
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
        ],
        &["--tls", "--cacert", cert],
    );
    // A self-signed certificate: `#insecure` skips verification (tests and
    // development only; real deployments use a CA-signed certificate).
    let a = node_at(format!("rediss://127.0.0.1:{port}/#insecure")).await;
    let b = node_at(format!("rediss://127.0.0.1:{port}/#insecure")).await;
    let (mut ws, _) = connect(&a, "kit").await;
    publish(&b, "kit", "note", json!({})).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);
}

/// The half-open drills' setup: a node behind a proxy to `redis` with
/// `timing`, a node straight on it, a socket of user `ho` on the first that
/// got event 1 published through the second; then the proxy's open
/// connections are cut silently. Returns (proxy, behind, direct, socket).
async fn cut_behind(redis: &Redis, timing: RedisTiming) -> (Partition, Server, Server, Ws) {
    let path = Partition::start(redis.port).await;
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(format!("redis://127.0.0.1:{}", path.port)),
        prefix: "t".into(),
        timing,
    });
    let (behind, direct) = (start_with(cfg).await, node(redis).await);
    let (mut ws, _) = connect(&behind, "ho").await;
    assert_eq!(
        publish(&direct, "ho", "note", json!({"n": 1})).await["seq"],
        1
    );
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    path.cut();
    (path, behind, direct, ws)
}

/// Issue 41, finding 1: a pub/sub connection cut silently (half-open) is
/// found by its PING and replaced, and nothing published meanwhile is lost.
/// Nothing else touches the cut connection here (no hello, publishes go
/// through the other node), and the PING runs every 200 ms: with the PING
/// interval set to an hour this fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_redis_connection_is_found_by_its_ping_and_nothing_is_lost() {
    let redis = Redis::start();
    let timing = RedisTiming {
        ping_every: Duration::from_millis(200),
        command_timeout: Duration::from_millis(500),
        subscribe_timeout: Duration::from_secs(3600),
        ..RedisTiming::default()
    };
    let (_path, behind, direct, mut ws) = cut_behind(&redis, timing).await;
    for n in [2, 3] {
        assert_eq!(
            publish(&direct, "ho", "note", json!({"n": n})).await["seq"],
            n
        );
    }
    // The hang guard: a PING every 200 ms answered within 500 ms finds the
    // cut well within it; nothing else would.
    for n in [2, 3] {
        let e = event_within(&mut ws, Duration::from_secs(20), "after the cut").await;
        assert_eq!(
            (e["seq"].as_u64(), e["data"]["n"].as_u64()),
            (Some(n), Some(n))
        );
    }
    // Publishing through the node behind the cut works again, live.
    assert_eq!(
        publish(&behind, "ho", "note", json!({"n": 4})).await["seq"],
        4
    );
    assert_eq!(event_of(&mut ws).await["seq"], 4);
}

/// A hello right after a silent cut subscribes on the dead connection: that
/// SUBSCRIBE is bounded (`subscribe_timeout`, 500 ms here), so it finds the
/// cut itself and cannot hold the pub/sub task for good. The PING is set to
/// an hour, so only the SUBSCRIBE's bound can: the hello is answered
/// (welcomed, or 1013 while the subscription could not be made) and the
/// events published meanwhile arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_on_a_half_open_connection_is_bounded() {
    let redis = Redis::start();
    let timing = RedisTiming {
        ping_every: Duration::from_secs(3600),
        command_timeout: Duration::from_millis(500),
        subscribe_timeout: Duration::from_millis(500),
        ..RedisTiming::default()
    };
    let (_path, behind, direct, mut ws) = cut_behind(&redis, timing).await;
    let mut late = open(&behind, &[], None).await;
    send_json(&mut late, json!({"type": "hello", "token": token("ho2")})).await;
    assert_eq!(
        publish(&direct, "ho", "note", json!({"n": 2})).await["seq"],
        2
    );
    let e = event_within(&mut ws, Duration::from_secs(20), "after the cut").await;
    assert_eq!(
        (e["seq"].as_u64(), e["data"]["n"].as_u64()),
        (Some(2), Some(2))
    );
    // Nothing twice: the next event is the next one published.
    assert_eq!(
        publish(&direct, "ho", "note", json!({"n": 3})).await["seq"],
        3
    );
    let e = event_within(&mut ws, Duration::from_secs(20), "the next event").await;
    assert_eq!(e["seq"].as_u64(), Some(3));
    let reply = tokio::time::timeout(Duration::from_secs(20), late.next())
        .await
        .expect("the hello during the cut was answered")
        .expect("a frame")
        .expect("no error");
    match reply {
        Message::Text(t) => assert!(t.contains("welcome"), "{t}"),
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1013, "{f:?}"),
        other => panic!("{other:?}"),
    }
}

/// Behind a path cut for good (connections accepted, nothing answered), a
/// node's commands fail honestly (503) and do not queue one connection
/// attempt each: commands that waited for an attempt that failed fail with
/// it, so a burst of publishes costs one attempt (4 s), not one per publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_behind_a_dead_path_fail_together() {
    let redis = Redis::start();
    let path = Partition::start(redis.port).await;
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(format!("redis://127.0.0.1:{}", path.port)),
        prefix: "t".into(),
        timing: RedisTiming {
            command_timeout: Duration::from_millis(300),
            ..RedisTiming::default()
        },
    });
    let node = start_with(cfg).await;
    let (_ws, _) = connect(&node, "ff").await;
    assert_eq!(publish(&node, "ff", "note", json!({})).await["seq"], 1);
    path.cut_for_good();
    let burst = || {
        futures_util::future::join_all((0..6).map(|_| {
            post(
                &node,
                "/api/v1/events",
                json!({"user_id": "ff", "event": "note"}),
            )
        }))
    };
    // The first burst times out on the connection it had (and marks it stalled).
    for (status, body) in burst().await {
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("broker_unavailable")),
            "{body}"
        );
    }
    // The second needs a new connection: one publish makes the attempt, the
    // others wait for it and fail with it.
    let replies = burst().await;
    let waited = replies
        .iter()
        .filter(|(_, body)| {
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("while this command waited"))
        })
        .count();
    for (status, body) in &replies {
        assert_eq!(
            (*status, body["error"].as_str()),
            (503, Some("broker_unavailable")),
            "{body}"
        );
    }
    assert!(waited >= 4, "{replies:?}");
}

/// After a pub/sub reconnect the node reads every stream's position to
/// catch its connections up; when that read fails (here the node's Redis
/// user may not run scripts for a while), it is retried until it succeeds,
/// so the events published meanwhile still arrive, with no new event needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_that_cannot_read_the_position_is_retried() {
    let redis = Redis::start();
    // The other node publishes as its own user, whom the ACL change spares.
    redis.cli(&["ACL", "SETUSER", "pub", "on", ">pw", "~*", "&*", "+@all"]);
    let path = Partition::start(redis.port).await;
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(format!("redis://127.0.0.1:{}", path.port)),
        prefix: "t".into(),
        timing: RedisTiming {
            ping_every: Duration::from_millis(200),
            command_timeout: Duration::from_millis(500),
            ..RedisTiming::default()
        },
    });
    let behind = start_with(cfg).await;
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Single(format!("redis://pub:pw@127.0.0.1:{}", redis.port)),
        prefix: "t".into(),
        timing: Default::default(),
    });
    let direct = start_with(cfg).await;
    let (mut ws, _) = connect(&behind, "rt").await;
    assert_eq!(
        publish(&direct, "rt", "note", json!({"n": 1})).await["seq"],
        1
    );
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    redis.cli(&["ACL", "LOG", "RESET"]);
    redis.cli(&["ACL", "SETUSER", "default", "-evalsha", "-eval", "-script"]);
    path.cut();
    for n in [2, 3] {
        assert_eq!(
            publish(&direct, "rt", "note", json!({"n": n})).await["seq"],
            n
        );
    }
    // The node reconnected and its resync was refused.
    wait_until(
        Duration::from_secs(30),
        || redis.cli(&["ACL", "LOG"]).contains("evalsha"),
        || "the resync's position read was refused".into(),
    )
    .await;
    redis.cli(&["ACL", "SETUSER", "default", "+@all"]);
    for n in [2, 3] {
        let e = event_within(&mut ws, Duration::from_secs(10), "after the retry").await;
        assert_eq!(
            (e["seq"].as_u64(), e["data"]["n"].as_u64()),
            (Some(n), Some(n))
        );
    }
}

/// The reconnect schedule a test sets: 10 ms doubling to 40 ms.
fn fast_backoff() -> RedisTiming {
    RedisTiming {
        reconnect_base: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(40),
        ..RedisTiming::default()
    }
}

/// What [`fast_backoff`] must produce: doubling, then capped.
const SCHEDULE_MS: [u64; 7] = [10, 20, 40, 40, 40, 40, 40];

/// The first reconnect waits a broker slept, once it has slept them all.
async fn first_waits(stats: impl Fn() -> Vec<Duration>) -> Vec<u64> {
    wait_until(
        Duration::from_secs(20),
        || stats().len() >= SCHEDULE_MS.len(),
        || format!("reconnect waits so far: {:?}", stats()),
    )
    .await;
    stats()[..SCHEDULE_MS.len()]
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect()
}

/// Issue 41, finding 2: a Redis that drops every connection is retried on
/// the backoff's schedule, read from the broker itself: doubling from the
/// base, then capped (a constant delay, or no cap, fails here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropping_redis_is_retried_with_backoff() {
    let (single, cluster) = tokio::join!(
        waits_against_a_dropping_server(RedisNodes::Single),
        waits_against_a_dropping_server(|url| RedisNodes::Cluster(vec![url])),
    );
    assert_eq!(single, SCHEDULE_MS, "single");
    assert_eq!(cluster, SCHEDULE_MS, "cluster");
}

/// A node makes one command connection and keeps it: hellos and publishes
/// reuse it (it is replaced only after a command times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_its_command_connection() {
    let redis = Redis::start();
    let node = node(&redis).await;
    let (mut ws, _) = connect(&node, "kc").await;
    assert_eq!(publish(&node, "kc", "note", json!({})).await["seq"], 1);
    // The pub/sub connection and the command connection.
    let before = redis.client_ids();
    assert_eq!(before.len(), 2, "{before:?}");
    for seq in 2..=21 {
        assert_eq!(publish(&node, "kc", "note", json!({})).await["seq"], seq);
    }
    let (_other, _) = connect(&node, "kc").await;
    for seq in 1..=21 {
        assert_eq!(event_of(&mut ws).await["seq"], seq);
    }
    assert_eq!(redis.client_ids(), before);
}

/// A Redis whose ACL refuses SUBSCRIBE (a user without channel rights)
/// leaves the node without pub/sub: `/readyz` says so, and the node backs
/// off between attempts instead of reconnecting in a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_is_retried_with_backoff() {
    let redis = Redis::start();
    redis.cli(&["ACL", "SETUSER", "default", "resetchannels"]);
    let mut cfg = node_config(&redis);
    if let Some(r) = cfg.redis.as_mut() {
        r.timing = fast_backoff();
    }
    let node = start_with(cfg).await;
    assert_eq!(
        first_waits(|| node.broker_stats().reconnect_waits).await,
        SCHEDULE_MS
    );
    let ready = client()
        .get(http_url(&node, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}

/// The first reconnect waits of a broker against a server that accepts
/// and drops every connection.
async fn waits_against_a_dropping_server(nodes: impl FnOnce(String) -> RedisNodes) -> Vec<u64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let cfg = RedisConfig {
        nodes: nodes(url),
        prefix: "t".into(),
        timing: fast_backoff(),
    };
    let limits = StreamLimits::default();
    let broker = RedisBroker::new(&cfg, "n1", limits, Weak::<NoSink>::new()).unwrap();
    let waits = first_waits(|| broker.stats().reconnect_waits).await;
    drop(broker);
    server.abort();
    waits
}
