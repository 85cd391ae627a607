//! `POST /api/v1/runs/{run_id}/text`: a run's answer text streamed in one
//! long request, so a backend does not pay one HTTP request per token.
//!
//! The body is newline-delimited JSON, one text delta per line:
//! `{"part":"answer","index":0,"text":"Hel"}` (`index` optional). The server
//! reads the body as it arrives; the complete lines that arrived while the
//! last batch was being published are published as one batch (one broker
//! call), so a producer faster than the broker is batched and a slow one is
//! delivered line by line, never held back to wait for more. The answer comes
//! when the body ends (or at the first problem): how many deltas were
//! appended and skipped as duplicates, and where each part stands. Numbered
//! deltas make a retry safe: resend from anywhere at or before what was
//! appended, and what was appended already is skipped, not appended twice.
//!
//! Bounds, per request: a line is at most [`MAX_LINE_BYTES`]; deltas are
//! appended at most `ingest_rate` a second after a burst of `ingest_burst`
//! (a faster producer is slowed down by not reading, never refused; deltas
//! skipped as duplicates cost nothing, so a resend catches up at once); a
//! request that brings no delta line for `ingest_idle_timeout` (blank lines
//! do not count) is answered 408; a drain answers 503 at once. A run's text
//! is bounded as any run is (`run_too_large`). Each byte of the body is
//! scanned for a line end once, however it is chunked.
//!
//! `POST /api/v1/runs/{run_id}/ui` reads the same way, one AI SDK UI message
//! chunk per line (NDJSON, or the SSE `toUIMessageStream()` piped through
//! `JsonToSseTransformStream` writes), validated as the SDK's transport
//! would and stored as the run's events ([`herald_core::aisdk::Ingest`]):
//! text and reasoning deltas are numbered per part, other events keyed by
//! their position, so a resend of the stream from its first chunk stores
//! nothing twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use herald_core::text::MAX_PART_LEN;
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{MAX_REF_BYTES, MAX_USER_ID_BYTES};
use super::authorize;
use crate::app::App;
use crate::broker::{BrokerError, NewEvent, user_stream};

/// Longest line of the body, in bytes.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most deltas in one broker call. A call's time grows with its deltas, and
/// under overload every stream's call waits behind the others' (on Redis,
/// one script at a time): 32 keeps 1,000 overloaded streams' calls well
/// inside the broker's command timeout while amortizing a call's fixed cost.
const MAX_DELTAS_PER_CALL: usize = 32;
/// Most body bytes taken in one go from what has already arrived.
const READY_BYTES: usize = 8 * 1024;

#[derive(Debug, Deserialize)]
pub(super) struct IngestQuery {
    #[serde(default)]
    user_id: Option<String>,
    /// A shared stream, instead of a user's own (exactly one of the two).
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    part: String,
    text: String,
    #[serde(default)]
    index: Option<u64>,
}

/// What a request did so far; part of every answer.
#[derive(Debug, Default)]
struct Report {
    lines: u64,
    appended: u64,
    duplicates: u64,
    /// Milliseconds the rate bound held this request back.
    throttled_ms: u64,
    /// Broker calls this request made (deltas that arrived together leave
    /// together, up to 32 a call).
    broker_calls: u64,
    last_seq: Option<u64>,
    epoch: Option<String>,
    /// Per part: the index after its last numbered delta of this request.
    next: BTreeMap<String, u64>,
}

impl Report {
    fn json(&self) -> Value {
        json!({
            "lines": self.lines,
            "appended": self.appended,
            "duplicates": self.duplicates,
            "throttled_ms": self.throttled_ms,
            "broker_calls": self.broker_calls,
            "last_seq": self.last_seq,
            "epoch": self.epoch,
            "next": self.next,
        })
    }

    /// The answer to a request that stopped at a problem: the error, and
    /// what was done before it.
    fn refuse(&self, status: StatusCode, code: &str, message: String, extra: Value) -> Response {
        let mut body = self.json();
        body["error"] = json!(code);
        body["message"] = json!(message);
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        (status, Json(body)).into_response()
    }
}

/// One line ready to publish, with the line number it came from.
struct Parsed {
    line: u64,
    what: Item,
}

/// What a line publishes.
enum Item {
    /// A text delta of `part`.
    Delta {
        part: String,
        text: String,
        index: Option<u64>,
    },
    /// Another event of the run (the UI chunk ingest), with the key that
    /// makes a resend of it a duplicate.
    Event {
        event: &'static str,
        data: Value,
        key: String,
    },
}

/// How a request's lines are read.
enum Format {
    /// `…/text`: one text delta per line.
    Text,
    /// `…/ui`: one AI SDK UI message chunk per line, as NDJSON or as the
    /// SSE the SDK writes (`data: {…}`, `data: [DONE]`).
    Ui(herald_core::aisdk::Ingest),
}

