//! Merge-by-seq catch-up: how one connection goes from "just subscribed" to
//! "live" without a gap or a duplicate, with no lock shared with publishers.
//!
//! The I/O layer subscribes a connection to its stream *before* it reads the
//! stream's position, so every event after that position is certain to
//! arrive live. Live events that arrive while the connection still catches up
//! are held here, keyed by seq; history is read page by page and handed over
//! in order; the two are merged on seq:
//!
//! - an event at or below what was already handed to the queue is a duplicate
//!   and is dropped;
//! - the next seq goes to the queue;
//! - an event beyond the next seq is held, and the missing range is requested
//!   from history — a gap in a live delivery is filled, never skipped;
//! - a history page that skips a seq means the events are gone: [`Gap`], and
//!   the caller fails closed (the client resumes again and is told `reset`).
//!
//! A history frame may cover a range of seqs (compacted text deltas,
//! [`crate::text`]): it is handed over when it starts right after what was
//! sent, and then counts as sent up to its last seq, so live deltas of that
//! range are dropped as duplicates and their text is not sent twice. A
//! covered frame that starts before what was sent would repeat text: it is a
//! [`Gap`] too (fail closed).
//!
//! Nothing here knows about sockets, brokers or time.

use std::collections::BTreeMap;

/// What the catch-up needs from history before it can go live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRequest {
    /// Read events with `after < seq <= until`, in order, page by page.
    Range {
        /// The last seq already handed to the queue.
        after: u64,
        /// The last seq the catch-up needs from history.
        until: u64,
    },
    /// Read the events of the stream's open runs with `seq <= until`
    /// (`replay_active_runs`: on a fresh join, or up to the resume point).
    Runs {
        /// The stream's position when the connection joined.
        until: u64,
    },
}

/// Where the catch-up starts, decided once the stream's position is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Go live after `after` (nothing to replay).
    Live {
        /// The stream's position: events up to here are not sent.
        after: u64,
    },
    /// Replay history after `after` up to `until`, then go live.
    Replay {
        /// The client's resume point.
        after: u64,
        /// The stream's position when the connection joined.
        until: u64,
    },
    /// Replay the open runs' events up to `until`, then go live.
    Runs {
        /// The stream's position when the connection joined.
        until: u64,
    },
    /// A page reloaded mid-run: replay the open runs' events up to the
    /// resume point `after` (the page saw them but lost them), then history
    /// after it up to `until`, then go live — each event once.
    RunsThenReplay {
        /// The client's resume point.
        after: u64,
        /// The stream's position when the connection joined.
        until: u64,
    },
}

/// A stream's position as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream's epoch.
    pub epoch: String,
    /// Seq of the latest event (0 when none).
    pub last_seq: u64,
    /// Seq of the oldest event still in the contiguous history window
    /// (`last_seq + 1` when the window is empty).
    pub first_seq: u64,
}

/// How a `hello` is answered: the welcome's `resumed`/`reset` and the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinDecision {
    /// The resume point is honoured.
    pub resumed: bool,
    /// A resume point was given and cannot be honoured.
    pub reset: bool,
    /// What to replay.
    pub plan: Plan,
}

/// Decide a join: honour `resume` (epoch, seq) when every event after it is
/// still in history, else `reset`; without a usable resume point, replay the
/// open runs when asked to. A resume with `replay_active_runs` (a page
/// reloaded mid-run, which lost what it had shown) replays the open runs'
/// events up to the resume point first, then the history after it.
pub fn decide_join(
    pos: &StreamPosition,
    resume: Option<(&str, u64)>,
    replay_active_runs: bool,
) -> JoinDecision {
    let until = pos.last_seq;
    let fallback = if replay_active_runs && until > 0 {
        Plan::Runs { until }
    } else {
        Plan::Live { after: until }
    };
    match resume {
        None => JoinDecision {
            resumed: false,
            reset: false,
            plan: fallback,
        },
        Some((epoch, seq))
            if epoch == pos.epoch && seq <= until && (seq == until || pos.first_seq <= seq + 1) =>
        {
            let plan = if replay_active_runs && seq > 0 {
                Plan::RunsThenReplay { after: seq, until }
            } else if seq == until {
                Plan::Live { after: until }
            } else {
                Plan::Replay { after: seq, until }
            };
            JoinDecision {
                resumed: true,
                reset: false,
                plan,
            }
        }
        Some(_) => JoinDecision {
            resumed: false,
            reset: true,
            plan: fallback,
        },
    }
}

