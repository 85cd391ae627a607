//! The Redis broker: streams live in Redis, so every node sees the same
//! history and a redeploy loses nothing.
//!
//! Keys of one stream share a hash tag (`<prefix>:{<stream>}:…`), so they sit
//! in one Cluster slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:meta` | hash | `epoch`, `seq` |
//! | `…:log` | stream | one entry per event, id `<seq>-0`, fields `d` (frame JSON), `t` (ms) |
//! | `…:runs` | hash | open run → `<last event ms>\t<thread_id>` |
//! | `…:run:<run_id>` | list | the open run's events (`seq`, `json` pairs) |
//! | `…:idem:<key>` | string | the seq of a publish idempotency key (expires) |
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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::catchup::StreamPosition;
use herald_core::protocol::ServerFrame;
use herald_core::stream::{StreamLimits, runs};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{OnceCell, mpsc, oneshot};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    Broker, BrokerError, BrokerStats, EventSink, ExpiredRun, FleetReply, FleetRequest, NewEvent,
    Published, StoredEvent,
};
use crate::BoxFuture;

/// How long a command may take before the broker counts as unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a subscription may take to be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two pub/sub reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
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
}

/// Where the Redis broker connects and how it names its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The Redis to use.
    pub nodes: RedisNodes,
    /// Key and channel prefix, so deployments can share a Redis.
    pub prefix: String,
}

