//! Issue 37's Redis findings, each against a real `redis-server`: key names
//! that cannot collide between users, runs and parts (7, 8, 9); a message
//! claim that lapses when its node dies and is renewed while it lives (2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::*;
use common::*;
use herald::Config;
use serde_json::{Value, json};

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

/// A webhook receiver whose n-th request (from 0) waits `delays[n]` (the
/// last repeats) before answering 200; counts the requests it got.
async fn slow_hook(delays: Vec<Duration>) -> (String, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = seen.clone();
            let delays = delays.clone();
            async move {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delays[n.min(delays.len() - 1)]).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), count)
}

fn hooked(redis: &Redis, url: &str) -> Config {
    let mut cfg = node_config(redis);
    cfg.webhook = Some(herald::config::WebhookConfig {
        url: url.to_owned(),
        secret: "hook-secret-0123456789".to_owned(),
        timeout: Duration::from_secs(60),
        retries: 0,
        backoff: Duration::from_millis(10),
    });
    cfg.message_claim_lease = Duration::from_secs(1);
    cfg
}

/// The first frame of `kind` (ack or nack) for message `id`.
async fn answer_to(ws: &mut Ws, id: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if (v["type"] == "ack" || v["type"] == "nack") && v["id"] == id {
            return v;
        }
    }
}

async fn wait_for_count(count: &AtomicUsize, n: usize) {
    wait_until(
        Duration::from_secs(10),
        || count.load(Ordering::SeqCst) >= n,
        || {
            format!(
                "{} webhook requests, {n} expected",
                count.load(Ordering::SeqCst)
            )
        },
    )
    .await;
}

/// Finding 2: a node stopped while it forwards a `user_message` left its
/// claim `inflight` for the whole dedupe window (10 min): the retry on
/// another node waited 30 s and got `nack backend_unavailable`, and so did
/// every retry. The claim is a lease now: it lapses within
/// `message_claim_lease` (1 s here) and the retry is forwarded and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_stopped_node_lapses_within_its_lease() {
    let redis = Redis::start();
    let (url, count) = slow_hook(vec![Duration::from_secs(600), Duration::ZERO]).await;
    let a = start_with(hooked(&redis, &url)).await;
    let b = start_with(hooked(&redis, &url)).await;
    let (mut on_a, _) = connect(&a, "mo").await;
    let message = json!({"type": "user_message", "id": "m1", "thread_id": "t1", "text": "hi"});
    send_json(&mut on_a, message.clone()).await;
    wait_for_count(&count, 1).await;
    // Node A stops mid-forward (its tasks are cancelled after the drain).
    drop(on_a);
    a.shutdown().await;
    let (mut on_b, _) = connect(&b, "mo").await;
    send_json(&mut on_b, message).await;
    let answer = answer_to(&mut on_b, "m1").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