/// A history frame and the seqs it covers: `(seq, frame)` for one event,
/// `(from, to, frame)` for a range of compacted deltas.
pub trait Covering<P> {
    /// The first and last seq covered, and the frame.
    fn into_covering(self) -> (u64, u64, P);
}

impl<P> Covering<P> for (u64, P) {
    fn into_covering(self) -> (u64, u64, P) {
        (self.0, self.0, self.1)
    }
}

impl<P> Covering<P> for (u64, u64, P) {
    fn into_covering(self) -> (u64, u64, P) {
        self
    }
}

/// History skipped a seq the catch-up needed: the events were evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("history after seq {after} is no longer available")]
pub struct Gap {
    /// The last seq handed to the queue.
    pub after: u64,
}

/// What happened to one live event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveOutcome {
    /// Handed to the queue (with any held events it made contiguous).
    Delivered,
    /// Held until the catch-up reaches it.
    Held,
    /// At or below what was already handed over: dropped.
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Subscribed, position not known yet: hold everything.
    Joining,
    /// Waiting for history.
    CatchingUp(HistoryRequest),
    /// Contiguous: the next seq goes straight to the queue.
    Live,
}

/// The merge-by-seq state of one connection (`P` is the frame type).
#[derive(Debug, Clone)]
pub struct Merge<P> {
    sent: u64,
    phase: Phase,
    held: BTreeMap<u64, P>,
    /// After a runs replay, history up to here is read before going live
    /// ([`Plan::RunsThenReplay`]; 0 when none).
    then_until: u64,
}

impl<P> Default for Merge<P> {
    fn default() -> Self {
        Self::joining()
    }
}

impl<P> Merge<P> {
    /// A merge whose position is not known yet: every live event is held.
    pub fn joining() -> Self {
        Self {
            sent: 0,
            phase: Phase::Joining,
            held: BTreeMap::new(),
            then_until: 0,
        }
    }

    /// The last seq handed to the queue.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Live events held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// True once the catch-up is over and live events flow straight through.
    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// What history the catch-up waits for, if any.
    pub fn wants_history(&self) -> Option<HistoryRequest> {
        match self.phase {
            Phase::CatchingUp(r) => Some(r),
            _ => None,
        }
    }

    /// The position is known: start the plan. Held events are merged at once
    /// when the plan has nothing to replay.
    pub fn start(&mut self, plan: Plan, out: &mut impl Extend<P>) {
        match plan {
            Plan::Live { after } => {
                self.sent = after;
                self.go_live(out);
            }
            Plan::Replay { after, until } => {
                self.sent = after;
                self.phase = Phase::CatchingUp(HistoryRequest::Range { after, until });
            }
            Plan::Runs { until } => {
                self.phase = Phase::CatchingUp(HistoryRequest::Runs { until });
            }
            Plan::RunsThenReplay { after, until } => {
                self.sent = after;
                self.then_until = until;
                self.phase = Phase::CatchingUp(HistoryRequest::Runs { until: after });
            }
        }
    }

    /// A live event with `seq` arrived; frames ready to write are pushed to `out`.
    pub fn on_live(&mut self, seq: u64, frame: P, out: &mut impl Extend<P>) -> LiveOutcome {
        if self.phase != Phase::Joining && seq <= self.sent {
            return LiveOutcome::Duplicate;
        }
        match self.phase {
            Phase::Live if seq == self.sent + 1 => {
                self.sent = seq;
                out.extend(Some(frame));
                LiveOutcome::Delivered
            }
            Phase::Live => {
                // A gap in live delivery: fill it from history first.
                self.held.insert(seq, frame);
                self.phase = Phase::CatchingUp(HistoryRequest::Range {
                    after: self.sent,
                    until: seq - 1,
                });
                LiveOutcome::Held
            }
            Phase::Joining | Phase::CatchingUp(_) => {
                self.held.insert(seq, frame);
                LiveOutcome::Held
            }
        }
    }