/// The command connection: one Redis (reconnecting by itself) or a Cluster
/// (routing each command by its key's slot, following slot moves).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// The Lua helpers: trim a stream's log by age (one read when the oldest
/// entry is young enough, else up to 64 entries dropped per call), Redis's
/// clock in ms, and the stream's epoch (created on first use).
const TRIM_LUA: &str = r#"
local function trim_age(log, max_age, now)
  local cutoff = now - max_age
  local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][4]) >= cutoff then return end
  head = redis.call('XRANGE', log, '-', '+', 'COUNT', 64)
  for _, e in ipairs(head) do
    if tonumber(e[2][4]) >= cutoff then
      redis.call('XTRIM', log, 'MINID', e[1])
      return
    end
  end
  local last = tonumber(string.match(head[#head][1], '^(%d+)'))
  redis.call('XTRIM', log, 'MINID', (last + 1) .. '-0')
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function get_epoch(meta, new_epoch)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  return epoch
end
"#;

/// KEYS: meta, log, runs (one hash tag, so one Cluster slot).
/// ARGV: new_epoch, max_events, max_age_ms, ttl_ms, idem_ms, channel, base,
/// publish command (`PUBLISH`, or `SPUBLISH` on Cluster), cond_run,
/// run_ttl_ms, n, then n × (idem, run, closes, thread, tail).
/// With `cond_run` set, publishes only if that run is open and silent for
/// longer than run_ttl_ms (the sweeper's exactly-once close).
/// Returns {epoch, receivers, seq1, dup1, seq2, dup2, …}.
const PUBLISH_LUA: &str = r#"
local now = now_ms()
local epoch = get_epoch(KEYS[1], ARGV[1])
local base, publish, channel = ARGV[7], ARGV[8], ARGV[6]
local cond_run = ARGV[9]
if cond_run ~= '' then
  local v = redis.call('HGET', KEYS[3], cond_run)
  if not v then return {epoch, 0} end
  local last = tonumber(string.match(v, '^(%d+)'))
  if now - last <= tonumber(ARGV[10]) then return {epoch, 0} end
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local n = tonumber(ARGV[11])
local out = {epoch, 0}
local receivers = 0
for i = 0, n - 1 do
  local a = 12 + i * 5
  local idem, run, closes, thread, tail = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local prev = false
  if idem ~= '' then prev = redis.call('GET', base .. ':idem:' .. idem) end
  if prev then
    table.insert(out, tonumber(prev))
    table.insert(out, 1)
  else
    seq = seq + 1
    local json = '{"type":"event","seq":' .. seq .. tail
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', json, 't', now)
    if idem ~= '' then redis.call('SET', base .. ':idem:' .. idem, seq, 'PX', ARGV[5]) end
    if run ~= '' then
      local rk = base .. ':run:' .. run
      if closes == '1' then
        redis.call('DEL', rk)
        redis.call('HDEL', KEYS[3], run)
      else
        redis.call('RPUSH', rk, seq, json)
        redis.call('PEXPIRE', rk, ARGV[4])
        redis.call('HSET', KEYS[3], run, now .. '\t' .. thread)
      end
    end
    receivers = redis.call(publish, channel, epoch .. '\n' .. seq .. '\n' .. json)
    table.insert(out, seq)
    table.insert(out, 0)
  end
end
out[2] = receivers
redis.call('HSET', KEYS[1], 'seq', seq)
trim_age(KEYS[2], tonumber(ARGV[3]), now)
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ARGV[4]) end
return out
"#;

/// KEYS: meta, log. ARGV: new_epoch, max_age_ms, ttl_ms.
/// Returns {epoch, last_seq, first_seq}.
const POSITION_LUA: &str = r#"
local epoch = get_epoch(KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
trim_age(KEYS[2], tonumber(ARGV[2]), now_ms())
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = seq + 1
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
return {epoch, seq, first}
"#;

/// KEYS: meta, log. ARGV: epoch, after, until, limit.
/// Returns {} when the epoch differs, else {1, seq1, json1, seq2, json2, …}.
const HISTORY_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local out = {1}
local from = (tonumber(ARGV[2]) + 1) .. '-0'
for _, e in ipairs(redis.call('XRANGE', KEYS[2], from, ARGV[3] .. '-0', 'COUNT', ARGV[4])) do
  table.insert(out, string.match(e[1], '^(%d+)'))
  table.insert(out, e[2][2])
end
return out
"#;

/// KEYS: meta, runs. ARGV: epoch, base.
/// Returns {} when the epoch differs, else {1, seq1, json1, …} (unsorted).
const RUN_EVENTS_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local out = {1}
for _, run in ipairs(redis.call('HKEYS', KEYS[2])) do
  for _, v in ipairs(redis.call('LRANGE', ARGV[2] .. ':run:' .. run, 0, -1)) do
    table.insert(out, v)
  end
end
return out
"#;

#[derive(Debug)]
struct Scripts {
    publish: redis::Script,
    position: redis::Script,
    history: redis::Script,
    run_events: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let with_helpers = |body: &str| redis::Script::new(&format!("{TRIM_LUA}\n{body}"));
        Self {
            publish: with_helpers(PUBLISH_LUA),
            position: with_helpers(POSITION_LUA),
            history: redis::Script::new(HISTORY_LUA),
            run_events: redis::Script::new(RUN_EVENTS_LUA),
        }
    }
}

/// A subscription change for the pub/sub task, in the order the hub made it.
#[derive(Debug)]
enum SubCmd {
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(String),
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
    conn: OnceCell<Conn>,
    /// The last command succeeded.
    commands_ok: AtomicBool,
    /// The pub/sub connection is up and its subscriptions confirmed.
    pubsub_up: AtomicBool,
}

/// The Redis broker of one node.
#[derive(Debug)]
pub struct RedisBroker {
    shared: Arc<Shared>,
    subs: mpsc::UnboundedSender<SubCmd>,
    task: tokio::task::JoinHandle<()>,
    published: metrics::Counter,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
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
        let single = match &cfg.nodes {
            RedisNodes::Single(url) => {
                Some(redis::Client::open(url.as_str()).map_err(unavailable)?)
            }
            RedisNodes::Cluster(urls) => {
                redis::cluster::ClusterClient::new(urls.clone()).map_err(unavailable)?;
                None
            }
        };
        let shared = Arc::new(Shared {
            prefix: cfg.prefix.clone(),
            node: node.to_owned(),
            pending: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            nodes: cfg.nodes.clone(),
            scripts: Scripts::new(),
            limits,
            conn: OnceCell::new(),
            commands_ok: AtomicBool::new(false),
            pubsub_up: AtomicBool::new(false),
        });
        let (subs, rx) = mpsc::unbounded_channel();
        let task = match single {
            Some(client) => tokio::spawn(pubsub_task(shared.clone(), client, sink, rx)),
            None => tokio::spawn(cluster_pubsub_task(shared.clone(), sink, rx)),
        };
        Ok(Self {
            shared,
            subs,
            task,
            published: metrics::counter!(crate::telemetry::EVENTS_PUBLISHED),
        })
    }
}

impl Shared {
    fn base(&self, stream: &str) -> String {
        format!("{}:{{{stream}}}", self.prefix)
    }

    fn channel(&self, stream: &str) -> String {
        format!("{}:ch", self.base(stream))
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
    fn stream_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:ch")
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

    async fn conn(&self) -> Result<Conn, BrokerError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                match &self.nodes {
                    RedisNodes::Single(url) => {
                        let client = redis::Client::open(url.as_str())?;
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(COMMAND_TIMEOUT))
                            .set_response_timeout(Some(COMMAND_TIMEOUT))
                            .set_number_of_retries(1)
                            .set_max_delay(MAX_RECONNECT_DELAY);
                        Ok(Conn::Single(
                            ConnectionManager::new_with_config(client, config).await?,
                        ))
                    }
                    RedisNodes::Cluster(urls) => {
                        let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                            .connection_timeout(COMMAND_TIMEOUT)
                            .response_timeout(COMMAND_TIMEOUT)
                            .build()?;
                        Ok::<_, redis::RedisError>(Conn::Cluster(
                            client.get_async_connection().await?,
                        ))
                    }
                }
            })
            .await
            .map_err(|e| self.failed(e))?;
        Ok(conn.clone())
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
        let result =
            tokio::time::timeout(COMMAND_TIMEOUT * 2, invocation.invoke_async::<T>(&mut conn))
                .await;
        match result {
            Ok(Ok(v)) => {
                self.ok();
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(e)),
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
                    .arg(self.ttl_ms()),
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
    ) -> Result<(String, usize, Vec<(u64, bool)>), BrokerError> {
        let base = self.base(stream);
        let mut script = self.scripts.publish.prepare_invoke();
        script
            .key(format!("{base}:meta"))
            .key(format!("{base}:log"))
            .key(format!("{base}:runs"))
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
            .arg(cond_run.unwrap_or(""))
            .arg(self.limits.run_ttl.as_millis() as u64)
            .arg(events.len());
        for e in events {
            let closes = e.frame.run_id.is_some() && runs::closes(&e.frame.event);
            script
                .arg(e.idempotency_key.as_deref().unwrap_or(""))
                .arg(e.frame.run_id.as_deref().unwrap_or(""))
                .arg(if closes { "1" } else { "0" })
                .arg(e.frame.thread_id.as_deref().unwrap_or(""))
                .arg(frame_tail(&e.frame)?);
        }
        let reply: Vec<redis::Value> = self.run(&script).await?;
        let mut it = reply.into_iter();
        let epoch: String = next_as(&mut it)?;
        let receivers: usize = next_as(&mut it)?;
        let mut results = Vec::new();
        while let Some(seq) = it.next() {
            let seq: u64 = redis::from_redis_value(seq).map_err(unavailable)?;
            let dup: u8 = next_as(&mut it)?;
            results.push((seq, dup == 1));
        }
        self.index_runs(stream, events, &results).await;
        Ok((epoch, receivers, results))
    }

    /// Keep `<prefix>:runs` (open runs by last event time, for the sweeper)
    /// in step with what was appended. It is an index, outside the stream's
    /// slot, so it is written after the script: a stale entry is skipped by
    /// the sweeper's re-check, a missing one is re-added by the run's next event.
    async fn index_runs(&self, stream: &str, events: &[NewEvent], results: &[(u64, bool)]) {
        let mut pipe = redis::pipe();
        let now = crate::clock::unix_now_ms();
        let index = format!("{}:runs", self.prefix);
        for (e, (_, dup)) in events.iter().zip(results) {
            let (Some(run), false) = (e.frame.run_id.as_deref(), *dup) else {
                continue;
            };
            let member = format!("{stream}\n{run}");
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
        while let Some(seq) = it.next() {
            let seq: u64 = redis::from_redis_value(seq).map_err(unavailable)?;
            let json: Vec<u8> = next_as(&mut it)?;
            out.push(StoredEvent {
                seq,
                json: Bytes::from(json),
            });
        }
        Ok(out)
    }
}