/// Finding 2: the lease is renewed while the forward runs, so a forward
/// longer than the lease is not taken over: a retry on another node waits
/// for it and is acked, and the backend gets the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_renewed_while_its_forward_runs() {
    let redis = Redis::start();
    let (url, count) = slow_hook(vec![Duration::from_secs(4)]).await;
    let a = start_with(hooked(&redis, &url)).await;
    let b = start_with(hooked(&redis, &url)).await;
    let (mut on_a, _) = connect(&a, "rene").await;
    let (mut on_b, _) = connect(&b, "rene").await;
    let message = json!({"type": "user_message", "id": "m1", "thread_id": "t1", "text": "hi"});
    send_json(&mut on_a, message.clone()).await;
    wait_for_count(&count, 1).await;
    send_json(&mut on_b, message).await;
    for ws in [&mut on_a, &mut on_b] {
        let answer = answer_to(ws, "m1").await;
        assert_eq!(answer["type"], "ack", "{answer}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "forwarded twice");
}

/// Finding 6: a stream whose data refuses its script (here its log replaced
/// by a string) fails alone: 500 `stream_error` for its publishes, while
/// the node stays ready and other users' publishes succeed (any Lua error
/// used to count as "Redis unavailable" and turn `/readyz` 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stream_fails_alone_and_the_node_stays_ready() {
    let redis = Redis::start();
    let node = start_with(node_config(&redis)).await;
    publish(&node, "broken", "note", json!({})).await;
    redis.cli(&["DEL", "t:{user:broken}:log"]);
    redis.cli(&["SET", "t:{user:broken}:log", "not a stream"]);
    for _ in 0..3 {
        let (status, body) = post(
            &node,
            "/api/v1/events",
            json!({"user_id": "broken", "event": "note"}),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (500, Some("stream_error")),
            "{body}"
        );
    }
    // A Lua runtime error in the stream's script (its seq no longer a
    // number: "ERR user_script…") is the stream's fault too, not Redis's.
    publish(&node, "garbled", "note", json!({})).await;
    redis.cli(&["HSET", "t:{user:garbled}:meta", "seq", "not a number"]);
    let (status, body) = post(
        &node,
        "/api/v1/events",
        json!({"user_id": "garbled", "event": "note"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("stream_error")),
        "{body}"
    );
    let (status, body) = get_json(&node, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(publish(&node, "fine", "note", json!({})).await["seq"], 1);
}

/// Finding 6: a stream whose meta key alone was evicted (possible under
/// `volatile-*` policies) starts a new epoch at the next publish, so
/// readers get `reset`; it used to be refused (the log's ids were ahead of
/// the new seqs) until the log expired, about an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_meta_was_evicted_starts_a_new_epoch() {
    let redis = Redis::start();
    let node = start_with(node_config(&redis)).await;
    let user = "ev";
    let send = |event: &str, data: Value| json!({"user_id": user, "event": event, "run_id": "r1", "data": data});
    let mut last = Value::Null;
    for e in [
        send("agent_started", json!({})),
        send(
            "agent_text_delta",
            json!({"part": "answer", "text": "old ", "index": 0}),
        ),
        send("agent_thinking", json!({"t": "old"})),
    ] {
        let (status, body) = post(&node, "/api/v1/events", e).await;
        assert_eq!(status, 200, "{body}");
        last = body["results"][0].clone();
    }
    assert_eq!(last["seq"], 3);
    redis.cli(&["DEL", "t:{user:ev}:meta"]);
    // The run goes on in the new epoch: its text numbering starts again.
    let (status, body) = post(
        &node,
        "/api/v1/events",
        send(
            "agent_text_delta",
            json!({"part": "answer", "text": "new", "index": 0}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let now = &body["results"][0];
    assert_eq!(now["seq"], 1);
    assert_ne!(now["epoch"], last["epoch"]);
    // A reader that held the old epoch is told plainly; the open run
    // replayed holds only the new epoch's events.
    let mut ws = open(&node, &[], None).await;
    let hello = json!({"type": "hello", "token": token(user), "replay_active_runs": true,
                       "resume": {"epoch": last["epoch"], "seq": 3}});
    send_json(&mut ws, hello).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reset"].as_bool()),
        (Some(false), Some(true)),
        "{welcome}"
    );
    assert_eq!(welcome["epoch"], now["epoch"]);
    let e = event_of(&mut ws).await;
    assert_eq!(
        (e["seq"].as_u64(), e["data"]["text"].as_str()),
        (Some(1), Some("new")),
        "{e}"
    );
}

/// Finding 10: idempotency keys are bounded per stream on Redis as in
/// memory (the newest `max_idempotency_keys`; 100,000 publishes to one user
/// used to leave 100,000 keys for the whole window). The newest still
/// deduplicate; the oldest are forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_bounded_per_stream() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.stream_limits.max_idempotency_keys = 5;
    let node = start_with(cfg).await;
    let send =
        |k: usize| json!({"user_id": "idem", "event": "note", "idempotency_key": format!("k{k}")});
    for k in 0..20 {
        let (status, body) = post(&node, "/api/v1/events", send(k)).await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = redis.cli(&["KEYS", "t:{user:idem}:idem:*"]);
    assert_eq!(keys.lines().count(), 5, "{keys}");
    for k in 15..20 {
        let (_, body) = post(&node, "/api/v1/events", send(k)).await;
        assert_eq!(body["results"][0]["duplicate"], true, "k{k}: {body}");
        assert_eq!(body["results"][0]["seq"], k as u64 + 1);
    }
    let (_, body) = post(&node, "/api/v1/events", send(0)).await;
    assert_eq!(body["results"][0]["seq"], 21, "k0 was forgotten: {body}");
    assert_eq!(redis.cli(&["ZCARD", "t:{user:idem}:idems"]), "5");
}

/// Finding 11: at most `max_open_runs` runs are open in a stream, on both
/// brokers: a run beyond it closes the least recently active with
/// `agent_error {reason: "too_many_runs"}`, so a replaying hello reads a
/// bounded number of runs (5,000 open runs used to hold Redis 36–63 ms per
/// hello; the replay also reads them a few runs per script now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_runs_are_bounded_per_stream_on_both_brokers() {
    let redis = Redis::start();
    for on_redis in [false, true] {
        let mut cfg = if on_redis {
            node_config(&redis)
        } else {
            config()
        };
        cfg.stream_limits.max_open_runs = 3;
        let node = start_with(cfg).await;
        let (mut ws, _) = connect(&node, "many").await;
        for r in 0..20 {
            let (status, body) = post(
                &node,
                "/api/v1/events",
                // Zero-padded: runs started in the same millisecond go by name on Redis.
                json!({"user_id": "many", "event": "agent_started", "run_id": format!("r{r:02}")}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        let mut closed = Vec::new();
        while closed.len() < 17 {
            let e = event_of(&mut ws).await;
            if e["event"] == "agent_error" {
                assert_eq!(e["data"]["reason"], "too_many_runs", "{e}");
                closed.push(e["run_id"].as_str().unwrap().to_owned());
            }
        }
        let want: Vec<String> = (0..17).map(|r| format!("r{r:02}")).collect();
        assert_eq!(closed, want, "on redis: {on_redis}");
        let mut replay = open(&node, &[], None).await;
        let hello = json!({"type": "hello", "token": token("many"), "replay_active_runs": true});
        send_json(&mut replay, hello).await;
        assert_eq!(next_json(&mut replay).await["type"], "welcome");
        let mut runs = Vec::new();
        loop {
            let v = next_json(&mut replay).await;
            if v["type"] == "caught_up" {
                break;
            }
            if v["type"] == "event" {
                runs.push(v["run_id"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(runs, vec!["r17", "r18", "r19"], "on redis: {on_redis}");
        // Counted as too many runs (the recorder is the process's, so the
        // count adds up over both brokers; no other test here closes runs
        // for that reason).
        let text = metrics_text(&node).await;
        let counter = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let want = if on_redis { 34 } else { 17 };
        assert_eq!(
            counter("herald_runs_too_many_total"),
            want,
            "on redis: {on_redis}"
        );
        node.shutdown().await;
    }
}

/// A command connection that went silent is replaced by one whose
/// handshake is slow (220 ms: more than half the command timeout of 300 ms,
/// within the timeout redis-rs gives each try and within the bound of twice
/// it a replacement gets): the node publishes again within a few attempts.
/// With the replacement bounded at half the timeout (the surviving mutant
/// of issue 41), it never would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handshake_within_its_bound_replaces_a_silent_connection() {
    let redis = Redis::start();
    let path = Partition::start(redis.port).await;
    let mut cfg = node_config(&redis);
    if let Some(r) = cfg.redis.as_mut() {
        r.nodes =
            herald::broker::redis::RedisNodes::Single(format!("redis://127.0.0.1:{}", path.port));
        r.timing.command_timeout = Duration::from_millis(300);
    }
    let node = start_with(cfg).await;
    assert_eq!(publish(&node, "slow", "note", json!({})).await["seq"], 1);
    path.slow_new(Duration::from_millis(220));
    path.cut();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let (status, _) = post(
            &node,
            "/api/v1/events",
            json!({"user_id": "slow", "event": "note"}),
        )
        .await;
        statuses.push(status);
        if status == 200 {
            break;
        }
    }
    assert!(
        statuses.len() >= 2,
        "the silent connection failed a publish first: {statuses:?}"
    );
    assert_eq!(
        statuses.last(),
        Some(&200),
        "publishes while the connection was replaced: {statuses:?}"
    );
}
