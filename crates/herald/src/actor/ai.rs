//! The actor's side of `GET /ai`, the AI SDK's `WebSocketChatTransport`
//! protocol: what a `send`, `resume` or `abort` frame does.
//!
//! The socket joins its user's stream like a `/ws` connection (the same
//! hub, catch-up merge, bounds and close rules); its write half shows that
//! stream through a [`herald_core::aisdk::View`], which turns the events of
//! the runs the socket follows into numbered UI message chunks.
//!
//! - `send` opens a run for the chat (one active response per user and
//!   chat, across nodes: a node-local set and the broker's message claim
//!   serialize the check, the user's open runs answer it), follows it,
//!   publishes its `agent_started`, and hands the turn to the agent backend
//!   (`chat_request`).
//! - `resume` finds the chat's open run, follows it from its history, and
//!   answers `no-active` when there is none.
//! - `abort` stops following; a `send`'s abort stops the run at once, a
//!   `resume`'s only if the socket does not resume that chat within
//!   `ai_abort_grace` (`useChat` aborts the resume it replaces).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald_core::aisdk::{self, FollowError, Request, Response};
use herald_core::{CloseReason, Initiator};
use serde_json::json;

use super::Actor;
use crate::agent::{CancelOut, ChatOut};
use crate::auth::AuthError;
use crate::broker::{BrokerError, MessageClaim, NewEvent, RunRef, user_stream};
use crate::{clock, telemetry};

/// Seqs of history a resume reads back for a response that just completed.
const REPLAY_PAGE: usize = 512;

/// How long a `send` holds the claim that serializes its chat's check.
const START_CLAIM: Duration = Duration::from_secs(10);

/// What an `/ai` socket remembers between frames.
#[derive(Debug, Default)]
pub(super) struct AiSession {
    /// The chat of each request the socket follows.
    chats: HashMap<String, String>,
    /// Runs to stop when their grace ends, unless their chat is resumed
    /// first on this socket.
    cancels: Vec<PendingCancel>,
}

#[derive(Debug)]
struct PendingCancel {
    chat: String,
    run_id: String,
    at: Instant,
}

/// The `send` of a chat that has an active response (the transport's own
/// server outline answers the same).
const ACTIVE: &str = "A response is already active for this chat.";
/// The broker could not be reached.
const UNAVAILABLE: &str = "The chat is unavailable right now; try again.";

impl Actor {
    fn ai(&mut self) -> Option<&mut AiSession> {
        match &mut self.mode {
            super::Mode::Ai(session) => Some(session),
            _ => None,
        }
    }

    /// Before the first frame: a socket that brought its token on the
    /// upgrade joins its user's stream at once.
    pub(super) async fn open_ai(&mut self) {
        if self.ai().is_none() {
            return;
        }
        if let Some(token) = self.header_token.take() {
            self.ai_join(&token).await;
        }
    }

    /// Join the user's stream, live from its current position (no welcome:
    /// the transport expects none).
    async fn ai_join(&mut self, token: &str) -> bool {
        let Some((claims, pos)) = self.join_stream(token).await else {
            return false;
        };
        self.conn.set_epoch(&pos.epoch);
        let plan = herald_core::catchup::Plan::Live {
            after: pos.last_seq,
        };
        let now = clock::now();
        if self
            .conn
            .with_core(|c| c.authenticate_silently(now, plan))
            .is_err()
        {
            return false;
        }
        self.slot.authenticated();
        self.span.record("user_id", claims.sub.as_str());
        self.set_expiry(self.app.verifier().expires_at(&claims));
        tracing::debug!("ai socket joined");
        true
    }

