//! The agent side: user messages and cancels travelling from clients to the
//! agent backend — a signed webhook ([`webhook`]) or the built-in demo agent
//! ([`demo`]).
//!
//! A `user_message` is forwarded at most once per (user, `id`) within the
//! dedupe window: a repeat while the first is in flight waits for its outcome,
//! a repeat after it was accepted is acked at once, and a repeat after it
//! failed is forwarded again. Ids are remembered per user (at most
//! [`MAX_REMEMBERED_PER_USER`] accepted ids each, one slot per id), so one
//! busy user cannot push another's ids out of the window. The ack (or nack)
//! goes to the connection that sent the frame; delivery runs in its own task
//! so a slow backend never stalls the connection. Requests in flight are
//! bounded per node and per user ([`InFlightLimits`]); beyond the bounds a
//! message is answered `nack backend_busy` at once.
//!
//! Clients never see why the backend failed (the detail may name the
//! webhook's URL or a Redis error): they get a fixed message per error code,
//! and the detail goes to the log.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::protocol::ServerFrame;
use herald_core::stream::turns;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::BoxFuture;
use crate::broker::{Broker, MessageClaim, NewEvent, user_stream};
pub use crate::config::InFlightLimits;
use crate::connection::ConnShared;
use crate::tasks::Tasks;
use crate::telemetry;
use crate::wire::OutFrame;

pub(crate) mod demo;
pub mod webhook;

/// A chat message for the agent backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageOut {
    /// The shared stream it was written to (the sender may write to it);
    /// absent: the sender's own stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
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
    /// The shared stream the run is in (the requester may write to it);
    /// absent: the requester's own stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The requester (`sub`), who owns the run (in a shared stream: a
    /// member who may write to it).
    pub user_id: String,
    /// The run to stop.
    pub run_id: String,
    /// The connection it arrived on.
    pub conn_id: String,
    /// When Herald received it, RFC 3339.
    pub received_at: String,
}

/// A turn of an AI SDK chat (a `send` on `GET /ai`): Herald opened run
/// `run_id` in the user's stream (its `agent_started` is published) and
/// the backend answers by publishing that run's events with `thread_id` =
/// `chat_id`, or by streaming its UI message chunks to the ingest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatOut {
    /// The sender (`sub`).
    pub user_id: String,
    /// The chat (`id` of the frame); the run's thread.
    pub chat_id: String,
    /// The run Herald opened for the answer.
    pub run_id: String,
    /// `submit-message` or `regenerate-message`.
    pub trigger: &'static str,
    /// The message to regenerate, if any (`messageId` of the frame).
    pub message_id: Option<String>,
    /// The chat's UI messages, as the client sent them.
    pub messages: Vec<Value>,
    /// Application data (`body` of the frame).
    pub body: Value,
    /// Request metadata (`metadata` of the frame; `null` when absent).
    pub metadata: Value,
    /// The connection it arrived on.
    pub conn_id: String,
    /// When Herald received it, RFC 3339.
    pub received_at: String,
}

impl ChatOut {
    /// The text of the last user message (its text parts joined).
    pub fn last_user_text(&self) -> String {
        let Some(last) = self
            .messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        else {
            return String::new();
        };
        last.get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What is sent to the backend; the JSON has a `type` of `user_message`,
/// `chat_request` or `cancel`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackendRequest {
    /// A chat message.
    UserMessage(MessageOut),
    /// A turn of an AI SDK chat.
    ChatRequest(ChatOut),
    /// A cancel.
    Cancel(CancelOut),
    /// May this user read (or write) this shared stream? (`subscribe_proxy`)
    SubscribeRequest(SubscribeOut),
}

/// A subscribe the user's token does not grant, asked of the backend
/// (`subscribe_proxy`): it answers 2xx `{"allow": bool, "write": bool}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscribeOut {
    /// The user (`sub`).
    pub user_id: String,
    /// The shared stream.
    pub stream: String,
    /// The connection it arrived on.
    pub conn_id: String,
    /// When Herald received it, RFC 3339.
    pub received_at: String,
}

