//! The AI SDK's `WebSocketChatTransport` wire protocol (the `ai` package's
//! `useChat` transport), as a server speaks it: client frames (`send`,
//! `resume`, `abort`) parsed and validated strictly, server frames (`start`,
//! `chunk`, `end`, `error`, `no-active`) written, each response's
//! `sequence` numbered from 0 without a gap ([`Responses`]), and Herald's
//! agent run events mapped to UI message chunks ([`Chunks`]).
//!
//! Every frame is a JSON object with a `type` and the `requestId` it
//! answers. A frame this module refuses is a protocol error the endpoint
//! answers with close 1008, as the transport's own server outline does.
//! Sans-IO: no socket, no clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Longest `requestId`, chat `id` and `messageId`, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most entries of a frame's `headers`.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest header value, in bytes (a bearer JWT fits).
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;

/// A client frame, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Start a turn (a new message, or a regeneration) of chat `id`.
    Send(Send),
    /// Replay the retained response of chat `id`, then follow it live.
    Resume(Resume),
    /// Cancel the operation `request_id` started.
    Abort {
        /// The request to cancel.
        request_id: String,
    },
}

impl Request {
    /// The `requestId` the frame carries.
    pub fn request_id(&self) -> &str {
        match self {
            Request::Send(s) => &s.request_id,
            Request::Resume(r) => &r.request_id,
            Request::Abort { request_id } => request_id,
        }
    }
}

/// What a turn asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A new user message.
    SubmitMessage,
    /// Regenerate the assistant's last answer.
    RegenerateMessage,
}

impl Trigger {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::SubmitMessage => "submit-message",
            Trigger::RegenerateMessage => "regenerate-message",
        }
    }
}

/// A `send` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    /// Correlates the response frames.
    pub request_id: String,
    /// The chat.
    pub id: String,
    /// New message or regeneration.
    pub trigger: Trigger,
    /// The message to regenerate, if any.
    pub message_id: Option<String>,
    /// The chat's UI messages (objects with `id`, `role`, `parts`).
    pub messages: Vec<Value>,
    /// Request headers (lower-cased names), e.g. `authorization`.
    pub headers: HashMap<String, String>,
    /// Application data.
    pub body: Value,
    /// Request metadata, any JSON (`null` when absent).
    pub metadata: Value,
}

/// A `resume` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// Correlates the response frames.
    pub request_id: String,
    /// The chat.
    pub id: String,
    /// Replay after this sequence (the transport omits it: replay all).
    pub last_sequence: Option<u64>,
    /// Request headers (lower-cased names).
    pub headers: HashMap<String, String>,
    /// Application data.
    pub body: Value,
    /// Request metadata (`null` when absent).
    pub metadata: Value,
}

/// Why a client frame was refused (the endpoint closes 1008).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a JSON object.
    #[error("the frame is not a JSON object: {0}")]
    NotJson(String),
    /// A field is missing, of the wrong type, or out of its bounds.
    #[error("`{field}` {problem}")]
    Invalid {
        /// The field, e.g. `messages[2].role`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> FrameError {
    FrameError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A `send` frame as it arrives (without its `type`). Unknown fields are
/// ignored, as the SDK's own validator
/// (`safeValidateWebSocketChatTransportRequest`) ignores them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendWire {
    request_id: String,
    id: String,
    trigger: String,
    #[serde(default)]
    message_id: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    metadata: Value,
}

/// A `resume` frame as it arrives (without its `type`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumeWire {
    request_id: String,
    id: String,
    #[serde(default)]
    last_sequence: Option<u64>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    metadata: Value,
}

/// An `abort` frame as it arrives (without its `type`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AbortWire {
    request_id: String,
}

/// `value` as a `T`, or the field that is wrong.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, FrameError> {
    crate::protocol::deserialize_named(value).map_err(|(field, problem)| invalid(field, problem))
}

/// Parse and validate one client frame.
pub fn parse_request(text: &str) -> Result<Request, FrameError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(FrameError::NotJson("not an object".into()));
    };
    let kind = match fields.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => return Err(invalid("type", "must be `send`, `resume` or `abort`")),
    };
    let fields = Value::Object(fields);
    match kind.as_str() {
        "abort" => {
            let AbortWire { request_id } = typed(fields)?;
            check_id("requestId", &request_id)?;
            Ok(Request::Abort { request_id })
        }
        "send" => {
            let SendWire {
                request_id,
                id,
                trigger,
                message_id,
                messages,
                headers,
                body,
                metadata,
            } = typed(fields)?;
            check_id("requestId", &request_id)?;
            check_id("id", &id)?;
            if let Some(m) = &message_id {
                check_id("messageId", m)?;
            }
            let trigger = match trigger.as_str() {
                "submit-message" => Trigger::SubmitMessage,
                "regenerate-message" => Trigger::RegenerateMessage,
                _ => {
                    return Err(invalid(
                        "trigger",
                        "must be `submit-message` or `regenerate-message`",
                    ));
                }
            };
            for (i, m) in messages.iter().enumerate() {
                check_message(i, m)?;
            }
            Ok(Request::Send(Send {
                request_id,
                id,
                trigger,
                message_id,
                messages,
                headers: check_headers(headers)?,
                body: check_body(body)?,
                metadata,
            }))
        }
        "resume" => {
            let ResumeWire {
                request_id,
                id,
                last_sequence,
                headers,
                body,
                metadata,
            } = typed(fields)?;
            check_id("requestId", &request_id)?;
            check_id("id", &id)?;
            Ok(Request::Resume(Resume {
                request_id,
                id,
                last_sequence,
                headers: check_headers(headers)?,
                body: check_body(body)?,
                metadata,
            }))
        }
        _ => Err(invalid("type", "must be `send`, `resume` or `abort`")),
    }
}

fn check_id(field: &str, v: &str) -> Result<(), FrameError> {
    if v.is_empty() || v.len() > MAX_ID_BYTES {
        return Err(invalid(field, format!("must be 1 to {MAX_ID_BYTES} bytes")));
    }
    Ok(())
}

/// A UI message: an object with a string `id`, a `role` of `system`,
/// `user` or `assistant`, and an array of `parts` (each an object with a
/// string `type`); other fields (`metadata`) pass as they are.
fn check_message(i: usize, m: &Value) -> Result<(), FrameError> {
    let at = |f: &str| format!("messages[{i}].{f}");
    let Value::Object(o) = m else {
        return Err(invalid(format!("messages[{i}]"), "must be an object"));
    };
    if !o.get("id").is_some_and(Value::is_string) {
        return Err(invalid(at("id"), "must be a string"));
    }
    match o.get("role").and_then(Value::as_str) {
        Some("system" | "user" | "assistant") => {}
        _ => {
            return Err(invalid(
                at("role"),
                "must be `system`, `user` or `assistant`",
            ));
        }
    }
    let Some(Value::Array(parts)) = o.get("parts") else {
        return Err(invalid(at("parts"), "must be an array"));
    };
    for (j, p) in parts.iter().enumerate() {
        if !p.get("type").is_some_and(Value::is_string) {
            return Err(invalid(at(&format!("parts[{j}].type")), "must be a string"));
        }
    }
    Ok(())
}

/// Header names lower-cased; bounded in number and size.
fn check_headers(headers: HashMap<String, String>) -> Result<HashMap<String, String>, FrameError> {
    if headers.len() > MAX_HEADERS {
        return Err(invalid(
            "headers",
            format!("must have at most {MAX_HEADERS} entries"),
        ));
    }
    let mut out = HashMap::with_capacity(headers.len());
    for (name, value) in headers {
        if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
            return Err(invalid(
                "headers",
                format!("a name must be 1 to {MAX_HEADER_NAME_BYTES} bytes"),
            ));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(invalid(
                format!("headers.{name}"),
                format!("must be at most {MAX_HEADER_VALUE_BYTES} bytes"),
            ));
        }
        out.insert(name.to_ascii_lowercase(), value);
    }
    Ok(out)
}

/// `body` is an object (absent or `null`: an empty one).
fn check_body(body: Option<Value>) -> Result<Value, FrameError> {
    match body {
        None | Some(Value::Null) => Ok(Value::Object(Default::default())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err(invalid("body", "must be an object")),
    }
}

/// A server frame.
#[derive(Debug, Clone, Copy)]
pub enum Response<'a> {
    /// A resume found an active response.
    Start {
        /// The request answered.
        request_id: &'a str,
    },
    /// One UI message chunk of the response, numbered.
    Chunk {
        /// The request answered.
        request_id: &'a str,
        /// From 0, no gap, per request.
        sequence: u64,
        /// The chunk, serialized JSON (an object with a `type`).
        chunk: &'a RawValue,
    },
    /// The response is complete.
    End {
        /// The request answered.
        request_id: &'a str,
    },
    /// The response failed.
    Error {
        /// The request answered.
        request_id: &'a str,
        /// What the user may be told.
        error_text: &'a str,
    },
    /// A resume found nothing active; a send closed without an answer.
    NoActive {
        /// The request answered.
        request_id: &'a str,
    },
}

