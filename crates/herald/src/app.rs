//! The state one server shares between its HTTP handlers, connection actors
//! and background tasks: configuration, the token verifier, the hub, the
//! broker, the agent dispatcher and the tracked tasks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::admission::Admission;
use crate::agent::demo::DemoAgent;
use crate::agent::webhook::Webhook;
use crate::agent::{AgentBackend, Inbound};
use crate::auth::{KeyError, Verifier};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerError, EventSink};
use crate::config::Config;
use crate::hub::Hub;
use crate::tasks::Tasks;
use crate::telemetry::Stats;

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The JWT key is unusable.
    #[error("invalid JWT key: {0}")]
    Key(#[from] KeyError),
    /// The webhook client could not be built.
    #[error("cannot set up the webhook client: {0}")]
    Webhook(#[from] reqwest::Error),
    /// The broker could not be set up (e.g. an unusable Redis URL).
    #[error("cannot set up the broker: {0}")]
    Broker(#[from] BrokerError),
}

/// State shared by every handler and connection of one server.
#[derive(Debug)]
pub(crate) struct App {
    config: Config,
    /// `config.lifecycle`, shared by every connection's lifecycle.
    lifecycle: Arc<herald_core::LifecycleConfig>,
    verifier: Verifier,
    hub: Arc<Hub>,
    admission: Arc<Admission>,
    inbound: Arc<Inbound>,
    stats: Arc<Stats>,
    prometheus: Option<PrometheusHandle>,
    tasks: Tasks,
    draining: AtomicBool,
    /// Turns true when the drain starts (for requests that wait on it).
    drain_signal: tokio::sync::watch::Sender<bool>,
    conn_ids: AtomicU64,
    /// One permit per echo connection (test-only endpoint; `echo_max_connections`).
    echo_permits: Arc<tokio::sync::Semaphore>,
    /// Sweeper passes completed.
    sweeps: AtomicU64,
    /// AI SDK chats (`user\tchat`) a `send` is opening a run for on this node.
    chats_starting: Arc<dashmap::DashSet<String>>,
}

/// A chat's place in [`App::start_chat`], given back on drop.
pub(crate) struct ChatStart {
    set: Arc<dashmap::DashSet<String>>,
    key: String,
}

impl Drop for ChatStart {
    fn drop(&mut self) {
        self.set.remove(&self.key);
    }
}

impl App {
    /// Wire a server's parts together: the broker delivers into the hub, the
    /// agent backend (webhook or demo) publishes through the broker.
    pub(crate) fn new(
        config: Config,
        prometheus: Option<PrometheusHandle>,
    ) -> Result<Arc<App>, AppError> {
        let verifier = Verifier::from_config(&config)?;
        let stats = Arc::new(Stats::default());
        let tasks = Tasks::default();
        let node = crate::broker::new_node_id();
        let mut broker_error = None;
        let hub = Arc::new_cyclic(|hub: &Weak<Hub>| {
            let sink: Weak<dyn EventSink> = hub.clone();
            let limits = config.stream_limits.clone();
            let broker: Arc<dyn Broker> = match &config.redis {
                Some(redis) => match RedisBroker::new(redis, &node, limits.clone(), sink.clone()) {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        broker_error = Some(e);
                        Arc::new(MemoryBroker::new(limits, config.history_max_bytes, sink))
                    }
                },
                None => Arc::new(MemoryBroker::new(limits, config.history_max_bytes, sink)),
            };
            Hub::new(node.clone(), broker, stats.clone())
        });
        if let Some(e) = broker_error {
            return Err(e.into());
        }
        let backend: Arc<dyn AgentBackend> = match &config.webhook {
            Some(cfg) => Arc::new(Webhook::new(cfg.clone())?),
            None => {
                let demo = DemoAgent::new(hub.broker().clone(), tasks.clone());
                hub.set_local_runs(demo.clone());
                Arc::new(demo)
            }
        };
        Ok(Arc::new(App {
            inbound: Arc::new(Inbound::new(
                backend,
                hub.broker().clone(),
                config.message_dedupe_window,
                config.message_claim_lease,
                config.in_flight,
                tasks.clone(),
            )),
            hub,
            admission: Arc::new(Admission::new(
                config.max_connections,
                config.max_pending_connections,
            )),
            stats,
            verifier,
            prometheus,
            tasks,
            draining: AtomicBool::new(false),
            drain_signal: tokio::sync::watch::Sender::new(false),
            // Random start, so ids are not reused across restarts.
            conn_ids: AtomicU64::new(rand::random::<u32>() as u64 * 1_000_000),
            echo_permits: Arc::new(tokio::sync::Semaphore::new(config.echo_max_connections)),
            sweeps: AtomicU64::new(0),
            chats_starting: Arc::default(),
            lifecycle: Arc::new(config.lifecycle.clone()),
            config,
        }))
    }

    /// The validated configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The connections' lifecycle settings, shared.
    pub(crate) fn lifecycle(&self) -> Arc<herald_core::LifecycleConfig> {
        self.lifecycle.clone()
    }

    /// Client token verifier.
    pub(crate) fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// This node's connections.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The bounds on live and unauthenticated connections.
    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Where events live.
    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        self.hub.broker()
    }

    /// User messages and cancels to the agent backend.
    pub(crate) fn inbound(&self) -> &Arc<Inbound> {
        &self.inbound
    }

    /// Invariant counters of this server.
    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Prometheus handle for `/metrics` (process-wide).
    pub(crate) fn prometheus(&self) -> Option<&PrometheusHandle> {
        self.prometheus.as_ref()
    }

    /// The server's tracked background tasks.
    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Mark `user`'s `chat` as having a run opened on this node until the
    /// guard drops; `None` if another `send` of it is opening one now.
    pub(crate) fn start_chat(&self, user: &str, chat: &str) -> Option<ChatStart> {
        let key = format!("{user}\t{chat}");
        self.chats_starting.insert(key.clone()).then(|| ChatStart {
            set: self.chats_starting.clone(),
            key,
        })
    }

    /// A place among the echo connections, or `None` when
    /// `echo_max_connections` are open; given back when the permit drops.
    pub(crate) fn echo_place(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.echo_permits.clone().try_acquire_owned().ok()
    }

    /// Count a completed sweeper pass.
    pub(crate) fn swept(&self) {
        self.sweeps.fetch_add(1, Ordering::Release);
    }

    /// Sweeper passes completed.
    pub(crate) fn sweeps(&self) -> u64 {
        self.sweeps.load(Ordering::Acquire)
    }

    /// A fresh id for a new connection.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Start draining: `/readyz` turns 503 and upgrades are refused.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.stats.draining.store(true, Ordering::Release);
        self.drain_signal.send_replace(true);
    }

    /// Resolves once a drain started (at once if it has).
    pub(crate) async fn drain_started(&self) {
        let mut rx = self.drain_signal.subscribe();
        // The sender lives as long as the app, so this only ends on `true`.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// True once a drain started.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
