//! The golden path: user messages to the agent backend, acks, cancel, the demo
//! agent, the webhook backend, and the inbound rate limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use herald::agent::webhook::Webhook;
use herald::agent::webhook::{
    DELIVERY_HEADER, SIGNATURE_HEADER, SignedHeaders, TIMESTAMP_HEADER, WebhookConfig,
};
use herald::agent::{AgentBackend, BackendRequest, CancelOut};
use parking_lot::Mutex;
use serde_json::{Value, json};

const HOOK_SECRET: &str = "hook-secret-0123456789";

fn message(id: &str, text: &str) -> Value {
    json!({"type": "user_message", "id": id, "thread_id": "t1", "text": text})
}

/// Read frames until one of `type` arrives (others are returned too).
async fn until_type(ws: &mut Ws, kind: &str) -> (Value, Vec<Value>) {
    let mut seen = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] == kind {
            return (v, seen);
        }
        seen.push(v);
    }
}

/// Read frames until the event `name` arrives.
async fn until_event(ws: &mut Ws, name: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "event" && v["event"] == name {
            return v;
        }
    }
}

/// The ack of a message and the events of the run it started, whichever
/// comes first (a backend that answers the webhook and publishes at once
/// can have its first event delivered before Herald's ack). The message's
/// own `user_message` event, stored before it was forwarded, comes first
/// and is checked, then left out.
async fn acked_run(ws: &mut Ws) -> Vec<Value> {
    let (ack, before) = until_type(ws, "ack").await;
    let mut events: Vec<Value> = before
        .into_iter()
        .filter(|v| v["type"] == "event")
        .collect();
    assert_eq!(
        events.first().map(|e| &e["event"]),
        Some(&json!("user_message")),
        "{events:?}"
    );
    assert_eq!(events[0]["data"]["id"], ack["id"]);
    events.remove(0);
    let closed = |e: &Value| {
        matches!(
            e["event"].as_str(),
            Some("agent_completed" | "agent_error" | "agent_cancelled")
        )
    };
    if !events.last().is_some_and(closed) {
        events.extend(run_events(ws).await);
    }
    events
}

/// Events of one run until it closes (completed, error or cancelled).
async fn run_events(ws: &mut Ws) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] != "event" {
            continue;
        }
        let name = v["event"].as_str().unwrap().to_owned();
        events.push(v);
        if matches!(
            name.as_str(),
            "agent_completed" | "agent_error" | "agent_cancelled"
        ) {
            return events;
        }
    }
}