impl Response<'_> {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        #[serde(tag = "type", rename_all = "kebab-case")]
        enum Out<'a> {
            Start {
                #[serde(rename = "requestId")]
                request_id: &'a str,
            },
            Chunk {
                #[serde(rename = "requestId")]
                request_id: &'a str,
                sequence: u64,
                chunk: &'a RawValue,
            },
            End {
                #[serde(rename = "requestId")]
                request_id: &'a str,
            },
            Error {
                #[serde(rename = "requestId")]
                request_id: &'a str,
                #[serde(rename = "errorText")]
                error_text: &'a str,
            },
            NoActive {
                #[serde(rename = "requestId")]
                request_id: &'a str,
            },
        }
        let out = match *self {
            Response::Start { request_id } => Out::Start { request_id },
            Response::Chunk {
                request_id,
                sequence,
                chunk,
            } => Out::Chunk {
                request_id,
                sequence,
                chunk,
            },
            Response::End { request_id } => Out::End { request_id },
            Response::Error {
                request_id,
                error_text,
            } => Out::Error {
                request_id,
                error_text,
            },
            Response::NoActive { request_id } => Out::NoActive { request_id },
        };
        // Serializing borrowed strings and raw JSON cannot fail.
        serde_json::to_string(&out).unwrap_or_default()
    }
}

/// The responses open on one socket, by `requestId`, each with the next
/// `sequence` it writes: 0, 1, 2, … with no gap (the transport errors every
/// stream of the socket on a gap).
#[derive(Debug, Default)]
pub struct Responses {
    next: HashMap<String, u64>,
}

impl Responses {
    /// Open a response for `request_id`; false if one is open already.
    pub fn open(&mut self, request_id: &str) -> bool {
        if self.next.contains_key(request_id) {
            return false;
        }
        self.next.insert(request_id.to_owned(), 0);
        true
    }

    /// The sequence of the next chunk of `request_id`, or `None` if that
    /// response is not open (never opened, or ended).
    pub fn next_sequence(&mut self, request_id: &str) -> Option<u64> {
        let n = self.next.get_mut(request_id)?;
        let seq = *n;
        *n += 1;
        Some(seq)
    }

    /// Close `request_id` (after `end`, `error` or an abort); true if it was open.
    pub fn close(&mut self, request_id: &str) -> bool {
        self.next.remove(request_id).is_some()
    }

    /// Responses open.
    pub fn len(&self) -> usize {
        self.next.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }
}

/// How a response ended: what the last frame after its chunks is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `finish`, then `end`: the answer is complete.
    Finished,
    /// The `error` chunk, then the `error` frame with this text.
    Failed(String),
    /// `abort`, then `end`: the run was cancelled.
    Aborted,
}

/// Herald's agent run events as AI SDK UI message chunks, for one response
/// (one run): `agent_started` → `start` (its `messageId` the run id, or the
/// event's `data.ui_message_id`, stable across replays; once, however many
/// `agent_started` the run has); `agent_thinking` → reasoning;
/// `tool_executing` / `tool_completed` → tool input / output (by
/// `tool_call_id`, or paired by tool name when the events carry none);
/// `agent_text_delta` → text, one text part per Herald part;
/// `agent_completed` → `finish`; `agent_error` → `error`;
/// `agent_cancelled` → `abort`. A part left open is ended before whatever
/// comes next, so every `*-start` has its `*-end`. Other events (the
/// application's own) are not part of the UI message: none.
#[derive(Debug, Default)]
pub struct Chunks {
    /// The `start` chunk was written.
    started: bool,
    /// The text or reasoning part open now: (kind, id).
    open: Option<(&'static str, String)>,
    /// Reasoning parts started so far (their ids are `reasoning-<n>`).
    reasonings: u64,
    /// Tool calls without an id: their names, in the order they started.
    unnamed_calls: Vec<(String, String)>,
    /// Tool calls started so far (ids of calls that carry none).
    calls: u64,
    /// How the run ended, once it did (nothing more follows).
    ended: Option<Ending>,
}

impl Chunks {
    /// The chunks `event` of this run makes (its `data` as published).
    pub fn on_event(&mut self, event: &str, run_id: &str, data: &Value) -> Vec<Value> {
        use serde_json::json;
        let mut out = Vec::new();
        if self.ended.is_some() {
            return out;
        }
        let text = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or_default();
        match event {
            "agent_started" if !std::mem::replace(&mut self.started, true) => {
                let id = data
                    .get("ui_message_id")
                    .and_then(Value::as_str)
                    .unwrap_or(run_id);
                let mut start = json!({"type": "start", "messageId": id});
                if let Some(meta) = data.get("message_metadata") {
                    start["messageMetadata"] = meta.clone();
                }
                out.push(start);
            }
            "agent_thinking" => {
                if !matches!(&self.open, Some(("reasoning", _))) {
                    self.end_open(&mut out);
                    self.reasonings += 1;
                    let id = format!("reasoning-{}", self.reasonings);
                    out.push(json!({"type": "reasoning-start", "id": id}));
                    self.open = Some(("reasoning", id));
                }
                if let Some((_, id)) = &self.open {
                    out.push(json!({"type": "reasoning-delta", "id": id, "delta": text("text")}));
                }
            }
            "agent_text_delta" => {
                // A part named `reasoning:<id>` is reasoning (how the UI
                // chunk ingest stores it, compacted like any text).
                let part = text("part");
                let (kind, id) = match part.strip_prefix(REASONING_PART) {
                    Some(id) => ("reasoning", id),
                    None => ("text", part),
                };
                if !matches!(&self.open, Some((k, open)) if *k == kind && open == id) {
                    self.end_open(&mut out);
                    out.push(json!({"type": format!("{kind}-start"), "id": id}));
                    self.open = Some((kind, id.to_owned()));
                }
                out.push(json!({"type": format!("{kind}-delta"), "id": id, "delta": text("text")}));
            }
            UI_CHUNK => {
                let Some(chunk) = data.get("chunk").filter(|c| check_chunk(c).is_ok()) else {
                    return out;
                };
                match chunk.get("type").and_then(Value::as_str) {
                    // The end of a part: written if that part is open (a
                    // part ended already, by what came between, is not
                    // ended twice).
                    Some(end @ ("text-end" | "reasoning-end")) => {
                        let kind = &end[..end.len() - "-end".len()];
                        let id = chunk.get("id").and_then(Value::as_str);
                        if matches!(&self.open, Some((k, open)) if *k == kind && Some(open.as_str()) == id)
                        {
                            self.open = None;
                            out.push(chunk.clone());
                        }
                    }
                    // A step's bounds end its parts (the SDK forgets the
                    // open parts there); other chunks (sources, files,
                    // data, approvals) sit beside an open part.
                    Some("start-step" | "finish-step" | "reset-step") => {
                        self.end_open(&mut out);
                        out.push(chunk.clone());
                    }
                    _ => out.push(chunk.clone()),
                }
            }
            "tool_executing" => {
                self.end_open(&mut out);
                let name = text("tool");
                let id = match data.get("tool_call_id").and_then(Value::as_str) {
                    Some(id) => id.to_owned(),
                    None => {
                        self.calls += 1;
                        let id = format!("call-{}", self.calls);
                        self.unnamed_calls.push((name.to_owned(), id.clone()));
                        id
                    }
                };
                let input = data.get("input").cloned().unwrap_or(Value::Null);
                out.push(json!({"type": "tool-input-available", "toolCallId": id, "toolName": name, "input": input}));
            }
            "tool_completed" => {
                self.end_open(&mut out);
                let name = text("tool");
                let id = match data.get("tool_call_id").and_then(Value::as_str) {
                    Some(id) => Some(id.to_owned()),
                    None => self
                        .unnamed_calls
                        .iter()
                        .position(|(n, _)| n == name)
                        .map(|i| self.unnamed_calls.remove(i).1),
                };
                if let Some(id) = id {
                    match data.get("error").and_then(Value::as_str) {
                        Some(error) => out.push(
                            json!({"type": "tool-output-error", "toolCallId": id, "errorText": error}),
                        ),
                        None => {
                            let output = data.get("output").cloned().unwrap_or(Value::Null);
                            out.push(json!({"type": "tool-output-available", "toolCallId": id, "output": output}));
                        }
                    }
                }
            }
            "agent_completed" => {
                self.end_open(&mut out);
                let mut finish = json!({"type": "finish"});
                if let Some(reason) = data
                    .get("finish_reason")
                    .and_then(Value::as_str)
                    .filter(|r| FINISH_REASONS.contains(r))
                {
                    finish["finishReason"] = json!(reason);
                }
                if let Some(meta) = data.get("message_metadata") {
                    finish["messageMetadata"] = meta.clone();
                }
                out.push(finish);
                self.ended = Some(Ending::Finished);
            }
            "agent_error" => {
                self.end_open(&mut out);
                let why = match (text("message"), text("reason")) {
                    ("", "") => "the agent failed".to_owned(),
                    ("", reason) => format!("the agent failed: {reason}"),
                    (message, _) => message.to_owned(),
                };
                out.push(json!({"type": "error", "errorText": why}));
                self.ended = Some(Ending::Failed(why));
            }
            "agent_cancelled" => {
                self.end_open(&mut out);
                out.push(json!({"type": "abort"}));
                self.ended = Some(Ending::Aborted);
            }
            _ => {}
        }
        out
    }

