//! The registry: every live connection by id, every user's authenticated
//! connections, and the publish path (append to history, then fan out).
//!
//! Each user has a *gate* (an async mutex). Publishing an event (append +
//! fan-out) and registering a connection (resume decision + welcome + joining
//! the fan-out set) both run under it, so a connection sees exactly the events
//! after the point its replay ends — no gap and no duplicate, however many
//! publishers race the resume. Lock order: user gate → user's connection list
//! → connection state machine. Cleanup takes the connection list without the
//! gate, so it never waits for a slow store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use herald_core::protocol::{Hello, ServerFrame};
use herald_core::stream::ResumeDecision;
use herald_core::{CloseInfo, CloseReason, Initiator, State};
use parking_lot::Mutex;
use serde::Serialize;

use crate::connection::{CatchUp, ConnShared, OutFrame};
use crate::history::{HistoryStore, NewEvent, StoreError};
use crate::telemetry::{self, Stats};

#[derive(Debug, Default)]
struct UserEntry {
    gate: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Arc<ConnShared>>>,
}

/// Why a connection could not join its user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The user is at `max_connections_per_user`.
    #[error("too many connections for this user")]
    UserFull,
    /// The connection started closing before it could be registered.
    #[error("connection is no longer handshaking")]
    NotHandshaking,
    /// The history store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of publishing one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The event's seq in the user's stream.
    pub seq: u64,
    /// The stream's epoch.
    pub epoch: String,
    /// Live connections the event was queued to.
    pub delivered: usize,
    /// True when the idempotency key was seen before (nothing appended).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// One row of `GET /api/v1/connections`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    /// Connection id.
    pub conn_id: String,
    /// User, once authenticated.
    pub user_id: Option<String>,
    /// Lifecycle state.
    pub state: &'static str,
    /// Milliseconds since the upgrade.
    pub age_ms: u64,
    /// Frames waiting to be written.
    pub queue_depth: usize,
    /// Bytes waiting in the live queue.
    pub queued_bytes: usize,
    /// Highest seq the client acknowledged.
    pub acked_seq: u64,
}

/// All connections and users of one server.
#[derive(Debug)]
pub struct Registry {
    conns: DashMap<u64, (Arc<ConnShared>, Arc<AtomicBool>)>,
    users: DashMap<String, Arc<UserEntry>>,
    store: Arc<dyn HistoryStore>,
    stats: Arc<Stats>,
    /// Publish-path counters, resolved once instead of per event.
    events_published: metrics::Counter,
    events_queued: metrics::Counter,
}

impl Registry {
    /// An empty registry over `store` that counts into `stats`.
    pub fn new(store: Arc<dyn HistoryStore>, stats: Arc<Stats>) -> Self {
        Self {
            conns: DashMap::new(),
            users: DashMap::new(),
            store,
            stats,
            events_published: metrics::counter!(telemetry::EVENTS_PUBLISHED),
            events_queued: metrics::counter!(telemetry::EVENTS_QUEUED),
        }
    }

    /// The history store.
    pub fn store(&self) -> &Arc<dyn HistoryStore> {
        &self.store
    }

