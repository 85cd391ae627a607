//! Property test of the merge-by-seq catch-up against a model stream:
//! adversarial interleavings of publishes, evictions, the position read,
//! history pages, and live deliveries that arrive late, twice, or not at all.
//! Whatever the order, the connection sees every seq after its starting point
//! once, in order, with no gap — or the catch-up reports a gap, and only when
//! history really lost an event it needed. Some publishes are text deltas that
//! history compacts into the entry before them: history then hands over one
//! frame covering a range (cut at the resume point), and what the connection
//! receives must still cover every seq once — no text twice, none missing.

use std::collections::VecDeque;

use herald_core::catchup::{HistoryRequest, LiveOutcome, Merge, Plan, StreamPosition, decide_join};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Publish one event; `lost` drops its live delivery to this connection;
    /// `joins` compacts it into history's newest entry (a delta of the same part).
    Publish { lost: bool, joins: bool },
    /// Evict the oldest entry from history.
    Evict,
    /// The oldest pending delivery arrives.
    Deliver,
    /// The oldest pending delivery arrives but stays pending (a duplicate later).
    DeliverTwice,
    /// The connection reads the stream position and starts its plan.
    Position,
    /// The connection reads the page of history it asked for.
    ReadPage,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![9 => Just(false), 1 => Just(true)], any::<bool>())
            .prop_map(|(lost, joins)| Op::Publish { lost, joins }),
        1 => Just(Op::Evict),
        5 => Just(Op::Deliver),
        1 => Just(Op::DeliverTwice),
        1 => Just(Op::Position),
        4 => Just(Op::ReadPage),
    ]
}

/// A frame and the seqs it covers (`from`, `to`).
type Frame = (u64, u64);

/// The model stream: seqs `1..=last` in entries (each covering a range);
/// history holds the entries from `lo` on.
struct Model {
    last: u64,
    entries: Vec<Frame>,
    lo: usize,
}

impl Model {
    /// Oldest seq in history.
    fn first(&self) -> u64 {
        self.entries.get(self.lo).map_or(self.last + 1, |e| e.0)
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            epoch: "e".into(),
            last_seq: self.last,
            first_seq: self.first(),
        }
    }

    /// A broker read: frames covering `after < seq <= until` (entries cut to
    /// the range), at most `limit`, or `None` when the first seq needed was evicted.
    fn read(&self, after: u64, until: u64, limit: usize) -> Option<Vec<(u64, u64, Frame)>> {
        if after < until && self.first() > after + 1 {
            return None;
        }
        Some(
            self.entries[self.lo..]
                .iter()
                .map(|&(f, t)| (f.max(after + 1), t.min(until)))
                .filter(|(f, t)| f <= t)
                .take(limit)
                .map(|(f, t)| (f, t, (f, t)))
                .collect(),
        )
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn every_seq_once_in_order_or_a_real_gap(
        pre in 0u64..12,
        evicted in 0u64..12,
        resume_back in 0u64..14,
        page in 1usize..5,
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut model = Model { last: pre, entries: (1..=pre).map(|s| (s, s)).collect(), lo: evicted.min(pre) as usize };
        // The client's resume point, somewhere at or before the stream's end.
        let resume = pre.saturating_sub(resume_back);
        let mut merge: Merge<Frame> = Merge::joining();
        let mut pending: VecDeque<u64> = VecDeque::new();
        let mut out: Vec<Frame> = Vec::new();
        let mut start: Option<u64> = None;
        let mut max_delivered = 0u64;
        let mut gap = false;

        let step = |op: &Op, model: &mut Model, merge: &mut Merge<Frame>, pending: &mut VecDeque<u64>,
                        out: &mut Vec<Frame>, start: &mut Option<u64>, max_delivered: &mut u64, gap: &mut bool| {
            match op {
                Op::Publish { lost, joins } => {
                    model.last += 1;
                    let in_window = model.lo < model.entries.len();
                    match model.entries.last_mut() {
                        Some(e) if *joins && in_window => e.1 = model.last,
                        _ => model.entries.push((model.last, model.last)),
                    }
                    if !lost {
                        pending.push_back(model.last);
                    }
                }
                Op::Evict => {
                    model.lo = (model.lo + 1).min(model.entries.len());
                }
                Op::Deliver | Op::DeliverTwice => {
                    let seq = if matches!(op, Op::Deliver) { pending.pop_front() } else { pending.front().copied() };
                    if let Some(seq) = seq {
                        *max_delivered = (*max_delivered).max(seq);
                        let outcome = merge.on_live(seq, (seq, seq), out);
                        if let Some(s) = *start {
                            // Anything at or below what was sent is a duplicate.
                            if seq <= s { assert_eq!(outcome, LiveOutcome::Duplicate); }
                        }
                    }
                }
                Op::Position => {
                    if start.is_none() {
                        let d = decide_join(&model.position(), Some(("e", resume)), false);
                        let after = match d.plan {
                            Plan::Live { after } | Plan::Replay { after, .. } => after,
                            Plan::Runs { .. } | Plan::RunsThenReplay { .. } => unreachable!("runs not requested"),
                        };
                        // A reset only when the resume point is really gone.
                        assert_eq!(d.reset, resume + 1 < model.first() && resume < model.last);
                        *start = Some(after);
                        merge.start(d.plan, out);
                    }
                }
                Op::ReadPage => {
                    if let Some(HistoryRequest::Range { after, until }) = merge.wants_history() {
                        match model.read(after, until, page) {
                            None => *gap = true,
                            Some(events) => {
                                if merge.on_history(events, out).is_err() {
                                    // The read came back short only if events were evicted.
                                    assert!(model.first() > after + 1);
                                    *gap = true;
                                }
                            }
                        }
                    }
                }
            }
        };

        for op in &ops {
            if gap { break; }
            step(op, &mut model, &mut merge, &mut pending, &mut out, &mut start, &mut max_delivered, &mut gap);
        }
        // Let the rest arrive: position, every pending delivery, every page.
        if !gap {
            step(&Op::Position, &mut model, &mut merge, &mut pending, &mut out, &mut start, &mut max_delivered, &mut gap);
            while !gap && (!pending.is_empty() || merge.wants_history().is_some()) {
                if merge.wants_history().is_some() {
                    step(&Op::ReadPage, &mut model, &mut merge, &mut pending, &mut out, &mut start, &mut max_delivered, &mut gap);
                } else {
                    step(&Op::Deliver, &mut model, &mut merge, &mut pending, &mut out, &mut start, &mut max_delivered, &mut gap);
                }
            }
        }
        // What was handed over is contiguous from the start point, each seq
        // once: every frame starts right after the one before ends.
        if let Some(s) = start {
            let mut end = s;
            for &(from, to) in &out {
                prop_assert_eq!(from, end + 1, "frames {:?} from {}", &out, s);
                prop_assert!(to >= from);
                end = to;
            }
            if !gap {
                // Everything delivered live was reached (a lost tail stays unknown
                // until a later delivery or a catch-up reveals it).
                prop_assert!(merge.is_live());
                prop_assert!(merge.sent() >= max_delivered.max(s));
                prop_assert_eq!(merge.held(), 0);
            }
        } else {
            prop_assert!(out.is_empty(), "nothing is sent before the position is known");
        }
    }
}