#[tokio::test]
async fn demo_agent_answers_with_the_golden_path_and_streams_its_answer() {
    let server = start().await;
    let (mut ws, _) = connect(&server, "gil").await;
    send_json(&mut ws, message("m1", "what is the weather")).await;
    let (ack, before) = until_type(&mut ws, "ack").await;
    // The question is stored before it is forwarded; the ack comes before
    // the run (the demo agent starts after the ack).
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(
        (
            before[0]["event"].as_str(),
            before[0]["data"]["id"].as_str()
        ),
        (Some("user_message"), Some("m1"))
    );
    assert_eq!(
        (ack["id"].as_str(), ack["status"].as_str()),
        (Some("m1"), Some("accepted"))
    );

    let events = run_events(&mut ws).await;
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .filter(|&e| e != "agent_text_delta")
        .collect();
    assert_eq!(
        names,
        vec![
            "agent_started",
            "agent_thinking",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_thinking",
            "agent_completed"
        ]
    );
    // The answer streamed word by word between the last thought and the end,
    // numbered from 0, and exactly the final response.
    let deltas = &events[6..events.len() - 1];
    assert!(deltas.len() > 10, "{}", deltas.len());
    let mut text = String::new();
    for (i, d) in deltas.iter().enumerate() {
        assert_eq!(d["event"], "agent_text_delta");
        assert_eq!(d["data"]["part"], "answer");
        assert!(
            d["data"].get("index").is_none(),
            "the index is not sent to clients"
        );
        text.push_str(d["data"]["text"].as_str().unwrap());
        assert!(
            i == deltas.len() - 1 || text.ends_with(' '),
            "word by word: {text:?}"
        );
    }
    assert_eq!(
        events.last().unwrap()["data"]["final_response"],
        text.as_str()
    );
    let run = events[0]["run_id"].as_str().unwrap();
    assert!(
        events
            .iter()
            .all(|e| e["run_id"] == run && e["thread_id"] == "t1")
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let last = events.last().unwrap();
    assert!(
        last["data"]["final_response"]
            .as_str()
            .unwrap()
            .contains("what is the weather")
    );
    assert_eq!(events[3]["data"]["tool"], "search");
    // The tool call's two events are paired by their id.
    let call = events[3]["data"]["tool_call_id"].as_str().unwrap();
    assert!(call.starts_with("call_"), "{call}");
    assert_eq!(events[4]["data"]["tool_call_id"], call);
}

/// The wait after the cancel passes on tokio's paused clock, not in real time.
#[tokio::test]
async fn cancel_mid_run_ends_with_agent_cancelled_and_nothing_after() {
    let server = start().await;
    let (mut ws, _) = connect(&server, "hal").await;
    send_json(&mut ws, message("m1", "long task")).await;
    until_type(&mut ws, "ack").await;
    let started = next_json(&mut ws).await;
    assert_eq!(started["event"], "agent_started");
    let run = started["run_id"].as_str().unwrap().to_owned();

    // Another user may not cancel it; an unknown run is refused too.
    let (mut other, _) = connect(&server, "ivan").await;
    send_json(&mut other, json!({"type": "cancel", "run_id": run})).await;
    assert_eq!(next_json(&mut other).await["code"], "unknown_run");
    send_json(&mut ws, json!({"type": "cancel", "run_id": "run_nope"})).await;

    send_json(&mut ws, json!({"type": "cancel", "run_id": run})).await;
    let mut rest = Vec::new();
    loop {
        let v = next_json(&mut ws).await;
        let done = v["event"] == "agent_cancelled";
        rest.push(v);
        if done {
            break;
        }
    }
    assert!(rest.iter().any(|v| v["code"] == "unknown_run"), "{rest:?}");
    assert!(!rest.iter().any(|v| v["event"] == "agent_completed"));
    // Nothing of that run after agent_cancelled (the demo run would take ~1.5 s).
    skip(Duration::from_millis(3000)).await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    // And the run is closed: cancelling again is refused.
    send_json(&mut ws, json!({"type": "cancel", "run_id": run})).await;
    assert_eq!(next_json(&mut ws).await["code"], "unknown_run");
}

/// A scripted webhook receiver: verifies every signature and answers with the
/// next status of `script` (the last one repeats).
#[derive(Default)]
struct Hook {
    script: Vec<u16>,
    attempts: Vec<Value>,
    /// The `X-Herald-Delivery` of each attempt.
    deliveries: Vec<String>,
    bad_signatures: usize,
    /// The `Location` of a 3xx answer.
    redirect_to: Option<String>,
}

async fn start_hook(script: Vec<u16>) -> (String, Arc<Mutex<Hook>>) {
    let hook = Arc::new(Mutex::new(Hook {
        script,
        ..Hook::default()
    }));
    let state = hook.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let ok = herald::agent::webhook::verify(
                    HOOK_SECRET,
                    SignedHeaders {
                        timestamp: h(TIMESTAMP_HEADER).as_deref(),
                        delivery: h(DELIVERY_HEADER).as_deref(),
                        signature: h(SIGNATURE_HEADER).as_deref(),
                    },
                    &body,
                    herald::auth::unix_now(),
                    Duration::from_secs(300),
                )
                .is_ok();
                let mut s = state.lock();
                if !ok {
                    s.bad_signatures += 1;
                }
                s.attempts.push(serde_json::from_slice(&body).unwrap());
                s.deliveries.push(h(DELIVERY_HEADER).unwrap_or_default());
                let i = (s.attempts.len() - 1).min(s.script.len() - 1);
                let status = StatusCode::from_u16(s.script[i]).unwrap();
                // 429s ask for a one-second pause; 503s leave the wait to
                // Herald's backoff; the rest ask for none.
                let mut headers = HeaderMap::new();
                match status {
                    StatusCode::TOO_MANY_REQUESTS => {
                        headers.insert("retry-after", "1".parse().unwrap())
                    }
                    StatusCode::SERVICE_UNAVAILABLE => None,
                    _ => headers.insert("retry-after", "0".parse().unwrap()),
                };
                if let Some(to) = &s.redirect_to {
                    headers.insert("location", to.parse().unwrap());
                }
                (status, headers)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), hook)
}