impl Format {
    /// The item of one non-blank line (`None`: a line that publishes
    /// nothing, e.g. an SSE comment or a part's start), or why it is refused.
    fn parse(&mut self, run_id: &str, line_no: u64, raw: &[u8]) -> Result<Option<Item>, String> {
        match self {
            Format::Text => parse_delta(line_no, raw).map(Some),
            Format::Ui(ingest) => parse_chunk(ingest, run_id, line_no, raw),
        }
    }
}

fn parse_delta(line_no: u64, raw: &[u8]) -> Result<Item, String> {
    let field = |f: &str| format!("line {line_no}: `{f}`");
    let line: Line = serde_json::from_slice(raw).map_err(|e| {
        format!("line {line_no} is not a delta (`{{\"part\",\"text\",\"index\"}}`): {e}")
    })?;
    if line.part.is_empty() || line.part.len() > MAX_PART_LEN {
        return Err(format!("{} must be 1 to 128 bytes", field("part")));
    }
    Ok(Item::Delta {
        part: line.part,
        text: line.text,
        index: line.index,
    })
}

/// A UI chunk line: NDJSON (`{…}`) or an SSE line (`data: {…}`; `data:
/// [DONE]`, comments and the other SSE fields publish nothing).
fn parse_chunk(
    ingest: &mut herald_core::aisdk::Ingest,
    run_id: &str,
    line_no: u64,
    raw: &[u8],
) -> Result<Option<Item>, String> {
    use herald_core::aisdk::Stored;
    let payload = match raw.strip_prefix(b"data:") {
        Some(rest) => rest.strip_prefix(b" ").unwrap_or(rest),
        None if raw.starts_with(b":")
            || raw.starts_with(b"event:")
            || raw.starts_with(b"id:")
            || raw.starts_with(b"retry:") =>
        {
            return Ok(None);
        }
        None => raw,
    };
    if payload == b"[DONE]" {
        return Ok(None);
    }
    let chunk: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("line {line_no} is not a UI message chunk: {e}"))?;
    Ok(
        match ingest
            .chunk(chunk)
            .map_err(|e| format!("line {line_no}: {e}"))?
        {
            Stored::Delta { part, text, index } => Some(Item::Delta {
                part,
                text,
                index: Some(index),
            }),
            Stored::Event { event, data, nth } => Some(Item::Event {
                event,
                data,
                key: format!("ui\t{run_id}\t{nth}"),
            }),
            Stored::Nothing => None,
        },
    )
}

/// `POST /api/v1/runs/{run_id}/text?user_id=…[&thread_id=…]`.
pub(super) async fn text(
    State(app): State<Arc<App>>,
    Path(run_id): Path<String>,
    query: Result<Query<IngestQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ingest(app, run_id, query, headers, body, Format::Text).await
}

/// `POST /api/v1/runs/{run_id}/ui?user_id=…[&thread_id=…]`: a run's UI
/// message chunks (what the AI SDK's `toUIMessageStream()` writes), as
/// NDJSON or SSE, stored as the run's events
/// ([`herald_core::aisdk::Ingest`]).
pub(super) async fn ui(
    State(app): State<Arc<App>>,
    Path(run_id): Path<String>,
    query: Result<Query<IngestQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let format = Format::Ui(herald_core::aisdk::Ingest::default());
    ingest(app, run_id, query, headers, body, format).await
}

