//! The admin page (`/admin`): a page, a script and a style sheet embedded in
//! the binary, and the JSON calls they make under `/admin/api/`.
//!
//! Signing in trades the admin secret (`admin_secret`; in development mode
//! without one, a loopback visitor needs none) for a session cookie:
//! `HttpOnly`, `SameSite=Strict`, `Path=/admin`, its value an expiry and an
//! HMAC of it under the secret, so every node of a fleet that shares the
//! secret accepts it and none stores sessions. The secret travels in one
//! POST body, never in a URL, and nothing here logs it. Every call but the
//! sign-in ones also needs the `X-Herald-Admin: 1` header, which a
//! cross-site form cannot send, and a changing call with an `Origin` must
//! come from this host. The page's CSP allows only its own script and style
//! sheet (no inline script or style).
//!
//! What the page shows of the fleet comes from fleet requests (every node's
//! hub answers), and a stream's state from the broker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::{ApiError, broker_failed, constant_time_eq, read_body};
use crate::app::App;
use crate::broker::{ConnInfo, FleetRequest, user_stream};
use crate::config::AdminConfig;

/// The page.
const INDEX_HTML: &str = include_str!("admin/index.html");
/// Its script.
const ADMIN_JS: &str = include_str!("admin/admin.js");
/// Its style sheet.
const ADMIN_CSS: &str = include_str!("admin/admin.css");

/// What the page may load and where it may connect: itself only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

/// The session cookie's name.
const COOKIE: &str = "herald_admin";
/// How long a session lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);
/// Wrong secrets allowed per node per [`FAILURE_WINDOW`] before sign-in
/// answers 429 until the window ends.
const MAX_FAILURES: u32 = 10;
/// The window [`MAX_FAILURES`] counts over.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Events the stream inspector shows.
const LAST_EVENTS: u64 = 20;
/// Connections listed at most per request.
const MAX_ROWS: usize = 1000;
/// The lifecycle states a connection listing can be filtered by.
const STATES: [&str; 3] = ["handshaking", "ready", "closing"];
/// The longest stream or user name accepted.
const MAX_NAME_BYTES: usize = 256;

/// Failed sign-ins of this server: the window's start and its count.
#[derive(Default)]
struct Failures(Mutex<Option<(Instant, u32)>>);

/// The admin routes, mounted when the page is on.
pub(super) fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new()
        .route("/admin", get(index))
        .route("/admin/", get(index))
        .route("/admin/admin.js", get(script))
        .route("/admin/admin.css", get(style))
        .route(
            "/admin/api/session",
            get(session).post(sign_in).delete(sign_out),
        )
        .route("/admin/api/nodes", get(nodes))
        .route("/admin/api/connections", get(connections))
        .route("/admin/api/stream", get(stream))
        .route("/admin/api/kick", post(kick))
        .route("/admin/api/publish", post(publish))
        .layer(Extension(Arc::new(Failures::default())))
}

/// Headers every admin response carries.
fn hardened(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    hardened("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    hardened("text/javascript; charset=utf-8", ADMIN_JS)
}

async fn style() -> Response {
    hardened("text/css; charset=utf-8", ADMIN_CSS)
}

/// The admin settings (routes exist only when they do).
fn admin(app: &App) -> Result<&AdminConfig, ApiError> {
    app.config()
        .admin
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route"))
}

/// A session cookie's value: expiry (Unix seconds) and its HMAC.
fn session_value(secret: &str, expires: u64) -> String {
    format!("{expires}.{}", hex(&mac(secret, expires)))
}

fn mac(secret: &str, expires: u64) -> Vec<u8> {
    // Any key length is accepted by HMAC; the error arm cannot occur.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    m.update(b"herald-admin-session.");
    m.update(expires.to_string().as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `value` is a session this secret signed that has not expired.
fn valid_session(secret: &str, value: &str, now: u64) -> bool {
    let Some((expires, sig)) = value.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    expires > now && constant_time_eq(sig.as_bytes(), hex(&mac(secret, expires)).as_bytes())
}

/// The session cookie of the request, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find_map(|(k, v)| (k == COOKIE).then_some(v))
}

/// Whether the request carries a valid session.
fn signed_in(app: &App, headers: &HeaderMap) -> bool {
    match (app.config().admin.as_ref(), cookie(headers)) {
        (Some(admin), Some(v)) => valid_session(&admin.secret, v, crate::clock::unix_now()),
        _ => false,
    }
}

/// 403 unless the request comes from this host: its `Origin`, when sent,
/// names the `Host` it was sent to.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    match (host, origin_host) {
        (Some(h), Some(o)) if h.eq_ignore_ascii_case(o) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "admin calls are accepted from the admin page's own origin only",
        )),
    }
}

/// Every admin call but the sign-in ones: the header, the origin, a session.
fn guard(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    admin(app)?;
    if headers.get("x-herald-admin").map(HeaderValue::as_bytes) != Some(b"1") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_admin_header",
            "admin calls need the `X-Herald-Admin: 1` header",
        ));
    }
    same_origin(headers)?;
    if !signed_in(app, headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "not_signed_in",
            "sign in to the admin page first",
        ));
    }
    Ok(())
}

