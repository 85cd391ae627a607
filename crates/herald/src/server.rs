//! The server: the listener and accept loop, the once-a-second sweeper, and
//! the drain (closing every connection, then waiting for them and for the
//! background tasks; nothing is polled).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use herald_core::protocol::ServerFrame;
use herald_core::{CloseInfo, CloseReason, Initiator};
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::app::{App, AppError};
use crate::broker::ConnInfo;
use crate::broker::stream_user;
use crate::config::Config;
use crate::hub::Hub;
use crate::tasks::Tasks;
use crate::telemetry::{self, StatsSnapshot};
use crate::wire::OutFrame;

/// Listen backlog; tokio's default of 128 drops connection storms.
const LISTEN_BACKLOG: u32 = 8192;
/// hyper's read buffer cap: a hard stop for absurd request heads; the exact
/// 16 KiB header limit (431) is enforced in [`crate::http`].
const MAX_READ_BUFFER: usize = 64 * 1024;
/// Extra time after the drain window for the last close handshakes.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Time background tasks (webhook deliveries, demo runs) get to finish after
/// the connections are gone, before they are cancelled.
const TASK_GRACE: Duration = Duration::from_secs(1);

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
    /// The shared state could not be built (JWT key, webhook client).
    #[error(transparent)]
    App(#[from] AppError),
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    app: Arc<App>,
    local_addr: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    /// HTTP connections (keep-alive ones are cancelled once drained).
    http: Tasks,
    /// One permit per HTTP connection being served (`max_http_connections`).
    http_permits: Arc<Semaphore>,
}

impl Server {
    /// Bind the listener and start accepting.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let listen_err = |source| ServerError::Listen {
            addr: config.addr,
            source,
        };
        let listener = listen(config.addr).map_err(listen_err)?;
        let local_addr = listener.local_addr().map_err(listen_err)?;
        // Install the recorder before anything resolves metric handles
        // (handles taken earlier would be no-ops for the process's life).
        let prometheus = telemetry::prometheus();
        let app = App::new(config, prometheus)?;
        let (stop_accepting, stop_rx) = watch::channel(false);
        let router = crate::http::router(app.clone());
        let http = Tasks::default();
        let http_permits = Arc::new(Semaphore::new(app.config().max_http_connections));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            router,
            HttpLimits {
                header_timeout: app.config().http_header_timeout,
                permits: http_permits.clone(),
                lingering: Arc::new(Semaphore::new(LINGER_SLOTS)),
            },
            http.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(
            app.hub()
                .clone()
                .run_presence(app.config().presence_ttl, stop_rx.clone()),
        );
        let sweeper = tokio::spawn(sweep_loop(app.clone(), stop_rx));
        tracing::info!(addr = %local_addr, "herald listening");
        Ok(Server {
            app,
            local_addr,
            stop_accepting,
            accept_task,
            sweeper,
            http,
            http_permits,
        })
    }

    /// Sweeper passes completed so far (tests wait for a pass instead of
    /// sleeping past one).
    pub fn sweeps(&self) -> u64 {
        self.app.sweeps()
    }

    /// HTTP connections being served (not upgraded, not yet closed).
    pub fn http_connections(&self) -> usize {
        self.app.config().max_http_connections - self.http_permits.available_permits()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's connections (for tests and embedders).
    pub fn hub(&self) -> &Hub {
        self.app.hub()
    }

    /// Describe this node's live connections (as `GET /api/v1/connections`).
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.app.hub().list(None)
    }

    /// The invariant counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.app.stats().snapshot()
    }

    /// What this node's broker holds (the `herald_history_*` gauges are
    /// process-wide, so tests running several servers read this instead).
    pub fn broker_stats(&self) -> crate::broker::BrokerStats {
        self.app.broker().stats()
    }

    /// Drain and stop: readiness turns 503, upgrades are refused, every
    /// connection gets `closing` and close 1012, staggered over the drain
    /// window; returns once all are gone (or the window plus a grace passed),
    /// the background tasks finished (or were cancelled), and the accept loop
    /// and sweeper stopped.
    pub async fn shutdown(self) {
        let app = &self.app;
        app.start_draining();
        let window = app.config().drain_window;
        let conns = app.hub().all();
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
            // An AI SDK socket's responses end with an `error` (its client
            // has no `closing`): never a stream that just stops.
            conn.with_view(|view, _| view.fail_all(DRAINED));
            conn.close(CloseInfo::new(
                CloseReason::Shutdown,
                Initiator::Server,
                "server restarting",
            ));
        }
        if tokio::time::timeout_at(deadline, app.hub().wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                left = app.hub().len(),
                "drain window over with connections left"
            );
        }
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let _ = self.sweeper.await;
        // Idle keep-alive HTTP connections would wait for their timeout.
        self.http.shutdown(Duration::ZERO).await;
        let cancelled = app.tasks().shutdown(TASK_GRACE).await;
        if cancelled > 0 {
            tracing::warn!(cancelled, "background tasks cancelled at shutdown");
        }
        tracing::info!("drained");
    }
}

/// What an AI SDK response still open at a drain ends with.
const DRAINED: &str = "The server is restarting; resume the chat.";

