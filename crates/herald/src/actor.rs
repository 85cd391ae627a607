//! The connection actor: one task per WebSocket that owns the socket and is the
//! only code that writes to it.
//!
//! The loop is: write whatever the lifecycle ([`herald_core::Connection`])
//! says to write, fetch the history page its catch-up asks for, then wait for
//! one of: a wake-up (someone queued a frame or decided a close), a lifecycle
//! timer, or an inbound message. What an inbound frame means is decided by
//! the core ([`herald_core::session::on_text`]); the actor performs it. When
//! the transport ends, the lifecycle hands out the cleanup token once and the
//! actor runs the hub's cleanup with it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use herald_core::catchup::{HistoryRequest, Plan, decide_join};
use herald_core::protocol::{Hello, ServerFrame, codes};
use herald_core::ratelimit::{Bucket, Verdict};
use herald_core::session::{self, Inbound, Reply};
use herald_core::{CloseInfo, CloseReason, Initiator, Payload, State, Transmit};
use tracing::Instrument;

use crate::admission::Slot;
use crate::agent::{CancelOut, MessageOut};
use crate::app::App;
use crate::auth::AuthError;
use crate::broker::{StoredEvent, user_stream};
use crate::clock;
use crate::connection::{Body, ConnShared, OutFrame};
use crate::hub::{JoinError, KICKED};
use crate::telemetry::{self, Stats};

/// Events read from history per page during a catch-up.
const HISTORY_PAGE: usize = 256;

/// Run one connection from upgrade to cleanup.
pub(crate) async fn run(
    socket: WebSocket,
    app: Arc<App>,
    header_token: Option<String>,
    slot: Slot,
) {
    start(socket, app, header_token, slot, Mode::Herald).await
}

/// Run one connection of the test-only echo endpoint: open at once (no
/// hello, no stream), every text or binary message queued back as it came,
/// through the same lifecycle and writer as [`run`]. No inbound rate limit:
/// the conformance suite sends thousands of frames in a burst.
pub(crate) async fn run_echo(socket: WebSocket, app: Arc<App>, slot: Slot) {
    start(socket, app, None, slot, Mode::Echo).await
}

/// What the connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The Herald protocol (`/ws`).
    Herald,
    /// Echo (`/echo`, test only).
    Echo,
}

async fn start(
    socket: WebSocket,
    app: Arc<App>,
    header_token: Option<String>,
    slot: Slot,
    mode: Mode,
) {
    let conn = Arc::new(ConnShared::new(
        app.next_conn_id(),
        app.config().lifecycle.clone(),
    ));
    app.hub().insert(conn.clone());
    // At error level so it is enabled whenever any log is: warn and error lines
    // about a connection always carry its conn_id and user_id.
    let span =
        tracing::error_span!("conn", conn_id = %conn.id_str, user_id = tracing::field::Empty);
    let rate = app.config().rate_limit;
    let actor = Actor {
        wire: Wire {
            ws: socket,
            after_close: AfterClose::default(),
            stats: app.stats().clone(),
            metrics: WireMetrics::new(),
            unflushed_published: Vec::new(),
        },
        conn,
        app,
        header_token,
        slot,
        span: span.clone(),
        bucket: Bucket::new(rate, clock::now()),
        replaying: false,
        mode,
    };
    actor.run().instrument(span).await
}

struct Actor {
    wire: Wire,
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
}

impl Actor {
    async fn run(mut self) {
        tracing::debug!("connection opened");
        if self.mode == Mode::Echo
            && self
                .conn
                .with_core(|c| c.open_without_hello(clock::now()))
                .is_ok()
        {
            self.slot.authenticated();
        }
        let end = self.drive().await;
        // Closed first, so sends are refused from now on, then the socket
        // goes (dropping it closes the TCP connection), then cleanup.
        let token = self.conn.with_core(|c| c.on_transport_closed(end));
        drop(self.wire);
        if let Some(info) = token {
            self.app.hub().cleanup(&self.conn, &info);
        }
    }

    /// Drive the connection until the transport ends; returns what ended it
    /// (used only if no close had been decided).
    async fn drive(&mut self) -> CloseInfo {
        // One timer for the connection's life, moved only when the lifecycle's
        // next deadline changes (creating a timer per wake-up showed in profiles).
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        loop {
            if let Err(end) = self.write_pending().await {
                return end;
            }
            if let Some(request) = self.conn.with_core(|c| c.wants_history()) {
                // Boxed: rare, large futures would otherwise be part of every
                // idle connection's task (the future is sized for its largest state).
                Box::pin(self.catch_up(request)).await;
                continue;
            }
            if self.conn.with_core(|c| c.should_drop_transport()) {
                return gone(CloseReason::PeerGone, "close handshake timed out");
            }
            let deadline = self
                .conn
                .with_core(|c| c.poll_timeout())
                .map(tokio::time::Instant::from_std);
            if let Some(d) = deadline
                && timer.deadline() != d
            {
                timer.as_mut().reset(d);
            }
            tokio::select! {
                _ = self.conn.woken() => {}
                _ = &mut timer, if deadline.is_some() => self.conn.with_core(|c| c.handle_timeout(clock::now())),
                msg = self.wire.ws.recv() => match msg {
                    None => return gone(CloseReason::PeerGone, "eof"),
                    Some(Err(e)) => match classify_read_error(e) {
                        ReadEnd::Gone(info) => return info,
                        ReadEnd::Close(info) => { self.conn.close(info); }
                    },
                    Some(Ok(m)) => Box::pin(self.on_message(m)).await,
                },
            }
        }
    }

