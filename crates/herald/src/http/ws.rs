//! `GET /ws`: the WebSocket upgrade. Refuses upgrades while draining, at
//! capacity or with too many connections before `hello` (HTTP 503), picks up
//! a token from the `Authorization` header or a `bearer.<jwt>` subprotocol,
//! and hands the socket to its actor. `GET /echo` (test only, off by
//! default) hands its socket to the same actor in echo mode.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::protocol::{BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL};

use super::ApiError;
use crate::admission::{Refusal, Slot};
use crate::app::App;
use crate::{actor, telemetry};

/// Read buffer per connection. tungstenite's default (128 KiB) is a memory trap,
/// and it zeroes this many bytes on every read attempt (each wake-up of the
/// actor polls the socket), so it is kept small; larger messages take more reads.
const READ_BUFFER: usize = 1024;
/// Write buffer threshold per connection.
const WRITE_BUFFER: usize = 16 * 1024;

/// Largest message of the echo endpoint: the Autobahn suite's 9.x cases
/// send messages of up to 16 MiB.
const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The upgrade handler of `/ws`.
pub(super) async fn upgrade(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let (ws, slot) = match admit(&app, ws) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let token = crate::auth::bearer_token(&headers)
        .map(str::to_owned)
        .or_else(|| bearer_subprotocol(&headers));
    let max = app.config().limits.max_message_bytes;
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "upgrade failed"))
        .on_upgrade(move |socket| actor::run(socket, app, token, slot))
}

/// The upgrade handler of the test-only `/echo`: every text and binary
/// message comes back as it was sent, through the `/ws` actor and writer.
pub(super) async fn echo(
    State(app): State<Arc<App>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let (ws, slot) = match admit(&app, ws) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(ECHO_MAX_MESSAGE)
        .max_frame_size(ECHO_MAX_MESSAGE)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "upgrade failed"))
        .on_upgrade(move |socket| actor::run_echo(socket, app, slot))
}

/// The checks every upgrade passes: a WebSocket request, not draining, and a
/// place under the admission bounds (checked and taken in one step, held by
/// the connection until it ends). Refusals are the HTTP answer to send.
fn admit(
    app: &App,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<(WebSocketUpgrade, Slot), ApiError> {
    let ws = ws.map_err(|rej| ApiError::new(rej.status(), "not_websocket", rej.body_text()))?;
    if app.is_draining() {
        metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => "draining").increment(1);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "server is restarting; reconnect shortly",
        ));
    }
    match app.admission().admit() {
        Ok(slot) => Ok((ws, slot)),
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

fn bearer_subprotocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix(BEARER_SUBPROTOCOL_PREFIX)
                .map(str::to_owned)
        })
}
