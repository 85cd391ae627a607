//! The backend API: publish events, kick a user, list connections.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use herald_core::protocol::{AGENT_EVENTS, is_valid_event_name};
use herald_core::text::{MAX_PART_LEN, TEXT_DELTA};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, authorize, broker_failed, parse_json, read_body, typed};
use crate::app::App;
use crate::broker::{BrokerError, ConnInfo, FleetRequest, NewEvent, Published, user_stream};

/// What a broker's refusal of a publish tells the caller: 409
/// `delta_out_of_order` (naming the event and the index its part expects;
/// nothing of that user's events was appended), or 503.
fn refused(err: BrokerError, positions: &[usize], batch: bool) -> ApiError {
    match err {
        BrokerError::DeltaOutOfOrder {
            position,
            index,
            expected,
        } => {
            let at = positions.get(position).copied().unwrap_or(0);
            let field = if batch {
                format!("events[{at}].data.index")
            } else {
                "data.index".to_owned()
            };
            ApiError {
                status: StatusCode::CONFLICT,
                code: "delta_out_of_order",
                message: format!("`{field}` is {index}; its part expects {expected}"),
                field: Some(field),
                expected: Some(expected),
            }
        }
        e => broker_failed(e),
    }
}

/// Largest API request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most events in one publish batch.
pub const MAX_BATCH: usize = 1000;
/// Largest event `data`, serialized.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Longest `user_id`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest `thread_id` / `run_id`, in bytes.
pub const MAX_REF_BYTES: usize = 128;

#[derive(Debug, Deserialize)]
struct PublishEvent {
    #[serde(default)]
    user_id: Option<String>,
    /// A shared stream, instead of a user's own (exactly one of the two).
    #[serde(default)]
    stream: Option<String>,
    event: String,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// A text delta's fields.
struct DeltaFields {
    part: String,
    text: String,
    index: Option<u64>,
}

/// A validated event, ready to publish.
struct ValidEvent {
    /// The `user_id` or shared `stream` as given.
    target: String,
    /// The stream it goes to (`user:<user_id>`, or the shared stream).
    stream: String,
    event: String,
    idempotency_key: Option<String>,
    thread_id: Option<String>,
    run_id: Option<String>,
    data: Value,
    delta: Option<DeltaFields>,
}

fn validate(value: Value, at: &str) -> Result<ValidEvent, ApiError> {
    check(typed(value, at)?, at)
}

/// [`validate`] after the types: the limits and rules of each field.
fn check(e: PublishEvent, at: &str) -> Result<ValidEvent, ApiError> {
    let name = |f: &str| {
        if at.is_empty() {
            f.to_owned()
        } else {
            format!("{at}.{f}")
        }
    };
    let (target, stream) = match (e.user_id, e.stream) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                name("stream"),
                "must not be given with `user_id`",
            ));
        }
        (None, None) => return Err(ApiError::field(name("user_id"), "is required")),
        (Some(user), None) => {
            if user.is_empty() || user.len() > MAX_USER_ID_BYTES {
                return Err(ApiError::field(name("user_id"), "must be 1 to 256 bytes"));
            }
            let stream = user_stream(&user);
            (user, stream)
        }
        (None, Some(stream)) => {
            if let Some(problem) = herald_core::protocol::shared_stream_problem(&stream) {
                return Err(ApiError::field(name("stream"), problem));
            }
            (stream.clone(), stream)
        }
    };
    if !is_valid_event_name(&e.event) {
        return Err(ApiError::field(
            name("event"),
            "must be 1 to 64 characters of [A-Za-z0-9_.:-]",
        ));
    }
    for (field, v) in [
        ("thread_id", &e.thread_id),
        ("run_id", &e.run_id),
        ("idempotency_key", &e.idempotency_key),
    ] {
        if let Some(v) = v
            && (v.is_empty() || v.len() > MAX_REF_BYTES)
        {
            return Err(ApiError::field(name(field), "must be 1 to 128 bytes"));
        }
    }
    if (AGENT_EVENTS.contains(&e.event.as_str()) || e.event == TEXT_DELTA) && e.run_id.is_none() {
        return Err(ApiError::field(
            name("run_id"),
            format!("is required for `{}`", e.event),
        ));
    }
    let data = match e.data {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(ApiError::field(name("data"), "must be an object")),
    };
    let size = serialized_len(&data);
    if size > MAX_DATA_BYTES {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "data_too_large",
            message: format!(
                "`{}` is {size} bytes; the limit is {MAX_DATA_BYTES}",
                name("data")
            ),
            field: Some(name("data")),
            expected: None,
        });
    }
    let delta = if e.event == TEXT_DELTA {
        Some(text_delta(&data, &name("data"))?)
    } else {
        None
    };
    Ok(ValidEvent {
        target,
        stream,
        event: e.event,
        idempotency_key: e.idempotency_key,
        thread_id: e.thread_id,
        run_id: e.run_id,
        data,
        delta,
    })
}

