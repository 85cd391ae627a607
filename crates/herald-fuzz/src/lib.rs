//! Herald's fuzz targets, as plain functions of the input bytes. Each one
//! panics when the code under test breaks a rule it must keep, so a crash
//! found by the fuzzer is a bug, and each is replayed over the committed
//! corpus by `cargo test` on stable Rust (`tests/corpus.rs`), so a regression
//! fails CI without nightly.
//!
//! - [`frame`]: the client frame parser and the per-state inbound decision.
//! - [`hello_jwt`]: a hello carrying a token, through the frame parser and the
//!   JWT verifier.
//! - [`publish_body`]: the validation of `POST /api/v1/events` bodies.
//! - [`lifecycle`]: the sans-IO connection state machine under an arbitrary
//!   sequence of operations, asserting I1 and I2.
//! - [`catchup`]: the merge-by-seq catch-up against a model stream with late,
//!   duplicated and lost deliveries and evictions, asserting I3.
//!
//! The cargo-fuzz harness is `fuzz/` at the workspace root (nightly).

// A fuzz target reports a broken rule by panicking: asserts and unwraps on
// results the rule guarantees are the point here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::auth::{AuthError, Verifier};
use herald_core::catchup::{HistoryRequest, LiveOutcome, Merge, Plan, StreamPosition, decide_join};
use herald_core::protocol::{
    ClientFrame, FrameError, Limits, is_valid_event_name, parse_client_frame,
};
use herald_core::session::{Inbound, on_text};
use herald_core::{
    CloseInfo, CloseReason, Connection, Initiator, LifecycleConfig, State, Transmit,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The HS256 secret the hello target's verifier accepts.
const SECRET: &str = "fuzz-secret-0123456789-abcdefghijklmnop";
/// A secret the verifier does not accept.
const WRONG_SECRET: &str = "another-secret-0123456789-abcdefghijkl";

/// Reads the input a byte at a time; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The client frame parser: never a panic; JSON-level failures classified
/// as an independent parse says; an accepted frame within every limit; a
/// field error names the frame's own type. Every state's decision too.
pub fn frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    for state in [
        State::Handshaking,
        State::Ready,
        State::Closing,
        State::Closed,
    ] {
        let _ = on_text(state, text, &limits);
    }
    let parsed = parse_client_frame(text, &limits);
    // The first step, decided independently.
    let value = match serde_json::from_str::<Value>(text) {
        Err(_) => {
            assert_eq!(parsed, Err(FrameError::NotJson), "{text:?}");
            return;
        }
        Ok(v) => v,
    };
    let Some(obj) = value.as_object() else {
        assert_eq!(parsed, Err(FrameError::NotObject), "{text:?}");
        return;
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        assert_eq!(parsed, Err(FrameError::MissingType), "{text:?}");
        return;
    };
    match parsed {
        Ok(frame) => check_limits(&frame, &limits, kind),
        Err(FrameError::InvalidField { kind: k, field, .. }) => {
            assert_eq!(k, kind, "the error names another frame type");
            assert!(!field.is_empty());
        }
        Err(e) => panic!("{e:?} for a JSON object with a string type: {text:?}"),
    }
}

