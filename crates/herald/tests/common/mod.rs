//! Helpers shared by the integration tests: a real server on 127.0.0.1:0 and
//! real WebSocket / HTTP clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::{Config, Server};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn config() -> Config {
    Config::for_tests(SECRET, API_KEY)
}

pub async fn start() -> Server {
    start_with(config()).await
}

pub async fn start_with(config: Config) -> Server {
    Server::start(config).await.expect("server starts")
}

pub fn token(user: &str) -> String {
    herald::auth::mint_hs256(SECRET, user, Duration::from_secs(3600)).unwrap()
}

pub fn ws_url(server: &Server) -> String {
    format!("ws://{}/ws", server.local_addr())
}

pub fn http_url(server: &Server, path: &str) -> String {
    format!("http://{}{}", server.local_addr(), path)
}

/// Open a WebSocket offering `herald.v1` (plus any extra subprotocols / headers).
pub async fn open(server: &Server, extra_protocols: &[&str], auth_header: Option<&str>) -> Ws {
    let mut req = ws_url(server).into_client_request().unwrap();
    let mut protocols = vec!["herald.v1".to_owned()];
    protocols.extend(extra_protocols.iter().map(|s| s.to_string()));
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&protocols.join(", ")).unwrap(),
    );
    if let Some(a) = auth_header {
        req.headers_mut()
            .insert("Authorization", HeaderValue::from_str(a).unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "herald.v1"
    );
    ws
}

/// Open, send hello with a token for `user`, and return the socket and welcome.
pub async fn connect(server: &Server, user: &str) -> (Ws, Value) {
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": token(user)})).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next text frame as JSON (fails on close or timeout).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10s")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Read until the server's close frame; return its code and reason. Text
/// frames before it are returned too.
pub async fn read_until_close(ws: &mut Ws) -> (Option<u16>, String, Vec<Value>) {
    let mut texts = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close within 10s");
        match msg {
            Some(Ok(Message::Text(t))) => texts.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                // Like a well-behaved client: keep polling so the close reply is sent.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while ws.next().await.is_some() {}
                })
                .await;
                return (
                    f.as_ref().map(|f| u16::from(f.code)),
                    f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    texts,
                );
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => return (None, String::new(), texts),
        }
    }
}

pub async fn expect_close(ws: &mut Ws, code: u16) -> String {
    let (got, reason, _) = read_until_close(ws).await;
    assert_eq!(got, Some(code), "close code (reason: {reason})");
    reason
}

pub fn close_code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POST a JSON body to the API with the test key; returns status and JSON body.
pub async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(http_url(server, path))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub async fn publish(server: &Server, user: &str, event: &str, data: Value) -> Value {
    let (status, body) = post(
        server,
        "/api/v1/events",
        json!({"user_id": user, "event": event, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["results"][0].clone()
}

pub async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let resp = client()
        .get(http_url(server, path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Wait until the server has no live connection (bounded).
pub async fn wait_for_no_connections(server: &Server) {
    for _ in 0..500 {
        if server.app().registry.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} connections still live", server.app().registry.len());
}
