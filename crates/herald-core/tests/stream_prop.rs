//! Property test of the stream logic against a simple model: random publishes
//! (some in agent runs, some with idempotency keys), text deltas (numbered
//! or not, duplicated, out of order), evictions, time passing and resumes
//! from any epoch and seq, read in pages of any size.
//!
//! The model keeps every entry the stream must have made — an event, or the
//! consecutive deltas of one run's part joined into one entry covering a seq
//! range — and its own answer to "which is the oldest entry the window must
//! still hold" (the count bound counts entries; the age bound and explicit
//! evictions take whole entries). Checked after every step:
//! - the stream holds exactly that window plus the open runs' older entries;
//! - a resume is accepted exactly when every seq after it is in that window
//!   (and the epoch matches), and refused otherwise — an over-eager eviction
//!   or a too-lenient check both fail;
//! - an accepted resume reads, page by page, exactly the model's frames after
//!   the resume point, in order, an entry of deltas cut at the resume point
//!   (its unseen text, once) — no gap, no duplicate;
//! - a publish with a remembered idempotency key returns the original seq and
//!   appends nothing; a forgotten key (count or age) appends again;
//! - a numbered delta below its part's next index is a duplicate, above it is
//!   refused, and neither appends;
//! - the open runs' entries are all still there, from their first event.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use herald_core::stream::{Appended, EventMeta, ResumeDecision, Stream, StreamLimits};
use herald_core::text::{Delta, Template, escape};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        run: Option<u8>,
        close: bool,
        key: Option<u8>,
    },
    Delta {
        run: u8,
        part: u8,
        /// The index relative to the part's next one (-1 repeats the last), or none.
        index: Option<i8>,
        key: Option<u8>,
    },
    EvictFront,
    Advance(u64),
    Resume {
        other_epoch: bool,
        at: u64,
        page: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            proptest::option::of(0u8..3),
            any::<bool>(),
            proptest::option::weighted(0.3, 0u8..6),
        )
            .prop_map(|(run, close, key)| Op::Publish { run, close, key }),
        6 => (
            0u8..3,
            0u8..2,
            proptest::option::weighted(0.6, prop_oneof![1 => Just(-1i8), 6 => Just(0i8), 1 => Just(1i8)]),
            proptest::option::weighted(0.1, 0u8..6),
        )
            .prop_map(|(run, part, index, key)| Op::Delta { run, part, index, key }),
        1 => Just(Op::EvictFront),
        1 => (0u64..40).prop_map(Op::Advance),
        3 => (proptest::bool::weighted(0.1), 0u64..60, 1usize..12)
            .prop_map(|(other_epoch, at, page)| Op::Resume { other_epoch, at, page }),
    ]
}

/// One entry the stream must have made.
#[derive(Debug, Clone)]
struct Entry {
    first: u64,
    at: Instant,
    run: Option<String>,
    /// For deltas: the part and each delta's text (index = seq - first).
    part: Option<(u8, Vec<String>)>,
}

impl Entry {
    fn last(&self) -> u64 {
        self.first + self.part.as_ref().map_or(0, |(_, t)| t.len() as u64 - 1)
    }

    /// Its frame cut to `from..=to`, with the last seq it then covers.
    fn frame(&self, from: u64, to: u64) -> Option<(u64, String)> {
        let (from, to) = (from.max(self.first), to.min(self.last()));
        if from > to {
            return None;
        }
        Some(match &self.part {
            None => (to, format!("e{to}")),
            Some((p, texts)) => {
                let text: String =
                    texts[(from - self.first) as usize..=(to - self.first) as usize].concat();
                (
                    to,
                    template(self.run.as_deref().unwrap_or(""), *p).frame(from, to, &escape(&text)),
                )
            }
        })
    }
}

fn template(run: &str, part: u8) -> Template {
    Template::new(run, None, &format!("p{part}"), "ts")
}

/// What the stream must hold, computed the plain way.
struct Model {
    last: u64,
    /// Every entry ever made, in order.
    entries: Vec<Entry>,
    /// Index of the oldest entry still in the window.
    lo: usize,
    /// Open runs and their entries (indices).
    open: BTreeMap<String, Vec<usize>>,
    /// Parts of open runs: (next index, seq of the latest delta).
    parts: BTreeMap<(String, u8), (u64, u64)>,
    /// Remembered idempotency keys, oldest first: (key, seq, when).
    keys: VecDeque<(u8, u64, Instant)>,
}

