//! `GET /ai`, the AI SDK's `WebSocketChatTransport` protocol, from outside:
//! bad input on a real server, and a response that survives the node it
//! started on being killed (three `herald serve` processes on one real
//! `redis-server`). The stock transport itself drives the endpoint in the
//! node tests (`clients/js/test/ai-endpoint.test.mjs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use common::redis_server::Redis;
use common::*;
use futures_util::SinkExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// An `/ai` socket at `addr` with `user`'s token in a `bearer.` subprotocol.
async fn ai_at(addr: &str, user: &str) -> Ws {
    let mut req = format!("ws://{addr}/ai").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("bearer.{}", token(user))).unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    // A browser fails a handshake that selects none of the offered protocols.
    assert!(
        resp.headers()
            .get("sec-websocket-protocol")
            .is_some_and(|p| p.to_str().unwrap().starts_with("bearer.")),
        "the offered bearer subprotocol is selected"
    );
    ws
}

fn send_frame(request: &str, chat: &str, text: &str) -> Value {
    json!({
        "type": "send", "requestId": request, "id": chat, "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "headers": {}, "body": {},
    })
}

/// Read one response's frames until its `end` (or `error`): its chunks'
/// text, and checks that sequences run 0, 1, 2, … with one `start` chunk.
async fn read_response(ws: &mut Ws, request: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut frames = Vec::new();
    let mut next = 0;
    loop {
        let f = next_json(ws).await;
        if f["requestId"] != request {
            continue;
        }
        frames.push(f.clone());
        match f["type"].as_str().unwrap() {
            "chunk" => {
                assert_eq!(f["sequence"], next, "gapless: {f}");
                next += 1;
                if f["chunk"]["type"] == "text-delta" {
                    text.push_str(f["chunk"]["delta"].as_str().unwrap());
                }
            }
            "end" | "error" | "no-active" => return (text, frames),
            _ => {}
        }
    }
}

