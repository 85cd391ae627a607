//! The registry: every live connection by id, and every user's stream and
//! authenticated connections.
//!
//! Lock order is always user entry → connection state machine; cleanup takes
//! the user entry lock without holding a connection lock, so there is no cycle.
//! An event is serialized once and the same bytes are queued to every
//! connection of the user.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use herald_core::protocol::{EventFrame, Resume, ServerFrame};
use herald_core::stream::Stream;
use herald_core::{CloseInfo, CloseReason, Initiator, State};
use parking_lot::Mutex;
use serde::Serialize;

use crate::connection::{ConnShared, OutFrame};
use crate::telemetry::{self, Stats};

#[derive(Debug)]
struct UserEntry {
    stream: Stream,
    conns: Vec<Arc<ConnShared>>,
}

/// Why a connection could not join its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The user is at `max_connections_per_user`.
    #[error("too many connections for this user")]
    UserFull,
    /// The connection started closing before it could be registered.
    #[error("connection is no longer handshaking")]
    NotHandshaking,
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
    /// Frames waiting in the outbound queue.
    pub queue_depth: usize,
    /// Bytes waiting in the outbound queue.
    pub queued_bytes: usize,
    /// Highest seq the client acknowledged.
    pub acked_seq: u64,
}

/// All connections and user streams of one server.
#[derive(Debug)]
pub struct Registry {
    conns: DashMap<u64, (Arc<ConnShared>, Arc<AtomicBool>)>,
    users: DashMap<String, Arc<Mutex<UserEntry>>>,
    stats: Arc<Stats>,
}

/// A random stream epoch (16 hex digits).
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Registry {
    /// An empty registry that counts into `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            conns: DashMap::new(),
            users: DashMap::new(),
            stats,
        }
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

    fn entry(&self, user: &str) -> Arc<Mutex<UserEntry>> {
        if let Some(e) = self.users.get(user) {
            return e.clone();
        }
        self.users
            .entry(user.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(UserEntry {
                    stream: Stream::new(new_epoch()),
                    conns: Vec::new(),
                }))
            })
            .clone()
    }

    /// Move `conn` to `Ready` as `user`: under the user's lock, build the
    /// welcome from the stream position, queue it first, and join the user's
    /// fan-out set. Any event published afterwards is queued after the welcome.
    pub fn register(
        &self,
        user: &str,
        conn: &Arc<ConnShared>,
        max_per_user: usize,
        heartbeat_ms: u64,
        resume: Option<&Resume>,
    ) -> Result<(), RegisterError> {
        let entry = self.entry(user);
        let mut entry = entry.lock();
        if entry.conns.len() >= max_per_user {
            return Err(RegisterError::UserFull);
        }
        // Without stored history a resume is honoured only when nothing was
        // missed; otherwise the client is told plainly (`reset`), never skipped.
        let resumed = resume
            .is_some_and(|r| r.epoch == entry.stream.epoch() && r.seq == entry.stream.last_seq());
        let welcome = ServerFrame::Welcome {
            conn_id: &conn.id_str,
            user_id: user,
            epoch: entry.stream.epoch(),
            seq: entry.stream.last_seq(),
            resumed,
            reset: resume.is_some() && !resumed,
            heartbeat_ms,
        }
        .to_json();
        conn.with_core(|core| {
            core.authenticate(std::time::Instant::now(), OutFrame::from(welcome))
        })
        .map_err(|_| RegisterError::NotHandshaking)?;
        conn.set_user(user);
        entry.conns.push(conn.clone());
        Ok(())
    }

    /// Append an event to `user`'s stream and queue it to every live connection
    /// of the user. The event is serialized once.
    pub fn publish(&self, user: &str, build: impl FnOnce(u64) -> EventFrame) -> Published {
        let entry = self.entry(user);
        let mut entry = entry.lock();
        let seq = entry.stream.next_seq();
        let event = build(seq);
        let frame = OutFrame::from(ServerFrame::Event(&event).to_json());
        let mut delivered = 0;
        for conn in &entry.conns {
            if conn.send(frame.clone()).is_ok() {
                delivered += 1;
            }
        }
        metrics::counter!(telemetry::EVENTS_PUBLISHED).increment(1);
        metrics::counter!(telemetry::EVENTS_QUEUED).increment(delivered as u64);
        Published {
            seq,
            epoch: entry.stream.epoch().to_owned(),
            delivered,
        }
    }

    /// Close every connection of `user` with `reason`; returns how many
    /// closes this call decided.
    pub fn close_user(&self, user: &str, reason: CloseReason, detail: &str) -> usize {
        let Some(entry) = self.users.get(user).map(|e| e.clone()) else {
            return 0;
        };
        let conns = entry.lock().conns.clone();
        conns
            .iter()
            .filter(|c| c.close(CloseInfo::new(reason, Initiator::Server, detail)))
            .count()
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
                .map(|e| e.lock().conns.clone())
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
            entry.lock().conns.retain(|c| c.id != conn.id);
        }
        self.conns.remove(&conn.id);
        self.stats.cleanups.fetch_add(1, Ordering::Relaxed);
        telemetry::connection_closed(info);
    }
}