    /// Whether the run ended (nothing more follows).
    pub fn ended(&self) -> bool {
        self.ended.is_some()
    }

    /// How the run ended, once it did.
    pub fn ending(&self) -> Option<&Ending> {
        self.ended.as_ref()
    }

    fn end_open(&mut self, out: &mut Vec<Value>) {
        if let Some((kind, id)) = self.open.take() {
            let end = if kind == "text" {
                "text-end"
            } else {
                "reasoning-end"
            };
            out.push(serde_json::json!({"type": end, "id": id}));
        }
    }
}

/// The event that carries a UI message chunk Herald has no event of its
/// own for (`data` is `{"chunk": …}`); written to `/ai` sockets as it is.
pub const UI_CHUNK: &str = "ui_chunk";
/// Text parts whose name starts with this are reasoning (the UI chunk
/// ingest stores `reasoning-delta`s as such parts, compacted like text).
pub const REASONING_PART: &str = "reasoning:";
/// `finish.finishReason`'s values.
const FINISH_REASONS: [&str; 7] = [
    "stop",
    "length",
    "content-filter",
    "tool-calls",
    "error",
    "interrupted",
    "other",
];

/// What a field of a UI message chunk must be.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    Obj,
    Arr,
    Any,
}

/// Named fields and the kind of value each must hold.
type Fields = &'static [(&'static str, Kind)];

/// The chunk types the AI SDK's `uiMessageChunkSchema` (ai 7) accepts, with
/// their required and optional typed fields (other fields pass, as the
/// schema's loose objects let them).
fn chunk_fields(kind: &str) -> Option<(Fields, Fields)> {
    use Kind::*;
    const PM: (&str, Kind) = ("providerMetadata", Obj);
    const TOOL_OPT: &[(&str, Kind)] = &[
        ("providerExecuted", Bool),
        PM,
        ("toolMetadata", Obj),
        ("dynamic", Bool),
        ("title", Str),
    ];
    Some(match kind {
        "text-start" | "reasoning-start" | "reasoning-end" => (&[("id", Str)], &[PM]),
        "text-delta" | "reasoning-delta" => (&[("id", Str), ("delta", Str)], &[PM]),
        "text-end" => (&[("id", Str)], &[("citations", Arr), PM]),
        "error" => (&[("errorText", Str)], &[]),
        "tool-input-start" => (&[("toolCallId", Str), ("toolName", Str)], TOOL_OPT),
        "tool-input-delta" => (&[("toolCallId", Str), ("inputTextDelta", Str)], &[]),
        "tool-input-available" => (
            &[("toolCallId", Str), ("toolName", Str), ("input", Any)],
            TOOL_OPT,
        ),
        "tool-input-error" => (
            &[
                ("toolCallId", Str),
                ("toolName", Str),
                ("input", Any),
                ("errorText", Str),
            ],
            TOOL_OPT,
        ),
        "tool-approval-request" => (
            &[("approvalId", Str), ("toolCallId", Str)],
            &[("reason", Str), ("isAutomatic", Bool), ("signature", Str)],
        ),
        "tool-approval-response" => (
            &[("approvalId", Str), ("approved", Bool)],
            &[("reason", Str), ("providerExecuted", Bool), PM],
        ),
        "tool-output-available" => (
            &[("toolCallId", Str), ("output", Any)],
            &[
                ("providerExecuted", Bool),
                PM,
                ("toolMetadata", Obj),
                ("dynamic", Bool),
                ("preliminary", Bool),
            ],
        ),
        "tool-output-error" => (
            &[("toolCallId", Str), ("errorText", Str)],
            &[
                ("providerExecuted", Bool),
                PM,
                ("toolMetadata", Obj),
                ("dynamic", Bool),
            ],
        ),
        "tool-output-denied" => (&[("toolCallId", Str)], &[]),
        "custom" => (&[("kind", Str)], &[PM]),
        "source-url" => (&[("sourceId", Str), ("url", Str)], &[("title", Str), PM]),
        "source-document" => (
            &[("sourceId", Str), ("mediaType", Str), ("title", Str)],
            &[("filename", Str), PM],
        ),
        "file" | "reasoning-file" => (&[("url", Str), ("mediaType", Str)], &[PM]),
        "start-step" | "finish-step" | "reset-step" => (&[], &[]),
        "start" => (&[], &[("messageId", Str), ("messageMetadata", Any)]),
        "finish" => (&[], &[("finishReason", Str), ("messageMetadata", Any)]),
        "abort" => (&[], &[("reason", Str)]),
        "message-metadata" => (&[("messageMetadata", Any)], &[]),
        k if k.starts_with("data-") => (&[("data", Any)], &[("id", Str), ("transient", Bool)]),
        _ => return None,
    })
}

/// Whether `chunk` is a UI message chunk the AI SDK's transport accepts:
/// an object of a known `type` with its fields' types (the transport closes
/// the socket, and errors every stream on it, at a chunk it refuses).
pub fn check_chunk(chunk: &Value) -> Result<(), String> {
    let Some(obj) = chunk.as_object() else {
        return Err("a chunk must be a JSON object".into());
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return Err("a chunk needs a string `type`".into());
    };
    let Some((required, optional)) = chunk_fields(kind) else {
        return Err(format!("`{kind}` is not a UI message chunk type"));
    };
    let fits = |v: &Value, k: Kind| match k {
        Kind::Str => v.is_string(),
        Kind::Bool => v.is_boolean(),
        Kind::Obj => v.is_object(),
        Kind::Arr => v.is_array(),
        Kind::Any => true,
    };
    for (name, k) in required {
        match obj.get(*name) {
            Some(v) if fits(v, *k) => {}
            // `input`/`output`/`data` may be any JSON but must be there.
            _ => return Err(format!("`{kind}` needs `{name}` of the right type")),
        }
    }
    for (name, k) in optional {
        if let Some(v) = obj.get(*name)
            && !fits(v, *k)
        {
            return Err(format!("`{kind}`: `{name}` has the wrong type"));
        }
    }
    if kind == "finish"
        && let Some(r) = obj.get("finishReason").and_then(Value::as_str)
        && !FINISH_REASONS.contains(&r)
    {
        return Err(format!(
            "`finish`: `finishReason` `{r}` is not one the SDK knows"
        ));
    }
    Ok(())
}

/// How the UI chunk ingest stores one chunk in the user's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// An `agent_text_delta` of `part` (text, or `reasoning:<id>`): the
    /// `index`-th of its part in this request, so a resend is skipped.
    Delta {
        /// The part.
        part: String,
        /// The text it appends.
        text: String,
        /// Its position among its part's deltas of the request, from 0.
        index: u64,
    },
    /// Any other event; `nth` counts the request's events from 0 (its
    /// idempotency key, so a resend is skipped).
    Event {
        /// The event name.
        event: &'static str,
        /// Its data.
        data: Value,
        /// Its position among the request's events.
        nth: u64,
    },
    /// Nothing to store (a part's start: written again when it opens).
    Nothing,
}

/// The UI message chunk ingest of one request: each chunk a backend's
/// `toUIMessageStream()` writes, as the event Herald stores — so `/ws`
/// clients see the same run, and `/ai` sockets get the chunks back through
/// [`Chunks`]: `start` → `agent_started`; `text-delta` → `agent_text_delta`
/// (part = its id) and `reasoning-delta` → `agent_text_delta` (part =
/// `reasoning:<id>`), both compacted in history; `tool-input-available` →
/// `tool_executing`; `tool-output-available` / `tool-output-error` →
/// `tool_completed` (with `output` / `error`); `finish` →
/// `agent_completed`; `error` → `agent_error`; `abort` → `agent_cancelled`;
/// `text-start` / `reasoning-start` and the streamed tool input
/// (`tool-input-start`, `tool-input-delta`) → nothing (the part opens with
/// its first delta; the input arrives whole); every other chunk → a
/// [`UI_CHUNK`] event that carries it.
#[derive(Debug, Default)]
pub struct Ingest {
    /// Deltas per part so far.
    deltas: HashMap<String, u64>,
    /// Tool names by call id (an output chunk names only the call).
    tools: HashMap<String, String>,
    /// Events so far.
    events: u64,
}