    /// One text frame of an `/ai` socket. A frame the protocol refuses
    /// closes the socket with 1008, as the transport's server outline does.
    pub(super) async fn on_ai_text(&mut self, text: &str) {
        let request = match aisdk::parse_request(text) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "invalid ai frame");
                self.close(
                    CloseReason::PolicyViolation,
                    Initiator::Client,
                    "invalid frame",
                );
                return;
            }
        };
        let frame_token = match &request {
            Request::Send(s) => s.headers.get("authorization"),
            Request::Resume(r) => r.headers.get("authorization"),
            Request::Abort { .. } => None,
        }
        .map(|v| {
            let v = v.trim();
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim()
                .to_owned()
        });
        if self.conn.user().is_none() {
            let Some(token) = self.header_token.take().or(frame_token) else {
                self.close(
                    CloseReason::Unauthorized,
                    Initiator::Client,
                    "missing token",
                );
                return;
            };
            if !self.ai_join(&token).await {
                return;
            }
        } else if let Some(token) = frame_token
            && let Err(e) = self.ai_refresh(&token)
        {
            let why = format!("token refused: {e}");
            self.ai_respond(Response::Error {
                request_id: request.request_id(),
                error_text: &why,
            });
            return;
        }
        match request {
            Request::Send(s) => self.ai_send(s).await,
            Request::Resume(r) => self.ai_resume(r).await,
            Request::Abort { request_id } => self.ai_abort(&request_id),
        }
    }

    /// A newer token in a frame: for the same user it moves the expiry.
    fn ai_refresh(&mut self, token: &str) -> Result<(), AuthError> {
        let claims = self.app.verifier().verify(token)?;
        if Some(claims.sub.as_str()) != self.conn.user() {
            return Err(AuthError::OtherSubject);
        }
        self.set_expiry(self.app.verifier().expires_at(&claims));
        Ok(())
    }

    /// Queue a frame answering a request (refused once the socket closes).
    fn ai_respond(&self, response: Response<'_>) {
        self.conn.with_view(|view, _| view.respond(response));
    }

    /// A new turn: open its run (unless the chat has an active one),
    /// follow it, and hand it to the backend.
    async fn ai_send(&mut self, send: aisdk::Send) {
        let Some(user) = self.conn.user().map(str::to_owned) else {
            return;
        };
        let request_id = send.request_id.clone();
        let refuse = |this: &Self, reason: &'static str, text: &str| {
            metrics::counter!(telemetry::CHAT_REFUSED, "reason" => reason).increment(1);
            this.ai_respond(Response::Error {
                request_id: &request_id,
                error_text: text,
            });
        };
        if self
            .conn
            .with_view(|view, _| view.follows_request(&request_id))
            != Some(false)
        {
            refuse(self, "in_use", "This request id is in use on this socket.");
            return;
        }
        let stream = user_stream(&user);
        // On this node, one send per chat at a time; across nodes, the claim.
        let Some(_starting) = self.app.start_chat(&user, &send.id) else {
            refuse(self, "active", ACTIVE);
            return;
        };
        let claim = format!("ai-chat\t{}", send.id);
        let broker = self.app.broker().clone();
        match broker.claim_message(&stream, &claim, START_CLAIM).await {
            Ok(MessageClaim::New) => {}
            Ok(_) => {
                refuse(self, "active", ACTIVE);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker failed on an ai send");
                refuse(self, "unavailable", UNAVAILABLE);
                return;
            }
        }
        let opened = self.open_run(&send, &stream).await;
        // Released whatever happened: the open run now answers the check.
        broker
            .settle_message(&stream, &claim, false, START_CLAIM)
            .await;
        let run_id = match opened {
            Ok(run_id) => run_id,
            Err(StartError::Active) => return refuse(self, "active", ACTIVE),
            Err(StartError::Broker(e)) => {
                tracing::warn!(error = %e, "broker failed on an ai send");
                return refuse(self, "unavailable", UNAVAILABLE);
            }
            Err(StartError::Follow(e)) => return refuse(self, "in_use", &e.to_string()),
            Err(StartError::Closed) => return,
        };
        self.remember_chat(&request_id, &send.id);
        let chat = ChatOut {
            user_id: user,
            chat_id: send.id,
            run_id,
            trigger: send.trigger.as_str(),
            message_id: send.message_id,
            messages: send.messages,
            body: send.body,
            metadata: send.metadata,
            conn_id: self.conn.id_str.clone(),
            received_at: clock::now_rfc3339(),
        };
        self.app.inbound().submit_chat(chat);
    }

    /// Under the chat's claim: refuse if it has an open run, else follow a
    /// new run and publish its `agent_started`.
    async fn open_run(&mut self, send: &aisdk::Send, stream: &str) -> Result<String, StartError> {
        let broker = self.app.broker().clone();
        let runs = broker.open_runs(stream).await?;
        if runs
            .iter()
            .any(|r| r.thread_id.as_deref() == Some(send.id.as_str()))
        {
            return Err(StartError::Active);
        }
        let run_id = format!("run_{:024x}", rand::random::<u128>() >> 32);
        // Followed before its first event is published, so every event of
        // the run passes this socket's view.
        match self
            .conn
            .with_view(|view, _| view.follow(&send.request_id, &run_id))
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(StartError::Follow(e)),
            None => return Err(StartError::Closed),
        }
        let started = NewEvent::new(
            herald_core::stream::runs::STARTED.to_owned(),
            Some(send.id.clone()),
            Some(run_id.clone()),
            json!({"source": "ai_sdk", "trigger": send.trigger.as_str()}),
            clock::now_rfc3339(),
        );
        if let Err(e) = broker.publish(stream, vec![started]).await {
            self.conn.with_view(|view, _| view.abort(&send.request_id));
            return Err(StartError::Broker(e));
        }
        Ok(run_id)
    }

    /// Replay the chat's active response, then follow it live.
    async fn ai_resume(&mut self, resume: aisdk::Resume) {
        let (Some(stream), Some(epoch)) = (
            self.conn.stream().map(str::to_owned),
            self.conn.epoch().map(str::to_owned),
        ) else {
            return;
        };
        let request_id = resume.request_id.as_str();
        if let Some(ai) = self.ai() {
            // Resuming the chat keeps its answer going.
            ai.cancels.retain(|c| c.chat != resume.id);
        }
        let broker = self.app.broker().clone();
        let found = match broker.open_runs(&stream).await {
            Ok(runs) => runs
                .into_iter()
                .find(|r| r.thread_id.as_deref() == Some(resume.id.as_str())),
            Err(e) => {
                tracing::warn!(error = %e, "broker failed on an ai resume");
                return self.ai_respond(Response::Error {
                    request_id,
                    error_text: UNAVAILABLE,
                });
            }
        };
        let Some(RunRef { run_id, .. }) = found else {
            return self.ai_replay_ended(&stream, &epoch, &resume).await;
        };
        let last = match broker.position(&stream).await {
            Ok(pos) if pos.epoch == epoch => pos.last_seq,
            Ok(_) => {
                // The stream restarted; the hub closes this socket.
                return self.ai_respond(Response::NoActive { request_id });
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker failed on an ai resume");
                return self.ai_respond(Response::Error {
                    request_id,
                    error_text: UNAVAILABLE,
                });
            }
        };
        // The history read covers the run up to `after`; its later events
        // are held by the view until the history is in.
        let followed = self.conn.with_view(|view, sent| {
            let after = last.max(sent);
            view.follow_from(request_id, &run_id, after).map(|()| after)
        });
        let after = match followed {
            Some(Ok(after)) => after,
            Some(Err(e)) => {
                return self.ai_respond(Response::Error {
                    request_id,
                    error_text: &e.to_string(),
                });
            }
            None => return,
        };
        self.remember_chat(request_id, &resume.id);
        match broker.open_run_events(&stream, &epoch, after).await {
            Ok(events) => {
                metrics::counter!(telemetry::EVENTS_REPLAYED).increment(events.len() as u64);
                self.conn.with_view(|view, _| {
                    let frames = events
                        .iter()
                        .filter_map(|e| std::str::from_utf8(&e.json).ok());
                    view.replayed(request_id, frames)
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "history read failed on an ai resume");
                self.conn.with_view(|view, _| {
                    view.abort(request_id);
                    view.respond(Response::Error {
                        request_id,
                        error_text: UNAVAILABLE,
                    });
                });
            }
        }
    }

    /// Remember the chat of a followed request (for the abort grace),
    /// forgetting those of requests that ended once there are many.
    fn remember_chat(&mut self, request_id: &str, chat: &str) {
        let conn = self.conn.clone();
        let Some(ai) = self.ai() else { return };
        if ai.chats.len() >= aisdk::MAX_FOLLOWS {
            ai.chats.retain(|request, _| {
                conn.with_view(|view, _| view.follows_request(request)) == Some(true)
            });
        }
        ai.chats.insert(request_id.to_owned(), chat.to_owned());
    }

    /// A resume of a chat with no active response: its response that
    /// completed within `ai_replay_window` (found whole in the newest page
    /// of history), replayed to its end; else `no-active`.
    async fn ai_replay_ended(&mut self, stream: &str, epoch: &str, resume: &aisdk::Resume) {
        let request_id = resume.request_id.as_str();
        let window = self.app.config().ai.replay_window;
        let broker = self.app.broker().clone();
        let page = async {
            if window.is_zero() {
                return None;
            }
            let pos = broker.position(stream).await.ok()?;
            let after = pos
                .last_seq
                .saturating_sub(REPLAY_PAGE as u64)
                .max(pos.first_seq.saturating_sub(1));
            broker
                .history(stream, epoch, after, pos.last_seq, REPLAY_PAGE)
                .await
                .ok()
        };
        let Some(page) = page.await else {
            return self.ai_respond(Response::NoActive { request_id });
        };
        let frames: Vec<&str> = page
            .iter()
            .filter_map(|e| std::str::from_utf8(&e.json).ok())
            .collect();
        let now = std::time::SystemTime::now();
        let recent = |ts: &str| {
            humantime::parse_rfc3339_weak(ts)
                .is_ok_and(|at| now.duration_since(at).unwrap_or_default() <= window)
        };
        let Some((run_id, mine)) = aisdk::ended_run(&frames, &resume.id, recent) else {
            return self.ai_respond(Response::NoActive { request_id });
        };
        // Followed from beyond every seq: the history is the whole of it.
        self.conn.with_view(|view, _| {
            if view.follow_from(request_id, &run_id, u64::MAX).is_ok() {
                view.replayed(request_id, mine);
            }
        });
    }

    /// Stop following a request; stop its run as the docs say.
    fn ai_abort(&mut self, request_id: &str) {
        let Some(Some(unfollowed)) = self.conn.with_view(|view, _| view.abort(request_id)) else {
            return;
        };
        let grace = self.app.config().ai.abort_grace;
        let Some(ai) = self.ai() else { return };
        let chat = ai.chats.remove(request_id).unwrap_or_default();
        if unfollowed.resumed {
            ai.cancels.push(PendingCancel {
                chat,
                run_id: unfollowed.run_id,
                at: clock::now() + grace,
            });
        } else {
            self.cancel_run(unfollowed.run_id);
        }
    }

    /// Hand a cancel of `run_id` to the agent backend.
    fn cancel_run(&self, run_id: String) {
        let Some(user) = self.conn.user() else { return };
        let cancel = CancelOut {
            stream: None,
            user_id: user.to_owned(),
            run_id,
            conn_id: self.conn.id_str.clone(),
            received_at: clock::now_rfc3339(),
        };
        self.app.inbound().submit_cancel(self.conn.clone(), cancel);
    }

    /// When the next pending cancel is due.
    pub(super) fn ai_deadline(&self) -> Option<Instant> {
        match &self.mode {
            super::Mode::Ai(ai) => ai.cancels.iter().map(|c| c.at).min(),
            _ => None,
        }
    }

    /// Stop the runs whose grace is over at `now` (all of them at `None`:
    /// the socket is gone and cannot resume them).
    pub(super) fn ai_cancels_due(&mut self, now: Option<Instant>) {
        let Some(ai) = self.ai() else { return };
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut ai.cancels)
            .into_iter()
            .partition(|c| now.is_none_or(|now| c.at <= now));
        ai.cancels = kept;
        for c in due {
            self.cancel_run(c.run_id);
        }
    }
}

/// Why a `send` opened no run.
enum StartError {
    /// The chat has an open run.
    Active,
    /// The broker failed.
    Broker(BrokerError),
    /// The socket cannot follow it.
    Follow(FollowError),
    /// The socket is closing.
    Closed,
}

impl From<BrokerError> for StartError {
    fn from(e: BrokerError) -> Self {
        StartError::Broker(e)
    }
}
