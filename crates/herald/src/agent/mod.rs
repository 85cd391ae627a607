//! The agent side: user messages and cancels travelling from clients to the
//! agent backend — a signed webhook ([`webhook`]) or the built-in demo agent
//! ([`demo`]).
//!
//! A `user_message` is forwarded at most once per (user, `id`) within the
//! dedupe window: a repeat while the first is in flight waits for its outcome,
//! a repeat after it was accepted is acked at once, and a repeat after it
//! failed is forwarded again. The ack (or nack) goes to the connection that
//! sent the frame; delivery runs in its own task so a slow backend never
//! stalls the connection.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::protocol::ServerFrame;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::BoxFuture;
use crate::broker::{Broker, MessageClaim, user_stream};
use crate::connection::{ConnShared, OutFrame};
use crate::tasks::Tasks;
use crate::telemetry;

pub(crate) mod demo;
pub mod webhook;

/// A chat message for the agent backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageOut {
    /// The sender (`sub`).
    pub user_id: String,
    /// The conversation thread.
    pub thread_id: String,
    /// The client-chosen message id (idempotency key).
    pub message_id: String,
    /// The text.
    pub text: String,
    /// Extra data (an object).
    pub data: Map<String, Value>,
    /// The connection it arrived on.
    pub conn_id: String,
    /// When Herald received it, RFC 3339.
    pub received_at: String,
}

/// A request to stop an agent run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CancelOut {
    /// The requester (`sub`), who owns the run.
    pub user_id: String,
    /// The run to stop.
    pub run_id: String,
    /// The connection it arrived on.
    pub conn_id: String,
    /// When Herald received it, RFC 3339.
    pub received_at: String,
}

/// What is sent to the backend; the JSON has a `type` of `user_message` or `cancel`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackendRequest {
    /// A chat message.
    UserMessage(MessageOut),
    /// A cancel.
    Cancel(CancelOut),
}

/// Why the backend did not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The backend answered a 4xx other than 429: retrying will not help.
    #[error("agent backend rejected the request (HTTP {status})")]
    Rejected {
        /// The HTTP status.
        status: u16,
    },
    /// Retries were exhausted (5xx, 429, timeouts, connection errors).
    #[error("agent backend unavailable: {detail}")]
    Unavailable {
        /// The last failure.
        detail: String,
    },
}

impl DeliveryError {
    /// The `nack.error` code.
    pub fn code(&self) -> &'static str {
        match self {
            DeliveryError::Rejected { .. } => "backend_rejected",
            DeliveryError::Unavailable { .. } => "backend_unavailable",
        }
    }

    /// The `nack.retry_after_ms` hint.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            DeliveryError::Rejected { .. } => None,
            DeliveryError::Unavailable { .. } => Some(5000),
        }
    }
}

/// An agent backend.
pub trait AgentBackend: Send + Sync + Debug {
    /// Hand a request to the backend; `Ok` once it accepted it.
    fn deliver<'a>(&'a self, req: &'a BackendRequest) -> BoxFuture<'a, Result<(), DeliveryError>>;

    /// Called after the client was acked for an accepted request (the demo
    /// agent starts its run here, so the ack always precedes the run's events).
    fn after_ack(&self, _req: BackendRequest) {}
}

type Outcome = Result<(), DeliveryError>;

#[derive(Debug)]
enum Seen {
    InFlight(watch::Sender<Option<Outcome>>),
    Accepted,
}

#[derive(Debug, Default)]
struct Dedupe {
    map: HashMap<(String, String), (Seen, Instant)>,
    order: VecDeque<((String, String), Instant)>,
}

/// Most message ids remembered for deduplication.
const MAX_REMEMBERED: usize = 200_000;

impl Dedupe {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((key, at)) = self.order.front() {
            if now.saturating_duration_since(*at) <= window && self.order.len() <= MAX_REMEMBERED {
                break;
            }
            // Only forget the entry this order slot was for (not a later re-insert),
            // and never an in-flight one.
            if let Some((Seen::Accepted, t)) = self.map.get(key)
                && t == at
            {
                self.map.remove(key);
            }
            self.order.pop_front();
        }
    }
}

/// The inbound dispatcher of one server.
#[derive(Debug)]
pub struct Inbound {
    backend: Arc<dyn AgentBackend>,
    broker: Arc<dyn Broker>,
    seen: Mutex<Dedupe>,
    window: Duration,
    tasks: Tasks,
}

/// How often a node polls a message another node is forwarding.
const FOREIGN_POLL: Duration = Duration::from_millis(100);
/// Longest a node waits for another node's forwarding before it nacks.
const FOREIGN_WAIT: Duration = Duration::from_secs(30);

impl Inbound {
    /// A dispatcher over `backend`, deduplicating message ids for `window`
    /// (on this node by itself, across nodes through `broker`), running
    /// deliveries as tracked `tasks`.
    pub(crate) fn new(
        backend: Arc<dyn AgentBackend>,
        broker: Arc<dyn Broker>,
        window: Duration,
        tasks: Tasks,
    ) -> Self {
        Self {
            backend,
            broker,
            seen: Mutex::new(Dedupe::default()),
            window,
            tasks,
        }
    }