    /// Write everything the lifecycle releases, then flush once.
    async fn write_pending(&mut self) -> Result<(), CloseInfo> {
        let limit = match self.conn.state() {
            State::Closing => self.app.config().lifecycle.close_timeout,
            _ => self.app.config().write_timeout,
        };
        let mut unflushed = false;
        while let Some(t) = self.conn.with_core(|c| c.poll_transmit()) {
            match t {
                Transmit::Frame(f) => {
                    self.wire.feed(f, limit).await?;
                    unflushed = true;
                }
                Transmit::Ping => {
                    self.wire.ping(limit).await?;
                    unflushed = true;
                }
                Transmit::Close { code, reason } => {
                    self.wire.close(code, reason, limit).await?;
                    unflushed = false;
                }
            }
        }
        if unflushed {
            self.wire.flush(limit).await?;
        }
        Ok(())
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
        if self.mode == Mode::Echo {
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
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(frame) => self.on_close_frame(frame),
        }
    }

    /// The echo endpoint's answer to a message: the same message back.
    fn echo(&mut self, msg: Message) {
        // A refusal (closing, queue full) is counted by `send`.
        let _ = match msg {
            Message::Text(text) => self.conn.send(OutFrame::text(text)),
            Message::Binary(bytes) => self.conn.send(OutFrame::binary(bytes)),
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(frame) => {
                self.on_close_frame(frame);
                Ok(())
            }
        };
    }