fn next_as<T: redis::FromRedisValue>(
    it: &mut impl Iterator<Item = redis::Value>,
) -> Result<T, BrokerError> {
    let v = it
        .next()
        .ok_or_else(|| unavailable("short reply from redis"))?;
    redis::from_redis_value(v).map_err(unavailable)
}

/// The event frame's JSON after `{"type":"event","seq":0`: the script puts
/// the real seq in front.
fn frame_tail(frame: &herald_core::protocol::EventFrame) -> Result<String, BrokerError> {
    const HEAD: &str = r#"{"type":"event","seq":0"#;
    let json = ServerFrame::Event(frame).to_json();
    json.strip_prefix(HEAD)
        .map(str::to_owned)
        .ok_or_else(|| unavailable("event frame does not start with its type and seq"))
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        stream: &'a str,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'a, Result<Vec<Published>, BrokerError>> {
        Box::pin(async move {
            let started = crate::clock::now();
            let (epoch, receivers, results) = self.shared.publish(stream, &events, None).await?;
            metrics::histogram!(crate::telemetry::BROKER_PUBLISH_SECONDS)
                .record(started.elapsed().as_secs_f64());
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
                        .arg(limit),
                    after,
                )
                .await?;
            match events.first() {
                Some(first) if first.seq == after + 1 => Ok(events),
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
            let base = self.shared.base(stream);
            let mut events = self
                .shared
                .pairs(
                    self.shared
                        .scripts
                        .run_events
                        .key(format!("{base}:meta"))
                        .key(format!("{base}:runs"))
                        .arg(epoch)
                        .arg(&base),
                    0,
                )
                .await?;
            events.retain(|e| e.seq <= until);
            events.sort_by_key(|e| e.seq);
            Ok(events)
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
                .arg(run_id)
                .query_async(&mut conn)
                .await;
            open.map_err(|e| self.shared.failed(e))
        })
    }

    fn subscribe(&self, stream: &str) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.subs.send(SubCmd::Subscribe(stream.to_owned(), tx));
        Box::pin(async move {
            sent.map_err(|_| unavailable("pub/sub task stopped"))?;
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
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
                let Some((stream, run_id)) = member.split_once('\n') else {
                    continue;
                };
                let (stream, run_id) = (stream.to_owned(), run_id.to_owned());
                let (stream, run_id) = (stream.as_str(), run_id.as_str());
                let key = format!("{}:runs", shared.base(stream));
                let value: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg(run_id)
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
                    Ok((_, _, results)) if !results.is_empty() => {
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
        window: Duration,
    ) -> BoxFuture<'a, Result<super::MessageClaim, BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let mut conn = shared.conn().await?;
            let key = format!("{}:msg:{id}", shared.base(stream));
            let claimed: Result<Option<String>, _> = redis::cmd("SET")
                .arg(&key)
                .arg("inflight")
                .arg("NX")
                .arg("PX")
                .arg(window.as_millis() as u64)
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
                redis::cmd("DEL").arg(&key).query_async(&mut conn).await
            };
            if let Err(e) = done {
                shared.failed(e);
            }
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.commands_ok.load(Ordering::Acquire)
            && self.shared.pubsub_up.load(Ordering::Acquire)
    }

    fn stats(&self) -> BrokerStats {
        // What Redis holds is Redis's to report (INFO memory); this node holds nothing.
        BrokerStats::default()
    }
}