    /// Claim the message across nodes and forward it when this node won the
    /// claim; when another node forwards it, wait for that outcome. Returns
    /// the outcome and whether this node forwarded it.
    async fn forward_once(&self, req: &BackendRequest, stream: &str, id: &str) -> (Outcome, bool) {
        let deadline = tokio::time::Instant::now() + FOREIGN_WAIT;
        loop {
            match self.broker.claim_message(stream, id, self.window).await {
                Ok(MessageClaim::New) => {
                    let outcome = self.backend.deliver(req).await;
                    self.broker
                        .settle_message(stream, id, outcome.is_ok(), self.window)
                        .await;
                    return (outcome, true);
                }
                Ok(MessageClaim::Accepted) => return (Ok(()), false),
                Ok(MessageClaim::InFlight) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(FOREIGN_POLL).await;
                }
                Ok(MessageClaim::InFlight) => {
                    return (
                        Err(DeliveryError::Unavailable {
                            detail: "another node is still forwarding this message".to_owned(),
                        }),
                        false,
                    );
                }
                Err(e) => {
                    return (
                        Err(DeliveryError::Unavailable {
                            detail: e.to_string(),
                        }),
                        false,
                    );
                }
            }
        }
    }

    /// Forward a user message (at most once per id and window) and answer the
    /// connection with `ack` or `nack`.
    pub(crate) fn submit_message(self: &Arc<Self>, conn: Arc<ConnShared>, msg: MessageOut) {
        let key = (msg.user_id.clone(), msg.message_id.clone());
        let id = msg.message_id.clone();
        let now = crate::clock::now();
        let tx = {
            let mut seen = self.seen.lock();
            seen.expire(now, self.window);
            match seen.map.get(&key) {
                Some((Seen::Accepted, _)) => {
                    metrics::counter!(telemetry::MESSAGES, "outcome" => "duplicate").increment(1);
                    reply(&conn, &id, &Ok(()));
                    return;
                }
                Some((Seen::InFlight(tx), _)) => {
                    metrics::counter!(telemetry::MESSAGES, "outcome" => "duplicate").increment(1);
                    let mut rx = tx.subscribe();
                    self.tasks.spawn(async move {
                        let outcome = rx
                            .wait_for(Option::is_some)
                            .await
                            .ok()
                            .and_then(|o| o.clone());
                        if let Some(outcome) = outcome {
                            reply(&conn, &id, &outcome);
                        }
                    });
                    return;
                }
                None => {
                    let (tx, _) = watch::channel(None);
                    seen.map
                        .insert(key.clone(), (Seen::InFlight(tx.clone()), now));
                    seen.order.push_back((key.clone(), now));
                    tx
                }
            }
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let stream = user_stream(&msg.user_id);
            let req = BackendRequest::UserMessage(msg);
            let (outcome, forwarded) = this.forward_once(&req, &stream, &id).await;
            {
                let mut seen = this.seen.lock();
                match &outcome {
                    Ok(()) => {
                        let at = crate::clock::now();
                        seen.map.insert(key.clone(), (Seen::Accepted, at));
                        seen.order.push_back((key, at));
                    }
                    Err(_) => {
                        seen.map.remove(&key);
                    }
                }
            }
            tx.send_replace(Some(outcome.clone()));
            let label = match (&outcome, forwarded) {
                (Ok(()), true) => "accepted",
                (Ok(()), false) => "duplicate",
                (Err(_), _) => "nack",
            };
            metrics::counter!(telemetry::MESSAGES, "outcome" => label).increment(1);
            reply(&conn, &id, &outcome);
            if outcome.is_ok() && forwarded {
                this.backend.after_ack(req);
            }
        });
    }

    /// Forward a cancel (the caller checked that the run is open and the
    /// user's). A failure is answered with an `error` frame.
    pub(crate) fn submit_cancel(self: &Arc<Self>, conn: Arc<ConnShared>, cancel: CancelOut) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let req = BackendRequest::Cancel(cancel);
            match this.backend.deliver(&req).await {
                Ok(()) => this.backend.after_ack(req),
                Err(e) => {
                    let frame = ServerFrame::Error {
                        code: e.code(),
                        message: &e.to_string(),
                    };
                    let _ = conn.send(OutFrame::from(frame.to_json()));
                }
            }
        });
    }
}

fn reply(conn: &ConnShared, id: &str, outcome: &Outcome) {
    let frame = match outcome {
        Ok(()) => ServerFrame::Ack {
            id,
            status: "accepted",
        }
        .to_json(),
        Err(e) => ServerFrame::Nack {
            id,
            error: e.code(),
            message: Some(&e.to_string()),
            retry_after_ms: e.retry_after_ms(),
        }
        .to_json(),
    };
    // Refused if the connection is gone: the client resends the same id on
    // its next connection and is acked from the dedupe record.
    let _ = conn.send(OutFrame::from(frame));
}