/// The backend's answer to a [`SubscribeOut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
struct SubscribeAnswer {
    allow: bool,
    #[serde(default)]
    write: bool,
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
    /// Too many requests are in flight (on this node, or for this user).
    #[error("agent backend busy: too many requests in flight")]
    Busy,
    /// The broker could not claim or store the message (it is
    /// unavailable): it was not forwarded.
    #[error("the message was not stored: {detail}")]
    NotStored {
        /// The broker's error.
        detail: String,
    },
}

impl DeliveryError {
    /// The `nack.error` code.
    pub fn code(&self) -> &'static str {
        match self {
            DeliveryError::Rejected { .. } => "backend_rejected",
            DeliveryError::Unavailable { .. } => "backend_unavailable",
            DeliveryError::Busy => "backend_busy",
            DeliveryError::NotStored { .. } => "broker_unavailable",
        }
    }

    /// What the client is told (`nack.message`): fixed per code, without
    /// the detail, which may carry the backend's URL or a Redis error.
    pub fn client_message(&self) -> &'static str {
        match self {
            DeliveryError::Rejected { .. } => "the agent backend rejected the request",
            DeliveryError::Unavailable { .. } => "the agent backend is unavailable; retry later",
            DeliveryError::Busy => {
                "too many requests are waiting for the agent backend; retry later"
            }
            DeliveryError::NotStored { .. } => "the message could not be stored; retry later",
        }
    }

    /// The `nack.retry_after_ms` hint.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            DeliveryError::Rejected { .. } => None,
            DeliveryError::Unavailable { .. } => Some(5000),
            DeliveryError::Busy => Some(1000),
            DeliveryError::NotStored { .. } => Some(1000),
        }
    }
}

/// An agent backend.
pub trait AgentBackend: Send + Sync + Debug {
    /// Hand a request to the backend; `Ok` once it accepted it.
    fn deliver<'a>(&'a self, req: &'a BackendRequest) -> BoxFuture<'a, Result<(), DeliveryError>>;

    /// Hand a request to the backend and return its answer's body (a
    /// `subscribe_request`); only the webhook answers.
    fn ask<'a>(
        &'a self,
        _req: &'a BackendRequest,
    ) -> BoxFuture<'a, Result<Vec<u8>, DeliveryError>> {
        Box::pin(async { Err(DeliveryError::Rejected { status: 501 }) })
    }

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

/// The message ids one user sent within the window.
#[derive(Debug, Default)]
struct UserSeen {
    map: HashMap<String, (Seen, Instant)>,
    /// Accepted ids, oldest first: one slot per id (in-flight ids are bounded
    /// by the in-flight limits instead).
    accepted: VecDeque<(String, Instant)>,
}

/// Remembered message ids, per user.
#[derive(Debug, Default)]
struct Dedupe {
    users: HashMap<String, UserSeen>,
}

/// Most accepted message ids remembered per user within the window; older
/// ones are forgotten first (a retry of one would be forwarded again).
pub const MAX_REMEMBERED_PER_USER: usize = 1024;

impl UserSeen {
    /// Forget accepted ids older than `window` or beyond the per-user bound.
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((id, at)) = self.accepted.front() {
            if now.saturating_duration_since(*at) <= window
                && self.accepted.len() <= MAX_REMEMBERED_PER_USER
            {
                break;
            }
            if let Some((Seen::Accepted, t)) = self.map.get(id)
                && t == at
            {
                self.map.remove(id);
            }
            self.accepted.pop_front();
        }
    }

    fn accept(&mut self, id: String, at: Instant) {
        self.map.insert(id.clone(), (Seen::Accepted, at));
        self.accepted.push_back((id, at));
    }
}

impl Dedupe {
    /// The user's record, expired first.
    fn user(&mut self, user: &str, now: Instant, window: Duration) -> &mut UserSeen {
        let seen = self.users.entry(user.to_owned()).or_default();
        seen.expire(now, window);
        seen
    }

    /// Drop what every user's window no longer covers, and users with
    /// nothing left.
    fn sweep(&mut self, now: Instant, window: Duration) {
        self.users.retain(|_, seen| {
            seen.expire(now, window);
            !seen.map.is_empty()
        });
    }

    /// Ids remembered in total (accepted and in flight).
    fn len(&self) -> usize {
        self.users.values().map(|s| s.map.len()).sum()
    }
}

/// Requests in flight to the backend, in total and per user.
#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    per_user: HashMap<String, usize>,
}

