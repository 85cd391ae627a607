//! The shared half of a connection: what the rest of the server holds to send
//! to it or close it. The socket's read side is owned by its actor task.
//!
//! One mutex guards the connection's sans-IO [`Connection`] state machine and
//! the socket's write half ([`crate::wire::Wire`]), so the state check, the
//! enqueue and the write are one atomic step (the race of the original
//! system — check, then write — cannot happen), and a publisher writes what
//! it queued without waking the actor. The actor is woken only for what it
//! alone can do: a full socket, a ping, a close.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use herald_core::{CloseInfo, Connection, LifecycleConfig, LiveOutcome, SendRefused, State};
use tokio::net::TcpStream;

use crate::sync::{AtomicU64, Mutex, MutexGuard, Notify};
use crate::telemetry::{self, Stats};
use crate::wire::{Flushed, OutFrame, Wire};

/// What [`ConnShared::queue_events`] did with a batch.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Events queued or held for the catch-up.
    pub accepted: usize,
    /// Of those, live text deltas joined into a queued frame.
    pub joined: u64,
    /// The last event's outcome (`None` for no events).
    pub last: Option<Result<LiveOutcome, SendRefused>>,
}

/// The typed result of a send: queued, or refused with the reason.
pub type SendOutcome = Result<(), SendRefused>;

/// What the connection's lock guards: the lifecycle and the socket's write
/// half, so a state check, an enqueue and the write are one step.
#[derive(Debug)]
pub(crate) struct Locked {
    /// The sans-IO state machine.
    pub(crate) core: Connection<OutFrame>,
    /// The socket's write half.
    pub(crate) wire: Wire,
    /// Waiting in the hub's flush list ([`ConnShared::queue_events`]).
    dirty: bool,
}

/// A stream epoch, kept inline when it is short (the brokers' epochs are 16
/// hex digits), so comparing it reads no heap block of its own.
#[derive(Debug)]
enum Epoch {
    /// Up to [`Epoch::INLINE`] bytes of UTF-8.
    Inline { len: u8, bytes: [u8; Epoch::INLINE] },
    /// A longer one.
    Long(Box<str>),
}

impl Epoch {
    /// Longest epoch kept inline.
    const INLINE: usize = 23;

    fn new(epoch: &str) -> Self {
        match u8::try_from(epoch.len()) {
            Ok(len) if epoch.len() <= Self::INLINE => {
                let mut bytes = [0; Self::INLINE];
                bytes[..epoch.len()].copy_from_slice(epoch.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Long(epoch.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Long(s) => s.as_bytes(),
        }
    }

    /// The epoch as text (copied from a `&str`, so always UTF-8).
    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// True if this is `epoch`.
    fn is(&self, epoch: &str) -> bool {
        self.as_bytes() == epoch.as_bytes()
    }
}

/// The part of a connection shared between its actor, the registry and the API.
///
/// `repr(C)` keeps the epoch, which the hub compares on every delivery, at
/// the front, in the cache line of the `Arc`'s counts (which each delivery
/// also touches), instead of wherever the compiler would put it.
#[derive(Debug)]
#[repr(C)]
pub struct ConnShared {
    epoch: OnceLock<Epoch>,
    /// Numeric connection id.
    pub id: u64,
    /// The id as shown on the wire and in logs.
    pub id_str: String,
    /// When the upgrade completed.
    pub opened_at: Instant,
    user: OnceLock<String>,
    stream: OnceLock<String>,
    core: Mutex<Locked>,
    wake: Notify,
    acked_seq: AtomicU64,
    /// The shared streams it reads besides its own (issue 39).
    subs: parking_lot::Mutex<Subs>,
}

/// One shared stream a connection reads.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    /// Its id in the connection's lifecycle.
    pub(crate) id: u32,
    /// The stream.
    pub(crate) stream: Arc<str>,
    /// The epoch it was subscribed in, once its position was read.
    pub(crate) epoch: Option<Arc<str>>,
    /// Whether the user may write to it.
    pub(crate) write: bool,
}

/// A connection's subscriptions, and the next id to hand out.
#[derive(Debug, Default)]
struct Subs {
    list: Vec<Sub>,
    next_id: u32,
}

/// Why a subscription could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubRefused {
    /// The connection reads the stream already.
    Already,
    /// The connection reads the most shared streams it may.
    TooMany,
    /// The connection is not ready (closing).
    NotReady,
}

impl ConnShared {
    /// A new connection in `Handshaking` (`cfg` is best an `Arc` shared by
    /// the server's connections).
    pub fn new(id: u64, cfg: impl Into<Arc<LifecycleConfig>>) -> Self {
        let now = crate::clock::now();
        Self {
            id,
            id_str: format!("{id:016x}"),
            opened_at: now,
            user: OnceLock::new(),
            stream: OnceLock::new(),
            epoch: OnceLock::new(),
            core: Mutex::new(Locked {
                core: Connection::new(now, cfg),
                wire: Wire::new(),
                dirty: false,
            }),
            wake: Notify::new(),
            acked_seq: AtomicU64::new(0),
            subs: parking_lot::Mutex::new(Subs::default()),
        }
    }

