//! The Redis broker: streams live in Redis, so every node sees the same
//! history and a redeploy loses nothing.
//!
//! Keys of one stream share a hash tag (`<prefix>:{<stream>}:…`), so they sit
//! in one Cluster slot. The stream name, run ids and part names are escaped
//! where they enter a key, a field or a joined entry (`keys`: `%`, `{`, `}`,
//! tab, newline and `*` percent-encoded; ordinary ids unchanged), so no two
//! users, runs or parts can share one:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:meta` | hash | `epoch`, `seq`; `tail` (`<first>\t<seq>\t<run>\t<part>`: the log's newest entry is that text entry, while `seq` is still that seq); `fresh` (ms of the stream keys' last TTL refresh) |
//! | `…:log` | stream | one entry per event, id `<seq>-0`, fields `d` (frame JSON), `t` (ms); for consecutive text deltas of one part one entry, id `<first seq>-0`, fields `d` (JSON before the text), `t`, `k` (`run\tpart`), `p` (JSON after it) |
//! | `…:txt:<first>` | string | a text entry's text (JSON-escaped; appended to) |
//! | `…:off:<first>` | string | where each of its deltas ends in the text (8 hex digits each) |
//! | `…:parts:<run_id>` | hash | an open run's part → `<next index>\t<seq of its latest delta>\t<ms of its keys' last TTL refresh>` |
//! | `…:runs` | hash | open run → `<last event ms>\t<thread_id>` |
//! | `…:runbytes` | hash | open run → bytes of its held events; `*` → all open runs together |
//! | `…:run:<run_id>` | list | the open run's events (`seq`, `json` pairs; a text entry as `<first>`, `T<before>\n<after>`) |
//! | `…:idem:<key>` | string | the seq of a publish idempotency key (expires; at most `max_idempotency_keys` per stream) |
//! | `…:ans:<key>` | string | set when a run opened naming the user's message stored under idempotency key `<key>` and took a copy of it into its list (one run per message; expires with the key) |
//! | `…:idems` | sorted set | the stream's idempotency keys by seq, so the oldest are forgotten first past the bound |
//! | `…:ch` | channel | `<epoch>\n<seq>\n<json>` per stored event |
//! | `<prefix>:runs` | sorted set | open runs by last event time (for the sweeper) |
//!
//! One Lua script per publish checks idempotency keys, gets or creates the
//! epoch, assigns seqs, appends (trimming by count and age), keeps run
//! bookkeeping, refreshes TTLs and PUBLISHes each stored event — atomically,
//! so the channel carries a stream's events in seq order.
//!
//! Each node holds one command connection (redis-rs `ConnectionManager`, or
//! a `ClusterConnection` routing by slot, both reconnecting by themselves)
//! and one pub/sub connection driven by a task (on a Cluster: RESP3 pushes,
//! sharded subscriptions per stream, `SPUBLISH` in the script). The
//! task subscribes and unsubscribes in the order the hub asks, batching what
//! is queued; its reader hands messages to the hub without blocking (an
//! unbounded channel in redis-rs, so nothing is dropped). When the pub/sub
//! connection comes back after a drop, every subscribed stream is resynced:
//! its connections catch up from the log (or are reset on a new epoch).
//! A connection that stops answering without dropping (half-open) is found
//! out too: the pub/sub connection by a PING every 5 s, the command
//! connection by a command timing out; either is then replaced.
//!
//! Layout: this file holds the broker and its command side; `keys` the
//! escaping of names in keys; `scripts` the Lua; `pubsub` the single-Redis pub/sub task and the message handling
//! both tasks share; `cluster` the Cluster pub/sub task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::catchup::StreamPosition;
use herald_core::stream::{StreamLimits, runs, turns};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    Broker, BrokerError, BrokerStats, EventSink, ExpiredRun, FleetReply, FleetRequest, NewEvent,
    Published, RunRef, StoredEvent,
};
use crate::BoxFuture;

mod cluster;
mod keys;
mod pubsub;
mod scripts;
mod sentinel;

use cluster::cluster_pubsub_task;
use pubsub::pubsub_task;
use scripts::Scripts;

/// Runs the sweeper closes per pass at most.
const SWEEP_BATCH: isize = 200;
/// How long a fleet request waits for every node's answer.
const FLEET_TIMEOUT: Duration = Duration::from_secs(2);

/// A fleet request on the control channel.
#[derive(Debug, Serialize, Deserialize)]
struct FleetAsk {
    id: u64,
    from: String,
    request: FleetRequest,
}

/// A node's answer on the asker's reply channel.
#[derive(Debug, Serialize, Deserialize)]
struct FleetAnswer {
    id: u64,
    reply: FleetReply,
}

/// Which Redis the broker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisNodes {
    /// One Redis (or a primary): `redis://[user:password@]host:port[/db]` or `rediss://…`.
    Single(String),
    /// A Redis Cluster, by its seed nodes' URLs.
    Cluster(Vec<String>),
    /// The master of a Sentinel-watched set:
    /// `redis+sentinel://[user:password@]host:port[,…]/<master>[/<db>]`.
    Sentinel(String),
}

/// Where the Redis broker connects and how it names its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The Redis to use.
    pub nodes: RedisNodes,
    /// Key and channel prefix, so deployments can share a Redis.
    pub prefix: String,
    /// Timeouts, the liveness PING and the reconnect backoff.
    pub timing: RedisTiming,
}

/// The Redis broker's timing. The defaults are the production values;
/// tests shorten them to see each mechanism act in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisTiming {
    /// How long a command may take before the broker counts as unavailable.
    pub command_timeout: Duration,
    /// How long a subscription may take to be confirmed.
    pub subscribe_timeout: Duration,
    /// How often the pub/sub connection is PINGed, so one that stopped
    /// answering (half-open) is replaced within about this plus the command
    /// timeout.
    pub ping_every: Duration,
    /// First wait between two pub/sub reconnection attempts; it doubles.
    pub reconnect_base: Duration,
    /// Longest wait between two pub/sub reconnection attempts.
    pub reconnect_max: Duration,
}