/// A call's JSON body: 400 `invalid_json` naming the `expected` shape.
async fn json_body<T: serde::de::DeserializeOwned>(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    expected: &str,
) -> Result<T, ApiError> {
    let body = read_body(app, headers, body).await?;
    serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("expected {expected}"),
        )
    })
}

/// Whether a visitor from `peer` signs in without a secret.
fn secret_free(admin: &AdminConfig, peer: IpAddr) -> bool {
    !admin.needs_secret && super::web::is_loopback(peer)
}

/// `GET /admin/api/session`: `{signed_in, needs_secret}`.
async fn session(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let admin = admin(&app)?;
    Ok(Json(json!({
        "signed_in": signed_in(&app, &headers),
        "needs_secret": !secret_free(admin, peer.ip()),
    })))
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    secret: Option<String>,
}

/// `POST /admin/api/session {"secret": "..."}`: 204 with the session
/// cookie; 401 `bad_secret`; 429 `too_many_attempts` after
/// [`MAX_FAILURES`] wrong secrets within a minute on this node.
async fn sign_in(
    State(app): State<Arc<App>>,
    Extension(failures): Extension<Arc<Failures>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admin = admin(&app)?;
    same_origin(&headers)?;
    let now = crate::clock::now();
    if let Some((start, n)) = *failures.0.lock()
        && n >= MAX_FAILURES
        && now.saturating_duration_since(start) < FAILURE_WINDOW
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many wrong secrets; try again in a minute",
        ));
    }
    let given: SignIn = json_body(&app, &headers, body, "{\"secret\": \"...\"}").await?;
    let accepted = secret_free(admin, peer.ip())
        || (admin.needs_secret
            && given
                .secret
                .is_some_and(|s| constant_time_eq(s.as_bytes(), admin.secret.as_bytes())));
    if !accepted {
        let mut failures = failures.0.lock();
        *failures = match *failures {
            Some((start, n)) if now.saturating_duration_since(start) < FAILURE_WINDOW => {
                Some((start, n + 1))
            }
            _ => Some((now, 1)),
        };
        drop(failures);
        tracing::warn!(peer = %peer.ip(), "admin sign-in refused");
        let message = if admin.needs_secret {
            "wrong admin secret"
        } else {
            "without admin_secret, the admin page signs in loopback visitors only"
        };
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_secret",
            message,
        ));
    }
    let expires = crate::clock::unix_now() + SESSION.as_secs();
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/admin; Max-Age={}; HttpOnly; SameSite=Strict{}",
        session_value(&admin.secret, expires),
        SESSION.as_secs(),
        if secure { "; Secure" } else { "" },
    );
    tracing::info!(peer = %peer.ip(), "admin signed in");
    Ok((
        StatusCode::NO_CONTENT,
        [
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response())
}

/// `DELETE /admin/api/session`: 204, the cookie cleared.
async fn sign_out(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin(&app)?;
    same_origin(&headers)?;
    Ok((
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/admin; Max-Age=0; HttpOnly; SameSite=Strict"),
        )],
    )
        .into_response())
}

/// `GET /admin/api/nodes`: every node's status, by node id.
async fn nodes(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    guard(&app, &headers)?;
    let replies = app
        .broker()
        .ask_fleet(FleetRequest::Status)
        .await
        .map_err(broker_failed)?;
    let mut nodes: Vec<_> = replies.into_iter().filter_map(|r| r.status).collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Json(
        json!({ "nodes": nodes, "asked_at": crate::clock::unix_now_ms() }),
    ))
}