fn check_limits(frame: &ClientFrame, limits: &Limits, kind: &str) {
    let within = |s: &str, max: usize| assert!(s.len() <= max, "{} bytes over {max}", s.len());
    match frame {
        ClientFrame::Hello(h) => {
            assert_eq!(kind, "hello");
            if let Some(t) = &h.token {
                within(t, limits.max_token_bytes);
            }
            if let Some(r) = &h.resume {
                within(&r.epoch, limits.max_epoch_bytes);
            }
        }
        ClientFrame::UserMessage(m) => {
            assert_eq!(kind, "user_message");
            within(&m.id, limits.max_id_bytes);
            within(&m.thread_id, limits.max_id_bytes);
            within(&m.text, limits.max_text_bytes);
            if let Some(stream) = &m.stream {
                shared(stream);
            }
        }
        ClientFrame::Subscribe(sub) => {
            assert_eq!(kind, "subscribe");
            shared(&sub.stream);
            if let Some(r) = &sub.resume {
                within(&r.epoch, limits.max_epoch_bytes);
            }
        }
        ClientFrame::Unsubscribe { stream } => {
            assert_eq!(kind, "unsubscribe");
            shared(stream);
        }
        ClientFrame::Typing { stream } => {
            assert_eq!(kind, "typing");
            shared(stream);
        }
        ClientFrame::Presence { stream } => {
            assert_eq!(kind, "presence");
            shared(stream);
        }
        ClientFrame::Cancel { run_id, stream } => {
            if let Some(stream) = stream {
                shared(stream);
            }
            assert_eq!(kind, "cancel");
            within(run_id, limits.max_id_bytes);
        }
        ClientFrame::Refresh { token } => {
            assert_eq!(kind, "refresh");
            within(token, limits.max_token_bytes);
        }
        ClientFrame::Ack { .. } => assert_eq!(kind, "ack"),
        ClientFrame::Ping => assert_eq!(kind, "ping"),
        ClientFrame::Unknown { kind: k } => {
            assert_eq!(k, kind);
            assert!(
                ![
                    "hello",
                    "user_message",
                    "cancel",
                    "refresh",
                    "ack",
                    "ping",
                    "subscribe",
                    "unsubscribe",
                    "typing",
                    "presence"
                ]
                .contains(&k.as_str()),
                "a known type parsed as unknown"
            );
        }
    }
}

/// A shared stream name that parsed: 1–200 bytes of the allowed set, with a
/// namespace, never a user's own stream.
fn shared(stream: &str) {
    assert!(!stream.is_empty() && stream.len() <= 200, "{stream:?}");
    assert!(
        stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b)),
        "{stream:?}"
    );
    assert!(
        !stream.starts_with("user:") && stream.contains(':'),
        "{stream:?}"
    );
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let config = herald::Config::for_tests(SECRET, "fuzz-api-key-0123456789");
        Verifier::from_config(&config).unwrap()
    })
}

