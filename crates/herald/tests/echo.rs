//! The test-only echo endpoint (`echo_endpoint`, for the Autobahn suite run
//! by scripts/autobahn.sh): off by default; when on, text and binary
//! messages come back as sent, through the `/ws` actor, with its close codes
//! and its exactly-once cleanup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::Server;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

async fn echo_server() -> Server {
    let mut config = common::config();
    config.echo_endpoint = true;
    common::start_with(config).await
}

fn echo_url(server: &Server) -> String {
    format!("ws://{}/echo", server.local_addr())
}

/// The next message that is not a ping or pong.
async fn next(ws: &mut common::Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

async fn wait_for_cleanups(server: &Server, n: u64) {
    for _ in 0..500 {
        if server.stats().cleanups >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} cleanups expected, stats: {:?}", server.stats());
}

#[tokio::test]
async fn echo_is_off_by_default() {
    let server = common::start().await;
    match tokio_tungstenite::connect_async(echo_url(&server)).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn text_and_binary_come_back_as_sent_beyond_the_ws_message_limit() {
    let server = echo_server().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(echo_url(&server))
        .await
        .unwrap();
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("héllo"));
    // Larger than max_message_bytes (64 KiB) of /ws: the echo allows 16 MiB.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(big));
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    ws.send(Message::text("after the ping")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("after the ping"));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close reply, got {other:?}"),
    }
    wait_for_cleanups(&server, 1).await;
    let stats = server.stats();
    assert_eq!((stats.opened, stats.cleanups), (1, 1));
    assert_eq!(stats.duplicate_cleanups, 0);
    assert_eq!(stats.frames_after_close, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_is_closed_1007_and_a_drain_closes_echo_sockets_1012() {
    let server = echo_server().await;
    // Invalid UTF-8 in a text frame: a raw frame, since the client library
    // refuses to send one.
    let (mut bad, _) = tokio_tungstenite::connect_async(echo_url(&server))
        .await
        .unwrap();
    bad.send(Message::Frame(
        tungstenite::protocol::frame::Frame::message(
            vec![0xce, 0xba, 0xff, 0xfe],
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        ),
    ))
    .await
    .unwrap();
    match next(&mut bad).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1007),
        other => panic!("expected close 1007, got {other:?}"),
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(echo_url(&server))
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("x"));
    let drained = tokio::spawn(server.shutdown());
    // The drain announces itself (a `closing` frame) and closes with 1012.
    let closing = next(&mut ws).await;
    assert!(
        closing.to_text().unwrap().contains(r#""type":"closing""#),
        "{closing:?}"
    );
    match next(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1012),
        other => panic!("expected close 1012, got {other:?}"),
    }
    drained.await.unwrap();
}

/// Issue 37, finding 17: when on, `/echo` is bounded: at most
/// `echo_max_connections` at once (beyond: HTTP 503 `capacity`, and the
/// place comes back when one closes), and a connection with no message for
/// `echo_idle_timeout` is closed 1001 (20 connections holding 16 MiB
/// messages used to stay for as long as they liked).
#[tokio::test]
async fn echo_connections_are_capped_and_closed_when_idle() {
    let mut config = common::config();
    config.echo_endpoint = true;
    config.echo_max_connections = 3;
    config.echo_idle_timeout = Duration::from_millis(400);
    let server = common::start_with(config).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            tokio_tungstenite::connect_async(echo_url(&server))
                .await
                .unwrap()
                .0,
        );
    }
    match tokio_tungstenite::connect_async(echo_url(&server)).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    // One keeps talking past the idle bound; the silent ones are closed.
    let mut talker = open.pop().unwrap();
    for i in 0..8 {
        talker.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(next(&mut talker).await, Message::text(format!("m{i}")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for ws in &mut open {
        match next(ws).await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away, "{f:?}"),
            other => panic!("expected a close, got {other:?}"),
        }
    }
    drop(open);
    wait_for_cleanups(&server, 2).await;
    // Their places came back.
    let (mut again, _) = tokio_tungstenite::connect_async(echo_url(&server))
        .await
        .unwrap();
    again.send(Message::text("back")).await.unwrap();
    assert_eq!(next(&mut again).await, Message::text("back"));
    server.shutdown().await;
}
