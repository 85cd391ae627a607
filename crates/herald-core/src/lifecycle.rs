//! The connection lifecycle: one state machine per WebSocket connection.
//!
//! ```text
//!  Handshaking ──authenticate──▶ Ready ──close / close received──▶ Closing ──transport closed──▶ Closed
//!       └────────────────────────close / timeout───────────────────────▲
//! ```
//!
//! The I/O layer owns the socket and asks this machine what to do:
//! [`Connection::send`] admits an outbound frame (or refuses it with a typed
//! reason), [`Connection::poll_transmit`] says what to write next, and
//! [`Connection::on_transport_closed`] hands out the cleanup token exactly once.
//! Because the writer writes only what `poll_transmit` returns, and
//! `poll_transmit` never returns anything after the close frame was written or
//! received, invariant I1 holds by construction; invariant I2 holds because the
//! cleanup token is returned at most once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catchup::{Covering, Gap, HistoryRequest, LiveOutcome, Merge, Plan};
use crate::close::{CloseInfo, CloseReason, Initiator};
use crate::queue::InlineQueue;

/// Something that can sit in the outbound queue: it knows its size on the wire.
pub trait Payload {
    /// Bytes this frame occupies, used for the queue's byte bound.
    fn wire_len(&self) -> usize;

    /// Join `next`, the live frame of seq `seq` of the same stream, into
    /// this unsent frame, which covers `from..seq` (so `next` continues it
    /// with no seq between), when the two can travel as one frame covering
    /// `from..=seq` (consecutive text deltas of one part, see
    /// [`crate::text`]); otherwise give `next` back. By default frames
    /// never join.
    fn absorb(&mut self, from: u64, seq: u64, next: Self) -> Result<(), Self>
    where
        Self: Sized,
    {
        let _ = (from, seq);
        Err(next)
    }
}

impl Payload for String {
    fn wire_len(&self) -> usize {
        self.len()
    }
}

/// Tunables of the lifecycle.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Time allowed between the upgrade and a valid `hello`.
    pub hello_timeout: Duration,
    /// Time allowed from the close decision until the transport is dropped
    /// (flushing queued frames, writing the close frame, waiting for the reply).
    pub close_timeout: Duration,
    /// Most frames the outbound queue holds before the client counts as slow.
    pub max_queue_frames: usize,
    /// Most bytes the outbound queue holds before the client counts as slow.
    pub max_queue_bytes: usize,
    /// Interval of WebSocket pings to a `Ready` connection.
    pub heartbeat_interval: Duration,
    /// Inbound silence (no frame of any kind, pongs included) after which a
    /// `Ready` connection closes as a heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Join a live event into the unsent frame at the back of the queue
    /// when it continues it ([`Payload::absorb`]): a connection that falls
    /// behind gets consecutive text deltas of one part as one covered
    /// frame instead of one frame each. Nothing waits for it.
    pub coalesce: bool,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            max_queue_frames: 1024,
            max_queue_bytes: 4 * 1024 * 1024,
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            coalesce: true,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Upgraded, waiting for `hello`.
    Handshaking,
    /// Authenticated; application frames are accepted.
    Ready,
    /// The close is decided; nothing new is accepted.
    Closing,
    /// The transport is gone and cleanup ran.
    Closed,
}

impl State {
    /// Stable lowercase name, used in the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Handshaking => "handshaking",
            State::Ready => "ready",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }
}

/// Why an outbound frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SendRefused {
    /// The connection has not sent a valid `hello` yet.
    #[error("connection is still handshaking")]
    Handshaking,
    /// The close was decided; the frame would never be written.
    #[error("connection is closing")]
    Closing,
    /// The connection is gone.
    #[error("connection is closed")]
    Closed,
    /// The queue is at its bound; the connection is now closing as a slow consumer.
    #[error("outbound queue is full")]
    QueueFull,
}

impl SendRefused {
    /// Stable snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SendRefused::Handshaking => "handshaking",
            SendRefused::Closing => "closing",
            SendRefused::Closed => "closed",
            SendRefused::QueueFull => "queue_full",
        }
    }
}

/// An illegal transition was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// `authenticate` is only legal while handshaking.
    #[error("cannot authenticate a connection in state {0:?}")]
    NotHandshaking(State),
    /// `subscribe` is only legal while ready.
    #[error("cannot subscribe a connection in state {0:?}")]
    NotReady(State),
    /// The subscription id is in use.
    #[error("subscription {0} exists")]
    Subscribed(u32),
}

/// What the writer must put on the wire next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit<P> {
    /// An application frame.
    Frame(P),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// The close frame; returned at most once per connection.
    Close {
        /// Close code.
        code: u16,
        /// Close reason text (≤ 123 bytes).
        reason: String,
    },
}

/// The state machine of one connection, with its bounded outbound queue.
#[derive(Debug)]
pub struct Connection<P> {
    /// Shared by every connection of a server.
    cfg: Arc<LifecycleConfig>,
    state: State,
    queue: InlineQueue<P>,
    queued_bytes: usize,
    /// Set by [`Connection::join`]: live events are accepted (held) before the welcome.
    joining: bool,
    merge: Merge<P>,
    /// The shared streams it subscribed to besides its own, each with its
    /// own merge-by-seq (ids chosen by the I/O layer).
    subs: Vec<(u32, Merge<P>)>,
    close: Option<CloseInfo>,
    close_sent: bool,
    close_received: bool,
    hello_deadline: Instant,
    close_deadline: Option<Instant>,
    close_deadline_passed: bool,
    token_expiry: Option<Instant>,
    /// When the connection is rotated, and the notice it gets first.
    rotation: Option<(Instant, P)>,
    last_inbound: Instant,
    next_ping: Instant,
    ping_due: bool,
    /// The live frame at the back of the queue, if the back is one: its
    /// stream (`None` for the own stream, else the subscription's id) and
    /// the seqs it covers. Only a frame described here can absorb another.
    tail: Option<Tail>,
    /// False for a connection that never joins frames (its presenter joins
    /// them itself), whatever the configuration says.
    coalesce: bool,
    /// Live events joined into a queued frame so far.
    joined: u64,
}

/// The live frame at the back of a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    stream: Option<u32>,
    from: u64,
    seq: u64,
}

impl<P: Payload> Connection<P> {
    /// A new connection, handshaking since `now` (pass an `Arc` to share
    /// one configuration between connections).
    pub fn new(now: Instant, cfg: impl Into<Arc<LifecycleConfig>>) -> Self {
        let cfg = cfg.into();
        Self {
            hello_deadline: now + cfg.hello_timeout,
            cfg,
            state: State::Handshaking,
            // The one frame an idle connection holds (the welcome, then each
            // delivery) stays inline; a busy one's backlog reaches the heap.
            queue: InlineQueue::new(),
            queued_bytes: 0,
            joining: false,
            merge: Merge::joining(),
            subs: Vec::new(),
            close: None,
            close_sent: false,
            close_received: false,
            close_deadline: None,
            close_deadline_passed: false,
            token_expiry: None,
            rotation: None,
            last_inbound: now,
            next_ping: now,
            ping_due: false,
            tail: None,
            coalesce: true,
            joined: 0,
        }
    }

    /// Never join live events into queued frames on this connection (its
    /// presenter joins what it writes itself).
    pub fn disable_coalescing(&mut self) {
        self.coalesce = false;
    }

