//! The shared half of a connection: what the rest of the server holds to send
//! to it or close it. The socket itself is owned by its actor task.
//!
//! Every operation locks the connection's sans-IO [`Connection`] state machine
//! briefly, so the state check and the enqueue are one atomic step (the race
//! of the original system — check, then write — cannot happen), then wakes the
//! actor.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use herald_core::{
    CloseInfo, Connection, LifecycleConfig, LiveOutcome, Payload, SendRefused, State,
};

use crate::broker::StoredEvent;
use crate::sync::{AtomicU64, Mutex, Notify};
use crate::telemetry;

/// How a replayed event frame ends (the stored frame's closing `}` replaced),
/// so its `{"type":"event"` start stays the same for clients that match it.
const REPLAYED: &[u8] = br#","replayed":true}"#;

/// An outbound message. Cloning shares the bytes, so a fan-out serializes
/// an event once for all connections.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// What is written.
    pub body: Body,
    /// When a live event was published (for the publish→write latency
    /// histogram); `None` for replies and replayed history.
    pub published: Option<Instant>,
}

/// The payload of an outbound message.
#[derive(Debug, Clone)]
pub enum Body {
    /// A text message: every protocol frame (JSON).
    Text(Utf8Bytes),
    /// A binary message: only the test-only echo endpoint sends these.
    Binary(bytes::Bytes),
}

impl OutFrame {
    /// A live event's frame, published at `published`.
    pub fn event(text: Utf8Bytes, published: Instant) -> Self {
        Self {
            body: Body::Text(text),
            published: Some(published),
        }
    }

    /// A text message that is not a live event (a reply, an echo).
    pub fn text(text: Utf8Bytes) -> Self {
        Self {
            body: Body::Text(text),
            published: None,
        }
    }

    /// A binary message (the echo endpoint).
    pub fn binary(bytes: bytes::Bytes) -> Self {
        Self {
            body: Body::Binary(bytes),
            published: None,
        }
    }

    /// The text, for a text message.
    #[cfg(test)]
    pub fn as_text(&self) -> Option<&str> {
        match &self.body {
            Body::Text(t) => Some(t.as_str()),
            Body::Binary(_) => None,
        }
    }

    /// A stored event read from history (no publish time), marked
    /// `"replayed":true` for the client; `None` if its bytes are not a JSON
    /// object in UTF-8 (a broker fault). Costs one copy, on replay only.
    pub fn replayed(event: StoredEvent) -> Option<Self> {
        // The object without its closing brace.
        let body = event
            .json
            .strip_suffix(b"}")
            .filter(|b| b.starts_with(b"{"))?;
        let mut json = Vec::with_capacity(event.json.len() + REPLAYED.len());
        json.extend_from_slice(body);
        json.extend_from_slice(REPLAYED);
        Some(Self::text(
            Utf8Bytes::try_from(bytes::Bytes::from(json)).ok()?,
        ))
    }
}

impl Payload for OutFrame {
    fn wire_len(&self) -> usize {
        match &self.body {
            Body::Text(t) => t.len(),
            Body::Binary(b) => b.len(),
        }
    }
}

impl From<String> for OutFrame {
    fn from(mut s: String) -> Self {
        // Serializers over-allocate; frames kept in history should not.
        s.shrink_to_fit();
        Self::text(Utf8Bytes::from(s))
    }
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
    stream: OnceLock<String>,
    epoch: OnceLock<String>,
    core: Mutex<Connection<OutFrame>>,
    wake: Notify,
    acked_seq: AtomicU64,
}

impl ConnShared {
    /// A new connection in `Handshaking`.
    pub fn new(id: u64, cfg: LifecycleConfig) -> Self {
        let now = crate::clock::now();
        Self {
            id,
            id_str: format!("{id:016x}"),
            opened_at: now,
            user: OnceLock::new(),
            stream: OnceLock::new(),
            epoch: OnceLock::new(),
            core: Mutex::new(Connection::new(now, cfg)),
            wake: Notify::new(),
            acked_seq: AtomicU64::new(0),
        }
    }

    /// The authenticated user, once `hello` succeeded.
    pub fn user(&self) -> Option<&str> {
        self.user.get().map(String::as_str)
    }

    /// The stream the connection joined, once it did.
    pub fn stream(&self) -> Option<&str> {
        self.stream.get().map(String::as_str)
    }