impl Default for RedisTiming {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(2),
            subscribe_timeout: Duration::from_secs(5),
            ping_every: Duration::from_secs(5),
            reconnect_base: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
        }
    }
}

/// The command connection: one Redis (reconnecting by itself) or a Cluster
/// (routing each command by its key's slot, following slot moves), and
/// whether a command on it timed out. redis-rs replaces a connection that
/// dropped, not one that stopped answering (a half-open socket, a stalled
/// server), so a timed-out connection is replaced by the next command.
#[derive(Clone)]
struct Conn {
    link: Link,
    stalled: Arc<AtomicBool>,
}

/// One Redis or a Cluster.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    fn new(link: Link) -> Self {
        Conn {
            link,
            stalled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// Mark the connection `stalled` when `result` is a timeout.
    fn watch<'a, T: Send + 'a>(
        stalled: Arc<AtomicBool>,
        result: redis::RedisFuture<'a, T>,
    ) -> redis::RedisFuture<'a, T> {
        Box::pin(async move {
            let result = result.await;
            if let Err(e) = &result
                && e.is_timeout()
            {
                stalled.store(true, Ordering::Release);
            }
            result
        })
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let stalled = self.stalled.clone();
        let sent = match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        };
        Conn::watch(stalled, sent)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let stalled = self.stalled.clone();
        let sent = match &mut self.link {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        Conn::watch(stalled, sent)
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field(
                "link",
                &match self.link {
                    Link::Single(_) => "single",
                    Link::Cluster(_) => "cluster",
                },
            )
            .field("stalled", &self.is_stalled())
            .finish()
    }
}

/// A subscription change for the pub/sub task, in the order the hub made it.
#[derive(Debug)]
enum SubCmd {
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(String),
}

/// What the publish script answered.
#[derive(Debug)]
struct PublishReply {
    epoch: String,
    receivers: usize,
    /// Per event: its seq, and whether its idempotency key was a duplicate.
    results: Vec<(u64, bool)>,
    /// Runs over their stream's bounds, with their threads and the reason
    /// (`run_too_large`, `too_many_runs`), for the caller to close.
    oversized: Vec<(String, Option<String>, &'static str)>,
}

/// What the pub/sub task shares with the broker.
#[derive(Debug)]
struct Shared {
    prefix: String,
    node: String,
    /// Fleet requests of this node waiting for answers, by id.
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<FleetReply>>>,
    /// Subscription probes of this node waiting to come back, by id.
    probes: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_request: AtomicU64,
    nodes: RedisNodes,
    scripts: Scripts,
    limits: StreamLimits,
    /// The command connection, once made (replaced when it stalls).
    conn: Mutex<Option<Conn>>,
    /// Held while a command connection is being made, so one is made at a
    /// time; holds when and how the last attempt failed.
    connecting: tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>,
    /// The last command succeeded.
    commands_ok: AtomicBool,
    /// The pub/sub connection is up and its subscriptions confirmed.
    pubsub_up: AtomicBool,
    /// Timeouts, PING interval and reconnect backoff.
    timing: RedisTiming,
    /// The last waits of the pub/sub reconnect backoff, newest last (at
    /// most [`BACKOFF_KEPT`]): what the schedule actually was.
    backoff_waits: Mutex<std::collections::VecDeque<Duration>>,
    /// Moved slots' streams followed to their new master (started).
    slot_follows: AtomicU64,
    /// Asks the Sentinels where the master is (Sentinel only).
    sentinel: Option<Sentinels>,
}

/// The Sentinel client, asked by one connection attempt at a time; and
/// the master set's name, and a notice for the pub/sub task to redial
/// when the Sentinels switch the master.
struct Sentinels {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    master: String,
    switched: tokio::sync::Notify,
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sentinels")
    }
}

/// Reconnect waits [`Shared`] keeps for [`BrokerStats`].
const BACKOFF_KEPT: usize = 32;

impl Shared {
    /// Wait out the backoff after a failed pub/sub (re)connection, and
    /// remember how long.
    async fn back_off(&self, backoff: &mut herald_core::backoff::Backoff) {
        let wait = backoff.failed();
        {
            let mut waits = self.backoff_waits.lock();
            if waits.len() == BACKOFF_KEPT {
                waits.pop_front();
            }
            waits.push_back(wait);
        }
        tokio::time::sleep(wait).await;
    }
}

/// The Redis broker of one node.
#[derive(Debug)]
pub struct RedisBroker {
    shared: Arc<Shared>,
    subs: mpsc::UnboundedSender<SubCmd>,
    task: tokio::task::JoinHandle<()>,
    /// Follows the Sentinels' `+switch-master` notices (Sentinel only).
    switches: Option<tokio::task::JoinHandle<()>>,
    published: metrics::Counter,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.switches {
            t.abort();
        }
    }
}

/// An open run as the stream's `…:runs` hash holds it: field the escaped
/// run id, value `<last event ms>\t<thread>` (an empty thread is none);
/// `None` for a field Herald did not write.
fn run_ref(run: &str, value: &str) -> Option<RunRef> {
    let thread = value
        .split_once('\t')
        .map(|(_, t)| t.to_owned())
        .filter(|t| !t.is_empty());
    Some(RunRef {
        run_id: keys::unescape(run)?.into_owned(),
        thread_id: thread,
    })
}

/// Whether a failed command is the stream's data refusing it (a key of the
/// wrong type, a Lua runtime error in the stream's script) rather than
/// Redis being unreachable, overloaded or failing over.
fn is_stream_error(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return false;
    }
    // A replica refused a write (a failover is under way): Redis's fault,
    // not the stream's, even when it surfaces from inside a script.
    if e.to_string().contains("READONLY") {
        return false;
    }
    match e.code() {
        Some("WRONGTYPE") => true,
        // A Lua runtime error names the script; "max number of clients" and
        // other server-wide ERRs do not.
        Some("ERR") => e.to_string().contains("script"),
        _ => false,
    }
}

pub use sentinel::SCHEME as SENTINEL_SCHEME;