async fn ingest(
    app: Arc<App>,
    run_id: String,
    query: Result<Query<IngestQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
    mut format: Format,
) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return super::ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text())
                .into_response();
        }
    };
    let stream = match (&q.user_id, &q.stream) {
        (Some(_), Some(_)) => {
            return super::ApiError::field("stream", "must not be given with `user_id`")
                .into_response();
        }
        (None, None) => return super::ApiError::field("user_id", "is required").into_response(),
        (Some(user), None) => {
            if user.is_empty() || user.len() > MAX_USER_ID_BYTES {
                return super::ApiError::field("user_id", "must be 1 to 256 bytes").into_response();
            }
            user_stream(user)
        }
        (None, Some(shared)) => {
            if let Some(problem) = herald_core::protocol::shared_stream_problem(shared) {
                return super::ApiError::field("stream", problem).into_response();
            }
            shared.clone()
        }
    };
    for (field, v) in [
        ("run_id", Some(&run_id)),
        ("thread_id", q.thread_id.as_ref()),
    ] {
        if v.is_some_and(|v| v.is_empty() || v.len() > MAX_REF_BYTES) {
            return super::ApiError::field(field, "must be 1 to 128 bytes").into_response();
        }
    }
    let limits = app.config().ingest;
    let started = tokio::time::Instant::now();
    let mut report = Report::default();
    let mut body = body.into_data_stream();
    let mut buf = LineBuf::default();
    // Only a delta line is progress: blank lines do not keep a request open.
    let mut idle_until = started + limits.idle_timeout;
    let mut ended = false;
    while !ended {
        let chunk = tokio::select! {
            chunk = tokio::time::timeout_at(idle_until, body.next()) => chunk,
            () = app.drain_started() => {
                return report.refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "draining",
                    "the server is restarting; resend the deltas not appended to another node".into(),
                    Value::Null,
                );
            }
        };
        match chunk {
            Err(_) => {
                return report.refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "stream_idle",
                    format!("no delta line for {} ms", limits.idle_timeout.as_millis()),
                    Value::Null,
                );
            }
            Ok(None) => ended = true,
            Ok(Some(Err(e))) => return bad_body(&report, &e),
            Ok(Some(Ok(bytes))) => buf.extend(&bytes),
        }
        // Take what else has arrived already: lines that queued up while the
        // last batch was being published leave in one broker call, without
        // waiting for more. hyper hands the body over a chunk at a time from
        // the connection's task, so that task gets one turn (a yield) to
        // decode what it has read before the batch is closed.
        let mut yielded = false;
        while !ended && buf.len() < READY_BYTES {
            match body.next().now_or_never() {
                Some(Some(Ok(bytes))) => {
                    buf.extend(&bytes);
                    yielded = false;
                }
                Some(Some(Err(e))) => return bad_body(&report, &e),
                Some(None) => ended = true,
                None if !yielded => {
                    tokio::task::yield_now().await;
                    yielded = true;
                }
                None => break,
            }
        }
        // The complete lines so far (and, at the end, a last line without `\n`).
        let (lines, start) = buf.lines(ended);
        let mut batch = Vec::new();
        for raw in lines.into_iter().map(|r| &buf.bytes[r]) {
            report.lines += 1;
            if raw.len() > MAX_LINE_BYTES {
                return line_too_large(&report, raw.len());
            }
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match format.parse(&run_id, report.lines, raw) {
                Ok(item) => {
                    idle_until = tokio::time::Instant::now() + limits.idle_timeout;
                    batch.extend(item.map(|what| Parsed {
                        line: report.lines,
                        what,
                    }));
                }
                Err(message) => {
                    // What came before this line in the same read still counts.
                    if let Err(r) =
                        publish(&app, &stream, &run_id, &q, batch, &mut report, started).await
                    {
                        return r;
                    }
                    return report.refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_line",
                        message,
                        json!({ "line": report.lines }),
                    );
                }
            }
        }
        buf.consume(start);
        if buf.len() > MAX_LINE_BYTES {
            report.lines += 1;
            return line_too_large(&report, buf.len());
        }
        if let Err(r) = publish(&app, &stream, &run_id, &q, batch, &mut report, started).await {
            return r;
        }
    }
    (StatusCode::OK, Json(report.json())).into_response()
}

/// The body read so far, split into lines. `bytes[..scanned]` holds no line
/// end past the lines already taken, so each byte is looked at once however
/// the body is chunked (a long line in 1-byte chunks was scanned again with
/// every chunk: quadratic).
#[derive(Debug, Default)]
struct LineBuf {
    bytes: Vec<u8>,
    scanned: usize,
    /// Bytes looked at for a line end, in all (for the test of the above).
    examined: u64,
}

impl LineBuf {
    fn extend(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The complete lines not taken yet, as ranges of `bytes` without their
    /// `\n` (at the `ended` body's end, the last line without one too), and
    /// where the unfinished rest starts.
    fn lines(&mut self, ended: bool) -> (Vec<std::ops::Range<usize>>, usize) {
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(n) = self.bytes[self.scanned..].iter().position(|&b| b == b'\n') {
            self.examined += n as u64 + 1;
            lines.push(start..self.scanned + n);
            start = self.scanned + n + 1;
            self.scanned = start;
        }
        self.examined += (self.bytes.len() - self.scanned) as u64;
        self.scanned = self.bytes.len();
        if ended && start < self.bytes.len() {
            lines.push(start..self.bytes.len());
            start = self.bytes.len();
        }
        (lines, start)
    }

    /// Drop the bytes before `start` (the lines taken).
    fn consume(&mut self, start: usize) {
        self.bytes.drain(..start);
        self.scanned -= start;
    }
}

fn bad_body(report: &Report, e: &axum::Error) -> Response {
    report.refuse(
        StatusCode::BAD_REQUEST,
        "bad_body",
        format!("the body could not be read: {e}"),
        Value::Null,
    )
}

fn line_too_large(report: &Report, len: usize) -> Response {
    report.refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        "line_too_large",
        format!(
            "line {} is over {len} bytes; the limit is {MAX_LINE_BYTES}",
            report.lines
        ),
        json!({ "line": report.lines }),
    )
}