async fn server_with_hook(url: String) -> herald::Server {
    let mut cfg = config();
    cfg.webhook = Some(WebhookConfig {
        url,
        secret: HOOK_SECRET.to_owned(),
        timeout: Duration::from_secs(2),
        retries: 3,
        backoff: Duration::from_millis(10),
    });
    start_with(cfg).await
}

#[tokio::test]
async fn webhook_retries_503_then_delivers_once_and_acks_once() {
    let (url, hook) = start_hook(vec![503, 503, 200]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "jan").await;
    send_json(&mut ws, json!({"type": "user_message", "id": "m1", "thread_id": "t9", "text": "hi", "data": {"k": 1}})).await;
    let (ack, _) = until_type(&mut ws, "ack").await;
    assert_eq!(ack["id"], "m1");
    {
        let h = hook.lock();
        assert_eq!(h.attempts.len(), 3, "two 503s, then 200");
        assert_eq!(h.bad_signatures, 0);
        // One delivery id for every attempt of one request.
        assert_eq!(h.deliveries[0].len(), 32, "{:?}", h.deliveries);
        assert!(
            h.deliveries.iter().all(|d| *d == h.deliveries[0]),
            "{:?}",
            h.deliveries
        );
        let body = &h.attempts[2];
        assert_eq!(body["type"], "user_message");
        assert_eq!(body["user_id"], "jan");
        assert_eq!(body["thread_id"], "t9");
        assert_eq!(body["message_id"], "m1");
        assert_eq!(body["text"], "hi");
        assert_eq!(body["data"]["k"], 1);
        assert!(body["conn_id"].is_string() && body["received_at"].is_string());
    }
    // Exactly one ack: the next frame is the pong.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    // Another message is another delivery.
    send_json(&mut ws, message("m2", "again")).await;
    until_type(&mut ws, "ack").await;
    let h = hook.lock();
    assert_eq!(h.deliveries.len(), 4);
    assert_ne!(h.deliveries[3], h.deliveries[0]);
}