fn sign(secret: &str, header: &[u8], claims: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A hello whose token is built from the input — raw text, or a header and
/// claims signed with the right or a wrong secret — goes through the frame
/// parser and the verifier. A token is accepted only when it is signed with
/// the secret, says HS256, and carries a valid `sub` and a future `exp`; a
/// well-formed one with a good `sub` always is.
pub fn hello_jwt(data: &[u8]) {
    let mut input = Bytes(data);
    let mode = input.byte() % 4;
    let rest = input.0;
    let (token, signed, standard_sub) = match mode {
        0 => (String::from_utf8_lossy(rest).into_owned(), false, None),
        1 | 2 => {
            let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let (header, claims) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
            let secret = if mode == 1 { SECRET } else { WRONG_SECRET };
            (sign(secret, header, claims), mode == 1, None)
        }
        _ => {
            let sub = String::from_utf8_lossy(rest).into_owned();
            let claims = serde_json::json!({"sub": sub, "exp": unix_now() + 3600});
            let token = sign(
                SECRET,
                br#"{"alg":"HS256","typ":"JWT"}"#,
                claims.to_string().as_bytes(),
            );
            (token, true, Some(sub))
        }
    };
    let limits = Limits::default();
    let hello = serde_json::json!({"type": "hello", "token": token}).to_string();
    let token = match on_text(State::Handshaking, &hello, &limits) {
        Inbound::Hello(h) => {
            let t = h.token.expect("the hello's token");
            assert_eq!(t, token);
            t
        }
        // Too long for the frame's limit: refused before the verifier.
        Inbound::Close(info) if token.len() > limits.max_token_bytes => {
            assert_eq!(info.reason, CloseReason::Unauthorized, "{info:?}");
            return;
        }
        other => panic!("a hello frame decided {other:?}"),
    };
    let now = unix_now();
    let result = verifier().verify(&token);
    if let Some(sub) = standard_sub {
        let good = !sub.is_empty() && sub.len() <= limits.max_sub_bytes;
        match &result {
            Ok(claims) => {
                assert!(good, "an invalid sub accepted: {sub:?}");
                assert_eq!(claims.sub, sub);
            }
            Err(e) => {
                assert!(!good, "a good token refused: {e}");
                assert!(
                    matches!(e, AuthError::InvalidSub | AuthError::TooLong),
                    "{e}"
                );
            }
        }
        return;
    }
    if let Ok(claims) = result {
        assert!(
            signed,
            "a token not signed with the secret was accepted: {token:?}"
        );
        let header = token.split('.').next().unwrap();
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        assert!(!claims.sub.is_empty() && claims.sub.len() <= limits.max_sub_bytes);
        assert!(claims.exp >= now, "an expired token accepted");
    }
}

/// `POST /api/v1/events` bodies: never a panic; accepted events within the
/// API's limits; refusals are 400 or 413 with a code, and a body that is not
/// JSON is `invalid_json`.
pub fn publish_body(data: &[u8]) {
    match herald::fuzzing::publish_body(data) {
        Ok(events) => {
            // An empty batch is a no-op answered `{"results":[]}`.
            assert!(events.len() <= 1000);
            for (user, event, data_len) in events {
                assert!(!user.is_empty() && user.len() <= 256);
                assert!(is_valid_event_name(&event), "{event:?}");
                assert!(data_len <= 64 * 1024);
            }
        }
        Err(refusal) => {
            assert!(matches!(refusal.status, 400 | 413), "{refusal:?}");
            assert!(!refusal.code.is_empty());
            if serde_json::from_slice::<Value>(data).is_err() {
                assert_eq!(refusal.code, "invalid_json");
            }
        }
    }
}

/// What crossed the wire, as the peer sees it.
#[derive(Debug, PartialEq)]
enum Wire {
    Data(String),
    Ping,
    CloseSent,
    CloseReceived,
}

/// The lifecycle under an arbitrary sequence of operations (hello, sends,
/// replays, writer steps, inbound traffic, client and server closes,
/// transport errors, time, token expiry): nothing is written after a close
/// frame in either direction and at most one close frame is written (I1);
/// the cleanup token is handed out exactly once (I2); data is written in the
/// order it was accepted.
pub fn lifecycle(data: &[u8]) {
    let t0 = Instant::now();
    let mut now = t0;
    let cfg = LifecycleConfig {
        hello_timeout: Duration::from_millis(5000),
        close_timeout: Duration::from_millis(1500),
        max_queue_frames: 8,
        max_queue_bytes: 64,
        heartbeat_interval: Duration::from_millis(700),
        heartbeat_timeout: Duration::from_millis(2500),
        coalesce: true,
    };
    let mut conn: Connection<String> = Connection::new(now, cfg);
    let _ = conn.join();
    let gone = || CloseInfo::new(CloseReason::PeerGone, Initiator::Client, "eof");
    let mut wire = Vec::new();
    // The welcome and replayed frames come first, then the live ones.
    let mut replayed = Vec::new();
    let mut accepted = Vec::new();
    let mut tokens = 0;
    let mut next = 0u32;
    let mut seq = 2u64;
    let mut last_state = conn.state();
    let mut input = Bytes(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 400 {
        steps += 1;
        let op = input.byte();
        match op % 12 {
            0 => {
                let plan = if op & 0x10 != 0 {
                    Plan::Replay { after: 0, until: 1 }
                } else {
                    Plan::Live { after: 1 }
                };
                if conn.authenticate(now, "welcome".to_owned(), plan).is_ok() {
                    replayed.push("welcome".to_owned());
                }
            }
            1 => {
                if conn.wants_history().is_some() {
                    let frame = format!("r{next}");
                    next += 1;
                    if conn.push_history([(1, frame.clone())]).is_ok() {
                        replayed.push(frame);
                    }
                }
            }
            2 | 3 => {
                let frame = format!("f{next}");
                next += 1;
                if conn.send_event(now, seq, frame.clone()).is_ok() {
                    accepted.push(frame);
                    seq += 1;
                }
            }
            4 | 5 => match conn.poll_transmit() {
                Some(Transmit::Frame(f)) => wire.push(Wire::Data(f)),
                Some(Transmit::Ping) => wire.push(Wire::Ping),
                Some(Transmit::Close { .. }) => wire.push(Wire::CloseSent),
                None => {}
            },
            6 => {
                if !wire.contains(&Wire::CloseReceived) && conn.state() != State::Closed {
                    wire.push(Wire::CloseReceived);
                    let code = match input.byte() % 3 {
                        0 => None,
                        1 => Some(1000),
                        _ => Some(3000 + u16::from(input.byte())),
                    };
                    conn.on_close_received(now, code);
                    assert_eq!(conn.queue_len(), 0, "a queue kept after a received close");
                }
            }
            7 => {
                if conn.on_transport_closed(gone()).is_some() {
                    tokens += 1;
                }
            }
            8 => {
                now += Duration::from_millis(u64::from(input.byte()) * 20);
                conn.handle_timeout(now);
                if conn.should_drop_transport() && conn.on_transport_closed(gone()).is_some() {
                    tokens += 1;
                }
            }
            9 => {
                let reason = CloseReason::ALL[usize::from(input.byte()) % CloseReason::ALL.len()];
                conn.close(
                    now,
                    CloseInfo::new(reason, Initiator::Server, reason.as_str()),
                );
            }
            10 => conn.on_inbound(now),
            _ => conn.set_token_expiry(Some(
                now + Duration::from_millis(u64::from(input.byte()) * 20),
            )),
        }
        assert!(conn.state() >= last_state, "a state moved backwards");
        last_state = conn.state();
        assert!(tokens <= 1, "the cleanup token was handed out twice");
    }
    // The I/O layer always ends by writing what it may and closing the transport.
    while let Some(t) = conn.poll_transmit() {
        wire.push(match t {
            Transmit::Frame(f) => Wire::Data(f),
            Transmit::Ping => Wire::Ping,
            Transmit::Close { .. } => Wire::CloseSent,
        });
    }
    if conn.on_transport_closed(gone()).is_some() {
        tokens += 1;
    }
    assert_eq!(tokens, 1, "cleanup must run exactly once");
    assert!(conn.on_transport_closed(gone()).is_none());
    if let Some(first) = wire
        .iter()
        .position(|w| matches!(w, Wire::CloseSent | Wire::CloseReceived))
    {
        let after = wire[first..]
            .iter()
            .filter(|w| matches!(w, Wire::Data(_) | Wire::Ping))
            .count();
        assert_eq!(after, 0, "written after a close frame: {wire:?}");
    }
    assert!(
        wire.iter().filter(|w| **w == Wire::CloseSent).count() <= 1,
        "two close frames"
    );
    // Written data is a prefix of: the welcome, the replayed frame, then the
    // accepted live frames — in order, no duplicate, no gap.
    let expected: Vec<String> = replayed.into_iter().chain(accepted).collect();
    let written: Vec<String> = wire
        .into_iter()
        .filter_map(|w| match w {
            Wire::Data(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(
        written.len() <= expected.len(),
        "{written:?} / {expected:?}"
    );
    assert_eq!(
        written[..],
        expected[..written.len()],
        "written out of order"
    );
}

/// The merge-by-seq catch-up against a model stream (seqs `1..=last`,
/// history `first..=last`): whatever the order of publishes, evictions, the
/// position read, history pages and live deliveries (late, twice, lost),
/// what is handed over is every seq after the start point once, in order —
/// or a gap is reported, and only when history lost an event it needed (I3).
pub fn catchup(data: &[u8]) {
    let mut input = Bytes(data);
    let pre = u64::from(input.byte() % 16);
    let mut m = CatchupModel {
        last: pre,
        first: u64::from(input.byte() % 16).min(pre) + 1,
        resume: pre.saturating_sub(u64::from(input.byte() % 18)),
        page: usize::from(input.byte() % 5) + 1,
        merge: Merge::joining(),
        pending: VecDeque::new(),
        out: Vec::new(),
        start: None,
        max_delivered: 0,
        gap: false,
    };
    // 0 publish, 1 publish lost, 2 evict, 3 deliver, 4 deliver twice,
    // 5 position, 6 read a page.
    let mut steps = 0;
    while !input.is_empty() && steps < 400 && !m.gap {
        steps += 1;
        m.step(input.byte() % 7);
    }
    // Let the rest arrive: the position, every pending delivery, every page.
    if !m.gap {
        m.step(5);
        while !m.gap && (!m.pending.is_empty() || m.merge.wants_history().is_some()) {
            m.step(if m.merge.wants_history().is_some() {
                6
            } else {
                3
            });
        }
    }
    let s = m.start.expect("the position was read");
    let expected: Vec<u64> = (s + 1..=s + m.out.len() as u64).collect();
    assert_eq!(m.out, expected, "not every seq once, in order, from {s}");
    if !m.gap {
        assert!(m.merge.is_live());
        assert!(m.merge.sent() >= m.max_delivered.max(s));
        assert_eq!(m.merge.held(), 0);
    }
}

/// The catch-up target's world: the model stream (seqs `1..=last`, history
/// `first..=last`), the client's resume point, the merge under test and
/// what it handed over.
struct CatchupModel {
    last: u64,
    first: u64,
    resume: u64,
    page: usize,
    merge: Merge<u64>,
    pending: VecDeque<u64>,
    out: Vec<u64>,
    start: Option<u64>,
    max_delivered: u64,
    gap: bool,
}

impl CatchupModel {
    fn step(&mut self, op: u8) {
        match op {
            0 | 1 => {
                self.last += 1;
                if op == 0 {
                    self.pending.push_back(self.last);
                }
            }
            2 => {
                if self.first <= self.last {
                    self.first += 1;
                }
            }
            3 | 4 => {
                let seq = if op == 3 {
                    self.pending.pop_front()
                } else {
                    self.pending.front().copied()
                };
                if let Some(seq) = seq {
                    self.max_delivered = self.max_delivered.max(seq);
                    let outcome = self.merge.on_live(seq, seq, &mut self.out);
                    if let Some(s) = self.start
                        && seq <= s
                    {
                        assert_eq!(outcome, LiveOutcome::Duplicate);
                    }
                }
            }
            5 => {
                if self.start.is_none() {
                    let position = StreamPosition {
                        epoch: "e".into(),
                        last_seq: self.last,
                        first_seq: self.first,
                    };
                    let d = decide_join(&position, Some(("e", self.resume)), false);
                    let after = match d.plan {
                        Plan::Live { after } | Plan::Replay { after, .. } => after,
                        other => panic!("runs were not requested: {other:?}"),
                    };
                    assert_eq!(
                        d.reset,
                        self.resume + 1 < self.first && self.resume < self.last,
                        "reset when the resume point is not gone, or none when it is"
                    );
                    self.start = Some(after);
                    self.merge.start(d.plan, &mut self.out);
                }
            }
            _ => {
                if let Some(HistoryRequest::Range { after, until }) = self.merge.wants_history() {
                    if after < until && self.first > after + 1 {
                        self.gap = true;
                        return;
                    }
                    let events: Vec<(u64, u64)> = (after + 1..=until.min(self.last))
                        .take(self.page)
                        .map(|s| (s, s))
                        .collect();
                    if self.merge.on_history(events, &mut self.out).is_err() {
                        assert!(self.first > after + 1, "a gap reported with history intact");
                        self.gap = true;
                    }
                }
            }
        }
    }
}