/// Check a `redis+sentinel://` URL (for the configuration).
pub fn check_sentinel_url(url: &str) -> Result<(), String> {
    sentinel::SentinelUrl::parse(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// A broker on `cfg` delivering to `sink`; connects lazily (and again
    /// after every failure), so it starts even while Redis is down. Must be
    /// called inside a tokio runtime (it spawns its pub/sub task).
    pub fn new(
        cfg: &RedisConfig,
        node: &str,
        limits: StreamLimits,
        sink: Weak<dyn EventSink>,
    ) -> Result<Self, BrokerError> {
        // Parse the URLs now, so a bad one stops start-up.
        let mut sentinel = None;
        match &cfg.nodes {
            RedisNodes::Single(url) => {
                redis::Client::open(url.as_str()).map_err(unavailable)?;
            }
            RedisNodes::Cluster(urls) => {
                redis::cluster::ClusterClient::new(urls.clone()).map_err(unavailable)?;
            }
            RedisNodes::Sentinel(url) => {
                let url = sentinel::SentinelUrl::parse(url).map_err(unavailable)?;
                sentinel = Some(Sentinels {
                    client: tokio::sync::Mutex::new(url.client().map_err(unavailable)?),
                    master: url.master.clone(),
                    switched: tokio::sync::Notify::new(),
                });
            }
        }
        let shared = Arc::new(Shared {
            prefix: cfg.prefix.clone(),
            node: node.to_owned(),
            pending: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            nodes: cfg.nodes.clone(),
            scripts: Scripts::new(),
            limits,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            commands_ok: AtomicBool::new(false),
            pubsub_up: AtomicBool::new(false),
            timing: cfg.timing,
            backoff_waits: Mutex::default(),
            slot_follows: AtomicU64::new(0),
            sentinel,
        });
        let (subs, rx) = mpsc::unbounded_channel();
        let task = if shared.is_cluster() {
            tokio::spawn(cluster_pubsub_task(shared.clone(), sink, rx))
        } else {
            tokio::spawn(pubsub_task(shared.clone(), sink, rx))
        };
        let switches = shared
            .sentinel
            .is_some()
            .then(|| tokio::spawn(sentinel::follow_switches(shared.clone())));
        Ok(Self {
            shared,
            subs,
            task,
            switches,
            published: metrics::counter!(crate::telemetry::EVENTS_PUBLISHED),
        })
    }
}

impl Shared {
    /// The start of every key of `stream` (its hash tag, escaped: [`keys`]).
    fn base(&self, stream: &str) -> String {
        format!("{}:{{{}}}", self.prefix, keys::escape(stream))
    }

    fn channel(&self, stream: &str) -> String {
        format!("{}:ch", self.base(stream))
    }

    /// This node's name in presence entries: its id with anything but
    /// `A–Z a–z 0–9 . _ -` replaced (the entries are `<node>=<n>@<ms>;…`).
    fn presence_node(&self) -> String {
        self.node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// What this node's claim on a message holds while it forwards it.
    fn claim_value(&self) -> String {
        format!("inflight:{}", self.node)
    }

    /// Where fleet requests go (every node listens).
    fn control_channel(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// Where answers to `node`'s fleet requests go.
    fn reply_channel(&self, node: &str) -> String {
        format!("{}:reply:{node}", self.prefix)
    }

    /// Nodes that sent a heartbeat within the last 5 s (Cluster mode).
    async fn live_nodes(&self) -> Result<usize, BrokerError> {
        let mut conn = self.conn().await?;
        let seen: Result<HashMap<String, u64>, _> = redis::cmd("HGETALL")
            .arg(format!("{}:nodes", self.prefix))
            .query_async(&mut conn)
            .await;
        let now = crate::clock::unix_now_ms();
        Ok(seen
            .map_err(|e| self.failed(e))?
            .values()
            .filter(|t| now.saturating_sub(**t) < 5_000)
            .count())
    }

    /// Record this node as alive (each sweep) and forget nodes silent for a minute.
    async fn heartbeat(&self) {
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        let key = format!("{}:nodes", self.prefix);
        let now = crate::clock::unix_now_ms();
        let seen: Result<HashMap<String, u64>, _> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(&key).arg(&self.node).arg(now).ignore();
        for (node, t) in seen.unwrap_or_default() {
            if now.saturating_sub(t) > 60_000 {
                pipe.cmd("HDEL").arg(&key).arg(node).ignore();
            }
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            self.failed(e);
        }
    }

    /// PUBLISH through the command connection; returns the receivers.
    async fn publish_raw(&self, channel: String, payload: String) -> Result<usize, BrokerError> {
        let mut conn = self.conn().await?;
        let sent: Result<usize, _> = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        sent.map_err(|e| self.failed(e))
    }

    /// The stream a channel belongs to.
    fn stream_of<'a>(&self, channel: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let escaped = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:ch")?;
        keys::unescape(escaped)
    }

    /// TTL of a stream's keys: long enough for every bound to apply.
    fn ttl_ms(&self) -> u64 {
        let l = &self.limits;
        let longest = l.max_age.max(l.run_ttl).max(l.idempotency_window);
        (longest + Duration::from_secs(60)).as_millis() as u64
    }

    fn is_cluster(&self) -> bool {
        matches!(self.nodes, RedisNodes::Cluster(_))
    }

    /// The command connection: the current one unless a command on it
    /// timed out, else a new one.
    /// A command that waited for an attempt that failed fails with it
    /// instead of making its own, so commands queued behind a Redis that
    /// cannot be reached fail within one attempt, not one attempt each.
    async fn conn(&self) -> Result<Conn, BrokerError> {
        let current = || self.conn.lock().clone().filter(|c| !c.is_stalled());
        if let Some(c) = current() {
            return Ok(c);
        }
        let waited_from = tokio::time::Instant::now();
        let mut last_failure = self.connecting.lock().await;
        if let Some(c) = current() {
            return Ok(c);
        }
        if let Some((at, error)) = last_failure.as_ref()
            && *at >= waited_from
        {
            return Err(self.failed(format_args!(
                "a connection attempt failed while this command waited: {error}"
            )));
        }
        if self.conn.lock().is_some() {
            tracing::warn!("a redis command timed out; replacing the connection");
            metrics::counter!(crate::telemetry::BROKER_RECONNECTS).increment(1);
        }
        let made = tokio::time::timeout(self.timing.command_timeout * 2, self.connect())
            .await
            .unwrap_or_else(|_| Err(pubsub::timed_out()));
        match made {
            Ok(made) => {
                *last_failure = None;
                *self.conn.lock() = Some(made.clone());
                Ok(made)
            }
            Err(e) => {
                *last_failure = Some((tokio::time::Instant::now(), e.to_string()));
                Err(self.failed(e))
            }
        }
    }

    /// A client for the one Redis to use now: the configured one, or the
    /// master the Sentinels name (asked anew each time). Not for a Cluster.
    async fn dial(&self) -> Result<redis::Client, redis::RedisError> {
        match (&self.nodes, &self.sentinel) {
            (RedisNodes::Sentinel(_), Some(sentinels)) => {
                sentinels.client.lock().await.async_get_client().await
            }
            (RedisNodes::Single(url), _) => redis::Client::open(url.as_str()),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no single Redis to dial",
            ))),
        }
    }

    /// After a failed command on `conn`: with Sentinel, a connection that
    /// failed or reached a replica (`READONLY`, after a failover) is
    /// replaced by the next command, which asks the Sentinels again.
    fn after_error(&self, conn: &Conn, e: &redis::RedisError) {
        let stale = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.to_string().contains("READONLY");
        if self.sentinel.is_some() && stale {
            conn.stalled.store(true, Ordering::Release);
        }
    }

    /// The Sentinels switched the master: the command connection is
    /// replaced by the next command and the pub/sub connection redials.
    fn master_switched(&self) {
        if let Some(c) = self.conn.lock().as_ref() {
            c.stalled.store(true, Ordering::Release);
        }
        if let Some(s) = &self.sentinel {
            s.switched.notify_one();
        }
    }

    /// Resolves when the Sentinels switch the master (never without them).
    async fn master_switch(&self) {
        match &self.sentinel {
            Some(s) => s.switched.notified().await,
            None => std::future::pending().await,
        }
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let link = match &self.nodes {
            RedisNodes::Single(_) | RedisNodes::Sentinel(_) => {
                let client = self.dial().await?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timing.command_timeout))
                    .set_response_timeout(Some(self.timing.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(self.timing.reconnect_max);
                Link::Single(ConnectionManager::new_with_config(client, config).await?)
            }
            RedisNodes::Cluster(urls) => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(self.timing.command_timeout)
                    .response_timeout(self.timing.command_timeout)
                    .build()?;
                Link::Cluster(client.get_async_connection().await?)
            }
        };
        Ok(Conn::new(link))
    }

    /// Record a failed command and turn it into a broker error.
    fn failed(&self, e: impl std::fmt::Display) -> BrokerError {
        if self.commands_ok.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "redis unavailable");
        }
        metrics::counter!(crate::telemetry::BROKER_ERRORS).increment(1);
        unavailable(e)
    }

    fn ok(&self) {
        if !self.commands_ok.swap(true, Ordering::AcqRel) {
            tracing::info!("redis available");
        }
    }

    /// Run a script, mapping failures (and the wait) to `Unavailable`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        let mut conn = self.conn().await?;
        let result = tokio::time::timeout(
            self.timing.command_timeout * 2,
            invocation.invoke_async::<T>(&mut conn),
        )
        .await;
        match result {
            Ok(Ok(v)) => {
                self.ok();
                Ok(v)
            }
            // Redis answered: it is up; this stream's data is what failed.
            Ok(Err(e)) if is_stream_error(&e) => {
                self.ok();
                metrics::counter!(crate::telemetry::BROKER_STREAM_ERRORS).increment(1);
                Err(BrokerError::Stream(e.to_string()))
            }
            Ok(Err(e)) => {
                self.after_error(&conn, &e);
                Err(self.failed(e))
            }
            Err(_) => Err(self.failed("redis command timed out")),
        }
    }

    async fn position(&self, stream: &str) -> Result<StreamPosition, BrokerError> {
        let base = self.base(stream);
        let (epoch, last_seq, first_seq): (String, u64, u64) = self
            .run(
                self.scripts
                    .position
                    .key(format!("{base}:meta"))
                    .key(format!("{base}:log"))
                    .arg(super::memory::new_epoch())
                    .arg(self.limits.max_age.as_millis() as u64)
                    .arg(self.ttl_ms())
                    .arg(&base)
                    .arg(if self.is_cluster() { "1" } else { "0" }),
            )
            .await?;
        Ok(StreamPosition {
            epoch,
            last_seq,
            first_seq,
        })
    }

    /// Publish `events` to `stream`; with `cond_run`, only if that run is
    /// open and has been silent for longer than `run_ttl`.
    async fn publish(
        &self,
        stream: &str,
        events: &[NewEvent],
        cond_run: Option<&str>,
    ) -> Result<PublishReply, BrokerError> {
        let base = self.base(stream);
        let mut script = self.scripts.publish.prepare_invoke();
        script
            .key(format!("{base}:meta"))
            .key(format!("{base}:log"))
            .key(format!("{base}:runs"))
            .key(format!("{base}:runbytes"))
            .arg(super::memory::new_epoch())
            .arg(self.limits.max_events)
            .arg(self.limits.max_age.as_millis() as u64)
            .arg(self.ttl_ms())
            .arg(self.limits.idempotency_window.as_millis() as u64)
            .arg(self.channel(stream))
            .arg(&base)
            .arg(if self.is_cluster() {
                "SPUBLISH"
            } else {
                "PUBLISH"
            })
            .arg(keys::escape(cond_run.unwrap_or("")).as_ref())
            .arg(self.limits.run_ttl.as_millis() as u64)
            .arg(events.len())
            .arg(self.limits.max_run_bytes)
            .arg(self.limits.max_runs_bytes)
            .arg(self.limits.max_idempotency_keys)
            .arg(self.limits.max_open_runs);
        for e in events {
            let closes = e.frame.run_id.is_some() && runs::closes(&e.frame.event);
            script
                .arg(e.idempotency_key.as_deref().unwrap_or(""))
                .arg(keys::escape(e.frame.run_id.as_deref().unwrap_or("")).as_ref())
                .arg(if closes { "1" } else { "0" })
                .arg(e.frame.thread_id.as_deref().unwrap_or(""));
            match &e.delta {
                Some(d) => {
                    let (pre, post) = d.template.parts();
                    script
                        .arg(&d.text)
                        .arg(keys::escape(&d.part).as_ref())
                        .arg(d.index.map(|i| i.to_string()).unwrap_or_default())
                        .arg(pre)
                        .arg(post);
                }
                None => {
                    let tail = e.frame_tail().ok_or_else(|| {
                        unavailable("event frame does not start with its type and seq")
                    })?;
                    script.arg(tail).arg("").arg("").arg("").arg("");
                }
            }
            script.arg(e.answers().map(turns::message_key).unwrap_or_default());
        }
        let reply: Vec<redis::Value> = self.run(&script).await?;
        let mut it = reply.into_iter();
        let epoch: String = next_as(&mut it)?;
        if epoch == "!ooo" {
            let (position, index, expected) =
                (next_as(&mut it)?, next_as(&mut it)?, next_as(&mut it)?);
            return Err(BrokerError::DeltaOutOfOrder {
                position,
                index,
                expected,
            });
        }
        let receivers: usize = next_as(&mut it)?;
        let k: usize = next_as(&mut it)?;
        let mut oversized = Vec::with_capacity(k);
        for _ in 0..k {
            let run: String = next_as(&mut it)?;
            let thread: String = next_as(&mut it)?;
            let reason: String = next_as(&mut it)?;
            let run = keys::unescape(&run)
                .ok_or_else(|| unavailable("a run name in redis that herald did not write"))?
                .into_owned();
            let reason = if reason == "too_many_runs" {
                "too_many_runs"
            } else {
                "run_too_large"
            };
            oversized.push((run, (!thread.is_empty()).then_some(thread), reason));
        }
        let mut results = Vec::new();
        // Which events recorded their run's activity, for the node-wide index.
        let mut touched = Vec::new();
        while let Some(seq) = it.next() {
            let seq: u64 = redis::from_redis_value(seq).map_err(unavailable)?;
            let how: u8 = next_as(&mut it)?;
            results.push((seq, how == 1));
            touched.push(how == 0);
        }
        self.index_runs(stream, events, &touched).await;
        Ok(PublishReply {
            epoch,
            receivers,
            results,
            oversized,
        })
    }

    /// Keep `<prefix>:runs` (open runs by last event time, for the sweeper)
    /// in step with what was appended: the events the script says recorded
    /// their run's activity (`touched`). A run's deltas do so at most once a
    /// second per part (`TOUCH_MS`), so a streamed answer does not write this
    /// one key, on one Cluster node, for every token of the fleet. It is an
    /// index, outside the stream's slot, so it is written after the script:
    /// a stale entry is skipped by the sweeper's re-check, a missing one is
    /// re-added by the run's next recorded activity.
    async fn index_runs(&self, stream: &str, events: &[NewEvent], touched: &[bool]) {
        let mut pipe = redis::pipe();
        let now = crate::clock::unix_now_ms();
        let index = format!("{}:runs", self.prefix);
        for (e, touched) in events.iter().zip(touched) {
            let (Some(run), true) = (e.frame.run_id.as_deref(), *touched) else {
                continue;
            };
            let member = format!("{}\n{}", keys::escape(stream), keys::escape(run));
            if runs::closes(&e.frame.event) {
                pipe.cmd("ZREM").arg(&index).arg(member).ignore();
            } else {
                pipe.cmd("ZADD").arg(&index).arg(now).arg(member).ignore();
            }
        }
        if pipe.is_empty() {
            return;
        }
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "could not update the runs index");
        }
    }

    async fn pairs(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        after: u64,
    ) -> Result<Vec<StoredEvent>, BrokerError> {
        let reply: Vec<redis::Value> = self.run(invocation).await?;
        let mut it = reply.into_iter();
        if it.next().is_none() {
            // The epoch changed: the events the reader wants are gone.
            return Err(BrokerError::Gone { after });
        }
        let mut out = Vec::new();
        while let Some(from) = it.next() {
            let from: u64 = redis::from_redis_value(from).map_err(unavailable)?;
            let seq: u64 = next_as(&mut it)?;
            let json: Vec<u8> = next_as(&mut it)?;
            out.push(StoredEvent {
                seq,
                from,
                json: Bytes::from(json),
            });
        }
        Ok(out)
    }
}