#[tokio::test]
async fn webhook_that_always_fails_yields_nack_and_4xx_is_not_retried() {
    let (url, hook) = start_hook(vec![500]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "kai").await;
    send_json(&mut ws, message("m1", "hi")).await;
    let (nack, _) = until_type(&mut ws, "nack").await;
    assert_eq!(
        (nack["id"].as_str(), nack["error"].as_str()),
        (Some("m1"), Some("backend_unavailable"))
    );
    assert!(nack["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(hook.lock().attempts.len(), 4, "1 attempt + 3 retries");
    let d = hook.lock().deliveries.clone();
    assert!(d.iter().all(|x| *x == d[0]), "{d:?}");

    let (url, hook) = start_hook(vec![400]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "kai").await;
    send_json(&mut ws, message("m2", "hi")).await;
    let (nack, _) = until_type(&mut ws, "nack").await;
    assert_eq!(nack["error"], "backend_rejected");
    assert_eq!(hook.lock().attempts.len(), 1, "no retry on 400");
}

/// Issue 37, finding 16: Herald does not follow a webhook's redirects: a
/// 307 (which would re-POST the signed body and signature to wherever it
/// points) or a 302 (which would turn into a GET) is a failed delivery, not
/// retried (the same address would answer the same), and nothing reaches
/// the redirect's target.
#[tokio::test]
async fn webhook_redirects_are_not_followed() {
    for status in [307, 302, 301, 308] {
        let (elsewhere, target) = start_hook(vec![200]).await;
        let (url, hook) = start_hook(vec![status]).await;
        hook.lock().redirect_to = Some(elsewhere);
        let server = server_with_hook(url).await;
        let (mut ws, _) = connect(&server, "kai").await;
        send_json(&mut ws, message("m1", "hi")).await;
        let (nack, _) = until_type(&mut ws, "nack").await;
        assert_eq!(nack["error"], "backend_rejected", "{status}");
        assert_eq!(hook.lock().attempts.len(), 1, "{status}: not retried");
        assert_eq!(target.lock().attempts.len(), 0, "{status}: followed");
        server.shutdown().await;
    }
}

/// Issue 14, finding 2: a webhook URL with a secret in its userinfo and
/// query reaches neither the client's `nack` nor the failure detail that is
/// logged.
#[tokio::test]
async fn webhook_url_secrets_reach_neither_clients_nor_logs() {
    // A port with nothing listening: every attempt is a connection error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://agent:PASSWORD@127.0.0.1:{port}/hook?token=BACKEND-SECRET");
    let server = server_with_hook(url.clone()).await;
    let (mut ws, _) = connect(&server, "liv").await;
    send_json(&mut ws, message("m1", "hi")).await;
    let (nack, _) = until_type(&mut ws, "nack").await;
    assert_eq!(nack["error"], "backend_unavailable");
    let text = nack.to_string();
    for secret in ["BACKEND-SECRET", "PASSWORD", "/hook", &port.to_string()] {
        assert!(
            !text.contains(secret),
            "{secret} leaked to the client: {text}"
        );
    }

    // What the log line carries: the failure detail, and the redacted URL.
    let hook = Webhook::new(WebhookConfig {
        url: url.clone(),
        secret: HOOK_SECRET.to_owned(),
        timeout: Duration::from_secs(1),
        retries: 0,
        backoff: Duration::from_millis(1),
    })
    .unwrap();
    let req = BackendRequest::Cancel(CancelOut {
        stream: None,
        user_id: "liv".into(),
        run_id: "r".into(),
        conn_id: "c".into(),
        received_at: "now".into(),
    });
    let err = hook.deliver(&req).await.unwrap_err().to_string();
    assert!(err.contains("request failed"), "{err}");
    assert!(
        !err.contains("BACKEND-SECRET") && !err.contains("PASSWORD"),
        "{err}"
    );
    let shown = herald::agent::webhook::redact(&url);
    assert_eq!(shown, format!("http://127.0.0.1:{port}/hook"));
}

/// Issue 14, finding 4: a backend that never answers holds at most
/// `webhook_max_in_flight_per_user` requests of one user and
/// `webhook_max_in_flight` in total; further messages get `nack
/// backend_busy` at once, and the places come back when requests end.
#[tokio::test]
async fn webhook_requests_in_flight_are_bounded_per_user_and_in_total() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            keep.lock().push(sock);
        }
    });
    let mut cfg = config();
    cfg.webhook = Some(WebhookConfig {
        url: format!("http://{addr}/hook"),
        secret: HOOK_SECRET.to_owned(),
        timeout: Duration::from_secs(3),
        retries: 0,
        backoff: Duration::from_millis(1),
    });
    cfg.in_flight = herald::config::InFlightLimits {
        total: 3,
        per_user: 2,
    };
    let server = start_with(cfg).await;
    let (mut a, _) = connect(&server, "ann").await;
    for id in ["a1", "a2", "a3"] {
        send_json(&mut a, message(id, "hi")).await;
    }
    // The third of ann's is refused at once (the first two hang for 3 s).
    let nack = tokio::time::timeout(Duration::from_secs(1), until_type(&mut a, "nack"))
        .await
        .expect("busy is answered at once")
        .0;
    assert_eq!(
        (nack["id"].as_str(), nack["error"].as_str()),
        (Some("a3"), Some("backend_busy"))
    );
    assert!(nack["retry_after_ms"].as_u64().unwrap() > 0);
    // Bob takes the last place in total; Cy finds none.
    let (mut b, _) = connect(&server, "bob").await;
    send_json(&mut b, message("b1", "hi")).await;
    let (mut c, _) = connect(&server, "cy").await;
    // Wait until all three requests hang at the backend (their places taken).
    for _ in 0..500 {
        if held.lock().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(held.lock().len(), 3, "a1, a2 and b1 reached the backend");
    send_json(&mut c, message("c1", "hi")).await;
    let nack = tokio::time::timeout(Duration::from_secs(1), until_type(&mut c, "nack"))
        .await
        .expect("busy is answered at once")
        .0;
    assert_eq!(nack["error"], "backend_busy");
    // A busy id was not remembered: once the hung requests time out, the
    // same id is forwarded (and fails as the backend does, not as busy).
    // Each place is given back before its nack is sent.
    for ws in [&mut a, &mut b] {
        let (nack, _) = until_type(ws, "nack").await;
        assert_eq!(nack["error"], "backend_unavailable");
    }
    let (nack, _) = until_type(&mut a, "nack").await;
    assert_eq!(nack["error"], "backend_unavailable");
    send_json(&mut c, message("c1", "hi")).await;
    let (again, _) = until_type(&mut c, "nack").await;
    assert_eq!(again["error"], "backend_unavailable", "{again}");
    assert!(held.lock().len() >= 4, "the requests reached the backend");
}