/// Publish `batch` (in broker calls of at most [`MAX_DELTAS_PER_CALL`]), at the rate
/// bound, and record what happened; the answer to send when it failed.
async fn publish(
    app: &App,
    stream: &str,
    run_id: &str,
    q: &IngestQuery,
    batch: Vec<Parsed>,
    report: &mut Report,
    started: tokio::time::Instant,
) -> Result<(), Response> {
    let limits = app.config().ingest;
    let mut batch = batch.into_iter().peekable();
    while batch.peek().is_some() {
        let chunk: Vec<Parsed> = batch.by_ref().take(MAX_DELTAS_PER_CALL).collect();
        // The rate bound: deltas beyond the burst wait their turn. Only
        // appended deltas count: a resend's duplicates cost no budget.
        let sent = report.appended + chunk.len() as u64;
        let due = started
            + Duration::from_millis(sent.saturating_sub(limits.burst) * 1000 / limits.per_second);
        let now = tokio::time::Instant::now();
        if due > now {
            report.throttled_ms += (due - now).as_millis() as u64;
            tokio::time::sleep_until(due).await;
        }
        let ts = crate::clock::now_rfc3339();
        let events = chunk
            .iter()
            .map(|p| match &p.what {
                Item::Delta { part, text, index } => NewEvent::text_delta(
                    run_id.to_owned(),
                    q.thread_id.clone(),
                    part.clone(),
                    text,
                    *index,
                    ts.clone(),
                )
                .in_stream(Some(stream)),
                Item::Event { event, data, key } => {
                    let mut e = NewEvent::new(
                        (*event).to_owned(),
                        q.thread_id.clone(),
                        Some(run_id.to_owned()),
                        data.clone(),
                        ts.clone(),
                    );
                    e.idempotency_key = Some(key.clone());
                    e.in_stream(Some(stream))
                }
            })
            .collect();
        report.broker_calls += 1;
        match app.broker().publish(stream, events).await {
            Ok(results) => {
                for (p, r) in chunk.iter().zip(&results) {
                    if r.duplicate {
                        report.duplicates += 1;
                    } else {
                        report.appended += 1;
                        report.last_seq = Some(r.seq);
                    }
                    if let Item::Delta {
                        part,
                        index: Some(i),
                        ..
                    } = &p.what
                    {
                        let next = report.next.entry(part.clone()).or_default();
                        *next = (*next).max(i + 1);
                    }
                    report.epoch = Some(r.epoch.clone());
                }
            }
            Err(BrokerError::DeltaOutOfOrder {
                position,
                index,
                expected,
            }) => {
                let line = chunk.get(position).map_or(0, |p| p.line);
                return Err(report.refuse(
                    StatusCode::CONFLICT,
                    "delta_out_of_order",
                    format!(
                        "line {line} is delta {index} of its part; the part expects {expected}"
                    ),
                    json!({ "line": line, "expected": expected }),
                ));
            }
            Err(e) => {
                let e = super::broker_failed(e);
                return Err(report.refuse(e.status, e.code, e.message, Value::Null));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 37, finding 12: a 64 KiB line that arrives a byte at a time is
    /// scanned once (65,536 bytes looked at), not once per chunk (2 GiB).
    #[test]
    fn a_line_in_one_byte_chunks_is_scanned_once() {
        let mut buf = LineBuf::default();
        let line = vec![b'x'; 64 * 1024];
        for b in &line {
            buf.extend(std::slice::from_ref(b));
            let (lines, start) = buf.lines(false);
            assert!(lines.is_empty());
            buf.consume(start);
        }
        buf.extend(b"\n{\"a\":1}");
        let (lines, start) = buf.lines(true);
        assert_eq!(lines, vec![0..line.len(), line.len() + 1..line.len() + 8]);
        buf.consume(start);
        assert_eq!(buf.len(), 0);
        assert_eq!(buf.examined, line.len() as u64 + 8);
    }

    /// Lines split anywhere come out whole, in order.
    #[test]
    fn lines_come_out_whole_however_they_are_chunked() {
        let text = b"one\ntwo\n\nthree\nfour";
        for size in 1..text.len() {
            let mut buf = LineBuf::default();
            let mut got = Vec::new();
            for chunk in text.chunks(size) {
                buf.extend(chunk);
                let (lines, start) = buf.lines(false);
                got.extend(lines.into_iter().map(|r| buf.bytes[r].to_vec()));
                buf.consume(start);
            }
            let (lines, start) = buf.lines(true);
            got.extend(lines.into_iter().map(|r| buf.bytes[r].to_vec()));
            buf.consume(start);
            let want: Vec<Vec<u8>> = ["one", "two", "", "three", "four"]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
            assert_eq!(got, want, "chunks of {size}");
        }
    }
}