    /// Start reading shared stream `stream` (at most `max` of them): its
    /// live events are held from now on until the subscription starts.
    pub(crate) fn add_sub(&self, stream: &str, write: bool, max: usize) -> Result<u32, SubRefused> {
        let mut subs = self.subs.lock();
        if subs.list.iter().any(|s| &*s.stream == stream) {
            return Err(SubRefused::Already);
        }
        if subs.list.len() >= max {
            return Err(SubRefused::TooMany);
        }
        subs.next_id += 1;
        let id = subs.next_id;
        self.with_core(|c| c.subscribe(id))
            .map_err(|_| SubRefused::NotReady)?;
        subs.list.push(Sub {
            id,
            stream: Arc::from(stream),
            epoch: None,
            write,
        });
        Ok(id)
    }

    /// The subscription to `stream`, if any.
    pub(crate) fn sub(&self, stream: &str) -> Option<Sub> {
        self.subs
            .lock()
            .list
            .iter()
            .find(|s| &*s.stream == stream)
            .cloned()
    }

    /// Subscription `id`, if it is still there.
    pub(crate) fn sub_by_id(&self, id: u32) -> Option<Sub> {
        self.subs.lock().list.iter().find(|s| s.id == id).cloned()
    }

    /// Every subscription.
    pub(crate) fn subs(&self) -> Vec<Sub> {
        self.subs.lock().list.clone()
    }

    /// Set whether the user may write to subscription `id`'s stream.
    pub(crate) fn set_sub_write(&self, id: u32, write: bool) {
        if let Some(s) = self.subs.lock().list.iter_mut().find(|s| s.id == id) {
            s.write = write;
        }
    }

    /// Record the epoch subscription `id` was subscribed in.
    pub(crate) fn set_sub_epoch(&self, id: u32, epoch: &str) {
        if let Some(s) = self.subs.lock().list.iter_mut().find(|s| s.id == id) {
            s.epoch = Some(Arc::from(epoch));
        }
    }

    /// Stop reading `stream`; its held events are dropped. The removed
    /// subscription, if there was one.
    pub(crate) fn remove_sub(&self, stream: &str) -> Option<Sub> {
        let mut subs = self.subs.lock();
        let at = subs.list.iter().position(|s| &*s.stream == stream)?;
        let sub = subs.list.remove(at);
        self.with_core(|c| c.unsubscribe(sub.id));
        Some(sub)
    }

    /// True once subscription `id` was subscribed in an epoch other than `epoch`.
    fn sub_in_other_epoch(&self, id: u32, epoch: &str) -> bool {
        self.subs
            .lock()
            .list
            .iter()
            .any(|s| s.id == id && s.epoch.as_deref().is_some_and(|e| e != epoch))
    }

    /// [`ConnShared::queue_events`] for subscription `id` in `epoch`: a
    /// subscription of another epoch closes the connection (its client
    /// resubscribes and is told `reset`).
    pub(crate) fn queue_sub_events(
        &self,
        now: Instant,
        id: u32,
        epoch: &str,
        events: impl IntoIterator<Item = (u64, OutFrame)>,
    ) -> (Delivery, bool) {
        if self.sub_in_other_epoch(id, epoch) {
            self.close(CloseInfo::new(
                herald_core::CloseReason::SlowConsumer,
                herald_core::Initiator::Server,
                "a shared stream's history was lost; subscribe again",
            ));
            return (Delivery::default(), false);
        }
        let (delivery, full, locked) = self.enqueue(now, Some(id), events);
        self.after_queue(delivery, full, locked)
    }