/// The pub/sub connection: subscribe in order, deliver every message to the
/// hub, reconnect after a drop and resync every stream.
async fn pubsub_task(
    shared: Arc<Shared>,
    client: redis::Client,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut delay = Duration::from_millis(50);
    let mut reconnect = false;
    loop {
        let connected = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await;
        let pubsub = match connected.unwrap_or_else(|_| Err(timed_out())) {
            Ok(p) => p,
            Err(e) => {
                shared.pubsub_up.store(false, Ordering::Release);
                refuse_waiting(&mut cmds, &mut wanted, &e.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                reconnect = true;
                continue;
            }
        };
        delay = Duration::from_millis(50);
        let (mut subscriber, mut messages) = pubsub.split();
        let mut channels: Vec<String> = wanted.iter().map(|s| shared.channel(s)).collect();
        channels.push(shared.control_channel());
        channels.push(shared.reply_channel(&shared.node));
        if let Err(e) = subscriber.subscribe(&channels).await {
            tracing::warn!(error = %e, "redis resubscribe failed");
            continue;
        }
        shared.pubsub_up.store(true, Ordering::Release);
        if reconnect {
            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
            tracing::info!(
                streams = wanted.len(),
                "redis pub/sub reconnected; resyncing"
            );
            resync_all(&shared, &sink, &wanted).await;
        }
        reconnect = true;
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(first) = cmd else { return };
                    // Batch whatever else is queued, keeping the order.
                    let mut batch = vec![first];
                    while let Ok(more) = cmds.try_recv() {
                        batch.push(more);
                    }
                    if let Err(e) = apply(&shared, &mut subscriber, &mut wanted, batch).await {
                        tracing::warn!(error = %e, "redis subscribe failed");
                        break;
                    }
                }
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    deliver(&shared, &sink, msg.get_channel_name(), msg.get_payload_bytes());
                }
            }
        }
        shared.pubsub_up.store(false, Ordering::Release);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "connect timed out"))
}

