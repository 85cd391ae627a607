//! Wire protocol v1: JSON text frames over WebSocket, subprotocol `herald.v1`.
//!
//! Client frames are parsed in two steps: first into a JSON object with a
//! string `type` (failure is a protocol error, close 4000), then per type into
//! a typed struct whose field errors name the field. Server frames are plain
//! serde types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The WebSocket subprotocol Herald speaks.
pub const SUBPROTOCOL: &str = "herald.v1";
/// Prefix of the subprotocol that carries a token (`bearer.<jwt>`).
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Size limits on inbound frames and their fields.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest inbound WebSocket message, in bytes (else close 1009).
    pub max_message_bytes: usize,
    /// Largest token, in bytes (else close 4401).
    pub max_token_bytes: usize,
    /// Longest `sub` claim, in bytes (else close 4401).
    pub max_sub_bytes: usize,
    /// Longest `resume.epoch`, in bytes (else close 4000).
    pub max_epoch_bytes: usize,
    /// Longest `id`, `thread_id` and `run_id`, in bytes.
    pub max_id_bytes: usize,
    /// Longest `user_message.text`, in bytes.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_token_bytes: 8 * 1024,
            max_sub_bytes: 256,
            max_epoch_bytes: 64,
            max_id_bytes: 128,
            max_text_bytes: 32 * 1024,
        }
    }
}

/// A position in a user's stream to resume from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Resume {
    /// The stream epoch the client last saw.
    pub epoch: String,
    /// The highest `seq` the client processed.
    pub seq: u64,
}

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Hello {
    /// The JWT, unless it came in a header or subprotocol.
    #[serde(default)]
    pub token: Option<String>,
    /// Where to resume the user's stream from.
    #[serde(default)]
    pub resume: Option<Resume>,
    /// Replay the events of the user's open agent runs.
    #[serde(default)]
    pub replay_active_runs: bool,
}

/// A chat message from the user to the agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UserMessage {
    /// Client-chosen id, the idempotency key of the message.
    pub id: String,
    /// The conversation thread.
    pub thread_id: String,
    /// The message text.
    pub text: String,
    /// Free-form extra data; must be an object.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// The shared stream it is written to (subscribed, with write
    /// permission); absent: the user's own stream.
    #[serde(default)]
    pub stream: Option<String>,
}

/// A request to read a shared stream on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Subscribe {
    /// The stream (see [`shared_stream_problem`]).
    pub stream: String,
    /// Where to resume it from.
    #[serde(default)]
    pub resume: Option<Resume>,
    /// Replay the events of the stream's open agent runs.
    #[serde(default)]
    pub replay_active_runs: bool,
}

/// Longest shared stream name, in bytes.
pub const MAX_STREAM_BYTES: usize = 200;

/// Why `name` is not a shared stream's name, if it is not: 1–200 bytes of
/// `A–Z a–z 0–9 _ . : @ -`, with a `:` after a non-empty namespace
/// (`thread:abc`), and not a user's own stream (`user:…`).
pub fn shared_stream_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_STREAM_BYTES {
        return Some("must be 1 to 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b))
    {
        return Some("may hold only A-Z a-z 0-9 _ . : @ -");
    }
    match name.split_once(':') {
        Some(("user", _)) => Some("names a user's own stream (`user:`), which is not shared"),
        Some((ns, rest)) if !ns.is_empty() && !rest.is_empty() => None,
        _ => Some("must be `<namespace>:<name>`, e.g. `thread:abc`"),
    }
}

/// A parsed, validated client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `hello`: authenticate, optionally resume.
    Hello(Hello),
    /// `user_message`: forward to the agent backend.
    UserMessage(UserMessage),
    /// `cancel`: ask the agent to stop a run.
    Cancel {
        /// The run to cancel.
        run_id: String,
        /// The shared stream the run is in; absent: the user's own.
        stream: Option<String>,
    },
    /// `ack`: the highest seq the client processed.
    Ack {
        /// Highest processed seq.
        seq: u64,
    },
    /// `ping`: application-level ping, answered with `pong`.
    Ping,
    /// `refresh`: a new token for the same subject.
    Refresh {
        /// The new JWT.
        token: String,
    },
    /// `subscribe`: read a shared stream on this connection too.
    Subscribe(Subscribe),
    /// `unsubscribe`: stop reading a shared stream.
    Unsubscribe {
        /// The stream.
        stream: String,
    },
    /// `typing`: tell a shared stream's other members this user is typing.
    Typing {
        /// The stream.
        stream: String,
    },
    /// `presence`: who is in a shared stream (answered with `presence`).
    Presence {
        /// The stream.
        stream: String,
    },
    /// A `type` this server does not know (answered with `error`, not a close).
    Unknown {
        /// The unknown type name.
        kind: String,
    },
}

