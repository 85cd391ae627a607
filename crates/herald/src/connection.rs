//! The shared half of a connection: what the rest of the server holds to send
//! to it or close it. The socket itself is owned by the actor ([`crate::actor`]).
//!
//! Every operation locks the connection's sans-IO [`Connection`] state machine
//! briefly, so the state check and the enqueue are one atomic step (the race
//! of the original system — check, then write — cannot happen), then wakes the
//! actor.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use herald_core::{CloseInfo, Connection, LifecycleConfig, Payload, SendRefused, State};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::telemetry;

/// An outbound text frame. Cloning shares the bytes, so a fan-out serializes
/// an event once for all connections.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// The JSON text.
    pub text: Utf8Bytes,
    /// When a live event was published (for the publish→write latency
    /// histogram); `None` for replies and replayed history.
    pub published: Option<Instant>,
}

impl OutFrame {
    /// A live event frame published now.
    pub fn live(text: String) -> Self {
        Self {
            published: Some(Instant::now()),
            ..Self::from(text)
        }
    }

    /// The same frame without a publish time (replayed from history).
    pub fn replayed(&self) -> Self {
        Self {
            text: self.text.clone(),
            published: None,
        }
    }
}

impl Payload for OutFrame {
    fn wire_len(&self) -> usize {
        self.text.len()
    }
}

impl From<String> for OutFrame {
    fn from(mut s: String) -> Self {
        // Serializers over-allocate; frames kept in history should not.
        s.shrink_to_fit();
        OutFrame {
            text: Utf8Bytes::from(s),
            published: None,
        }
    }
}

/// What a connection still has to replay after its welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Replay the stream's events with `after < seq <= until`, page by page.
    Replay {
        /// Last seq already sent (the client's resume point, then each page's end).
        after: u64,
        /// The stream's latest seq when the connection joined the fan-out set.
        until: u64,
    },
    /// Replay the open runs' events up to `until` (`replay_active_runs`).
    Runs {
        /// The stream's latest seq when the connection joined the fan-out set.
        until: u64,
    },
}

/// The typed result of a send: queued, or refused with the reason.
pub type SendOutcome = Result<(), SendRefused>;

/// The part of a connection shared between its actor, the registry and the API.
#[derive(Debug)]
pub struct ConnShared {
    /// Numeric connection id.
    pub id: u64,
    /// The id as shown on the wire and in logs.
    pub id_str: String,
    /// When the upgrade completed.
    pub opened_at: Instant,
    user: OnceLock<String>,
    core: Mutex<Connection<OutFrame>>,
    wake: Notify,
    acked_seq: AtomicU64,
    catch_up: Mutex<Option<CatchUp>>,
}

impl ConnShared {
    /// A new connection in `Handshaking`.
    pub fn new(id: u64, cfg: LifecycleConfig) -> Self {
        let now = Instant::now();
        Self {
            id,
            id_str: format!("{id:016x}"),
            opened_at: now,
            user: OnceLock::new(),
            core: Mutex::new(Connection::new(now, cfg)),
            wake: Notify::new(),
            acked_seq: AtomicU64::new(0),
            catch_up: Mutex::new(None),
        }
    }

    /// The authenticated user, once `hello` succeeded.
    pub fn user(&self) -> Option<&str> {
        self.user.get().map(String::as_str)
    }

    pub(crate) fn set_catch_up(&self, plan: Option<CatchUp>) {
        *self.catch_up.lock() = plan;
    }

    pub(crate) fn catch_up(&self) -> Option<CatchUp> {
        *self.catch_up.lock()
    }

    pub(crate) fn set_user(&self, user: &str) {
        let _ = self.user.set(user.to_owned());
    }

    /// Queue a frame for this connection (only `Ready` connections accept).
    pub fn send(&self, frame: OutFrame) -> SendOutcome {
        let outcome = self.core.lock().send(Instant::now(), frame);
        match outcome {
            Ok(()) => self.wake.notify_one(),
            Err(refused) => {
                telemetry::send_refused(refused);
                tracing::debug!(conn_id = %self.id_str, reason = refused.as_str(), "send refused");
                // A full queue just started a slow-consumer close: the actor must write it.
                if refused == SendRefused::QueueFull {
                    self.wake.notify_one();
                }
            }
        }
        outcome
    }

    /// Decide to close. Idempotent: returns `true` only for the call that decided.
    pub fn close(&self, info: CloseInfo) -> bool {
        let decided = self.core.lock().close(Instant::now(), info);
        if decided {
            self.wake.notify_one();
        }
        decided
    }

    /// Current lifecycle state.
    pub fn state(&self) -> State {
        self.core.lock().state()
    }

    /// Frames and bytes waiting in the outbound queue.
    pub fn queue_depth(&self) -> (usize, usize) {
        let core = self.core.lock();
        (core.queue_len(), core.queued_bytes())
    }

    /// Highest seq the client acknowledged.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq.load(Ordering::Relaxed)
    }

    pub(crate) fn record_ack(&self, seq: u64) {
        self.acked_seq.fetch_max(seq, Ordering::Relaxed);
    }

    /// Run `f` with the state machine locked (for the actor and the registry).
    pub(crate) fn with_core<R>(&self, f: impl FnOnce(&mut Connection<OutFrame>) -> R) -> R {
        f(&mut self.core.lock())
    }

    /// Wait until someone queued a frame or decided a close.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}
