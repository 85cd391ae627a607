//! Property test: random interleavings of sends, replays, writer steps (the
//! actor's `poll_transmit` and a publisher's `poll_frame`),
//! inbound traffic, client closes (with and without a code), I/O errors, time
//! passing, token expiry, kicks and shutdown:
//! - never write a frame after a close frame (I1) and hand out the cleanup
//!   token exactly once (I2);
//! - write frames in the order they were accepted, with no gap;
//! - on an orderly close (kick, shutdown, token expiry, capacity) write every
//!   frame queued at the decision before the close frame, unless the client
//!   closed, the transport broke or the close deadline passed first; on any
//!   other close drop the queue at once;
//! - close for the reason that fired first: token expiry before the heartbeat
//!   timeout, the heartbeat timeout only after a silence that long.

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
    /// A publisher writing directly: data only, the rest left to the actor.
    PublisherStep,
    ClientCloseFrame(Option<u16>),
    TransportError,
    Advance(u64),
    ServerClose(usize),
    Inbound,
    TokenExpiresIn(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => any::<bool>().prop_map(Op::Authenticate),
        2 => Just(Op::PushReplay),
        6 => Just(Op::Send),
        4 => Just(Op::WriterStep),
        4 => Just(Op::PublisherStep),
        1 => proptest::option::of(prop_oneof![Just(1000u16), Just(1001), 3000u16..5000]).prop_map(Op::ClientCloseFrame),
        1 => Just(Op::TransportError),
        2 => (0u64..3000).prop_map(Op::Advance),
        2 => (0usize..CloseReason::ALL.len()).prop_map(Op::ServerClose),
        2 => Just(Op::Inbound),
        1 => (0u64..4000).prop_map(Op::TokenExpiresIn),
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
            close_timeout: cfg_close_timeout(),
            max_queue_frames: 8,
            max_queue_bytes: 64,
            heartbeat_interval: Duration::from_millis(700),
            heartbeat_timeout: Duration::from_millis(2500),
            coalesce: true,
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
        // Model of the timers: last inbound frame, token expiry.
        let mut last_inbound = t0;
        let mut token_expiry: Option<Instant> = None;
        // An orderly close: when it was decided and how many data frames must
        // be on the wire before its close frame (None once excused).
        let mut flushing: Option<(Instant, Option<usize>)> = None;

        for op in ops {
            let data_written = wire.iter().filter(|w| matches!(w, Wire::Data(_))).count();
            let bytes_before = conn.queued_bytes();
            let state_before = conn.state();
            match op {
                Op::Authenticate(catching_up) => {
                    // With catching_up, one history event (seq 1) must be replayed first.
                    let plan = if catching_up { Plan::Replay { after: 0, until: 1 } } else { Plan::Live { after: 1 } };
                    if conn.authenticate(now, "welcome".to_owned(), plan).is_ok() {
                        replayed.push("welcome".to_owned());
                        last_inbound = now;
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
                Op::PublisherStep => match conn.poll_frame() {
                    Some(f) => wire.push(Wire::Data(f)),
                    // What the publisher leaves is exactly what only the
                    // actor can write: a ping or the close, when one is due.
                    None => {
                        let due = conn.control_due();
                        match conn.poll_transmit() {
                            Some(Transmit::Frame(f)) => prop_assert!(false, "poll_frame left a frame: {f}"),
                            Some(Transmit::Ping) => { prop_assert!(due); wire.push(Wire::Ping) }
                            Some(Transmit::Close { code, .. }) => { prop_assert!(due); wire.push(Wire::CloseSent(code)) }
                            None => prop_assert!(!due, "control_due without a control frame"),
                        }
                    }
                },
                Op::ClientCloseFrame(code) => {
                    // A peer only sends once; the transport surfaces it once.
                    if !wire.contains(&Wire::CloseReceived) && conn.state() != State::Closed {
                        wire.push(Wire::CloseReceived);
                        conn.on_close_received(now, code);
                        if let Some((_, promised)) = &mut flushing { *promised = None; }
                        if matches!(state_before, State::Handshaking | State::Ready) {
                            let info = conn.close_info().expect("a close frame decides the close");
                            prop_assert_eq!(info.reason, CloseReason::ClientClose);
                            prop_assert_eq!(info.code, code.unwrap_or(1005), "an empty close frame is 1005");
                        }
                        prop_assert_eq!(conn.queue_len(), 0, "nothing is written after a received close");
                    }
                }
                Op::TransportError => {
                    if conn.on_transport_closed(gone()).is_some() {
                        tokens += 1;
                    }
                    if let Some((_, promised)) = &mut flushing { *promised = None; }
                }
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    conn.handle_timeout(now);
                    if let Some((at, promised)) = &mut flushing
                        && now >= *at + cfg_close_timeout()
                    {
                        *promised = None;
                    }
                    if state_before == State::Ready {
                        let expired = token_expiry.is_some_and(|t| now >= t);
                        let silent = now >= last_inbound + Duration::from_millis(2500);
                        let reason = conn.close_info().map(|i| i.reason);
                        if expired {
                            prop_assert_eq!(reason, Some(CloseReason::TokenExpired));
                        } else if silent {
                            prop_assert_eq!(reason, Some(CloseReason::HeartbeatTimeout));
                        } else {
                            prop_assert_eq!(conn.state(), State::Ready, "closed with no timer due");
                        }
                    }
                    if conn.should_drop_transport() && conn.on_transport_closed(gone()).is_some() {
                        tokens += 1;
                    }
                }
                Op::ServerClose(i) => {
                    let reason = CloseReason::ALL[i];
                    let decided = conn.close(now, CloseInfo::new(reason, Initiator::Server, reason.as_str()));
                    prop_assert_eq!(decided, matches!(state_before, State::Handshaking | State::Ready));
                }
                Op::Inbound => {
                    conn.on_inbound(now);
                    last_inbound = now;
                }
                Op::TokenExpiresIn(ms) => {
                    let at = now + Duration::from_millis(ms);
                    conn.set_token_expiry(Some(at));
                    token_expiry = Some(at);
                }
            }
            // A close decided by this step: orderly closes keep the queue for
            // the writer, the others drop it.
            if matches!(state_before, State::Handshaking | State::Ready) && conn.state() == State::Closing {
                let reason = conn.close_info().expect("closing has a reason").reason;
                if reason.flushes_queue() && !wire.contains(&Wire::CloseReceived) {
                    prop_assert_eq!(conn.queued_bytes(), bytes_before, "an orderly close dropped queued frames");
                    flushing = Some((now, Some(data_written + conn.queue_len())));
                } else {
                    prop_assert_eq!(conn.queue_len(), 0, "{:?} kept its queue", reason);
                    prop_assert_eq!(conn.queued_bytes(), 0);
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
        // An orderly close wrote its whole queue, then the close frame.
        if let Some((_, Some(promised))) = flushing {
            prop_assert_eq!(written.len(), promised, "orderly close lost queued frames: {:?}", wire);
            prop_assert!(matches!(wire.last(), Some(Wire::CloseSent(_))), "no close frame after the flush: {:?}", wire);
        }
        prop_assert_eq!(conn.state(), State::Closed);
    }
}

/// The close timeout of the configuration above.
fn cfg_close_timeout() -> Duration {
    Duration::from_millis(1000)
}