/// Open runs whose events one script reads during a replay.
const RUNS_PER_SCRIPT: usize = 8;

fn next_as<T: redis::FromRedisValue>(
    it: &mut impl Iterator<Item = redis::Value>,
) -> Result<T, BrokerError> {
    let v = it
        .next()
        .ok_or_else(|| unavailable("short reply from redis"))?;
    redis::from_redis_value(v).map_err(unavailable)
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        stream: &'a str,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'a, Result<Vec<Published>, BrokerError>> {
        Box::pin(async move {
            let started = crate::clock::now();
            let PublishReply {
                epoch,
                receivers,
                results,
                oversized,
            } = self.shared.publish(stream, &events, None).await?;
            metrics::histogram!(crate::telemetry::BROKER_PUBLISH_SECONDS)
                .record(started.elapsed().as_secs_f64());
            // Runs that outgrew their bound are closed right after (a close
            // does not grow a run, so this does not repeat).
            for (run, thread, reason) in oversized {
                tracing::warn!(stream, run_id = %run, reason, "closing a run over its stream's bounds");
                let counter = if reason == "too_many_runs" {
                    crate::telemetry::RUNS_TOO_MANY
                } else {
                    crate::telemetry::RUNS_TOO_LARGE
                };
                metrics::counter!(counter).increment(1);
                let close = super::run_closed_event(&run, thread, reason);
                if let Err(e) = self.shared.publish(stream, &[close], None).await {
                    tracing::warn!(error = %e, run_id = %run, "could not close an oversized run");
                }
            }
            let new = results.iter().filter(|(_, dup)| !dup).count();
            self.published.increment(new as u64);
            Ok(results
                .into_iter()
                .map(|(seq, duplicate)| Published {
                    seq,
                    epoch: epoch.clone(),
                    delivered: if duplicate { 0 } else { receivers },
                    duplicate,
                })
                .collect())
        })
    }

    fn position<'a>(
        &'a self,
        stream: &'a str,
    ) -> BoxFuture<'a, Result<StreamPosition, BrokerError>> {
        Box::pin(self.shared.position(stream))
    }

    fn history<'a>(
        &'a self,
        stream: &'a str,
        epoch: &'a str,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, BrokerError>> {
        Box::pin(async move {
            if after >= until {
                return Ok(Vec::new());
            }
            let base = self.shared.base(stream);
            let events = self
                .shared
                .pairs(
                    self.shared
                        .scripts
                        .history
                        .key(format!("{base}:meta"))
                        .key(format!("{base}:log"))
                        .arg(epoch)
                        .arg(after)
                        .arg(until)
                        .arg(limit)
                        .arg(&base),
                    after,
                )
                .await?;
            match events.first() {
                Some(first) if first.from == after + 1 => Ok(events),
                _ => Err(BrokerError::Gone { after }),
            }
        })
    }

    fn open_run_events<'a>(
        &'a self,
        stream: &'a str,
        epoch: &'a str,
        until: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let base = shared.base(stream);
            // The open runs (at most `max_open_runs`), then their events a
            // few runs per script, so a replay holds Redis briefly each time.
            let runs: Result<Vec<String>, _> = {
                let mut conn = shared.conn().await?;
                redis::cmd("HKEYS")
                    .arg(format!("{base}:runs"))
                    .query_async(&mut conn)
                    .await
            };
            let runs = runs.map_err(|e| shared.failed(e))?;
            let mut events = Vec::new();
            for chunk in runs.chunks(RUNS_PER_SCRIPT) {
                let mut script = shared.scripts.run_events.prepare_invoke();
                script
                    .key(format!("{base}:meta"))
                    .arg(epoch)
                    .arg(&base)
                    .arg(until);
                for run in chunk {
                    script.arg(run);
                }
                events.extend(shared.pairs(&script, 0).await?);
            }
            events.retain(|e| e.seq <= until);
            events.sort_by_key(|e| e.seq);
            Ok(events)
        })
    }

    fn open_runs<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<RunRef>, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.shared.conn().await?;
            let key = format!("{}:runs", self.shared.base(stream));
            let runs: Result<Vec<(String, String)>, _> =
                redis::cmd("HGETALL").arg(key).query_async(&mut conn).await;
            let runs = runs.map_err(|e| self.shared.failed(e))?;
            Ok(runs
                .iter()
                .filter_map(|(run, value)| run_ref(run, value))
                .collect())
        })
    }

    fn exists<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.shared.conn().await?;
            let key = format!("{}:meta", self.shared.base(stream));
            let found: Result<bool, _> = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await;
            found.map_err(|e| self.shared.failed(e))
        })
    }

    fn is_open_run<'a>(
        &'a self,
        stream: &'a str,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.shared.conn().await?;
            let key = format!("{}:runs", self.shared.base(stream));
            let open: Result<bool, _> = redis::cmd("HEXISTS")
                .arg(key)
                .arg(keys::escape(run_id).as_ref())
                .query_async(&mut conn)
                .await;
            open.map_err(|e| self.shared.failed(e))
        })
    }

    fn subscribe(&self, stream: &str) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        let timeout = self.shared.timing.subscribe_timeout;
        let sent = self.subs.send(SubCmd::Subscribe(stream.to_owned(), tx));
        Box::pin(async move {
            sent.map_err(|_| unavailable("pub/sub task stopped"))?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("pub/sub task stopped")),
                Err(_) => Err(unavailable("subscription not confirmed in time")),
            }
        })
    }

    fn unsubscribe(&self, stream: &str) {
        let _ = self.subs.send(SubCmd::Unsubscribe(stream.to_owned()));
    }

    fn ask_fleet(
        &self,
        request: FleetRequest,
    ) -> BoxFuture<'_, Result<Vec<FleetReply>, BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, mut rx) = mpsc::unbounded_channel();
            shared.pending.lock().insert(id, tx);
            let ask = FleetAsk {
                id,
                from: shared.node.clone(),
                request,
            };
            let payload = serde_json::to_string(&ask).map_err(unavailable);
            let sent = match payload {
                Ok(p) => shared.publish_raw(shared.control_channel(), p).await,
                Err(e) => Err(e),
            };
            let nodes = match sent {
                Ok(n) => n,
                Err(e) => {
                    shared.pending.lock().remove(&id);
                    return Err(e);
                }
            };
            // Every subscriber of the control channel is a node that answers
            // (on a Cluster, PUBLISH counts one shard's subscribers only, so
            // the nodes that sent a heartbeat lately are counted instead).
            let nodes = if shared.is_cluster() {
                shared.live_nodes().await.unwrap_or(nodes).max(1)
            } else {
                nodes
            };
            let mut replies = Vec::with_capacity(nodes);
            let deadline = tokio::time::Instant::now() + FLEET_TIMEOUT;
            while replies.len() < nodes {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(reply)) => replies.push(reply),
                    _ => {
                        tracing::warn!(
                            answered = replies.len(),
                            nodes,
                            "not every node answered a fleet request in time"
                        );
                        metrics::counter!(crate::telemetry::FLEET_INCOMPLETE).increment(1);
                        break;
                    }
                }
            }
            shared.pending.lock().remove(&id);
            Ok(replies)
        })
    }

    fn sweep(&self, _now: Instant) -> BoxFuture<'_, Vec<ExpiredRun>> {
        Box::pin(async move {
            let shared = &self.shared;
            if shared.is_cluster() {
                shared.heartbeat().await;
            }
            let Ok(mut conn) = shared.conn().await else {
                return Vec::new();
            };
            // Candidates by this node's clock; the script re-checks with Redis's.
            let cutoff = crate::clock::unix_now_ms()
                .saturating_sub(shared.limits.run_ttl.as_millis() as u64);
            let candidates: Result<Vec<String>, _> = redis::cmd("ZRANGEBYSCORE")
                .arg(format!("{}:runs", shared.prefix))
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut conn)
                .await;
            let candidates = match candidates {
                Ok(c) => c,
                Err(e) => {
                    shared.failed(e);
                    return Vec::new();
                }
            };
            let mut closed = Vec::new();
            for member in candidates {
                let Some((stream, run_id)) = member
                    .split_once('\n')
                    .and_then(|(s, r)| Some((keys::unescape(s)?, keys::unescape(r)?)))
                else {
                    continue;
                };
                let (stream, run_id) = (stream.as_ref(), run_id.as_ref());
                let key = format!("{}:runs", shared.base(stream));
                let value: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg(keys::escape(run_id).as_ref())
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                let thread_id = value
                    .as_deref()
                    .and_then(|v| v.split_once('\t'))
                    .map(|(_, t)| t.to_owned())
                    .filter(|t| !t.is_empty());
                let event = super::run_timeout_event(run_id, thread_id.clone());
                match shared.publish(stream, &[event], Some(run_id)).await {
                    Ok(PublishReply { results, .. }) if !results.is_empty() => {
                        self.published.increment(1);
                        closed.push(ExpiredRun {
                            stream: stream.to_owned(),
                            run_id: run_id.to_owned(),
                            thread_id,
                        });
                    }
                    // Not silent any more, or closed meanwhile (by its agent or
                    // another node): drop the index entry if the run is gone.
                    Ok(_) => {
                        if value.is_none() {
                            let _: Result<(), _> = redis::cmd("ZREM")
                                .arg(format!("{}:runs", shared.prefix))
                                .arg(&member)
                                .query_async(&mut conn)
                                .await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not close a silent run"),
                }
            }
            closed
        })
    }

    fn claim_message<'a>(
        &'a self,
        stream: &'a str,
        id: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<super::MessageClaim, BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let mut conn = shared.conn().await?;
            let key = format!("{}:msg:{id}", shared.base(stream));
            let claimed: Result<Option<String>, _> = redis::cmd("SET")
                .arg(&key)
                .arg(shared.claim_value())
                .arg("NX")
                .arg("PX")
                .arg(lease.as_millis() as u64)
                .query_async(&mut conn)
                .await;
            if claimed.map_err(|e| shared.failed(e))?.is_some() {
                return Ok(super::MessageClaim::New);
            }
            let state: Result<Option<String>, _> =
                redis::cmd("GET").arg(&key).query_async(&mut conn).await;
            Ok(match state.map_err(|e| shared.failed(e))?.as_deref() {
                Some("accepted") => super::MessageClaim::Accepted,
                Some(_) => super::MessageClaim::InFlight,
                // Released between the two commands: the caller tries again.
                None => super::MessageClaim::InFlight,
            })
        })
    }

    fn settle_message<'a>(
        &'a self,
        stream: &'a str,
        id: &'a str,
        accepted: bool,
        window: Duration,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let shared = &self.shared;
            let Ok(mut conn) = shared.conn().await else {
                return;
            };
            let key = format!("{}:msg:{id}", shared.base(stream));
            let done: Result<(), _> = if accepted {
                redis::cmd("SET")
                    .arg(&key)
                    .arg("accepted")
                    .arg("PX")
                    .arg(window.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
            } else {
                shared
                    .scripts
                    .release_claim
                    .key(&key)
                    .arg(shared.claim_value())
                    .invoke_async(&mut conn)
                    .await
            };
            if let Err(e) = done {
                shared.failed(e);
            }
        })
    }

    fn renew_claim<'a>(
        &'a self,
        stream: &'a str,
        id: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let key = format!("{}:msg:{id}", shared.base(stream));
            shared
                .run::<()>(
                    shared
                        .scripts
                        .renew_claim
                        .key(&key)
                        .arg(shared.claim_value())
                        .arg(lease.as_millis() as u64),
                )
                .await
        })
    }

    fn presence_set<'a>(
        &'a self,
        stream: &'a str,
        user: &'a str,
        count: usize,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<super::PresenceChange, BrokerError>> {
        Box::pin(async move {
            let mut script = self.shared.scripts.presence_set.prepare_invoke();
            script
                .key(format!("{}:presence", self.shared.base(stream)))
                .arg(self.shared.presence_node())
                .arg(user)
                .arg(count)
                .arg(ttl.as_millis() as u64);
            let change: u8 = self.shared.run(&script).await?;
            Ok(match change {
                1 => super::PresenceChange::Joined,
                2 => super::PresenceChange::Left,
                _ => super::PresenceChange::None,
            })
        })
    }

    fn presence_refresh<'a>(
        &'a self,
        stream: &'a str,
        users: Vec<(String, usize)>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, BrokerError>> {
        Box::pin(async move {
            let mut script = self.shared.scripts.presence_refresh.prepare_invoke();
            script
                .key(format!("{}:presence", self.shared.base(stream)))
                .arg(self.shared.presence_node())
                .arg(ttl.as_millis() as u64)
                .arg(users.len());
            for (user, count) in &users {
                script.arg(user).arg(*count);
            }
            self.shared.run(&script).await
        })
    }

    fn presence<'a>(
        &'a self,
        stream: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<super::Presence, BrokerError>> {
        Box::pin(async move {
            let mut script = self.shared.scripts.presence_list.prepare_invoke();
            script
                .key(format!("{}:presence", self.shared.base(stream)))
                .arg(limit);
            let reply: Vec<redis::Value> = self.shared.run(&script).await?;
            let mut it = reply.into_iter();
            let total_users: usize = next_as(&mut it)?;
            let total_connections: usize = next_as(&mut it)?;
            let mut users = Vec::new();
            while it.len() >= 2 {
                let user_id: String = next_as(&mut it)?;
                let connections: usize = next_as(&mut it)?;
                users.push(herald_core::protocol::PresentUser {
                    user_id,
                    connections,
                });
            }
            Ok(super::Presence {
                users,
                total_users,
                total_connections,
            })
        })
    }

    fn signal<'a>(
        &'a self,
        stream: &'a str,
        from_user: Option<&'a str>,
        json: String,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let command = if self.shared.is_cluster() {
                "SPUBLISH"
            } else {
                "PUBLISH"
            };
            let payload = format!("signal\n{}\n{json}", from_user.unwrap_or(""));
            let mut conn = self.shared.conn().await?;
            let sent: Result<usize, _> = redis::cmd(command)
                .arg(self.shared.channel(stream))
                .arg(payload)
                .query_async(&mut conn)
                .await;
            sent.map(drop).map_err(|e| self.shared.failed(e))
        })
    }

    fn remote(&self) -> bool {
        true
    }

    fn is_ready(&self) -> bool {
        self.shared.commands_ok.load(Ordering::Acquire)
            && self.shared.pubsub_up.load(Ordering::Acquire)
    }

    fn stats(&self) -> BrokerStats {
        // What Redis holds is Redis's to report (INFO memory); this node
        // holds nothing but its reconnect schedule.
        BrokerStats {
            reconnect_waits: self.shared.backoff_waits.lock().iter().copied().collect(),
            slot_follows: self.shared.slot_follows.load(Ordering::Relaxed),
            ..BrokerStats::default()
        }
    }
}