/// How many bytes `data` takes serialized, counted without building the text.
fn serialized_len(data: &Value) -> usize {
    /// A writer that only counts.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, data) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// A text delta's `data`: `part` (1 to 128 bytes), `text`, and optionally
/// `index` (its position among the part's deltas, from 0) — nothing else,
/// so history can compact it exactly.
fn text_delta(data: &Value, at: &str) -> Result<DeltaFields, ApiError> {
    let field = |f: &str| format!("{at}.{f}");
    let Value::Object(obj) = data else {
        return Err(ApiError::field(at, "must be an object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "part" | "text" | "index"))
    {
        return Err(ApiError::field(
            field(k),
            "is not allowed: a text delta carries `part`, `text` and `index` only",
        ));
    }
    let part = match obj.get("part") {
        Some(Value::String(p)) if (1..=MAX_PART_LEN).contains(&p.len()) => p.clone(),
        _ => {
            return Err(ApiError::field(
                field("part"),
                "must be a string of 1 to 128 bytes",
            ));
        }
    };
    let Some(Value::String(text)) = obj.get("text") else {
        return Err(ApiError::field(field("text"), "must be a string"));
    };
    let index = match obj.get("index") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ApiError::field(field("index"), "must be a non-negative integer"))?,
        ),
    };
    Ok(DeltaFields {
        part,
        text: text.clone(),
        index,
    })
}

/// A publish body read straight into typed events, with no `Value` tree
/// for the request around each event's `data` (the common case, and most of
/// what parsing a large batch costs). It reads exactly the bodies whose
/// general reading ([`events_of`]) would type every event, and then answers
/// as that does; anything else — duplicate keys, a wrong type, a missing
/// field, `"events": null` — is left to the general reading for its error.
#[derive(Deserialize)]
struct FastBody {
    /// `Some` if the key is there (`Some(None)` for `null`).
    #[serde(default, deserialize_with = "present")]
    events: Option<Option<Vec<PublishEvent>>>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// A field that is there, even as `null`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The events of `body` and whether it was a batch, if [`FastBody`] reads
/// it; `None` sends it to the general reading.
fn events_fast(body: &[u8]) -> Option<Result<(bool, Vec<ValidEvent>), ApiError>> {
    // A derived struct would also read a JSON array, field by field; the
    // general reading refuses any body that is not an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let fast: FastBody = serde_json::from_slice(body).ok()?;
    match fast.events {
        Some(None) => None,
        Some(Some(list)) => {
            if list.len() > MAX_BATCH {
                return Some(Err(too_many(list.len())));
            }
            let events: Result<Vec<_>, _> = list
                .into_iter()
                .enumerate()
                .map(|(i, e)| check(e, &format!("events[{i}]")))
                .collect();
            Some(events.map(|events| (true, events)))
        }
        None => {
            let e = PublishEvent {
                user_id: fast.user_id,
                stream: fast.stream,
                event: fast.event?,
                idempotency_key: fast.idempotency_key,
                thread_id: fast.thread_id,
                run_id: fast.run_id,
                data: fast.data,
            };
            Some(check(e, "").map(|e| (false, vec![e])))
        }
    }
}

/// 413 `batch_too_large` for a batch of `n` events.
fn too_many(n: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
        format!("{n} events in one batch; the limit is {MAX_BATCH}"),
    )
}

/// The events of a publish body and whether it was a batch: read by
/// [`events_fast`] when it can, else by [`events_of`].
fn events_in(body: &[u8]) -> Result<(bool, Vec<ValidEvent>), ApiError> {
    events_fast(body).unwrap_or_else(|| events_general(body))
}

/// The events of a publish body and whether it was a batch, by way of a
/// `Value` tree ([`events_of`]).
fn events_general(body: &[u8]) -> Result<(bool, Vec<ValidEvent>), ApiError> {
    let value = parse_json(body)?;
    let batch = value.get("events").is_some();
    Ok((batch, events_of(value)?))
}

/// The events of a publish body — one event, or `{"events": [...]}` — each
/// validated; the first problem found is the answer.
fn events_of(value: Value) -> Result<Vec<ValidEvent>, ApiError> {
    match value {
        Value::Object(mut obj) if obj.contains_key("events") => {
            let Some(Value::Array(list)) = obj.remove("events") else {
                return Err(ApiError::field("events", "must be an array"));
            };
            if list.len() > MAX_BATCH {
                return Err(too_many(list.len()));
            }
            list.into_iter()
                .enumerate()
                .map(|(i, v)| validate(v, &format!("events[{i}]")))
                .collect()
        }
        v @ Value::Object(_) => Ok(vec![validate(v, "")?]),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "body must be a JSON object",
        )),
    }
}