#[tokio::test]
async fn duplicate_message_id_is_forwarded_once_and_acked_twice() {
    let (url, hook) = start_hook(vec![200]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "lea").await;
    send_json(&mut ws, message("dup", "once")).await;
    send_json(&mut ws, message("dup", "once")).await;
    let (a1, _) = until_type(&mut ws, "ack").await;
    let (a2, _) = until_type(&mut ws, "ack").await;
    assert_eq!(
        (a1["id"].as_str(), a2["id"].as_str()),
        (Some("dup"), Some("dup"))
    );
    // Later, from another connection of the same user: acked, not forwarded.
    let (mut ws2, _) = connect(&server, "lea").await;
    send_json(&mut ws2, message("dup", "once")).await;
    assert_eq!(until_type(&mut ws2, "ack").await.0["id"], "dup");
    assert_eq!(hook.lock().attempts.len(), 1);
}

#[tokio::test]
async fn cancel_is_forwarded_to_the_webhook_as_its_own_kind() {
    let (url, hook) = start_hook(vec![200]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "max").await;
    let (status, _) = post(
        &server,
        "/api/v1/events",
        json!({"user_id": "max", "event": "agent_started", "run_id": "r7"}),
    )
    .await;
    assert_eq!(status, 200);
    until_type(&mut ws, "event").await;
    send_json(&mut ws, json!({"type": "cancel", "run_id": "r7"})).await;
    for _ in 0..200 {
        if !hook.lock().attempts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = hook.lock();
    assert_eq!(h.attempts.len(), 1);
    assert_eq!(h.attempts[0]["type"], "cancel");
    assert_eq!(h.attempts[0]["run_id"], "r7");
    assert_eq!(h.attempts[0]["user_id"], "max");
}

#[tokio::test]
async fn flood_is_rate_limited_then_closed_and_others_are_unaffected() {
    let mut cfg = config();
    cfg.rate_limit.per_second = 5.0;
    cfg.rate_limit.burst = 5.0;
    let server = start_with(cfg).await;
    let (mut calm, _) = connect(&server, "calm").await;
    let (mut flood, _) = connect(&server, "flood").await;
    for _ in 0..20 {
        send_json(&mut flood, json!({"type": "ping"})).await;
    }
    // Collect what comes back for a moment: the burst is answered, the rest
    // dropped with a single notice.
    let mut texts = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut flood),
    )
    .await
    {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            texts.push(serde_json::from_str::<Value>(&t).unwrap());
        }
    }
    let pongs = texts.iter().filter(|v| v["type"] == "pong").count();
    assert!(
        (4..=5).contains(&pongs),
        "the burst (5, one spent on hello) is served: {texts:?}"
    );
    assert_eq!(
        texts.iter().filter(|v| v["code"] == "rate_limited").count(),
        1,
        "one notice per burst: {texts:?}"
    );

    // The other client is served normally meanwhile.
    send_json(&mut calm, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut calm).await["type"], "pong");
    let r = publish(&server, "calm", "agent_note", json!({})).await;
    assert_eq!(r["delivered"], 1);
    assert_eq!(next_json(&mut calm).await["type"], "event");

    // Sustained abuse closes with 1008.
    for _ in 0..100 {
        if futures_util::SinkExt::send(
            &mut flood,
            tokio_tungstenite::tungstenite::Message::text("{\"type\":\"ping\"}"),
        )
        .await
        .is_err()
        {
            break;
        }
    }
    let (code, _, _) = read_until_close(&mut flood).await;
    assert_eq!(code, Some(1008));
}

