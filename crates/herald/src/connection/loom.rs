//! Model checking of the connection handle with loom: every interleaving of
//! the real [`ConnShared`] (its mutex, its wake-up, the lifecycle behind
//! them) when publishers, a kick, a transport failure and the actor act at
//! once. The actor is modelled by its loop — write what the lifecycle
//! releases, wait for a wake-up, hand out the cleanup token when the
//! transport ends — on the handle's real operations.
//!
//! Run (a separate target dir, since the cfg rebuilds everything):
//! `RUSTFLAGS="--cfg herald_loom" CARGO_TARGET_DIR=target/loom cargo test -p herald --lib --release connection::loom`
//!
//! Checked in every interleaving:
//! - I1: nothing is written after the close frame, and a send after the
//!   close decision is refused;
//! - I2: the cleanup token is handed out exactly once, whoever ends the
//!   transport first;
//! - I3: live events racing the catch-up reach the wire once each, in seq
//!   order, after the replayed history;
//! - no lost wake-up: the actor never sleeps while something is queued for
//!   it (loom reports a deadlock if it does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ::loom::sync::Arc;
use ::loom::thread;

use super::*;
use herald_core::catchup::{HistoryRequest, Plan};
use herald_core::{CloseReason, Initiator, Transmit};

/// Explore every interleaving of `f` (within `LOOM_MAX_PREEMPTIONS`, if
/// set) and print how many executions that took.
fn check(name: &str, f: impl Fn() + Sync + Send + 'static) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    RUNS.store(0, std::sync::atomic::Ordering::SeqCst);
    let builder = ::loom::model::Builder::new();
    let bound = builder.preemption_bound;
    builder.check(move || {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f()
    });
    println!(
        "loom: {name}: {} interleavings explored (preemption bound {bound:?})",
        RUNS.load(std::sync::atomic::Ordering::SeqCst)
    );
}

fn cfg() -> LifecycleConfig {
    LifecycleConfig::default()
}

fn frame(s: &str) -> OutFrame {
    OutFrame::from(s.to_owned())
}

fn text(f: &OutFrame) -> String {
    f.as_text().unwrap_or_default().to_owned()
}

/// What the actor wrote, in order.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Wire {
    Data(String),
    Close(u16),
}

/// A connection welcomed and live after seq 0.
fn ready() -> Arc<ConnShared> {
    let conn = Arc::new(ConnShared::new(1, cfg()));
    conn.with_core(|c| {
        c.join().unwrap();
        c.authenticate(
            crate::clock::now(),
            frame("welcome"),
            Plan::Live { after: 0 },
        )
        .unwrap();
    });
    conn
}

/// The actor's loop until it wrote the close frame: write what the
/// lifecycle releases, else sleep until woken.
fn actor_until_close(conn: &ConnShared, wire: &mut Vec<Wire>) {
    loop {
        while let Some(t) = conn.with_core(|c| c.poll_transmit()) {
            match t {
                Transmit::Frame(f) => wire.push(Wire::Data(text(&f))),
                Transmit::Ping => {}
                Transmit::Close { code, .. } => {
                    wire.push(Wire::Close(code));
                    return;
                }
            }
        }
        conn.woken_blocking();
    }
}

fn gone() -> CloseInfo {
    CloseInfo::new(CloseReason::PeerGone, Initiator::Client, "eof")
}

/// A publisher's two events race a kick: every event accepted before the
/// kick's decision is written before the close frame (a kick flushes), none
/// after it, and the actor is never left asleep with work queued.
#[test]
fn sends_racing_a_kick_are_flushed_or_refused_never_written_after_close() {
    check(
        "sends_racing_a_kick_are_flushed_or_refused_never_written_after_close",
        || {
            let conn = ready();
            let publisher = {
                let conn = conn.clone();
                thread::spawn(move || {
                    let mut accepted = Vec::new();
                    for seq in 1..=2u64 {
                        if let Ok(LiveOutcome::Delivered) =
                            conn.send_event(seq, frame(&format!("e{seq}")))
                        {
                            accepted.push(format!("e{seq}"));
                        }
                    }
                    accepted
                })
            };
            let kicker = {
                let conn = conn.clone();
                thread::spawn(move || {
                    conn.close(CloseInfo::new(
                        CloseReason::Kicked,
                        Initiator::Server,
                        "kicked",
                    ))
                })
            };
            let mut wire = Vec::new();
            actor_until_close(&conn, &mut wire);
            let accepted = publisher.join().unwrap();
            assert!(kicker.join().unwrap(), "the kick decided the close");
            // I1: the close frame is last; a send after the decision was refused.
            assert_eq!(wire.last(), Some(&Wire::Close(CloseReason::Kicked.code())));
            let data: Vec<String> = wire
                .iter()
                .filter_map(|w| match w {
                    Wire::Data(d) => Some(d.clone()),
                    Wire::Close(_) => None,
                })
                .collect();
            // The welcome, then exactly the accepted events, in order.
            let mut expected = vec!["welcome".to_owned()];
            expected.extend(accepted);
            assert_eq!(data, expected);
            assert_eq!(
                conn.with_core(|c| c.send(crate::clock::now(), frame("late"))),
                Err(SendRefused::Closing)
            );
        },
    );
}