/// What `POST /api/v1/events` makes of `body` before publishing: the events
/// as (user, event name, data bytes), or the error's status, code and field.
/// For the fuzz targets (`herald::fuzzing`), which also check that
/// [`events_fast`], where it reads a body, answers as the general reading.
pub(crate) fn check_publish_body(body: &[u8]) -> Result<Vec<(String, String, usize)>, ApiRefusal> {
    let summary = |read: Result<(bool, Vec<ValidEvent>), ApiError>| {
        let (_, events) = read.map_err(ApiRefusal::from)?;
        Ok(events
            .into_iter()
            .map(|e| {
                let len = serialized_len(&e.data);
                (e.target, e.event, len)
            })
            .collect())
    };
    let general = events_general(body);
    let general_batch = general.as_ref().ok().map(|(batch, _)| *batch);
    if let Some(fast) = events_fast(body) {
        let fast_batch = fast.as_ref().ok().map(|(batch, _)| *batch);
        let (fast, general) = (summary(fast), summary(general));
        assert_eq!(
            (fast_batch, format!("{fast:?}")),
            (general_batch, format!("{general:?}")),
            "the fast reading of a publish body answers as the general one"
        );
        return fast;
    }
    summary(general)
}

/// The events the publish handler reads in `body` (0 if it refuses it), and
/// the same by the general reading alone: for `benches/publish_body.rs`.
pub(crate) fn count_publish_events(body: &[u8], general_only: bool) -> usize {
    let read = if general_only {
        events_general(body)
    } else {
        events_in(body)
    };
    read.map_or(0, |(_, events)| events.len())
}

/// An API error as data: HTTP status, machine code, the field it names.
#[derive(Debug)]
pub struct ApiRefusal {
    /// HTTP status.
    pub status: u16,
    /// The `error` code of the JSON body.
    pub code: &'static str,
    /// The `field` of the JSON body, if any.
    pub field: Option<String>,
}

impl From<ApiError> for ApiRefusal {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status.as_u16(),
            code: e.code,
            field: e.field,
        }
    }
}

/// `POST /api/v1/events`: one event, or `{"events": [...]}`. The whole body is
/// validated before anything is published, so a bad batch publishes nothing.
pub(super) async fn publish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let body = read_body(&app, &headers, body).await?;
    publish_body(&app, &body).await.map(Json)
}