/// While the pub/sub connection is down: answer every waiting subscription
/// with `detail` (so hellos fail fast instead of hanging), keeping `wanted`
/// in step with the hub's requests.
fn refuse_waiting(
    cmds: &mut mpsc::UnboundedReceiver<SubCmd>,
    wanted: &mut BTreeSet<String>,
    detail: &str,
) {
    tracing::debug!(error = %detail, "redis pub/sub connect failed");
    while let Ok(cmd) = cmds.try_recv() {
        match cmd {
            SubCmd::Subscribe(s, tx) => {
                wanted.insert(s);
                let _ = tx.send(Err(unavailable(detail)));
            }
            SubCmd::Unsubscribe(s) => {
                wanted.remove(&s);
            }
        }
    }
}

/// Apply a batch of subscription changes in order: consecutive subscribes go
/// out as one SUBSCRIBE, and each waiter is answered once it is confirmed.
async fn apply(
    shared: &Shared,
    subscriber: &mut redis::aio::PubSubSink,
    wanted: &mut BTreeSet<String>,
    batch: Vec<SubCmd>,
) -> Result<(), redis::RedisError> {
    let mut pending: Vec<(String, oneshot::Sender<Result<(), BrokerError>>)> = Vec::new();
    let mut result = Ok(());
    for cmd in batch {
        match cmd {
            SubCmd::Subscribe(stream, tx) => {
                if wanted.contains(&stream) && pending.iter().all(|(s, _)| *s != stream) {
                    let _ = tx.send(Ok(()));
                } else {
                    wanted.insert(stream.clone());
                    pending.push((stream, tx));
                }
            }
            SubCmd::Unsubscribe(stream) => {
                result = result.and(flush(shared, subscriber, &mut pending).await);
                if wanted.remove(&stream) && result.is_ok() {
                    result = subscriber.unsubscribe(shared.channel(&stream)).await;
                }
            }
        }
    }
    result.and(flush(shared, subscriber, &mut pending).await)
}

async fn flush(
    shared: &Shared,
    subscriber: &mut redis::aio::PubSubSink,
    pending: &mut Vec<(String, oneshot::Sender<Result<(), BrokerError>>)>,
) -> Result<(), redis::RedisError> {
    if pending.is_empty() {
        return Ok(());
    }
    let channels: Vec<String> = pending.iter().map(|(s, _)| shared.channel(s)).collect();
    let result = subscriber.subscribe(&channels).await;
    for (_, tx) in pending.drain(..) {
        let _ = tx.send(result.as_ref().map(|_| ()).map_err(unavailable));
    }
    result
}

