//! Event history behind a trait: the seam where Redis or NATS stores plug in.
//!
//! The trait is async and object-safe so a remote store fits; the registry
//! calls it under the user's publish gate, so one user's appends and resume
//! decisions are serialized whichever store is used. [`MemoryStore`] keeps
//! each user's [`Stream`] in memory, bounded per stream by count and age and
//! in total by bytes (oldest evicted first).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use herald_core::protocol::{EventFrame, ServerFrame};
use herald_core::stream::{Appended, EventMeta, ResumeDecision, Stream, StreamLimits};
use parking_lot::Mutex;

use crate::connection::OutFrame;

/// A boxed, sendable future (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Events the caller needs were evicted.
    #[error("history after seq {0} is no longer available")]
    Gone(u64),
    /// The store could not be reached or failed (remote stores).
    #[error("history store unavailable: {0}")]
    Unavailable(String),
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The frame to store and send; its `seq` is assigned by the store.
    pub frame: EventFrame,
    /// Publish idempotency key, if any.
    pub idempotency_key: Option<String>,
}

impl NewEvent {
    /// An event to publish at `ts` (RFC 3339); the store assigns its seq.
    pub fn new(
        event: String,
        thread_id: Option<String>,
        run_id: Option<String>,
        data: serde_json::Value,
        ts: String,
    ) -> Self {
        Self {
            frame: EventFrame {
                seq: 0,
                event,
                thread_id,
                run_id,
                data,
                ts,
            },
            idempotency_key: None,
        }
    }
}

/// The result of an append.
#[derive(Debug, Clone)]
pub struct AppendResult {
    /// The event's seq (the original one for a duplicate).
    pub seq: u64,
    /// The stream epoch.
    pub epoch: String,
    /// The serialized frame to fan out; `None` for a duplicate (nothing appended).
    pub frame: Option<OutFrame>,
}

/// A stream's current position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Epoch.
    pub epoch: String,
    /// Latest seq.
    pub last_seq: u64,
}

/// A run closed by the sweeper because it was silent for `run_ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredRun {
    /// The user.
    pub user: String,
    /// The run.
    pub run_id: String,
    /// Its thread, if any.
    pub thread_id: Option<String>,
}

/// Size of the store, for metrics and docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Streams held.
    pub streams: usize,
    /// Events held.
    pub events: usize,
    /// Serialized event bytes held (payload only).
    pub bytes: usize,
    /// Memory charged against `history_max_bytes` (payload + per-event overhead).
    pub charged_bytes: usize,
}

/// Where published events are kept for resume and run replay.
pub trait HistoryStore: Send + Sync + Debug {
    /// Append an event to `user`'s stream (or return the original seq for a
    /// repeated idempotency key).
    fn append<'a>(
        &'a self,
        user: &'a str,
        event: NewEvent,
    ) -> BoxFuture<'a, Result<AppendResult, StoreError>>;
    /// The stream's epoch and latest seq (creating the stream if needed).
    fn position<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Position, StoreError>>;
    /// Whether a client at (`epoch`, `seq`) can resume without a gap.
    fn check_resume<'a>(
        &'a self,
        user: &'a str,
        epoch: &'a str,
        seq: u64,
    ) -> BoxFuture<'a, Result<ResumeDecision, StoreError>>;
    /// Up to `limit` frames with `after < seq <= until`, in order; `Gone` if
    /// any was evicted.
    fn read<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<OutFrame>, StoreError>>;
    /// Whether `run_id` is an open run in `user`'s stream.
    fn is_open_run<'a>(
        &'a self,
        user: &'a str,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Frames of the user's open runs with `after < seq <= until`, in order.
    fn active_run_events<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        until: u64,
    ) -> BoxFuture<'a, Result<Vec<OutFrame>, StoreError>>;
    /// Enforce age bounds, drop idle streams, and return runs silent for
    /// longer than `run_ttl`.
    fn sweep(&self, now: Instant) -> BoxFuture<'_, Vec<ExpiredRun>>;
    /// Current size.
    fn stats(&self) -> StoreStats;
}

/// The in-memory store (the default). History does not survive a restart; a
/// restart is a new epoch, so resuming clients get `reset`.
#[derive(Debug)]
pub struct MemoryStore {
    streams: DashMap<Arc<str>, Arc<Mutex<Stream<OutFrame>>>>,
    limits: StreamLimits,
    max_total_bytes: usize,
    total_bytes: AtomicUsize,
    total_events: AtomicUsize,
    /// Append order across all streams, for "evict the oldest" under byte
    /// pressure. The user name is shared with the stream map's key.
    order: Mutex<VecDeque<(Arc<str>, u64)>>,
}

