//! The connection actor: one task per WebSocket that reads it, runs its
//! timers and writes what publishers cannot.
//!
//! The loop is: write whatever the lifecycle ([`herald_core::Connection`])
//! releases — frames through the shared write half ([`crate::wire`]), pings
//! and the close framed by the WebSocket context — fetch the history page its
//! catch-up asks for, then wait for one of: a wake-up (the socket filled, a
//! close was decided), a lifecycle timer, the socket writable again, or an
//! inbound message. What an inbound frame means is decided by the core
//! ([`herald_core::session::on_text`]); the actor performs it. When the
//! transport ends, the lifecycle hands out the cleanup token once and the
//! actor runs the hub's cleanup with it.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::catchup::{HistoryRequest, Plan, decide_join};
use herald_core::protocol::{Hello, ServerFrame, codes};
use herald_core::ratelimit::{Bucket, Verdict};
use herald_core::session::{self, Inbound, Reply};
use herald_core::{CloseInfo, CloseReason, Initiator, State, Transmit};
use tokio::net::TcpStream;
use tracing::Instrument;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Message, Utf8Bytes};

use crate::admission::Slot;
use crate::agent::{CancelOut, MessageOut};
use crate::app::App;
use crate::auth::AuthError;
use crate::broker::{StoredEvent, user_stream};
use crate::clock;
use crate::connection::{ConnShared, Locked};
use crate::hub::{JoinError, KICKED};
use crate::telemetry;
use crate::wire::Flushed;
use crate::wire::OutFrame;

mod ai;
mod streams;

/// Which way the socket became ready.
enum Ready {
    Write,
    Read,
}

/// Inbound messages handled in a row before the actor waits once (its
/// timers and wake-up get their turn; the wait yields to other tasks).
const READS_PER_WAIT: u32 = 32;

/// Events read from history per page during a catch-up.
const HISTORY_PAGE: usize = 256;

/// An upgraded connection: the TCP stream, the bytes hyper read past the
/// HTTP request, and the WebSocket limits.
pub(crate) struct Socket {
    /// The stream itself.
    pub(crate) tcp: TcpStream,
    /// Bytes of the WebSocket protocol already read with the request.
    pub(crate) read: Bytes,
    /// Frame and message limits for reading.
    pub(crate) config: WebSocketConfig,
}

/// One connection from upgrade to cleanup: the actor is built here (the
/// connection registered), and the returned future runs it. The future is
/// the connection's task for its whole life, so it holds the actor and its
/// loop and nothing else (spawned on its own, not awaited inside the
/// upgrade's task, whose state would be carried along).
pub(crate) fn run(
    socket: Socket,
    app: Arc<App>,
    header_token: Option<String>,
    slot: Slot,
) -> impl Future<Output = ()> + Send + 'static {
    start(socket, app, header_token, slot, Mode::Herald)
}

/// One connection of the test-only echo endpoint: open at once (no
/// hello, no stream), every text or binary message queued back as it came,
/// through the same lifecycle and writer as [`run`]. No inbound rate limit:
/// the conformance suite sends thousands of frames in a burst.
pub(crate) fn run_echo(
    socket: Socket,
    app: Arc<App>,
    slot: Slot,
) -> impl Future<Output = ()> + Send + 'static {
    let messages = Arc::new(AtomicU64::new(0));
    start(socket, app, None, slot, Mode::Echo(messages))
}

/// One connection of the AI SDK endpoint (`GET /ai`): the user's stream
/// shown as the AI SDK's `WebSocketChatTransport` protocol ([`ai`]), joined
/// with the upgrade's token or the first frame's.
pub(crate) fn run_ai(
    socket: Socket,
    app: Arc<App>,
    header_token: Option<String>,
    slot: Slot,
) -> impl Future<Output = ()> + Send + 'static {
    start(socket, app, header_token, slot, Mode::Ai(Box::default()))
}

/// Close an echo connection once it has read no message for
/// `echo_idle_timeout` (checked a few times per bound; ends with it).
async fn echo_watchdog(conn: Arc<ConnShared>, idle: Duration, messages: Arc<AtomicU64>) {
    let messages_in = || messages.load(Ordering::Relaxed);
    let mut seen = messages_in();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(idle / 4).await;
        if conn.with_core(|c| c.state()) == State::Closed {
            return;
        }
        let now = messages_in();
        if now != seen {
            (seen, quiet_since) = (now, tokio::time::Instant::now());
        } else if quiet_since.elapsed() >= idle {
            conn.close(CloseInfo::new(
                CloseReason::HeartbeatTimeout,
                Initiator::Server,
                "echo connection idle",
            ));
            return;
        }
    }
}

/// What the connection speaks.
enum Mode {
    /// The Herald protocol (`/ws`).
    Herald,
    /// Echo (`/echo`, test only), with the messages it read so far (for its
    /// idle bound, [`echo_watchdog`]).
    Echo(Arc<AtomicU64>),
    /// The AI SDK's chat protocol (`/ai`), with what the socket follows.
    Ai(Box<ai::AiSession>),
}

