//! Every bad input of brief §4/§5 gets its documented answer, and the server
//! keeps serving other clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Send one raw text frame as the first frame and expect a close code.
async fn first_frame_closes(server: &herald::Server, text: &str, code: u16) -> String {
    let mut ws = open(server, &[], None).await;
    ws.send(Message::text(text)).await.unwrap();
    expect_close(&mut ws, code).await
}

async fn hello_with(server: &herald::Server, token: &str) -> (Option<u16>, String) {
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": token})).await;
    let (code, reason, _) = read_until_close(&mut ws).await;
    (code, reason)
}

/// A bystander that must keep working through all of it.
async fn bystander_still_served(server: &herald::Server, ws: &mut Ws, seq: u64) {
    let r = publish(server, "bystander", "agent_note", json!({"seq": seq})).await;
    assert_eq!(r["delivered"], 1);
    assert_eq!(next_json(ws).await["seq"], seq);
}

#[tokio::test]
async fn bad_frames_before_and_after_hello() {
    let server = start().await;
    let (mut by, _) = connect(&server, "bystander").await;

    // Before hello.
    first_frame_closes(&server, "{not json", 4000).await;
    first_frame_closes(&server, "[1,2,3]", 4000).await;
    first_frame_closes(&server, r#"{"no_type":1}"#, 4000).await;
    first_frame_closes(&server, r#"{"type":"ping"}"#, 4000).await;
    first_frame_closes(
        &server,
        r#"{"type":"hello","resume":{"epoch":"e","seq":-1}}"#,
        4000,
    )
    .await;
    first_frame_closes(
        &server,
        r#"{"type":"hello","resume":{"epoch":5,"seq":1}}"#,
        4000,
    )
    .await;
    bystander_still_served(&server, &mut by, 1).await;

    // After hello: unknown type and invalid fields answer, connection stays.
    let (mut ws, _) = connect(&server, "u1").await;
    send_json(&mut ws, json!({"type": "shouting"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unknown_type"))
    );
    send_json(
        &mut ws,
        json!({"type": "user_message", "id": "m1", "thread_id": "t1"}),
    )
    .await;
    let n = next_json(&mut ws).await;
    assert_eq!(
        (n["type"].as_str(), n["id"].as_str(), n["error"].as_str()),
        (Some("nack"), Some("m1"), Some("invalid_field"))
    );
    assert!(n["message"].as_str().unwrap().contains("`text`"), "{n}");
    send_json(
        &mut ws,
        json!({"type": "user_message", "id": "m2", "thread_id": "t1", "text": "x", "data": [1]}),
    )
    .await;
    assert!(
        next_json(&mut ws).await["message"]
            .as_str()
            .unwrap()
            .contains("`data`")
    );
    send_json(&mut ws, json!({"type": "user_message", "id": "m3", "thread_id": "t1", "text": "x".repeat(33 * 1024)})).await;
    assert!(
        next_json(&mut ws).await["message"]
            .as_str()
            .unwrap()
            .contains("`text`")
    );
    send_json(&mut ws, json!({"type": "ack", "seq": "seven"})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "invalid_field");
    assert!(e["message"].as_str().unwrap().contains("`seq`"), "{e}");
    send_json(&mut ws, json!({"type": "cancel", "run_id": "nope"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "unknown_run");
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");

    // A second hello is a protocol error.
    send_json(&mut ws, json!({"type": "hello", "token": token("u1")})).await;
    expect_close(&mut ws, 4000).await;

    // Malformed JSON after hello: 4000.
    let (mut ws, _) = connect(&server, "u2").await;
    ws.send(Message::text("{\"type\":")).await.unwrap();
    expect_close(&mut ws, 4000).await;

    bystander_still_served(&server, &mut by, 2).await;
}

#[tokio::test]
async fn binary_oversized_and_invalid_utf8() {
    let server = start().await;
    let (mut by, _) = connect(&server, "bystander").await;

    let (mut ws, _) = connect(&server, "u1").await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect_close(&mut ws, 1003).await;

    let (mut ws, _) = connect(&server, "u2").await;
    ws.send(Message::text("x".repeat(64 * 1024 + 1)))
        .await
        .unwrap();
    expect_close(&mut ws, 1009).await;

    // Invalid UTF-8 in a text frame needs a raw client (tungstenite will not send it).
    let reply = raw_frames(&server, &[client_frame(0x1, &[0xff, 0xfe, 0xfd])]).await;
    assert_eq!(close_code_of(&reply), Some(1007));
    // RFC 6455 violations: 1002.
    let reserved_opcode = client_frame(0x3, b"x");
    let mut rsv_bit = client_frame(0x1, b"{}");
    rsv_bit[0] |= 0x40;
    let mut unmasked = client_frame(0x1, b"{}");
    unmasked[1] &= 0x7f;
    unmasked.drain(2..6); // no mask key; payload left as sent
    let oversized_ping = client_frame(0x9, &[0u8; 126]);
    let bad_close_code = client_frame(0x8, &999u16.to_be_bytes());
    let mut fragmented_ping = client_frame(0x9, b"p");
    fragmented_ping[0] &= 0x7f; // FIN clear on a control frame
    for (frame, what) in [
        (reserved_opcode, "reserved opcode"),
        (rsv_bit, "RSV1 without an extension"),
        (unmasked, "unmasked client frame"),
        (oversized_ping, "control frame over 125 bytes"),
        (bad_close_code, "close code 999"),
        (fragmented_ping, "fragmented control frame"),
    ] {
        let reply = raw_frames(&server, &[frame]).await;
        assert_eq!(close_code_of(&reply), Some(1002), "{what}");
    }

    bystander_still_served(&server, &mut by, 1).await;
    wait_for_connections(&server, 1).await;
    let s = server.stats();
    assert_eq!((s.duplicate_cleanups, s.frames_after_close), (0, 0));
}

#[tokio::test]
async fn bad_tokens_close_with_4401_or_4403() {
    use base64::Engine;
    let server = start().await;
    let (mut by, _) = connect(&server, "bystander").await;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let exp = herald::auth::unix_now() + 3600;

    let wrong_secret =
        herald::auth::mint_hs256("another-secret", "mallory", Duration::from_secs(60)).unwrap();
    let none_alg = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"m","exp":{exp}}}"#))
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "m", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "m"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let long_sub =
        herald::auth::mint_hs256(SECRET, &"s".repeat(257), Duration::from_secs(60)).unwrap();
    // Valid only in an hour (issue 14, finding 9).
    let not_before = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "m", "exp": exp + 3600, "nbf": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for (token, why) in [
        (wrong_secret.as_str(), "bad signature"),
        (none_alg.as_str(), "algorithm not allowed"),
        (hs512.as_str(), "algorithm not allowed"),
        (no_exp.as_str(), "missing claim exp"),
        ("garbage", "malformed token"),
        (long_sub.as_str(), "invalid sub"),
        (not_before.as_str(), "token not yet valid"),
        (&"x".repeat(9000), "token too long"),
    ] {
        let (code, reason) = hello_with(&server, token).await;
        assert_eq!(code, Some(4401), "{why}: {reason}");
        assert!(reason.contains(why), "{reason} should contain {why}");
    }
    // No token anywhere.
    let mut ws = open(&server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello"})).await;
    assert_eq!(expect_close(&mut ws, 4401).await, "missing token");

    // Expired: 4403, so clients know to fetch a new token.
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "m", "exp": herald::auth::unix_now() - 10}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(hello_with(&server, &expired).await.0, Some(4403));

    bystander_still_served(&server, &mut by, 1).await;
}

#[tokio::test]
async fn hello_timeout_closes_with_4408() {
    let mut cfg = config();
    cfg.lifecycle.hello_timeout = Duration::from_millis(200);
    let server = start_with(cfg).await;
    let mut ws = open(&server, &[], None).await;
    expect_close(&mut ws, 4408).await;
    wait_for_no_connections(&server).await;
}

/// The expiries and the wait past them pass on tokio's paused clock, not in real time.
#[tokio::test]
async fn token_expiry_closes_with_4403_and_refresh_extends() {
    let server = start().await;
    let short = |user: &str, secs: u64| {
        herald::auth::mint_hs256(SECRET, user, Duration::from_secs(secs)).unwrap()
    };

    // Expires while connected: 4403.
    let mut ws = open(&server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": short("ivy", 1)})).await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    skip(Duration::from_millis(1100)).await;
    assert_eq!(expect_close(&mut ws, 4403).await, "token expired");

    // A valid refresh for the same sub keeps it open past the first exp.
    let mut ws = open(&server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": short("jay", 1)})).await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    // A refresh for another user is refused and changes nothing.
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": short("kim", 60)}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "invalid_token");
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": short("jay", 60)}),
    )
    .await;
    // A ping answered means the refresh before it was handled.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    skip(Duration::from_millis(2200)).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

/// Issue 14, finding 9: with a leeway, a token that expired less than the
/// leeway ago is welcomed *and stays open* until `exp + leeway` (the expiry
/// timer used to fire at `exp`, closing it 4403 right after the welcome);
/// a fractional `exp` is accepted. On tokio's paused clock.
#[tokio::test]
async fn the_expiry_timer_honours_the_leeway() {
    let mut cfg = config();
    cfg.jwt_leeway = Duration::from_secs(120);
    // The skips below are longer than the default heartbeat timeout.
    cfg.lifecycle.heartbeat_timeout = Duration::from_secs(600);
    cfg.lifecycle.heartbeat_interval = Duration::from_secs(300);
    let server = start_with(cfg).await;
    let now = herald::auth::unix_now();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "lee", "exp": (now - 30) as f64 + 0.5}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = open(&server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": token})).await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    skip(Duration::from_secs(60)).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(
        next_json(&mut ws).await["type"],
        "pong",
        "open inside the leeway"
    );
    skip(Duration::from_secs(40)).await;
    assert_eq!(expect_close(&mut ws, 4403).await, "token expired");
}

/// Issue 37, finding 5: an `exp` past i64::MAX seconds (still a u64) is
/// "does not expire while connected": the welcome, then the connection
/// works, and it closes and is cleaned up like any other (its expiry timer
/// overflowed the clock and panicked the task, leaving it live for good);
/// the user's next hello is welcomed and the drain completes.
#[tokio::test]
async fn a_token_with_an_absurd_exp_works_and_is_cleaned_up() {
    let server = start().await;
    for exp in [json!(i64::MAX as u64 + 5), json!(u64::MAX), json!(1.8e19)] {
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": "forever", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let mut ws = open(&server, &[], None).await;
        send_json(&mut ws, json!({"type": "hello", "token": token})).await;
        assert_eq!(next_json(&mut ws).await["type"], "welcome", "exp {exp}");
        send_json(&mut ws, json!({"type": "ping"})).await;
        assert_eq!(next_json(&mut ws).await["type"], "pong", "exp {exp}");
        assert_eq!(server.connections().len(), 1);
        drop(ws);
        wait_for_no_connections(&server).await;
        let stats = server.stats();
        assert_eq!(stats.duplicate_cleanups, 0);
    }
    let (mut ws, _) = connect(&server, "forever").await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    tokio::time::timeout(Duration::from_secs(30), server.shutdown())
        .await
        .expect("the drain completes");
}

#[tokio::test]
async fn api_bad_input() {
    let server = start().await;
    let (mut by, _) = connect(&server, "bystander").await;
    let url = http_url(&server, "/api/v1/events");
    let c = client();

    // Missing / wrong key: 401 with JSON.
    let r = c
        .post(&url)
        .json(&json!({"user_id":"u","event":"e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = c
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({"user_id":"u","event":"e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Field errors name the field.
    for (body, field) in [
        (json!({"event": "e"}), "user_id"),
        (json!({"user_id": 5, "event": "e"}), "user_id"),
        (json!({"user_id": "", "event": "e"}), "user_id"),
        (json!({"user_id": "u".repeat(257), "event": "e"}), "user_id"),
        (json!({"user_id": "u", "event": "bad name!"}), "event"),
        (json!({"user_id": "u", "event": "e".repeat(65)}), "event"),
        (json!({"user_id": "u", "event": "agent_thinking"}), "run_id"),
        (json!({"user_id": "u", "event": "e", "data": [1]}), "data"),
        (
            json!({"user_id": "u", "event": "e", "thread_id": 7}),
            "thread_id",
        ),
        (
            json!({"events": [{"user_id": "u", "event": "e"}, {"user_id": "u"}]}),
            "events[1].event",
        ),
        (json!({"events": {"user_id": "u"}}), "events"),
    ] {
        let (status, err) = post(&server, "/api/v1/events", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert_eq!(err["field"], field, "{body} -> {err}");
        assert!(err["message"].as_str().unwrap().contains(field), "{err}");
    }
    // A bad batch (or a bad single event) publishes nothing: the first valid
    // event to `u` is its stream's first (issue 17, finding 1).
    let first = publish(&server, "u", "e", json!({})).await;
    assert_eq!(first["seq"], 1, "{first}");

    // Not JSON / not an object.
    let r = c
        .post(&url)
        .bearer_auth(API_KEY)
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_json");
    let (status, _) = post(&server, "/api/v1/events", json!([1])).await;
    assert_eq!(status, 400);

    // Sizes: body over 1 MiB, batch over 1000, data over 64 KiB → 413.
    let r = c
        .post(&url)
        .bearer_auth(API_KEY)
        .body(vec![b' '; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "body_too_large");
    let batch: Vec<Value> = (0..1001)
        .map(|_| json!({"user_id": "u", "event": "e"}))
        .collect();
    let (status, err) = post(&server, "/api/v1/events", json!({ "events": batch })).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (413, Some("batch_too_large"))
    );
    let (status, err) = post(
        &server,
        "/api/v1/events",
        json!({"user_id":"u","event":"e","data":{"x":"y".repeat(65 * 1024)}}),
    )
    .await;
    assert_eq!((status, err["field"].as_str()), (413, Some("data")));

    // Wrong method, unknown route, oversized headers.
    let r = c.get(&url).bearer_auth(API_KEY).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let r = c.get(http_url(&server, "/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(http_url(&server, "/healthz"))
        .header("x-big", "a".repeat(17 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // The disconnect endpoint validates too.
    let (status, err) = post(&server, "/api/v1/disconnect", json!({"user": "x"})).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("user_id")));

    bystander_still_served(&server, &mut by, 1).await;
}

#[tokio::test]
async fn health_and_readiness() {
    let server = start().await;
    let r = client()
        .get(http_url(&server, "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(http_url(&server, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // With a configured secret there is no demo page and no dev token endpoint.
    let r = client().get(http_url(&server, "/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .post(http_url(&server, "/dev/token"))
        .json(&json!({"user": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A plain GET on /ws (no upgrade headers) is a JSON error, not a panic.
    let r = client().get(http_url(&server, "/ws")).send().await.unwrap();
    assert!(r.status().is_client_error());
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_websocket");
}

/// Issue 37 (also noted): with `metrics_token` set, `/metrics` (a scrape
/// costs O(connections)) answers only that bearer token: 401 JSON without
/// it or with another; 200 with it. Unset, it answers anyone (as before).
#[tokio::test]
async fn metrics_needs_its_token_when_one_is_set() {
    let open = start().await;
    let r = client()
        .get(http_url(&open, "/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut cfg = config();
    cfg.metrics_token = Some("scrape-token-0123456789".into());
    let server = start_with(cfg).await;
    let url = http_url(&server, "/metrics");
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = client()
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the API key is not the metrics token");
    let r = client()
        .get(&url)
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("herald_"));
}
