//! Per-user event streams: numbering, bounded history, agent runs, resume.
//!
//! A stream numbers events `1, 2, 3, …` within an `epoch`. The epoch is chosen
//! by the caller (the core has no randomness) and changes whenever the
//! stream's history is lost, so a client can tell "I missed nothing" from
//! "the server forgot".
//!
//! History layout:
//! - `window`: the most recent events, **contiguous** in seq up to `last_seq`.
//!   Eviction (count, age, global byte pressure) takes from its front.
//! - `pinned`: events older than the window that belong to a run still open;
//!   they are kept so a page opened mid-run can replay the whole run, and
//!   dropped when the run closes. Each open run indexes its events' seqs, so
//!   closing a run costs its own events, not the stream's.
//! - Runs are bounded: a run holding more than `max_run_bytes`, or open runs
//!   together holding more than `max_runs_bytes` of a stream, are reported
//!   by [`Stream::oversized_runs`]; the broker closes them with `agent_error
//!   {reason: "run_too_large"}`, which unpins their events.
//!
//! - Text deltas ([`crate::text`]): a delta of the same run and part as the
//!   window's last entry joins it, so consecutive deltas are one entry
//!   covering a seq range. Every bound counts entries, so a long answer
//!   streamed as thousands of deltas takes one entry per part. An entry's
//!   seq is the first it covers; the window stays contiguous over ranges.
//!   A numbered delta ([`crate::text::Delta::index`]) below its part's next
//!   index is a duplicate, above it is refused ([`Appended::OutOfOrder`]).
//!
//! A resume from `seq = s` is honoured only if every event after `s` is still
//! in the window; otherwise the answer is [`ResumeDecision::Reset`] — fail
//! closed, never a silent gap. Reads cut entries at the range asked for: a
//! resume from inside a part reads one frame with the text after `s`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lifecycle::Payload;
use crate::text::{Compacted, Delta, PER_DELTA_BYTES};

/// A payload the stream builds when it reads a range of compacted deltas.
pub trait FromCovered: Sized {
    /// The frame `json` covering deltas `from..=to`.
    fn from_covered(from: u64, to: u64, json: String) -> Self;
}

impl FromCovered for String {
    fn from_covered(_from: u64, _to: u64, json: String) -> Self {
        json
    }
}

/// Event names that open and close an agent run.
pub mod runs {
    /// Opens a run.
    pub const STARTED: &str = "agent_started";
    /// Closes a run (success).
    pub const COMPLETED: &str = "agent_completed";
    /// Closes a run (failure; also synthesized on run timeout).
    pub const ERROR: &str = "agent_error";
    /// Closes a run (cancelled).
    pub const CANCELLED: &str = "agent_cancelled";

    /// Whether `event` closes a run.
    pub fn closes(event: &str) -> bool {
        matches!(event, COMPLETED | ERROR | CANCELLED)
    }
}

/// A user's turn in the stream: the `user_message` event Herald publishes
/// for every accepted message, and how a run names the message it answers.
pub mod turns {
    /// The event name of a user's accepted message.
    pub const USER_MESSAGE: &str = "user_message";
    /// The field of a run's opening event's `data` naming the message it
    /// answers (the `user_message`'s `id`).
    pub const ANSWERS_FIELD: &str = "message_id";

    /// The idempotency key a user's message is stored under: once per id,
    /// and found again when a run names it.
    pub fn message_key(id: &str) -> String {
        format!("herald:msg:{id}")
    }
}

/// Retention limits of one stream.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Most events kept in the window.
    pub max_events: usize,
    /// Oldest event kept in the window.
    pub max_age: Duration,
    /// A run with no event for this long is timed out.
    pub run_ttl: Duration,
    /// How long a publish `idempotency_key` is remembered.
    pub idempotency_window: Duration,
    /// Most idempotency keys remembered per stream.
    pub max_idempotency_keys: usize,
    /// Most payload bytes one open run may hold (window and pinned).
    pub max_run_bytes: usize,
    /// Most payload bytes the open runs of one stream may hold together.
    pub max_runs_bytes: usize,
    /// Most runs open at once in one stream (a replay reads them all).
    pub max_open_runs: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_events: 1000,
            max_age: Duration::from_secs(3600),
            run_ttl: Duration::from_secs(600),
            idempotency_window: Duration::from_secs(600),
            max_idempotency_keys: 1000,
            max_run_bytes: 4 << 20,
            max_runs_bytes: 16 << 20,
            max_open_runs: 100,
        }
    }
}

/// What a new event is, as far as retention cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// Event name.
    pub event: String,
    /// The agent run it belongs to, if any.
    pub run_id: Option<String>,
    /// The thread it belongs to, if any.
    pub thread_id: Option<String>,
    /// Set when the event is a text delta (`agent_text_delta`); shared with
    /// the event it describes, so describing it copies nothing.
    pub delta: Option<Arc<Delta>>,
    /// The `user_message` id its run answers (`data.message_id`), read when
    /// the event opens a run: that message is then kept with the run, so a
    /// replay of the run shows the question that started it.
    pub answers: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry<P> {
    /// The (first) seq it holds.
    seq: u64,
    at: Instant,
    /// Set while the event's run is open (pins the event); shared with the run map.
    run_id: Option<Arc<str>>,
    body: Body<P>,
}

