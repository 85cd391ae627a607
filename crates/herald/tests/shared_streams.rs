//! Shared streams (issue 39, items 2–4): one socket reads its user's own
//! stream and subscribed shared streams (`thread:…`), each with its own
//! epoch, seq and resume position; who may read or write one comes from
//! the token's `streams` claim; the HTTP API publishes to one. Three users
//! on three nodes sharing a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::redis_server::{Redis, node_config};
use common::*;
use herald::Server;
use serde_json::{Value, json};

/// A token for `user` granting `grants` (stream or prefix → "r" / "rw").
fn token_with(user: &str, grants: &[(&str, &str)]) -> String {
    let streams: BTreeMap<String, String> = grants
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    herald::auth::mint_hs256_with_streams(SECRET, user, Duration::from_secs(3600), &streams)
        .unwrap()
}

async fn hello(server: &Server, token: &str, resume: Option<Value>) -> (Ws, Value) {
    let mut ws = open(server, &[], None).await;
    let mut frame = json!({"type": "hello", "token": token});
    if let Some(r) = resume {
        frame["resume"] = r;
    }
    send_json(&mut ws, frame).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// Subscribe and return the answer (`subscribed` or an `error`), with any
/// frames before it.
async fn subscribe(ws: &mut Ws, stream: &str, resume: Option<Value>) -> Value {
    let mut frame = json!({"type": "subscribe", "stream": stream});
    if let Some(r) = resume {
        frame["resume"] = r;
    }
    send_json(ws, frame).await;
    let seen = until(ws, |v| {
        (v["type"] == "subscribed" || v["type"] == "error") && v["stream"] == stream
    })
    .await;
    seen.last().unwrap().clone()
}

fn is_event_of(v: &Value, stream: &str, name: &str) -> bool {
    v["type"] == "event" && v["stream"] == stream && v["event"] == name
}

async fn publish_to(server: &Server, body: Value) -> (u16, Value) {
    post(server, "/api/v1/events", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_on_three_nodes_share_a_thread() {
    let redis = Redis::start();
    let nodes = [
        start_with(node_config(&redis)).await,
        start_with(node_config(&redis)).await,
        start_with(node_config(&redis)).await,
    ];
    let t = "thread:t1";
    let (mut ana, _) = hello(&nodes[0], &token_with("ana", &[(t, "rw")]), None).await;
    let (mut bob, _) = hello(&nodes[1], &token_with("bob", &[("thread:*", "rw")]), None).await;
    let (mut cy, _) = hello(&nodes[2], &token_with("cy", &[(t, "r")]), None).await;
    let mut epoch = None;
    for (ws, write) in [(&mut ana, true), (&mut bob, true), (&mut cy, false)] {
        let s = subscribe(ws, t, None).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["write"], write);
        assert_eq!(s["seq"], 0);
        epoch.get_or_insert_with(|| s["epoch"].clone());
        assert_eq!(
            Some(&s["epoch"]),
            epoch.as_ref(),
            "one stream, one epoch on every node"
        );
    }

    // Ana asks in the thread: everyone sees her question, then the demo
    // agent's run, in the thread, once each, in order.
    send_json(
        &mut ana,
        json!({"type": "user_message", "id": "q1", "thread_id": "t1", "text": "hello all", "stream": t}),
    )
    .await;
    let mut seen: HashMap<&str, Vec<Value>> = HashMap::new();
    for (name, ws) in [("ana", &mut ana), ("bob", &mut bob), ("cy", &mut cy)] {
        let frames = until(ws, |v| is_event_of(v, t, "agent_completed")).await;
        let events: Vec<Value> = frames
            .into_iter()
            .filter(|v| v["type"] == "event")
            .collect();
        assert!(
            events.iter().all(|e| e["stream"] == t),
            "{name}: {events:?}"
        );
        assert_eq!(events[0]["event"], "user_message", "{name}");
        assert_eq!(events[0]["data"]["user_id"], "ana");
        assert_eq!(events[0]["data"]["text"], "hello all");
        assert_eq!(events[1]["event"], "agent_started");
        assert_eq!(events[1]["data"]["message_id"], "q1");
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{name}: every seq once, in order"
        );
        seen.insert(name, events);
    }
    assert_eq!(seen["ana"], seen["bob"]);
    assert_eq!(seen["bob"], seen["cy"]);

    // Cy reads only: her write is refused and not stored.
    send_json(
        &mut cy,
        json!({"type": "user_message", "id": "q2", "thread_id": "t1", "text": "me too", "stream": t}),
    )
    .await;
    let nack = until(&mut cy, |v| v["type"] == "nack").await.pop().unwrap();
    assert_eq!(
        (nack["id"].as_str(), nack["error"].as_str()),
        (Some("q2"), Some("forbidden"))
    );

    // The backend publishes to the thread through the API: every member gets it.
    let (status, body) = publish_to(
        &nodes[1],
        json!({"stream": t, "event": "note", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seq = body["results"][0]["seq"].as_u64().unwrap();
    assert_eq!(
        seq,
        seen["ana"].len() as u64 + 1,
        "cy's refused write stored nothing"
    );
    for ws in [&mut ana, &mut bob, &mut cy] {
        let note = until(ws, |v| is_event_of(v, t, "note"))
            .await
            .pop()
            .unwrap();
        assert_eq!(note["seq"].as_u64(), Some(seq));
    }

    // Bob leaves the thread: he gets `unsubscribed`, then nothing of it.
    send_json(&mut bob, json!({"type": "unsubscribe", "stream": t})).await;
    let left = until(&mut bob, |v| v["type"] == "unsubscribed")
        .await
        .pop()
        .unwrap();
    assert_eq!(
        left,
        json!({"type": "unsubscribed", "stream": t, "reason": "client"})
    );
    publish_to(&nodes[0], json!({"stream": t, "event": "after_bob"})).await;
    publish(&nodes[0], "bob", "marker", json!({})).await;
    let rest = until(&mut bob, |v| v["event"] == "marker").await;
    assert!(rest.iter().all(|v| v["event"] != "after_bob"), "{rest:?}");
    until(&mut ana, |v| is_event_of(v, t, "after_bob")).await;
}

/// A user the token does not grant a stream learns nothing of it: the
/// answer for an existing thread is the answer for one that never existed,
/// and the API refuses bad stream names.
#[tokio::test]
async fn a_user_without_permission_learns_nothing_of_a_thread() {
    let server = start().await;
    let (mut ana, _) = hello(
        &server,
        &token_with("ana", &[("thread:secret", "rw")]),
        None,
    )
    .await;
    assert_eq!(
        subscribe(&mut ana, "thread:secret", None).await["type"],
        "subscribed"
    );
    publish_to(&server, json!({"stream": "thread:secret", "event": "note"})).await;

    let (mut eve, _) = hello(&server, &token_with("eve", &[("thread:other", "r")]), None).await;
    let real = subscribe(&mut eve, "thread:secret", None).await;
    let never = subscribe(&mut eve, "thread:never", None).await;
    assert_eq!(real["code"], "forbidden", "{real}");
    let strip = |mut v: Value| {
        v["stream"] = Value::Null;
        v
    };
    assert_eq!(
        strip(real),
        strip(never),
        "existing and missing streams are answered alike"
    );
    // Writing without a subscription is refused the same way.
    send_json(
        &mut eve,
        json!({"type": "user_message", "id": "x1", "thread_id": "t", "text": "hi", "stream": "thread:secret"}),
    )
    .await;
    let nack = until(&mut eve, |v| v["type"] == "nack")
        .await
        .pop()
        .unwrap();
    assert_eq!(nack["error"], "forbidden");
    // Nothing of the thread reached her; a plain token has no shared streams.
    publish(&server, "eve", "marker", json!({})).await;
    let all = until(&mut eve, |v| v["event"] == "marker").await;
    assert!(
        all.iter()
            .all(|v| v["type"] != "event" || v["stream"].is_null()),
        "{all:?}"
    );
    let (mut plain, _) = connect(&server, "zed").await;
    assert_eq!(
        subscribe(&mut plain, "thread:secret", None).await["code"],
        "forbidden"
    );

    // Bad names: refused at the frame (the connection stays) and at the API.
    send_json(
        &mut plain,
        json!({"type": "subscribe", "stream": "user:ana"}),
    )
    .await;
    let err = until(&mut plain, |v| v["type"] == "error")
        .await
        .pop()
        .unwrap();
    assert_eq!(err["code"], "invalid_field", "{err}");
    for (body, field) in [
        (json!({"stream": "user:ana", "event": "x"}), "stream"),
        (json!({"stream": "nocolon", "event": "x"}), "stream"),
        (
            json!({"stream": "thread:a", "user_id": "ana", "event": "x"}),
            "stream",
        ),
        (json!({"event": "x"}), "user_id"),
    ] {
        let (status, reply) = publish_to(&server, body.clone()).await;
        assert_eq!(status, 400, "{body} → {reply}");
        assert_eq!(reply["field"], field, "{reply}");
    }
}

/// Several streams resumed at once after a reconnect on another node: the
/// own stream and each shared one get exactly their missed events; a
/// stream whose history is gone gets `reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_streams_resume_at_once_on_another_node() {
    let redis = Redis::start();
    let one = start_with(node_config(&redis)).await;
    let two = start_with(node_config(&redis)).await;
    let token = token_with("ana", &[("thread:*", "rw")]);
    let streams = ["thread:a", "thread:b", "thread:c"];
    let (mut ws, welcome) = hello(&one, &token, None).await;
    let mut at = HashMap::new();
    for s in streams {
        let sub = subscribe(&mut ws, s, None).await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        at.insert(s, (sub["epoch"].clone(), 0u64));
    }
    // Some events each, read live.
    for (i, s) in streams.iter().enumerate() {
        for n in 0..=i {
            publish_to(
                &one,
                json!({"stream": s, "event": "before", "data": {"n": n}}),
            )
            .await;
        }
    }
    publish(&one, "ana", "own_before", json!({})).await;
    let mut left = 1 + 2 + 3 + 1;
    let mut own_seq = 0;
    while left > 0 {
        let v = next_json(&mut ws).await;
        if v["type"] != "event" {
            continue;
        }
        left -= 1;
        match v["stream"].as_str() {
            Some(s) => at.get_mut(s).unwrap().1 = v["seq"].as_u64().unwrap(),
            None => own_seq = v["seq"].as_u64().unwrap(),
        }
    }
    drop(ws);
    // While away: 2 events to a, none to b, 3 to c, 1 to the own stream;
    // c's history is lost (its keys deleted: a new epoch on next use).
    for _ in 0..2 {
        publish_to(&two, json!({"stream": "thread:a", "event": "missed"})).await;
    }
    for _ in 0..3 {
        publish_to(&two, json!({"stream": "thread:c", "event": "missed"})).await;
    }
    publish(&two, "ana", "own_missed", json!({})).await;
    let keys = redis.cli(&["KEYS", "t:{thread:c}:*"]);
    for k in keys.split_whitespace() {
        redis.cli(&["DEL", k]);
    }

    let (mut ws, again) = hello(
        &two,
        &token,
        Some(json!({"epoch": welcome["epoch"], "seq": own_seq})),
    )
    .await;
    assert_eq!(again["resumed"], true, "{again}");
    let own = until(&mut ws, |v| v["type"] == "event" && v["stream"].is_null()).await;
    assert_eq!(own.last().unwrap()["event"], "own_missed");
    for s in streams {
        let (epoch, seq) = at[s].clone();
        send_json(
            &mut ws,
            json!({"type": "subscribe", "stream": s, "resume": {"epoch": epoch, "seq": seq}}),
        )
        .await;
    }
    // Each stream: `subscribed`, then exactly its missed events.
    let mut got: HashMap<String, (Value, Vec<String>)> = HashMap::new();
    let mut frames = Vec::new();
    while got.len() < 3 || got.values().any(|(s, _)| s["replaying"] == true) {
        let v = next_json(&mut ws).await;
        frames.push(v.clone());
        let Some(stream) = v["stream"].as_str().map(str::to_owned) else {
            continue;
        };
        match v["type"].as_str() {
            Some("subscribed") => {
                got.insert(stream, (v, Vec::new()));
            }
            Some("event") => got
                .get_mut(&stream)
                .unwrap()
                .1
                .push(v["event"].as_str().unwrap().to_owned()),
            Some("caught_up") => got.get_mut(&stream).unwrap().0["replaying"] = json!(false),
            _ => {}
        }
    }
    let (a, a_events) = &got["thread:a"];
    assert_eq!(
        (a["resumed"].as_bool(), a["seq"].as_u64()),
        (Some(true), Some(3)),
        "{a}"
    );
    assert_eq!(a_events, &["missed", "missed"], "{frames:?}");
    let (b, b_events) = &got["thread:b"];
    assert_eq!(
        (b["resumed"].as_bool(), b_events.len()),
        (Some(true), 0),
        "{b}"
    );
    let (c, c_events) = &got["thread:c"];
    assert_eq!(c["reset"], true, "c's history is gone: {c}");
    assert_ne!(c["epoch"], at["thread:c"].0, "a new epoch");
    assert!(c_events.is_empty(), "{c_events:?}");
}

/// A writer cancels a run of the thread (any member with write may; a
/// reader is refused), the text ingest streams into the thread, and a
/// member removed through the API stops receiving on every node at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ingest_and_removal_in_a_thread_across_nodes() {
    let redis = Redis::start();
    let nodes = [
        start_with(node_config(&redis)).await,
        start_with(node_config(&redis)).await,
        start_with(node_config(&redis)).await,
    ];
    let t = "thread:ops";
    let (mut ana, _) = hello(&nodes[0], &token_with("ana", &[(t, "rw")]), None).await;
    let (mut bob, _) = hello(&nodes[1], &token_with("bob", &[(t, "rw")]), None).await;
    let (mut cy, _) = hello(&nodes[2], &token_with("cy", &[(t, "r")]), None).await;
    // Bob reads the thread on two nodes.
    let (mut bob2, _) = hello(&nodes[2], &token_with("bob", &[(t, "rw")]), None).await;
    for ws in [&mut ana, &mut bob, &mut cy, &mut bob2] {
        assert_eq!(subscribe(ws, t, None).await["type"], "subscribed");
    }

    // Ana asks; the demo agent runs on node 0; Bob (node 1) cancels it.
    send_json(
        &mut ana,
        json!({"type": "user_message", "id": "c1", "thread_id": "t", "text": "a long task", "stream": t}),
    )
    .await;
    let started = until(&mut bob, |v| is_event_of(v, t, "agent_started"))
        .await
        .pop()
        .unwrap();
    let run = started["run_id"].as_str().unwrap().to_owned();
    // A reader may not cancel: refused, nothing forwarded.
    send_json(
        &mut cy,
        json!({"type": "cancel", "run_id": run, "stream": t}),
    )
    .await;
    let refused = until(&mut cy, |v| v["type"] == "error")
        .await
        .pop()
        .unwrap();
    assert_eq!(
        (refused["code"].as_str(), refused["stream"].as_str()),
        (Some("forbidden"), Some(t))
    );
    send_json(
        &mut bob,
        json!({"type": "cancel", "run_id": run, "stream": t}),
    )
    .await;
    for ws in [&mut ana, &mut cy] {
        let end = until(ws, |v| {
            v["type"] == "event"
                && v["run_id"] == run.as_str()
                && v["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("agent_c"))
        })
        .await
        .pop()
        .unwrap();
        assert_eq!(end["event"], "agent_cancelled", "{end}");
        assert_eq!(end["stream"], t);
    }

    // The text ingest streams an answer into the thread.
    let url = http_url(
        &nodes[1],
        &format!("/api/v1/runs/r-text/text?stream={t}&thread_id=t"),
    );
    let resp = client()
        .post(url)
        .bearer_auth(API_KEY)
        .body("{\"part\":\"answer\",\"text\":\"Hello \"}\n{\"part\":\"answer\",\"text\":\"all\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    for ws in [&mut ana, &mut cy] {
        let mut text = String::new();
        while text != "Hello all" {
            let d = until(ws, |v| is_event_of(v, t, "agent_text_delta"))
                .await
                .pop()
                .unwrap();
            assert_eq!(d["run_id"], "r-text");
            text.push_str(d["data"]["text"].as_str().unwrap());
        }
    }
    let bad = client()
        .post(http_url(&nodes[1], "/api/v1/runs/r/text?stream=user:ana"))
        .bearer_auth(API_KEY)
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Bob is removed through node 0: both his subscriptions (nodes 1 and 2) end.
    let (status, body) = post(
        &nodes[0],
        "/api/v1/streams/unsubscribe",
        json!({"stream": t, "user_id": "bob"}),
    )
    .await;
    assert_eq!((status, body["removed"].as_u64()), (200, Some(2)), "{body}");
    for ws in [&mut bob, &mut bob2] {
        let gone = until(ws, |v| v["type"] == "unsubscribed")
            .await
            .pop()
            .unwrap();
        assert_eq!(
            gone,
            json!({"type": "unsubscribed", "stream": t, "reason": "removed"})
        );
    }
    publish_to(&nodes[0], json!({"stream": t, "event": "after_removal"})).await;
    for ws in [&mut bob, &mut bob2] {
        publish(&nodes[0], "bob", "marker", json!({})).await;
        let rest = until(ws, |v| v["event"] == "marker").await;
        assert!(
            rest.iter().all(|v| v["event"] != "after_removal"),
            "{rest:?}"
        );
    }
    until(&mut ana, |v| is_event_of(v, t, "after_removal")).await;
    let (status, body) = post(
        &nodes[0],
        "/api/v1/streams/unsubscribe",
        json!({"stream": "user:bob", "user_id": "bob"}),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("stream")),
        "{body}"
    );
}

/// A frame of `type` about stream `t` (skipping others).
async fn frame_of(ws: &mut Ws, kind: &str, t: &str) -> Value {
    until(ws, |v| v["type"] == kind && v["stream"] == t)
        .await
        .pop()
        .unwrap()
}

/// Presence and typing across three nodes on Redis (issue 39, items 5
/// and 6): members see each other join and leave; a user with two
/// connections joins once and leaves with the last; `presence` lists users
/// with connection counts (the API too, capped by `limit`); `typing` is
/// relayed to the other members only, at most once a second per
/// connection, and a reader may not send it; a SIGKILLed node's members
/// leave within `presence_ttl` (1 s here) plus a third of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_across_nodes_and_a_killed_node() {
    let redis = Redis::start();
    let mut cfg = node_config(&redis);
    cfg.presence_ttl = Duration::from_secs(1);
    let one = start_with(cfg.clone()).await;
    let two = start_with(cfg).await;
    let t = "room:lobby";
    let (mut ana, _) = hello(&one, &token_with("ana", &[("room:*", "rw")]), None).await;
    assert_eq!(subscribe(&mut ana, t, None).await["type"], "subscribed");
    let joined = frame_of(&mut ana, "presence_join", t).await;
    assert_eq!(joined["user_id"], "ana", "a member sees its own join too");

    let (mut bob, _) = hello(&two, &token_with("bob", &[(t, "rw")]), None).await;
    assert_eq!(subscribe(&mut bob, t, None).await["type"], "subscribed");
    assert_eq!(
        frame_of(&mut ana, "presence_join", t).await["user_id"],
        "bob"
    );
    // Bob's second tab: no second join.
    let (mut bob2, _) = hello(&one, &token_with("bob", &[(t, "r")]), None).await;
    assert_eq!(subscribe(&mut bob2, t, None).await["type"], "subscribed");

    // Counted by the node's presence task, right after `subscribed`: asked
    // until it shows (within 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let p = loop {
        send_json(&mut ana, json!({"type": "presence", "stream": t})).await;
        let p = frame_of(&mut ana, "presence", t).await;
        if p["total_connections"] == 3 || std::time::Instant::now() > deadline {
            break p;
        }
    };
    assert_eq!(
        (p["total_users"].as_u64(), p["total_connections"].as_u64()),
        (Some(2), Some(3)),
        "{p}"
    );
    assert_eq!(
        p["users"],
        json!([{"user_id": "ana", "connections": 1}, {"user_id": "bob", "connections": 2}])
    );
    let (status, api) = get_json(
        &two,
        &format!("/api/v1/streams/presence?stream={t}&limit=1"),
    )
    .await;
    assert_eq!(status, 200, "{api}");
    assert_eq!(
        (
            api["total_users"].as_u64(),
            api["users"].as_array().map(Vec::len)
        ),
        (Some(2), Some(1))
    );

    // Typing: relayed to the other user's connections, not to the sender's.
    send_json(&mut ana, json!({"type": "typing", "stream": t})).await;
    for ws in [&mut bob, &mut bob2] {
        let typing = frame_of(ws, "typing", t).await;
        assert_eq!(
            typing,
            json!({"type": "typing", "stream": t, "user_id": "ana"})
        );
    }
    // At most once a second: a burst relays nothing more.
    for _ in 0..5 {
        send_json(&mut ana, json!({"type": "typing", "stream": t})).await;
    }
    // A reader may not type.
    send_json(&mut bob2, json!({"type": "typing", "stream": t})).await;
    assert_eq!(frame_of(&mut bob2, "error", t).await["code"], "forbidden");
    // Ana's frames are handled in order: once her `presence` is answered,
    // any relay of the burst was sent before the marker below.
    send_json(&mut ana, json!({"type": "presence", "stream": t})).await;
    frame_of(&mut ana, "presence", t).await;
    publish_to(&one, json!({"stream": t, "event": "marker"})).await;
    let before_marker = until(&mut bob, |v| is_event_of(v, t, "marker")).await;
    assert!(
        before_marker.iter().all(|v| v["type"] != "typing"),
        "{before_marker:?}"
    );

    // Bob's first tab leaves: no leave yet; his last one leaves: leave.
    send_json(&mut bob, json!({"type": "unsubscribe", "stream": t})).await;
    drop(bob2);
    let left = frame_of(&mut ana, "presence_leave", t).await;
    assert_eq!(left["user_id"], "bob");

    // A node killed with SIGKILL: its member leaves within the TTL bound.
    let env = [
        ("HERALD_JWT_HS256_SECRET", SECRET),
        ("HERALD_API_KEY", API_KEY),
        ("HERALD_REDIS_URL", &redis.url()),
        ("HERALD_REDIS_PREFIX", "t"),
        ("HERALD_PRESENCE_TTL", "1s"),
        ("HERALD_ADDR", "127.0.0.1:0"),
    ];
    let (mut child, addr, _) = serve(&env);
    let cy_token = token_with("cy", &[(t, "r")]);
    let (mut cy, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    send_json(&mut cy, json!({"type": "hello", "token": cy_token})).await;
    assert_eq!(next_json(&mut cy).await["type"], "welcome");
    assert_eq!(subscribe(&mut cy, t, None).await["type"], "subscribed");
    assert_eq!(
        frame_of(&mut ana, "presence_join", t).await["user_id"],
        "cy"
    );
    child.kill().unwrap();
    let killed = std::time::Instant::now();
    child.wait().unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(10),
        frame_of(&mut ana, "presence_leave", t),
    )
    .await
    .expect("cy's leave within 10 s");
    assert_eq!(gone["user_id"], "cy");
    let took = killed.elapsed();
    send_json(&mut ana, json!({"type": "presence", "stream": t})).await;
    let p = frame_of(&mut ana, "presence", t).await;
    assert_eq!(
        p["users"],
        json!([{"user_id": "ana", "connections": 1}]),
        "{p}"
    );
    // Printed, not asserted (no timed assertions): the bound is ttl + ttl/3.
    println!("a SIGKILLed node's member left after {took:?} (presence_ttl 1 s)");
}