/// Why a client frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The text is not JSON at all.
    #[error("frame is not valid JSON")]
    NotJson,
    /// The JSON is not an object.
    #[error("frame is not a JSON object")]
    NotObject,
    /// There is no string `type` field.
    #[error("field `type` is missing or not a string")]
    MissingType,
    /// A field of a known frame type is missing, mistyped or too long.
    #[error("{kind}: field `{field}` {problem}")]
    InvalidField {
        /// The frame type.
        kind: &'static str,
        /// The offending field (dotted path).
        field: String,
        /// What is wrong with it.
        problem: String,
        /// The frame's `id`, when it could be read (so a `nack` can name it).
        id: Option<String>,
    },
}

impl FrameError {
    /// Whether the frame is so broken that the connection closes with 4000
    /// (rather than answered with an `error`/`nack` frame).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            FrameError::NotJson | FrameError::NotObject | FrameError::MissingType
        )
    }
}

/// Parse and validate one client text frame.
pub fn parse_client_frame(text: &str, limits: &Limits) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|_| FrameError::NotJson)?;
    let Value::Object(obj) = value else {
        return Err(FrameError::NotObject);
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(FrameError::MissingType),
    };
    let id = obj.get("id").and_then(Value::as_str).map(str::to_owned);
    let value = Value::Object(obj);
    match kind.as_str() {
        "hello" => {
            let hello: Hello = typed("hello", value, None)?;
            if let Some(r) = &hello.resume
                && r.epoch.len() > limits.max_epoch_bytes
            {
                return Err(too_long(
                    "hello",
                    "resume.epoch",
                    limits.max_epoch_bytes,
                    None,
                ));
            }
            Ok(ClientFrame::Hello(hello))
        }
        "user_message" => {
            let msg: UserMessage = typed("user_message", value, id.clone())?;
            check_id("user_message", "id", &msg.id, limits, &id)?;
            check_id("user_message", "thread_id", &msg.thread_id, limits, &id)?;
            if let Some(problem) = msg.stream.as_deref().and_then(shared_stream_problem) {
                return Err(invalid("user_message", "stream", problem, id));
            }
            if msg.text.len() > limits.max_text_bytes {
                return Err(too_long("user_message", "text", limits.max_text_bytes, id));
            }
            Ok(ClientFrame::UserMessage(msg))
        }
        "cancel" => {
            #[derive(Deserialize)]
            struct Cancel {
                run_id: String,
                #[serde(default)]
                stream: Option<String>,
            }
            let c: Cancel = typed("cancel", value, None)?;
            check_id("cancel", "run_id", &c.run_id, limits, &None)?;
            if let Some(problem) = c.stream.as_deref().and_then(shared_stream_problem) {
                return Err(invalid("cancel", "stream", problem, None));
            }
            Ok(ClientFrame::Cancel {
                run_id: c.run_id,
                stream: c.stream,
            })
        }
        "ack" => {
            #[derive(Deserialize)]
            struct Ack {
                seq: u64,
            }
            let a: Ack = typed("ack", value, None)?;
            Ok(ClientFrame::Ack { seq: a.seq })
        }
        "subscribe" => {
            let sub: Subscribe = typed("subscribe", value, None)?;
            if let Some(problem) = shared_stream_problem(&sub.stream) {
                return Err(invalid("subscribe", "stream", problem, None));
            }
            if let Some(r) = &sub.resume
                && r.epoch.len() > limits.max_epoch_bytes
            {
                return Err(too_long(
                    "subscribe",
                    "resume.epoch",
                    limits.max_epoch_bytes,
                    None,
                ));
            }
            Ok(ClientFrame::Subscribe(sub))
        }
        kind @ ("unsubscribe" | "typing" | "presence") => {
            #[derive(Deserialize)]
            struct Named {
                stream: String,
            }
            let kind: &'static str = match kind {
                "unsubscribe" => "unsubscribe",
                "typing" => "typing",
                _ => "presence",
            };
            let u: Named = typed(kind, value, None)?;
            if let Some(problem) = shared_stream_problem(&u.stream) {
                return Err(invalid(kind, "stream", problem, None));
            }
            let stream = u.stream;
            Ok(match kind {
                "unsubscribe" => ClientFrame::Unsubscribe { stream },
                "typing" => ClientFrame::Typing { stream },
                _ => ClientFrame::Presence { stream },
            })
        }
        "ping" => Ok(ClientFrame::Ping),
        "refresh" => {
            #[derive(Deserialize)]
            struct Refresh {
                token: String,
            }
            let r: Refresh = typed("refresh", value, None)?;
            Ok(ClientFrame::Refresh { token: r.token })
        }
        _ => Ok(ClientFrame::Unknown { kind }),
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    value: Value,
    id: Option<String>,
) -> Result<T, FrameError> {
    deserialize_named(value).map_err(|(field, problem)| FrameError::InvalidField {
        kind,
        field,
        problem,
        id,
    })
}

