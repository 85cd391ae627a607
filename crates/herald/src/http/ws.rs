//! `GET /ws`: the WebSocket upgrade. Refuses upgrades while draining, at
//! capacity or with too many connections before `hello` (HTTP 503), picks up
//! a token from the `Authorization` header or a `bearer.<jwt>` subprotocol,
//! and hands the socket to its actor. `GET /echo` (test only, off by
//! default) hands its socket to the same actor in echo mode.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::protocol::{BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tungstenite::protocol::WebSocketConfig;

use super::ApiError;
use crate::actor::{self, Socket};
use crate::admission::{Refusal, Slot};
use crate::app::App;
use crate::telemetry;

/// Read buffer per connection. tungstenite zeroes this many bytes on every
/// read attempt, so it is kept small; larger messages take more reads.
const READ_BUFFER: usize = 512;

/// Largest message of the echo endpoint: the Autobahn suite's 9.x cases
/// send messages of up to 16 MiB.
const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The upgrade handler of `/ws`.
pub(super) async fn upgrade(State(app): State<Arc<App>>, mut req: Request) -> Response {
    let (handshake, slot) = match admit(&app, &mut req) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let headers = req.headers();
    let token = crate::auth::bearer_token(headers)
        .map(str::to_owned)
        .or_else(|| bearer_subprotocol(headers));
    let protocol = offers(headers, SUBPROTOCOL).then(|| HeaderValue::from_static(SUBPROTOCOL));
    let max = app.config().limits.max_message_bytes;
    handshake.accept(protocol, config(max), move |socket| {
        actor::run(socket, app, token, slot)
    })
}

/// The subprotocol an AI SDK client may offer beside its token (selected
/// when offered).
pub(crate) const AI_SUBPROTOCOL: &str = "herald.ai";

/// The query of `GET /ai`: the token, for clients that cannot set headers
/// or subprotocols (the transport's `params`). Never logged.
#[derive(serde::Deserialize)]
struct AiQuery {
    token: Option<String>,
}

/// The upgrade handler of `/ai`, the AI SDK's `WebSocketChatTransport`
/// protocol: the same admission as `/ws`; the token from the
/// `Authorization` header, a `bearer.<jwt>` subprotocol or the `token`
/// query parameter (or, when none is there, from the first frame's
/// `headers.authorization`). A client that offers subprotocols gets
/// `herald.ai` selected if it offered it, else its bearer subprotocol
/// (a browser fails a handshake that selects none of those it offered).
pub(super) async fn ai_upgrade(State(app): State<Arc<App>>, mut req: Request) -> Response {
    let (handshake, slot) = match admit(&app, &mut req) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let headers = req.headers();
    let query = axum::extract::Query::<AiQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.token);
    let token = crate::auth::bearer_token(headers)
        .map(str::to_owned)
        .or_else(|| bearer_subprotocol(headers))
        .or(query);
    let protocol = if offers(headers, AI_SUBPROTOCOL) {
        Some(HeaderValue::from_static(AI_SUBPROTOCOL))
    } else {
        offered_bearer(headers)
    };
    let max = app.config().ai.max_message_bytes;
    handshake.accept(protocol, config(max), move |socket| {
        actor::run_ai(socket, app, token, slot)
    })
}

/// The upgrade handler of the test-only `/echo`: every text and binary
/// message comes back as it was sent, through the `/ws` actor and writer.
/// At most `echo_max_connections` at once (beyond: 503 `capacity`), each
/// closed after `echo_idle_timeout` without a message.
pub(super) async fn echo(State(app): State<Arc<App>>, mut req: Request) -> Response {
    let Some(place) = app.echo_place() else {
        metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => "capacity").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "too many echo connections",
        )
        .into_response();
    };
    let (handshake, slot) = match admit(&app, &mut req) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    handshake.accept(None, config(ECHO_MAX_MESSAGE), move |socket| {
        let conn = actor::run_echo(socket, app, slot);
        async move {
            let _place = place;
            conn.await;
        }
    })
}

fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// A valid RFC 6455 opening handshake, not answered yet.
struct Handshake {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl Handshake {
    /// Check the request (RFC 6455 §4.2.1); a refusal is a 4xx `not_websocket`.
    fn of(req: &mut Request) -> Result<Self, ApiError> {
        let refuse = |status: StatusCode, message: &str| {
            Err(ApiError::new(status, "not_websocket", message.to_owned()))
        };
        if req.method() != Method::GET {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET",
            );
        }
        let headers = req.headers();
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Connection` must include `upgrade`",
            );
        }
        if !has_token(headers, header::UPGRADE, "websocket") {
            return refuse(StatusCode::BAD_REQUEST, "`Upgrade` must be `websocket`");
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` must be 13",
            );
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return refuse(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` is missing");
        };
        let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            );
        };
        Ok(Self { key, on_upgrade })
    }

    /// Answer 101 (selecting subprotocol `protocol`, if any) and run `f` on
    /// the socket once hyper hands it over.
    fn accept<F, Fut>(
        self,
        protocol: Option<HeaderValue>,
        config: WebSocketConfig,
        f: F,
    ) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self { key, on_upgrade } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            // The accept loop serves plain TCP streams, so this is the socket itself.
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                // The connection gets a task of its own and this one ends:
                // awaited here, its future would carry this task's state
                // for the connection's life.
                Ok(parts) => {
                    tokio::spawn(f(Socket {
                        tcp: parts.io.into_inner(),
                        read: parts.read_buf,
                        config,
                    }));
                }
                Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
            }
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(protocol) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

/// Whether header `name` lists `token` (comma-separated, any case).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The subprotocols the client offered, in order.
fn offered(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether the client offered subprotocol `name`.
fn offers(headers: &HeaderMap, name: &str) -> bool {
    offered(headers).any(|p| p == name)
}

/// The checks every upgrade passes: a valid WebSocket handshake, not
/// draining, and a place under the admission bounds (checked and taken in one
/// step, held by the connection until it ends). Refusals are the HTTP answer
/// to send.
fn admit(app: &App, req: &mut Request) -> Result<(Handshake, Slot), ApiError> {
    let handshake = Handshake::of(req)?;
    if app.is_draining() {
        metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => "draining").increment(1);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "server is restarting; reconnect shortly",
        ));
    }
    match app.admission().admit() {
        Ok(slot) => Ok((handshake, slot)),
        Err(refusal) => {
            let code = match refusal {
                Refusal::Capacity => "capacity",
                Refusal::Pending => "pending",
            };
            metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => code).increment(1);
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code,
                refusal.to_string(),
            ))
        }
    }
}

/// The token of the first `bearer.<jwt>` subprotocol offered.
fn bearer_subprotocol(headers: &HeaderMap) -> Option<String> {
    offered(headers).find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL_PREFIX).map(str::to_owned))
}

/// The first `bearer.<jwt>` subprotocol offered, as offered.
fn offered_bearer(headers: &HeaderMap) -> Option<HeaderValue> {
    offered(headers)
        .find(|p| p.starts_with(BEARER_SUBPROTOCOL_PREFIX))
        .and_then(|p| HeaderValue::from_str(p).ok())
}