impl Ingest {
    /// Store one chunk; an invalid chunk is refused with why.
    pub fn chunk(&mut self, chunk: Value) -> Result<Stored, String> {
        use serde_json::json;
        check_chunk(&chunk)?;
        let s = |k: &str| {
            chunk
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let kind = s("type");
        let (event, data) = match kind.as_str() {
            "text-delta" | "reasoning-delta" => {
                let part = if kind == "text-delta" {
                    s("id")
                } else {
                    format!("{REASONING_PART}{}", s("id"))
                };
                if part.is_empty() || part.len() > crate::text::MAX_PART_LEN {
                    return Err("a part id must be 1 to 128 bytes".into());
                }
                let n = self.deltas.entry(part.clone()).or_default();
                let index = *n;
                *n += 1;
                return Ok(Stored::Delta {
                    part,
                    text: s("delta"),
                    index,
                });
            }
            "text-start" | "reasoning-start" | "tool-input-start" | "tool-input-delta" => {
                return Ok(Stored::Nothing);
            }
            "start" => {
                let mut data = json!({});
                if let Some(id) = chunk.get("messageId") {
                    data["ui_message_id"] = id.clone();
                }
                if let Some(meta) = chunk.get("messageMetadata") {
                    data["message_metadata"] = meta.clone();
                }
                (crate::stream::runs::STARTED, data)
            }
            "tool-input-available" => {
                self.tools.insert(s("toolCallId"), s("toolName"));
                let input = chunk.get("input").cloned().unwrap_or(Value::Null);
                (
                    "tool_executing",
                    json!({"tool": s("toolName"), "tool_call_id": s("toolCallId"), "input": input}),
                )
            }
            "tool-output-available" | "tool-output-error" => {
                let call = s("toolCallId");
                let tool = self.tools.get(&call).cloned().unwrap_or_default();
                let mut data = json!({"tool": tool, "tool_call_id": call});
                if kind == "tool-output-error" {
                    data["error"] = json!(s("errorText"));
                } else {
                    data["output"] = chunk.get("output").cloned().unwrap_or(Value::Null);
                }
                ("tool_completed", data)
            }
            "finish" => {
                let mut data = json!({});
                if let Some(r) = chunk.get("finishReason") {
                    data["finish_reason"] = r.clone();
                }
                if let Some(meta) = chunk.get("messageMetadata") {
                    data["message_metadata"] = meta.clone();
                }
                (crate::stream::runs::COMPLETED, data)
            }
            "error" => (
                crate::stream::runs::ERROR,
                json!({"message": s("errorText")}),
            ),
            "abort" => (
                crate::stream::runs::CANCELLED,
                json!({"reason": s("reason")}),
            ),
            _ => (UI_CHUNK, json!({ "chunk": chunk })),
        };
        let nth = self.events;
        self.events += 1;
        Ok(Stored::Event { event, data, nth })
    }
}

/// In a page of stored event frames (in seq order, the newest of the
/// user's stream), the last run of chat `chat` if it completed or was
/// cancelled in the page — its closing event's `ts` judged `recent` — and
/// started in it (a failed one, never): the run id
/// and its frames, for a resume of a response that has just completed (a
/// reload right after the answer). `None` otherwise.
pub fn ended_run<'a>(
    frames: &[&'a str],
    chat: &str,
    recent: impl Fn(&str) -> bool,
) -> Option<(String, Vec<&'a str>)> {
    let events: Vec<(&str, Event)> = frames
        .iter()
        .filter_map(|f| Some((*f, serde_json::from_str::<Event>(f).ok()?)))
        .collect();
    let (_, last) = events.iter().rev().find(|(_, e)| {
        e.thread_id.as_deref() == Some(chat)
            && e.run_id.is_some()
            && crate::stream::runs::closes(&e.event)
    })?;
    // A failed response is not offered again (a retry starts a new one),
    // as the transport's own server outline does.
    if last.event == crate::stream::runs::ERROR || !last.ts.as_deref().is_some_and(&recent) {
        return None;
    }
    let run = last.run_id.clone()?;
    let mine: Vec<(&str, &Event)> = events
        .iter()
        .filter(|(_, e)| e.run_id.as_deref() == Some(run.as_str()))
        .map(|(f, e)| (*f, e))
        .collect();
    let (_, first) = mine.first()?;
    if first.event != crate::stream::runs::STARTED {
        return None;
    }
    Some((run, mine.into_iter().map(|(f, _)| f).collect()))
}

/// Most responses one socket follows at once.
pub const MAX_FOLLOWS: usize = 16;

/// Why a socket cannot follow one more response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FollowError {
    /// The socket follows [`MAX_FOLLOWS`] responses already.
    #[error("this socket follows {MAX_FOLLOWS} responses already")]
    TooMany,
    /// A response with this `requestId` is open on the socket.
    #[error("request id already in use on this socket")]
    InUse,
}

/// A response a socket stopped following ([`View::abort`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfollowed {
    /// The run it followed.
    pub run_id: String,
    /// It was opened by a `resume` (not by the `send` that started the run).
    pub resumed: bool,
}

/// A stored event frame, as much of it as the view reads.
#[derive(Debug, Clone, Deserialize)]
struct Event {
    seq: u64,
    event: String,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    data: Value,
}

/// Where a followed response is.
#[derive(Debug)]
enum Phase {
    /// Every event of the run is written as it passes.
    Live,
    /// A `resume` waits for the run's history up to `after`; events of the
    /// run past `after` that pass meanwhile are held, in order.
    Replaying { after: u64, held: Vec<Event> },
}

#[derive(Debug)]
struct Follow {
    request_id: Arc<str>,
    run_id: String,
    resumed: bool,
    chunks: Chunks,
    /// The next chunk's `sequence`.
    next: u64,
    phase: Phase,
}

/// A frame waiting to be written: chunks keep their JSON unserialized so a
/// delta can still absorb the next delta of the same part.
#[derive(Debug)]
enum Pending {
    Frame(String),
    Chunk {
        request_id: Arc<str>,
        sequence: u64,
        chunk: Value,
    },
}

/// What one socket of the AI SDK endpoint shows: the responses it follows
/// (each a run of the user's stream, by `requestId`) and the frames waiting
/// to be written.
///
/// Every event of the user's stream passes [`View::on_event`] in seq order,
/// once (the connection's catch-up merge guarantees it); the events of a
/// followed run become chunks, numbered per request from 0 without a gap.
/// A `resume` follows a run from its history: [`View::follow_from`] marks
/// the position its history read stops at, events of the run past it are
/// held until [`View::replayed`] hands the history over, so each event is
/// shown once. Consecutive deltas of one part that have not been written
/// yet are joined into one chunk (a replay's reasoning and text arrive
/// compacted; a slow socket catches up in fewer frames).
#[derive(Debug, Default)]
pub struct View {
    follows: Vec<Follow>,
    out: VecDeque<Pending>,
}

impl View {
    /// Whether the socket follows any response (if not, events pass unread).
    pub fn is_following(&self) -> bool {
        !self.follows.is_empty()
    }

    /// Whether a response for `request_id` is open.
    pub fn follows_request(&self, request_id: &str) -> bool {
        self.follows.iter().any(|f| &*f.request_id == request_id)
    }

