//! Property test of the stream logic against a simple model: random publishes
//! (some in agent runs), evictions, time passing and resumes.
//!
//! Checked after every step:
//! - a resume the stream accepts replays exactly the model's events after the
//!   resume point, in order (no gap, no duplicate) — and a resume it refuses is
//!   one it truly cannot serve (fail closed, never a silent skip);
//! - the open runs' events are all still there, from their first event.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_core::stream::{EventMeta, ResumeDecision, Stream, StreamLimits};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish { run: Option<u8>, close: bool },
    EvictFront,
    Advance(u64),
    Resume(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (proptest::option::of(0u8..3), any::<bool>()).prop_map(|(run, close)| Op::Publish { run, close }),
        1 => Just(Op::EvictFront),
        1 => (0u64..40).prop_map(Op::Advance),
        3 => (0u64..60).prop_map(Op::Resume),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]
    #[test]
    fn stream_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let t0 = Instant::now();
        let mut now = t0;
        let limits = StreamLimits { max_events: 8, max_age: Duration::from_secs(30), ..StreamLimits::default() };
        let mut s: Stream<String> = Stream::new("ep", now);
        // Model: every event ever published, and the open runs with their seqs.
        let mut all: Vec<String> = Vec::new();
        let mut open: BTreeMap<String, Vec<u64>> = BTreeMap::new();

        for op in ops {
            match op {
                Op::Publish { run, close } => {
                    let run_id = run.map(|r| format!("r{r}"));
                    let event = match (&run_id, close) {
                        (Some(_), true) => "agent_completed",
                        (Some(r), false) if !open.contains_key(r) => "agent_started",
                        (Some(_), false) => "agent_thinking",
                        (None, _) => "note",
                    };
                    let meta = EventMeta { event: event.into(), run_id: run_id.clone(), thread_id: None };
                    let seq = s.append(now, &meta, None, &limits, |q| format!("e{q}")).seq();
                    prop_assert_eq!(seq, all.len() as u64 + 1);
                    all.push(format!("e{seq}"));
                    if let Some(r) = run_id {
                        if close { open.remove(&r); } else { open.entry(r).or_default().push(seq); }
                    }
                }
                Op::EvictFront => { s.evict_front(); }
                Op::Advance(secs) => {
                    now += Duration::from_secs(secs);
                    s.evict_expired(now, &limits);
                }
                Op::Resume(at) => {
                    let last = s.last_seq();
                    match s.check_resume("ep", at) {
                        ResumeDecision::Resume { after } => {
                            prop_assert_eq!(after, at);
                            let got = s.read(at, last, usize::MAX).expect("accepted resume must be readable");
                            prop_assert_eq!(&got[..], &all[at as usize..last as usize]);
                        }
                        ResumeDecision::Reset => {
                            // Refused only when it cannot be served.
                            prop_assert!(at > last || s.read(at, last, usize::MAX).is_err(),
                                "resume from {} refused although history holds it", at);
                        }
                    }
                }
            }
            let last = s.last_seq();
            // Every event of every open run is kept.
            let mut want: Vec<u64> = open.values().flatten().copied().collect();
            want.sort();
            let want: Vec<String> = want.iter().map(|q| format!("e{q}")).collect();
            prop_assert_eq!(s.active_run_events(0, last), want);
        }
    }
}