/// Unsolicited pong frames count against the rate limit too: a pong flood
/// closes with 1008, before `hello` as after it (issue 14, finding 3).
#[tokio::test]
async fn a_pong_flood_is_rate_limited_and_closed() {
    use tokio_tungstenite::tungstenite::Message;
    let server = start().await;
    let (ready, _) = connect(&server, "pongy").await;
    let before_hello = open(&server, &[], None).await;
    for mut ws in [ready, before_hello] {
        for _ in 0..500 {
            if futures_util::SinkExt::send(&mut ws, Message::Pong(Default::default()))
                .await
                .is_err()
            {
                break;
            }
        }
        let (code, _, _) = read_until_close(&mut ws).await;
        assert_eq!(code, Some(1008));
    }
}

/// A server whose webhook is the example backend (`examples/agent_backend.rs`,
/// built by `cargo test`), started beside it; and the backend's port.
async fn with_example_backend() -> (herald::Server, std::process::Child, u16) {
    let bin = std::path::Path::new(BIN)
        .with_file_name("examples")
        .join("agent_backend");
    assert!(
        bin.exists(),
        "cargo test builds examples; missing {}",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config();
    cfg.webhook = Some(WebhookConfig {
        url: format!("http://127.0.0.1:{port}/webhook"),
        secret: HOOK_SECRET.to_owned(),
        timeout: Duration::from_secs(2),
        retries: 5,
        backoff: Duration::from_millis(100),
    });
    let server = start_with(cfg).await;
    let child = std::process::Command::new(bin)
        .env("LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_URL", format!("http://{}", server.local_addr()))
        .env("HERALD_API_KEY", API_KEY)
        .env("WEBHOOK_SECRET", HOOK_SECRET)
        .spawn()
        .unwrap();
    (server, child, port)
}

/// The example backend (`examples/agent_backend.rs`) against a real server:
/// signature verified, events published back through the API.
#[tokio::test]
async fn example_agent_backend_round_trip() {
    let (server, mut child, _) = with_example_backend().await;
    let (mut ws, _) = connect(&server, "nia").await;
    send_json(&mut ws, message("m1", "ping the backend")).await;
    let result =
        tokio::time::timeout(Duration::from_secs(15), async { acked_run(&mut ws).await }).await;
    let _ = child.kill();
    let _ = child.wait();
    let events = result.expect("the example backend answered");
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_completed"
        ]
    );
    assert_eq!(
        events[4]["data"]["final_response"],
        "Echo: ping the backend"
    );
}