    /// Whether frames wait to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    fn check_room(&self, request_id: &str) -> Result<(), FollowError> {
        if self.follows_request(request_id) {
            return Err(FollowError::InUse);
        }
        if self.follows.len() >= MAX_FOLLOWS {
            return Err(FollowError::TooMany);
        }
        Ok(())
    }

    /// Follow `run_id` for `request_id` (a `send`): each of its events
    /// that passes from now on is written.
    pub fn follow(&mut self, request_id: &str, run_id: &str) -> Result<(), FollowError> {
        self.check_room(request_id)?;
        self.follows.push(Follow {
            request_id: request_id.into(),
            run_id: run_id.to_owned(),
            resumed: false,
            chunks: Chunks::default(),
            next: 0,
            phase: Phase::Live,
        });
        Ok(())
    }

    /// Follow `run_id` for `request_id` (a `resume`) from its history up to
    /// seq `after` (the last seq handed to this socket), which
    /// [`View::replayed`] brings; its later events are held until then.
    pub fn follow_from(
        &mut self,
        request_id: &str,
        run_id: &str,
        after: u64,
    ) -> Result<(), FollowError> {
        self.check_room(request_id)?;
        self.follows.push(Follow {
            request_id: request_id.into(),
            run_id: run_id.to_owned(),
            resumed: true,
            chunks: Chunks::default(),
            next: 0,
            phase: Phase::Replaying {
                after,
                held: Vec::new(),
            },
        });
        Ok(())
    }

    /// The run's history for a `resume` of `request_id`: its stored event
    /// frames (seq ≤ the `after` it was followed from), in order. Writes
    /// `start`, the history's chunks, then those of the events held
    /// meanwhile; from here on the response is live. An empty history (the
    /// run closed before the read) answers `no-active` instead. False if
    /// the request is no longer followed.
    pub fn replayed<'a>(
        &mut self,
        request_id: &str,
        history: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        let Some(i) = self
            .follows
            .iter()
            .position(|f| &*f.request_id == request_id)
        else {
            return false;
        };
        let Phase::Replaying { after, held } =
            std::mem::replace(&mut self.follows[i].phase, Phase::Live)
        else {
            return false;
        };
        let run = self.follows[i].run_id.clone();
        let mut events: Vec<Event> = history
            .into_iter()
            .filter_map(|json| serde_json::from_str::<Event>(json).ok())
            .filter(|e| e.seq <= after && e.run_id.as_deref() == Some(run.as_str()))
            .collect();
        // The run closed before its history was read (a resume follows a
        // run open at its mark, so its history starts it): nothing to show,
        // whatever tail of it passed meanwhile.
        if events.is_empty() {
            self.follows.remove(i);
            self.out
                .push_back(Pending::Frame(Response::NoActive { request_id }.to_json()));
            return true;
        }
        self.out
            .push_back(Pending::Frame(Response::Start { request_id }.to_json()));
        events.extend(held);
        for e in &events {
            if self.feed(i, e) {
                break;
            }
        }
        true
    }

    /// One event frame of the user's stream (its stored JSON), in seq
    /// order. A frame that is not an event is ignored.
    pub fn on_event(&mut self, json: &str) {
        if self.follows.is_empty() {
            return;
        }
        let Ok(e) = serde_json::from_str::<Event>(json) else {
            return;
        };
        let Some(run) = e.run_id.as_deref() else {
            return;
        };
        let mut i = 0;
        while i < self.follows.len() {
            let f = &mut self.follows[i];
            if f.run_id != run {
                i += 1;
                continue;
            }
            match &mut f.phase {
                Phase::Replaying { after, held } => {
                    if e.seq > *after {
                        held.push(e.clone());
                    }
                    i += 1;
                }
                Phase::Live => {
                    if !self.feed(i, &e) {
                        i += 1;
                    }
                }
            }
        }
    }

    /// Write the chunks of event `e` for follow `i`; true if that ended
    /// the response (the follow is then gone).
    fn feed(&mut self, i: usize, e: &Event) -> bool {
        let f = &mut self.follows[i];
        let chunks = f.chunks.on_event(&e.event, &f.run_id, &e.data);
        for chunk in chunks {
            let f = &mut self.follows[i];
            if let Some(Pending::Chunk {
                request_id,
                chunk: last,
                ..
            }) = self.out.back_mut()
                && Arc::ptr_eq(request_id, &f.request_id)
                && join_delta(last, &chunk)
            {
                continue;
            }
            let sequence = f.next;
            f.next += 1;
            self.out.push_back(Pending::Chunk {
                request_id: f.request_id.clone(),
                sequence,
                chunk,
            });
        }
        let f = &self.follows[i];
        let Some(ending) = f.chunks.ending() else {
            return false;
        };
        let frame = match ending {
            Ending::Failed(why) => Response::Error {
                request_id: &f.request_id,
                error_text: why,
            },
            Ending::Finished | Ending::Aborted => Response::End {
                request_id: &f.request_id,
            },
        }
        .to_json();
        self.out.push_back(Pending::Frame(frame));
        self.follows.remove(i);
        true
    }

    /// Queue a frame that answers a request outside any followed run
    /// (`no-active`, the `error` of a refused `send`).
    pub fn respond(&mut self, response: Response<'_>) {
        self.out.push_back(Pending::Frame(response.to_json()));
    }

    /// Stop following `request_id` (an `abort`): nothing more is written
    /// for it. `None` if it was not followed.
    pub fn abort(&mut self, request_id: &str) -> Option<Unfollowed> {
        let i = self
            .follows
            .iter()
            .position(|f| &*f.request_id == request_id)?;
        let f = self.follows.remove(i);
        Some(Unfollowed {
            run_id: f.run_id,
            resumed: f.resumed,
        })
    }

    /// End every followed response with an `error` frame saying `why`
    /// (the server stops before they end).
    pub fn fail_all(&mut self, why: &str) {
        for f in std::mem::take(&mut self.follows) {
            self.respond(Response::Error {
                request_id: &f.request_id,
                error_text: why,
            });
        }
    }

    /// The next frame to write, serialized.
    pub fn pop(&mut self) -> Option<String> {
        Some(match self.out.pop_front()? {
            Pending::Frame(text) => text,
            Pending::Chunk {
                request_id,
                sequence,
                chunk,
            } => {
                // A `Value` always serializes.
                let raw = serde_json::value::to_raw_value(&chunk).unwrap_or_default();
                Response::Chunk {
                    request_id: &request_id,
                    sequence,
                    chunk: &raw,
                }
                .to_json()
            }
        })
    }
}

