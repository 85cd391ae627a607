//! The HTTP API: publish, disconnect, inspect, health, metrics. Every error is
//! JSON `{"error": "<code>", "message": "...", "field": "..."}` with a fitting
//! status.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::CloseReason;
use herald_core::protocol::{AGENT_EVENTS, deserialize_named, is_valid_event_name};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::history::NewEvent;
use crate::registry::Published;
use crate::server::App;

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

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    /// An error with `status`, machine code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = format!("`{field}` {}", message.into());
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message,
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        (self.status, Json(body)).into_response()
    }
}

/// All routes of one server.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    if app.config.dev_mode {
        router = router
            .route("/", get(crate::web::index))
            .route("/dev/token", post(crate::web::dev_token));
    }
    router
        .route("/herald.js", get(crate::web::client_js))
        .route("/ws", get(crate::ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/events", post(publish))
        .route("/api/v1/disconnect", post(disconnect))
        .route("/api/v1/connections", get(connections))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(limit_headers))
        .with_state(app)
}

/// Total size of request headers allowed (names, values and separators).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// 431 when the request's headers exceed [`MAX_HEADER_BYTES`]. hyper's own
/// buffer cap is coarser (it depends on how reads are chunked), so the limit
/// is checked exactly here.
async fn limit_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if size > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers are {size} bytes; the limit is {MAX_HEADER_BYTES}"),
        )
        .into_response();
    }
    next.run(req).await
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.registry.observe_gauges();
    let body = app
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Check `Authorization: Bearer <api key>` in constant time.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match crate::auth::bearer_token(headers) {
        Some(key) if constant_time_eq(key.as_bytes(), app.config.api_key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <api key>` header",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Read a JSON body, mapping every failure to a JSON error (413 for size).
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|rej| {
        let status = rej.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, code, rej.body_text())
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })
}

fn typed<T: serde::de::DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ApiError> {
    deserialize_named(value).map_err(|(field, problem)| {
        let field = match (prefix.is_empty(), field.as_str()) {
            (true, f) => f.to_owned(),
            (false, ".") => prefix.to_owned(),
            (false, f) => format!("{prefix}.{f}"),
        };
        ApiError::field(field, problem)
    })
}

#[derive(Debug, Deserialize)]
struct PublishEvent {
    user_id: String,
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

/// A validated event, ready to publish.
struct ValidEvent {
    user_id: String,
    event: String,
    idempotency_key: Option<String>,
    thread_id: Option<String>,
    run_id: Option<String>,
    data: Value,
}

fn validate(value: Value, at: &str) -> Result<ValidEvent, ApiError> {
    let name = |f: &str| {
        if at.is_empty() {
            f.to_owned()
        } else {
            format!("{at}.{f}")
        }
    };
    let e: PublishEvent = typed(value, at)?;
    if e.user_id.is_empty() || e.user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::field(name("user_id"), "must be 1 to 256 bytes"));
    }
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
    if AGENT_EVENTS.contains(&e.event.as_str()) && e.run_id.is_none() {
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
    let size = serde_json::to_vec(&data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DATA_BYTES {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "data_too_large",
            message: format!(
                "`{}` is {size} bytes; the limit is {MAX_DATA_BYTES}",
                name("data")
            ),
            field: Some(name("data")),
        });
    }
    Ok(ValidEvent {
        user_id: e.user_id,
        event: e.event,
        idempotency_key: e.idempotency_key,
        thread_id: e.thread_id,
        run_id: e.run_id,
        data,
    })
}

/// `POST /api/v1/events`: one event, or `{"events": [...]}`. The whole body is
/// validated before anything is published, so a bad batch publishes nothing.
async fn publish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let value = json_body(body)?;
    let events = match value {
        Value::Object(mut obj) if obj.contains_key("events") => {
            let Some(Value::Array(list)) = obj.remove("events") else {
                return Err(ApiError::field("events", "must be an array"));
            };
            if list.len() > MAX_BATCH {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "batch_too_large",
                    format!(
                        "{} events in one batch; the limit is {MAX_BATCH}",
                        list.len()
                    ),
                ));
            }
            list.into_iter()
                .enumerate()
                .map(|(i, v)| validate(v, &format!("events[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        v @ Value::Object(_) => vec![validate(v, "")?],
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "body must be a JSON object",
            ));
        }
    };
    let ts = now_rfc3339();
    let mut results: Vec<Published> = Vec::with_capacity(events.len());
    for e in events {
        let event = NewEvent {
            idempotency_key: e.idempotency_key,
            ..NewEvent::new(e.event, e.thread_id, e.run_id, e.data, ts.clone())
        };
        let published = app
            .registry
            .publish(&e.user_id, event)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "history store failed on publish");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    err.to_string(),
                )
            })?;
        results.push(published);
    }
    Ok(Json(json!({ "results": results })))
}

#[derive(Debug, Deserialize)]
struct Disconnect {
    user_id: String,
}

/// The current time as RFC 3339 with milliseconds (event `ts`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `POST /api/v1/disconnect`: close every connection of a user with 4409.
async fn disconnect(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let d: Disconnect = typed(json_body(body)?, "")?;
    if d.user_id.is_empty() || d.user_id.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::field("user_id", "must be 1 to 256 bytes"));
    }
    let n = app.registry.close_user(
        &d.user_id,
        CloseReason::Kicked,
        "disconnected by the server",
    );
    Ok(Json(json!({ "disconnected": n })))
}

#[derive(Debug, Deserialize)]
struct ConnQuery {
    user_id: Option<String>,
    limit: Option<usize>,
}

/// Rows returned by `GET /api/v1/connections` unless `limit` says otherwise.
const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most rows `GET /api/v1/connections` returns.
const MAX_LIST_LIMIT: usize = 10_000;

/// `GET /api/v1/connections[?user_id=][&limit=]`: at most `limit` rows
/// (default 1,000, at most 10,000) in conn_id order; `total` counts them all.
async fn connections(
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
    let mut rows = app.registry.list(q.user_id.as_deref());
    let total = rows.len();
    rows.truncate(limit);
    Ok(Json(
        json!({ "connections": rows, "total": total, "truncated": total > limit }),
    ))
}