#[derive(Debug, Clone)]
enum Body<P> {
    /// One event.
    Event(P),
    /// Consecutive deltas of one part.
    Text(Box<Compacted>),
}

impl<P: Payload + Clone + FromCovered> Entry<P> {
    /// The last seq it holds.
    fn last(&self) -> u64 {
        match &self.body {
            Body::Event(_) => self.seq,
            Body::Text(c) => c.last(),
        }
    }

    /// Bytes charged for it.
    fn bytes(&self) -> usize {
        match &self.body {
            Body::Event(p) => p.wire_len(),
            Body::Text(c) => c.bytes(),
        }
    }

    /// Its frame for the seqs `from..=to` (an event inside the range, or the
    /// deltas of the range), `None` when it holds none of them.
    fn frame(&self, from: u64, to: u64) -> Option<P> {
        match &self.body {
            Body::Event(p) => (from..=to).contains(&self.seq).then(|| p.clone()),
            Body::Text(c) => c
                .frame(from, to)
                .map(|(from, to, json)| P::from_covered(from, to, json)),
        }
    }
}

/// Where one part of a run stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Part {
    /// Deltas appended (the next index expected).
    next: u64,
    /// Seq of the latest.
    last_seq: u64,
}

/// An open agent run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRun {
    /// Seq of its `agent_started` (or first event).
    pub first_seq: u64,
    /// When its last event was appended.
    pub last_at: Instant,
    /// Its thread, if any.
    pub thread_id: Option<String>,
    /// Seqs of its events still held (window or pinned), ascending.
    seqs: VecDeque<u64>,
    /// Payload bytes of those events.
    bytes: usize,
    /// Its text parts.
    parts: HashMap<Box<str>, Part>,
}

impl OpenRun {
    /// Payload bytes of the run's events still held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether a resume point can be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeDecision {
    /// Every event after `after` up to the current seq is in history.
    Resume {
        /// The client's last seen seq.
        after: u64,
    },
    /// Unknown epoch, a seq ahead of the stream, or events after it were evicted.
    Reset,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// A new event with this seq.
    New(u64),
    /// A delta with this seq, joined to the entry of its part's previous delta.
    Joined(u64),
    /// The idempotency key was seen before, or a numbered delta was already
    /// appended: the original seq (for a delta: its part's latest), nothing
    /// appended.
    Duplicate(u64),
    /// A numbered delta skips ahead of its part: nothing appended.
    OutOfOrder {
        /// The index the part expects next.
        expected: u64,
    },
}

impl Appended {
    /// The event's seq, new or original (0 when refused).
    pub fn seq(self) -> u64 {
        match self {
            Appended::New(s) | Appended::Joined(s) | Appended::Duplicate(s) => s,
            Appended::OutOfOrder { .. } => 0,
        }
    }

    /// True when something was appended.
    pub fn is_new(self) -> bool {
        matches!(self, Appended::New(_) | Appended::Joined(_))
    }
}

/// Events after the requested point were evicted while being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("history after seq {after} is no longer available")]
pub struct HistoryGone {
    /// The requested point.
    pub after: u64,
}

/// One user's stream.
#[derive(Debug)]
pub struct Stream<P> {
    epoch: String,
    last_seq: u64,
    window: VecDeque<Entry<P>>,
    pinned: BTreeMap<u64, Entry<P>>,
    runs: HashMap<Arc<str>, OpenRun>,
    /// Payload bytes held by open runs, together.
    run_bytes: usize,
    idempotency: HashMap<String, (u64, Instant)>,
    idempotency_order: VecDeque<(String, Instant)>,
    /// Bytes of the remembered idempotency keys (each held twice).
    key_bytes: usize,
    bytes: usize,
    last_touch: Instant,
}