/// Memory per stored event beyond its payload (entry, queue slots, shared
/// buffer header, allocator), measured by `tests/history_memory.rs` (≈ 263 B
/// on x86_64) and rounded up.
pub const EVENT_OVERHEAD_BYTES: usize = 288;

/// A random stream epoch (16 hex digits).
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl MemoryStore {
    /// A store with these per-stream limits and total byte bound.
    pub fn new(limits: StreamLimits, max_total_bytes: usize) -> Self {
        Self {
            streams: DashMap::new(),
            limits,
            max_total_bytes,
            total_bytes: AtomicUsize::new(0),
            total_events: AtomicUsize::new(0),
            order: Mutex::new(VecDeque::new()),
        }
    }

    fn stream(&self, user: &str) -> (Arc<str>, Arc<Mutex<Stream<OutFrame>>>) {
        if let Some(s) = self.streams.get(user) {
            return (s.key().clone(), s.value().clone());
        }
        let entry = self
            .streams
            .entry(Arc::from(user))
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(new_epoch(), Instant::now()))));
        (entry.key().clone(), entry.value().clone())
    }

    /// Run `f` on a stream and account for the change in its size.
    fn with_stream<R>(&self, user: &str, f: impl FnOnce(&mut Stream<OutFrame>) -> R) -> R {
        self.with_stream_keyed(user, f).1
    }

    fn with_stream_keyed<R>(
        &self,
        user: &str,
        f: impl FnOnce(&mut Stream<OutFrame>) -> R,
    ) -> (Arc<str>, R) {
        let (key, stream) = self.stream(user);
        let r = self.accounted(&mut stream.lock(), f);
        (key, r)
    }

    /// Run `f` on a locked stream and carry the change in its size over to
    /// the store's totals.
    fn accounted<R>(
        &self,
        s: &mut Stream<OutFrame>,
        f: impl FnOnce(&mut Stream<OutFrame>) -> R,
    ) -> R {
        let (bytes, events) = (s.bytes(), s.len());
        let r = f(s);
        self.total_bytes.fetch_add(s.bytes(), Ordering::Relaxed);
        self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.total_events.fetch_add(s.len(), Ordering::Relaxed);
        self.total_events.fetch_sub(events, Ordering::Relaxed);
        r
    }

    /// Memory charged for the history: payload bytes plus a measured
    /// per-event bookkeeping overhead, so `history_max_bytes` bounds memory.
    fn charged_bytes(&self) -> usize {
        self.total_bytes.load(Ordering::Relaxed)
            + self.total_events.load(Ordering::Relaxed) * EVENT_OVERHEAD_BYTES
    }

    /// Evict the globally oldest events until the byte bound holds. Called
    /// with no stream locked.
    fn enforce_total_bytes(&self) {
        while self.charged_bytes() > self.max_total_bytes {
            let Some((user, seq)) = self.order.lock().pop_front() else {
                return;
            };
            let Some(stream) = self.streams.get(&user).map(|s| s.clone()) else {
                continue;
            };
            self.accounted(&mut stream.lock(), |s| {
                while s.oldest().is_some_and(|(oldest, _)| oldest <= seq) {
                    s.evict_front();
                }
            });
        }
    }

    /// Drop order entries whose events are already gone (bounded memory).
    fn prune_order(&self) {
        let mut order = self.order.lock();
        let held = self.total_events.load(Ordering::Relaxed);
        while order.len() > held {
            let Some((user, seq)) = order.front().cloned() else {
                break;
            };
            let gone = match self.streams.get(&user) {
                None => true,
                Some(s) => s.lock().oldest().is_none_or(|(oldest, _)| oldest > seq),
            };
            if !gone {
                break;
            }
            order.pop_front();
        }
    }
}