/// Deserialize `value` into `T`; on failure return the offending field's
/// dotted path (e.g. `resume.seq`, `events[3].user_id`) and what is wrong.
pub fn deserialize_named<T: serde::de::DeserializeOwned>(
    value: Value,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde reports a missing field at the parent path and names it in the message.
        match inner.strip_prefix("missing field `") {
            Some(rest) => {
                let name = rest.trim_end_matches('`');
                let field = if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                (field, "is required".to_owned())
            }
            None => (path, strip_position(&inner)),
        }
    })
}

/// serde_json appends " at line L column C"; that is noise for a client.
fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

fn check_id(
    kind: &'static str,
    field: &str,
    value: &str,
    limits: &Limits,
    id: &Option<String>,
) -> Result<(), FrameError> {
    if value.is_empty() {
        return Err(FrameError::InvalidField {
            kind,
            field: field.to_owned(),
            problem: "must not be empty".to_owned(),
            id: id.clone(),
        });
    }
    if value.len() > limits.max_id_bytes {
        return Err(too_long(kind, field, limits.max_id_bytes, id.clone()));
    }
    Ok(())
}

fn invalid(kind: &'static str, field: &str, problem: &str, id: Option<String>) -> FrameError {
    FrameError::InvalidField {
        kind,
        field: field.to_owned(),
        problem: problem.to_owned(),
        id,
    }
}