impl<P: Payload + Clone + FromCovered> Stream<P> {
    /// An empty stream in `epoch`, created at `now`.
    pub fn new(epoch: impl Into<String>, now: Instant) -> Self {
        Self {
            epoch: epoch.into(),
            last_seq: 0,
            window: VecDeque::new(),
            pinned: BTreeMap::new(),
            runs: HashMap::new(),
            run_bytes: 0,
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            key_bytes: 0,
            bytes: 0,
            last_touch: now,
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The seq of the latest event (0 when none was published).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Payload bytes held (window and pinned).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Events held (window and pinned).
    pub fn len(&self) -> usize {
        self.window.len() + self.pinned.len()
    }

    /// True when no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The currently open runs.
    pub fn open_runs(&self) -> &HashMap<Arc<str>, OpenRun> {
        &self.runs
    }

    /// True when the stream holds nothing worth keeping and was idle since
    /// `idle_since`: no events, no open runs, no idempotency keys.
    pub fn is_idle(&self, idle_since: Instant) -> bool {
        self.is_empty()
            && self.runs.is_empty()
            && self.idempotency.is_empty()
            && self.last_touch <= idle_since
    }

    /// The seq of an earlier publish with this idempotency key, if still remembered.
    pub fn idempotent_seq(&self, key: &str) -> Option<u64> {
        self.idempotency.get(key).map(|(seq, _)| *seq)
    }

    /// The index the next numbered delta of `part` in `run` must carry.
    pub fn next_delta(&self, run: &str, part: &str) -> u64 {
        self.part(run, part).next
    }

    /// Whether appending `events` (each with its idempotency key) in order
    /// would refuse a numbered delta: the first such event's position, its
    /// index and the index its part would expect. A broker checks a batch
    /// with it first, so a batch is appended whole or not at all.
    pub fn first_out_of_order<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a EventMeta, Option<&'a str>)>,
    ) -> Option<(usize, u64, u64)> {
        // What the batch changes before each event: parts' next index, runs
        // it closes, keys it remembers.
        let mut next: HashMap<(&str, &str), u64> = HashMap::new();
        let mut closed: Vec<&str> = Vec::new();
        let mut keys: Vec<&str> = Vec::new();
        for (i, (meta, key)) in events.into_iter().enumerate() {
            if key.is_some_and(|k| self.idempotency.contains_key(k) || keys.contains(&k)) {
                continue;
            }
            let run = meta.run_id.as_deref();
            match (run, &meta.delta) {
                (Some(run), _) if runs::closes(&meta.event) => {
                    closed.push(run);
                    next.retain(|(r, _), _| *r != run);
                }
                (Some(run), Some(d)) => {
                    let at = *next.entry((run, d.part.as_str())).or_insert_with(|| {
                        if closed.contains(&run) {
                            0
                        } else {
                            self.next_delta(run, &d.part)
                        }
                    });
                    match d.index {
                        // A duplicate: not appended, its key not remembered.
                        Some(index) if index < at => continue,
                        Some(index) if index > at => return Some((i, index, at)),
                        _ => {}
                    }
                    next.insert((run, d.part.as_str()), at + 1);
                }
                _ => {}
            }
            keys.extend(key);
        }
        None
    }

    fn part(&self, run: &str, part: &str) -> Part {
        self.runs
            .get(run)
            .and_then(|r| r.parts.get(part))
            .copied()
            .unwrap_or_default()
    }

    /// Append an event: assign the next seq, build its payload with it, track
    /// runs and the idempotency key, then enforce the count bound. A delta
    /// of the same run and part as the window's last entry joins that entry.
    pub fn append(
        &mut self,
        now: Instant,
        meta: &EventMeta,
        idempotency_key: Option<&str>,
        limits: &StreamLimits,
        build: impl FnOnce(u64) -> P,
    ) -> Appended {
        if let Some(seq) = idempotency_key.and_then(|k| self.idempotent_seq(k)) {
            return Appended::Duplicate(seq);
        }
        if let (Some(d), Some(run)) = (&meta.delta, meta.run_id.as_deref())
            && let Some(index) = d.index
        {
            let part = self.part(run, &d.part);
            if index < part.next {
                return Appended::Duplicate(part.last_seq);
            }
            if index > part.next {
                return Appended::OutOfOrder {
                    expected: part.next,
                };
            }
        }
        self.last_touch = now;
        self.last_seq += 1;
        let seq = self.last_seq;
        let payload = build(seq);
        let joins = meta.delta.as_ref().is_some_and(|d| {
            self.window.back().is_some_and(|e| {
                e.run_id.as_deref() == meta.run_id.as_deref()
                    && matches!(&e.body, Body::Text(c) if c.accepts(&d.part, &d.text))
            })
        });
        let (len, body) = match &meta.delta {
            Some(d) if joins => {
                if let Some(Entry {
                    body: Body::Text(c),
                    ..
                }) = self.window.back_mut()
                {
                    c.push(&d.text);
                }
                (d.text.len() + PER_DELTA_BYTES, None)
            }
            Some(d) => {
                let c = Box::new(Compacted::new(seq, Delta::clone(d)));
                (c.bytes(), Some(Body::Text(c)))
            }
            None => (payload.wire_len(), Some(Body::Event(payload))),
        };
        self.bytes += len;
        let mut run_id = None;
        if let Some(run) = meta.run_id.as_deref() {
            if runs::closes(&meta.event) {
                // A closing event is not pinned: its run is closed now.
                self.close_run(run);
            } else {
                let key = match self.runs.get_key_value(run) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(run),
                };
                let opens = !self.runs.contains_key(run);
                let open = self.runs.entry(key.clone()).or_insert_with(|| OpenRun {
                    first_seq: seq,
                    last_at: now,
                    thread_id: meta.thread_id.clone(),
                    seqs: VecDeque::new(),
                    bytes: 0,
                    parts: HashMap::new(),
                });
                open.last_at = now;
                if !joins {
                    open.seqs.push_back(seq);
                }
                open.bytes += len;
                self.run_bytes += len;
                if let Some(d) = &meta.delta {
                    // Its key is copied only when the part is new.
                    let part = match open.parts.get_mut(d.part.as_str()) {
                        Some(part) => part,
                        None => open.parts.entry(d.part.as_str().into()).or_default(),
                    };
                    part.next += 1;
                    part.last_seq = seq;
                }
                if opens && let Some(message) = &meta.answers {
                    self.pin_question(&key, message);
                }
                run_id = Some(key);
            }
        }
        if let Some(body) = body {
            self.window.push_back(Entry {
                seq,
                at: now,
                run_id,
                body,
            });
        }
        if let Some(key) = idempotency_key {
            self.remember_key(key, seq, now, limits);
        }
        while self.window.len() > limits.max_events {
            self.evict_front();
        }
        if joins {
            Appended::Joined(seq)
        } else {
            Appended::New(seq)
        }
    }