fn start(
    socket: Socket,
    app: Arc<App>,
    header_token: Option<String>,
    slot: Slot,
    mode: Mode,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = Arc::new(ConnShared::new(app.next_conn_id(), app.lifecycle()));
    let Socket { tcp, read, config } = socket;
    // The bytes read past the request are a slice of hyper's read buffer:
    // copied, so that buffer is not kept for the connection's life.
    let leftover = read.to_vec();
    drop(read);
    let sock = Arc::new(tcp);
    conn.attach(sock.clone(), app.stats().clone());
    if matches!(mode, Mode::Ai(_)) {
        // The view joins deltas it has not written yet itself, and follows
        // runs from seq positions a joined frame could straddle.
        conn.with_locked(|l| {
            l.wire.present_ai();
            l.core.disable_coalescing();
        });
    }
    app.hub().insert(conn.clone());
    // At error level so it is enabled whenever any log is: warn and error lines
    // about a connection always carry its conn_id and user_id.
    let span =
        tracing::error_span!("conn", conn_id = %conn.id_str, user_id = tracing::field::Empty);
    let rate = app.config().rate_limit;
    let mut actor = Actor {
        io: Io {
            sock,
            ctx: WebSocketContext::from_partially_read(leftover, Role::Server, Some(config)),
            out: Vec::new(),
            readable: true,
            stopped: false,
        },
        conn,
        app,
        header_token,
        slot,
        span: span.clone(),
        bucket: Bucket::new(rate, clock::now()),
        replaying: false,
        mode,
        claims: None,
        sub_replaying: Vec::new(),
        typing_at: Vec::new(),
    };
    // The actor lives in this block and the loop borrows it: one copy of
    // it in the task (an `async fn` taking it by value would hold two).
    if let Mode::Echo(messages) = &actor.mode {
        let idle = actor.app.config().echo_idle_timeout;
        tokio::spawn(echo_watchdog(actor.conn.clone(), idle, messages.clone()));
    }
    let unwind = UnwindCleanup {
        conn: actor.conn.clone(),
        app: actor.app.clone(),
    };
    async move {
        // Dropped last: when the task ends normally, `finish` has already
        // taken the cleanup token and this does nothing; when a panic
        // unwinds the task, this is what closes and cleans up (I2).
        let _unwind = unwind;
        actor.open();
        actor.open_ai().await;
        let end = actor.drive().await;
        actor.finish(end);
    }
    .instrument(span)
}

/// The longest a token's expiry timer is set for (about 100 years): an `exp`
/// beyond it (up to u64::MAX seconds) would overflow the clock.
const MAX_TOKEN_LEFT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long a token with `exp` (Unix seconds) has left at `now`. An `exp`
/// centuries ahead is "does not expire while connected": clamped to
/// [`MAX_TOKEN_LEFT`], so the deadline is an instant the clock can represent.
fn token_left(exp: u64, now: u64) -> Duration {
    Duration::from_secs(exp.saturating_sub(now)).min(MAX_TOKEN_LEFT)
}

/// Cleanup on unwind: if a connection's task ends without [`Actor::finish`]
/// (a panic anywhere in it), the connection is closed and cleaned up all
/// the same, so it never stays live, counted and holding its user's place.
struct UnwindCleanup {
    conn: Arc<ConnShared>,
    app: Arc<App>,
}

impl Drop for UnwindCleanup {
    fn drop(&mut self) {
        let end = CloseInfo::new(
            CloseReason::Internal,
            Initiator::Server,
            "connection task failed",
        );
        // After `finish` the token is gone and nothing is left to do.
        let token = self.conn.with_locked(|l| {
            let token = l.core.on_transport_closed(end);
            if token.is_some() {
                l.wire.detach();
            }
            token
        });
        if let Some(info) = token {
            tracing::error!(conn_id = %self.conn.id_str, "connection task ended without its cleanup; cleaned up on unwind");
            self.app.hub().cleanup(&self.conn, &info);
        }
    }
}

struct Actor {
    io: Io,
    conn: Arc<ConnShared>,
    app: Arc<App>,
    header_token: Option<String>,
    /// This connection's place under the admission bounds (freed on drop).
    slot: Slot,
    span: tracing::Span,
    bucket: Bucket,
    /// The welcome announced a replay whose end (`caught_up`) is not sent yet.
    replaying: bool,
    mode: Mode,
    /// The token's claims, kept when they grant shared streams.
    claims: Option<Box<crate::auth::Claims>>,
    /// Subscriptions whose `subscribed` announced a replay not over yet.
    sub_replaying: Vec<u32>,
    /// When this connection last relayed `typing`, per subscription.
    typing_at: Vec<(u32, Instant)>,
}

impl Actor {
    /// Before the loop: an echo connection is open at once.
    fn open(&mut self) {
        tracing::debug!("connection opened");
        if matches!(self.mode, Mode::Echo(_))
            && self
                .conn
                .with_core(|c| c.open_without_hello(clock::now()))
                .is_ok()
        {
            self.slot.authenticated();
        }
    }

