//! Logs (`tracing`) and metrics (`metrics` with a Prometheus exporter).
//!
//! Metric names live here so the full set is visible in one place and in
//! docs/OPERATIONS.md.

use std::sync::OnceLock;

use herald_core::{CloseInfo, SendRefused};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub(crate) mod latency;
pub mod vitals;

/// Gauge: live WebSocket connections (any state but closed).
pub const CONNECTIONS_LIVE: &str = "herald_connections_live";
/// Counter: connections upgraded.
pub const CONNECTIONS_OPENED: &str = "herald_connections_opened_total";
/// Counter: connections closed, labelled `reason` and `initiator`.
pub const CONNECTIONS_CLOSED: &str = "herald_connections_closed_total";
/// Counter: sends refused, labelled `reason`.
pub const SENDS_REFUSED: &str = "herald_sends_refused_total";
/// Counter: frames written to sockets.
pub const FRAMES_OUT: &str = "herald_frames_out_total";
/// Counter: bytes of text frames written to sockets.
pub const BYTES_OUT: &str = "herald_bytes_out_total";
/// Histogram: seconds from an event's publish to its socket write being flushed.
pub const PUBLISH_TO_WRITE: &str = "herald_publish_to_write_seconds";
/// Gauge: connections by lifecycle state (label `state`), computed at scrape.
pub const CONNECTIONS_BY_STATE: &str = "herald_connections";
/// Gauge: frames waiting in all outbound queues, computed at scrape.
pub const QUEUED_FRAMES: &str = "herald_queued_frames";
/// Gauge: the deepest outbound queue, in frames, computed at scrape.
pub const QUEUE_DEPTH_MAX: &str = "herald_queue_depth_max";
/// Counter: events published through the API.
pub const EVENTS_PUBLISHED: &str = "herald_events_published_total";
/// Counter: event deliveries queued to connections.
pub const EVENTS_QUEUED: &str = "herald_event_deliveries_total";
/// Counter: live text deltas joined into a queued frame of their part
/// (each one a frame not written).
pub const DELTAS_JOINED: &str = "herald_text_deltas_joined_total";
/// Counter: events written from history during catch-up (resume, run replay).
pub const EVENTS_REPLAYED: &str = "herald_events_replayed_total";
/// Gauge: events held in history.
pub const HISTORY_EVENTS: &str = "herald_history_events";
/// Gauge: memory charged to `history_max_bytes` (payload, per-event, per-stream and idempotency-key overheads).
pub const HISTORY_BYTES: &str = "herald_history_bytes";
/// Gauge: tasks alive in the server's runtime (connections, requests, flushes, background loops).
pub const TASKS_ALIVE: &str = "herald_tasks_alive";
/// Counter: runs closed by the server because they outgrew `run_max_bytes`.
pub const RUNS_TOO_LARGE: &str = "herald_runs_too_large_total";
/// Counter: runs closed by the server because their stream had `max_open_runs` open.
pub const RUNS_TOO_MANY: &str = "herald_runs_too_many_total";
/// Counter: runs closed by the server after `run_ttl` of silence.
pub const RUNS_TIMED_OUT: &str = "herald_runs_timed_out_total";
/// Counter: user messages, labelled `outcome` (`accepted`, `duplicate`, `nack`, `busy`).
pub const MESSAGES: &str = "herald_user_messages_total";
/// Counter: AI SDK chat turns (`send` on `/ai`) handed to the agent
/// backend, labelled `outcome` (`accepted`, `nack`).
pub const CHAT_REQUESTS: &str = "herald_chat_requests_total";
/// Counter: AI SDK `send` frames refused before a run was opened, labelled
/// `reason` (`active`: a response is active for the chat; `unavailable`).
pub const CHAT_REFUSED: &str = "herald_chat_refused_total";
/// Counter: `subscribe` frames to shared streams, labelled `outcome`
/// (`subscribed`, `forbidden`, `unavailable`).
pub const SUBSCRIBES: &str = "herald_subscribes_total";
/// Counter: `typing` frames to shared streams, labelled `outcome`
/// (`relayed`, `dropped`: within a second of the last one relayed).
pub const TYPING: &str = "herald_typing_total";
/// Gauge: user message ids remembered for deduplication on this node.
pub const MESSAGE_IDS_REMEMBERED: &str = "herald_message_ids_remembered";
/// Gauge: agent backend requests in flight on this node.
pub const BACKEND_IN_FLIGHT: &str = "herald_backend_requests_in_flight";
/// Counter: webhook attempts, labelled `outcome` (`ok`, `rejected`, `retryable_failure`).
pub const WEBHOOK_REQUESTS: &str = "herald_webhook_requests_total";
/// Counter: inbound frames dropped by the rate limit.
pub const RATE_LIMITED: &str = "herald_inbound_rate_limited_total";
/// Counter: upgrades refused, labelled `reason` (`draining`, `capacity`).
pub const UPGRADES_REFUSED: &str = "herald_upgrades_refused_total";
/// Counter: HTTP connections refused at accept because `max_http_connections` were being served.
pub const HTTP_CONNECTIONS_REFUSED: &str = "herald_http_connections_refused_total";
/// Counter: broker operations a stream's own data refused (a damaged stream; not counted as Redis down).
pub const BROKER_STREAM_ERRORS: &str = "herald_broker_stream_errors_total";
/// Counter: broker (Redis) command failures.
pub const BROKER_ERRORS: &str = "herald_broker_errors_total";
/// Histogram: seconds a broker publish took (the Redis script round trip).
pub const BROKER_PUBLISH_SECONDS: &str = "herald_broker_publish_seconds";
/// Counter: fleet requests (kick, listing, cancel) that some node did not answer in time.
pub const FLEET_INCOMPLETE: &str = "herald_fleet_requests_incomplete_total";
/// Counter: broker command connections replaced after a command timed out.
pub const BROKER_RECONNECTS: &str = "herald_broker_reconnects_total";
/// Counter: times the broker's pub/sub connection came back after a drop.
pub const BROKER_PUBSUB_RECONNECTS: &str = "herald_broker_pubsub_reconnects_total";
/// Counter: streams resynced (their connections caught up from history) after a pub/sub drop.
pub const BROKER_CATCH_UPS: &str = "herald_broker_catch_ups_total";
/// Counter: resumes answered with `reset` and catch-ups ended by a gap,
/// labelled `cause` (`unknown_epoch`, `ahead`, `evicted`, `history_gone`, `epoch_changed`).
pub const RESETS: &str = "herald_resets_total";
/// Counter: invariant violations detected at runtime (must stay 0), labelled `kind`.
pub const INVARIANT_VIOLATIONS: &str = "herald_invariant_violations_total";

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide Prometheus recorder (once) and return its handle.
/// Returns `None` if another recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            // `herald_publish_to_write_seconds` is not the recorder's: see
            // `latency`, rendered with its output by [`render`].
            PrometheusBuilder::new().install_recorder().ok()
        })
        .clone()
}