fn too_long(kind: &'static str, field: &str, max: usize, id: Option<String>) -> FrameError {
    FrameError::InvalidField {
        kind,
        field: field.to_owned(),
        problem: format!("is longer than {max} bytes"),
        id,
    }
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// Answer to a valid `hello`.
    Welcome {
        /// Server-assigned connection id.
        conn_id: &'a str,
        /// The authenticated user (`sub`).
        user_id: &'a str,
        /// The stream epoch.
        epoch: &'a str,
        /// The stream's latest seq at the time of the welcome.
        seq: u64,
        /// Whether the requested resume point was honoured.
        resumed: bool,
        /// Present and true when the resume point could not be honoured.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
        /// Interval of server heartbeats, in milliseconds.
        heartbeat_ms: u64,
        /// Present and true when replayed events follow (missed history,
        /// open runs); a `caught_up` frame then marks their end.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replaying: bool,
    },
    /// The replay announced by the welcome (or by `subscribed`) is over:
    /// live events follow.
    CaughtUp {
        /// The last seq handed over so far.
        seq: u64,
        /// The shared stream it is about; absent for the user's own.
        #[serde(skip_serializing_if = "Option::is_none")]
        stream: Option<&'a str>,
    },
    /// Answer to a granted `subscribe`: the stream's position, then its
    /// replayed events (if any), then its live events.
    Subscribed {
        /// The stream.
        stream: &'a str,
        /// Its epoch.
        epoch: &'a str,
        /// Its latest seq at this moment.
        seq: u64,
        /// Whether the requested resume point was honoured.
        resumed: bool,
        /// Present and true when the resume point could not be honoured.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
        /// Present and true when replayed events follow (a `caught_up`
        /// with this stream marks their end).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replaying: bool,
        /// Whether this user may write to it (`user_message`, `cancel`).
        write: bool,
    },
    /// Who is in a shared stream (answer to `presence`, and the API's).
    Presence {
        /// The stream.
        stream: &'a str,
        /// Users present, each with its live connections (at most the
        /// listing limit; sorted by user id).
        users: &'a [PresentUser],
        /// Users present in all.
        total_users: usize,
        /// Their connections in all.
        total_connections: usize,
    },
    /// A user's first connection joined a shared stream.
    PresenceJoin {
        /// The stream.
        stream: &'a str,
        /// The user.
        user_id: &'a str,
    },
    /// A user's last connection left a shared stream (or its node died).
    PresenceLeave {
        /// The stream.
        stream: &'a str,
        /// The user.
        user_id: &'a str,
    },
    /// Another member of a shared stream is typing (not stored).
    Typing {
        /// The stream.
        stream: &'a str,
        /// The user typing.
        user_id: &'a str,
    },
    /// The connection no longer reads a shared stream.
    Unsubscribed {
        /// The stream.
        stream: &'a str,
        /// `client` (asked for), `removed` (through the API).
        reason: &'a str,
    },
    /// A refused request about a shared stream (`subscribe`, a write to it):
    /// an `error` frame naming the stream; the connection stays.
    #[serde(rename = "error")]
    StreamError {
        /// Machine-readable code.
        code: &'a str,
        /// Human-readable detail.
        message: &'a str,
        /// The stream it is about.
        stream: &'a str,
    },
    /// An agent event on the user's stream.
    Event(&'a EventFrame),
    /// A `user_message` was handed to the agent backend.
    Ack {
        /// The message id.
        id: &'a str,
        /// Always `accepted`.
        status: &'a str,
    },
    /// A `user_message` failed.
    Nack {
        /// The message id.
        id: &'a str,
        /// Machine-readable error code.
        error: &'a str,
        /// Human-readable detail (names the offending field).
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
        /// Suggested wait before retrying, if a retry makes sense.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Answer to `ping`.
    Pong,
    /// A non-fatal error; the connection stays open.
    Error {
        /// Machine-readable error code.
        code: &'a str,
        /// Human-readable detail.
        message: &'a str,
    },
    /// Sent before a drain close.
    Closing {
        /// Why (`shutdown`).
        reason: &'a str,
        /// Suggested wait before reconnecting.
        reconnect_after_ms: u64,
    },
}

impl ServerFrame<'_> {
    /// Serialize to the JSON text sent on the wire.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: all keys are strings and all
        // values are plain data.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }
}

/// A user present in a shared stream, with its live connections there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentUser {
    /// The user.
    pub user_id: String,
    /// Its connections reading the stream, on every node.
    pub connections: usize,
}

/// The body of an `event` frame (without `type`, which [`ServerFrame`] adds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFrame {
    /// Position in its stream.
    pub seq: u64,
    /// The shared stream it belongs to; absent for the user's own stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Event name, e.g. `agent_thinking`.
    pub event: String,
    /// Conversation thread, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// Agent run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Event payload (an object).
    pub data: Value,
    /// When the event was published, RFC 3339.
    pub ts: String,
}

/// The golden-path agent events; publishing one requires a `run_id`.
pub const AGENT_EVENTS: [&str; 5] = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
];