/// A kick and a shutdown race each other, a publish and the actor: exactly
/// one of them decides the close, the close frame carries its code, and the
/// actor, ending the transport, gets the cleanup token exactly once.
#[test]
fn one_close_wins_and_the_cleanup_token_is_handed_out_once() {
    check(
        "one_close_wins_and_the_cleanup_token_is_handed_out_once",
        || {
            let conn = ready();
            let closer = |reason: CloseReason| {
                let conn = conn.clone();
                thread::spawn(move || {
                    conn.close(CloseInfo::new(reason, Initiator::Server, reason.as_str()))
                })
            };
            let kick = closer(CloseReason::Kicked);
            let shutdown = closer(CloseReason::Shutdown);
            let publisher = {
                let conn = conn.clone();
                thread::spawn(move || {
                    let _ = conn.send_event(1, frame("e1"));
                })
            };
            let mut wire = Vec::new();
            actor_until_close(&conn, &mut wire);
            let first = conn.with_core(|c| c.on_transport_closed(gone()));
            let second = conn.with_core(|c| c.on_transport_closed(gone()));
            let (kicked, shut) = (kick.join().unwrap(), shutdown.join().unwrap());
            publisher.join().unwrap();
            assert!(
                kicked ^ shut,
                "exactly one close decides: kick {kicked}, shutdown {shut}"
            );
            let winner = if kicked {
                CloseReason::Kicked
            } else {
                CloseReason::Shutdown
            };
            assert_eq!(wire.last(), Some(&Wire::Close(winner.code())));
            let token = first.expect("the actor gets the cleanup token");
            assert_eq!(token.reason, winner);
            assert!(second.is_none(), "a second cleanup token");
            assert_eq!(conn.state(), State::Closed);
        },
    );
}

/// I3 under concurrency: the stream holds seqs 1..=2 when the connection
/// joins; the broker delivers 3 and 4 live while the actor authenticates and
/// replays 1..=2 from history. The wire carries the welcome, then 1, 2, 3, 4
/// — each once, in order — whatever the interleaving.
#[test]
fn live_events_racing_the_catch_up_arrive_once_in_order() {
    check(
        "live_events_racing_the_catch_up_arrive_once_in_order",
        || {
            let conn = Arc::new(ConnShared::new(1, cfg()));
            conn.with_core(|c| c.join().unwrap());
            let broker = {
                let conn = conn.clone();
                thread::spawn(move || {
                    for seq in 3..=4u64 {
                        conn.send_event(seq, frame(&format!("e{seq}"))).unwrap();
                    }
                })
            };
            // The actor: the position read said last_seq = 2, resume from 0.
            conn.with_core(|c| {
                c.authenticate(
                    crate::clock::now(),
                    frame("welcome"),
                    Plan::Replay { after: 0, until: 2 },
                )
                .unwrap()
            });
            let mut wire = Vec::new();
            while wire.len() < 5 {
                while let Some(t) = conn.with_core(|c| c.poll_transmit()) {
                    if let Transmit::Frame(f) = t {
                        wire.push(text(&f));
                    }
                }
                if let Some(HistoryRequest::Range { after, until }) =
                    conn.with_core(|c| c.wants_history())
                {
                    let page: Vec<(u64, OutFrame)> = (after + 1..=until.min(2))
                        .map(|s| (s, frame(&format!("e{s}"))))
                        .collect();
                    conn.with_core(|c| c.push_history(page)).unwrap();
                    continue;
                }
                if wire.len() < 5 {
                    conn.woken_blocking();
                }
            }
            broker.join().unwrap();
            assert_eq!(wire, ["welcome", "e1", "e2", "e3", "e4"]);
        },
    );
}