/// Issue 37, finding 15: the example backend keys runs by (user, run id)
/// and acts on a delivery once. Two users send the same message id at
/// once; one cancels her run: hers ends `agent_cancelled`, the other's
/// completes (one global set of cancelled run names, keyed by message id,
/// used to cancel whichever loop looked first). A delivery replayed with
/// its valid signature starts no second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_agent_backend_keeps_users_apart_and_acts_once() {
    let (server, mut child, port) = with_example_backend().await;
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let (mut nia, _) = connect(&server, "nia").await;
        let (mut ola, _) = connect(&server, "ola").await;
        // Nia's run is a step ahead of Ola's, so after Ola's cancel lands
        // Nia's loop is the first to look (the old example cancelled it).
        send_json(&mut nia, message("m1", "nia asks")).await;
        let nia_started = until_event(&mut nia, "agent_started").await;
        assert_eq!(nia_started["event"], "agent_started");
        send_json(&mut ola, message("m1", "ola asks")).await;
        // The ack and the run's first event may come in either order.
        let (_, before_ack) = until_type(&mut ola, "ack").await;
        let started = match before_ack
            .into_iter()
            .find(|v| v["event"] == "agent_started")
        {
            Some(e) => e,
            None => until_event(&mut ola, "agent_started").await,
        };
        assert_eq!(started["event"], "agent_started");
        let run = started["run_id"].as_str().unwrap().to_owned();
        send_json(&mut ola, json!({"type": "cancel", "run_id": run})).await;
        let ola_events = run_events(&mut ola).await;
        let mut nia_events = vec![nia_started];
        nia_events.extend(run_events(&mut nia).await);
        // A replayed delivery: the same body, id and signature, again.
        let body = serde_json::to_vec(&json!({
            "type": "user_message", "user_id": "nia", "message_id": "m2",
            "thread_id": "t1", "text": "replayed", "data": {}
        }))
        .unwrap();
        let ts = herald::auth::unix_now();
        let delivery = "0123456789abcdef0123456789abcdef";
        let sig = herald::agent::webhook::sign(HOOK_SECRET, ts, delivery, &body);
        for _ in 0..2 {
            let r = client()
                .post(format!("http://127.0.0.1:{port}/webhook"))
                .header(TIMESTAMP_HEADER, ts.to_string())
                .header(DELIVERY_HEADER, delivery)
                .header(SIGNATURE_HEADER, format!("v2={sig}"))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let replayed = run_events(&mut nia).await;
        // Nothing more: a marker event comes next, not a second run.
        publish(&server, "nia", "marker", json!({})).await;
        let (marker, _) = until_type(&mut nia, "event").await;
        (ola_events, nia_events, replayed, marker)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (ola_events, nia_events, replayed, marker) = result.expect("the example answered");
    let last = |e: &[Value]| e.last().unwrap()["event"].as_str().unwrap().to_owned();
    assert_eq!(last(&ola_events), "agent_cancelled");
    assert_eq!(last(&nia_events), "agent_completed");
    assert_eq!(nia_events[4]["data"]["final_response"], "Echo: nia asks");
    assert_eq!(last(&replayed), "agent_completed");
    assert_eq!(marker["event"], "marker", "{marker}");
}

#[tokio::test]
async fn webhook_honours_retry_after_on_429() {
    let (url, hook) = start_hook(vec![429, 200]).await;
    let server = server_with_hook(url).await;
    let (mut ws, _) = connect(&server, "ola").await;
    let started = std::time::Instant::now();
    send_json(&mut ws, message("m1", "hi")).await;
    let (ack, _) = until_type(&mut ws, "ack").await;
    assert_eq!(ack["id"], "m1");
    assert_eq!(hook.lock().attempts.len(), 2);
    // Our own backoff would be ≤ 10 ms here; the backend asked for 1 s.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "retried after {:?}",
        started.elapsed()
    );
}
