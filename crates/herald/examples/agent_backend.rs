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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Runs in progress by (user, run id), each with its cancel flag: a
    /// cancel reaches only that user's run, and a cancel for a run that is
    /// not running is dropped (nothing accumulates).
    runs: Mutex<HashMap<(String, String), Arc<AtomicBool>>>,
    /// Delivery ids seen within the signature's replay window, so a
    /// replayed request is not acted on twice.
    deliveries: Mutex<HashMap<String, u64>>,
}

/// How long a delivery id is remembered: the signature's replay window.
const REPLAY_WINDOW_S: u64 = 300;
/// Most delivery ids remembered (a flood of valid deliveries cannot grow it).
const MAX_DELIVERIES: usize = 65_536;

impl Backend {
    /// Whether `delivery` is new (and remember it); false for a replay.
    fn first_delivery(&self, delivery: &str, now: u64) -> bool {
        let mut seen = self.deliveries.lock();
        if seen.len() >= MAX_DELIVERIES {
            seen.retain(|_, at| now.saturating_sub(*at) <= REPLAY_WINDOW_S);
        }
        if seen.len() >= MAX_DELIVERIES {
            // Still full of live ids: refuse rather than forget one (Herald retries).
            return false;
        }
        seen.insert(delivery.to_owned(), now).is_none()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let backend = Arc::new(Backend {
        herald_url: env("HERALD_URL", "http://127.0.0.1:8080"),
        api_key: std::env::var("HERALD_API_KEY")?,
        secret: std::env::var("WEBHOOK_SECRET")?,
        http: reqwest::Client::new(),
        runs: Mutex::new(HashMap::new()),
        deliveries: Mutex::new(HashMap::new()),
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
    //    5-minute replay window, and act on each delivery id once.
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
    if !b.first_delivery(header(DELIVERY_HEADER).unwrap_or_default(), now) {
        return StatusCode::OK; // a replay: already acted on
    }
    // 2. Accept fast; do the work in the background.
    let user = req["user_id"].as_str().unwrap_or_default().to_owned();
    match req["type"].as_str() {
        Some("user_message") => {
            // A run id of this backend's own: message ids are the user's
            // choice and another user may pick the same one.
            let run = format!("run-{:016x}", rand::random::<u64>());
            let cancel = Arc::new(AtomicBool::new(false));
            b.runs
                .lock()
                .insert((user.clone(), run.clone()), cancel.clone());
            tokio::spawn(async move {
                answer(&b, &user, &run, &cancel, req).await;
                b.runs.lock().remove(&(user, run));
            });
        }
        Some("cancel") => {
            let run = req["run_id"].as_str().unwrap_or_default().to_owned();
            if let Some(flag) = b.runs.lock().get(&(user, run)) {
                flag.store(true, Ordering::Release);
            }
        }
        _ => return StatusCode::BAD_REQUEST,
    }
    StatusCode::OK
}

/// 3. Stream the run's events back through Herald's publish API.
async fn answer(b: &Backend, user: &str, run: &str, cancel: &AtomicBool, req: Value) {
    let thread = req["thread_id"].clone();
    let text = req["text"].as_str().unwrap_or_default().to_owned();
    let steps = [
        // Naming the message it answers keeps the question with the run.
        ("agent_started", json!({"message_id": req["message_id"]})),
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
        if cancel.load(Ordering::Acquire) {
            publish(b, user, &thread, run, "agent_cancelled", json!({}), i).await;
            return;
        }
        publish(b, user, &thread, run, event, data, i).await;
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