#[cfg(test)]
impl Shared {
    /// A node's shared state that has not connected (for the pure parts' tests).
    fn unconnected(node: &str, limits: StreamLimits) -> Arc<Self> {
        Arc::new(Shared {
            prefix: "hx".into(),
            node: node.into(),
            pending: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            nodes: RedisNodes::Single("redis://127.0.0.1:1".into()),
            scripts: Scripts::new(),
            limits,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            commands_ok: AtomicBool::new(false),
            pubsub_up: AtomicBool::new(false),
            timing: RedisTiming::default(),
            backoff_waits: Mutex::default(),
            slot_follows: AtomicU64::new(0),
            sentinel: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn keys_outlive_every_bound_by_a_minute() {
        let secs = Duration::from_secs;
        for (age, run, idem, want) in [
            (secs(3600), secs(600), secs(600), 3_660_000),
            (secs(10), secs(900), secs(20), 960_000),
            (secs(10), secs(20), secs(1200), 1_260_000),
        ] {
            let limits = StreamLimits {
                max_age: age,
                run_ttl: run,
                idempotency_window: idem,
                ..StreamLimits::default()
            };
            assert_eq!(Shared::unconnected("n", limits).ttl_ms(), want);
        }
    }

    /// An open run's thread is read back as it was written; a run with no
    /// thread has none (not an empty one, which no chat could match);
    /// a field Herald did not write is skipped.
    #[test]
    fn an_open_run_reads_back_its_thread_or_none() {
        let r = run_ref("r%7B1", "1733500000000\tchat-1").unwrap();
        assert_eq!(
            (r.run_id.as_str(), r.thread_id.as_deref()),
            ("r{1", Some("chat-1"))
        );
        assert_eq!(run_ref("r", "1733500000000\t").unwrap().thread_id, None);
        assert_eq!(run_ref("r", "1733500000000").unwrap().thread_id, None);
        assert_eq!(run_ref("r}", "1\tt"), None);
    }

    /// A message claim names its node: the renew and release scripts act
    /// only on a claim whose value is theirs, so two nodes must never hold
    /// the same value (one node would release the other's claim).
    #[test]
    fn each_node_claims_messages_with_its_own_value() {
        let (a, b) = (
            Shared::unconnected("node-a", StreamLimits::default()),
            Shared::unconnected("node-b", StreamLimits::default()),
        );
        assert_ne!(a.claim_value(), b.claim_value());
        assert!(a.claim_value().ends_with("node-a"), "{}", a.claim_value());
    }

    #[test]
    fn channels_are_per_stream_and_per_prefix() {
        let sh = Shared::unconnected("n1", StreamLimits::default());
        assert_eq!(sh.channel("user:a"), "hx:{user:a}:ch");
        assert_eq!(sh.control_channel(), "hx:ctl");
        assert_eq!(sh.reply_channel("n1"), "hx:reply:n1");
        assert_eq!(
            sh.stream_of(&sh.channel("user:a")).as_deref(),
            Some("user:a")
        );
        // A `}` in a user id does not end the hash tag early.
        assert_eq!(sh.channel("user:a}:x"), "hx:{user:a%7D:x}:ch");
        assert_eq!(
            sh.stream_of(&sh.channel("user:a}:x")).as_deref(),
            Some("user:a}:x")
        );
        assert_eq!(sh.stream_of("hx:{user:a}:log"), None);
        assert_eq!(sh.stream_of("hy:{user:a}:ch"), None);
    }

    #[tokio::test]
    async fn ready_needs_both_commands_and_pubsub() {
        let shared = Shared::unconnected("n1", StreamLimits::default());
        let (subs, _rx) = mpsc::unbounded_channel();
        let broker = RedisBroker {
            shared: shared.clone(),
            subs,
            task: tokio::spawn(async {}),
            switches: None,
            published: metrics::counter!("test"),
        };
        for (commands, pubsub) in [(false, false), (true, false), (false, true), (true, true)] {
            shared.commands_ok.store(commands, Ordering::Release);
            shared.pubsub_up.store(pubsub, Ordering::Release);
            assert_eq!(broker.is_ready(), commands && pubsub, "{commands} {pubsub}");
        }
        // A failed command makes the node unready until one succeeds.
        let _ = shared.failed("boom");
        assert!(!broker.is_ready());
        shared.ok();
        assert!(broker.is_ready());
    }

    #[test]
    fn a_short_reply_is_unavailable_not_a_panic() {
        let mut it = vec![redis::Value::Int(7)].into_iter();
        assert_eq!(next_as::<u64>(&mut it).unwrap(), 7);
        assert!(matches!(
            next_as::<u64>(&mut it),
            Err(BrokerError::Unavailable(_))
        ));
        let mut it = vec![redis::Value::Nil].into_iter();
        assert!(matches!(
            next_as::<u64>(&mut it),
            Err(BrokerError::Unavailable(_))
        ));
    }
}