    /// The stream is known to have reached `last_seq` (deliveries may have
    /// been missed, e.g. the broker's connection dropped): whatever after
    /// what was sent has not arrived is read from history.
    pub fn expect(&mut self, last_seq: u64) {
        match self.phase {
            Phase::Live if last_seq > self.sent => {
                self.phase = Phase::CatchingUp(HistoryRequest::Range {
                    after: self.sent,
                    until: last_seq,
                });
            }
            Phase::CatchingUp(HistoryRequest::Range { after, until }) if last_seq > until => {
                self.phase = Phase::CatchingUp(HistoryRequest::Range {
                    after,
                    until: last_seq,
                });
            }
            _ => {}
        }
    }

    /// A page of history for a [`HistoryRequest::Range`], in seq order. An
    /// empty page, or one that skips a seq or overlaps what was sent, is a
    /// [`Gap`].
    pub fn on_history(
        &mut self,
        page: impl IntoIterator<Item = impl Covering<P>>,
        out: &mut impl Extend<P>,
    ) -> Result<(), Gap> {
        let Phase::CatchingUp(HistoryRequest::Range { until, .. }) = self.phase else {
            return Ok(());
        };
        let before = self.sent;
        for item in page {
            let (from, to, frame) = item.into_covering();
            if to <= self.sent {
                continue;
            }
            if from > until {
                break;
            }
            if from != self.sent + 1 {
                return Err(Gap { after: self.sent });
            }
            self.sent = to;
            out.extend(Some(frame));
        }
        if self.sent >= until {
            self.go_live(out);
            Ok(())
        } else if self.sent == before {
            Err(Gap { after: self.sent })
        } else {
            self.phase = Phase::CatchingUp(HistoryRequest::Range {
                after: self.sent,
                until,
            });
            Ok(())
        }
    }

    /// The open runs' events for a [`HistoryRequest::Runs`] (not contiguous by
    /// nature); the catch-up continues live after `until`.
    pub fn on_runs(&mut self, frames: impl IntoIterator<Item = P>, out: &mut impl Extend<P>) {
        let Phase::CatchingUp(HistoryRequest::Runs { until }) = self.phase else {
            return;
        };
        out.extend(frames);
        self.sent = until;
        if self.then_until > self.sent {
            self.phase = Phase::CatchingUp(HistoryRequest::Range {
                after: self.sent,
                until: self.then_until,
            });
            self.then_until = 0;
            return;
        }
        self.then_until = 0;
        self.go_live(out);
    }