/// The Prometheus text exposition: the recorder's metrics and the
/// publish→write latency histogram.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    latency::render(PUBLISH_TO_WRITE, &mut out);
    out
}

/// Log output format (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the tracing subscriber: level from `HERALD_LOG` or `RUST_LOG`
/// (default `info`), text or JSON lines.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("HERALD_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or collector gets plain text
    // (and each connection's span keeps its fields without escape codes).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// Count a refused send.
pub fn send_refused(reason: SendRefused) {
    metrics::counter!(SENDS_REFUSED, "reason" => reason.as_str()).increment(1);
}

/// Count and log a finished connection; the log level follows whether the
/// close was expected.
pub fn connection_closed(info: &CloseInfo) {
    metrics::counter!(
        CONNECTIONS_CLOSED,
        "reason" => info.reason.as_str(),
        "initiator" => info.initiator.as_str()
    )
    .increment(1);
    metrics::gauge!(CONNECTIONS_LIVE).decrement(1.0);
    let (reason, initiator, code) = (info.reason.as_str(), info.initiator.as_str(), info.code);
    if info.reason.is_expected() {
        tracing::debug!(reason, initiator, code, detail = %info.detail, "connection closed");
    } else if info.reason == herald_core::CloseReason::Internal {
        tracing::error!(reason, initiator, code, detail = %info.detail, "connection closed");
    } else {
        tracing::warn!(reason, initiator, code, detail = %info.detail, "connection closed");
    }
}

/// Per-server counters that back the invariant checks (I1, I2, I4). Unlike the
/// process-wide Prometheus registry, one instance belongs to one server, so
/// tests that run several servers in one process read exact figures.
#[derive(Debug)]
pub struct Stats {
    /// Connections upgraded.
    pub opened: std::sync::atomic::AtomicU64,
    /// Cleanups run (registry removal, gauges). Equals `opened` once all are gone.
    pub cleanups: std::sync::atomic::AtomicU64,
    /// Cleanups attempted a second time for one connection (I2; must stay 0).
    pub duplicate_cleanups: std::sync::atomic::AtomicU64,
    /// Frames the writer was asked to write after a close frame was written or
    /// received (I1; must stay 0). The writer refuses and counts them.
    pub frames_after_close: std::sync::atomic::AtomicU64,
    /// Frames written to sockets.
    pub frames_out: std::sync::atomic::AtomicU64,
    /// Events queued to connections (each connection's copy counts).
    pub deliveries: std::sync::atomic::AtomicU64,
    /// The admin page's samples of this server.
    pub vitals: vitals::Vitals,
    /// Set when the server starts draining.
    pub draining: std::sync::atomic::AtomicBool,
    /// The writers' Prometheus handles, resolved once per server (after the
    /// recorder is installed), so a connection holds none of its own.
    pub(crate) wire: std::sync::OnceLock<WireMetrics>,
}

/// The Prometheus handles every connection's writer counts with.
#[derive(Debug)]
pub(crate) struct WireMetrics {
    /// `herald_frames_out_total`.
    pub(crate) frames: metrics::Counter,
    /// `herald_bytes_out_total`.
    pub(crate) bytes: metrics::Counter,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            opened: Default::default(),
            cleanups: Default::default(),
            duplicate_cleanups: Default::default(),
            frames_after_close: Default::default(),
            frames_out: Default::default(),
            deliveries: Default::default(),
            vitals: vitals::Vitals::new(std::time::Instant::now()),
            draining: Default::default(),
            wire: Default::default(),
        }
    }
}

impl Stats {
    /// The writers' metric handles.
    pub(crate) fn wire(&self) -> &WireMetrics {
        self.wire.get_or_init(|| WireMetrics {
            frames: metrics::counter!(FRAMES_OUT),
            bytes: metrics::counter!(BYTES_OUT),
        })
    }
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Connections upgraded.
    pub opened: u64,
    /// Cleanups run.
    pub cleanups: u64,
    /// Second cleanups of one connection (must be 0).
    pub duplicate_cleanups: u64,
    /// Frames refused after close (must be 0).
    pub frames_after_close: u64,
    /// Frames written.
    pub frames_out: u64,
}

impl Stats {
    /// Read all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        StatsSnapshot {
            opened: self.opened.load(Relaxed),
            cleanups: self.cleanups.load(Relaxed),
            duplicate_cleanups: self.duplicate_cleanups.load(Relaxed),
            frames_after_close: self.frames_after_close.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
        }
    }
}
