//! What an inbound text frame means, given the connection's state: a pure
//! decision ([`on_text`]) the I/O layer carries out. Parsing is in
//! [`crate::protocol`]; the rules of the conversation are here:
//!
//! - while handshaking, only a valid `hello` is accepted; anything else
//!   (including a frame with a bad field) closes with 4000;
//! - a second `hello` closes with 4000; so does a frame that is not a JSON
//!   object with a string `type`;
//! - a bad field of a known frame is answered (`nack` for a `user_message`
//!   whose `id` is readable, `error` otherwise) and the connection stays;
//! - an unknown `type` is answered with `error {code:"unknown_type"}`;
//! - once closing, inbound frames are ignored.

use crate::close::{CloseInfo, CloseReason, Initiator};
use crate::lifecycle::State;
use crate::protocol::{
    ClientFrame, FrameError, Hello, Limits, ServerFrame, Subscribe, UserMessage, codes,
    parse_client_frame,
};

/// A frame the server answers with, owned (see [`Reply::to_json`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `pong`.
    Pong,
    /// `error` with a code and a message.
    Error {
        /// Machine-readable code.
        code: &'static str,
        /// Human-readable detail.
        message: String,
    },
    /// `error` about a shared stream (a refused `subscribe`/`unsubscribe`
    /// whose `stream` was readable), naming it.
    StreamError {
        /// Machine-readable code.
        code: &'static str,
        /// Human-readable detail.
        message: String,
        /// The stream as the frame gave it.
        stream: String,
    },
    /// `nack` of a `user_message`.
    Nack {
        /// The message id.
        id: String,
        /// Machine-readable code.
        error: &'static str,
        /// Human-readable detail.
        message: String,
    },
}

impl Reply {
    /// The JSON text of the frame.
    pub fn to_json(&self) -> String {
        match self {
            Reply::Pong => ServerFrame::Pong.to_json(),
            Reply::Error { code, message } => ServerFrame::Error { code, message }.to_json(),
            Reply::StreamError {
                code,
                message,
                stream,
            } => ServerFrame::StreamError {
                code,
                message,
                stream,
            }
            .to_json(),
            Reply::Nack { id, error, message } => ServerFrame::Nack {
                id,
                error,
                message: Some(message),
                retry_after_ms: None,
            }
            .to_json(),
        }
    }
}

/// What the I/O layer must do with an inbound text frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// Close the connection (the client broke the protocol).
    Close(CloseInfo),
    /// Answer with a frame; the connection stays.
    Reply(Reply),
    /// Authenticate and join the stream.
    Hello(Hello),
    /// Forward a chat message to the agent backend.
    UserMessage(UserMessage),
    /// Forward a cancel, if the run is open in the user's own stream (or
    /// in a shared stream the user may write to).
    Cancel {
        /// The run.
        run_id: String,
        /// The shared stream, if any.
        stream: Option<String>,
    },
    /// Record the client's highest processed seq.
    Ack {
        /// The seq.
        seq: u64,
    },
    /// Verify a new token for the same subject.
    Refresh {
        /// The token.
        token: String,
    },
    /// Subscribe to a shared stream, if permitted.
    Subscribe(Subscribe),
    /// Drop a shared stream.
    Unsubscribe {
        /// The stream.
        stream: String,
    },
    /// Relay "typing" to a shared stream's other members.
    Typing {
        /// The stream.
        stream: String,
    },
    /// Answer who is in a shared stream.
    Presence {
        /// The stream.
        stream: String,
    },
    /// Nothing to do (the connection is closing).
    Ignore,
}

fn protocol_error(detail: impl Into<String>) -> Inbound {
    Inbound::Close(CloseInfo::new(
        CloseReason::ProtocolError,
        Initiator::Client,
        detail,
    ))
}

/// The `stream` field of a refused frame, if it is a string of at most 256
/// bytes (so the client can tell which of its streams was refused).
fn stream_field(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let stream = value.get("stream")?.as_str()?;
    (stream.len() <= 256).then(|| stream.to_owned())
}

