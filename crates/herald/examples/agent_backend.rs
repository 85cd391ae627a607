//! A minimal agent backend for Herald — the integration a real backend copies.
//!
//! It receives Herald's webhook, verifies the signature, answers 200 at once,
//! and then streams the agent's events back through Herald's publish API.
//!
//! ```sh
//! # terminal 1: the backend
//! HERALD_API_KEY=k WEBHOOK_SECRET=s cargo run --example agent_backend
//! # terminal 2: Herald, pointed at it
//! HERALD_API_KEY=k HERALD_JWT_HS256_SECRET=j HERALD_WEBHOOK_URL=http://127.0.0.1:9000/webhook \
//!   HERALD_WEBHOOK_SECRET=s cargo run -- serve
//! ```
//!
//! Environment: `LISTEN` (default 127.0.0.1:9000), `HERALD_URL` (default
//! http://127.0.0.1:8080), `HERALD_API_KEY`, `WEBHOOK_SECRET`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use herald::agent::webhook::{
    DELIVERY_HEADER, SIGNATURE_HEADER, SignedHeaders, TIMESTAMP_HEADER, verify,
};
use parking_lot::Mutex;
use serde_json::{Value, json};

struct Backend {
    herald_url: String,
    api_key: String,
    secret: String,
    http: reqwest::Client,
    cancelled: Mutex<HashSet<String>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let backend = Arc::new(Backend {
        herald_url: env("HERALD_URL", "http://127.0.0.1:8080"),
        api_key: std::env::var("HERALD_API_KEY")?,
        secret: std::env::var("WEBHOOK_SECRET")?,
        http: reqwest::Client::new(),
        cancelled: Mutex::new(HashSet::new()),
    });
    let app = Router::new()
        .route("/webhook", post(webhook))
        .with_state(backend);
    let listener = tokio::net::TcpListener::bind(env("LISTEN", "127.0.0.1:9000")).await?;
    eprintln!("agent backend listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn webhook(State(b): State<Arc<Backend>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now = herald::auth::unix_now();
    // 1. Verify the signature over the raw body and the delivery id, with a
    //    5-minute replay window. (A backend that must not act twice on one
    //    request also remembers delivery ids for that window.)
    if let Err(e) = verify(
        &b.secret,
        SignedHeaders {
            timestamp: header(TIMESTAMP_HEADER),
            delivery: header(DELIVERY_HEADER),
            signature: header(SIGNATURE_HEADER),
        },
        &body,
        now,
        Duration::from_secs(300),
    ) {
        eprintln!("rejected webhook: {e}");
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    // 2. Accept fast; do the work in the background.
    match req["type"].as_str() {
        Some("user_message") => {
            tokio::spawn(answer(b, req));
        }
        Some("cancel") => {
            if let Some(run) = req["run_id"].as_str() {
                b.cancelled.lock().insert(run.to_owned());
            }
        }
        _ => return StatusCode::BAD_REQUEST,
    }
    StatusCode::OK
}

/// 3. Stream the run's events back through Herald's publish API.
async fn answer(b: Arc<Backend>, req: Value) {
    let user = req["user_id"].as_str().unwrap_or_default().to_owned();
    let thread = req["thread_id"].clone();
    let text = req["text"].as_str().unwrap_or_default().to_owned();
    let run = format!("run-{}", req["message_id"].as_str().unwrap_or("x"));
    let steps = [
        ("agent_started", json!({})),
        ("agent_thinking", json!({"text": "Looking into it"})),
        (
            "tool_executing",
            json!({"tool": "lookup", "input": {"q": text}}),
        ),
        (
            "tool_completed",
            json!({"tool": "lookup", "output": {"hits": 1}}),
        ),
        (
            "agent_completed",
            json!({"final_response": format!("Echo: {text}")}),
        ),
    ];
    for (i, (event, data)) in steps.into_iter().enumerate() {
        if b.cancelled.lock().remove(&run) {
            publish(&b, &user, &thread, &run, "agent_cancelled", json!({}), i).await;
            return;
        }
        publish(&b, &user, &thread, &run, event, data, i).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish(
    b: &Backend,
    user: &str,
    thread: &Value,
    run: &str,
    event: &str,
    data: Value,
    step: usize,
) {
    let body = json!({
        "user_id": user, "event": event, "thread_id": thread, "run_id": run, "data": data,
        // Safe to retry: Herald appends an idempotency key only once.
        "idempotency_key": format!("{run}-{step}"),
    });
    let sent = b
        .http
        .post(format!("{}/api/v1/events", b.herald_url))
        .bearer_auth(&b.api_key)
        .json(&body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => eprintln!("publish {event} failed: HTTP {}", r.status()),
        Err(e) => eprintln!("publish {event} failed: {e}"),
    }
}