    /// After the loop: closed first, so sends are refused from now on, then
    /// the socket goes (a close reply still pending gets one last try;
    /// dropping the last handle closes the TCP connection), then cleanup.
    fn finish(mut self, end: CloseInfo) {
        // Gone without resuming them: the runs its aborts named stop now.
        self.ai_cancels_due(None);
        let token = self.conn.with_locked(|l| {
            let token = l.core.on_transport_closed(end);
            l.wire.flush(&mut l.core);
            l.wire.detach();
            token
        });
        drop(self.io);
        if let Some(info) = token {
            self.app.hub().cleanup(&self.conn, &info);
        }
    }

    /// Drive the connection until the transport ends; returns what ended it
    /// (used only if no close had been decided).
    async fn drive(&mut self) -> CloseInfo {
        // One timer for the connection's life, moved only when the next
        // deadline changes (creating a timer per wake-up showed in profiles).
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        // Messages read since the last wait: a peer that keeps the socket
        // readable must not keep the timers (and other tasks) from running.
        let mut reads = 0;
        loop {
            let write_deadline = match self.write_pending() {
                Ok(deadline) => deadline,
                Err(end) => return end,
            };
            if self.io.stopped
                && write_deadline.is_none()
                && self.conn.with_locked(|l| l.wire.close_written())
            {
                return gone(CloseReason::PeerGone, "failed after a protocol error");
            }
            if let Some(request) = self.conn.with_core(|c| c.wants_history()) {
                // Boxed: rare, large futures would otherwise be part of every
                // idle connection's task (the future is sized for its largest state).
                Box::pin(self.catch_up(request)).await;
                continue;
            }
            if let Some((id, request)) = self.conn.with_core(|c| c.wants_sub_history()) {
                Box::pin(self.catch_up_sub(id, request)).await;
                continue;
            }
            if self.conn.with_core(|c| c.should_drop_transport()) {
                return gone(CloseReason::PeerGone, "close handshake timed out");
            }
            if self.io.readable && !self.io.stopped && reads < READS_PER_WAIT {
                reads += 1;
                match self.io.read() {
                    Ok(Some(msg)) => {
                        Box::pin(self.on_message(msg)).await;
                        self.forward_control();
                        continue;
                    }
                    Ok(None) => {
                        if self.forward_control() {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.forward_control();
                        match classify_read_error(e) {
                            ReadEnd::Gone(info) => return info,
                            ReadEnd::Close(info) => {
                                // Fail the connection (RFC 6455 §7.1.7):
                                // nothing past the broken frame is read; the
                                // close frame is written, then the TCP
                                // connection is dropped.
                                self.conn.close(info);
                                self.io.stopped = true;
                                continue;
                            }
                        }
                    }
                }
            }
            let lifecycle = self.conn.with_core(|c| c.poll_timeout());
            let deadline = [lifecycle, write_deadline, self.ai_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std);
            if let Some(d) = deadline
                && timer.deadline() != d
            {
                timer.as_mut().reset(d);
            }
            reads = 0;
            let sock = self.io.sock.clone();
            let reading = !self.io.stopped;
            // The socket's readiness, polled in place: the `readable()` and
            // `writable()` futures would each sit in every connection's task.
            let ready = std::future::poll_fn(|cx| {
                if write_deadline.is_some()
                    && let Poll::Ready(r) = sock.poll_write_ready(cx)
                {
                    return Poll::Ready(r.map(|()| Ready::Write));
                }
                if reading && let Poll::Ready(r) = sock.poll_read_ready(cx) {
                    return Poll::Ready(r.map(|()| Ready::Read));
                }
                Poll::Pending
            });
            tokio::select! {
                _ = self.conn.woken() => {}
                _ = &mut timer, if deadline.is_some() => {
                    let now = clock::now();
                    if write_deadline.is_some_and(|d| now >= d) {
                        return write_timed_out();
                    }
                    self.conn.with_core(|c| c.handle_timeout(now));
                    self.ai_cancels_due(Some(now));
                }
                r = ready, if write_deadline.is_some() || reading => match r {
                    Ok(Ready::Write) => {}
                    Ok(Ready::Read) => self.io.readable = true,
                    Err(e) => return io_end(&e),
                },
            }
        }
    }

    /// Write what the lifecycle releases: frames through the shared write
    /// half (as publishers do), pings and the close framed by the
    /// WebSocket context. Returns when a full socket must drain by (the
    /// write timeout; the close timeout while closing), if it is full.
    fn write_pending(&mut self) -> Result<Option<Instant>, CloseInfo> {
        let (write_timeout, close_timeout) = (
            self.app.config().write_timeout,
            self.app.config().lifecycle.close_timeout,
        );
        let io = &mut self.io;
        self.conn.with_locked(|l| {
            loop {
                match l.wire.flush(&mut l.core) {
                    Flushed::Done => return Ok(None),
                    Flushed::Blocked => {
                        let limit = match l.core.state() {
                            State::Closing => close_timeout,
                            _ => write_timeout,
                        };
                        let since = l.wire.blocked_since().unwrap_or_else(clock::now);
                        return Ok(Some(since + limit));
                    }
                    Flushed::Actor => {}
                }
                if let Some(e) = l.wire.take_failure() {
                    return Err(io_end(&e));
                }
                match l.core.poll_transmit() {
                    None => return Ok(None),
                    // Only without a socket (never here): nothing to write to.
                    Some(Transmit::Frame(_)) => {}
                    Some(Transmit::Ping) => io.write(Message::Ping(Bytes::new()), l),
                    Some(Transmit::Close { code, reason }) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: Utf8Bytes::from(reason),
                        };
                        io.write(Message::Close(Some(frame)), l);
                    }
                }
            }
        })
    }

    /// Hand what the WebSocket context wrote while reading (pongs, the
    /// reply to a close) to the write half; true if there was any (the
    /// loop then writes it).
    fn forward_control(&mut self) -> bool {
        if self.io.out.is_empty() {
            return false;
        }
        let io = &mut self.io;
        self.conn.with_locked(|l| io.hand_over(l));
        true
    }

    /// Read what the catch-up asks for from the broker and hand it over. A
    /// gap (history evicted mid-catch-up) closes the connection (4001): the
    /// client resumes again and is told `reset` — never a silent gap.
    async fn catch_up(&mut self, request: HistoryRequest) {
        let (Some(stream), Some(epoch)) = (
            self.conn.stream().map(str::to_owned),
            self.conn.epoch().map(str::to_owned),
        ) else {
            return;
        };
        let broker = self.app.broker();
        let result = match request {
            HistoryRequest::Range { after, until } => {
                match broker
                    .history(&stream, &epoch, after, until, HISTORY_PAGE)
                    .await
                {
                    Ok(page) => {
                        metrics::counter!(telemetry::EVENTS_REPLAYED).increment(page.len() as u64);
                        let page = frames(page);
                        let replaying = &mut self.replaying;
                        self.conn
                            .with_core(|c| {
                                let pushed = c.push_history(page);
                                caught_up(c, replaying);
                                pushed
                            })
                            .map_err(|gap| gap.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            HistoryRequest::Runs { until } => {
                match broker.open_run_events(&stream, &epoch, until).await {
                    Ok(events) => {
                        metrics::counter!(telemetry::EVENTS_REPLAYED)
                            .increment(events.len() as u64);
                        let frames = frames(events).into_iter().map(|(_, _, f)| f);
                        let replaying = &mut self.replaying;
                        self.conn.with_core(|c| {
                            c.push_runs(frames);
                            caught_up(c, replaying);
                        });
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "catch-up failed");
            metrics::counter!(telemetry::RESETS, "cause" => "history_gone").increment(1);
            self.close(
                CloseReason::SlowConsumer,
                Initiator::Server,
                "history evicted during replay; resume again",
            );
        }
    }

    async fn on_message(&mut self, msg: Message) {
        let now = clock::now();
        self.conn.with_core(|c| c.on_inbound(now));
        if matches!(self.mode, Mode::Echo(_)) {
            self.echo(msg);
            return;
        }
        // Every frame counts against the inbound rate, control frames
        // included (unsolicited pongs are a flood like any other); only the
        // close frame is exempt, since it ends the connection anyway.
        if !matches!(msg, Message::Close(_)) {
            match self.bucket.check(now) {
                Verdict::Allow => {}
                Verdict::Reject { notify } => {
                    metrics::counter!(telemetry::RATE_LIMITED).increment(1);
                    if notify {
                        self.reply(&Reply::Error {
                            code: codes::RATE_LIMITED,
                            message: "too many frames; slow down".to_owned(),
                        });
                    }
                    return;
                }
                Verdict::Close => {
                    self.close(
                        CloseReason::PolicyViolation,
                        Initiator::Client,
                        "rate limit exceeded",
                    );
                    return;
                }
            }
        }
        match msg {
            Message::Text(text) if matches!(self.mode, Mode::Ai(_)) => {
                self.on_ai_text(text.as_str()).await;
            }
            Message::Text(text) => {
                let decision =
                    session::on_text(self.conn.state(), text.as_str(), &self.app.config().limits);
                self.perform(decision).await;
            }
            Message::Binary(_) => {
                self.close(
                    CloseReason::UnsupportedData,
                    Initiator::Client,
                    "binary frames are not supported",
                );
            }
            // The WebSocket context answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Close(frame) => self.on_close_frame(frame),
        }
    }

    /// The echo endpoint's answer to a message: the same message back.
    fn echo(&mut self, msg: Message) {
        if let Mode::Echo(messages) = &self.mode {
            messages.fetch_add(1, Ordering::Relaxed);
        }
        // A refusal (closing, queue full) is counted by `send`.
        let _ = match msg {
            Message::Text(text) => self.conn.send(OutFrame::text(text.as_str())),
            Message::Binary(bytes) => self.conn.send(OutFrame::binary(&bytes)),
            // The WebSocket context answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(frame) => {
                self.on_close_frame(frame);
                Ok(())
            }
        };
    }

    /// The peer's close frame: nothing more is written but the transport's reply.
    fn on_close_frame(&mut self, frame: Option<CloseFrame>) {
        let code = frame.map(|f| u16::from(f.code));
        self.conn.with_locked(|l| {
            l.wire.close_received();
            l.core.on_close_received(clock::now(), code);
        });
    }

    /// Carry out what the core decided an inbound frame means.
    async fn perform(&mut self, decision: Inbound) {
        match decision {
            Inbound::Ignore => {}
            Inbound::Close(info) => {
                self.conn.close(info);
            }
            Inbound::Reply(reply) => self.reply(&reply),
            Inbound::Hello(hello) => self.on_hello(hello).await,
            Inbound::Ack { seq } => self.conn.record_ack(seq),
            Inbound::Refresh { token } => self.on_refresh(&token),
            Inbound::Subscribe(sub) => Box::pin(self.on_subscribe(sub)).await,
            Inbound::Unsubscribe { stream } => self.on_unsubscribe(&stream),
            Inbound::Typing { stream } => self.on_typing(&stream).await,
            Inbound::Presence { stream } => Box::pin(self.on_presence(&stream)).await,
            Inbound::UserMessage(m) => {
                let Some(user) = self.conn.user() else { return };
                if let Some(stream) = &m.stream
                    && !self.conn.sub(stream).is_some_and(|s| s.write)
                {
                    // Not subscribed, or read only: refused, and nothing
                    // says whether the stream exists.
                    let nack = ServerFrame::Nack {
                        id: &m.id,
                        error: codes::FORBIDDEN,
                        message: Some("subscribe to the stream, with write permission, first"),
                        retry_after_ms: None,
                    };
                    let _ = self.conn.send(OutFrame::from(nack.to_json()));
                    return;
                }
                let msg = MessageOut {
                    stream: m.stream,
                    user_id: user.to_owned(),
                    thread_id: m.thread_id,
                    message_id: m.id,
                    text: m.text,
                    data: m.data,
                    conn_id: self.conn.id_str.clone(),
                    received_at: clock::now_rfc3339(),
                };
                self.app.inbound().submit_message(self.conn.clone(), msg);
            }
            Inbound::Cancel { run_id, stream } => self.on_cancel(run_id, stream).await,
        }
    }

    /// Authenticate, join the user's stream (live events are held from here
    /// on), read its position, decide resume or reset, and queue the welcome;
    /// the catch-up then replays history and merges it with the held events.
    async fn on_hello(&mut self, hello: Hello) {
        let Some(token) = hello.token.clone().or_else(|| self.header_token.take()) else {
            self.close(
                CloseReason::Unauthorized,
                Initiator::Client,
                "missing token",
            );
            return;
        };
        let Some((claims, pos)) = self.join_stream(&token).await else {
            return;
        };
        let user = claims.sub.as_str();
        let resume = hello.resume.as_ref().map(|r| (r.epoch.as_str(), r.seq));
        let decision = decide_join(&pos, resume, hello.replay_active_runs);
        if decision.reset
            && let Some((epoch, seq)) = resume
        {
            let cause = reset_cause(&pos, epoch, seq);
            metrics::counter!(telemetry::RESETS, "cause" => cause).increment(1);
        }
        let replaying = !matches!(decision.plan, Plan::Live { .. });
        let welcome = ServerFrame::Welcome {
            conn_id: &self.conn.id_str,
            user_id: user,
            epoch: &pos.epoch,
            seq: pos.last_seq,
            resumed: decision.resumed,
            reset: decision.reset,
            heartbeat_ms: self.app.config().lifecycle.heartbeat_interval.as_millis() as u64,
            replaying,
        }
        .to_json();
        self.replaying = replaying;
        self.conn.set_epoch(&pos.epoch);
        let now = clock::now();
        let authenticated = self
            .conn
            .with_core(|c| c.authenticate(now, OutFrame::from(welcome), decision.plan));
        if authenticated.is_ok() {
            if !claims.streams.is_empty() {
                self.claims = Some(Box::new(claims.clone()));
            }
            self.slot.authenticated();
            self.span.record("user_id", user);
            self.set_expiry(self.app.verifier().expires_at(&claims));
            self.set_rotation(now);
            tracing::debug!("hello accepted");
        }
    }

    /// Verify `token`, join its user's stream (live events are held from
    /// here on) and read the stream's position. `None` when refused: the
    /// connection is then closing (or already was) with the reason.
    async fn join_stream(
        &mut self,
        token: &str,
    ) -> Option<(crate::auth::Claims, herald_core::catchup::StreamPosition)> {
        // A kick from now on reaches this connection, joined or not yet.
        let kick_mark = self.app.hub().kick_mark();
        let claims = match self.app.verifier().verify(token) {
            Ok(c) => c,
            Err(AuthError::Expired) => {
                self.close(
                    CloseReason::TokenExpired,
                    Initiator::Client,
                    "token expired",
                );
                return None;
            }
            Err(e) => {
                self.close(CloseReason::Unauthorized, Initiator::Client, &e.to_string());
                return None;
            }
        };
        let user = claims.sub.as_str();
        let stream = user_stream(user);
        self.conn.set_user(user);
        let joined = self
            .app
            .hub()
            .join(
                &stream,
                &self.conn,
                self.app.config().max_connections_per_user,
                kick_mark,
            )
            .await;
        let position = match joined {
            Ok(()) => self
                .app
                .broker()
                .position(&stream)
                .await
                .map_err(JoinError::from),
            Err(e) => Err(e),
        };
        match position {
            Ok(pos) => Some((claims, pos)),
            Err(JoinError::UserFull) => {
                self.close(
                    CloseReason::Capacity,
                    Initiator::Server,
                    "too many connections for this user",
                );
                None
            }
            // Closing already (e.g. shutdown raced the hello): nothing to do.
            Err(JoinError::NotHandshaking) => None,
            Err(JoinError::Kicked) => {
                self.close(CloseReason::Kicked, Initiator::Server, KICKED);
                None
            }
            Err(JoinError::Broker(e)) => {
                tracing::warn!(error = %e, "broker failed at hello");
                self.close(
                    CloseReason::BrokerUnavailable,
                    Initiator::Server,
                    "history unavailable; try again later",
                );
                None
            }
        }
    }

    /// Forward a cancel only for a run that is open in this user's own stream.
    ///
    /// A run of a shared stream may be cancelled by any user subscribed to
    /// it with write permission; otherwise the answer is `forbidden`, as
    /// for a write, whether or not the stream exists.
    async fn on_cancel(&mut self, run_id: String, shared: Option<String>) {
        let (Some(user), Some(own)) = (
            self.conn.user().map(str::to_owned),
            self.conn.stream().map(str::to_owned),
        ) else {
            return;
        };
        if let Some(s) = &shared
            && !self.conn.sub(s).is_some_and(|sub| sub.write)
        {
            self.stream_error(
                s,
                codes::FORBIDDEN,
                "subscribe to the stream, with write permission, first",
            );
            return;
        }
        let stream = shared.clone().unwrap_or(own);
        let open = match self.app.broker().is_open_run(&stream, &run_id).await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "broker failed on cancel");
                false
            }
        };
        if !open {
            self.reply(&Reply::Error {
                code: codes::UNKNOWN_RUN,
                message: format!("no open run `{run_id}` for this user"),
            });
            return;
        }
        let cancel = CancelOut {
            stream: shared,
            user_id: user,
            run_id,
            conn_id: self.conn.id_str.clone(),
            received_at: clock::now_rfc3339(),
        };
        self.app.inbound().submit_cancel(self.conn.clone(), cancel);
    }

    fn on_refresh(&mut self, token: &str) {
        let result = self.app.verifier().verify(token).and_then(|c| {
            if Some(c.sub.as_str()) == self.conn.user() {
                Ok(c)
            } else {
                Err(AuthError::OtherSubject)
            }
        });
        match result {
            Ok(claims) => {
                self.set_expiry(self.app.verifier().expires_at(&claims));
                // The newer token's grants judge later subscribes, and the
                // subscriptions held now.
                self.claims = (!claims.streams.is_empty()).then(|| Box::new(claims));
                self.recheck_subscriptions();
            }
            Err(e) => self.reply(&Reply::Error {
                code: codes::INVALID_TOKEN,
                message: format!("refresh rejected: {e}"),
            }),
        }
    }

    /// With `max_connection_age`: rotate this connection after it, plus a
    /// random fifth of it at most (a fleet's connections, opened together,
    /// do not reconnect in one wave); told to come back at once.
    fn set_rotation(&self, now: Instant) {
        let Some(age) = self.app.config().max_connection_age else {
            return;
        };
        let at = now + age + age.mul_f64(rand::random::<f64>() / 5.0);
        let notice = ServerFrame::Closing {
            reason: "rotate",
            reconnect_after_ms: rand::random_range(0..=250),
        }
        .to_json();
        self.conn
            .with_core(|c| c.set_rotation(at, OutFrame::from(notice)));
    }

    fn set_expiry(&self, exp: u64) {
        let at = clock::now() + token_left(exp, clock::unix_now());
        self.conn.with_core(|c| c.set_token_expiry(Some(at)));
    }

    fn reply(&self, reply: &Reply) {
        // A refusal (closing, queue full) is counted by `send`; nothing else to do.
        let _ = self.conn.send(OutFrame::from(reply.to_json()));
    }

    fn close(&self, reason: CloseReason, initiator: Initiator, detail: &str) {
        self.conn.close(CloseInfo::new(reason, initiator, detail));
    }
}

/// History events as wire frames, with their seqs.
/// Once the replay announced by the welcome is over, queue `caught_up`
/// right after its last frame (in the same lock as the push, so no live
/// event comes between).
fn caught_up(core: &mut herald_core::Connection<OutFrame>, replaying: &mut bool) {
    if *replaying && !core.catching_up() {
        *replaying = false;
        let frame = ServerFrame::CaughtUp {
            seq: core.sent_seq(),
            stream: None,
        };
        core.push_catch_up_frame(OutFrame::from(frame.to_json()));
    }
}

/// Stored events as replayed frames, each with the seqs it covers.
fn frames(events: Vec<StoredEvent>) -> Vec<(u64, u64, OutFrame)> {
    events
        .into_iter()
        .filter_map(|e| {
            let (from, seq) = (e.from, e.seq);
            match OutFrame::replayed(e) {
                Some(f) => Some((from, seq, f)),
                None => {
                    tracing::error!(seq, "stored event is not UTF-8; skipped");
                    None
                }
            }
        })
        .collect()
}

fn gone(reason: CloseReason, detail: &str) -> CloseInfo {
    CloseInfo::new(reason, Initiator::Client, detail)
}

/// How a read error ends the connection.
enum ReadEnd {
    /// The transport is unusable: drop it.
    Gone(CloseInfo),
    /// The peer broke the rules: write a close frame with this reason, then drop.
    Close(CloseInfo),
}

fn classify_read_error(err: tungstenite::Error) -> ReadEnd {
    use tungstenite::Error as WsError;
    use tungstenite::error::ProtocolError;
    match err {
        WsError::Capacity(c) => ReadEnd::Close(CloseInfo::new(
            CloseReason::MessageTooBig,
            Initiator::Client,
            c.to_string(),
        )),
        WsError::Utf8(_) => ReadEnd::Close(CloseInfo::new(
            CloseReason::InvalidUtf8,
            Initiator::Client,
            "invalid UTF-8",
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ReadEnd::Gone(gone(CloseReason::PeerGone, "reset"))
        }
        WsError::Protocol(p) => ReadEnd::Close(CloseInfo::new(
            CloseReason::WebSocketViolation,
            Initiator::Client,
            p.to_string(),
        )),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            ReadEnd::Gone(gone(CloseReason::PeerGone, "closed"))
        }
        WsError::Io(io) => ReadEnd::Gone(io_end(&io)),
        other => ReadEnd::Gone(CloseInfo::new(
            CloseReason::IoError,
            Initiator::Client,
            other.to_string(),
        )),
    }
}

/// Why a resume from (`epoch`, `seq`) was refused, as the `cause` label of
/// `herald_resets_total`.
fn reset_cause(pos: &herald_core::catchup::StreamPosition, epoch: &str, seq: u64) -> &'static str {
    if epoch != pos.epoch {
        "unknown_epoch"
    } else if seq > pos.last_seq {
        "ahead"
    } else {
        "evicted"
    }
}