/// The backend's subscribe request (`subscribe_proxy`, issue 39 item 3): a
/// subscribe the token does not grant is asked of the backend, signed; its
/// answer (read, write, or no; a reply that is not `{"allow": …}` is a no)
/// is kept for `subscribe_cache_ttl`, and an unsubscribe through the API
/// forgets it, so the backend is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_the_token_does_not_grant_is_asked_of_the_backend() {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use herald::agent::webhook::{
        DELIVERY_HEADER, SIGNATURE_HEADER, SignedHeaders, TIMESTAMP_HEADER, WebhookConfig,
    };
    const HOOK: &str = "hook-secret-0123456789";
    let asked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<Value>::new()));
    let seen = asked.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let (ts, delivery, sig) =
                    (h(TIMESTAMP_HEADER), h(DELIVERY_HEADER), h(SIGNATURE_HEADER));
                let signed = SignedHeaders {
                    timestamp: ts.as_deref(),
                    delivery: delivery.as_deref(),
                    signature: sig.as_deref(),
                };
                let now = herald::auth::unix_now();
                assert!(
                    herald::agent::webhook::verify(
                        HOOK,
                        signed,
                        &body,
                        now,
                        Duration::from_secs(300)
                    )
                    .is_ok()
                );
                let req: Value = serde_json::from_slice(&body).unwrap();
                seen.lock().push(req.clone());
                match req["stream"].as_str() {
                    Some("room:open") => r#"{"allow": true, "write": true}"#,
                    Some("room:read") => r#"{"allow": true}"#,
                    Some("room:garbled") => "yes please",
                    _ => r#"{"allow": false}"#,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut cfg = config();
    cfg.webhook = Some(WebhookConfig {
        url: format!("http://127.0.0.1:{port}/hook"),
        secret: HOOK.to_owned(),
        timeout: Duration::from_secs(2),
        retries: 1,
        backoff: Duration::from_millis(50),
    });
    cfg.subscribe_proxy = true;
    let server = start_with(cfg).await;
    let (mut ws, _) = connect(&server, "ana").await;
    let open = subscribe(&mut ws, "room:open", None).await;
    assert_eq!(
        (open["type"].as_str(), open["write"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{open}"
    );
    let read = subscribe(&mut ws, "room:read", None).await;
    assert_eq!(
        (read["type"].as_str(), read["write"].as_bool()),
        (Some("subscribed"), Some(false))
    );
    for no in ["room:closed", "room:garbled"] {
        assert_eq!(
            subscribe(&mut ws, no, None).await["code"],
            "forbidden",
            "{no}"
        );
    }
    {
        let asked = asked.lock();
        assert_eq!(asked.len(), 4);
        assert_eq!(asked[0]["type"], "subscribe_request");
        assert_eq!(
            (asked[0]["user_id"].as_str(), asked[0]["stream"].as_str()),
            (Some("ana"), Some("room:open"))
        );
    }
    // A second connection within the cache's lifetime: not asked again.
    let (mut tab, _) = connect(&server, "ana").await;
    assert_eq!(
        subscribe(&mut tab, "room:open", None).await["type"],
        "subscribed"
    );
    assert_eq!(
        subscribe(&mut tab, "room:closed", None).await["code"],
        "forbidden"
    );
    assert_eq!(asked.lock().len(), 4, "answered from the cache");
    // Removed through the API: the answer is forgotten, the backend asked again.
    let (status, body) = post(
        &server,
        "/api/v1/streams/unsubscribe",
        json!({"stream": "room:open", "user_id": "ana"}),
    )
    .await;
    assert_eq!((status, body["removed"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(
        subscribe(&mut tab, "room:open", None).await["type"],
        "subscribed"
    );
    assert_eq!(asked.lock().len(), 5);
}

/// A `refresh` with a token that no longer grants a stream ends that
/// subscription (`unsubscribed {reason: forbidden}`; nothing of the stream
/// after it); one that grants read only takes the write permission away.
#[tokio::test]
async fn a_refresh_that_narrows_the_grants_ends_or_narrows_subscriptions() {
    let server = start().await;
    let full = token_with("ana", &[("thread:a", "rw"), ("thread:b", "rw")]);
    let (mut ws, _) = hello(&server, &full, None).await;
    for s in ["thread:a", "thread:b"] {
        assert_eq!(subscribe(&mut ws, s, None).await["write"], true);
    }
    let narrower = token_with("ana", &[("thread:b", "r")]);
    send_json(&mut ws, json!({"type": "refresh", "token": narrower})).await;
    let gone = until(&mut ws, |v| v["type"] == "unsubscribed")
        .await
        .pop()
        .unwrap();
    assert_eq!(
        gone,
        json!({"type": "unsubscribed", "stream": "thread:a", "reason": "forbidden"})
    );
    publish_to(&server, json!({"stream": "thread:a", "event": "hidden"})).await;
    publish_to(&server, json!({"stream": "thread:b", "event": "shown"})).await;
    let rest = until(&mut ws, |v| is_event_of(v, "thread:b", "shown")).await;
    assert!(rest.iter().all(|v| v["event"] != "hidden"), "{rest:?}");
    send_json(
        &mut ws,
        json!({"type": "user_message", "id": "w1", "thread_id": "t", "text": "hi", "stream": "thread:b"}),
    )
    .await;
    let nack = until(&mut ws, |v| v["type"] == "nack").await.pop().unwrap();
    assert_eq!(nack["error"], "forbidden", "read only now");
}