/// Append delta chunk `next` to `last` when both are deltas of the same
/// kind and part (`text-delta`/`reasoning-delta` by `id`,
/// `tool-input-delta` by `toolCallId`); false (nothing changed) otherwise.
fn join_delta(last: &mut Value, next: &Value) -> bool {
    let kind = next.get("type").and_then(Value::as_str).unwrap_or_default();
    let (key, field) = match kind {
        "text-delta" | "reasoning-delta" => ("id", "delta"),
        "tool-input-delta" => ("toolCallId", "inputTextDelta"),
        _ => return false,
    };
    if last.get("type").and_then(Value::as_str) != Some(kind)
        || last.get(key) != next.get(key)
        || last.as_object().is_some_and(|o| o.len() != 3)
        || next.as_object().is_some_and(|o| o.len() != 3)
    {
        return false;
    }
    let (Some(Value::String(a)), Some(b)) =
        (last.get_mut(field), next.get(field).and_then(Value::as_str))
    else {
        return false;
    };
    a.push_str(b);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn send_frame() -> Value {
        json!({
            "type": "send", "requestId": "r1", "id": "chat1", "trigger": "submit-message",
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
            "headers": {"Authorization": "Bearer x"}, "body": {"k": 1}, "metadata": {"a": true}
        })
    }

    #[test]
    fn frames_the_transport_sends_are_read() {
        let Request::Send(s) = parse_request(&send_frame().to_string()).unwrap() else {
            panic!("a send")
        };
        assert_eq!((s.request_id.as_str(), s.id.as_str()), ("r1", "chat1"));
        assert_eq!(s.trigger, Trigger::SubmitMessage);
        assert_eq!(s.message_id, None);
        assert_eq!(
            s.headers.get("authorization").map(String::as_str),
            Some("Bearer x")
        );
        assert_eq!(s.body, json!({"k": 1}));
        assert_eq!(s.metadata, json!({"a": true}));
        // The transport omits what is undefined: lastSequence, metadata.
        let resume =
            json!({"type": "resume", "requestId": "r2", "id": "chat1", "headers": {}, "body": {}});
        assert_eq!(
            parse_request(&resume.to_string()).unwrap(),
            Request::Resume(Resume {
                request_id: "r2".into(),
                id: "chat1".into(),
                last_sequence: None,
                headers: HashMap::new(),
                body: json!({}),
                metadata: Value::Null,
            })
        );
        let abort = parse_request(r#"{"type":"abort","requestId":"r1","later":1}"#).unwrap();
        assert_eq!(abort.request_id(), "r1");
    }

    /// Each malformed frame is refused, naming the field.
    #[test]
    fn malformed_frames_are_refused_by_field() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = send_frame();
            f(&mut v);
            v.to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (with(&|v| v["trigger"] = json!("resubmit")), "trigger"),
            (with(&|v| v["requestId"] = json!("")), "requestId"),
            (with(&|v| v["id"] = json!(long.clone())), "id"),
            (
                with(&|v| v["messages"][0]["role"] = json!("tool")),
                "messages[0].role",
            ),
            (
                with(&|v| v["messages"][0]["parts"] = json!({})),
                "messages[0].parts",
            ),
            (
                with(&|v| v["messages"][0]["parts"][0] = json!({"text": "x"})),
                "messages[0].parts[0].type",
            ),
            (
                with(&|v| v["messages"][0]["id"] = json!(7)),
                "messages[0].id",
            ),
            (with(&|v| v["body"] = json!([1])), "body"),
            (with(&|v| v["headers"]["x"] = json!(1)), "headers.x"),
            (with(&|v| v["messages"] = json!("no")), "messages"),
        ];
        for (frame, field) in cases {
            match parse_request(&frame) {
                Err(FrameError::Invalid { field: f, .. }) => {
                    assert!(f.contains(field), "{frame}: named {f:?}, not {field:?}")
                }
                other => panic!("{frame}: {other:?}"),
            }
        }
        for text in [
            "",
            "[]",
            "7",
            "{",
            r#"{"type":"ping","requestId":"r"}"#,
            r#"{"requestId":"r"}"#,
        ] {
            assert!(parse_request(text).is_err(), "{text}");
        }
    }

    #[test]
    fn server_frames_are_written_as_the_transport_reads_them() {
        let chunk =
            RawValue::from_string(r#"{"type":"text-delta","id":"t1","delta":"Hel\"lo"}"#.into())
                .unwrap();
        let frames = [
            (
                Response::Start { request_id: "r\"1" },
                json!({"type": "start", "requestId": "r\"1"}),
            ),
            (
                Response::Chunk {
                    request_id: "r1",
                    sequence: 3,
                    chunk: &chunk,
                },
                json!({"type": "chunk", "requestId": "r1", "sequence": 3,
                       "chunk": {"type": "text-delta", "id": "t1", "delta": "Hel\"lo"}}),
            ),
            (
                Response::End { request_id: "r1" },
                json!({"type": "end", "requestId": "r1"}),
            ),
            (
                Response::Error {
                    request_id: "r1",
                    error_text: "the agent stopped answering",
                },
                json!({"type": "error", "requestId": "r1", "errorText": "the agent stopped answering"}),
            ),
            (
                Response::NoActive { request_id: "r1" },
                json!({"type": "no-active", "requestId": "r1"}),
            ),
        ];
        for (frame, want) in frames {
            let got: Value = serde_json::from_str(&frame.to_json()).unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn responses_are_numbered_from_zero_without_a_gap() {
        let mut r = Responses::default();
        assert_eq!(r.next_sequence("a"), None, "not open");
        assert!(r.open("a"));
        assert!(!r.open("a"), "open once");
        assert!(r.open("b"));
        assert_eq!(
            (r.next_sequence("a"), r.next_sequence("a")),
            (Some(0), Some(1))
        );
        assert_eq!(r.next_sequence("b"), Some(0));
        assert!(r.close("a"));
        assert!(!r.close("a"));
        assert_eq!(r.next_sequence("a"), None, "ended");
        assert!(r.open("a"), "a new response may reuse the id");
        assert_eq!(r.next_sequence("a"), Some(0));
        assert_eq!(r.len(), 2);
    }

    proptest! {
        /// Any text at all: a frame or a refusal, never a panic.
        #[test]
        fn any_text_is_parsed_or_refused(text in ".{0,200}") {
            let _ = parse_request(&text);
        }

        /// Interleaved responses each see 0, 1, 2, … whatever the order.
        #[test]
        fn sequences_never_skip(order in proptest::collection::vec(0usize..4, 0..200)) {
            let mut r = Responses::default();
            let ids = ["a", "b", "c", "d"];
            for id in ids {
                r.open(id);
            }
            let mut seen = [0u64; 4];
            for i in order {
                prop_assert_eq!(r.next_sequence(ids[i]), Some(seen[i]));
                seen[i] += 1;
            }
        }
    }

    /// The demo agent's golden path, as chunks: every part started is
    /// ended, tool input and output paired by `tool_call_id`, then `finish`.
    #[test]
    fn a_run_maps_to_the_chunks_use_chat_expects() {
        let mut c = Chunks::default();
        let events = [
            ("agent_started", json!({})),
            ("agent_thinking", json!({"text": "Reading"})),
            ("agent_thinking", json!({"text": " more"})),
            (
                "tool_executing",
                json!({"tool": "search", "tool_call_id": "c1", "input": {"q": "x"}}),
            ),
            (
                "tool_completed",
                json!({"tool": "search", "tool_call_id": "c1", "output": {"n": 3}}),
            ),
            ("agent_text_delta", json!({"part": "answer", "text": "Hel"})),
            ("agent_text_delta", json!({"part": "answer", "text": "lo"})),
            ("agent_note", json!({"x": 1})),
            ("agent_completed", json!({"final_response": "Hello"})),
            ("agent_thinking", json!({"text": "after the end"})),
        ];
        let chunks: Vec<Value> = events
            .iter()
            .flat_map(|(e, d)| c.on_event(e, "run-7", d))
            .collect();
        assert_eq!(
            chunks,
            vec![
                json!({"type": "start", "messageId": "run-7"}),
                json!({"type": "reasoning-start", "id": "reasoning-1"}),
                json!({"type": "reasoning-delta", "id": "reasoning-1", "delta": "Reading"}),
                json!({"type": "reasoning-delta", "id": "reasoning-1", "delta": " more"}),
                json!({"type": "reasoning-end", "id": "reasoning-1"}),
                json!({"type": "tool-input-available", "toolCallId": "c1", "toolName": "search", "input": {"q": "x"}}),
                json!({"type": "tool-output-available", "toolCallId": "c1", "output": {"n": 3}}),
                json!({"type": "text-start", "id": "answer"}),
                json!({"type": "text-delta", "id": "answer", "delta": "Hel"}),
                json!({"type": "text-delta", "id": "answer", "delta": "lo"}),
                json!({"type": "text-end", "id": "answer"}),
                json!({"type": "finish"}),
            ]
        );
        assert!(c.ended());
    }

    /// Calls without ids pair by tool name in order; errors and cancels
    /// end the open part and then the stream.
    #[test]
    fn unnamed_calls_errors_and_cancels() {
        let mut c = Chunks::default();
        let mut all = Vec::new();
        for (e, d) in [
            ("tool_executing", json!({"tool": "a", "input": 1})),
            ("tool_executing", json!({"tool": "b", "input": 2})),
            ("tool_completed", json!({"tool": "b", "output": 20})),
            ("tool_completed", json!({"tool": "a", "output": 10})),
            ("agent_text_delta", json!({"part": "p", "text": "x"})),
            ("agent_error", json!({"reason": "run_timeout"})),
        ] {
            all.extend(c.on_event(e, "r", &d));
        }
        let ids: Vec<(&str, &str)> = all
            .iter()
            .filter_map(|v| Some((v["type"].as_str()?, v["toolCallId"].as_str()?)))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("tool-input-available", "call-1"),
                ("tool-input-available", "call-2"),
                ("tool-output-available", "call-2"),
                ("tool-output-available", "call-1"),
            ]
        );
        assert_eq!(
            &all[all.len() - 2..],
            &[
                json!({"type": "text-end", "id": "p"}),
                json!({"type": "error", "errorText": "the agent failed: run_timeout"}),
            ]
        );
        let mut c = Chunks::default();
        c.on_event("agent_thinking", "r", &json!({"text": "t"}));
        assert_eq!(
            c.on_event("agent_cancelled", "r", &json!({})),
            vec![
                json!({"type": "reasoning-end", "id": "reasoning-1"}),
                json!({"type": "abort"})
            ]
        );
    }

    proptest! {
        /// Whatever the events, every part started is ended once, no part
        /// is ended that was not started, and nothing follows the end.
        #[test]
        fn parts_are_balanced(events in proptest::collection::vec(0usize..8, 0..60)) {
            let names = ["agent_started", "agent_thinking", "agent_text_delta", "agent_text_delta",
                         "tool_executing", "tool_completed", "agent_completed", "agent_cancelled"];
            let mut c = Chunks::default();
            let mut open: Option<String> = None;
            let mut ended = false;
            for (k, i) in events.into_iter().enumerate() {
                let data = json!({"text": "t", "part": format!("p{}", k % 2), "tool": "s", "input": 1, "output": 2});
                for chunk in c.on_event(names[i], "r", &data) {
                    prop_assert!(!ended, "a chunk after the end: {}", chunk);
                    let t = chunk["type"].as_str().unwrap_or_default().to_owned();
                    let id = chunk["id"].as_str().map(str::to_owned);
                    if t.ends_with("-start") && t != "start" {
                        prop_assert!(open.is_none(), "two parts open");
                        open = id;
                    } else if t.ends_with("-end") {
                        prop_assert_eq!(open.take(), id);
                    } else if t.ends_with("-delta") {
                        prop_assert_eq!(open.clone(), id);
                    } else if matches!(t.as_str(), "finish" | "abort" | "error") {
                        prop_assert!(open.is_none(), "the end with a part open");
                        ended = true;
                    }
                }
            }
        }
    }
    /// An event frame as the broker stores it.
    fn ev(seq: u64, event: &str, run: &str, data: Value) -> String {
        json!({"type": "event", "seq": seq, "event": event, "run_id": run, "data": data,
               "ts": "2026-12-06T00:00:00Z"})
        .to_string()
    }

    fn drain(v: &mut View) -> Vec<Value> {
        std::iter::from_fn(|| v.pop())
            .map(|t| serde_json::from_str(&t).unwrap())
            .collect()
    }

    /// The text a response's frames show, and whether its sequences ran
    /// 0, 1, 2, … without a gap.
    fn shown(frames: &[Value], request: &str) -> (String, bool) {
        let mut text = String::new();
        let mut next = 0;
        let mut gapless = true;
        for f in frames.iter().filter(|f| f["requestId"] == request) {
            if f["type"] == "chunk" {
                gapless &= f["sequence"] == next;
                next += 1;
                if f["chunk"]["type"] == "text-delta" {
                    text.push_str(f["chunk"]["delta"].as_str().unwrap());
                }
            }
        }
        (text, gapless)
    }

    /// A `send`'s response: the run's events as numbered chunks, then
    /// `end`; other runs' events and non-run events are not shown.
    #[test]
    fn a_followed_run_is_written_and_ended() {
        let mut v = View::default();
        v.on_event(&ev(1, "agent_started", "r1", json!({})));
        assert!(!v.has_output(), "nothing followed");
        v.follow("q1", "r1").unwrap();
        assert_eq!(v.follow("q1", "r2"), Err(FollowError::InUse));
        for e in [
            ev(2, "agent_started", "r1", json!({})),
            ev(
                3,
                "agent_text_delta",
                "r9",
                json!({"part": "a", "text": "other"}),
            ),
            ev(
                4,
                "agent_text_delta",
                "r1",
                json!({"part": "a", "text": "Hi"}),
            ),
            json!({"type": "event", "seq": 5, "event": "note", "data": {}}).to_string(),
        ] {
            v.on_event(&e);
        }
        // Written as they come: the socket takes each before the next.
        let mut frames = drain(&mut v);
        v.on_event(&ev(
            6,
            "agent_text_delta",
            "r1",
            json!({"part": "a", "text": "!"}),
        ));
        v.on_event(&ev(7, "agent_completed", "r1", json!({})));
        v.on_event(&ev(
            8,
            "agent_text_delta",
            "r1",
            json!({"part": "a", "text": "late"}),
        ));
        frames.extend(drain(&mut v));
        let types: Vec<(&str, &str)> = frames
            .iter()
            .map(|f| {
                (
                    f["type"].as_str().unwrap(),
                    f["chunk"]["type"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            types,
            vec![
                ("chunk", "start"),
                ("chunk", "text-start"),
                ("chunk", "text-delta"),
                ("chunk", "text-delta"),
                ("chunk", "text-end"),
                ("chunk", "finish"),
                ("end", ""),
            ]
        );
        assert_eq!(shown(&frames, "q1"), ("Hi!".to_owned(), true));
        assert!(!v.is_following(), "the response ended");
    }

    /// A `resume`: history up to the mark, then the events held while it
    /// was read, each once, after `start`; the run's deltas not yet
    /// written are joined.
    #[test]
    fn a_resume_shows_history_then_what_was_held() {
        let mut v = View::default();
        v.follow_from("q", "r", 4).unwrap();
        // Live events while the history is read: one the history also has
        // (seq 4) and two after it.
        for e in [
            ev(
                4,
                "agent_text_delta",
                "r",
                json!({"part": "a", "text": "c"}),
            ),
            ev(
                5,
                "agent_text_delta",
                "r",
                json!({"part": "a", "text": "d"}),
            ),
            ev(6, "agent_completed", "r", json!({})),
        ] {
            v.on_event(&e);
        }
        assert!(!v.has_output(), "held until the history comes");
        let history = [
            ev(1, "agent_started", "r", json!({})),
            ev(2, "agent_thinking", "r", json!({"text": "hm"})),
            ev(3, "agent_thinking", "r", json!({"text": "m"})),
            ev(
                4,
                "agent_text_delta",
                "r",
                json!({"part": "a", "text": "abc"}),
            ),
            ev(
                4,
                "agent_text_delta",
                "other",
                json!({"part": "a", "text": "x"}),
            ),
        ];
        assert!(v.replayed("q", history.iter().map(String::as_str)));
        let frames = drain(&mut v);
        assert_eq!(frames[0], json!({"type": "start", "requestId": "q"}));
        let chunks: Vec<&Value> = frames[1..].iter().map(|f| &f["chunk"]).collect();
        assert_eq!(
            chunks[..3],
            [
                &json!({"type": "start", "messageId": "r"}),
                &json!({"type": "reasoning-start", "id": "reasoning-1"}),
                &json!({"type": "reasoning-delta", "id": "reasoning-1", "delta": "hmm"}),
            ]
        );
        assert_eq!(shown(&frames, "q"), ("abcd".to_owned(), true));
        assert_eq!(frames.last().unwrap()["type"], "end");
        assert!(!v.replayed("q", []), "no longer followed");
    }

    /// A resume whose run closed before its history was read has nothing
    /// to show: `no-active`, not an empty stream.
    #[test]
    fn a_resume_of_a_closed_run_is_no_active() {
        let mut v = View::default();
        v.follow_from("q", "r", 9).unwrap();
        // Its last event passed after the mark, while the history was read.
        v.on_event(&ev(10, "agent_completed", "r", json!({})));
        assert!(v.replayed("q", []));
        assert_eq!(
            drain(&mut v),
            vec![json!({"type": "no-active", "requestId": "q"})]
        );
        assert!(!v.is_following());
    }

    /// An aborted request gets nothing more; errors and the server's stop
    /// end a response with an `error` frame.
    #[test]
    fn aborts_errors_and_stops() {
        let mut v = View::default();
        v.follow("a", "r1").unwrap();
        v.follow_from("b", "r1", 0).unwrap();
        v.follow("c", "r2").unwrap();
        assert_eq!(
            v.abort("b"),
            Some(Unfollowed {
                run_id: "r1".into(),
                resumed: true
            })
        );
        assert_eq!(v.abort("b"), None);
        v.on_event(&ev(
            1,
            "agent_error",
            "r1",
            json!({"reason": "run_timeout"}),
        ));
        let frames = drain(&mut v);
        assert!(frames.iter().all(|f| f["requestId"] == "a"));
        assert_eq!(
            frames.last().unwrap(),
            &json!({"type": "error", "requestId": "a", "errorText": "the agent failed: run_timeout"})
        );
        v.fail_all("server restarting");
        assert_eq!(
            drain(&mut v),
            vec![json!({"type": "error", "requestId": "c", "errorText": "server restarting"})]
        );
        for i in 0..MAX_FOLLOWS {
            v.follow(&format!("q{i}"), "r").unwrap();
        }
        assert_eq!(v.follow("one more", "r"), Err(FollowError::TooMany));
    }

    proptest! {
        /// Wherever the resume's mark falls and however many live events
        /// pass before the history arrives, the response shows the run's
        /// whole text once, with gapless sequences, and ends once.
        #[test]
        fn a_resume_shows_every_delta_once(
            deltas in proptest::collection::vec("[a-z]{1,3}", 1..30),
            // The caller marks a seq at or past the run's start.
            mark in 1usize..40,
            passed in 0usize..40,
            written_every in 1usize..5,
        ) {
            let mut events = vec![ev(1, "agent_started", "r", json!({}))];
            for (i, d) in deltas.iter().enumerate() {
                events.push(ev(i as u64 + 2, "agent_text_delta", "r", json!({"part": "p", "text": d})));
            }
            events.push(ev(deltas.len() as u64 + 2, "agent_completed", "r", json!({})));
            let mark = mark.min(events.len());
            let mut v = View::default();
            v.follow_from("q", "r", mark as u64).unwrap();
            let passed = (mark + passed).min(events.len());
            for e in &events[..passed] {
                v.on_event(e);
            }
            let mut frames = Vec::new();
            v.replayed("q", events[..mark].iter().map(String::as_str));
            for (k, e) in events[passed..].iter().enumerate() {
                if k % written_every == 0 {
                    frames.extend(drain(&mut v));
                }
                v.on_event(e);
            }
            frames.extend(drain(&mut v));
            let (text, gapless) = shown(&frames, "q");
            prop_assert_eq!(text, deltas.concat());
            prop_assert!(gapless);
            prop_assert_eq!(frames.iter().filter(|f| f["type"] == "end").count(), 1);
            prop_assert_eq!(&frames[0]["type"], "start");
        }
    }
    /// A UI message stream as `streamText(…).toUIMessageStream()` writes it.
    fn ui_stream() -> Vec<Value> {
        vec![
            json!({"type": "start", "messageId": "msg-1"}),
            json!({"type": "start-step"}),
            json!({"type": "reasoning-start", "id": "r0"}),
            json!({"type": "reasoning-delta", "id": "r0", "delta": "Let me "}),
            json!({"type": "reasoning-delta", "id": "r0", "delta": "think."}),
            json!({"type": "reasoning-end", "id": "r0"}),
            json!({"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"}),
            json!({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": "{\"city\":"}),
            json!({"type": "tool-input-available", "toolCallId": "c1", "toolName": "weather", "input": {"city": "Oslo"}}),
            json!({"type": "tool-output-available", "toolCallId": "c1", "output": {"c": 3}}),
            json!({"type": "finish-step"}),
            json!({"type": "start-step"}),
            json!({"type": "text-start", "id": "t0"}),
            json!({"type": "text-delta", "id": "t0", "delta": "It is "}),
            json!({"type": "source-url", "sourceId": "s1", "url": "https://example.com"}),
            json!({"type": "text-delta", "id": "t0", "delta": "3 degrees."}),
            json!({"type": "text-end", "id": "t0"}),
            json!({"type": "data-weather", "data": {"c": 3}}),
            json!({"type": "finish-step"}),
            json!({"type": "finish", "finishReason": "stop"}),
        ]
    }

    /// What a UI message shows: each text and reasoning part's text, the
    /// tools' input and output, the other parts by type, in order (the
    /// essentials of the SDK's `processUIMessageStream`).
    fn assembled(chunks: &[Value]) -> Vec<String> {
        let mut parts: Vec<String> = Vec::new();
        let mut open: HashMap<String, usize> = HashMap::new();
        for c in chunks {
            let t = c["type"].as_str().unwrap();
            let id = c["id"].as_str().unwrap_or_default().to_owned();
            match t {
                "text-start" | "reasoning-start" => {
                    open.insert(format!("{t}{id}"), parts.len());
                    parts.push(format!("{}:", &t[..t.len() - 6]));
                }
                "text-delta" | "reasoning-delta" => {
                    let kind = &t[..t.len() - 6];
                    let i = open[&format!("{kind}-start{id}")];
                    parts[i].push_str(c["delta"].as_str().unwrap());
                }
                "tool-input-available" => {
                    parts.push(format!("tool {} {}", c["toolName"], c["input"]))
                }
                "tool-output-available" => {
                    parts.push(format!("output {} {}", c["toolCallId"], c["output"]))
                }
                "text-end" | "reasoning-end" | "tool-input-start" | "tool-input-delta" => {}
                other => parts.push(other.to_owned()),
            }
        }
        parts
    }

    /// A backend's UI chunks go into the stream as Herald events and come
    /// back out of `Chunks` as the same UI message: every chunk valid.
    #[test]
    fn ui_chunks_round_trip_through_the_stream() {
        let mut ingest = Ingest::default();
        let mut c = Chunks::default();
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for chunk in ui_stream() {
            let (event, data) = match ingest.chunk(chunk).unwrap() {
                Stored::Delta { part, text, index } => {
                    keys.push(format!("{part}#{index}"));
                    ("agent_text_delta", json!({"part": part, "text": text}))
                }
                Stored::Event { event, data, nth } => {
                    keys.push(format!("event#{nth}"));
                    (event, data)
                }
                Stored::Nothing => continue,
            };
            out.extend(c.on_event(event, "run-1", &data));
        }
        for chunk in &out {
            assert_eq!(check_chunk(chunk), Ok(()), "{chunk}");
        }
        assert_eq!(assembled(&out), assembled(&ui_stream()));
        assert_eq!(out[0], json!({"type": "start", "messageId": "msg-1"}));
        assert_eq!(
            out.last().unwrap(),
            &json!({"type": "finish", "finishReason": "stop"})
        );
        // Deltas are numbered per part, other events in order: a resend of
        // the same stream maps to the same keys.
        assert_eq!(
            &keys[..4],
            ["event#0", "event#1", "reasoning:r0#0", "reasoning:r0#1"]
        );
        // Every part started is ended once.
        let starts = out
            .iter()
            .filter(|c| {
                c["type"].as_str().unwrap().ends_with("-start") && c["type"] != "tool-input-start"
            })
            .count();
        let ends = out
            .iter()
            .filter(|c| c["type"].as_str().unwrap().ends_with("-end"))
            .count();
        assert_eq!(starts, ends);
    }

    /// Chunks the SDK would refuse are refused at the ingest, and a
    /// `ui_chunk` event published by hand that carries one is not written.
    #[test]
    fn invalid_ui_chunks_are_refused() {
        for bad in [
            json!("text"),
            json!({"type": 7}),
            json!({"type": "text-delta", "id": "t"}),
            json!({"type": "tool-input-available", "toolCallId": "c", "toolName": "x"}),
            json!({"type": "finish", "finishReason": "because"}),
            json!({"type": "source-url", "sourceId": "s", "url": 1}),
            json!({"type": "text-start", "id": "t", "providerMetadata": "x"}),
            json!({"type": "typing"}),
        ] {
            assert!(check_chunk(&bad).is_err(), "{bad}");
            assert!(Ingest::default().chunk(bad.clone()).is_err(), "{bad}");
            let mut c = Chunks::default();
            assert!(c.on_event(UI_CHUNK, "r", &json!({"chunk": bad})).is_empty());
        }
        for good in [
            json!({"type": "data-x", "data": null, "later": 1}),
            json!({"type": "text-end", "id": "t", "citations": []}),
            json!({"type": "abort"}),
        ] {
            assert_eq!(check_chunk(&good), Ok(()), "{good}");
        }
    }
    /// A response completed moments ago is found whole in the newest
    /// history page; one that started before the page, or ended long ago,
    /// or is another chat's, is not.
    #[test]
    fn a_just_completed_run_is_found_in_the_history_page() {
        let at = |seq: u64, event: &str, run: &str, chat: &str, ts: &str| {
            json!({"type": "event", "seq": seq, "event": event, "run_id": run, "thread_id": chat,
                   "data": {"part": "a", "text": "x"}, "ts": ts})
            .to_string()
        };
        let page = [
            at(1, "agent_started", "r1", "c", "old"),
            at(2, "agent_completed", "r1", "c", "old"),
            at(3, "agent_started", "r2", "c", "new"),
            at(4, "agent_text_delta", "r2", "c", "new"),
            at(5, "agent_started", "r3", "other", "new"),
            at(6, "agent_completed", "r2", "c", "new"),
        ];
        let frames: Vec<&str> = page.iter().map(String::as_str).collect();
        let recent = |ts: &str| ts == "new";
        let (run, mine) = ended_run(&frames, "c", recent).unwrap();
        assert_eq!(run, "r2");
        assert_eq!(mine, vec![frames[2], frames[3], frames[5]]);
        assert!(ended_run(&frames, "c", |_| false).is_none(), "too old");
        assert!(ended_run(&frames, "other", recent).is_none(), "still open");
        assert!(
            ended_run(&frames[3..], "c", recent).is_none(),
            "started before the page"
        );
        assert!(ended_run(&frames, "nobody", recent).is_none());
        let failed = [
            at(7, "agent_started", "r4", "f", "new"),
            at(8, "agent_error", "r4", "f", "new"),
        ];
        let frames: Vec<&str> = failed.iter().map(String::as_str).collect();
        assert!(ended_run(&frames, "f", recent).is_none(), "failed");
    }
    /// Any JSON value, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z:-]{0,12}".prop_map(Value::from),
            Just(json!("text-delta")),
            Just(json!("data-x")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("id".to_owned()),
                        Just("delta".to_owned()),
                        Just("text".to_owned()),
                        Just("part".to_owned()),
                        Just("tool".to_owned()),
                        Just("tool_call_id".to_owned()),
                        Just("chunk".to_owned()),
                        Just("ui_message_id".to_owned()),
                        Just("finish_reason".to_owned()),
                        Just("toolCallId".to_owned()),
                        Just("toolName".to_owned()),
                        Just("input".to_owned()),
                        Just("output".to_owned()),
                        Just("errorText".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..5,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever a backend publishes (any event name among the mapped
        /// ones, any data), every chunk written to an `/ai` socket is one
        /// the transport accepts: a bad event never closes a browser's
        /// socket. And any value offered to the UI chunk ingest is stored
        /// or refused, never a panic.
        #[test]
        fn every_chunk_written_is_valid(
            events in proptest::collection::vec((0usize..11, any_json()), 0..30),
        ) {
            let names = ["agent_started", "agent_thinking", "agent_text_delta", "tool_executing",
                         "tool_completed", "agent_completed", "agent_error", "agent_cancelled",
                         UI_CHUNK, "agent_note", "agent_text_delta"];
            let mut c = Chunks::default();
            let mut ingest = Ingest::default();
            for (i, data) in events {
                let _ = ingest.chunk(data.clone());
                for chunk in c.on_event(names[i], "r", &data) {
                    prop_assert_eq!(check_chunk(&chunk), Ok(()), "{} {} -> {}", names[i], data, chunk);
                }
            }
        }
    }
}