impl HistoryStore for MemoryStore {
    fn append<'a>(
        &'a self,
        user: &'a str,
        event: NewEvent,
    ) -> BoxFuture<'a, Result<AppendResult, StoreError>> {
        Box::pin(async move {
            let meta = EventMeta {
                event: event.frame.event.clone(),
                run_id: event.frame.run_id.clone(),
                thread_id: event.frame.thread_id.clone(),
            };
            let mut frame = event.frame;
            let mut built = None;
            let (key, (appended, epoch)) = self.with_stream_keyed(user, |s| {
                let appended = s.append(
                    Instant::now(),
                    &meta,
                    event.idempotency_key.as_deref(),
                    &self.limits,
                    |seq| {
                        frame.seq = seq;
                        let out = OutFrame::live(ServerFrame::Event(&frame).to_json());
                        built = Some(out.clone());
                        out
                    },
                );
                (appended, s.epoch().to_owned())
            });
            if let Appended::New(seq) = appended {
                self.order.lock().push_back((key, seq));
                self.enforce_total_bytes();
                if self.order.lock().len() > 2 * self.total_events.load(Ordering::Relaxed) + 1024 {
                    self.prune_order();
                }
            }
            Ok(AppendResult {
                seq: appended.seq(),
                epoch,
                frame: built,
            })
        })
    }

    fn position<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Position, StoreError>> {
        Box::pin(async move {
            Ok(self.with_stream(user, |s| Position {
                epoch: s.epoch().to_owned(),
                last_seq: s.last_seq(),
            }))
        })
    }

    fn check_resume<'a>(
        &'a self,
        user: &'a str,
        epoch: &'a str,
        seq: u64,
    ) -> BoxFuture<'a, Result<ResumeDecision, StoreError>> {
        Box::pin(async move { Ok(self.with_stream(user, |s| s.check_resume(epoch, seq))) })
    }

    fn read<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<OutFrame>, StoreError>> {
        Box::pin(async move {
            self.with_stream(user, |s| s.read(after, until, limit))
                .map(|frames| frames.iter().map(OutFrame::replayed).collect())
                .map_err(|e| StoreError::Gone(e.after))
        })
    }

    fn active_run_events<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        until: u64,
    ) -> BoxFuture<'a, Result<Vec<OutFrame>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .with_stream(user, |s| s.active_run_events(after, until))
                .iter()
                .map(OutFrame::replayed)
                .collect())
        })
    }

    fn is_open_run<'a>(
        &'a self,
        user: &'a str,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            // Do not create a stream just to look.
            Ok(self
                .streams
                .get(user)
                .is_some_and(|s| s.lock().open_runs().contains_key(run_id)))
        })
    }

    fn sweep(&self, now: Instant) -> BoxFuture<'_, Vec<ExpiredRun>> {
        Box::pin(async move {
            let users: Vec<Arc<str>> = self.streams.iter().map(|e| e.key().clone()).collect();
            let mut expired = Vec::new();
            for user in users {
                let Some(stream) = self.streams.get(&user).map(|s| s.clone()) else {
                    continue;
                };
                {
                    let mut s = stream.lock();
                    self.accounted(&mut s, |s| s.evict_expired(now, &self.limits));
                    expired.extend(s.expired_runs(now, &self.limits).into_iter().map(
                        |(run_id, thread_id)| ExpiredRun {
                            user: user.to_string(),
                            run_id,
                            thread_id,
                        },
                    ));
                }
                drop(stream);
                // Forget streams with nothing in them, idle for the retention age.
                let idle_since = now.checked_sub(self.limits.max_age).unwrap_or(now);
                self.streams.remove_if(&user, |_, s| {
                    Arc::strong_count(s) == 1 && s.lock().is_idle(idle_since)
                });
            }
            self.prune_order();
            expired
        })
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            streams: self.streams.len(),
            events: self.total_events.load(Ordering::Relaxed),
            bytes: self.total_bytes.load(Ordering::Relaxed),
            charged_bytes: self.charged_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(event: &str, run: Option<&str>, key: Option<&str>) -> NewEvent {
        NewEvent {
            frame: EventFrame {
                seq: 0,
                event: event.into(),
                thread_id: None,
                run_id: run.map(Into::into),
                data: json!({"pad": "x".repeat(100)}),
                ts: "2026-01-01T00:00:00Z".into(),
            },
            idempotency_key: key.map(Into::into),
        }
    }

    #[tokio::test]
    async fn total_byte_bound_evicts_the_oldest_first() {
        let store = MemoryStore::new(StreamLimits::default(), 2000 + 10 * EVENT_OVERHEAD_BYTES);
        for i in 0..20 {
            let user = if i % 2 == 0 { "a" } else { "b" };
            store.append(user, ev("note", None, None)).await.unwrap();
        }
        let stats = store.stats();
        assert!(
            stats.charged_bytes <= 2000 + 10 * EVENT_OVERHEAD_BYTES,
            "{stats:?}"
        );
        assert!(stats.events < 20, "{stats:?}");
        // The newest events of both users survive, the oldest went first.
        assert!(store.read("a", 9, 10, 10).await.is_ok());
        assert!(store.read("b", 9, 10, 10).await.is_ok());
        assert_eq!(
            store.read("a", 0, 10, 10).await.err(),
            Some(StoreError::Gone(0))
        );
    }

    #[tokio::test]
    async fn duplicate_key_returns_the_original_seq_and_no_frame() {
        let store = MemoryStore::new(StreamLimits::default(), 1 << 20);
        let first = store
            .append("u", ev("note", None, Some("k1")))
            .await
            .unwrap();
        let again = store
            .append("u", ev("note", None, Some("k1")))
            .await
            .unwrap();
        assert_eq!((first.seq, again.seq), (1, 1));
        assert!(first.frame.is_some() && again.frame.is_none());
        assert_eq!(store.position("u").await.unwrap().last_seq, 1);
    }
}