    /// Deliveries of subscription `id` may have been missed up to `last_seq`.
    pub(crate) fn expect_sub_seq(&self, id: u32, last_seq: u64) {
        self.core.lock().core.expect_sub_seq(id, last_seq);
        self.wake.notify_one();
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
        self.epoch.get().map(Epoch::as_str)
    }

    /// True once the connection was welcomed in an epoch other than `epoch`.
    pub(crate) fn in_other_epoch(&self, epoch: &str) -> bool {
        self.epoch.get().is_some_and(|e| !e.is(epoch))
    }

    pub(crate) fn set_epoch(&self, epoch: &str) {
        let _ = self.epoch.set(Epoch::new(epoch));
    }

    /// Deliveries may have been missed up to `last_seq`: catch up from history.
    pub(crate) fn expect_seq(&self, last_seq: u64) {
        self.core.lock().core.expect_seq(last_seq);
        self.wake.notify_one();
    }

    pub(crate) fn set_user(&self, user: &str) {
        let _ = self.user.set(user.to_owned());
    }

    pub(crate) fn set_stream(&self, stream: &str) {
        let _ = self.stream.set(stream.to_owned());
    }

    /// Write to `sock` from now on: whoever queues a frame writes it, if the
    /// socket takes it ([`crate::wire`]).
    pub(crate) fn attach(&self, sock: Arc<TcpStream>, stats: Arc<Stats>) {
        self.core.lock().wire.attach(sock, stats);
    }

    /// Queue a frame for this connection (only `Ready` connections accept)
    /// and write what the socket takes.
    pub fn send(&self, frame: OutFrame) -> SendOutcome {
        let mut locked = self.core.lock();
        let outcome = locked.core.send(crate::clock::now(), frame);
        if let Err(r) = outcome {
            self.refused(r);
        }
        self.after_send(locked, outcome == Err(SendRefused::QueueFull));
        outcome
    }

    /// Hand a live event of the connection's stream to its catch-up merge
    /// (queued, held, or dropped as a duplicate: see [`herald_core::catchup`])
    /// and write what the socket takes (the model checker's publishers; the
    /// hub queues and flushes in two steps).
    #[cfg(all(test, herald_loom))]
    pub fn send_event(&self, seq: u64, frame: OutFrame) -> Result<LiveOutcome, SendRefused> {
        let now = crate::clock::now();
        let (delivery, full, locked) = self.enqueue(now, None, std::iter::once((seq, frame)));
        self.after_send(locked, full);
        delivery.last.unwrap_or(Err(SendRefused::Closed))
    }

    /// Queue several events without writing them; true in the second field
    /// if the connection must now be put on a flush list (it has something
    /// to write and was not on one). Whoever keeps that list calls
    /// [`ConnShared::flush`] later, so frames of several publishes that
    /// arrive meanwhile leave in one write. `now` is the delivery's time,
    /// read once for all the connections it reaches.
    pub(crate) fn queue_events(
        &self,
        now: Instant,
        events: impl IntoIterator<Item = (u64, OutFrame)>,
    ) -> (Delivery, bool) {
        let (delivery, full, locked) = self.enqueue(now, None, events);
        self.after_queue(delivery, full, locked)
    }

    /// After queueing a delivery: a full queue wakes the actor (it closes
    /// the connection); otherwise whether the connection must now be put on
    /// a flush list.
    fn after_queue(
        &self,
        delivery: Delivery,
        full: bool,
        mut locked: MutexGuard<'_, Locked>,
    ) -> (Delivery, bool) {
        if full {
            drop(locked);
            self.wake.notify_one();
            return (delivery, false);
        }
        let listed = delivery.accepted > 0 && !std::mem::replace(&mut locked.dirty, true);
        (delivery, listed)
    }

    /// Write what is queued (the hub's flush list); wake the actor for what
    /// only it can do.
    pub(crate) fn flush(&self) {
        self.flush_counted(&mut crate::wire::Tally::direct());
    }

    /// [`ConnShared::flush`], counting what it writes into `tally` (a flush
    /// task's round of connections counts once).
    pub(crate) fn flush_counted(&self, tally: &mut crate::wire::Tally) {
        let mut locked = self.core.lock();
        locked.dirty = false;
        self.after_send_counted(locked, false, tally);
    }