/// Whether `name` is a valid event name: 1–64 characters of `[A-Za-z0-9_.:-]`.
pub fn is_valid_event_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Error codes carried by `error` and `nack` frames.
pub mod codes {
    /// The frame's `type` is not known.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// A field is missing, mistyped or too long.
    pub const INVALID_FIELD: &str = "invalid_field";
    /// Binary frames are not part of protocol v1.
    pub const BINARY_NOT_SUPPORTED: &str = "binary_not_supported";
    /// The run is unknown or not the caller's.
    pub const UNKNOWN_RUN: &str = "unknown_run";
    /// The sender exceeded the inbound rate limit.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A refresh token was rejected.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// The stream may not be read (or written) by this user, or does not
    /// exist: the two are not told apart.
    pub const FORBIDDEN: &str = "forbidden";
    /// The connection reads `max_streams_per_connection` shared streams already.
    pub const TOO_MANY_STREAMS: &str = "too_many_streams";
    /// The connection does not read that stream.
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    /// The broker could not serve the request; try again later.
    pub const BROKER_UNAVAILABLE: &str = "broker_unavailable";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(v, &Limits::default())
    }

    #[test]
    fn hello_with_resume() {
        let f = parse(r#"{"type":"hello","token":"t","resume":{"epoch":"e","seq":41},"replay_active_runs":true}"#)
            .unwrap();
        assert_eq!(
            f,
            ClientFrame::Hello(Hello {
                token: Some("t".into()),
                resume: Some(Resume {
                    epoch: "e".into(),
                    seq: 41
                }),
                replay_active_runs: true
            })
        );
    }

    #[test]
    fn fatal_errors() {
        assert_eq!(parse("{not json"), Err(FrameError::NotJson));
        assert_eq!(parse("[1,2]"), Err(FrameError::NotObject));
        assert_eq!(parse(r#"{"type":5}"#), Err(FrameError::MissingType));
        assert_eq!(parse(r#"{"x":1}"#), Err(FrameError::MissingType));
        assert!(parse("[]").unwrap_err().is_fatal());
    }

    #[test]
    fn wrong_field_types_name_the_field() {
        match parse(r#"{"type":"hello","resume":{"epoch":"e","seq":-1}}"#) {
            Err(FrameError::InvalidField { field, .. }) => assert_eq!(field, "resume.seq"),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"user_message","id":"m1","thread_id":"t"}"#) {
            Err(FrameError::InvalidField {
                field, id, problem, ..
            }) => {
                assert_eq!(field, "text");
                assert_eq!(problem, "is required");
                assert_eq!(id.as_deref(), Some("m1"));
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"user_message","id":"m1","thread_id":"t","text":"x","data":[1]}"#) {
            Err(FrameError::InvalidField { field, .. }) => assert_eq!(field, "data"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_apply() {
        let long = "x".repeat(129);
        let f = format!(r#"{{"type":"user_message","id":"{long}","thread_id":"t","text":"x"}}"#);
        assert!(matches!(parse(&f), Err(FrameError::InvalidField { field, .. }) if field == "id"));
        let epoch = "e".repeat(65);
        let f = format!(r#"{{"type":"hello","resume":{{"epoch":"{epoch}","seq":1}}}}"#);
        assert!(
            matches!(parse(&f), Err(FrameError::InvalidField { field, .. }) if field == "resume.epoch")
        );
    }

    #[test]
    fn unknown_type_is_not_fatal() {
        assert_eq!(
            parse(r#"{"type":"shouting"}"#),
            Ok(ClientFrame::Unknown {
                kind: "shouting".into()
            })
        );
    }

    #[test]
    fn server_frames_serialize_as_documented() {
        let w = ServerFrame::Welcome {
            conn_id: "c1",
            user_id: "u1",
            epoch: "e",
            seq: 57,
            resumed: false,
            reset: true,
            heartbeat_ms: 25000,
            replaying: true,
        };
        let v: Value = serde_json::from_str(&w.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type":"welcome","conn_id":"c1","user_id":"u1","epoch":"e","seq":57,"resumed":false,"reset":true,"heartbeat_ms":25000,"replaying":true})
        );
        assert_eq!(
            ServerFrame::CaughtUp {
                seq: 9,
                stream: None
            }
            .to_json(),
            r#"{"type":"caught_up","seq":9}"#
        );
        let e = EventFrame {
            seq: 3,
            stream: None,
            event: "agent_thinking".into(),
            thread_id: Some("t1".into()),
            run_id: None,
            data: json!({"text":"hi"}),
            ts: "2026-01-01T00:00:00Z".into(),
        };
        let v: Value = serde_json::from_str(&ServerFrame::Event(&e).to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","seq":3,"event":"agent_thinking","thread_id":"t1","data":{"text":"hi"},"ts":"2026-01-01T00:00:00Z"})
        );
    }

    /// Mutation testing (issue 17): event names, and error texts without
    /// serde's position noise.
    #[test]
    fn event_names_and_error_texts() {
        for ok in ["a", "agent_started", "x.y:z-1", &"a".repeat(64)] {
            assert!(is_valid_event_name(ok), "{ok}");
        }
        for bad in ["", "has space", "é", "a/b", &"a".repeat(65)] {
            assert!(!is_valid_event_name(bad), "{bad}");
        }
        let Err(FrameError::InvalidField { field, problem, .. }) =
            parse_client_frame(r#"{"type":"ack","seq":"x"}"#, &Limits::default())
        else {
            panic!("a string seq is refused");
        };
        assert_eq!(field, "seq");
        assert!(problem.starts_with("invalid type"), "{problem}");
        assert!(!problem.contains(" at line "), "{problem}");
    }

    /// Issue 39: `subscribe` / `unsubscribe` parse, and only shared stream
    /// names pass (never a user's own stream, never a name a key could
    /// confuse); a `user_message` may name one.
    #[test]
    fn subscribe_frames_and_stream_names() {
        let f = parse(r#"{"type":"subscribe","stream":"thread:t1","resume":{"epoch":"e","seq":3},"replay_active_runs":true}"#)
            .unwrap();
        assert_eq!(
            f,
            ClientFrame::Subscribe(Subscribe {
                stream: "thread:t1".into(),
                resume: Some(Resume {
                    epoch: "e".into(),
                    seq: 3
                }),
                replay_active_runs: true
            })
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe","stream":"room:a.b@c-d_e"}"#).unwrap(),
            ClientFrame::Unsubscribe {
                stream: "room:a.b@c-d_e".into()
            }
        );
        for bad in [
            "",
            "thread",
            ":x",
            "thread:",
            "user:bob",
            "thread:a}b",
            "thread:a b",
            "t:\u{e9}",
        ] {
            let frame = format!(r#"{{"type":"subscribe","stream":"{bad}"}}"#);
            match parse(&frame) {
                Err(FrameError::InvalidField { field, .. }) => assert_eq!(field, "stream", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let long = format!("thread:{}", "a".repeat(MAX_STREAM_BYTES));
        assert!(shared_stream_problem(&long).is_some());
        assert!(shared_stream_problem(&long[..MAX_STREAM_BYTES]).is_none());
        match parse(
            r#"{"type":"user_message","id":"m","thread_id":"t","text":"x","stream":"user:me"}"#,
        ) {
            Err(FrameError::InvalidField { field, id, .. }) => {
                assert_eq!((field.as_str(), id.as_deref()), ("stream", Some("m")))
            }
            other => panic!("{other:?}"),
        }
        let m = parse(
            r#"{"type":"user_message","id":"m","thread_id":"t","text":"x","stream":"thread:t"}"#,
        )
        .unwrap();
        assert!(
            matches!(m, ClientFrame::UserMessage(UserMessage { stream: Some(s), .. }) if s == "thread:t")
        );
        let sub = ServerFrame::Subscribed {
            stream: "thread:t",
            epoch: "e",
            seq: 4,
            resumed: true,
            reset: false,
            replaying: true,
            write: false,
        };
        assert_eq!(
            sub.to_json(),
            r#"{"type":"subscribed","stream":"thread:t","epoch":"e","seq":4,"resumed":true,"replaying":true,"write":false}"#
        );
        let err = ServerFrame::StreamError {
            code: codes::FORBIDDEN,
            message: "no",
            stream: "thread:t",
        };
        assert_eq!(
            err.to_json(),
            r#"{"type":"error","code":"forbidden","message":"no","stream":"thread:t"}"#
        );
    }
}
