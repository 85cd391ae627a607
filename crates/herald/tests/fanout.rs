//! Fan-out and the connection API over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn two_connections_of_one_user_both_receive_and_others_do_not() {
    let server = start().await;
    let (mut a1, w1) = connect(&server, "alice").await;
    let (mut a2, w2) = connect(&server, "alice").await;
    let (mut b, _) = connect(&server, "bob").await;
    assert_eq!(w1["user_id"], "alice");
    assert_eq!(w1["epoch"], w2["epoch"]);
    assert_ne!(w1["conn_id"], w2["conn_id"]);
    assert_eq!(w1["resumed"], false);

    let r = publish(&server, "alice", "agent_note", json!({"text": "hi"})).await;
    assert_eq!(r["delivered"], 2);
    assert_eq!(r["seq"], 1);
    assert_eq!(r["epoch"], w1["epoch"]);
    for ws in [&mut a1, &mut a2] {
        let e = next_json(ws).await;
        assert_eq!(e["type"], "event");
        assert_eq!(e["seq"], 1);
        assert_eq!(e["event"], "agent_note");
        assert_eq!(e["data"]["text"], "hi");
        assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    }
    // bob gets nothing: the next frame bob sees is the pong to his own ping.
    send_json(&mut b, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut b).await["type"], "pong");

    // A second event keeps the order and the seq increments.
    publish(&server, "alice", "agent_note", json!({"n": 2})).await;
    assert_eq!(next_json(&mut a1).await["seq"], 2);
}

#[tokio::test]
async fn connections_api_lists_and_kick_closes_with_4409() {
    let server = start().await;
    let (mut a, _) = connect(&server, "alice").await;
    send_json(&mut a, json!({"type": "ack", "seq": 7})).await;
    send_json(&mut a, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut a).await["type"], "pong");
    let (status, body) = get_json(&server, "/api/v1/connections?user_id=alice").await;
    assert_eq!(status, 200);
    let rows = body["connections"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["state"], "ready");
    assert_eq!(rows[0]["user_id"], "alice");
    assert_eq!(rows[0]["acked_seq"], 7);
    assert!(rows[0]["queue_depth"].is_u64() && rows[0]["age_ms"].is_u64());

    let (_, all) = get_json(&server, "/api/v1/connections?limit=1").await;
    assert_eq!(
        (all["total"].as_u64(), all["truncated"].as_bool()),
        (Some(1), Some(false))
    );
    let (status, err) = get_json(&server, "/api/v1/connections?limit=0").await;
    assert_eq!((status, err["field"].as_str()), (400, Some("limit")));

    let (status, body) = post(&server, "/api/v1/disconnect", json!({"user_id": "alice"})).await;
    assert_eq!((status, body["disconnected"].as_u64()), (200, Some(1)));
    expect_close(&mut a, 4409).await;
    wait_for_no_connections(&server).await;
    let (_, body) = get_json(&server, "/api/v1/connections?user_id=alice").await;
    assert_eq!(body["connections"].as_array().unwrap().len(), 0);
    let s = server.stats();
    assert_eq!(
        (
            s.opened,
            s.cleanups,
            s.duplicate_cleanups,
            s.frames_after_close
        ),
        (1, 1, 0, 0)
    );
}

/// A close the server starts (here a kick) is a handshake (RFC 6455 §7.1.2):
/// the server writes its close frame, keeps the TCP connection until the
/// peer's close reply arrives, then drops it. The mutants of the actor's exit
/// test (`Actor::drive`: `stopped && nothing pending && close written`, either
/// `&&` → `||`) dropped the TCP connection right after writing the close.
#[tokio::test]
async fn a_kick_holds_the_tcp_connection_until_the_close_reply() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config();
    // Far beyond the wait below, so the server never gives up on the reply here.
    cfg.lifecycle.close_timeout = std::time::Duration::from_secs(60);
    let server = start_with(cfg).await;
    let mut s = raw_hello(&server, "kim").await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The welcome first, so the kick finds a ready connection.
    while parse_server_frames(&got).is_empty() {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the welcome");
        got.extend_from_slice(&buf[..n]);
    }
    let (status, _) = post(&server, "/api/v1/disconnect", json!({"user_id": "kim"})).await;
    assert_eq!(status, 200);
    while close_code_of(&got).is_none() {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "EOF before the close frame");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(close_code_of(&got), Some(4409));
    // No reply yet: the server waits (reading nothing and not closing).
    match tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut buf)).await {
        Err(_) => {}
        Ok(r) => panic!("the server did not wait for the close reply: read {r:?}"),
    }
    assert_eq!(
        server.hub().len(),
        1,
        "the closing connection is still held"
    );
    // The reply ends the handshake: the server drops the TCP connection.
    s.write_all(&client_frame(0x8, &4409u16.to_be_bytes()))
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the server closes the TCP connection after the reply")
        .unwrap();
    assert!(rest.is_empty(), "nothing after the close frame: {rest:?}");
    wait_for_no_connections(&server).await;
}

#[tokio::test]
async fn token_in_header_or_subprotocol_is_accepted() {
    let server = start().await;
    let auth = format!("Bearer {}", token("carol"));
    let mut ws = open(&server, &[], Some(&auth)).await;
    send_json(&mut ws, json!({"type": "hello"})).await;
    assert_eq!(next_json(&mut ws).await["user_id"], "carol");

    let proto = format!("bearer.{}", token("dave"));
    let mut ws = open(&server, &[&proto], None).await;
    send_json(&mut ws, json!({"type": "hello"})).await;
    assert_eq!(next_json(&mut ws).await["user_id"], "dave");
}

#[tokio::test]
async fn per_user_connection_limit_closes_with_1013() {
    let mut cfg = config();
    cfg.max_connections_per_user = 2;
    let server = start_with(cfg).await;
    let _a = connect(&server, "frank").await;
    let _b = connect(&server, "frank").await;
    let mut c = open(&server, &[], None).await;
    send_json(&mut c, json!({"type":"hello","token":token("frank")})).await;
    expect_close(&mut c, 1013).await;
    // Another user is unaffected.
    let _g = connect(&server, "grace").await;
    // The refused one is cleaned up; frank keeps exactly his two.
    wait_for_connections(&server, 3).await;
    let mut users: Vec<Option<String>> = server
        .hub()
        .list(None)
        .into_iter()
        .map(|c| c.user_id)
        .collect();
    users.sort();
    assert_eq!(
        users,
        [Some("frank"), Some("frank"), Some("grace")].map(|u| u.map(str::to_owned))
    );
}