    /// Live connections (any state but closed).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when no connection is live.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Track a freshly upgraded connection.
    pub fn insert(&self, conn: Arc<ConnShared>) {
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CONNECTIONS_OPENED).increment(1);
        metrics::gauge!(telemetry::CONNECTIONS_LIVE).increment(1.0);
        self.conns
            .insert(conn.id, (conn, Arc::new(AtomicBool::new(false))));
    }

    fn entry(&self, user: &str) -> Arc<UserEntry> {
        if let Some(e) = self.users.get(user) {
            return e.clone();
        }
        self.users.entry(user.to_owned()).or_default().clone()
    }

    /// Drop the user's entry when nobody holds it and it has no connection.
    /// (Holding the shard lock, nobody can clone it concurrently.)
    fn release(&self, user: &str, entry: Arc<UserEntry>) {
        drop(entry);
        self.users.remove_if(user, |_, e| {
            Arc::strong_count(e) == 1 && e.conns.lock().is_empty()
        });
    }

    /// Move `conn` to `Ready` as `user`, under the user's gate: decide the
    /// resume, queue the welcome, plan the replay, and join the fan-out set.
    pub async fn register(
        &self,
        user: &str,
        conn: &Arc<ConnShared>,
        hello: &Hello,
        max_per_user: usize,
        heartbeat_ms: u64,
    ) -> Result<(), RegisterError> {
        let entry = self.entry(user);
        let result = async {
            let _gate = entry.gate.lock().await;
            if entry.conns.lock().len() >= max_per_user {
                return Err(RegisterError::UserFull);
            }
            let pos = self.store.position(user).await?;
            let decision = match &hello.resume {
                Some(r) => Some(self.store.check_resume(user, &r.epoch, r.seq).await?),
                None => None,
            };
            let until = pos.last_seq;
            let runs = hello.replay_active_runs.then_some(CatchUp::Runs { until });
            let (resumed, reset, plan) = match decision {
                Some(ResumeDecision::Resume { after }) if after == until => (true, false, None),
                Some(ResumeDecision::Resume { after }) => {
                    (true, false, Some(CatchUp::Replay { after, until }))
                }
                Some(ResumeDecision::Reset) => (false, true, runs),
                None => (false, false, runs),
            };
            let welcome = ServerFrame::Welcome {
                conn_id: &conn.id_str,
                user_id: user,
                epoch: &pos.epoch,
                seq: until,
                resumed,
                reset,
                heartbeat_ms,
            }
            .to_json();
            conn.with_core(|c| {
                c.authenticate(Instant::now(), OutFrame::from(welcome), plan.is_some())
            })
            .map_err(|_| RegisterError::NotHandshaking)?;
            conn.set_user(user);
            conn.set_catch_up(plan);
            entry.conns.lock().push(conn.clone());
            Ok(())
        }
        .await;
        self.release(user, entry);
        result
    }

    /// Append an event to `user`'s stream, then queue it to every live
    /// connection of the user (serialized once). A repeated idempotency key
    /// appends and delivers nothing and returns the original seq.
    pub async fn publish(&self, user: &str, event: NewEvent) -> Result<Published, StoreError> {
        let entry = self.entry(user);
        let result = async {
            let _gate = entry.gate.lock().await;
            let appended = self.store.append(user, event).await?;
            let mut delivered = 0;
            if let Some(frame) = &appended.frame {
                for conn in entry.conns.lock().iter() {
                    if conn.send(frame.clone()).is_ok() {
                        delivered += 1;
                    }
                }
                self.events_published.increment(1);
                self.events_queued.increment(delivered as u64);
            }
            Ok(Published {
                seq: appended.seq,
                epoch: appended.epoch,
                delivered,
                duplicate: appended.frame.is_none(),
            })
        }
        .await;
        self.release(user, entry);
        result
    }

    /// Close every connection of `user` with `reason`; returns how many
    /// closes this call decided.
    pub fn close_user(&self, user: &str, reason: CloseReason, detail: &str) -> usize {
        let Some(entry) = self.users.get(user).map(|e| e.clone()) else {
            return 0;
        };
        let conns = entry.conns.lock().clone();
        self.release(user, entry);
        conns
            .iter()
            .filter(|c| c.close(CloseInfo::new(reason, Initiator::Server, detail)))
            .count()
    }

    /// Set the scrape-time gauges: connections by state, queued frames, deepest queue.
    pub fn observe_gauges(&self) {
        let mut by_state = [0usize; 4];
        let (mut queued, mut deepest) = (0, 0);
        for e in self.conns.iter() {
            let conn = &e.value().0;
            let (depth, _) = conn.queue_depth();
            by_state[conn.state() as usize] += 1;
            queued += depth;
            deepest = deepest.max(depth);
        }
        for state in [
            State::Handshaking,
            State::Ready,
            State::Closing,
            State::Closed,
        ] {
            metrics::gauge!(telemetry::CONNECTIONS_BY_STATE, "state" => state.as_str())
                .set(by_state[state as usize] as f64);
        }
        metrics::gauge!(telemetry::QUEUED_FRAMES).set(queued as f64);
        metrics::gauge!(telemetry::QUEUE_DEPTH_MAX).set(deepest as f64);
    }

    /// Every live connection (for drain).
    pub fn all(&self) -> Vec<Arc<ConnShared>> {
        self.conns.iter().map(|e| e.value().0.clone()).collect()
    }

    /// Describe live connections, of one user or all.
    pub fn list(&self, user: Option<&str>) -> Vec<ConnInfo> {
        let conns: Vec<Arc<ConnShared>> = match user {
            Some(u) => self
                .users
                .get(u)
                .map(|e| e.conns.lock().clone())
                .unwrap_or_default(),
            None => self.all(),
        };
        let mut rows: Vec<ConnInfo> = conns
            .iter()
            .filter(|c| c.state() != State::Closed)
            .map(|c| {
                let (queue_depth, queued_bytes) = c.queue_depth();
                ConnInfo {
                    conn_id: c.id_str.clone(),
                    user_id: c.user().map(str::to_owned),
                    state: c.state().as_str(),
                    age_ms: c.opened_at.elapsed().as_millis() as u64,
                    queue_depth,
                    queued_bytes,
                    acked_seq: c.acked_seq(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        rows
    }

    /// Remove a finished connection everywhere and account for it. The actor
    /// calls this only with the cleanup token the lifecycle hands out once;
    /// a second call for the same connection is counted as an I2 violation.
    pub fn cleanup(&self, conn: &ConnShared, info: &CloseInfo) {
        let first = match self.conns.get(&conn.id) {
            Some(e) => !e.value().1.swap(true, Ordering::AcqRel),
            None => false,
        };
        if !first {
            self.stats
                .duplicate_cleanups
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::INVARIANT_VIOLATIONS, "kind" => "duplicate_cleanup")
                .increment(1);
            tracing::error!(conn_id = %conn.id_str, "cleanup ran twice for one connection");
            return;
        }
        if let Some(user) = conn.user()
            && let Some(entry) = self.users.get(user).map(|e| e.clone())
        {
            entry.conns.lock().retain(|c| c.id != conn.id);
            self.release(user, entry);
        }
        self.conns.remove(&conn.id);
        self.stats.cleanups.fetch_add(1, Ordering::Relaxed);
        telemetry::connection_closed(info);
    }
}
