//! The server: shared state, the listener and accept loop, and the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use herald_core::protocol::ServerFrame;
use herald_core::stream::runs;
use herald_core::{CloseInfo, CloseReason, Initiator};
use hyper::Request;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::auth::Verifier;
use crate::config::Config;
use crate::connection::OutFrame;
use crate::demo::DemoAgent;
use crate::history::{MemoryStore, NewEvent};
use crate::inbound::{AgentBackend, Inbound};
use crate::registry::Registry;
use crate::telemetry::{self, Stats, StatsSnapshot};
use crate::webhook::Webhook;

/// Listen backlog; tokio's default of 128 drops connection storms.
const LISTEN_BACKLOG: u32 = 8192;
/// hyper's read buffer cap: a hard stop for absurd request heads; the exact
/// 16 KiB header limit (431) is enforced in [`crate::api`].
const MAX_READ_BUFFER: usize = 64 * 1024;
/// Extra time after the drain window for the last close handshakes.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JWT key is unusable.
    #[error("invalid JWT key: {0}")]
    Key(String),
    /// The webhook client could not be built.
    #[error("cannot set up the webhook client: {0}")]
    Webhook(String),
}

/// State shared by every handler and connection of one server.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Client token verifier.
    pub verifier: Verifier,
    /// Connections and users; the publish path.
    pub registry: Arc<Registry>,
    /// User messages and cancels to the agent backend.
    pub inbound: Arc<Inbound>,
    /// Invariant counters of this server.
    pub stats: Arc<Stats>,
    /// Prometheus handle for `/metrics` (process-wide).
    pub prometheus: Option<PrometheusHandle>,
    draining: AtomicBool,
    conn_ids: AtomicU64,
}

impl App {
    /// A fresh id for a new connection.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// True once a drain started: `/readyz` is 503 and upgrades are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    app: Arc<App>,
    local_addr: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl Server {
    /// Bind the listener and start accepting.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let verifier = Verifier::from_config(&config).map_err(ServerError::Key)?;
        let listener = listen(config.addr).map_err(|source| ServerError::Listen {
            addr: config.addr,
            source,
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.addr,
                source,
            })?;
        // Install the recorder before anything resolves metric handles
        // (handles taken earlier would be no-ops for the process's life).
        let prometheus = telemetry::prometheus();
        let stats = Arc::new(Stats::default());
        let registry = Arc::new(Registry::new(
            Arc::new(MemoryStore::new(
                config.stream_limits.clone(),
                config.history_max_bytes,
            )),
            stats.clone(),
        ));
        let backend: Arc<dyn AgentBackend> = match &config.webhook {
            Some(cfg) => Arc::new(
                Webhook::new(cfg.clone()).map_err(|e| ServerError::Webhook(e.to_string()))?,
            ),
            None => Arc::new(DemoAgent::new(registry.clone())),
        };
        let app = Arc::new(App {
            inbound: Arc::new(Inbound::new(backend, config.message_dedupe_window)),
            registry,
            stats,
            verifier,
            prometheus,
            draining: AtomicBool::new(false),
            // Random start, so ids are not reused across restarts.
            conn_ids: AtomicU64::new(rand::random::<u32>() as u64 * 1_000_000),
            config,
        });
        let (stop_accepting, stop_rx) = watch::channel(false);
        let router = crate::api::router(app.clone());
        let accept_task = tokio::spawn(accept_loop(listener, router, stop_rx.clone()));
        let sweeper = tokio::spawn(sweep_loop(app.clone(), stop_rx));
        tracing::info!(addr = %local_addr, "herald listening");
        Ok(Server {
            app,
            local_addr,
            stop_accepting,
            accept_task,
            sweeper,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state (for tests and embedders).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The invariant counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.app.stats.snapshot()
    }

    /// Drain and stop: readiness turns 503, upgrades are refused, every
    /// connection gets `closing` and close 1012, staggered over the drain
    /// window; returns once all are gone or the window plus a grace passed.
    pub async fn shutdown(self) {
        let app = &self.app;
        app.draining.store(true, Ordering::Release);
        let window = app.config.drain_window;
        let conns = app.registry.all();
        tracing::info!(
            connections = conns.len(),
            window_ms = window.as_millis() as u64,
            "draining"
        );
        let start = tokio::time::Instant::now();
        let deadline = start + window + DRAIN_GRACE;
        // Leave the last fifth of the window for the last close handshakes.
        let spread = window.mul_f64(0.8);
        let n = conns.len().max(1) as u32;
        for (i, conn) in conns.iter().enumerate() {
            tokio::time::sleep_until(start + spread * i as u32 / n).await;
            let reconnect_after_ms = 250 + rand::random_range(0..=window.as_millis() as u64);
            let closing = ServerFrame::Closing {
                reason: "shutdown",
                reconnect_after_ms,
            }
            .to_json();
            // Refused for connections still handshaking or already closing: fine.
            let _ = conn.send(OutFrame::from(closing));
            conn.close(CloseInfo::new(
                CloseReason::Shutdown,
                Initiator::Server,
                "server restarting",
            ));
        }
        while !app.registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = app.registry.len();
        if left > 0 {
            tracing::warn!(left, "drain window over with connections left");
        }
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let _ = self.sweeper.await;
        tracing::info!("drained");
    }
}

/// Once a second: enforce history age bounds, close runs silent for
/// `run_ttl` with a synthesized `agent_error` (published like any event, so
/// live clients and later resumes see it), drain the metrics recorder's
/// buffers, and update history gauges.
async fn sweep_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let store = app.registry.store().clone();
        for run in store.sweep(std::time::Instant::now()).await {
            tracing::info!(user_id = %run.user, run_id = %run.run_id, "agent run timed out");
            metrics::counter!(telemetry::RUNS_TIMED_OUT).increment(1);
            let event = NewEvent::new(
                runs::ERROR.to_owned(),
                run.thread_id,
                Some(run.run_id),
                serde_json::json!({"reason": "run_timeout"}),
                crate::api::now_rfc3339(),
            );
            if let Err(e) = app.registry.publish(&run.user, event).await {
                tracing::warn!(error = %e, "could not publish a run timeout");
            }
        }
        // The Prometheus recorder buffers histogram samples until drained;
        // without this, an unscraped server would grow without bound.
        if let Some(handle) = &app.prometheus {
            handle.run_upkeep();
        }
        let stats = store.stats();
        metrics::gauge!(telemetry::HISTORY_EVENTS).set(stats.events as f64);
        metrics::gauge!(telemetry::HISTORY_BYTES).set(stats.bytes as f64);
    }
}

/// Listen with a large backlog (tokio's `TcpListener::bind` uses 128).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = router.clone().map_request(|req: Request<hyper::body::Incoming>| req.map(Body::new));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(MAX_READ_BUFFER)
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                        .with_upgrades();
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "http connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}