/// Once a second: let the broker enforce history bounds and close runs
/// silent for `run_ttl` (with an `agent_error` published like any event, so
/// live clients and later resumes see it), forget expired message ids, drain
/// the metrics recorder's buffers, and update gauges.
async fn sweep_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let broker = app.broker();
        for run in broker.sweep(crate::clock::now()).await {
            let user = stream_user(&run.stream).unwrap_or(&run.stream);
            tracing::info!(user_id = %user, run_id = %run.run_id, "agent run timed out");
            metrics::counter!(telemetry::RUNS_TIMED_OUT).increment(1);
        }
        // The Prometheus recorder buffers histogram samples until drained;
        // without this, an unscraped server would grow without bound.
        if let Some(handle) = app.prometheus() {
            handle.run_upkeep();
        }
        app.hub().prune_kicks(crate::clock::now());
        app.hub().prune_grants(app.config().subscribe_cache_ttl);
        let inbound = app.inbound();
        inbound.sweep(crate::clock::now());
        metrics::gauge!(telemetry::MESSAGE_IDS_REMEMBERED).set(inbound.remembered() as f64);
        metrics::gauge!(telemetry::BACKEND_IN_FLIGHT).set(inbound.in_flight() as f64);
        let stats = broker.stats();
        metrics::gauge!(telemetry::HISTORY_EVENTS).set(stats.events as f64);
        metrics::gauge!(telemetry::HISTORY_BYTES).set(stats.charged_bytes as f64);
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        metrics::gauge!(telemetry::TASKS_ALIVE).set(tasks as f64);
        observe_vitals(&app);
        app.swept();
    }
}

/// Give the admin page's samples this moment (taken every 2 s).
fn observe_vitals(app: &App) {
    let stats = app.stats();
    stats.vitals.observe(crate::telemetry::vitals::Observation {
        at: crate::clock::now(),
        unix_ms: crate::clock::unix_now_ms(),
        connections: app.hub().len(),
        deliveries: stats.deliveries.load(std::sync::atomic::Ordering::Relaxed),
        latency: crate::telemetry::latency::snapshot(),
    });
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

/// The bounds of the HTTP (not yet upgraded) connections.
struct HttpLimits {
    /// The wait for a request's complete head, counted from when the
    /// connection is ready for one: from the accept, and after each response
    /// (so it is also the idle bound of a keep-alive connection).
    header_timeout: Duration,
    /// One permit per connection served (`max_http_connections`): held while
    /// hyper serves it, given back when it closes or upgrades.
    permits: Arc<Semaphore>,
    /// Refused connections being closed gently (see [`refuse`]), at most
    /// [`LINGER_SLOTS`] at once.
    lingering: Arc<Semaphore>,
}

/// Refused connections closed gently at once; beyond, closed at once.
const LINGER_SLOTS: usize = 64;
/// How long after its accept a refused connection is closed at the latest
/// (its request head awaited, its further input read and dropped).
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of a refused connection's input (head included) is read before
/// its close.
const LINGER_BYTES: usize = 64 * 1024;

/// What a connection beyond `max_http_connections` is told before it is closed.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 79\r\nconnection: close\r\nretry-after: 1\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"too many HTTP connections; retry in a second\"}";

/// Answer a connection beyond `max_http_connections` 503 `overloaded` and
/// close it. An HTTP client expects its answer after its request: one sent
/// before it (hyper's client calls that an unexpected message) or a reset
/// (closing a socket with unread input resets it) reaches a client that is
/// still sending as an error, not as the 503. So, while one of
/// [`LINGER_SLOTS`] is free, the request head is awaited, the answer
/// written, a FIN sent, and the client's further input (its body) read and
/// dropped before the close, all within [`LINGER_TIME`] and
/// [`LINGER_BYTES`]. Without a slot (a flood), the answer is written at once
/// to the fresh socket and it is closed.
fn refuse(stream: tokio::net::TcpStream, lingering: &Arc<Semaphore>, tasks: &Tasks) {
    let Ok(slot) = lingering.clone().try_acquire_owned() else {
        let _ = stream.try_write(OVERLOADED);
        return;
    };
    tasks.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        // The request head: until its blank line, EOF, or 8 KiB of it.
        let mut head = Vec::new();
        let _ = tokio::time::timeout_at(deadline, async {
            while head.len() < 8 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        read += n;
                        let from = head.len().saturating_sub(3);
                        head.extend_from_slice(&buf[..n]);
                        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        drop(head);
        // The answer fits the fresh socket's empty send buffer.
        if stream.try_write(OVERLOADED).is_ok() && stream.shutdown().await.is_ok() {
            let _ = tokio::time::timeout_at(deadline, async {
                while read < LINGER_BYTES {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
            })
            .await;
        }
        drop(slot);
    });
}

/// Accept and serve HTTP/1.1 connections, at most `max_http_connections` at
/// once: one beyond it is answered 503 `overloaded` and closed ([`refuse`]), so a flood of slow
/// or idle clients is bounded in file descriptors and memory. Upgraded
/// WebSockets leave hyper, give their permit back, and are bounded by their
/// own lifecycle and `max_connections`.
async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    tasks: Tasks,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = limits.permits.clone().try_acquire_owned() else {
                        metrics::counter!(telemetry::HTTP_CONNECTIONS_REFUSED).increment(1);
                        refuse(stream, &limits.lingering, &tasks);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    // The peer address, for handlers that extract `ConnectInfo`.
                    let svc = router.clone().map_request(move |mut req: Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                        req.map(Body::new)
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .max_buf_size(MAX_READ_BUFFER)
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                        .with_upgrades();
                    tasks.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "http connection ended with an error");
                        }
                        drop(permit);
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