/// Handle one pub/sub message: a stream's event goes to the hub; a fleet
/// request is answered on the asker's reply channel; an answer goes to the
/// request waiting for it.
fn deliver(shared: &Arc<Shared>, sink: &Weak<dyn EventSink>, channel: &str, payload: &[u8]) {
    if channel == shared.control_channel() {
        answer(shared, sink, payload);
        return;
    }
    if channel == shared.reply_channel(&shared.node) {
        match serde_json::from_slice::<FleetAnswer>(payload) {
            Ok(a) => {
                if let Some(tx) = shared.pending.lock().get(&a.id) {
                    let _ = tx.send(a.reply);
                }
            }
            Err(e) => tracing::error!(error = %e, "malformed fleet answer"),
        }
        return;
    }
    let Some(stream) = shared.stream_of(channel) else {
        return;
    };
    if let Some(probe) = payload.strip_prefix(b"probe\n") {
        // A subscription probe: ours is answered, another node's ignored.
        let mut parts = probe.splitn(2, |b| *b == b'\n');
        if parts.next() == Some(shared.node.as_bytes())
            && let Some(id) = parts
                .next()
                .and_then(|id| std::str::from_utf8(id).ok()?.parse::<u64>().ok())
            && let Some(tx) = shared.probes.lock().remove(&id)
        {
            let _ = tx.send(());
        }
        return;
    }
    let mut parts = payload.splitn(3, |b| *b == b'\n');
    let (Some(epoch), Some(seq), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        tracing::error!(stream, "malformed message on a herald channel");
        return;
    };
    let (Ok(epoch), Some(seq)) = (
        std::str::from_utf8(epoch),
        std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()),
    ) else {
        tracing::error!(stream, "malformed message on a herald channel");
        return;
    };
    if let Some(sink) = sink.upgrade() {
        let event = StoredEvent {
            seq,
            json: Bytes::copy_from_slice(json),
        };
        sink.deliver(stream, epoch, &[event], crate::clock::now());
    }
}

