//! Property test of the stream logic against a simple model: random publishes
//! (some in agent runs, some with idempotency keys), evictions, time passing
//! and resumes from any epoch and seq, read in pages of any size.
//!
//! The model keeps its own answer to "which is the lowest seq the window must
//! still hold" — every seq above the count bound, younger than the age bound
//! and not taken by an explicit eviction — and checked after every step:
//! - the stream holds exactly that window plus the open runs' older events;
//! - a resume is accepted exactly when every event after it is in that window
//!   (and the epoch matches), and refused otherwise — an over-eager eviction
//!   or a too-lenient check both fail;
//! - an accepted resume reads, page by page, exactly the model's events after
//!   the resume point, in order (no gap, no duplicate);
//! - a publish with a remembered idempotency key returns the original seq and
//!   appends nothing; a forgotten key (count or age) appends again;
//! - the open runs' events are all still there, from their first event.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use herald_core::stream::{Appended, EventMeta, ResumeDecision, Stream, StreamLimits};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        run: Option<u8>,
        close: bool,
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
        1 => Just(Op::EvictFront),
        1 => (0u64..40).prop_map(Op::Advance),
        3 => (proptest::bool::weighted(0.1), 0u64..60, 1usize..12)
            .prop_map(|(other_epoch, at, page)| Op::Resume { other_epoch, at, page }),
    ]
}

/// What the stream must hold, computed the plain way.
struct Model {
    /// Publish time of every event ever appended (index = seq - 1).
    at: Vec<Instant>,
    /// Lowest seq still in the window (the window is `lo..=last`).
    lo: u64,
    /// Open runs and their seqs.
    open: BTreeMap<String, Vec<u64>>,
    /// Remembered idempotency keys, oldest first: (key, seq, when).
    keys: VecDeque<(u8, u64, Instant)>,
}

impl Model {
    fn last(&self) -> u64 {
        self.at.len() as u64
    }

    /// Apply the count and age bounds to the window's front.
    fn trim(&mut self, now: Instant, limits: &StreamLimits) {
        let last = self.last();
        self.lo = self
            .lo
            .max((last + 1).saturating_sub(limits.max_events as u64));
        while self.lo <= last
            && now.saturating_duration_since(self.at[self.lo as usize - 1]) > limits.max_age
        {
            self.lo += 1;
        }
    }

    /// Whether a resume from `at` in the stream's epoch can be served.
    fn can_resume(&self, at: u64) -> bool {
        at == self.last() || (at < self.last() && self.lo <= at + 1)
    }

    /// Seqs the stream must hold: the window and the open runs' older events.
    fn held(&self) -> usize {
        let pinned = self
            .open
            .values()
            .flatten()
            .filter(|&&q| q < self.lo)
            .count();
        (self.last() + 1 - self.lo) as usize + pinned
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
        let mut m = Model { at: Vec::new(), lo: 1, open: BTreeMap::new(), keys: VecDeque::new() };

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
                    let meta = EventMeta { event: event.into(), run_id: run_id.clone(), thread_id: None };
                    let key_str = key.map(|k| format!("k{k}"));
                    let got = s.append(now, &meta, key_str.as_deref(), &limits, |q| format!("e{q}"));
                    if let Some(&(_, seq, _)) = key.and_then(|k| m.keys.iter().find(|(x, _, _)| *x == k)) {
                        prop_assert_eq!(got, Appended::Duplicate(seq));
                    } else {
                        let seq = m.last() + 1;
                        prop_assert_eq!(got, Appended::New(seq));
                        m.at.push(now);
                        if let Some(k) = key {
                            m.keys.push_back((k, seq, now));
                            while m.keys.len() > limits.max_idempotency_keys {
                                m.keys.pop_front();
                            }
                        }
                        if let Some(r) = run_id {
                            if close { m.open.remove(&r); } else { m.open.entry(r).or_default().push(seq); }
                        }
                        m.trim(now, &limits);
                    }
                }
                Op::EvictFront => {
                    s.evict_front();
                    if m.lo <= m.last() {
                        m.lo += 1;
                    }
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
                            // Read it the way a catch-up does: page by page.
                            let mut got = Vec::new();
                            let mut from = at;
                            while from < last {
                                let chunk = s.read(from, last, page).expect("accepted resume must be readable");
                                prop_assert_eq!(chunk.len() as u64, (last - from).min(page as u64));
                                from += chunk.len() as u64;
                                got.extend(chunk);
                            }
                            let expected: Vec<String> = (at + 1..=last).map(|q| format!("e{q}")).collect();
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
            prop_assert_eq!(last, m.last());
            // The window's front is exactly the model's lowest kept seq.
            let front = s.oldest().map(|(q, _)| q);
            prop_assert_eq!(front, (m.lo <= last).then_some(m.lo));
            prop_assert_eq!(s.len(), m.held());
            prop_assert_eq!(s.keys().0, m.keys.len());
            for k in 0u8..6 {
                let remembered = m.keys.iter().find(|(x, _, _)| *x == k).map(|(_, seq, _)| *seq);
                prop_assert_eq!(s.idempotent_seq(&format!("k{k}")), remembered, "key k{}", k);
            }
            // Every event of every open run is kept.
            let mut want: Vec<u64> = m.open.values().flatten().copied().collect();
            want.sort();
            let want: Vec<String> = want.iter().map(|q| format!("e{q}")).collect();
            prop_assert_eq!(s.active_run_events(0, last), want);
        }
    }
}