/// Validate and publish a publish request's body (the API's and the admin
/// page's): `{"results": [...]}`, or the error of the first bad event.
pub(super) async fn publish_body(app: &Arc<App>, body: &[u8]) -> Result<Value, ApiError> {
    let (batch, events) = events_in(body)?;
    let ts = crate::clock::now_rfc3339();
    // One broker call per user (one atomic append each, in the batch's order
    // for that user); the users' calls run concurrently, and the results go
    // back in the order of the request.
    let mut groups: Vec<(String, Vec<usize>, Vec<NewEvent>)> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    let count = events.len();
    for (i, e) in events.into_iter().enumerate() {
        let g = *group_of.entry(e.stream.clone()).or_insert_with(|| {
            groups.push((e.stream.clone(), Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
        let event = match (e.delta, e.run_id) {
            (Some(d), Some(run_id)) => {
                NewEvent::text_delta(run_id, e.thread_id, d.part, &d.text, d.index, ts.clone())
            }
            (_, run_id) => NewEvent::new(e.event, e.thread_id, run_id, e.data, ts.clone()),
        };
        groups[g].2.push(
            NewEvent {
                idempotency_key: e.idempotency_key,
                ..event
            }
            .in_stream(Some(&e.stream)),
        );
    }
    let mut results: Vec<Option<Published>> = vec![None; count];
    for (positions, published) in publish_groups(app, groups).await {
        let published = published.map_err(|e| refused(e, &positions, batch))?;
        for (i, p) in positions.into_iter().zip(published) {
            results[i] = Some(p);
        }
    }
    let results: Vec<Published> = results.into_iter().flatten().collect();
    Ok(json!({ "results": results }))
}

/// One stream's events of a batch: the stream, their places in the request, and the events.
type Group = (String, Vec<usize>, Vec<NewEvent>);

/// Publish each user's group with one broker call, all concurrently. A batch
/// for many users is shared among the runtime's worker threads (one task
/// each), since each call also writes its events to the users' sockets.
async fn publish_groups(
    app: &Arc<App>,
    mut groups: Vec<Group>,
) -> Vec<(Vec<usize>, Result<Vec<Published>, BrokerError>)> {
    async fn run(
        app: &App,
        groups: Vec<Group>,
    ) -> Vec<(Vec<usize>, Result<Vec<Published>, BrokerError>)> {
        let broker = app.broker();
        let calls = groups
            .into_iter()
            .map(|(stream, positions, events)| async move {
                (positions, broker.publish(&stream, events).await)
            });
        futures_util::future::join_all(calls).await
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let share = groups
        .len()
        .div_ceil(workers.max(1))
        .max(MIN_GROUPS_PER_TASK);
    let mut others = Vec::new();
    while groups.len() > share {
        let rest = groups.split_off(share);
        let mine = std::mem::replace(&mut groups, rest);
        let app = app.clone();
        others.push(tokio::spawn(async move { run(&app, mine).await }));
    }
    let mut out = run(app, groups).await;
    for task in others {
        match task.await {
            Ok(done) => out.extend(done),
            // A panic in a broker call: answer 500 rather than a partial success.
            Err(e) => {
                tracing::error!(error = %e, "publish task failed");
                out.push((
                    Vec::new(),
                    Err(BrokerError::Unavailable("publish task failed".into())),
                ));
            }
        }
    }
    out
}

/// Users per task below which a batch is not split (a task costs more than
/// a few users' deliveries).
const MIN_GROUPS_PER_TASK: usize = 8;

#[derive(Debug, Deserialize)]
struct Disconnect {
    user_id: String,
}

/// `POST /api/v1/disconnect`: close every connection of a user with 4409.
pub(super) async fn disconnect(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let body = read_body(&app, &headers, body).await?;
    let d: Disconnect = typed(parse_json(&body)?, "")?;
    if d.user_id.is_empty() || d.user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::field("user_id", "must be 1 to 256 bytes"));
    }
    let n = kick_user(&app, &d.user_id).await?;
    Ok(Json(json!({ "disconnected": n })))
}

/// Close every connection of `user` on every node (4409): how many closed.
pub(super) async fn kick_user(app: &App, user: &str) -> Result<usize, ApiError> {
    let replies = app
        .broker()
        .ask_fleet(FleetRequest::Kick {
            stream: user_stream(user),
        })
        .await
        .map_err(broker_failed)?;
    Ok(replies.iter().map(|r| r.closed).sum())
}

#[derive(Debug, Deserialize)]
struct Unsubscribe {
    stream: String,
    user_id: String,
}

/// `POST /api/v1/streams/unsubscribe`: remove a user from a shared stream
/// on every node at once (each of the user's subscriptions to it ends
/// with `unsubscribed {reason: removed}`). Reply `{"removed": N}`.
pub(super) async fn unsubscribe(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let body = read_body(&app, &headers, body).await?;
    let u: Unsubscribe = typed(parse_json(&body)?, "")?;
    if let Some(problem) = herald_core::protocol::shared_stream_problem(&u.stream) {
        return Err(ApiError::field("stream", problem));
    }
    if u.user_id.is_empty() || u.user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::field("user_id", "must be 1 to 256 bytes"));
    }
    let replies = app
        .broker()
        .ask_fleet(FleetRequest::Unsubscribe {
            stream: u.stream,
            user: u.user_id,
        })
        .await
        .map_err(broker_failed)?;
    let n: usize = replies.iter().map(|r| r.closed).sum();
    Ok(Json(json!({ "removed": n })))
}

#[derive(Debug, Deserialize)]
pub(super) struct PresenceQuery {
    stream: String,
    limit: Option<usize>,
}

/// `GET /api/v1/streams/presence?stream=…[&limit=N]`: who is in a shared
/// stream, on every node (`users` at most `limit`, default and cap
/// `presence_max_listed`; all counted).
pub(super) async fn presence(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    if let Some(problem) = herald_core::protocol::shared_stream_problem(&q.stream) {
        return Err(ApiError::field("stream", problem));
    }
    let max = app.config().presence_max_listed;
    let limit = q.limit.unwrap_or(max).min(max);
    let p = app
        .broker()
        .presence(&q.stream, limit)
        .await
        .map_err(broker_failed)?;
    Ok(Json(json!({
        "stream": q.stream,
        "users": p.users,
        "total_users": p.total_users,
        "total_connections": p.total_connections,
    })))
}

#[derive(Debug, Deserialize)]
pub(super) struct ConnQuery {
    user_id: Option<String>,
    limit: Option<usize>,
}

/// Rows returned by `GET /api/v1/connections` unless `limit` says otherwise.
const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most rows `GET /api/v1/connections` returns.
const MAX_LIST_LIMIT: usize = 10_000;

/// `GET /api/v1/connections[?user_id=][&limit=]`: at most `limit` rows
/// (default 1,000, at most 10,000) in conn_id order; `total` counts them all.
pub(super) async fn connections(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<ConnQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let limit = match q.limit {
        None => DEFAULT_LIST_LIMIT,
        Some(n @ 1..=MAX_LIST_LIMIT) => n,
        Some(_) => return Err(ApiError::field("limit", "must be 1 to 10000")),
    };
    let stream = q.user_id.as_deref().map(user_stream);
    let replies = app
        .broker()
        .ask_fleet(FleetRequest::List {
            stream,
            limit,
            state: None,
        })
        .await
        .map_err(broker_failed)?;
    let total: usize = replies.iter().map(|r| r.total).sum();
    let mut rows: Vec<ConnInfo> = replies.into_iter().flat_map(|r| r.rows).collect();
    rows.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    rows.truncate(limit);
    Ok(Json(
        json!({ "connections": rows, "total": total, "truncated": total > limit }),
    ))
}