#[derive(Deserialize)]
struct ConnFilter {
    user: Option<String>,
    node: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/api/connections?user=&node=&state=&limit=`.
async fn connections(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<ConnFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    guard(&app, &headers)?;
    let Query(f) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let limit = f.limit.unwrap_or(200).clamp(1, MAX_ROWS);
    let some = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (user, node, state) = (some(f.user), some(f.node), some(f.state));
    if let Some(s) = &state
        && !STATES.contains(&s.as_str())
    {
        return Err(ApiError::field(
            "state",
            "must be one of handshaking, ready, closing",
        ));
    }
    let replies = app
        .broker()
        .ask_fleet(FleetRequest::List {
            stream: user.as_deref().map(user_stream),
            limit,
            state,
        })
        .await
        .map_err(broker_failed)?;
    let (mut total, mut rows) = (0, Vec::<ConnInfo>::new());
    for reply in replies {
        // A node's rows all name it; a node filter keeps its reply only.
        let its = reply.rows.first().map(|r| r.node.clone());
        let wanted = match (&node, &its) {
            (None, _) => true,
            (Some(n), Some(its)) => n == its,
            (Some(_), None) => false,
        };
        if wanted {
            total += reply.total;
            rows.extend(reply.rows);
        }
    }
    rows.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    rows.truncate(limit);
    Ok(Json(
        json!({ "connections": rows, "total": total, "truncated": total > rows.len() }),
    ))
}

#[derive(Deserialize)]
struct StreamQuery {
    name: String,
}

/// `GET /admin/api/stream?name=user:alice`: its position, open runs and
/// last events from history.
async fn stream(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    guard(&app, &headers)?;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let name = q.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.contains(':') {
        return Err(ApiError::field(
            "name",
            "must name a stream like `user:alice` or `room:lobby` (at most 256 bytes)",
        ));
    }
    let broker = app.broker();
    if !broker.exists(name).await.map_err(broker_failed)? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_stream",
            format!("no stream `{name}` (none was published to or joined, or it expired)"),
        ));
    }
    let position = broker.position(name).await.map_err(broker_failed)?;
    let runs = broker.open_runs(name).await.map_err(broker_failed)?;
    let after = position
        .last_seq
        .saturating_sub(LAST_EVENTS)
        .max(position.first_seq.saturating_sub(1));
    let events = broker
        .history(
            name,
            &position.epoch,
            after,
            position.last_seq,
            LAST_EVENTS as usize,
        )
        .await
        .map_err(broker_failed)?;
    let events: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_slice::<Value>(&e.json).ok())
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("type");
            }
            v
        })
        .collect();
    let mut runs: Vec<Value> = runs
        .into_iter()
        .map(|r| json!({"run_id": r.run_id, "thread_id": r.thread_id}))
        .collect();
    runs.sort_by(|a, b| a["run_id"].as_str().cmp(&b["run_id"].as_str()));
    Ok(Json(json!({
        "stream": name,
        "epoch": position.epoch,
        "last_seq": position.last_seq,
        "oldest_seq": position.first_seq,
        "open_runs": runs,
        "events": events,
    })))
}

#[derive(Deserialize)]
struct Kick {
    user: String,
}

/// `POST /admin/api/kick {"user": "alice"}`: close every connection of the
/// user on every node (4409); `{"closed": n}`.
async fn kick(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    guard(&app, &headers)?;
    let k: Kick = json_body(&app, &headers, body, "{\"user\": \"...\"}").await?;
    if k.user.is_empty() || k.user.len() > MAX_NAME_BYTES {
        return Err(ApiError::field("user", "must be 1 to 256 bytes"));
    }
    let closed = super::api::kick_user(&app, &k.user).await?;
    tracing::info!(user_id = %k.user, closed, "admin kicked a user");
    Ok(Json(json!({ "closed": closed })))
}

#[derive(Deserialize)]
struct TestEvent {
    user: Option<String>,
    stream: Option<String>,
    event: String,
    #[serde(default)]
    data: Value,
}

/// `POST /admin/api/publish {"user"|"stream", "event", "data"}`: publish
/// one event as `POST /api/v1/events` would; `{"stream", "seq"}`.
async fn publish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    guard(&app, &headers)?;
    let t: TestEvent = json_body(
        &app,
        &headers,
        body,
        "{\"user\" or \"stream\", \"event\", \"data\"}",
    )
    .await?;
    let (target, stream) = match (t.user, t.stream) {
        (Some(u), None) => (json!({ "user_id": u }), user_stream(&u)),
        (None, Some(s)) => (json!({ "stream": s }), s),
        _ => {
            return Err(ApiError::field(
                "user",
                "or `stream` is required (one of them)",
            ));
        }
    };
    let mut request = target;
    request["event"] = Value::String(t.event);
    request["data"] = t.data;
    let body = serde_json::to_vec(&request)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let answer = super::api::publish_body(&app, &body).await?;
    let seq = answer["results"][0]["seq"].clone();
    tracing::info!(stream = %stream, "admin published a test event");
    Ok(Json(json!({ "stream": stream, "seq": seq })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_only_unexpired_and_under_its_secret() {
        let v = session_value("s3cret-s3cret-s3cret", 2_000);
        assert!(valid_session("s3cret-s3cret-s3cret", &v, 1_999));
        assert!(!valid_session("s3cret-s3cret-s3cret", &v, 2_000));
        assert!(!valid_session("another-secret-here", &v, 1_000));
        let forged = v.replacen("2000", "9000", 1);
        assert!(!valid_session("s3cret-s3cret-s3cret", &forged, 1_000));
        for junk in ["", ".", "x.y", "2000", "2000."] {
            assert!(
                !valid_session("s3cret-s3cret-s3cret", junk, 1_000),
                "{junk}"
            );
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; herald_admin=v.x"),
        );
        assert_eq!(cookie(&h), Some("v.x"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("herald_adminx=1"));
        assert_eq!(cookie(&h), None);
    }

    #[test]
    fn only_the_same_origin_passes() {
        let h = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_static(o));
            }
            h
        };
        assert!(same_origin(&h(None)).is_ok());
        assert!(same_origin(&h(Some("http://127.0.0.1:8080"))).is_ok());
        assert!(same_origin(&h(Some("http://evil.example"))).is_err());
        assert!(same_origin(&h(Some("null"))).is_err());
    }
}
