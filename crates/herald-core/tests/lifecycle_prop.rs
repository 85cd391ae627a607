//! Property test: random interleavings of sends, writer steps, client closes,
//! I/O errors, timeouts, kicks and shutdown never write a frame after a close
//! frame (I1) and hand out the cleanup token exactly once (I2).

use std::time::{Duration, Instant};

use herald_core::catchup::Plan;
use herald_core::{
    CloseInfo, CloseReason, Connection, Initiator, LifecycleConfig, State, Transmit,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Authenticate(bool),
    PushReplay,
    Send,
    WriterStep,
    ClientCloseFrame,
    TransportError,
    Advance(u64),
    ServerClose(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => any::<bool>().prop_map(Op::Authenticate),
        2 => Just(Op::PushReplay),
        6 => Just(Op::Send),
        6 => Just(Op::WriterStep),
        1 => Just(Op::ClientCloseFrame),
        1 => Just(Op::TransportError),
        1 => (0u64..3000).prop_map(Op::Advance),
        2 => (0usize..CloseReason::ALL.len()).prop_map(Op::ServerClose),
    ]
}

/// What crossed the wire, in order, as the peer would see it.
#[derive(Debug, PartialEq)]
enum Wire {
    Data(String),
    Ping,
    CloseSent(u16),
    CloseReceived,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn no_write_after_close_and_cleanup_once(ops in proptest::collection::vec(op(), 0..80)) {
        let t0 = Instant::now();
        let mut now = t0;
        let cfg = LifecycleConfig {
            hello_timeout: Duration::from_millis(5000),
            close_timeout: Duration::from_millis(1000),
            max_queue_frames: 8,
            max_queue_bytes: 64,
            heartbeat_interval: Duration::from_millis(700),
            heartbeat_timeout: Duration::from_millis(2500),
        };
        let mut conn: Connection<String> = Connection::new(now, cfg);
        let mut wire = Vec::new();
        let mut accepted = Vec::new();
        let mut replayed: Vec<String> = Vec::new();
        let mut tokens = 0;
        let mut next = 0u32;
        let mut live_seq = 2u64;
        conn.join().unwrap();
        let mut last_state = conn.state();
        let gone = || CloseInfo::new(CloseReason::PeerGone, Initiator::Client, "eof");

        for op in ops {
            match op {
                Op::Authenticate(catching_up) => {
                    // With catching_up, one history event (seq 1) must be replayed first.
                    let plan = if catching_up { Plan::Replay { after: 0, until: 1 } } else { Plan::Live { after: 1 } };
                    if conn.authenticate(now, "welcome".to_owned(), plan).is_ok() {
                        replayed.push("welcome".to_owned());
                    }
                }
                Op::PushReplay => {
                    if conn.wants_history().is_some() {
                        let frame = format!("r{next}");
                        next += 1;
                        if conn.push_history([(1, frame.clone())]).is_ok() {
                            replayed.push(frame);
                        }
                    }
                }
                Op::Send => {
                    // Live events carry seq 2, 3, … (seq 1 is the history event).
                    let frame = format!("f{next}");
                    next += 1;
                    if conn.send_event(now, live_seq, frame.clone()).is_ok() {
                        accepted.push(frame);
                        live_seq += 1;
                    }
                }
                Op::WriterStep => match conn.poll_transmit() {
                    Some(Transmit::Frame(f)) => wire.push(Wire::Data(f)),
                    Some(Transmit::Ping) => wire.push(Wire::Ping),
                    Some(Transmit::Close { code, .. }) => wire.push(Wire::CloseSent(code)),
                    None => {}
                },
                Op::ClientCloseFrame => {
                    // A peer only sends once; the transport surfaces it once.
                    if !wire.contains(&Wire::CloseReceived) && conn.state() != State::Closed {
                        wire.push(Wire::CloseReceived);
                        conn.on_close_received(now, Some(1000));
                    }
                }
                Op::TransportError => {
                    if conn.on_transport_closed(gone()).is_some() {
                        tokens += 1;
                    }
                }
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    conn.handle_timeout(now);
                    if conn.should_drop_transport() && conn.on_transport_closed(gone()).is_some() {
                        tokens += 1;
                    }
                }
                Op::ServerClose(i) => {
                    let reason = CloseReason::ALL[i];
                    conn.close(now, CloseInfo::new(reason, Initiator::Server, reason.as_str()));
                }
            }
            // States only move forward.
            prop_assert!(conn.state() >= last_state);
            last_state = conn.state();
            prop_assert!(tokens <= 1, "cleanup token handed out twice");
        }
        // The I/O layer always ends by closing the transport.
        while let Some(t) = conn.poll_transmit() {
            match t {
                Transmit::Frame(f) => wire.push(Wire::Data(f)),
                Transmit::Ping => wire.push(Wire::Ping),
                Transmit::Close { code, .. } => wire.push(Wire::CloseSent(code)),
            }
        }
        if conn.on_transport_closed(gone()).is_some() {
            tokens += 1;
        }
        prop_assert_eq!(tokens, 1, "cleanup must run exactly once");
        prop_assert_eq!(conn.on_transport_closed(gone()), None);

        // I1: nothing after the first close frame, in either direction.
        if let Some(first_close) = wire.iter().position(|w| matches!(w, Wire::CloseSent(_) | Wire::CloseReceived)) {
            let after_data = wire[first_close..].iter().filter(|w| matches!(w, Wire::Data(_) | Wire::Ping)).count();
            prop_assert_eq!(after_data, 0, "data written after close: {:?}", wire);
        }
        let closes_sent = wire.iter().filter(|w| matches!(w, Wire::CloseSent(_))).count();
        prop_assert!(closes_sent <= 1, "close frame written twice: {:?}", wire);
        // Written data is a prefix of: welcome, the replayed frames, then the
        // accepted live frames — in order, no duplicates, no gap.
        let accepted: Vec<String> = replayed.into_iter().chain(accepted).collect();
        let written: Vec<_> = wire.iter().filter_map(|w| match w { Wire::Data(d) => Some(d.clone()), _ => None }).collect();
        prop_assert!(written.len() <= accepted.len());
        prop_assert_eq!(&accepted[..written.len()], &written[..]);
        prop_assert_eq!(conn.state(), State::Closed);
    }
}