/// Peer resets, broken pipes and EOFs are ordinary; anything else is not.
fn io_end(io: &std::io::Error) -> CloseInfo {
    use std::io::ErrorKind::*;
    match io.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => {
            gone(CloseReason::PeerGone, &io.kind().to_string())
        }
        _ => CloseInfo::new(CloseReason::IoError, Initiator::Client, io.to_string()),
    }
}

fn write_timed_out() -> CloseInfo {
    CloseInfo::new(
        CloseReason::SlowConsumer,
        Initiator::Server,
        "socket write timed out",
    )
}

/// The actor's side of the socket: the reading WebSocket context (RFC
/// 6455-strict, from tungstenite) and the control frames it writes.
struct Io {
    sock: Arc<TcpStream>,
    ctx: WebSocketContext,
    /// What the context wrote (pongs, close frames), for the write half.
    out: Vec<u8>,
    /// Try a read without waiting for readiness (set when the socket said
    /// readable and no read has come back empty since).
    readable: bool,
    /// Reading is over (the peer broke the protocol).
    stopped: bool,
}

impl Io {
    /// The next complete message, if the bytes for it have arrived.
    fn read(&mut self) -> Result<Option<Message>, tungstenite::Error> {
        let mut stream = SyncIo {
            sock: &self.sock,
            out: &mut self.out,
        };
        let result = self.ctx.read(&mut stream);
        // Whatever the read made due (a pong, the close reply) goes out now.
        let _ = self.ctx.flush(&mut stream);
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Frame a ping or close with the context (so it knows the close
    /// handshake's state) and hand the bytes to the write half.
    fn write(&mut self, msg: Message, l: &mut Locked) {
        let mut stream = SyncIo {
            sock: &self.sock,
            out: &mut self.out,
        };
        if let Err(e) = self.ctx.write(&mut stream, msg) {
            // The context refuses once a close was received: it replies itself.
            tracing::debug!(error = %e, "control frame not written");
        }
        let _ = self.ctx.flush(&mut stream);
        self.hand_over(l);
    }

    /// Move what the context wrote to the write half.
    fn hand_over(&mut self, l: &mut Locked) {
        l.wire
            .push_transport(Bytes::from(std::mem::take(&mut self.out)));
    }
}

/// The socket as the WebSocket context sees it: reads come from the TCP
/// stream without blocking; writes (control frames only) are collected.
struct SyncIo<'a> {
    sock: &'a TcpStream,
    out: &'a mut Vec<u8>,
}

impl Read for SyncIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.try_read(buf)
    }
}

