//! Property tests of the client frame parser.
//!
//! - Valid frames of every type, with fields of every length up to each limit
//!   (exactly at the limit too), round-trip: serialized, parsed, and equal to
//!   what was generated — never an `InvalidField`.
//! - The same frames with one field one byte or more over its limit, or an id
//!   left empty, are refused naming exactly that field.
//! - Arbitrary text and arbitrary objects never panic; the fatal class
//!   (not JSON / not an object / no string `type`) is predicted independently;
//!   a field error names a field that is in the input (or, for "is required",
//!   one that is not).

use herald_core::protocol::{
    ClientFrame, FrameError, Hello, Limits, Resume, UserMessage, parse_client_frame,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Small limits, so generated strings reach them cheaply.
fn small() -> Limits {
    Limits {
        max_epoch_bytes: 8,
        max_id_bytes: 12,
        max_text_bytes: 40,
        ..Limits::default()
    }
}

/// A string of `1..=max` bytes (multi-byte characters included, the length
/// counted in bytes), often exactly `max`.
fn text_up_to(max: usize) -> impl Strategy<Value = String> {
    let exact = proptest::collection::vec(
        prop_oneof![Just("a"), Just("é"), Just("😀")],
        0..=max.min(48),
    )
    .prop_map(move |parts| {
        let mut s = String::new();
        for p in parts {
            if s.len() + p.len() <= max {
                s.push_str(p);
            }
        }
        while s.len() < max {
            s.push('x');
        }
        s
    });
    prop_oneof![
        1 => exact,
        2 => "[a-z0-9 \"\\\\\n\u{0}-\u{1f}é😀]{1,12}"
            .prop_filter_map("fits", move |s| (s.len() <= max).then_some(s)),
    ]
}

fn data() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map(
        "[a-z]{1,5}",
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z]{0,5}".prop_map(Value::String),
        ],
        0..3,
    )
    .prop_map(|m| m.into_iter().collect())
}

/// A valid frame within `limits`, and its JSON text.
fn valid_frame(limits: Limits) -> impl Strategy<Value = (ClientFrame, String)> {
    let l = limits;
    let hello = (
        proptest::option::of("[A-Za-z0-9._-]{1,40}"),
        proptest::option::of((text_up_to(l.max_epoch_bytes), any::<u64>())),
        any::<bool>(),
    )
        .prop_map(|(token, resume, replay)| {
            let hello = Hello {
                token,
                resume: resume.map(|(epoch, seq)| Resume { epoch, seq }),
                replay_active_runs: replay,
            };
            let mut v = json!({"type": "hello", "replay_active_runs": hello.replay_active_runs});
            if let Some(t) = &hello.token {
                v["token"] = json!(t);
            }
            if let Some(r) = &hello.resume {
                v["resume"] = json!({"epoch": r.epoch, "seq": r.seq});
            }
            (ClientFrame::Hello(hello), v.to_string())
        });
    let message = (
        text_up_to(l.max_id_bytes),
        text_up_to(l.max_id_bytes),
        prop_oneof![Just(String::new()), text_up_to(l.max_text_bytes)],
        data(),
    )
        .prop_map(|(id, thread_id, text, data)| {
            let v = json!({"type": "user_message", "id": id, "thread_id": thread_id, "text": text, "data": data});
            let m = UserMessage { id, thread_id, text, data, stream: None };
            (ClientFrame::UserMessage(m), v.to_string())
        });
    let cancel = text_up_to(l.max_id_bytes).prop_map(|run_id| {
        let v = json!({"type": "cancel", "run_id": run_id});
        (
            ClientFrame::Cancel {
                run_id,
                stream: None,
            },
            v.to_string(),
        )
    });
    let ack = any::<u64>().prop_map(|seq| {
        (
            ClientFrame::Ack { seq },
            json!({"type": "ack", "seq": seq}).to_string(),
        )
    });
    let ping = Just((ClientFrame::Ping, json!({"type": "ping"}).to_string()));
    let refresh = "[A-Za-z0-9._-]{0,40}".prop_map(|token| {
        let v = json!({"type": "refresh", "token": token});
        (ClientFrame::Refresh { token }, v.to_string())
    });
    prop_oneof![hello, message, cancel, ack, ping, refresh]
}