/// One request's place in [`InFlight`], given back on drop.
#[derive(Debug)]
struct Permit {
    inbound: Arc<Inbound>,
    user: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut f = self.inbound.in_flight.lock();
        f.total = f.total.saturating_sub(1);
        if let Some(n) = f.per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                f.per_user.remove(&self.user);
            }
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
    /// How long a claim lasts unless renewed (renewed every third of it).
    lease: Duration,
    limits: InFlightLimits,
    in_flight: Mutex<InFlight>,
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
        lease: Duration,
        limits: InFlightLimits,
        tasks: Tasks,
    ) -> Self {
        Self {
            backend,
            broker,
            seen: Mutex::new(Dedupe::default()),
            window,
            lease,
            limits,
            in_flight: Mutex::new(InFlight::default()),
            tasks,
        }
    }

    /// A place for one request of `user`, or `None` when the node's or the
    /// user's bound is reached.
    fn permit(self: &Arc<Self>, user: &str) -> Option<Permit> {
        let mut f = self.in_flight.lock();
        let mine = f.per_user.get(user).copied().unwrap_or(0);
        if f.total >= self.limits.total || mine >= self.limits.per_user {
            return None;
        }
        f.total += 1;
        *f.per_user.entry(user.to_owned()).or_default() += 1;
        Some(Permit {
            inbound: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Forget message ids the window no longer covers (called by the
    /// server's once-a-second sweep), so users who went quiet cost nothing.
    pub(crate) fn sweep(&self, now: Instant) {
        self.seen.lock().sweep(now, self.window);
    }

    /// Message ids remembered in total.
    pub(crate) fn remembered(&self) -> usize {
        self.seen.lock().len()
    }

    /// Backend requests in flight on this node.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.lock().total
    }

    /// Claim the message across nodes and forward it when this node won the
    /// claim; when another node forwards it, wait for that outcome. Returns
    /// the outcome and whether this node forwarded it. The claim is a lease,
    /// renewed while the forward runs: if this node dies mid-forward, the
    /// claim lapses within the lease and a retry elsewhere forwards again
    /// (the backend may then see the message twice: it deduplicates by id).
    ///
    /// The node that claims it first stores `question` in the stream (once
    /// per id: its idempotency key is the message's), so every reader sees
    /// the turn before any answer to it; a message that could not be stored
    /// is not forwarded.
    async fn forward_once(
        &self,
        req: &BackendRequest,
        stream: &str,
        id: &str,
        question: NewEvent,
    ) -> (Outcome, bool) {
        let deadline = tokio::time::Instant::now() + FOREIGN_WAIT;
        let mut question = Some(question);
        loop {
            match self.broker.claim_message(stream, id, self.lease).await {
                Ok(MessageClaim::New) => {
                    if let Some(q) = question.take()
                        && let Err(e) = self.broker.publish(stream, vec![q]).await
                    {
                        self.broker
                            .settle_message(stream, id, false, self.window)
                            .await;
                        let detail = e.to_string();
                        return (Err(DeliveryError::NotStored { detail }), true);
                    }
                    let deliver = self.backend.deliver(req);
                    tokio::pin!(deliver);
                    let every = self.lease / 3;
                    let mut renew =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    let outcome = loop {
                        tokio::select! {
                            outcome = &mut deliver => break outcome,
                            _ = renew.tick() => {
                                if let Err(e) = self.broker.renew_claim(stream, id, self.lease).await {
                                    tracing::warn!(error = %e, "could not renew a message claim");
                                }
                            }
                        }
                    };
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
                    let detail = e.to_string();
                    return (Err(DeliveryError::NotStored { detail }), false);
                }
            }
        }
    }

    /// Forward a user message (at most once per id and window) and answer the
    /// connection with `ack` or `nack`.
    pub(crate) fn submit_message(self: &Arc<Self>, conn: Arc<ConnShared>, msg: MessageOut) {
        let id = msg.message_id.clone();
        let now = crate::clock::now();
        let (tx, permit) = {
            let mut seen = self.seen.lock();
            let user = seen.user(&msg.user_id, now, self.window);
            match user.map.get(&id) {
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
                    let Some(permit) = self.permit(&msg.user_id) else {
                        metrics::counter!(telemetry::MESSAGES, "outcome" => "busy").increment(1);
                        reply(&conn, &id, &Err(DeliveryError::Busy));
                        return;
                    };
                    let (tx, _) = watch::channel(None);
                    user.map
                        .insert(id.clone(), (Seen::InFlight(tx.clone()), now));
                    (tx, permit)
                }
            }
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let user_id = msg.user_id.clone();
            let stream = msg.stream.clone().unwrap_or_else(|| user_stream(&user_id));
            let question = question_event(&msg);
            let req = BackendRequest::UserMessage(msg);
            let (outcome, forwarded) = this.forward_once(&req, &stream, &id, question).await;
            drop(permit);
            {
                let mut seen = this.seen.lock();
                let at = crate::clock::now();
                let user = seen.user(&user_id, at, this.window);
                match &outcome {
                    Ok(()) => user.accept(id.clone(), at),
                    Err(_) => {
                        user.map.remove(&id);
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
            if let Err(e) = &outcome {
                tracing::warn!(message_id = %id, error = %e, "user message not forwarded");
            }
            reply(&conn, &id, &outcome);
            if outcome.is_ok() && forwarded {
                this.backend.after_ack(req);
            }
        });
    }

    /// Ask the backend whether `user` may read shared stream `stream` (and
    /// write to it). An answer that is not `{"allow": bool, …}` is a
    /// refusal (logged); no answer (after the retries) is an error.
    pub(crate) async fn ask_subscribe(
        &self,
        user: &str,
        stream: &str,
        conn_id: &str,
    ) -> Result<crate::auth::Access, DeliveryError> {
        let req = BackendRequest::SubscribeRequest(SubscribeOut {
            user_id: user.to_owned(),
            stream: stream.to_owned(),
            conn_id: conn_id.to_owned(),
            received_at: crate::clock::now_rfc3339(),
        });
        let body = match self.backend.ask(&req).await {
            Ok(body) => body,
            // A 4xx is the backend's no.
            Err(DeliveryError::Rejected { .. }) => return Ok(crate::auth::Access::None),
            Err(e) => return Err(e),
        };
        Ok(match serde_json::from_slice::<SubscribeAnswer>(&body) {
            Ok(SubscribeAnswer { allow: false, .. }) => crate::auth::Access::None,
            Ok(SubscribeAnswer { write: true, .. }) => crate::auth::Access::Write,
            Ok(_) => crate::auth::Access::Read,
            Err(e) => {
                tracing::warn!(error = %e, stream, "the backend's answer to a subscribe request is not {{\"allow\": bool}}; refused");
                crate::auth::Access::None
            }
        })
    }

    /// Forward a cancel (the caller checked that the run is open and the
    /// user's). A failure is answered with an `error` frame.
    pub(crate) fn submit_cancel(self: &Arc<Self>, conn: Arc<ConnShared>, cancel: CancelOut) {
        let Some(permit) = self.permit(&cancel.user_id) else {
            send_error(&conn, &DeliveryError::Busy);
            return;
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let req = BackendRequest::Cancel(cancel);
            let outcome = this.backend.deliver(&req).await;
            drop(permit);
            match outcome {
                Ok(()) => this.backend.after_ack(req),
                Err(e) => {
                    tracing::warn!(error = %e, "cancel not forwarded");
                    send_error(&conn, &e);
                }
            }
        });
    }

    /// Forward an AI SDK chat turn whose run is open (its `agent_started`
    /// published). If the backend does not take it, the run is closed with
    /// `agent_error {reason}` (the code: `backend_busy`, `backend_rejected`,
    /// `backend_unavailable`), so every follower sees it end.
    pub(crate) fn submit_chat(self: &Arc<Self>, chat: ChatOut) {
        let permit = self.permit(&chat.user_id);
        let this = self.clone();
        self.tasks.spawn(async move {
            let stream = user_stream(&chat.user_id);
            let (run_id, thread_id) = (chat.run_id.clone(), chat.chat_id.clone());
            let req = BackendRequest::ChatRequest(chat);
            let outcome = match permit {
                Some(permit) => {
                    let outcome = this.backend.deliver(&req).await;
                    drop(permit);
                    outcome
                }
                None => Err(DeliveryError::Busy),
            };
            let label = if outcome.is_ok() { "accepted" } else { "nack" };
            metrics::counter!(telemetry::CHAT_REQUESTS, "outcome" => label).increment(1);
            match outcome {
                Ok(()) => this.backend.after_ack(req),
                Err(e) => {
                    tracing::warn!(run_id = %run_id, error = %e, "chat request not forwarded");
                    let close = crate::broker::run_closed_event(&run_id, Some(thread_id), e.code());
                    if let Err(e) = this.broker.publish(&stream, vec![close]).await {
                        tracing::warn!(error = %e, "could not close the run of a refused chat request");
                    }
                }
            }
        });
    }
}

/// The `user_message` event of an accepted message: its id, text, data and
/// sender, in its thread, stored once per id.
fn question_event(msg: &MessageOut) -> NewEvent {
    let data = serde_json::json!({
        "id": msg.message_id,
        "text": msg.text,
        "data": msg.data,
        "user_id": msg.user_id,
    });
    let mut event = NewEvent::new(
        turns::USER_MESSAGE.to_owned(),
        Some(msg.thread_id.clone()),
        None,
        data,
        msg.received_at.clone(),
    );
    event.idempotency_key = Some(turns::message_key(&msg.message_id));
    event.in_stream(msg.stream.as_deref())
}

fn send_error(conn: &ConnShared, e: &DeliveryError) {
    let frame = ServerFrame::Error {
        code: e.code(),
        message: e.client_message(),
    };
    let _ = conn.send(OutFrame::from(frame.to_json()));
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
            message: Some(e.client_message()),
            retry_after_ms: e.retry_after_ms(),
        }
        .to_json(),
    };
    // Refused if the connection is gone: the client resends the same id on
    // its next connection and is acked from the dedupe record.
    let _ = conn.send(OutFrame::from(frame));
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(600);

    /// Issue 14, finding 11: one busy user no longer evicts another user's
    /// ids before the window ends (the old shared 200,000-slot queue did
    /// after 100,000 messages of anyone).
    #[test]
    fn a_busy_user_does_not_evict_another_users_ids() {
        let t0 = Instant::now();
        let mut d = Dedupe::default();
        d.user("quiet", t0, WINDOW).accept("m1".into(), t0);
        for i in 0..250_000 {
            let at = t0 + Duration::from_millis(i / 1000);
            d.user("busy", at, WINDOW).accept(format!("b{i}"), at);
        }
        let later = t0 + Duration::from_secs(300);
        assert!(
            matches!(
                d.user("quiet", later, WINDOW).map.get("m1"),
                Some((Seen::Accepted, _))
            ),
            "the quiet user's id is still remembered inside the window"
        );
        // The busy user keeps only its own bound, one slot per id.
        let busy = d.user("busy", later, WINDOW);
        assert_eq!(busy.map.len(), MAX_REMEMBERED_PER_USER);
        assert_eq!(busy.accepted.len(), MAX_REMEMBERED_PER_USER);
        assert!(busy.map.contains_key("b249999") && !busy.map.contains_key("b0"));
    }

    #[test]
    fn ids_expire_with_the_window_and_quiet_users_are_swept() {
        let t0 = Instant::now();
        let mut d = Dedupe::default();
        d.user("a", t0, WINDOW).accept("m1".into(), t0);
        d.user("b", t0, WINDOW)
            .accept("m1".into(), t0 + Duration::from_secs(200));
        d.sweep(t0 + WINDOW, WINDOW);
        assert_eq!(d.len(), 2, "nothing is older than the window yet");
        d.sweep(t0 + WINDOW + Duration::from_secs(1), WINDOW);
        assert_eq!(d.len(), 1);
        assert!(
            !d.users.contains_key("a"),
            "a user with nothing left is dropped"
        );
        d.sweep(t0 + WINDOW + Duration::from_secs(201), WINDOW);
        assert!(d.users.is_empty());
    }

    /// An id accepted again (after it was forgotten) is one slot, and the
    /// older slot of the same id does not forget the newer record.
    #[test]
    fn a_re_accepted_id_keeps_its_newer_record() {
        let t0 = Instant::now();
        let mut u = UserSeen::default();
        u.accept("m".into(), t0);
        u.accept("m".into(), t0 + Duration::from_secs(500));
        u.expire(t0 + WINDOW + Duration::from_secs(1), WINDOW);
        assert!(u.map.contains_key("m"));
        assert_eq!(u.accepted.len(), 1);
    }
}