    /// Hand over held events that are now contiguous; a held event beyond the
    /// next seq starts a new history request.
    fn go_live(&mut self, out: &mut impl Extend<P>) {
        self.phase = Phase::Live;
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if seq <= self.sent {
                entry.remove();
            } else if seq == self.sent + 1 {
                self.sent = seq;
                out.extend(Some(entry.remove()));
            } else {
                self.phase = Phase::CatchingUp(HistoryRequest::Range {
                    after: self.sent,
                    until: seq - 1,
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &str, first: u64, last: u64) -> StreamPosition {
        StreamPosition {
            epoch: epoch.into(),
            last_seq: last,
            first_seq: first,
        }
    }

    #[test]
    fn join_decisions() {
        let p = pos("e", 4, 8);
        let d = decide_join(&p, Some(("e", 3)), false);
        assert_eq!((d.resumed, d.reset), (true, false));
        assert_eq!(d.plan, Plan::Replay { after: 3, until: 8 });
        assert!(decide_join(&p, Some(("e", 2)), false).reset);
        assert!(decide_join(&p, Some(("x", 8)), false).reset);
        assert!(decide_join(&p, Some(("e", 9)), false).reset);
        assert_eq!(
            decide_join(&p, Some(("e", 8)), false).plan,
            Plan::Live { after: 8 }
        );
        assert_eq!(
            decide_join(&p, Some(("x", 1)), true).plan,
            Plan::Runs { until: 8 }
        );
        assert_eq!(decide_join(&p, None, false).plan, Plan::Live { after: 8 });
        // An empty window: only "nothing missed" resumes.
        let empty = pos("e", 9, 8);
        assert!(decide_join(&empty, Some(("e", 8)), false).resumed);
        assert!(decide_join(&empty, Some(("e", 7)), false).reset);
    }

    #[test]
    fn live_events_during_replay_are_merged_without_duplicates() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        // Delivered while joining: 5 (already in history), 6 (after the position).
        assert_eq!(m.on_live(5, 5, &mut out), LiveOutcome::Held);
        assert_eq!(m.on_live(6, 6, &mut out), LiveOutcome::Held);
        m.start(Plan::Replay { after: 2, until: 5 }, &mut out);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 2, until: 5 })
        );
        m.on_history([(3, 3), (4, 4)], &mut out).unwrap();
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 4, until: 5 })
        );
        assert_eq!(m.on_live(7, 7, &mut out), LiveOutcome::Held);
        m.on_history([(5, 5)], &mut out).unwrap();
        assert!(m.is_live());
        assert_eq!(m.on_live(7, 7, &mut out), LiveOutcome::Duplicate);
        assert_eq!(m.on_live(8, 8, &mut out), LiveOutcome::Delivered);
        assert_eq!(out, vec![3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_live_gap_is_filled_from_history() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Live { after: 0 }, &mut out);
        m.on_live(1, 1, &mut out);
        assert_eq!(m.on_live(4, 4, &mut out), LiveOutcome::Held);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 1, until: 3 })
        );
        m.on_history([(2, 2), (3, 3), (4, 4)], &mut out).unwrap();
        assert!(m.is_live());
        assert_eq!(out, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_missed_tail_is_read_after_a_resync() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Live { after: 0 }, &mut out);
        m.on_live(1, 1, &mut out);
        m.expect(1);
        assert!(m.is_live(), "nothing missed");
        m.expect(3);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 1, until: 3 })
        );
        m.on_history([(2, 2), (3, 3)], &mut out).unwrap();
        assert!(m.is_live());
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn history_that_skips_is_a_gap() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Replay { after: 2, until: 6 }, &mut out);
        assert_eq!(m.on_history([(4, 4)], &mut out), Err(Gap { after: 2 }));
        let mut m: Merge<u64> = Merge::joining();
        m.start(Plan::Replay { after: 2, until: 6 }, &mut out);
        assert_eq!(
            m.on_history(Vec::<(u64, u64)>::new(), &mut out),
            Err(Gap { after: 2 })
        );
    }

    /// Issue 18: a covered frame counts as sent up to its end (live deltas of
    /// its range are duplicates); one that overlaps what was sent would
    /// repeat text and is refused.
    #[test]
    fn covered_frames_advance_to_their_end_and_never_overlap() {
        let mut m: Merge<&str> = Merge::joining();
        let mut out = Vec::new();
        assert_eq!(m.on_live(5, "live5", &mut out), LiveOutcome::Held);
        assert_eq!(m.on_live(7, "live7", &mut out), LiveOutcome::Held);
        m.start(Plan::Replay { after: 2, until: 6 }, &mut out);
        m.on_history([(3, 6, "text 3..=6")], &mut out).unwrap();
        assert_eq!(
            out,
            vec!["text 3..=6", "live7"],
            "held 5 is inside the range"
        );
        assert_eq!(m.sent(), 7);
        assert!(m.is_live());
        assert_eq!(m.on_live(6, "again", &mut out), LiveOutcome::Duplicate);

        let mut m: Merge<&str> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Replay { after: 4, until: 9 }, &mut out);
        assert_eq!(
            m.on_history([(3, 6, "text 3..=6")], &mut out),
            Err(Gap { after: 4 }),
            "starts before what was sent: text 3 and 4 twice"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn runs_replay_then_live_after_the_position() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.on_live(9, 9, &mut out);
        m.on_live(10, 10, &mut out);
        m.start(Plan::Runs { until: 9 }, &mut out);
        m.on_runs([2, 7], &mut out);
        assert!(m.is_live());
        assert_eq!(out, vec![2, 7, 10]);
    }

    /// Mutation testing (issue 17): nothing to replay reads nothing.
    #[test]
    fn an_empty_stream_with_replay_asked_goes_live_at_once() {
        let d = decide_join(&pos("e", 1, 0), None, true);
        assert_eq!(d.plan, Plan::Live { after: 0 });
    }

    /// A catch-up told the stream moved on reads up to the new end, in the
    /// same range; a smaller end does not shrink it.
    #[test]
    fn expect_extends_a_running_catch_up_and_never_shrinks_it() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Replay { after: 0, until: 5 }, &mut out);
        m.expect(8);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 0, until: 8 })
        );
        m.expect(6);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 0, until: 8 })
        );
        m.on_history((1..=8).map(|s| (s, s)), &mut out).unwrap();
        assert_eq!(out, (1..=8).collect::<Vec<_>>());
        assert!(m.is_live());
        // Live and told of events it has not seen: read exactly those.
        m.expect(8);
        assert!(m.is_live(), "nothing missed");
        m.expect(11);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range {
                after: 8,
                until: 11
            })
        );
    }

    /// A page that ends exactly at the range's end finishes the catch-up
    /// (no empty read after it, which would be taken for a gap).
    #[test]
    fn a_page_ending_at_the_range_end_goes_live() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Replay { after: 2, until: 5 }, &mut out);
        m.on_history([(3, 3), (4, 4), (5, 5)], &mut out).unwrap();
        assert!(m.is_live());
        assert_eq!(m.wants_history(), None);
    }

    /// A held event beyond a gap asks for exactly the missing seqs.
    #[test]
    fn a_gap_before_a_held_event_reads_only_the_gap() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        assert_eq!(m.on_live(6, 6, &mut out), LiveOutcome::Held);
        m.start(Plan::Live { after: 2 }, &mut out);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 2, until: 5 })
        );
    }

    /// A page that skips a seq is a gap at once, even when the seq after
    /// the hole is the range's last.
    #[test]
    fn a_hole_in_a_page_is_a_gap_at_once() {
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::Replay { after: 0, until: 3 }, &mut out);
        assert_eq!(
            m.on_history([(1, 1), (3, 3)], &mut out),
            Err(Gap { after: 1 })
        );
        assert_eq!(out, vec![1]);
    }

    /// A reloaded page: the open runs up to the resume point, then history
    /// after it, then live — each seq once, held live events merged.
    #[test]
    fn runs_then_replay_for_a_reloaded_page() {
        let p = pos("e", 1, 8);
        let d = decide_join(&p, Some(("e", 5)), true);
        assert_eq!((d.resumed, d.reset), (true, false));
        assert_eq!(d.plan, Plan::RunsThenReplay { after: 5, until: 8 });
        assert_eq!(
            decide_join(&p, Some(("e", 0)), true).plan,
            Plan::Replay { after: 0, until: 8 },
            "from 0 the history holds the runs already"
        );
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        assert_eq!(m.on_live(9, 9, &mut out), LiveOutcome::Held);
        m.start(d.plan, &mut out);
        assert_eq!(m.wants_history(), Some(HistoryRequest::Runs { until: 5 }));
        // The open run's events up to 5 (not contiguous by nature).
        m.on_runs([2, 4], &mut out);
        assert_eq!(
            m.wants_history(),
            Some(HistoryRequest::Range { after: 5, until: 8 })
        );
        m.on_history([(6, 6), (7, 7), (8, 8)], &mut out).unwrap();
        assert!(m.is_live());
        assert_eq!(out, vec![2, 4, 6, 7, 8, 9]);
        // Resumed at the stream's end: the runs, then live.
        let mut m: Merge<u64> = Merge::joining();
        let mut out = Vec::new();
        m.start(Plan::RunsThenReplay { after: 8, until: 8 }, &mut out);
        m.on_runs([3], &mut out);
        assert!(m.is_live());
        assert_eq!(out, vec![3]);
    }
}