/// Bad input on `/ai` gets the transport's answers: 1008 for a frame the
/// protocol refuses, 1003 for binary, 1009 over `ai_max_message_bytes`,
/// 4408 for a socket that never sends its token, and a `send` larger than
/// `/ws` allows (64 KiB) but within the AI bound is served.
#[tokio::test]
async fn bad_input_on_the_ai_endpoint() {
    let mut cfg = config();
    cfg.ai.max_message_bytes = 256 * 1024;
    cfg.lifecycle.hello_timeout = Duration::from_millis(300);
    let server = start_with(cfg).await;
    let addr = server.local_addr().to_string();
    for (frame, code) in [
        (Message::text("{\"type\":\"send\"}"), 1008),
        (Message::text("[1,2]"), 1008),
        (
            Message::text(json!({"type": "resume", "requestId": 7, "id": "c"}).to_string()),
            1008,
        ),
        (Message::binary(vec![1, 2, 3]), 1003),
        (Message::text("x".repeat(256 * 1024 + 1)), 1009),
    ] {
        let mut ws = ai_at(&addr, "bad1").await;
        ws.send(frame).await.unwrap();
        expect_close(&mut ws, code).await;
    }
    // A large chat (200 KiB of messages) is one frame and is served.
    let mut ws = ai_at(&addr, "bad1").await;
    let big = "y".repeat(200 * 1024);
    send_json(&mut ws, send_frame("r1", "big", &big)).await;
    let (text, _) = read_response(&mut ws, "r1").await;
    assert!(text.starts_with("You said: "), "{text}");
    // No token on the upgrade and no frame: closed like a missing hello.
    let (mut bare, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ai"))
        .await
        .unwrap();
    expect_close(&mut bare, 4408).await;
}

/// A webhook backend in this process: each `chat_request` is answered by
/// publishing `WORDS` numbered deltas of its run, `PAUSE` apart, then
/// `agent_completed`, through whichever node of `addrs` answers (a killed
/// node's publish is retried on the next with the same index, so nothing
/// is stored twice).
const WORDS: usize = 40;
const PAUSE: Duration = Duration::from_millis(50);

async fn backend(addrs: Arc<Mutex<Vec<String>>>) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let addrs = addrs.clone();
            async move {
                let req: Value = serde_json::from_slice(&body).unwrap();
                if req["type"] == "chat_request" {
                    tokio::spawn(answer(addrs, req));
                }
                Ok::<_, Infallible>("ok")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn word(i: usize) -> String {
    format!("w{i} ")
}

async fn answer(addrs: Arc<Mutex<Vec<String>>>, req: Value) {
    let (user, run, chat) = (
        req["user_id"].as_str().unwrap().to_owned(),
        req["run_id"].as_str().unwrap().to_owned(),
        req["chat_id"].as_str().unwrap().to_owned(),
    );
    let http = client();
    let publish = |body: Value| {
        let (http, addrs) = (http.clone(), addrs.clone());
        async move {
            for _ in 0..100 {
                let live = addrs.lock().clone();
                for addr in live {
                    let sent = http
                        .post(format!("http://{addr}/api/v1/events"))
                        .bearer_auth(API_KEY)
                        .json(&body)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no node took {body}");
        }
    };
    for i in 0..WORDS {
        tokio::time::sleep(PAUSE).await;
        publish(
            json!({"user_id": user, "event": "agent_text_delta", "run_id": run, "thread_id": chat,
                       "data": {"part": "answer", "text": word(i), "index": i}}),
        )
        .await;
    }
    publish(json!({"user_id": user, "event": "agent_completed", "run_id": run, "thread_id": chat}))
        .await;
}

/// Issue 42: a response started through node A, resumed on node B after
/// node A is killed with SIGKILL, ends whole — every delta once, in order,
/// sequences gapless — because the run and its events live in Redis, not
/// in the node that took the `send`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_resumes_on_another_node_after_its_node_is_killed() {
    let redis = Redis::start();
    let addrs = Arc::new(Mutex::new(Vec::new()));
    let hook = backend(addrs.clone()).await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (child, addr, _) = serve(&[
            ("HERALD_ADDR", "127.0.0.1:0"),
            ("HERALD_REDIS_URL", &redis.url()),
            ("HERALD_JWT_HS256_SECRET", SECRET),
            ("HERALD_API_KEY", API_KEY),
            ("HERALD_WEBHOOK_URL", &hook),
            ("HERALD_WEBHOOK_SECRET", "ai-redis-hook-0123456789"),
        ]);
        nodes.push(child);
        addrs.lock().push(addr);
    }
    let [a, b, _c] = <[String; 3]>::try_from(addrs.lock().clone()).unwrap();
    let mut on_a = ai_at(&a, "k1").await;
    send_json(&mut on_a, send_frame("r1", "chat-k", "hi")).await;
    // A few deltas through node A, then node A dies mid-answer.
    let mut seen = String::new();
    while seen.len() < word(0).len() * 5 {
        let f = next_json(&mut on_a).await;
        if f["chunk"]["type"] == "text-delta" {
            seen.push_str(f["chunk"]["delta"].as_str().unwrap());
        }
    }
    let mut killed = nodes.remove(0);
    killed.kill().unwrap();
    killed.wait().unwrap();
    addrs.lock().retain(|x| *x != a);
    // The page reloads and resumes the chat on node B.
    let mut on_b = ai_at(&b, "k1").await;
    send_json(
        &mut on_b,
        json!({"type": "resume", "requestId": "r2", "id": "chat-k", "headers": {}, "body": {}}),
    )
    .await;
    let (text, frames) = read_response(&mut on_b, "r2").await;
    let whole: String = (0..WORDS).map(word).collect();
    assert_eq!(text, whole, "every delta once, in order");
    assert!(
        text.starts_with(&seen),
        "the replay starts where A's answer did"
    );
    assert_eq!(
        frames[0]["type"], "start",
        "a resume first confirms the stream"
    );
    let starts: Vec<&Value> = frames
        .iter()
        .filter(|f| f["chunk"]["type"] == "start")
        .collect();
    assert_eq!(starts.len(), 1);
    assert_eq!(frames.last().unwrap()["type"], "end");
    assert_eq!(frames[frames.len() - 2]["chunk"]["type"], "finish");
    for mut n in nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
}

/// A resume right after a response completed replays it whole; once
/// `ai_replay_window` has passed since its end, the chat has no active
/// response (`no-active`); with a window of 0, only active responses are
/// resumed.
#[tokio::test]
async fn a_completed_response_is_replayed_within_the_window_only() {
    let mut cfg = config();
    cfg.ai.replay_window = Duration::from_secs(1);
    let server = start_with(cfg).await;
    let addr = server.local_addr().to_string();
    let resume = |request: &str| json!({"type": "resume", "requestId": request, "id": "done", "headers": {}, "body": {}});
    let mut ws = ai_at(&addr, "rw1").await;
    send_json(&mut ws, send_frame("r1", "done", "hi")).await;
    let (answer, _) = read_response(&mut ws, "r1").await;
    send_json(&mut ws, resume("r2")).await;
    let (again, frames) = read_response(&mut ws, "r2").await;
    assert_eq!(again, answer);
    assert_eq!(frames[0]["type"], "start");
    assert_eq!(frames.last().unwrap()["type"], "end");
    // The window passes (its end is judged by the run's last event's time).
    let mut n = 0;
    loop {
        n += 1;
        let request = format!("late{n}");
        send_json(&mut ws, resume(&request)).await;
        let (_, frames) = read_response(&mut ws, &request).await;
        if frames.last().unwrap()["type"] == "no-active" {
            break;
        }
        assert!(n < 100, "still replayed after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut cfg = config();
    cfg.ai.replay_window = Duration::ZERO;
    let server = start_with(cfg).await;
    let mut ws = ai_at(&server.local_addr().to_string(), "rw2").await;
    send_json(&mut ws, send_frame("r1", "done", "hi")).await;
    read_response(&mut ws, "r1").await;
    send_json(&mut ws, resume("r2")).await;
    let (_, frames) = read_response(&mut ws, "r2").await;
    assert_eq!(
        frames,
        vec![json!({"type": "no-active", "requestId": "r2"})]
    );
}

/// A drain ends every response an `/ai` socket follows with an `error`
/// (the transport has no `closing` frame): never a stream that just stops.
/// The socket then gets 1012 like any other.
#[tokio::test]
async fn a_drain_ends_open_responses_with_error() {
    let mut cfg = config();
    cfg.drain_window = Duration::from_millis(200);
    let server = start_with(cfg).await;
    let addr = server.local_addr().to_string();
    let mut ws = ai_at(&addr, "dr1").await;
    // A long answer (the demo agent repeats the message).
    send_json(&mut ws, send_frame("r1", "c", &"word ".repeat(300))).await;
    loop {
        let f = next_json(&mut ws).await;
        if f["chunk"]["type"] == "reasoning-delta" {
            break;
        }
    }
    let drained = tokio::spawn(server.shutdown());
    let (code, _, frames) = read_until_close(&mut ws).await;
    assert_eq!(code, Some(1012));
    let last = frames.last().expect("frames before the close");
    assert_eq!(
        last,
        &json!({"type": "error", "requestId": "r1", "errorText": "The server is restarting; resume the chat."})
    );
    assert!(
        !frames.iter().any(|f| f["type"] == "closing"),
        "no /ws frame on an /ai socket"
    );
    drained.await.unwrap();
}