    /// Hand `events` to the own stream's merge (`sub` `None`) or to
    /// subscription `sub`'s, under the connection's lock.
    fn enqueue(
        &self,
        now: Instant,
        sub: Option<u32>,
        events: impl IntoIterator<Item = (u64, OutFrame)>,
    ) -> (Delivery, bool, MutexGuard<'_, Locked>) {
        let mut locked = self.core.lock();
        let mut delivery = Delivery::default();
        let mut full = false;
        let joined = locked.core.joined();
        for (seq, frame) in events {
            let outcome = match sub {
                None => locked.core.send_event(now, seq, frame),
                Some(id) => locked.core.send_sub_event(now, id, seq, frame),
            };
            match outcome {
                Ok(LiveOutcome::Delivered | LiveOutcome::Held) => delivery.accepted += 1,
                Ok(LiveOutcome::Duplicate) => {}
                Err(r) => {
                    self.refused(r);
                    full |= r == SendRefused::QueueFull;
                }
            }
            delivery.last = Some(outcome);
        }
        delivery.joined = locked.core.joined() - joined;
        (delivery, full, locked)
    }

    /// After queueing: write what the socket takes; wake the actor for
    /// what only it can do (a full socket, a ping or close, a slow-consumer
    /// close the refusal just started).
    fn after_send(&self, locked: MutexGuard<'_, Locked>, queue_full: bool) {
        self.after_send_counted(locked, queue_full, &mut crate::wire::Tally::direct());
    }

    fn after_send_counted(
        &self,
        mut locked: MutexGuard<'_, Locked>,
        queue_full: bool,
        tally: &mut crate::wire::Tally,
    ) {
        let Locked { core, wire, .. } = &mut *locked;
        let flushed = wire.flush_counted(core, tally);
        drop(locked);
        if flushed != Flushed::Done || queue_full {
            self.wake.notify_one();
        }
    }

    fn refused(&self, reason: SendRefused) {
        telemetry::send_refused(reason);
        tracing::debug!(conn_id = %self.id_str, reason = reason.as_str(), "send refused");
    }

    /// Run `f` on the AI SDK view of a ready `/ai` connection (with the
    /// last seq its lifecycle handed over) and write what it queued. `None`
    /// on any other connection, or once the connection is not `Ready`: no
    /// frame is queued after a close was decided (I1).
    pub(crate) fn with_view<R>(
        &self,
        f: impl FnOnce(&mut herald_core::aisdk::View, u64) -> R,
    ) -> Option<R> {
        let mut locked = self.core.lock();
        if locked.core.state() != State::Ready {
            return None;
        }
        let Locked { core, wire, .. } = &mut *locked;
        let sent = core.sent_seq();
        let out = f(wire.view()?, sent);
        self.after_send(locked, false);
        Some(out)
    }

    /// Decide to close. Idempotent: returns `true` only for the call that decided.
    pub fn close(&self, info: CloseInfo) -> bool {
        let decided = self.core.lock().core.close(crate::clock::now(), info);
        if decided {
            self.wake.notify_one();
        }
        decided
    }

    /// Current lifecycle state.
    pub fn state(&self) -> State {
        self.core.lock().core.state()
    }

    /// Frames and bytes waiting in the outbound queue.
    pub fn queue_depth(&self) -> (usize, usize) {
        let locked = self.core.lock();
        (locked.core.queue_len(), locked.core.queued_bytes())
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
        f(&mut self.core.lock().core)
    }

    /// Run `f` with the state machine and the write half locked (the actor).
    pub(crate) fn with_locked<R>(&self, f: impl FnOnce(&mut Locked) -> R) -> R {
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

    /// An epoch reads back as set, short or long, and compares by its bytes.
    #[test]
    fn epochs_compare_inline_or_not() {
        let inline = "0123456789abcdef".repeat(2);
        for epoch in [
            "",
            "0123456789abcdef",
            &inline[..23],
            &inline[..24],
            &inline,
        ] {
            let conn = ConnShared::new(1, LifecycleConfig::default());
            assert_eq!(conn.epoch(), None);
            assert!(!conn.in_other_epoch(epoch), "not welcomed: no epoch yet");
            conn.set_epoch(epoch);
            assert_eq!(conn.epoch(), Some(epoch));
            assert!(!conn.in_other_epoch(epoch));
            assert!(conn.in_other_epoch(&format!("{epoch}0")));
            assert!(conn.in_other_epoch("x"));
            let inlined = matches!(conn.epoch.get(), Some(Epoch::Inline { .. }));
            assert_eq!(inlined, epoch.len() <= Epoch::INLINE, "{epoch:?}");
        }
    }

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