    /// Live events joined into a queued frame so far (each saved a frame).
    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The decided close, once there is one.
    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.close.as_ref()
    }

    /// Frames waiting to be written, plus live events held by the catch-ups.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
            + self.merge.held()
            + self.subs.iter().map(|(_, m)| m.held()).sum::<usize>()
    }

    /// Bytes waiting in the outbound queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The highest event seq handed to the outbound queue.
    pub fn sent_seq(&self) -> u64 {
        self.merge.sent()
    }

    /// True while a `Ready` connection still replays history or runs.
    pub fn catching_up(&self) -> bool {
        self.state == State::Ready && !self.merge.is_live()
    }

    /// Subscribe to another stream under `id`: from now on its live events
    /// ([`Connection::send_sub_event`]) are held until
    /// [`Connection::start_subscription`]. Only while `Ready`; an `id` in
    /// use is refused.
    pub fn subscribe(&mut self, id: u32) -> Result<(), LifecycleError> {
        if self.state != State::Ready {
            return Err(LifecycleError::NotReady(self.state));
        }
        if self.subs.iter().any(|(i, _)| *i == id) {
            return Err(LifecycleError::Subscribed(id));
        }
        self.subs.push((id, Merge::joining()));
        Ok(())
    }

    /// Subscription `id`'s position is known: `subscribed` (the protocol's
    /// answer) is queued, then its catch-up starts with `plan`, merged with
    /// the events held since [`Connection::subscribe`] as for the own stream.
    pub fn start_subscription(&mut self, id: u32, subscribed: P, plan: Plan) {
        if self.state != State::Ready {
            return;
        }
        let Some(merge) = self.sub_mut(id) else {
            return;
        };
        let mut ready = vec![subscribed];
        merge.start(plan, &mut ready);
        self.admit_events(ready);
    }

    /// Drop subscription `id` (held events go with it); false if there was none.
    pub fn unsubscribe(&mut self, id: u32) -> bool {
        let before = self.subs.len();
        self.subs.retain(|(i, _)| *i != id);
        self.subs.len() != before
    }

    /// The subscriptions, by id.
    pub fn subscriptions(&self) -> impl Iterator<Item = u32> + '_ {
        self.subs.iter().map(|(i, _)| *i)
    }

    /// The highest seq of subscription `id` handed to the queue.
    pub fn sub_sent_seq(&self, id: u32) -> Option<u64> {
        self.subs
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, m)| m.sent())
    }

    /// True while subscription `id` still replays history or runs.
    pub fn sub_catching_up(&self, id: u32) -> bool {
        self.subs.iter().any(|(i, m)| *i == id && !m.is_live())
    }

    fn sub_mut(&mut self, id: u32) -> Option<&mut Merge<P>> {
        self.subs.iter_mut().find(|(i, _)| *i == id).map(|(_, m)| m)
    }

    /// What history a subscription's catch-up needs next, once the own
    /// stream's needs none and what is queued was written.
    pub fn wants_sub_history(&self) -> Option<(u32, HistoryRequest)> {
        if self.state != State::Ready || !self.queue.is_empty() {
            return None;
        }
        self.subs
            .iter()
            .find_map(|(i, m)| m.wants_history().map(|r| (*i, r)))
    }

    /// [`Connection::push_history`] for subscription `id`.
    pub fn push_sub_history(
        &mut self,
        id: u32,
        page: impl IntoIterator<Item = impl Covering<P>>,
    ) -> Result<(), Gap> {
        if self.state != State::Ready {
            return Ok(());
        }
        let Some(merge) = self.sub_mut(id) else {
            return Ok(());
        };
        let mut ready = Vec::new();
        let result = merge.on_history(page, &mut ready);
        self.admit_events(ready);
        result
    }

    /// [`Connection::push_runs`] for subscription `id`.
    pub fn push_sub_runs(&mut self, id: u32, frames: impl IntoIterator<Item = P>) {
        if self.state != State::Ready {
            return;
        }
        let Some(merge) = self.sub_mut(id) else {
            return;
        };
        let mut ready = Vec::new();
        merge.on_runs(frames, &mut ready);
        self.admit_events(ready);
    }

    /// [`Connection::expect_seq`] for subscription `id`.
    pub fn expect_sub_seq(&mut self, id: u32, last_seq: u64) {
        if self.state == State::Ready
            && let Some(merge) = self.sub_mut(id)
        {
            merge.expect(last_seq);
        }
    }

    /// [`Connection::send_event`] for subscription `id`: a live event of
    /// that stream. An event for a subscription that is gone is dropped
    /// ([`LiveOutcome::Duplicate`]).
    pub fn send_sub_event(
        &mut self,
        now: Instant,
        id: u32,
        seq: u64,
        frame: P,
    ) -> Result<LiveOutcome, SendRefused> {
        match self.state {
            State::Handshaking => return Err(SendRefused::Handshaking),
            State::Closing => return Err(SendRefused::Closing),
            State::Closed => return Err(SendRefused::Closed),
            State::Ready => {}
        }
        let max = self.cfg.max_queue_frames;
        let Some(merge) = self.sub_mut(id) else {
            return Ok(LiveOutcome::Duplicate);
        };
        if merge.held() >= max {
            self.close_slow(now);
            return Err(SendRefused::QueueFull);
        }
        let mut ready = Released::default();
        let outcome = merge.on_live(seq, frame, &mut ready);
        let live = merge.is_live();
        match ready {
            Released {
                first: Some(frame),
                rest,
            } if rest.is_empty() && live => self.send_live(now, Some(id), seq, frame)?,
            ready => self.admit_events(ready.into_vec()),
        }
        Ok(outcome)
    }

    /// The connection joined its stream (subscribed) but its position is not
    /// known yet: from now on live events are held (see [`crate::catchup`])
    /// until [`Connection::authenticate`]. Only legal while handshaking.
    pub fn join(&mut self) -> Result<(), LifecycleError> {
        if self.state != State::Handshaking {
            return Err(LifecycleError::NotHandshaking(self.state));
        }
        self.joining = true;
        Ok(())
    }

    /// `Handshaking → Ready` at `now`; `welcome` becomes the first frame
    /// written, heartbeats start, and the catch-up starts with `plan`.
    ///
    /// Live events held since [`Connection::join`] and those that arrive
    /// while history is replayed are merged with it on seq
    /// ([`crate::catchup::Merge`]): welcome, replay, live is one ordered
    /// sequence with no gap and no duplicate.
    pub fn authenticate(
        &mut self,
        now: Instant,
        welcome: P,
        plan: Plan,
    ) -> Result<(), LifecycleError> {
        self.authenticate_with(now, Some(welcome), plan)
    }

    /// [`Connection::authenticate`] without a welcome frame: for a protocol
    /// whose client expects none (the AI SDK endpoint).
    pub fn authenticate_silently(
        &mut self,
        now: Instant,
        plan: Plan,
    ) -> Result<(), LifecycleError> {
        self.authenticate_with(now, None, plan)
    }

    fn authenticate_with(
        &mut self,
        now: Instant,
        welcome: Option<P>,
        plan: Plan,
    ) -> Result<(), LifecycleError> {
        if self.state != State::Handshaking {
            return Err(LifecycleError::NotHandshaking(self.state));
        }
        self.state = State::Ready;
        self.joining = false;
        self.last_inbound = now;
        self.next_ping = now + self.cfg.heartbeat_interval;
        if let Some(welcome) = welcome {
            self.queued_bytes += welcome.wire_len();
            if self.queue.is_empty() {
                self.tail = None;
            }
            self.queue.push_front(welcome);
        }
        let mut ready = Vec::new();
        self.merge.start(plan, &mut ready);
        self.admit_events(ready);
        Ok(())
    }

    /// `Handshaking → Ready` at `now` with no welcome and no stream: for a
    /// connection that needs no `hello` (the test-only echo endpoint). Sends,
    /// heartbeats and closes then behave as for any ready connection.
    pub fn open_without_hello(&mut self, now: Instant) -> Result<(), LifecycleError> {
        if self.state != State::Handshaking {
            return Err(LifecycleError::NotHandshaking(self.state));
        }
        self.state = State::Ready;
        self.last_inbound = now;
        self.next_ping = now + self.cfg.heartbeat_interval;
        let mut ready = Vec::new();
        self.merge.start(Plan::Live { after: 0 }, &mut ready);
        self.admit_events(ready);
        Ok(())
    }

    /// What history the I/O layer should read next, once what is queued was
    /// written (a page at a time keeps the queue short).
    pub fn wants_history(&self) -> Option<HistoryRequest> {
        if self.state != State::Ready || !self.queue.is_empty() {
            return None;
        }
        self.merge.wants_history()
    }

    /// Add a page of history (events in seq order) for a
    /// [`HistoryRequest::Range`]. A page that skips a seq is a [`Gap`]: the
    /// caller must close the connection rather than write past it.
    pub fn push_history(
        &mut self,
        page: impl IntoIterator<Item = impl Covering<P>>,
    ) -> Result<(), Gap> {
        if self.state != State::Ready {
            return Ok(());
        }
        let mut ready = Vec::new();
        let result = self.merge.on_history(page, &mut ready);
        self.admit_events(ready);
        result
    }

    /// The stream reached `last_seq` (deliveries may have been missed): the
    /// catch-up reads whatever is missing from history (see [`Merge::expect`]).
    pub fn expect_seq(&mut self, last_seq: u64) {
        if self.state == State::Ready {
            self.merge.expect(last_seq);
        }
    }

    /// Add the open runs' events for a [`HistoryRequest::Runs`].
    pub fn push_runs(&mut self, frames: impl IntoIterator<Item = P>) {
        if self.state != State::Ready {
            return;
        }
        let mut ready = Vec::new();
        self.merge.on_runs(frames, &mut ready);
        self.admit_events(ready);
    }

    /// Admit a live event with its stream `seq`: queued when it is the next
    /// one, held while catching up, dropped when already sent. Refused like
    /// [`Connection::send`] unless `Ready` (or joining).
    pub fn send_event(
        &mut self,
        now: Instant,
        seq: u64,
        frame: P,
    ) -> Result<LiveOutcome, SendRefused> {
        match self.state {
            State::Handshaking if !self.joining => return Err(SendRefused::Handshaking),
            State::Closing => return Err(SendRefused::Closing),
            State::Closed => return Err(SendRefused::Closed),
            State::Handshaking | State::Ready => {}
        }
        if self.merge.held() >= self.cfg.max_queue_frames {
            self.close_slow(now);
            return Err(SendRefused::QueueFull);
        }
        let mut ready = Released::default();
        let outcome = self.merge.on_live(seq, frame, &mut ready);
        match ready {
            // The common case: one frame, straight into the bounded queue.
            Released {
                first: Some(frame),
                rest,
            } if rest.is_empty() && self.merge.is_live() => {
                self.send_live(now, None, seq, frame)?
            }
            ready => self.admit_events(ready.into_vec()),
        }
        Ok(outcome)
    }

    /// Queue a frame that belongs to the catch-up (its end marker): like the
    /// history it follows, not held to the queue bound (a page may fill the
    /// queue; the marker must not turn that into a slow-consumer close).
    pub fn push_catch_up_frame(&mut self, frame: P) {
        self.admit_events(vec![frame]);
    }

    /// Queue frames released by the catch-up. They are not held to the
    /// queue bound: history is read a page at a time into an empty queue, and
    /// held live events are bounded by `max_queue_frames` already.
    fn admit_events(&mut self, frames: Vec<P>) {
        if self.state != State::Ready {
            return;
        }
        for frame in frames {
            self.queued_bytes += frame.wire_len();
            self.queue.push_back(frame);
            self.tail = None;
        }
    }

    /// Queue live event `seq` of `stream` (the merge released it alone, in
    /// order), joined into the frame at the back of the queue when that is
    /// the same stream's frame ending at `seq - 1` and the two join
    /// ([`Payload::absorb`]); queued as its own frame otherwise. Either
    /// way the frames in the queue cover every seq once, in order (I3):
    /// a joined frame covers `from..=seq` without a gap.
    fn send_live(
        &mut self,
        now: Instant,
        stream: Option<u32>,
        seq: u64,
        frame: P,
    ) -> Result<(), SendRefused> {
        let mut frame = frame;
        if let Some(tail) = self.tail.filter(|t| {
            self.coalesce
                && self.cfg.coalesce
                && self.state == State::Ready
                && t.stream == stream
                && t.seq.checked_add(1) == Some(seq)
        }) && let Some(back) = self.queue.back_mut()
        {
            let before = back.wire_len();
            match back.absorb(tail.from, seq, frame) {
                Ok(()) => {
                    self.queued_bytes = self.queued_bytes - before + back.wire_len();
                    self.tail = Some(Tail { seq, ..tail });
                    self.joined += 1;
                    // The byte bound holds for what a join added as for a
                    // new frame.
                    if self.queued_bytes > self.cfg.max_queue_bytes {
                        self.close_slow(now);
                        return Err(SendRefused::QueueFull);
                    }
                    return Ok(());
                }
                Err(next) => frame = next,
            }
        }
        self.send(now, frame)?;
        self.tail = Some(Tail {
            stream,
            from: seq,
            seq,
        });
        Ok(())
    }

    fn close_slow(&mut self, now: Instant) {
        self.close(
            now,
            CloseInfo::new(
                CloseReason::SlowConsumer,
                Initiator::Server,
                "outbound queue full",
            ),
        );
    }

    /// Set when the connection's token expires (a `refresh` moves it). A
    /// `Ready` connection still open at that instant closes with 4403.
    pub fn set_token_expiry(&mut self, at: Option<Instant>) {
        self.token_expiry = at;
    }

    /// Rotate the connection at `at` (`max_connection_age`): `notice` (the
    /// protocol's `closing`) is queued, then the close with
    /// [`CloseReason::Rotated`] (1012), after what is queued was written.
    pub fn set_rotation(&mut self, at: Instant, notice: P) {
        self.rotation = Some((at, notice));
    }

    /// Admit an outbound frame. Only `Ready` connections accept frames.
    ///
    /// When the queue is at its bound the frame is refused with
    /// [`SendRefused::QueueFull`] and the connection starts closing as a slow
    /// consumer, so memory never grows past the bound.
    pub fn send(&mut self, now: Instant, frame: P) -> Result<(), SendRefused> {
        match self.state {
            State::Handshaking => return Err(SendRefused::Handshaking),
            State::Closing => return Err(SendRefused::Closing),
            State::Closed => return Err(SendRefused::Closed),
            State::Ready => {}
        }
        let len = frame.wire_len();
        let over_frames = self.queue.len() >= self.cfg.max_queue_frames;
        // A single frame larger than the byte bound is still admitted into an
        // empty queue; otherwise it could never be delivered at all.
        let over_bytes =
            !self.queue.is_empty() && self.queued_bytes + len > self.cfg.max_queue_bytes;
        if over_frames || over_bytes {
            self.close_slow(now);
            return Err(SendRefused::QueueFull);
        }
        self.queued_bytes += len;
        self.queue.push_back(frame);
        self.tail = None;
        Ok(())
    }

    /// Decide to close. Returns `true` if this call made the decision, `false`
    /// if the connection was already closing or closed (the call is then a no-op).
    pub fn close(&mut self, now: Instant, info: CloseInfo) -> bool {
        if !matches!(self.state, State::Handshaking | State::Ready) {
            return false;
        }
        self.state = State::Closing;
        self.close_deadline = Some(now + self.cfg.close_timeout);
        if !info.reason.flushes_queue() {
            self.clear_queue();
        }
        // Held events are never written: the queue is gap-free by construction.
        self.merge = Merge::joining();
        self.joining = false;
        self.close = Some(info);
        true
    }

    /// Any inbound frame (data, ping, pong) arrived: the peer is alive.
    pub fn on_inbound(&mut self, now: Instant) {
        self.last_inbound = now;
    }

    /// The peer's close frame arrived (`code` is `None` for an empty close frame).
    ///
    /// Nothing more may be written except the transport's automatic close reply,
    /// so the queue is dropped. If the server had not decided to close, this is
    /// a client-initiated close.
    pub fn on_close_received(&mut self, now: Instant, code: Option<u16>) {
        if self.close_received || self.state == State::Closed {
            return;
        }
        self.close_received = true;
        if matches!(self.state, State::Handshaking | State::Ready) {
            let mut info = CloseInfo::new(CloseReason::ClientClose, Initiator::Client, "");
            info.code = code.unwrap_or(1005);
            self.close(now, info);
        }
        // The transport answers a received close frame itself; we must not
        // write our own after it.
        self.close_sent = true;
        self.clear_queue();
    }

    /// What to write next, if anything. The writer must write exactly what this
    /// returns, in order, and nothing else.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        match self.state {
            State::Handshaking | State::Closed => None,
            State::Ready if self.ping_due => {
                self.ping_due = false;
                Some(Transmit::Ping)
            }
            State::Ready => self.pop(),
            State::Closing => {
                if self.close_sent {
                    return None;
                }
                if !self.close_deadline_passed
                    && let Some(frame) = self.pop()
                {
                    return Some(frame);
                }
                self.clear_queue();
                self.close_sent = true;
                let info = self.close.as_ref()?;
                Some(Transmit::Close {
                    code: info.code,
                    reason: info.detail.clone(),
                })
            }
        }
    }

    /// The next transmit if it is an application frame, in the order
    /// [`Connection::poll_transmit`] would give it; `None` when nothing is
    /// queued or a ping or the close comes first (those stay for
    /// `poll_transmit`). Lets a writer that cannot frame control messages
    /// (a publisher writing to the socket directly) take only data.
    pub fn poll_frame(&mut self) -> Option<P> {
        let open = match self.state {
            State::Ready => !self.ping_due,
            State::Closing => !self.close_sent && !self.close_deadline_passed,
            State::Handshaking | State::Closed => false,
        };
        if !open {
            return None;
        }
        let frame = self.queue.pop_front()?;
        self.queued_bytes -= frame.wire_len();
        if self.queue.is_empty() {
            self.tail = None;
        }
        Some(frame)
    }

    /// Whether a ping or the close frame is due: something only
    /// [`Connection::poll_transmit`] hands out.
    pub fn control_due(&self) -> bool {
        match self.state {
            State::Ready => self.ping_due,
            State::Closing => {
                !self.close_sent && (self.close_deadline_passed || self.queue.is_empty())
            }
            State::Handshaking | State::Closed => false,
        }
    }

    /// The next instant at which [`Connection::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshaking => Some(self.hello_deadline),
            State::Ready => {
                let silence = self.last_inbound + self.cfg.heartbeat_timeout;
                let next = silence.min(self.next_ping);
                let next = self.token_expiry.map_or(next, |t| t.min(next));
                Some(self.rotation.as_ref().map_or(next, |(t, _)| next.min(*t)))
            }
            State::Closing if !self.close_deadline_passed => self.close_deadline,
            _ => None,
        }
    }

    /// Advance timers to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Handshaking if now >= self.hello_deadline => {
                self.close(
                    now,
                    CloseInfo::new(
                        CloseReason::HelloTimeout,
                        Initiator::Server,
                        "no hello in time",
                    ),
                );
            }
            State::Ready if self.token_expiry.is_some_and(|t| now >= t) => {
                self.close(
                    now,
                    CloseInfo::new(
                        CloseReason::TokenExpired,
                        Initiator::Server,
                        "token expired",
                    ),
                );
            }
            State::Ready if self.rotation.as_ref().is_some_and(|(t, _)| now >= *t) => {
                if let Some((_, notice)) = self.rotation.take() {
                    // Refused only when the queue is full: the close follows anyway.
                    let _ = self.send(now, notice);
                }
                self.close(
                    now,
                    CloseInfo::new(
                        CloseReason::Rotated,
                        Initiator::Server,
                        "connection rotated; resume",
                    ),
                );
            }
            State::Ready if now >= self.last_inbound + self.cfg.heartbeat_timeout => {
                self.close(
                    now,
                    CloseInfo::new(
                        CloseReason::HeartbeatTimeout,
                        Initiator::Server,
                        "no heartbeat",
                    ),
                );
            }
            State::Ready if now >= self.next_ping => {
                self.ping_due = true;
                self.next_ping = now + self.cfg.heartbeat_interval;
            }
            State::Closing if self.close_deadline.is_some_and(|d| now >= d) => {
                self.close_deadline_passed = true;
                self.clear_queue();
            }
            _ => {}
        }
    }

    /// True once the close deadline passed and the close frame is out (or
    /// cannot be written): the I/O layer should drop the transport now.
    pub fn should_drop_transport(&self) -> bool {
        self.state == State::Closing && self.close_deadline_passed && self.close_sent
    }

    /// The transport is gone (EOF, error, or dropped by us). Returns the close
    /// — the cleanup token — the first time only; every later call returns `None`.
    ///
    /// `fallback` is the close recorded when none was decided before (the peer
    /// vanished while the connection was live).
    pub fn on_transport_closed(&mut self, fallback: CloseInfo) -> Option<CloseInfo> {
        if self.state == State::Closed {
            return None;
        }
        self.state = State::Closed;
        self.clear_queue();
        let info = self.close.get_or_insert(fallback).clone();
        Some(info)
    }

    fn pop(&mut self) -> Option<Transmit<P>> {
        let frame = self.queue.pop_front()?;
        self.queued_bytes -= frame.wire_len();
        if self.queue.is_empty() {
            self.tail = None;
        }
        Some(Transmit::Frame(frame))
    }

    fn clear_queue(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
        self.tail = None;
    }
}