/// The pub/sub side on a Redis Cluster: one RESP3 cluster connection whose
/// pushes arrive on a channel. Stream channels are sharded (SSUBSCRIBE on the
/// slot's master; redis-rs resubscribes after reconnects and slot moves); the
/// control and reply channels are ordinary (cluster-wide). A disconnection
/// push resyncs every stream, once right after and once a little later.
async fn cluster_pubsub_task(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let RedisNodes::Cluster(urls) = &shared.nodes else {
        return;
    };
    let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
    let client = match redis::cluster::ClusterClientBuilder::new(urls.clone())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(push_tx)
        .connection_timeout(COMMAND_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "redis cluster client");
            return;
        }
    };
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut delay = Duration::from_millis(50);
    let mut conn = loop {
        let connected = async {
            let mut c = client.get_async_connection().await?;
            c.subscribe(&[shared.control_channel(), shared.reply_channel(&shared.node)])
                .await?;
            Ok::<_, redis::RedisError>(c)
        };
        let connected = tokio::time::timeout(COMMAND_TIMEOUT * 2, connected).await;
        match connected.unwrap_or_else(|_| Err(timed_out())) {
            Ok(c) => break c,
            Err(e) => {
                refuse_waiting(&mut cmds, &mut wanted, &e.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    };
    shared.heartbeat().await;
    for stream in &wanted {
        if let Err(e) = conn.ssubscribe(shared.channel(stream)).await {
            tracing::warn!(error = %e, "redis ssubscribe failed");
        }
    }
    shared.pubsub_up.store(true, Ordering::Release);
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(SubCmd::Subscribe(stream, tx)) => {
                    if wanted.contains(&stream) {
                        let _ = tx.send(Ok(()));
                        continue;
                    }
                    // One slot per channel: sharded subscriptions go one by one.
                    let done = conn.ssubscribe(shared.channel(&stream)).await;
                    if done.is_ok() {
                        wanted.insert(stream);
                    }
                    let _ = tx.send(done.map_err(unavailable));
                }
                Some(SubCmd::Unsubscribe(stream)) => {
                    if wanted.remove(&stream)
                        && let Err(e) = conn.sunsubscribe(shared.channel(&stream)).await
                    {
                        tracing::warn!(error = %e, "redis sunsubscribe failed");
                    }
                }
            },
            push = pushes.recv() => {
                let Some(push) = push else { return };
                match push.kind {
                    redis::PushKind::Message | redis::PushKind::SMessage => {
                        let mut data = push.data.into_iter();
                        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                            continue;
                        };
                        let (Ok(channel), Ok(payload)) = (
                            redis::from_redis_value::<String>(channel),
                            redis::from_redis_value::<Vec<u8>>(payload),
                        ) else {
                            continue;
                        };
                        deliver(&shared, &sink, &channel, &payload);
                    }
                    redis::PushKind::SUnsubscribe => {
                        // The server dropped a sharded subscription: its slot
                        // moved to another master. Subscribe again until a
                        // probe published on the channel comes back, then
                        // catch up what was published meanwhile.
                        let Some(channel) = push
                            .data
                            .into_iter()
                            .next()
                            .and_then(|c| redis::from_redis_value::<String>(c).ok())
                        else {
                            continue;
                        };
                        let Some(stream) = shared.stream_of(&channel).map(str::to_owned) else {
                            continue;
                        };
                        if wanted.contains(&stream) {
                            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
                            tokio::spawn(follow_moved_slot(
                                shared.clone(),
                                sink.clone(),
                                conn.clone(),
                                stream,
                            ));
                        }
                    }
                    redis::PushKind::Disconnection => {
                        metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
                        tracing::warn!("a redis cluster pub/sub connection dropped; resyncing");
                        let (shared, sink, streams) = (shared.clone(), sink.clone(), wanted.clone());
                        tokio::spawn(async move {
                            for wait in [Duration::from_millis(500), Duration::from_secs(2)] {
                                tokio::time::sleep(wait).await;
                                resync_all(&shared, &sink, &streams).await;
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Resubscribe to `stream`'s sharded channel after its slot moved, until a
/// probe this node publishes on it is received (so the subscription is known
/// to be on the slot's new master), then resync the stream.
async fn follow_moved_slot(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut conn: redis::cluster_async::ClusterConnection,
    stream: String,
) {
    let channel = shared.channel(&stream);
    for attempt in 0..40u32 {
        tokio::time::sleep(Duration::from_millis(50) * attempt.min(10)).await;
        match tokio::time::timeout(COMMAND_TIMEOUT, conn.ssubscribe(&channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, attempt, "resubscribing a moved slot");
                continue;
            }
            Err(_) => {
                tracing::debug!(attempt, "resubscribing a moved slot timed out");
                continue;
            }
        }
        let (tx, rx) = oneshot::channel();
        let probe = shared.next_request.fetch_add(1, Ordering::Relaxed);
        shared.probes.lock().insert(probe, tx);
        let sent = async {
            let mut cmd_conn = shared.conn().await?;
            redis::cmd("SPUBLISH")
                .arg(&channel)
                .arg(format!("probe\n{}\n{probe}", shared.node))
                .query_async::<usize>(&mut cmd_conn)
                .await
                .map_err(unavailable)
        };
        let heard = sent.await.is_ok()
            && tokio::time::timeout(Duration::from_millis(500), rx)
                .await
                .is_ok();
        shared.probes.lock().remove(&probe);
        if heard {
            let streams = BTreeSet::from([stream]);
            resync_all(&shared, &sink, &streams).await;
            return;
        }
    }
    tracing::error!(stream = %stream, "could not resubscribe after a slot move");
}

/// Answer a fleet request from the hub and send the answer (off the reader).
fn answer(shared: &Arc<Shared>, sink: &Weak<dyn EventSink>, payload: &[u8]) {
    let ask: FleetAsk = match serde_json::from_slice(payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "malformed fleet request");
            return;
        }
    };
    let Some(sink) = sink.upgrade() else { return };
    let reply = sink.answer(&ask.request);
    let payload = match serde_json::to_string(&FleetAnswer { id: ask.id, reply }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a fleet answer");
            return;
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let channel = shared.reply_channel(&ask.from);
        if let Err(e) = shared.publish_raw(channel, payload).await {
            tracing::warn!(error = %e, "cannot send a fleet answer");
        }
    });
}

/// After a pub/sub reconnect: tell the hub where every stream is, so its
/// connections read what they missed from the log.
async fn resync_all(shared: &Shared, sink: &Weak<dyn EventSink>, wanted: &BTreeSet<String>) {
    let mut positions = HashMap::new();
    for stream in wanted {
        match shared.position(stream).await {
            Ok(pos) => {
                positions.insert(stream.clone(), pos);
            }
            Err(e) => tracing::warn!(error = %e, stream = %stream, "resync failed"),
        }
    }
    if let Some(sink) = sink.upgrade() {
        for (stream, pos) in positions {
            metrics::counter!(crate::telemetry::BROKER_CATCH_UPS).increment(1);
            sink.resync(&stream, &pos.epoch, pos.last_seq);
        }
    }
}