/// A field set over its limit (or an id set empty): (frame JSON, field name,
/// what the error must say).
fn invalid_frame(l: Limits) -> impl Strategy<Value = (String, &'static str, &'static str)> {
    let over = move |max: usize| (max + 1..=max + 20).prop_map(|n| "y".repeat(n));
    let ids = prop_oneof![Just("id"), Just("thread_id")];
    prop_oneof![
        over(l.max_epoch_bytes).prop_map(|e| (
            json!({"type": "hello", "resume": {"epoch": e, "seq": 1}}).to_string(),
            "resume.epoch",
            "longer than"
        )),
        (ids.clone(), over(l.max_id_bytes)).prop_map(|(field, long)| {
            let mut v = json!({"type": "user_message", "id": "m", "thread_id": "t", "text": "hi"});
            v[field] = json!(long);
            (v.to_string(), field, "longer than")
        }),
        ids.prop_map(|field| {
            let mut v = json!({"type": "user_message", "id": "m", "thread_id": "t", "text": "hi"});
            v[field] = json!("");
            (v.to_string(), field, "must not be empty")
        }),
        over(l.max_text_bytes).prop_map(|t| (
            json!({"type": "user_message", "id": "m", "thread_id": "t", "text": t}).to_string(),
            "text",
            "longer than"
        )),
        over(l.max_id_bytes).prop_map(|r| (
            json!({"type": "cancel", "run_id": r}).to_string(),
            "run_id",
            "longer than"
        )),
        Just((
            json!({"type": "cancel", "run_id": ""}).to_string(),
            "run_id",
            "must not be empty"
        )),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("token".to_owned()),
                    Just("resume".to_owned()),
                    Just("epoch".to_owned()),
                    Just("seq".to_owned()),
                    Just("id".to_owned()),
                    Just("thread_id".to_owned()),
                    Just("text".to_owned()),
                    Just("data".to_owned()),
                    Just("run_id".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn frame_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("hello")),
        Just(json!("user_message")),
        Just(json!("cancel")),
        Just(json!("ack")),
        Just(json!("ping")),
        Just(json!("refresh")),
        ".{0,10}".prop_map(Value::String),
        json_value(),
    ]
}

/// The value at a path as serde_path_to_error writes it (`resume.epoch`,
/// `resume[0]`), if there is one.
fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, segment| {
        let mut parts = segment.split('[');
        let key = parts.next().unwrap_or_default();
        let mut v = if key.is_empty() {
            v
        } else {
            v.as_object()?.get(key)?
        };
        for index in parts {
            let i: usize = index.strip_suffix(']')?.parse().ok()?;
            v = v.as_array()?.get(i)?;
        }
        Some(v)
    })
}

const KNOWN: [&str; 6] = ["hello", "user_message", "cancel", "ack", "ping", "refresh"];

/// Parse `text` and check the answer against an independent reading of it.
fn check(text: &str) -> Result<(), TestCaseError> {
    let got = parse_client_frame(text, &Limits::default());
    let value: Result<Value, _> = serde_json::from_str(text);
    let want_fatal = match &value {
        Err(_) => Some(FrameError::NotJson),
        Ok(Value::Object(m)) if m.get("type").is_some_and(Value::is_string) => None,
        Ok(Value::Object(_)) => Some(FrameError::MissingType),
        Ok(_) => Some(FrameError::NotObject),
    };
    if let Some(fatal) = want_fatal {
        prop_assert!(fatal.is_fatal());
        prop_assert_eq!(got, Err(fatal));
        return Ok(());
    }
    let Ok(value) = value else { unreachable!() };
    let kind = value["type"].as_str().unwrap_or_default();
    match got {
        Ok(ClientFrame::Unknown { kind: k }) => {
            prop_assert_eq!(k.as_str(), kind);
            prop_assert!(!KNOWN.contains(&kind));
        }
        Ok(ClientFrame::Ping) => prop_assert_eq!(kind, "ping"),
        Ok(_) => prop_assert!(KNOWN.contains(&kind)),
        Err(e @ FrameError::InvalidField { .. }) => {
            prop_assert!(!e.is_fatal());
            let FrameError::InvalidField {
                kind: k,
                field,
                problem,
                id,
            } = e
            else {
                unreachable!()
            };
            prop_assert_eq!(k, kind);
            let present = at_path(&value, &field);
            if problem == "is required" {
                prop_assert!(present.is_none(), "{} reported missing but present", field);
            } else {
                prop_assert!(present.is_some(), "{} named but not in {}", field, text);
            }
            // The id a nack names is the frame's own.
            if let Some(id) = id {
                prop_assert_eq!(value.get("id").and_then(Value::as_str), Some(id.as_str()));
            }
        }
        Err(e) => prop_assert!(false, "fatal {:?} for an object with a string type", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn valid_frames_round_trip_up_to_every_limit((frame, text) in valid_frame(small())) {
        prop_assert_eq!(parse_client_frame(&text, &small()), Ok(frame));
    }

    #[test]
    fn valid_frames_round_trip_under_default_limits((frame, text) in valid_frame(Limits::default())) {
        prop_assert_eq!(parse_client_frame(&text, &Limits::default()), Ok(frame));
    }

    #[test]
    fn a_field_over_its_limit_is_named((text, field, problem) in invalid_frame(small())) {
        match parse_client_frame(&text, &small()) {
            Err(FrameError::InvalidField { field: f, problem: p, .. }) => {
                prop_assert_eq!(f.as_str(), field);
                prop_assert!(p.contains(problem), "{}: {}", f, p);
            }
            other => prop_assert!(false, "{} accepted or misclassified: {:?}", text, other),
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        check(&text)?;
    }

    #[test]
    fn arbitrary_objects_with_known_types_never_panic(mut obj in json_value(), kind in frame_type()) {
        if let Value::Object(m) = &mut obj {
            m.insert("type".to_owned(), kind);
        }
        check(&obj.to_string())?;
    }
}