/// What a live event released for writing: almost always at most one frame,
/// kept without a heap allocation (a delivery to each connection allocated
/// a one-frame `Vec` before).
struct Released<P> {
    first: Option<P>,
    rest: Vec<P>,
}

impl<P> Default for Released<P> {
    fn default() -> Self {
        Self {
            first: None,
            rest: Vec::new(),
        }
    }
}

impl<P> Extend<P> for Released<P> {
    fn extend<I: IntoIterator<Item = P>>(&mut self, frames: I) {
        for frame in frames {
            if self.first.is_none() && self.rest.is_empty() {
                self.first = Some(frame);
            } else {
                self.rest.push(frame);
            }
        }
    }
}

impl<P> Released<P> {
    /// All the frames, in order.
    fn into_vec(self) -> Vec<P> {
        match self.first {
            None => self.rest,
            Some(first) => std::iter::once(first).chain(self.rest).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LifecycleConfig {
        LifecycleConfig {
            hello_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            max_queue_frames: 4,
            max_queue_bytes: 100,
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            coalesce: true,
        }
    }

    fn ready(now: Instant) -> Connection<String> {
        let mut c = Connection::new(now, cfg());
        c.authenticate(now, "welcome".into(), Plan::Live { after: 0 })
            .unwrap();
        c
    }

    fn drain(c: &mut Connection<String>) -> Vec<Transmit<String>> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    #[test]
    fn handshaking_refuses_app_frames() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        assert_eq!(c.send(now, "x".into()), Err(SendRefused::Handshaking));
        assert_eq!(c.poll_transmit(), None);
    }

    #[test]
    fn welcome_is_written_first() {
        let now = Instant::now();
        let mut c = ready(now);
        c.send(now, "e1".into()).unwrap();
        assert_eq!(
            drain(&mut c),
            vec![
                Transmit::Frame("welcome".into()),
                Transmit::Frame("e1".into())
            ]
        );
    }

    #[test]
    fn authenticate_twice_is_rejected() {
        let now = Instant::now();
        let mut c = ready(now);
        assert_eq!(
            c.authenticate(now, "again".into(), Plan::Live { after: 0 }),
            Err(LifecycleError::NotHandshaking(State::Ready))
        );
    }

    #[test]
    fn hello_timeout_closes_with_4408() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(10)));
        c.handle_timeout(now + Duration::from_secs(9));
        assert_eq!(c.state(), State::Handshaking);
        c.handle_timeout(now + Duration::from_secs(10));
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            drain(&mut c),
            vec![Transmit::Close {
                code: 4408,
                reason: "no hello in time".into()
            }]
        );
    }

    #[test]
    fn kick_flushes_queue_then_closes_once() {
        let now = Instant::now();
        let mut c = ready(now);
        let _ = c.poll_transmit();
        c.send(now, "a".into()).unwrap();
        assert!(c.close(
            now,
            CloseInfo::new(CloseReason::Kicked, Initiator::Server, "kicked")
        ));
        assert!(!c.close(
            now,
            CloseInfo::new(CloseReason::Shutdown, Initiator::Server, "")
        ));
        assert_eq!(c.send(now, "b".into()), Err(SendRefused::Closing));
        assert_eq!(
            drain(&mut c),
            vec![
                Transmit::Frame("a".into()),
                Transmit::Close {
                    code: 4409,
                    reason: "kicked".into()
                }
            ]
        );
        assert_eq!(c.poll_transmit(), None);
    }

    #[test]
    fn client_close_drops_queue_and_writes_nothing() {
        let now = Instant::now();
        let mut c = ready(now);
        c.send(now, "a".into()).unwrap();
        c.on_close_received(now, Some(1000));
        assert_eq!(c.poll_transmit(), None);
        let info = c.close_info().unwrap();
        assert_eq!(
            (info.reason, info.initiator, info.code),
            (CloseReason::ClientClose, Initiator::Client, 1000)
        );
    }

    #[test]
    fn close_received_after_server_close_keeps_server_reason() {
        let now = Instant::now();
        let mut c = ready(now);
        c.close(
            now,
            CloseInfo::new(CloseReason::Shutdown, Initiator::Server, "bye"),
        );
        assert!(matches!(
            drain(&mut c).last(),
            Some(Transmit::Close { code: 1012, .. })
        ));
        c.on_close_received(now, Some(1012));
        assert_eq!(c.close_info().unwrap().reason, CloseReason::Shutdown);
    }

    #[test]
    fn queue_overflow_closes_as_slow_consumer_without_flushing() {
        let now = Instant::now();
        let mut c = ready(now);
        assert_eq!(c.poll_transmit(), Some(Transmit::Frame("welcome".into())));
        for i in 0..4 {
            c.send(now, format!("f{i}")).unwrap();
        }
        assert_eq!(c.send(now, "x".into()), Err(SendRefused::QueueFull));
        assert_eq!(c.queue_len(), 0);
        assert_eq!(
            drain(&mut c),
            vec![Transmit::Close {
                code: 4001,
                reason: "outbound queue full".into()
            }]
        );
    }

    #[test]
    fn byte_bound_counts_too() {
        let now = Instant::now();
        let mut c = ready(now);
        let _ = c.poll_transmit();
        c.send(now, "x".repeat(150)).unwrap(); // alone, over the bound: admitted
        assert_eq!(c.send(now, "y".into()), Err(SendRefused::QueueFull));
    }

    #[test]
    fn close_deadline_abandons_flush() {
        let now = Instant::now();
        let mut c = ready(now);
        c.send(now, "a".into()).unwrap();
        c.close(
            now,
            CloseInfo::new(CloseReason::Shutdown, Initiator::Server, ""),
        );
        c.handle_timeout(now + Duration::from_secs(2));
        assert!(!c.should_drop_transport());
        assert_eq!(
            drain(&mut c),
            vec![Transmit::Close {
                code: 1012,
                reason: "".into()
            }]
        );
        assert!(c.should_drop_transport());
    }

    #[test]
    fn rotation_sends_its_notice_then_closes_1012() {
        let now = Instant::now();
        let mut c = ready(now);
        let _ = drain(&mut c);
        c.set_rotation(now + Duration::from_secs(5), "closing".into());
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(5)));
        c.handle_timeout(now + Duration::from_secs(4));
        assert_eq!(c.state(), State::Ready);
        c.send(now, "event".into()).unwrap();
        c.handle_timeout(now + Duration::from_secs(5));
        let info = c.close_info().cloned().unwrap();
        assert_eq!((info.reason, info.code), (CloseReason::Rotated, 1012));
        // What was queued first, then the notice, then the close.
        let out = drain(&mut c);
        assert!(
            matches!(&out[..], [Transmit::Frame(a), Transmit::Frame(b), Transmit::Close { code: 1012, .. }] if a == "event" && b == "closing"),
            "{out:?}"
        );
    }

    #[test]
    fn token_expiry_closes_with_4403_unless_refreshed() {
        let now = Instant::now();
        let mut c = ready(now);
        c.set_token_expiry(Some(now + Duration::from_secs(5)));
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(5)));
        c.set_token_expiry(Some(now + Duration::from_secs(60)));
        c.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(c.state(), State::Ready);
        c.handle_timeout(now + Duration::from_secs(60));
        assert_eq!(c.close_info().map(|i| i.code), Some(4403));
    }

    #[test]
    fn heartbeat_pings_on_interval_and_times_out_on_silence() {
        let now = Instant::now();
        let mut c = ready(now);
        let _ = c.poll_transmit();
        let s = Duration::from_secs;
        assert_eq!(c.poll_timeout(), Some(now + s(25)));
        c.handle_timeout(now + s(25));
        assert_eq!(c.poll_transmit(), Some(Transmit::Ping));
        assert_eq!(c.poll_transmit(), None);
        c.on_inbound(now + s(30)); // the pong
        c.handle_timeout(now + s(60));
        assert_eq!(c.state(), State::Ready);
        assert_eq!(c.poll_transmit(), Some(Transmit::Ping));
        c.handle_timeout(now + s(90));
        assert_eq!(
            c.close_info().map(|i| i.reason),
            Some(CloseReason::HeartbeatTimeout)
        );
        assert_eq!(
            c.poll_transmit()
                .map(|t| matches!(t, Transmit::Close { code: 1001, .. })),
            Some(true)
        );
    }

    #[test]
    fn catch_up_holds_live_events_until_the_replay_is_done() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        assert_eq!(
            c.send_event(now, 3, "e3".into()),
            Err(SendRefused::Handshaking)
        );
        c.join().unwrap();
        assert_eq!(c.send_event(now, 3, "e3".into()), Ok(LiveOutcome::Held));
        c.authenticate(now, "welcome".into(), Plan::Replay { after: 0, until: 2 })
            .unwrap();
        assert_eq!(c.send_event(now, 4, "e4".into()), Ok(LiveOutcome::Held));
        assert_eq!(c.wants_history(), None, "the welcome goes first");
        assert_eq!(c.poll_transmit(), Some(Transmit::Frame("welcome".into())));
        assert_eq!(c.poll_transmit(), None, "live events wait for the replay");
        assert_eq!(
            c.wants_history(),
            Some(HistoryRequest::Range { after: 0, until: 2 })
        );
        c.push_history([(1, "e1".to_owned())]).unwrap();
        assert_eq!(c.wants_history(), None);
        assert_eq!(c.poll_transmit(), Some(Transmit::Frame("e1".into())));
        c.push_history([(2, "e2".to_owned())]).unwrap();
        assert_eq!(
            c.send_event(now, 3, "e3".into()),
            Ok(LiveOutcome::Duplicate)
        );
        assert_eq!(
            drain(&mut c),
            ["e2", "e3", "e4"]
                .map(|f| Transmit::Frame(f.to_owned()))
                .to_vec()
        );
        assert_eq!(c.sent_seq(), 4);
    }

    #[test]
    fn close_during_catch_up_never_writes_live_events_after_a_gap() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        c.join().unwrap();
        c.authenticate(now, "welcome".into(), Plan::Replay { after: 0, until: 5 })
            .unwrap();
        let _ = c.poll_transmit();
        c.push_history([(1, "e1".to_owned())]).unwrap();
        c.send_event(now, 9, "e9".into()).unwrap();
        c.close(
            now,
            CloseInfo::new(CloseReason::Kicked, Initiator::Server, "k"),
        );
        assert_eq!(
            drain(&mut c),
            vec![
                Transmit::Frame("e1".into()),
                Transmit::Close {
                    code: 4409,
                    reason: "k".into()
                }
            ]
        );
    }

    #[test]
    fn too_many_held_events_close_as_slow_consumer() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        c.join().unwrap();
        for seq in 1..=cfg().max_queue_frames as u64 {
            assert_eq!(c.send_event(now, seq, "e".into()), Ok(LiveOutcome::Held));
        }
        assert_eq!(
            c.send_event(now, 99, "e".into()),
            Err(SendRefused::QueueFull)
        );
        assert_eq!(c.state(), State::Closing);
    }

    #[test]
    fn cleanup_token_is_handed_out_once() {
        let now = Instant::now();
        let mut c = ready(now);
        let gone = CloseInfo::new(CloseReason::PeerGone, Initiator::Client, "eof");
        let first = c.on_transport_closed(gone.clone()).unwrap();
        assert_eq!(first.reason, CloseReason::PeerGone);
        assert_eq!(c.on_transport_closed(gone), None);
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.send(now, "x".into()), Err(SendRefused::Closed));
        assert!(!c.close(
            now,
            CloseInfo::new(CloseReason::Kicked, Initiator::Server, "")
        ));
    }

    /// Mutation testing (issue 17): the byte bound admits a queue exactly at
    /// it and refuses one byte more; written frames give their bytes back.
    #[test]
    fn the_byte_bound_is_exact_and_pops_give_bytes_back() {
        let now = Instant::now();
        let mut c = ready(now);
        drain(&mut c);
        assert_eq!(c.queued_bytes(), 0);
        c.send(now, "a".repeat(60)).unwrap();
        c.send(now, "b".repeat(40)).unwrap();
        assert_eq!((c.queue_len(), c.queued_bytes()), (2, 100));
        c.poll_transmit();
        assert_eq!(c.queued_bytes(), 40);
        c.send(now, "c".repeat(60)).unwrap();
        assert_eq!(c.send(now, "d".into()), Err(SendRefused::QueueFull));
        assert_eq!(c.state(), State::Closing);
    }

    /// The close deadline is `close_timeout` after the decision: until then
    /// the queue is flushed, at it the rest is dropped and the timer stops.
    #[test]
    fn the_close_deadline_is_close_timeout_after_the_decision() {
        let t0 = Instant::now();
        let mut c = ready(t0);
        drain(&mut c);
        c.send(t0, "e1".into()).unwrap();
        let info = CloseInfo::new(CloseReason::Shutdown, Initiator::Server, "bye");
        assert!(c.close(t0, info));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        c.handle_timeout(t0 + Duration::from_millis(1999));
        assert_eq!(c.queue_len(), 1, "still flushing");
        c.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(c.queue_len(), 0, "the deadline drops the rest");
        assert_eq!(c.poll_timeout(), None);
        assert!(matches!(
            c.poll_transmit(),
            Some(Transmit::Close { code: 1012, .. })
        ));
        assert!(c.should_drop_transport());
    }

    /// Heartbeats: a ping at each interval, not before; the next one an
    /// interval later.
    #[test]
    fn pings_are_due_each_interval() {
        let t0 = Instant::now();
        let mut c = ready(t0);
        drain(&mut c);
        let interval = Duration::from_secs(25);
        assert_eq!(c.poll_timeout(), Some(t0 + interval));
        c.handle_timeout(t0 + interval - Duration::from_millis(1));
        assert_eq!(c.poll_transmit(), None);
        c.handle_timeout(t0 + interval);
        assert_eq!(c.poll_transmit(), Some(Transmit::Ping));
        assert_eq!(c.poll_transmit(), None);
        c.on_inbound(t0 + interval);
        assert_eq!(c.poll_timeout(), Some(t0 + 2 * interval));
    }

    /// A live connection told its stream moved past what it sent reads the
    /// rest from history; closing connections ignore it.
    #[test]
    fn expect_seq_starts_a_catch_up_only_while_ready() {
        let now = Instant::now();
        let mut c = ready(now);
        drain(&mut c);
        c.expect_seq(3);
        assert_eq!(
            c.wants_history(),
            Some(HistoryRequest::Range { after: 0, until: 3 })
        );
        let mut closing = ready(now);
        closing.close(
            now,
            CloseInfo::new(CloseReason::Kicked, Initiator::Server, "k"),
        );
        closing.expect_seq(3);
        drain(&mut closing);
        assert_eq!(closing.wants_history(), None);
    }

    /// The open runs' events are queued after the welcome, then live events
    /// follow the position they were read at.
    #[test]
    fn run_replay_is_queued_then_live_follows() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        c.join().unwrap();
        c.authenticate(now, "welcome".into(), Plan::Runs { until: 3 })
            .unwrap();
        drain(&mut c);
        assert_eq!(c.wants_history(), Some(HistoryRequest::Runs { until: 3 }));
        c.push_runs(["r1".to_owned(), "r3".to_owned()]);
        assert_eq!(
            c.send_event(now, 4, "e4".into()),
            Ok(LiveOutcome::Delivered)
        );
        assert_eq!(
            drain(&mut c),
            vec![
                Transmit::Frame("r1".into()),
                Transmit::Frame("r3".into()),
                Transmit::Frame("e4".into())
            ]
        );
    }

    /// Mutation testing (issue 17): state and refusal names are metric
    /// labels and API values; held events count in the queue length.
    #[test]
    fn names_and_queue_length_with_held_events() {
        let names: Vec<&str> = [
            State::Handshaking,
            State::Ready,
            State::Closing,
            State::Closed,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect();
        assert_eq!(names, ["handshaking", "ready", "closing", "closed"]);
        let refusals: Vec<&str> = [
            SendRefused::Handshaking,
            SendRefused::Closing,
            SendRefused::Closed,
            SendRefused::QueueFull,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(refusals, ["handshaking", "closing", "closed", "queue_full"]);
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        c.join().unwrap();
        assert_eq!(c.send_event(now, 5, "e5".into()), Ok(LiveOutcome::Held));
        assert_eq!(c.send_event(now, 6, "e6".into()), Ok(LiveOutcome::Held));
        assert_eq!(c.queue_len(), 2, "held events count");
        c.authenticate(now, "welcome".into(), Plan::Replay { after: 2, until: 4 })
            .unwrap();
        assert_eq!(c.queue_len(), 3, "the welcome and the two held");
    }

    /// Live events are held to the queue bound like any frame: the one past
    /// it is refused and starts a slow-consumer close.
    #[test]
    fn live_events_respect_the_queue_bound() {
        let now = Instant::now();
        let mut c = ready(now);
        drain(&mut c);
        for seq in 1..=4 {
            assert_eq!(
                c.send_event(now, seq, format!("e{seq}")),
                Ok(LiveOutcome::Delivered)
            );
        }
        assert_eq!(
            c.send_event(now, 5, "e5".into()),
            Err(SendRefused::QueueFull)
        );
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            c.close_info().map(|i| i.reason),
            Some(CloseReason::SlowConsumer)
        );
    }

    /// `catching_up` is true exactly while a ready connection replays.
    #[test]
    fn catching_up_while_a_ready_connection_replays() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        assert!(!c.catching_up(), "handshaking is not catching up");
        c.authenticate(now, "welcome".into(), Plan::Replay { after: 0, until: 2 })
            .unwrap();
        assert!(c.catching_up());
        drain(&mut c);
        c.push_history([(1, "e1".to_owned()), (2, "e2".to_owned())])
            .unwrap();
        assert!(!c.catching_up(), "live after the replay");
        let live = ready(now);
        assert!(!live.catching_up());
    }

    /// The catch-up's end marker joins a full queue rather than closing it.
    #[test]
    fn a_catch_up_frame_is_not_held_to_the_bound() {
        let now = Instant::now();
        let mut c: Connection<String> = Connection::new(now, cfg());
        c.authenticate(now, "welcome".into(), Plan::Replay { after: 0, until: 4 })
            .unwrap();
        drain(&mut c);
        let page: Vec<(u64, String)> = (1..=4).map(|q| (q, format!("e{q}"))).collect();
        c.push_history(page).unwrap();
        assert_eq!(c.queue_len(), 4, "at the frame bound");
        c.push_catch_up_frame("caught_up".into());
        assert_eq!((c.queue_len(), c.state()), (5, State::Ready));
    }

    fn frames(c: &mut Connection<String>) -> Vec<String> {
        drain(c)
            .into_iter()
            .filter_map(|t| match t {
                Transmit::Frame(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    /// Issue 39: a subscription is a second merge-by-seq on the same queue.
    /// Events of the subscribed stream held before its position was known
    /// are merged with its history after the `subscribed` frame; the own
    /// stream flows meanwhile; an unsubscribed stream's events are dropped.
    #[test]
    fn a_subscription_merges_its_own_seqs_beside_the_own_stream() {
        let now = Instant::now();
        let mut c = ready(now);
        assert_eq!(frames(&mut c), vec!["welcome"]);
        c.subscribe(7).unwrap();
        assert_eq!(c.subscribe(7), Err(LifecycleError::Subscribed(7)));
        // Live events of the shared stream before its position is known: held.
        assert_eq!(
            c.send_sub_event(now, 7, 11, "t11".into()),
            Ok(LiveOutcome::Held)
        );
        assert_eq!(
            c.send_sub_event(now, 7, 12, "t12".into()),
            Ok(LiveOutcome::Held)
        );
        // The own stream is not held back by it.
        assert_eq!(
            c.send_event(now, 1, "u1".into()),
            Ok(LiveOutcome::Delivered)
        );
        assert_eq!(c.queue_len(), 3, "one queued, two held");
        // Resume at 9 of the shared stream: 10 comes from history.
        c.start_subscription(
            7,
            "subscribed".into(),
            Plan::Replay {
                after: 9,
                until: 12,
            },
        );
        assert!(c.sub_catching_up(7));
        assert_eq!(c.wants_sub_history(), None, "the queue is written first");
        assert_eq!(frames(&mut c), vec!["u1", "subscribed"]);
        assert_eq!(
            c.wants_sub_history(),
            Some((
                7,
                HistoryRequest::Range {
                    after: 9,
                    until: 12
                }
            ))
        );
        let page = [(10, "t10"), (11, "t11"), (12, "t12")].map(|(q, f)| (q, f.to_owned()));
        c.push_sub_history(7, page).unwrap();
        assert!(!c.sub_catching_up(7));
        assert_eq!(c.sub_sent_seq(7), Some(12));
        assert_eq!(frames(&mut c), vec!["t10", "t11", "t12"]);
        // Live from here: duplicates dropped, the next one straight through.
        assert_eq!(
            c.send_sub_event(now, 7, 12, "dup".into()),
            Ok(LiveOutcome::Duplicate)
        );
        assert_eq!(
            c.send_sub_event(now, 7, 13, "t13".into()),
            Ok(LiveOutcome::Delivered)
        );
        // A gap is filled from history first.
        assert_eq!(
            c.send_sub_event(now, 7, 15, "t15".into()),
            Ok(LiveOutcome::Held)
        );
        assert_eq!(frames(&mut c), vec!["t13"]);
        assert_eq!(
            c.wants_sub_history(),
            Some((
                7,
                HistoryRequest::Range {
                    after: 13,
                    until: 14
                }
            ))
        );
        assert_eq!(
            c.push_sub_history(7, vec![(15, "t15".to_owned())]),
            Err(Gap { after: 13 }),
            "a page that skips 14 is a gap, never written past"
        );
        // Unsubscribed: its events are dropped, the own stream goes on.
        assert!(c.unsubscribe(7));
        assert!(!c.unsubscribe(7));
        assert_eq!(
            c.send_sub_event(now, 7, 16, "t16".into()),
            Ok(LiveOutcome::Duplicate)
        );
        assert_eq!(
            c.send_event(now, 2, "u2".into()),
            Ok(LiveOutcome::Delivered)
        );
        assert_eq!(frames(&mut c), vec!["u2"]);
        assert_eq!(c.subscriptions().count(), 0);
    }

    /// Subscribing needs a ready connection; a subscription's held events
    /// count against the queue bound like the own stream's (slow consumer).
    #[test]
    fn subscriptions_are_bounded_like_the_own_stream() {
        let now = Instant::now();
        let mut fresh: Connection<String> = Connection::new(now, cfg());
        assert_eq!(
            fresh.subscribe(1),
            Err(LifecycleError::NotReady(State::Handshaking))
        );
        assert_eq!(
            fresh.send_sub_event(now, 1, 1, "x".into()),
            Err(SendRefused::Handshaking)
        );
        let mut c = ready(now);
        c.subscribe(1).unwrap();
        for seq in 1..=4 {
            assert_eq!(
                c.send_sub_event(now, 1, seq, format!("s{seq}")),
                Ok(LiveOutcome::Held)
            );
        }
        assert_eq!(
            c.send_sub_event(now, 1, 5, "s5".into()),
            Err(SendRefused::QueueFull)
        );
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            c.close_info().map(|i| i.reason),
            Some(CloseReason::SlowConsumer)
        );
    }

    /// A frame of the coalescing tests: the seqs it covers, the part of a
    /// text delta (`None` for any other event) and the text so far.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Piece {
        from: u64,
        seq: u64,
        part: Option<char>,
        text: String,
    }

    impl Payload for Piece {
        fn wire_len(&self) -> usize {
            self.text.len() + 1
        }

        fn absorb(&mut self, from: u64, seq: u64, next: Self) -> Result<(), Self> {
            if self.part.is_none() || self.part != next.part {
                return Err(next);
            }
            assert_eq!(
                (self.from, self.seq + 1),
                (from, seq),
                "the core's covered range"
            );
            self.seq = seq;
            self.text.push_str(&next.text);
            Ok(())
        }
    }

    fn piece(seq: u64, part: Option<char>) -> Piece {
        Piece {
            from: seq,
            seq,
            part,
            text: format!("<{seq}>"),
        }
    }

    fn ready_pieces(now: Instant, cfg: LifecycleConfig) -> Connection<Piece> {
        let mut c = Connection::new(now, cfg);
        c.authenticate_silently(now, Plan::Live { after: 0 })
            .unwrap();
        c
    }

    fn big_cfg(coalesce: bool) -> LifecycleConfig {
        LifecycleConfig {
            max_queue_frames: 1000,
            max_queue_bytes: 1 << 20,
            coalesce,
            ..cfg()
        }
    }

    #[test]
    fn deltas_of_one_part_join_only_while_queued() {
        let now = Instant::now();
        let mut c = ready_pieces(now, big_cfg(true));
        // Queued behind each other: 1..=3 of part a join; 4 (part b) and
        // 5 (not a delta) do not; 6 of b does not join across 5.
        for (seq, part) in [(1, 'a'), (2, 'a'), (3, 'a'), (4, 'b')] {
            c.send_event(now, seq, piece(seq, Some(part))).unwrap();
        }
        c.send_event(now, 5, piece(5, None)).unwrap();
        c.send_event(now, 6, piece(6, Some('b'))).unwrap();
        let frames: Vec<_> = std::iter::from_fn(|| c.poll_frame()).collect();
        assert_eq!(
            frames.iter().map(|f| (f.from, f.seq)).collect::<Vec<_>>(),
            [(1, 3), (4, 4), (5, 5), (6, 6)]
        );
        assert_eq!(frames[0].text, "<1><2><3>");
        assert_eq!(c.joined(), 2);
        // Taken for writing, a frame is never joined again.
        c.send_event(now, 7, piece(7, Some('b'))).unwrap();
        assert_eq!(c.poll_frame().map(|f| (f.from, f.seq)), Some((7, 7)));
        c.send_event(now, 8, piece(8, Some('b'))).unwrap();
        assert_eq!(c.poll_frame().map(|f| (f.from, f.seq)), Some((8, 8)));
        // A reply between two deltas separates them.
        c.send_event(now, 9, piece(9, Some('b'))).unwrap();
        c.send(now, piece(0, None)).unwrap();
        c.send_event(now, 10, piece(10, Some('b'))).unwrap();
        let seqs: Vec<_> = std::iter::from_fn(|| c.poll_frame())
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, [9, 0, 10]);
        assert_eq!(c.joined(), 2);
    }

    #[test]
    fn coalescing_can_be_turned_off() {
        let now = Instant::now();
        let mut off = ready_pieces(now, big_cfg(false));
        let mut disabled = ready_pieces(now, big_cfg(true));
        disabled.disable_coalescing();
        for c in [&mut off, &mut disabled] {
            for seq in 1..=3 {
                c.send_event(now, seq, piece(seq, Some('a'))).unwrap();
            }
            assert_eq!(std::iter::from_fn(|| c.poll_frame()).count(), 3);
            assert_eq!(c.joined(), 0);
        }
    }

    #[test]
    fn a_join_counts_toward_the_byte_bound() {
        let now = Instant::now();
        let cfg = LifecycleConfig {
            max_queue_frames: 1000,
            max_queue_bytes: 10,
            ..cfg()
        };
        let mut c = ready_pieces(now, cfg);
        c.send_event(now, 1, piece(1, Some('a'))).unwrap();
        c.send_event(now, 2, piece(2, Some('a'))).unwrap();
        assert_eq!((c.queue_len(), c.queued_bytes()), (1, 7));
        // What the join adds is counted exactly: 3 more bytes fill the
        // bound, 3 more pass it (a slow consumer, as for a frame of its own).
        c.send_event(now, 3, piece(3, Some('a'))).unwrap();
        assert_eq!((c.queue_len(), c.queued_bytes()), (1, 10));
        assert_eq!(
            c.send_event(now, 4, piece(4, Some('a'))),
            Err(SendRefused::QueueFull)
        );
        assert_eq!(c.state(), State::Closing);
    }

    #[test]
    fn streams_join_only_their_own_frames() {
        let now = Instant::now();
        let mut c = ready_pieces(now, big_cfg(true));
        c.subscribe(1).unwrap();
        c.start_subscription(1, piece(0, None), Plan::Live { after: 0 });
        c.send_event(now, 1, piece(1, Some('a'))).unwrap();
        // Seq 2 of another stream: not a continuation of the own stream's 1.
        c.send_sub_event(now, 1, 1, piece(1, Some('a'))).unwrap();
        c.send_sub_event(now, 1, 2, piece(2, Some('a'))).unwrap();
        c.send_event(now, 2, piece(2, Some('a'))).unwrap();
        let frames: Vec<_> = std::iter::from_fn(|| c.poll_frame())
            .map(|f| (f.from, f.seq))
            .collect();
        assert_eq!(frames, [(0, 0), (1, 1), (1, 2), (2, 2)]);
    }

    proptest::proptest! {
        /// Whatever arrives and whenever frames are taken: the frames cover
        /// every seq once, in order (I3), each frame's text is exactly its
        /// seqs' texts, a frame joins only deltas of one part, and with
        /// coalescing off (or the queue drained before each event) every
        /// event is its own frame.
        #[test]
        fn joined_frames_cover_every_seq_once(
            steps in proptest::collection::vec((0u8..4, proptest::prelude::any::<bool>()), 1..120),
            coalesce in proptest::prelude::any::<bool>(),
        ) {
            let now = Instant::now();
            let mut c = ready_pieces(now, big_cfg(coalesce));
            let mut parts = Vec::new();
            let mut out = Vec::new();
            for (seq, (kind, take)) in (1u64..).zip(&steps) {
                let part = match kind { 0 => None, 1 => Some('a'), _ => Some('b') };
                parts.push(part);
                c.send_event(now, seq, piece(seq, part)).unwrap();
                if *take {
                    out.extend(std::iter::from_fn(|| c.poll_frame()));
                }
            }
            out.extend(std::iter::from_fn(|| c.poll_frame()));
            let mut next = 1;
            for f in &out {
                proptest::prop_assert_eq!(f.from, next);
                proptest::prop_assert!(f.seq >= f.from);
                let want: String = (f.from..=f.seq).map(|s| format!("<{s}>")).collect();
                proptest::prop_assert_eq!(&f.text, &want);
                for s in f.from..=f.seq {
                    proptest::prop_assert_eq!(parts[(s - 1) as usize], f.part);
                }
                next = f.seq + 1;
            }
            proptest::prop_assert_eq!(next, steps.len() as u64 + 1);
            proptest::prop_assert_eq!(out.len() as u64 + c.joined(), steps.len() as u64);
            if !coalesce {
                proptest::prop_assert_eq!(c.joined(), 0);
            }
        }
    }
}