    /// The stream epoch the connection was welcomed in.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.get().map(String::as_str)
    }

    pub(crate) fn set_epoch(&self, epoch: &str) {
        let _ = self.epoch.set(epoch.to_owned());
    }

    /// Deliveries may have been missed up to `last_seq`: catch up from history.
    pub(crate) fn expect_seq(&self, last_seq: u64) {
        self.core.lock().expect_seq(last_seq);
        self.wake.notify_one();
    }

    pub(crate) fn set_user(&self, user: &str) {
        let _ = self.user.set(user.to_owned());
    }

    pub(crate) fn set_stream(&self, stream: &str) {
        let _ = self.stream.set(stream.to_owned());
    }

    /// Queue a frame for this connection (only `Ready` connections accept).
    pub fn send(&self, frame: OutFrame) -> SendOutcome {
        let outcome = self.core.lock().send(crate::clock::now(), frame);
        self.after_send(outcome.err());
        outcome
    }

    /// Hand a live event of the connection's stream to its catch-up merge:
    /// queued, held, or dropped as a duplicate (see [`herald_core::catchup`]).
    pub fn send_event(&self, seq: u64, frame: OutFrame) -> Result<LiveOutcome, SendRefused> {
        let outcome = self.core.lock().send_event(crate::clock::now(), seq, frame);
        self.after_send(outcome.err());
        outcome
    }

    fn after_send(&self, refused: Option<SendRefused>) {
        match refused {
            None => self.wake.notify_one(),
            Some(refused) => {
                telemetry::send_refused(refused);
                tracing::debug!(conn_id = %self.id_str, reason = refused.as_str(), "send refused");
                // A full queue just started a slow-consumer close: the actor must write it.
                if refused == SendRefused::QueueFull {
                    self.wake.notify_one();
                }
            }
        }
    }

    /// Decide to close. Idempotent: returns `true` only for the call that decided.
    pub fn close(&self, info: CloseInfo) -> bool {
        let decided = self.core.lock().close(crate::clock::now(), info);
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

    /// The blocking wait of the model checker's actor.
    #[cfg(all(test, herald_loom))]
    pub(crate) fn woken_blocking(&self) {
        self.wake.wait()
    }
}

#[cfg(all(test, herald_loom))]
mod loom;

#[cfg(test)]
mod tests {
    use herald_core::catchup::{HistoryRequest, Plan};

    use super::*;

    fn ready(cfg: LifecycleConfig) -> ConnShared {
        let conn = ConnShared::new(1, cfg);
        let welcome = OutFrame::from("welcome".to_owned());
        conn.with_core(|c| c.authenticate(crate::clock::now(), welcome, Plan::Live { after: 0 }))
            .unwrap();
        conn
    }

    /// Mutation testing (issue 17): frames count their bytes, so the
    /// queue's byte bound holds: a frame past it is refused and closes the
    /// connection as a slow consumer.
    #[test]
    fn queued_bytes_are_the_frames_bytes_and_bound_the_queue() {
        let conn = ready(LifecycleConfig {
            max_queue_bytes: 20,
            ..LifecycleConfig::default()
        });
        assert_eq!(conn.queue_depth(), (1, 7), "the welcome");
        conn.send(OutFrame::from("0123456789".to_owned())).unwrap();
        assert_eq!(conn.queue_depth(), (2, 17));
        assert_eq!(
            conn.send(OutFrame::from("abcd".to_owned())),
            Err(SendRefused::QueueFull)
        );
        assert_eq!(conn.state(), State::Closing);
    }

    /// A stream that moved past what a live connection was sent (a missed
    /// delivery, e.g. a broker reconnect) makes it read the rest from history.
    #[test]
    fn expect_seq_starts_a_catch_up() {
        let conn = ready(LifecycleConfig::default());
        while conn.with_core(|c| c.poll_transmit()).is_some() {}
        conn.expect_seq(5);
        assert_eq!(
            conn.with_core(|c| c.wants_history()),
            Some(HistoryRequest::Range { after: 0, until: 5 })
        );
    }

    /// Replayed frames are marked for the client; a stored frame that is not
    /// a JSON object is refused (a broker fault), never sent half-marked.
    #[test]
    fn replayed_frames_are_marked() {
        let stored = StoredEvent::new(3, bytes::Bytes::from_static(br#"{"type":"event","seq":3}"#));
        let frame = OutFrame::replayed(stored).unwrap();
        let text = frame.as_text().unwrap();
        assert_eq!(text, r#"{"type":"event","seq":3,"replayed":true}"#);
        assert_eq!(frame.wire_len(), text.len());
        let broken = StoredEvent::new(4, bytes::Bytes::from_static(b"[1]"));
        assert!(OutFrame::replayed(broken).is_none());
    }

    /// A full queue starts a slow-consumer close that only the actor can
    /// write: the refusal wakes it.
    #[tokio::test]
    async fn a_full_queue_wakes_the_actor() {
        let conn = ready(LifecycleConfig {
            max_queue_frames: 1,
            ..LifecycleConfig::default()
        });
        // No wake-up is pending (the welcome was queued through `with_core`).
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(10), conn.woken()).await;
        assert!(pending.is_err());
        assert_eq!(
            conn.send(OutFrame::from("x".to_owned())),
            Err(SendRefused::QueueFull)
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), conn.woken())
            .await
            .expect("the refusal woke the actor");
    }
}