/// Decide what the text frame `text` means for a connection in `state`.
pub fn on_text(state: State, text: &str, limits: &Limits) -> Inbound {
    if state >= State::Closing {
        return Inbound::Ignore;
    }
    let frame = match parse_client_frame(text, limits) {
        Ok(f) => f,
        Err(e) if e.is_fatal() || state == State::Handshaking => {
            return protocol_error(e.to_string());
        }
        Err(e) => {
            let message = e.to_string();
            return Inbound::Reply(match e {
                FrameError::InvalidField {
                    id: Some(id),
                    kind: "user_message",
                    ..
                } => Reply::Nack {
                    id,
                    error: codes::INVALID_FIELD,
                    message,
                },
                FrameError::InvalidField {
                    kind: "subscribe" | "unsubscribe" | "cancel" | "typing" | "presence",
                    ..
                } if let Some(stream) = stream_field(text) => Reply::StreamError {
                    code: codes::INVALID_FIELD,
                    message,
                    stream,
                },
                _ => Reply::Error {
                    code: codes::INVALID_FIELD,
                    message,
                },
            });
        }
    };
    match (state, frame) {
        (State::Handshaking, ClientFrame::Hello(hello)) => Inbound::Hello(hello),
        (State::Handshaking, _) => protocol_error("the first frame must be hello"),
        (_, ClientFrame::Hello(_)) => protocol_error("second hello"),
        (_, ClientFrame::Ping) => Inbound::Reply(Reply::Pong),
        (_, ClientFrame::Ack { seq }) => Inbound::Ack { seq },
        (_, ClientFrame::Refresh { token }) => Inbound::Refresh { token },
        (_, ClientFrame::UserMessage(m)) => Inbound::UserMessage(m),
        (_, ClientFrame::Cancel { run_id, stream }) => Inbound::Cancel { run_id, stream },
        (_, ClientFrame::Subscribe(sub)) => Inbound::Subscribe(sub),
        (_, ClientFrame::Unsubscribe { stream }) => Inbound::Unsubscribe { stream },
        (_, ClientFrame::Typing { stream }) => Inbound::Typing { stream },
        (_, ClientFrame::Presence { stream }) => Inbound::Presence { stream },
        (_, ClientFrame::Unknown { kind }) => Inbound::Reply(Reply::Error {
            code: codes::UNKNOWN_TYPE,
            message: format!("unknown frame type `{kind}`"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(state: State, text: &str) -> Inbound {
        on_text(state, text, &Limits::default())
    }

    fn closes_4000(i: &Inbound) -> bool {
        matches!(i, Inbound::Close(info) if info.code == 4000)
    }

    #[test]
    fn handshake_accepts_only_hello() {
        assert!(matches!(
            decide(State::Handshaking, r#"{"type":"hello"}"#),
            Inbound::Hello(_)
        ));
        assert!(closes_4000(&decide(
            State::Handshaking,
            r#"{"type":"ping"}"#
        )));
        assert!(closes_4000(&decide(
            State::Handshaking,
            r#"{"type":"hello","resume":{"epoch":"e","seq":-1}}"#
        )));
    }

    #[test]
    fn ready_answers_and_forwards() {
        assert!(closes_4000(&decide(State::Ready, r#"{"type":"hello"}"#)));
        assert!(closes_4000(&decide(State::Ready, "nope")));
        assert_eq!(
            decide(State::Ready, r#"{"type":"ping"}"#),
            Inbound::Reply(Reply::Pong)
        );
        assert_eq!(
            decide(State::Ready, r#"{"type":"ack","seq":4}"#),
            Inbound::Ack { seq: 4 }
        );
        assert!(matches!(
            decide(State::Ready, r#"{"type":"user_message","id":"m","thread_id":"t"}"#),
            Inbound::Reply(Reply::Nack { id, .. }) if id == "m"
        ));
        assert!(matches!(
            decide(State::Ready, r#"{"type":"cancel"}"#),
            Inbound::Reply(Reply::Error {
                code: "invalid_field",
                ..
            })
        ));
        assert!(matches!(
            decide(State::Ready, r#"{"type":"shouting"}"#),
            Inbound::Reply(Reply::Error {
                code: "unknown_type",
                ..
            })
        ));
        assert_eq!(decide(State::Closing, "nope"), Inbound::Ignore);
    }

    /// Mutation testing (issue 17): replies are the documented frames.
    #[test]
    fn replies_serialize_as_documented() {
        assert_eq!(Reply::Pong.to_json(), r#"{"type":"pong"}"#);
        let e = Reply::Error {
            code: "unknown_type",
            message: "nope".into(),
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e.to_json()).unwrap(),
            serde_json::json!({"type": "error", "code": "unknown_type", "message": "nope"})
        );
        let n = Reply::Nack {
            id: "m1".into(),
            error: "invalid_message",
            message: "bad".into(),
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&n.to_json()).unwrap(),
            serde_json::json!({"type": "nack", "id": "m1", "error": "invalid_message", "message": "bad"})
        );
    }

    /// Issue 39: a refused `subscribe` (a bad name) names the stream it was
    /// about, so the client knows which of its subscriptions failed; a frame
    /// whose `stream` is not a short string gets a plain `error`.
    #[test]
    fn a_refused_subscribe_names_its_stream() {
        let l = Limits::default();
        match on_text(
            State::Ready,
            r#"{"type":"subscribe","stream":"user:bob"}"#,
            &l,
        ) {
            Inbound::Reply(r @ Reply::StreamError { .. }) => {
                let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
                assert_eq!(v["type"], "error");
                assert_eq!(v["code"], "invalid_field");
                assert_eq!(v["stream"], "user:bob");
            }
            other => panic!("{other:?}"),
        }
        match on_text(State::Ready, r#"{"type":"unsubscribe","stream":7}"#, &l) {
            Inbound::Reply(Reply::Error { code, .. }) => assert_eq!(code, codes::INVALID_FIELD),
            other => panic!("{other:?}"),
        }
        let long = format!(r#"{{"type":"subscribe","stream":"t:{}"}}"#, "a".repeat(300));
        assert!(matches!(
            on_text(State::Ready, &long, &l),
            Inbound::Reply(Reply::Error { .. })
        ));
    }
}
