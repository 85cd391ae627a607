//! HTTP: the router and everything it serves — the publish/kick/inspect API
//! ([`api`]), the streaming text ingest ([`ingest`]), health and metrics, the
//! WebSocket upgrade ([`ws`]) and the
//! embedded demo page ([`web`]) and admin page ([`admin`]). Every error is JSON
//! `{"error": "<code>", "message": "...", "field": "..."}` with a fitting status.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::protocol::deserialize_named;
use serde_json::{Value, json};

use crate::app::App;
use crate::broker::BrokerError;

mod admin;
pub(crate) mod api;
mod ingest;
mod web;
mod ws;

use api::MAX_BODY_BYTES;

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    /// For `delta_out_of_order`: the index the part expects next.
    expected: Option<u64>,
}

impl ApiError {
    /// An error with `status`, machine code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            expected: None,
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
            expected: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        if let Some(n) = self.expected {
            body["expected"] = Value::from(n);
        }
        (self.status, Json(body)).into_response()
    }
}

/// All routes of one server.
pub(crate) fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    if app.config().dev_mode {
        router = router
            .route("/", get(web::index))
            .route("/dev/token", post(web::dev_token));
    }
    if app.config().admin.is_some() {
        router = router.merge(admin::routes());
    }
    if app.config().echo_endpoint {
        router = router.route("/echo", get(ws::echo));
    }
    router
        .route("/herald.js", get(web::client_js))
        .route("/ws", get(ws::upgrade))
        .route("/ai", get(ws::ai_upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/events", post(api::publish))
        .route("/api/v1/runs/{run_id}/text", post(ingest::text))
        .route("/api/v1/runs/{run_id}/ui", post(ingest::ui))
        .route("/api/v1/disconnect", post(api::disconnect))
        .route("/api/v1/streams/unsubscribe", post(api::unsubscribe))
        .route("/api/v1/streams/presence", get(api::presence))
        .route("/api/v1/connections", get(api::connections))
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
    if app.is_draining() || !app.broker().is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

/// `GET /metrics`: Prometheus text. A scrape walks every connection for
/// the state and queue gauges (O(connections)), so with `metrics_token` set
/// it answers only `Authorization: Bearer <metrics_token>`.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(token) = &app.config().metrics_token {
        let given = crate::auth::bearer_token(&headers).unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "`/metrics` needs `Authorization: Bearer <metrics_token>`",
            )
            .into_response();
        }
    }
    app.hub().observe_gauges();
    let body = app
        .prometheus()
        .map(crate::telemetry::render)
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// What a broker's failure tells an API caller: 503 `broker_unavailable`
/// when the broker could not do the work (never a success for work that was
/// not done); 500 `stream_error` when the store answered but this stream's
/// data refused it.
fn broker_failed(err: BrokerError) -> ApiError {
    tracing::error!(error = %err, "broker failed");
    let (status, code) = match err {
        BrokerError::Stream(_) => (StatusCode::INTERNAL_SERVER_ERROR, "stream_error"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
    };
    ApiError::new(status, code, err.to_string())
}

/// Check `Authorization: Bearer <api key>` in constant time.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match crate::auth::bearer_token(headers) {
        Some(key) if constant_time_eq(key.as_bytes(), app.config().api_key.as_bytes()) => Ok(()),
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

/// Read a whole (non-streaming) body within the `http_body_timeout`
/// deadline: 413 `body_too_large` past [`MAX_BODY_BYTES`] (at once when the
/// `Content-Length` says so), 408 `body_timeout` when it does not arrive in
/// time, 400 `bad_body` when the connection fails. Call it only after the
/// caller is authorized, so a keyless client never holds a buffer.
async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = |len: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is {len} bytes; the limit is {MAX_BODY_BYTES}"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > MAX_BODY_BYTES as u64
    {
        return Err(too_large(n.to_string()));
    }
    let timeout = app.config().http_body_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {} ms", timeout.as_millis()),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limited {
                Err(too_large(format!("over {MAX_BODY_BYTES}")))
            } else {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("the body could not be read: {e}"),
                ))
            }
        }
    }
}

/// `body` as JSON, or 400 `invalid_json`.
fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
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