impl Model {
    /// Apply the count and age bounds to the window's front.
    fn trim(&mut self, now: Instant, limits: &StreamLimits) {
        self.lo = self
            .lo
            .max(self.entries.len().saturating_sub(limits.max_events));
        while self.lo < self.entries.len()
            && now.saturating_duration_since(self.entries[self.lo].at) > limits.max_age
        {
            self.lo += 1;
        }
    }

    /// The window's oldest seq.
    fn front(&self) -> Option<u64> {
        self.entries.get(self.lo).map(|e| e.first)
    }

    /// Whether a resume from `at` in the stream's epoch can be served.
    fn can_resume(&self, at: u64) -> bool {
        at == self.last || (at < self.last && self.front().is_some_and(|f| f <= at + 1))
    }

    /// Entries the stream must hold: the window and the open runs' older ones.
    fn held(&self) -> usize {
        let pinned = self
            .open
            .values()
            .flatten()
            .filter(|&&i| i < self.lo)
            .count();
        self.entries.len() - self.lo + pinned
    }

    /// The frames a read of `after < seq <= until` must give, with the last seq each covers.
    fn frames(&self, after: u64, until: u64) -> Vec<(u64, String)> {
        self.entries[self.lo..]
            .iter()
            .filter_map(|e| e.frame(after + 1, until))
            .collect()
    }

    /// The index a numbered delta of `run`'s `part` must carry next.
    fn next(&self, run: &str, part: u8) -> (u64, u64) {
        self.parts
            .get(&(run.to_owned(), part))
            .copied()
            .unwrap_or((0, 0))
    }

    /// A key remembered, if any.
    fn key(&self, key: Option<u8>) -> Option<u64> {
        key.and_then(|k| self.keys.iter().find(|(x, _, _)| *x == k))
            .map(|&(_, seq, _)| seq)
    }