    /// The peer's close frame: nothing more is written but the transport's reply.
    fn on_close_frame(&mut self, frame: Option<CloseFrame>) {
        self.wire.after_close.close_seen();
        let code = frame.map(|f| f.code);
        self.conn
            .with_core(|c| c.on_close_received(clock::now(), code));
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
            Inbound::UserMessage(m) => {
                let Some(user) = self.conn.user() else { return };
                let msg = MessageOut {
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
            Inbound::Cancel { run_id } => self.on_cancel(run_id).await,
        }
    }

    /// Authenticate, join the user's stream (live events are held from here
    /// on), read its position, decide resume or reset, and queue the welcome;
    /// the catch-up then replays history and merges it with the held events.
    async fn on_hello(&mut self, hello: Hello) {
        // A kick from now on reaches this connection, joined or not yet.
        let kick_mark = self.app.hub().kick_mark();
        let Some(token) = hello.token.clone().or_else(|| self.header_token.take()) else {
            self.close(
                CloseReason::Unauthorized,
                Initiator::Client,
                "missing token",
            );
            return;
        };
        let claims = match self.app.verifier().verify(&token) {
            Ok(c) => c,
            Err(AuthError::Expired) => {
                self.close(
                    CloseReason::TokenExpired,
                    Initiator::Client,
                    "token expired",
                );
                return;
            }
            Err(e) => {
                self.close(CloseReason::Unauthorized, Initiator::Client, &e.to_string());
                return;
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
        let pos = match position {
            Ok(pos) => pos,
            Err(JoinError::UserFull) => {
                self.close(
                    CloseReason::Capacity,
                    Initiator::Server,
                    "too many connections for this user",
                );
                return;
            }
            // Closing already (e.g. shutdown raced the hello): nothing to do.
            Err(JoinError::NotHandshaking) => return,
            Err(JoinError::Kicked) => {
                self.close(CloseReason::Kicked, Initiator::Server, KICKED);
                return;
            }
            Err(JoinError::Broker(e)) => {
                tracing::warn!(error = %e, "broker failed at hello");
                self.close(
                    CloseReason::BrokerUnavailable,
                    Initiator::Server,
                    "history unavailable; try again later",
                );
                return;
            }
        };
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
            self.slot.authenticated();
            self.span.record("user_id", user);
            self.set_expiry(self.app.verifier().expires_at(&claims));
            tracing::debug!("hello accepted");
        }
    }

    /// Forward a cancel only for a run that is open in this user's own stream.
    async fn on_cancel(&mut self, run_id: String) {
        let (Some(user), Some(stream)) = (
            self.conn.user().map(str::to_owned),
            self.conn.stream().map(str::to_owned),
        ) else {
            return;
        };
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
            Ok(claims) => self.set_expiry(self.app.verifier().expires_at(&claims)),
            Err(e) => self.reply(&Reply::Error {
                code: codes::INVALID_TOKEN,
                message: format!("refresh rejected: {e}"),
            }),
        }
    }

    fn set_expiry(&self, exp: u64) {
        let left = Duration::from_secs(exp.saturating_sub(clock::unix_now()));
        let at = clock::now() + left;
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

fn classify_read_error(e: axum::Error) -> ReadEnd {
    use tungstenite::Error as WsError;
    use tungstenite::error::ProtocolError;
    let err = match e.into_inner().downcast::<WsError>() {
        Ok(err) => *err,
        Err(other) => {
            return ReadEnd::Gone(CloseInfo::new(
                CloseReason::IoError,
                Initiator::Client,
                other.to_string(),
            ));
        }
    };
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

/// The last-line check of invariant I1: once a close frame was written or
/// received, every further write is refused and counted in
/// [`Stats::frames_after_close`] (which must stay 0).
#[derive(Default)]
struct AfterClose {
    close_seen: bool,
}

impl AfterClose {
    /// A close frame was written or received.
    fn close_seen(&mut self) {
        self.close_seen = true;
    }

    /// Whether a frame may still be written; counts the violation in
    /// `stats` if not.
    fn permit(&self, stats: &Stats) -> bool {
        if self.close_seen {
            stats.frames_after_close.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::INVARIANT_VIOLATIONS, "kind" => "frame_after_close")
                .increment(1);
            tracing::error!("refused a write after the close frame");
            return false;
        }
        true
    }
}

/// The socket's write side; every write passes [`AfterClose::permit`].
struct Wire {
    ws: WebSocket,
    after_close: AfterClose,
    stats: Arc<Stats>,
    metrics: WireMetrics,
    /// Publish times of live events fed since the last flush.
    unflushed_published: Vec<Instant>,
}

/// Metric handles resolved once per connection, not per frame.
struct WireMetrics {
    frames: metrics::Counter,
    bytes: metrics::Counter,
    latency: metrics::Histogram,
}

impl WireMetrics {
    fn new() -> Self {
        Self {
            frames: metrics::counter!(telemetry::FRAMES_OUT),
            bytes: metrics::counter!(telemetry::BYTES_OUT),
            latency: metrics::histogram!(telemetry::PUBLISH_TO_WRITE),
        }
    }
}

impl Wire {
    fn permit(&self) -> bool {
        self.after_close.permit(&self.stats)
    }

    async fn feed(&mut self, frame: OutFrame, limit: Duration) -> Result<(), CloseInfo> {
        if !self.permit() {
            return Ok(());
        }
        let len = frame.wire_len();
        let msg = match frame.body {
            Body::Text(text) => Message::Text(text),
            Body::Binary(bytes) => Message::Binary(bytes),
        };
        timed(limit, self.ws.feed(msg)).await?;
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.metrics.frames.increment(1);
        self.metrics.bytes.increment(len as u64);
        if let Some(at) = frame.published {
            self.unflushed_published.push(at);
        }
        Ok(())
    }

    async fn ping(&mut self, limit: Duration) -> Result<(), CloseInfo> {
        if !self.permit() {
            return Ok(());
        }
        timed(limit, self.ws.feed(Message::Ping(Default::default()))).await
    }

    async fn close(&mut self, code: u16, reason: String, limit: Duration) -> Result<(), CloseInfo> {
        if !self.permit() {
            return Ok(());
        }
        self.after_close.close_seen();
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        timed(limit, self.ws.send(Message::Close(Some(frame)))).await
    }

    async fn flush(&mut self, limit: Duration) -> Result<(), CloseInfo> {
        timed(limit, SinkExt::<Message>::flush(&mut self.ws)).await?;
        let now = clock::now();
        for at in self.unflushed_published.drain(..) {
            self.metrics
                .latency
                .record(now.saturating_duration_since(at).as_secs_f64());
        }
        Ok(())
    }
}

async fn timed(
    limit: Duration,
    fut: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), CloseInfo> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(match classify_read_error(e) {
            ReadEnd::Gone(info) | ReadEnd::Close(info) => info,
        }),
        Err(_) => Err(CloseInfo::new(
            CloseReason::SlowConsumer,
            Initiator::Server,
            "socket write timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17, finding 4: the I1 counter counts. Every other test asserts
    /// it stays 0; this one shows a write after the close is refused and
    /// counted, so those zeros mean something.
    #[test]
    fn a_write_after_the_close_frame_is_refused_and_counted() {
        let stats = Stats::default();
        let mut guard = AfterClose::default();
        assert!(guard.permit(&stats), "writes before the close pass");
        assert!(guard.permit(&stats));
        assert_eq!(stats.snapshot().frames_after_close, 0);
        guard.close_seen();
        assert!(!guard.permit(&stats), "a write after the close is refused");
        assert!(!guard.permit(&stats));
        assert_eq!(stats.snapshot().frames_after_close, 2);
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
