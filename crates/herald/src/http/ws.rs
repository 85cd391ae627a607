//! `GET /ws`: the WebSocket upgrade. Refuses upgrades while draining, at
//! capacity or with too many connections before `hello` (HTTP 503), picks up
//! a token from the `Authorization` header or a `bearer.<jwt>` subprotocol,
//! and hands the socket to its actor.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::protocol::{BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL};

use super::ApiError;
use crate::admission::Refusal;
use crate::app::App;
use crate::{actor, telemetry};

/// Read buffer per connection. tungstenite's default (128 KiB) is a memory trap,
/// and it zeroes this many bytes on every read attempt (each wake-up of the
/// actor polls the socket), so it is kept small; larger messages take more reads.
const READ_BUFFER: usize = 1024;
/// Write buffer threshold per connection.
const WRITE_BUFFER: usize = 16 * 1024;

/// The upgrade handler.
pub(super) async fn upgrade(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rej) => {
            return ApiError::new(rej.status(), "not_websocket", rej.body_text()).into_response();
        }
    };
    if app.is_draining() {
        metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => "draining").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "server is restarting; reconnect shortly",
        )
        .into_response();
    }
    // Checked and taken in one step; held by the connection until it ends.
    let slot = match app.admission().admit() {
        Ok(slot) => slot,
        Err(refusal) => {
            let code = match refusal {
                Refusal::Capacity => "capacity",
                Refusal::Pending => "pending",
            };
            metrics::counter!(telemetry::UPGRADES_REFUSED, "reason" => code).increment(1);
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, refusal.to_string())
                .into_response();
        }
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