    fn remember(&mut self, key: Option<u8>, seq: u64, now: Instant, limits: &StreamLimits) {
        if let Some(k) = key {
            self.keys.push_back((k, seq, now));
            while self.keys.len() > limits.max_idempotency_keys {
                self.keys.pop_front();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn stream_matches_model(ops in proptest::collection::vec(op(), 1..160)) {
        let t0 = Instant::now();
        let mut now = t0;
        let limits = StreamLimits {
            max_events: 8,
            max_age: Duration::from_secs(30),
            idempotency_window: Duration::from_secs(50),
            max_idempotency_keys: 3,
            ..StreamLimits::default()
        };
        let mut s: Stream<String> = Stream::new("ep", now);
        let mut m = Model { last: 0, entries: Vec::new(), lo: 0, open: BTreeMap::new(), parts: BTreeMap::new(), keys: VecDeque::new() };

        for op in ops {
            match op {
                Op::Publish { run, close, key } => {
                    let run_id = run.map(|r| format!("r{r}"));
                    let event = match (&run_id, close) {
                        (Some(_), true) => "agent_completed",
                        (Some(r), false) if !m.open.contains_key(r) => "agent_started",
                        (Some(_), false) => "agent_thinking",
                        (None, _) => "note",
                    };
                    let meta = EventMeta { event: event.into(), run_id: run_id.clone(), thread_id: None, delta: None, answers: None };
                    let key_str = key.map(|k| format!("k{k}"));
                    let got = s.append(now, &meta, key_str.as_deref(), &limits, |q| format!("e{q}"));
                    if let Some(seq) = m.key(key) {
                        prop_assert_eq!(got, Appended::Duplicate(seq));
                    } else {
                        m.last += 1;
                        let seq = m.last;
                        prop_assert_eq!(got, Appended::New(seq));
                        m.entries.push(Entry { first: seq, at: now, run: run_id.clone(), part: None });
                        m.remember(key, seq, now, &limits);
                        if let Some(r) = run_id {
                            if close {
                                m.open.remove(&r);
                                m.parts.retain(|(run, _), _| *run != r);
                            } else {
                                m.open.entry(r).or_default().push(m.entries.len() - 1);
                            }
                        }
                        m.trim(now, &limits);
                    }
                }
                Op::Delta { run, part, index, key } => {
                    let r = format!("r{run}");
                    let (next, part_last) = m.next(&r, part);
                    let index = index.and_then(|d| next.checked_add_signed(d.into()));
                    let text = format!("{run}.{part}\"{}", m.last + 1);
                    let meta = EventMeta {
                        event: "agent_text_delta".into(),
                        run_id: Some(r.clone()),
                        thread_id: None,
                        delta: Some(std::sync::Arc::new(Delta::new(&format!("p{part}"), &text, index, template(&r, part)))),
                        answers: None,
                    };
                    let key_str = key.map(|k| format!("k{k}"));
                    let refused = s.first_out_of_order([(&meta, key_str.as_deref())]);
                    let got = s.append(now, &meta, key_str.as_deref(), &limits, |q| format!("d{q}"));
                    prop_assert_eq!(
                        refused,
                        match got { Appended::OutOfOrder { expected } => index.map(|i| (0, i, expected)), _ => None }
                    );
                    if let Some(seq) = m.key(key) {
                        prop_assert_eq!(got, Appended::Duplicate(seq));
                    } else if index.is_some_and(|i| i < next) {
                        prop_assert_eq!(got, Appended::Duplicate(part_last));
                    } else if index.is_some_and(|i| i > next) {
                        prop_assert_eq!(got, Appended::OutOfOrder { expected: next });
                    } else {
                        m.last += 1;
                        let seq = m.last;
                        let joins = m.lo < m.entries.len()
                            && m.entries.last().is_some_and(|e| {
                                e.run.as_deref() == Some(r.as_str())
                                    && e.part.as_ref().is_some_and(|(p, _)| *p == part)
                            });
                        if joins {
                            prop_assert_eq!(got, Appended::Joined(seq));
                            if let Some(Entry { part: Some((_, texts)), .. }) = m.entries.last_mut() {
                                texts.push(text);
                            }
                        } else {
                            prop_assert_eq!(got, Appended::New(seq));
                            m.entries.push(Entry { first: seq, at: now, run: Some(r.clone()), part: Some((part, vec![text])) });
                            m.open.entry(r.clone()).or_default().push(m.entries.len() - 1);
                        }
                        m.open.entry(r.clone()).or_default();
                        m.parts.insert((r, part), (next + 1, seq));
                        m.remember(key, seq, now, &limits);
                        m.trim(now, &limits);
                    }
                }
                Op::EvictFront => {
                    s.evict_front();
                    m.lo = (m.lo + 1).min(m.entries.len());
                }
                Op::Advance(secs) => {
                    now += Duration::from_secs(secs);
                    s.evict_expired(now, &limits);
                    m.trim(now, &limits);
                    m.keys.retain(|(_, _, at)| now.saturating_duration_since(*at) <= limits.idempotency_window);
                }
                Op::Resume { other_epoch, at, page } => {
                    let last = s.last_seq();
                    let epoch = if other_epoch { "ep-old" } else { "ep" };
                    let want = !other_epoch && m.can_resume(at);
                    match s.check_resume(epoch, at) {
                        ResumeDecision::Resume { after } => {
                            prop_assert!(want, "resume from {} accepted, but seq {} is gone (window from {})", at, at + 1, m.lo);
                            prop_assert_eq!(after, at);
                            // Read it the way a catch-up does: page by page,
                            // each page starting after the last seq the one
                            // before covered.
                            let want = m.frames(at, last);
                            let mut got = Vec::new();
                            let mut from = at;
                            while from < last {
                                let chunk = s.read(from, last, page).expect("accepted resume must be readable");
                                let left = &want[got.len()..];
                                prop_assert_eq!(chunk.len(), left.len().min(page));
                                prop_assert!(!chunk.is_empty());
                                from = left[chunk.len() - 1].0;
                                got.extend(chunk);
                            }
                            let expected: Vec<String> = want.into_iter().map(|(_, f)| f).collect();
                            prop_assert_eq!(got, expected);
                        }
                        ResumeDecision::Reset => {
                            prop_assert!(!want, "resume from {} refused although the window holds {}..={}", at, m.lo, last);
                            if !other_epoch && at < last {
                                prop_assert!(s.read(at, last, usize::MAX).is_err());
                            }
                        }
                    }
                }
            }
            let last = s.last_seq();
            prop_assert_eq!(last, m.last);
            // The window's front is exactly the model's oldest kept entry.
            prop_assert_eq!(s.oldest().map(|(q, _)| q), m.front());
            prop_assert_eq!(s.len(), m.held());
            prop_assert_eq!(s.keys().0, m.keys.len());
            for k in 0u8..6 {
                let remembered = m.keys.iter().find(|(x, _, _)| *x == k).map(|(_, seq, _)| *seq);
                prop_assert_eq!(s.idempotent_seq(&format!("k{k}")), remembered, "key k{}", k);
            }
            for ((run, part), (next, _)) in &m.parts {
                prop_assert_eq!(s.next_delta(run, &format!("p{part}")), *next);
            }
            // Every entry of every open run is kept, whole.
            let mut want: Vec<usize> = m.open.values().flatten().copied().collect();
            want.sort();
            let want: Vec<String> = want.iter().filter_map(|&i| m.entries[i].frame(0, last)).map(|(_, f)| f).collect();
            prop_assert_eq!(s.active_run_events(0, last), want);
        }
    }
}