    /// Keep the `user_message` `message` with `run`, which answers it: if
    /// it is still in the window and kept by no other run, it is pinned
    /// with the run's events (replayed with them, dropped when it closes).
    fn pin_question(&mut self, run: &Arc<str>, message: &str) {
        let Some(&(seq, _)) = self.idempotency.get(&turns::message_key(message)) else {
            return;
        };
        let Ok(i) = self.window.binary_search_by_key(&seq, |e| e.seq) else {
            return;
        };
        let entry = &mut self.window[i];
        if entry.run_id.is_some() || !matches!(entry.body, Body::Event(_)) {
            return;
        }
        let Some(open) = self.runs.get_mut(run) else {
            return;
        };
        entry.run_id = Some(run.clone());
        let len = entry.bytes();
        open.seqs.push_front(seq);
        open.bytes += len;
        self.run_bytes += len;
    }

    fn remember_key(&mut self, key: &str, seq: u64, now: Instant, limits: &StreamLimits) {
        if self
            .idempotency
            .insert(key.to_owned(), (seq, now))
            .is_none()
        {
            self.key_bytes += key.len();
        }
        self.key_bytes += key.len();
        self.idempotency_order.push_back((key.to_owned(), now));
        while self.idempotency_order.len() > limits.max_idempotency_keys {
            self.forget_oldest_key();
        }
    }

    fn forget_oldest_key(&mut self) {
        if let Some((key, at)) = self.idempotency_order.pop_front() {
            self.key_bytes -= key.len();
            if self.idempotency.get(&key).is_some_and(|(_, t)| *t == at) {
                self.idempotency.remove(&key);
                self.key_bytes -= key.len();
            }
        }
    }

    /// Idempotency keys remembered, and their bytes (map and order together).
    pub fn keys(&self) -> (usize, usize) {
        (self.idempotency_order.len(), self.key_bytes)
    }

    /// Forget every idempotency key (under memory pressure, for a stream
    /// about to be dropped).
    pub fn forget_keys(&mut self) {
        while !self.idempotency_order.is_empty() {
            self.forget_oldest_key();
        }
    }

    /// Close `run`: its window events are no longer pinned, its pinned
    /// events are dropped. Costs the run's own events (indexed by seq).
    fn close_run(&mut self, run: &str) {
        let Some(open) = self.runs.remove(run) else {
            return;
        };
        self.run_bytes -= open.bytes;
        let front = self.window.front().map_or(u64::MAX, |e| e.seq);
        for seq in open.seqs {
            if seq < front {
                if let Some(e) = self.pinned.remove(&seq) {
                    self.bytes -= e.bytes();
                }
            } else if let Ok(i) = self.window.binary_search_by_key(&seq, |e| e.seq) {
                self.window[i].run_id = None;
            }
        }
    }

    /// Open runs over their bounds, to be closed with `run_too_large`: each
    /// run holding more than `max_run_bytes`, then the largest runs until the
    /// rest hold at most `max_runs_bytes` together. Sorted by run id.
    pub fn oversized_runs(&self, limits: &StreamLimits) -> Vec<(String, Option<String>)> {
        let mut by_size: Vec<(&Arc<str>, &OpenRun)> = self.runs.iter().collect();
        by_size.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        let mut left = self.run_bytes;
        let mut out = Vec::new();
        for (id, run) in by_size {
            if run.bytes > limits.max_run_bytes || left > limits.max_runs_bytes {
                left -= run.bytes;
                out.push((id.to_string(), run.thread_id.clone()));
            }
        }
        out.sort();
        out
    }

    /// Open runs beyond `max_open_runs`, to be closed with `too_many_runs`:
    /// the least recently active first (ties: the smallest id).
    pub fn excess_runs(&self, limits: &StreamLimits) -> Vec<(String, Option<String>)> {
        let Some(over) = self.runs.len().checked_sub(limits.max_open_runs) else {
            return Vec::new();
        };
        let mut by_age: Vec<(&Arc<str>, &OpenRun)> = self.runs.iter().collect();
        by_age.sort_by(|a, b| a.1.last_at.cmp(&b.1.last_at).then(a.0.cmp(b.0)));
        by_age
            .into_iter()
            .take(over)
            .map(|(id, run)| (id.to_string(), run.thread_id.clone()))
            .collect()
    }

    /// The open run holding the most bytes (ties: the smallest id), if any.
    pub fn largest_run(&self) -> Option<(String, Option<String>)> {
        self.runs
            .iter()
            .max_by(|a, b| a.1.bytes.cmp(&b.1.bytes).then(b.0.cmp(a.0)))
            .map(|(id, r)| (id.to_string(), r.thread_id.clone()))
    }

    /// Payload bytes held by open runs (window and pinned), together.
    pub fn run_bytes(&self) -> usize {
        self.run_bytes
    }

    /// Evict the oldest window event; events of open runs move to `pinned`.
    /// Returns the payload bytes freed.
    pub fn evict_front(&mut self) -> usize {
        let Some(e) = self.window.pop_front() else {
            return 0;
        };
        if e.run_id.is_some() {
            self.pinned.insert(e.seq, e);
            0
        } else {
            let len = e.bytes();
            self.bytes -= len;
            len
        }
    }

    /// Seq of the oldest event in the window, if any (for global eviction order).
    pub fn oldest(&self) -> Option<(u64, Instant)> {
        self.window.front().map(|e| (e.seq, e.at))
    }

