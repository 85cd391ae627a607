//! Property test: no input makes the frame parser panic, and every rejection
//! is classified (fatal → close 4000, or a field error naming a field).

use herald_core::protocol::{ClientFrame, FrameError, Limits, parse_client_frame};
use proptest::prelude::*;
use serde_json::{Value, json};

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

fn check(text: &str) -> Result<(), TestCaseError> {
    match parse_client_frame(text, &Limits::default()) {
        Ok(ClientFrame::Unknown { kind }) => prop_assert!(!matches!(
            kind.as_str(),
            "hello" | "user_message" | "cancel" | "ack" | "ping" | "refresh"
        )),
        Ok(_) => {}
        Err(e @ (FrameError::NotJson | FrameError::NotObject | FrameError::MissingType)) => {
            prop_assert!(e.is_fatal())
        }
        Err(FrameError::InvalidField { field, .. }) => prop_assert!(!field.is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

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