impl Write for SyncIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation testing (issue 41): a token's lifetime is honoured exactly
    /// up to a century, and only an absurd `exp` is clamped.
    #[test]
    fn a_token_lifetime_is_clamped_only_beyond_a_century() {
        let now = 1_800_000_000;
        let fifty_years = 50 * 365 * 24 * 3600;
        assert_eq!(token_left(now + 60, now), Duration::from_secs(60));
        assert_eq!(token_left(now - 5, now), Duration::ZERO, "already expired");
        assert_eq!(
            token_left(now + fifty_years, now),
            Duration::from_secs(fifty_years)
        );
        assert_eq!(token_left(u64::MAX, now), MAX_TOKEN_LEFT);
        assert!(MAX_TOKEN_LEFT >= Duration::from_secs(99 * 365 * 24 * 3600));
        // The clamped deadline is an instant the clock can represent.
        assert!(clock::now().checked_add(MAX_TOKEN_LEFT).is_some());
    }

    /// Mutation testing (issue 41): the echo watchdog closes a connection
    /// silent for `idle` within a quarter of it more, and never one that
    /// keeps sending (paused time: each step is exact).
    #[tokio::test(start_paused = true)]
    async fn the_echo_watchdog_closes_silent_connections_only() {
        let idle = Duration::from_secs(4);
        let ready = || {
            let conn = Arc::new(ConnShared::new(1, herald_core::LifecycleConfig::default()));
            conn.with_core(|c| c.open_without_hello(clock::now()))
                .unwrap();
            conn
        };
        // Silent: open at 3.9 s, closed by 5 s (checked every idle / 4).
        let silent = ready();
        tokio::spawn(echo_watchdog(silent.clone(), idle, Arc::default()));
        tokio::time::sleep(Duration::from_millis(3900)).await;
        assert_eq!(silent.state(), State::Ready, "closed before `idle`");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_ne!(silent.state(), State::Ready, "open past idle + idle / 4");
        // A message every 3 s: open after 30 s.
        let busy = ready();
        let messages = Arc::new(AtomicU64::new(0));
        tokio::spawn(echo_watchdog(busy.clone(), idle, messages.clone()));
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            messages.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(
            busy.state(),
            State::Ready,
            "a connection that sends stays open"
        );
    }

    /// Issue 37, finding 5: a connection task that panics is still closed
    /// and cleaned up once (the guard dropped in the unwind), so it does not
    /// stay live in the hub, counted, holding its user's place.
    #[tokio::test]
    async fn a_connection_task_that_panics_is_cleaned_up_on_unwind() {
        let config = crate::config::Config::for_tests(
            "unit-secret-0123456789-abcdefghijklmnop",
            "k-0123456789abcdef",
        );
        let app = App::new(config, None).unwrap();
        let conn = Arc::new(ConnShared::new(app.next_conn_id(), app.lifecycle()));
        app.hub().insert(conn.clone());
        assert_eq!(app.hub().len(), 1);
        let unwind = UnwindCleanup {
            conn: conn.clone(),
            app: app.clone(),
        };
        let task = tokio::spawn(async move {
            let _unwind = unwind;
            panic!("a bug in the connection task");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(app.hub().len(), 0, "the connection was left in the hub");
        assert_eq!(conn.with_core(|c| c.state()), State::Closed);
        let stats = app.stats().snapshot();
        assert_eq!((stats.cleanups, stats.duplicate_cleanups), (1, 0));
    }

    /// Mutation testing (issue 17): the cause label of a refused resume.
    #[test]
    fn a_refused_resume_is_labelled_with_its_cause() {
        let pos = herald_core::catchup::StreamPosition {
            epoch: "e1".into(),
            last_seq: 10,
            first_seq: 5,
        };
        assert_eq!(reset_cause(&pos, "e0", 3), "unknown_epoch");
        assert_eq!(reset_cause(&pos, "e0", 10), "unknown_epoch");
        assert_eq!(reset_cause(&pos, "e1", 11), "ahead");
        assert_eq!(
            reset_cause(&pos, "e1", 10),
            "evicted",
            "at the end is not ahead"
        );
        assert_eq!(reset_cause(&pos, "e1", 2), "evicted");
    }

    /// Mutation testing (issue 17): a peer that went away is `peer_gone`;
    /// any other I/O failure is an error.
    #[test]
    fn ordinary_transport_ends_are_peer_gone() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::BrokenPipe,
            ErrorKind::UnexpectedEof,
            ErrorKind::NotConnected,
        ] {
            assert_eq!(
                io_end(&Error::from(kind)).reason,
                CloseReason::PeerGone,
                "{kind:?}"
            );
        }
        let other = io_end(&Error::other("disk on fire"));
        assert_eq!(other.reason, CloseReason::IoError);
    }
}