    /// Enforce the age bound, forget expired idempotency keys.
    pub fn evict_expired(&mut self, now: Instant, limits: &StreamLimits) -> usize {
        let mut freed = 0;
        while self
            .window
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > limits.max_age)
        {
            freed += self.evict_front();
        }
        while self
            .idempotency_order
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > limits.idempotency_window)
        {
            self.forget_oldest_key();
        }
        freed
    }

    /// Runs with no event for longer than `run_ttl` (to be closed with a
    /// synthesized `agent_error`).
    pub fn expired_runs(
        &self,
        now: Instant,
        limits: &StreamLimits,
    ) -> Vec<(String, Option<String>)> {
        let mut out: Vec<_> = self
            .runs
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_at) > limits.run_ttl)
            .map(|(id, r)| (id.to_string(), r.thread_id.clone()))
            .collect();
        out.sort();
        out
    }

    /// Decide whether a client at (`epoch`, `seq`) can resume.
    pub fn check_resume(&self, epoch: &str, seq: u64) -> ResumeDecision {
        if epoch != self.epoch || seq > self.last_seq {
            return ResumeDecision::Reset;
        }
        if seq == self.last_seq || self.window.front().is_some_and(|e| e.seq <= seq + 1) {
            ResumeDecision::Resume { after: seq }
        } else {
            ResumeDecision::Reset
        }
    }

    /// Up to `limit` payloads covering `after < seq <= until`, in order: an
    /// entry of deltas is cut to the range (one payload for its part of it).
    /// Fails if any of them was evicted (the caller must not skip silently).
    pub fn read(&self, after: u64, until: u64, limit: usize) -> Result<Vec<P>, HistoryGone> {
        if after >= until {
            return Ok(Vec::new());
        }
        match self.window.front() {
            Some(first) if first.seq <= after + 1 => {}
            _ => return Err(HistoryGone { after }),
        }
        let start = self.window.partition_point(|e| e.last() <= after);
        Ok(self
            .window
            .range(start..)
            .take_while(|e| e.seq <= until)
            .take(limit)
            .filter_map(|e| e.frame(after + 1, until))
            .collect())
    }

    /// Payloads of the open runs' events covering `after < seq <= until`, in
    /// order, cut to the range (for `replay_active_runs`).
    pub fn active_run_events(&self, after: u64, until: u64) -> Vec<P> {
        self.pinned
            .values()
            .chain(self.window.iter())
            .filter(|e| e.run_id.is_some())
            .filter_map(|e| e.frame(after + 1, until))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(event: &str, run: Option<&str>) -> EventMeta {
        EventMeta {
            event: event.into(),
            run_id: run.map(Into::into),
            thread_id: None,
            delta: None,
            answers: None,
        }
    }

    /// Issue 14, finding 12: closing runs costs the run's own events, not a
    /// scan of the stream; closing 20,000 runs of a stream holding them all
    /// leaves nothing pinned and the bytes balanced.
    #[test]
    fn closing_many_runs_is_linear_and_exact() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = StreamLimits {
            max_runs_bytes: usize::MAX,
            ..limits(100)
        };
        const N: usize = 20_000;
        for i in 0..N {
            push(
                &mut s,
                now,
                meta("agent_started", Some(&format!("r{i}"))),
                &l,
            );
        }
        assert_eq!(s.open_runs().len(), N);
        let started = std::time::Instant::now();
        for i in 0..N {
            push(
                &mut s,
                now,
                meta("agent_completed", Some(&format!("r{i}"))),
                &l,
            );
        }
        // Generous: the old scan took ~1 s here, the index takes ~10 ms.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(s.open_runs().is_empty());
        assert_eq!(s.len(), 100, "only the window is left");
        assert_eq!(s.run_bytes(), 0);
        let window: usize = s
            .read(s.last_seq() - 100, s.last_seq(), 1000)
            .unwrap()
            .iter()
            .map(|p| p.len())
            .sum();
        assert_eq!(s.bytes(), window);
    }

    /// Issue 37, finding 11: at most `max_open_runs` runs are open in a
    /// stream; beyond it the least recently active are reported for closing.
    #[test]
    fn runs_beyond_the_open_bound_are_reported_oldest_first() {
        let t0 = Instant::now();
        let mut s = Stream::new("ep", t0);
        let l = StreamLimits {
            max_open_runs: 2,
            ..limits(100)
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        think(&mut s, at(0), &l, "a", None, 10);
        think(&mut s, at(1), &l, "b", None, 10);
        assert!(s.excess_runs(&l).is_empty(), "two fit");
        think(&mut s, at(2), &l, "a", None, 10);
        think(&mut s, at(3), &l, "c", None, 10);
        // b is the least recently active: a spoke again at 2 ms.
        assert_eq!(s.excess_runs(&l), vec![("b".to_owned(), None)]);
        think(&mut s, at(4), &l, "d", None, 10);
        assert_eq!(
            s.excess_runs(&l),
            vec![("b".to_owned(), None), ("a".to_owned(), None)]
        );
        push(&mut s, at(5), meta("agent_error", Some("b")), &l);
        push(&mut s, at(5), meta("agent_error", Some("a")), &l);
        assert!(s.excess_runs(&l).is_empty());
    }

    /// Issue 14, finding 1: runs are bounded per run and per stream.
    #[test]
    fn oversized_runs_are_reported_for_closing() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = StreamLimits {
            max_run_bytes: 100,
            max_runs_bytes: 250,
            ..limits(3)
        };
        let big = |s: &mut Stream<String>, run: &str, n: usize| {
            for _ in 0..n {
                think(s, now, &l, run, None, 10);
            }
        };
        big(&mut s, "a", 9);
        assert!(s.oversized_runs(&l).is_empty(), "90 bytes fit");
        big(&mut s, "a", 2);
        assert_eq!(s.oversized_runs(&l), vec![("a".to_owned(), None)]);
        push(&mut s, now, meta("agent_error", Some("a")), &l);
        assert!(s.oversized_runs(&l).is_empty());
        assert_eq!(s.run_bytes(), 0);
        // 90 + 90 + 80 = 260 > 250 together: the largest (first by id) goes.
        big(&mut s, "b", 9);
        big(&mut s, "c", 9);
        big(&mut s, "d", 8);
        assert_eq!(s.run_bytes(), 260);
        assert_eq!(s.oversized_runs(&l), vec![("b".to_owned(), None)]);
        push(&mut s, now, meta("agent_cancelled", Some("b")), &l);
        assert!(s.oversized_runs(&l).is_empty());
    }

    /// Append an `agent_thinking` of `bytes` to `run` (in `thread`).
    fn think(
        s: &mut Stream<String>,
        now: Instant,
        l: &StreamLimits,
        run: &str,
        thread: Option<&str>,
        bytes: usize,
    ) {
        let m = EventMeta {
            event: "agent_thinking".into(),
            run_id: Some(run.into()),
            thread_id: thread.map(Into::into),
            delta: None,
            answers: None,
        };
        s.append(now, &m, None, l, |_| "x".repeat(bytes));
    }

    fn limits(max: usize) -> StreamLimits {
        StreamLimits {
            max_events: max,
            ..StreamLimits::default()
        }
    }

    fn push(s: &mut Stream<String>, now: Instant, m: EventMeta, l: &StreamLimits) -> u64 {
        s.append(now, &m, None, l, |seq| format!("e{seq}")).seq()
    }

    fn delta(run: &str, part: &str, index: Option<u64>) -> EventMeta {
        EventMeta {
            delta: Some(Arc::new(Delta::new(
                part,
                "w",
                index,
                crate::text::Template::new(run, None, part, "ts"),
            ))),
            ..meta(crate::text::TEXT_DELTA, Some(run))
        }
    }

    /// Issue 18: a batch is checked whole before anything is appended; the
    /// check follows the batch's own deltas, closes and keys.
    #[test]
    fn a_batch_is_checked_for_out_of_order_deltas_as_a_whole() {
        let now = Instant::now();
        let l = limits(100);
        let mut s: Stream<String> = Stream::new("ep", now);
        for i in 0..3 {
            let got = s.append(now, &delta("r", "p", Some(i)), None, &l, |q| {
                format!("e{q}")
            });
            assert!(got.is_new());
        }
        assert_eq!(s.next_delta("r", "p"), 3);
        assert_eq!(s.len(), 1, "three deltas, one entry");
        let (d2, d3, d4, d5) = (
            delta("r", "p", Some(2)),
            delta("r", "p", Some(3)),
            delta("r", "p", Some(4)),
            delta("r", "p", Some(5)),
        );
        // A duplicate, then in order, then a skip: the skip is named.
        let batch = [(&d2, None), (&d3, None), (&d5, None)];
        assert_eq!(s.first_out_of_order(batch), Some((2, 5, 4)));
        assert_eq!(s.first_out_of_order([(&d3, None), (&d4, None)]), None);
        // After the run closes in the batch, its parts start again at 0.
        let close = meta("agent_completed", Some("r"));
        let d0 = delta("r", "p", Some(0));
        assert_eq!(s.first_out_of_order([(&close, None), (&d0, None)]), None);
        assert_eq!(
            s.first_out_of_order([(&close, None), (&d3, None)]),
            Some((1, 3, 0))
        );
        // An unnumbered delta counts; a key seen earlier in the batch is a duplicate.
        let free = delta("r", "p", None);
        assert_eq!(s.first_out_of_order([(&free, None), (&d4, None)]), None);
        assert_eq!(
            s.first_out_of_order([(&d3, Some("k")), (&d3, Some("k")), (&d4, None)]),
            None
        );
        assert_eq!(
            s.first_out_of_order([(&free, Some("k")), (&free, Some("k")), (&d5, None)]),
            Some((2, 5, 4))
        );
        // A duplicate by index does not remember its key.
        assert_eq!(
            s.first_out_of_order([(&d2, Some("k")), (&d3, Some("k")), (&d5, None)]),
            Some((2, 5, 4))
        );
        // Other parts and runs have their own counts.
        assert_eq!(
            s.first_out_of_order([(&delta("r", "q", Some(1)), None)]),
            Some((0, 1, 0))
        );
        assert_eq!(
            s.first_out_of_order([(&delta("x", "p", Some(0)), None)]),
            None
        );
    }

    #[test]
    fn seq_starts_at_one_and_increments() {
        let now = Instant::now();
        let mut s = Stream::new("e1", now);
        let l = limits(10);
        assert_eq!(s.last_seq(), 0);
        assert_eq!(push(&mut s, now, meta("x", None), &l), 1);
        assert_eq!(push(&mut s, now, meta("x", None), &l), 2);
        assert_eq!(s.read(0, 2, 10).unwrap(), vec!["e1", "e2"]);
    }

    #[test]
    fn resume_inside_window_replays_exactly_the_missed_events() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = limits(5);
        for _ in 0..8 {
            push(&mut s, now, meta("x", None), &l);
        }
        // Window holds 4..=8.
        assert_eq!(s.check_resume("ep", 3), ResumeDecision::Resume { after: 3 });
        assert_eq!(
            s.read(3, 8, 100).unwrap(),
            vec!["e4", "e5", "e6", "e7", "e8"]
        );
        assert_eq!(s.check_resume("ep", 2), ResumeDecision::Reset);
        assert_eq!(s.read(2, 8, 100), Err(HistoryGone { after: 2 }));
        assert_eq!(s.check_resume("other", 8), ResumeDecision::Reset);
        assert_eq!(s.check_resume("ep", 9), ResumeDecision::Reset);
        assert_eq!(s.check_resume("ep", 8), ResumeDecision::Resume { after: 8 });
    }

    #[test]
    fn open_run_events_survive_the_count_bound_until_the_run_closes() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = limits(3);
        push(&mut s, now, meta("agent_started", Some("r1")), &l);
        for _ in 0..5 {
            push(&mut s, now, meta("note", None), &l);
        }
        push(&mut s, now, meta("agent_thinking", Some("r1")), &l);
        assert_eq!(s.active_run_events(0, 7), vec!["e1", "e7"]);
        assert!(s.open_runs().contains_key("r1"));
        push(&mut s, now, meta("agent_completed", Some("r1")), &l);
        assert!(s.open_runs().is_empty());
        assert!(s.active_run_events(0, 8).is_empty());
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn age_bound_and_run_ttl() {
        let t0 = Instant::now();
        let mut s = Stream::new("ep", t0);
        let l = StreamLimits {
            max_age: Duration::from_secs(10),
            run_ttl: Duration::from_secs(30),
            ..limits(100)
        };
        push(&mut s, t0, meta("note", None), &l);
        push(&mut s, t0, meta("agent_started", Some("r1")), &l);
        s.evict_expired(t0 + Duration::from_secs(11), &l);
        assert_eq!(s.len(), 1, "the run's event stays pinned");
        assert_eq!(s.check_resume("ep", 0), ResumeDecision::Reset);
        assert!(s.expired_runs(t0 + Duration::from_secs(29), &l).is_empty());
        assert_eq!(
            s.expired_runs(t0 + Duration::from_secs(31), &l),
            vec![("r1".to_owned(), None)]
        );
    }

    #[test]
    fn idempotency_key_appends_once() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = limits(10);
        let m = meta("x", None);
        assert_eq!(
            s.append(now, &m, Some("k"), &l, |q| format!("e{q}")),
            Appended::New(1)
        );
        assert_eq!(
            s.append(now, &m, Some("k"), &l, |q| format!("e{q}")),
            Appended::Duplicate(1)
        );
        assert_eq!(s.last_seq(), 1);
        s.evict_expired(now + Duration::from_secs(601), &l);
        assert_eq!(
            s.append(now, &m, Some("k"), &l, |q| format!("e{q}")),
            Appended::New(2)
        );
    }

    /// Mutation testing (issue 17): key accounting, emptiness and idleness.
    #[test]
    fn keys_are_counted_in_bytes_and_forgotten() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = StreamLimits {
            max_idempotency_keys: 2,
            ..limits(10)
        };
        let m = meta("x", None);
        s.append(now, &m, Some("k1"), &l, |q| format!("e{q}"));
        s.append(now, &m, Some("key2"), &l, |q| format!("e{q}"));
        assert_eq!(s.keys(), (2, 2 * (2 + 4)));
        s.append(now, &m, Some("k3"), &l, |q| format!("e{q}"));
        assert_eq!(s.keys(), (2, 2 * (4 + 2)), "k1 forgotten");
        assert_eq!(s.idempotent_seq("k1"), None);
        s.forget_keys();
        assert_eq!(s.keys(), (0, 0));
        assert_eq!(s.idempotent_seq("k3"), None);
    }

    #[test]
    fn emptiness_and_idleness() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut s: Stream<String> = Stream::new("ep", t0);
        assert_eq!(s.epoch(), "ep");
        assert!(s.is_empty() && s.is_idle(t0));
        let l = limits(10);
        push(&mut s, t1, meta("x", None), &l);
        assert!(!s.is_empty() && !s.is_idle(t1));
        s.evict_front();
        assert!(s.is_empty());
        assert!(!s.is_idle(t0), "touched after t0");
        assert!(s.is_idle(t1));
        s.append(t1, &meta("x", None), Some("k"), &l, |q| format!("e{q}"));
        s.evict_front();
        assert!(!s.is_idle(t1), "a remembered key keeps it");
        s.forget_keys();
        push(&mut s, t1, meta("agent_started", Some("r")), &l);
        s.evict_front();
        assert!(s.open_runs().contains_key("r"));
        assert_eq!(s.len(), 1, "the run's event is pinned, not dropped");
        assert!(!s.is_idle(t1), "an open run keeps it");
    }

    /// Run bounds are inclusive; several runs close when one is not enough.
    #[test]
    fn run_bounds_are_exact() {
        let now = Instant::now();
        let mut s = Stream::new("ep", now);
        let l = StreamLimits {
            max_run_bytes: 100,
            max_runs_bytes: 150,
            ..limits(100)
        };
        let grow = |s: &mut Stream<String>, run: &str, bytes: usize| {
            think(s, now, &l, run, Some(&format!("t-{run}")), bytes);
        };
        grow(&mut s, "a", 100);
        assert!(s.oversized_runs(&l).is_empty(), "exactly at the run bound");
        assert_eq!(s.open_runs()["a"].bytes(), 100);
        grow(&mut s, "b", 50);
        assert!(
            s.oversized_runs(&l).is_empty(),
            "exactly at the total bound"
        );
        grow(&mut s, "c", 100);
        // 250 together: a (100, first by id among the largest) is enough
        // for 150; for 90, c must go too.
        assert_eq!(
            s.oversized_runs(&l),
            vec![("a".to_owned(), Some("t-a".to_owned()))]
        );
        let l90 = StreamLimits {
            max_runs_bytes: 90,
            ..l.clone()
        };
        assert_eq!(
            s.oversized_runs(&l90),
            vec![
                ("a".to_owned(), Some("t-a".to_owned())),
                ("c".to_owned(), Some("t-c".to_owned()))
            ]
        );
        assert_eq!(
            s.largest_run(),
            Some(("a".to_owned(), Some("t-a".to_owned())))
        );
        grow(&mut s, "b", 60);
        assert_eq!(
            s.largest_run(),
            Some(("b".to_owned(), Some("t-b".to_owned())))
        );
    }

    /// Age eviction reports what it freed; run expiry and run replay bounds.
    #[test]
    fn expiry_bounds_and_run_replay_ranges() {
        let t0 = Instant::now();
        let mut s = Stream::new("ep", t0);
        let l = StreamLimits {
            max_age: Duration::from_secs(10),
            run_ttl: Duration::from_secs(30),
            ..limits(100)
        };
        push(&mut s, t0, meta("agent_started", Some("r")), &l);
        push(&mut s, t0, meta("note", None), &l);
        push(&mut s, t0, meta("agent_thinking", Some("r")), &l);
        push(&mut s, t0, meta("note", None), &l);
        push(&mut s, t0, meta("agent_thinking", Some("r")), &l);
        assert_eq!(s.active_run_events(0, 5), vec!["e1", "e3", "e5"]);
        assert_eq!(s.active_run_events(1, 5), vec!["e3", "e5"]);
        assert_eq!(s.active_run_events(1, 4), vec!["e3"]);
        assert_eq!(s.evict_expired(t0 + Duration::from_secs(10), &l), 0);
        // Only the two notes are freed; the run's events stay pinned.
        assert_eq!(s.evict_expired(t0 + Duration::from_secs(11), &l), 4);
        assert!(s.expired_runs(t0 + Duration::from_secs(30), &l).is_empty());
        assert_eq!(
            s.expired_runs(t0 + Duration::from_secs(30) + Duration::from_nanos(1), &l),
            vec![("r".to_owned(), None)]
        );
    }

    /// Issue 39: a run that names the message it answers keeps that
    /// message with its events — replayed with the run, pinned past the
    /// window while the run is open, released when it closes — and only
    /// the run that opened naming it does.
    #[test]
    fn a_run_keeps_the_question_it_answers() {
        let t0 = Instant::now();
        let mut s = Stream::new("ep", t0);
        let l = limits(3);
        let key = turns::message_key("m1");
        let q = s
            .append(t0, &meta(turns::USER_MESSAGE, None), Some(&key), &l, |q| {
                format!("e{q}")
            })
            .seq();
        push(&mut s, t0, meta("note", None), &l);
        let answering = EventMeta {
            answers: Some("m1".into()),
            ..meta(runs::STARTED, Some("r"))
        };
        push(&mut s, t0, answering.clone(), &l);
        assert_eq!(s.active_run_events(0, 3), vec!["e1", "e3"]);
        assert_eq!(s.active_run_events(q, 3), vec!["e3"]);
        // A second run naming the same message does not take it.
        push(
            &mut s,
            t0,
            EventMeta {
                answers: Some("m1".into()),
                ..meta(runs::STARTED, Some("r2"))
            },
            &l,
        );
        push(&mut s, t0, meta(runs::COMPLETED, Some("r2")), &l);
        // The window (3 events) has moved past the question: still replayed.
        push(&mut s, t0, meta("note", None), &l);
        assert_eq!(s.active_run_events(0, 6), vec!["e1", "e3"]);
        let held = s.run_bytes();
        assert_eq!(
            held, 4,
            "the question and the run's opening event, 2 bytes each"
        );
        push(&mut s, t0, meta(runs::COMPLETED, Some("r")), &l);
        assert!(s.active_run_events(0, 7).is_empty());
        assert_eq!(s.run_bytes(), 0);
        assert_eq!(
            s.bytes(),
            6,
            "the window's three events: the pinned ones were dropped"
        );

        // A message evicted before its run opens is not brought back, and
        // a run naming an unknown message keeps only its own events.
        let mut s = Stream::new("ep", t0);
        s.append(t0, &meta(turns::USER_MESSAGE, None), Some(&key), &l, |q| {
            format!("e{q}")
        });
        for _ in 0..3 {
            push(&mut s, t0, meta("note", None), &l);
        }
        push(&mut s, t0, answering, &l);
        push(
            &mut s,
            t0,
            EventMeta {
                answers: Some("nope".into()),
                ..meta(runs::STARTED, Some("r3"))
            },
            &l,
        );
        assert_eq!(s.active_run_events(0, 6), vec!["e5", "e6"]);
    }
}
