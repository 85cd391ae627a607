//! The embedded demo page, the browser client module, and the development
//! token endpoint. Nothing is read from the file system.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::app::App;
use crate::config::JwtKey;

/// The demo chat page.
pub const INDEX_HTML: &str = include_str!("index.html");
/// The browser client (`clients/js/herald.js`).
pub const CLIENT_JS: &str = include_str!("../../../../clients/js/herald.js");

/// `GET /`: the demo page (development mode only).
pub(super) async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// `GET /herald.js`: the browser client module.
pub(super) async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenRequest {
    user: String,
}

/// `POST /dev/token {"user":"alice"}` → `{"token":"…"}`: a 24 h token signed
/// with the generated development secret. The route exists only in
/// zero-config development mode, never when a secret or key is configured,
/// and answers loopback peers only (403 otherwise), even when development
/// mode listens on every interface (`PORT` set).
pub(super) async fn dev_token(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !is_loopback(peer.ip()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the development token route answers loopback clients only",
        ));
    }
    let body = super::read_body(&app, &headers, body).await?;
    let req: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("expected {{\"user\":\"name\"}}: {e}"),
        )
    })?;
    let user = req.user.trim();
    if user.is_empty() || user.len() > 64 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "`user` must be 1 to 64 bytes",
        ));
    }
    let JwtKey::Hs256(secret) = &app.config().jwt_key else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        ));
    };
    // The demo's shared rooms: every development user may read and write them.
    let streams = [(DEMO_ROOMS.to_owned(), "rw".to_owned())]
        .into_iter()
        .collect();
    let token = crate::auth::mint_hs256_with_streams(
        secret,
        user,
        Duration::from_secs(24 * 3600),
        &streams,
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(json!({ "token": token })))
}

/// The shared streams a development token grants (read and write).
const DEMO_ROOMS: &str = "room:*";

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback (`::ffff:127.0.0.1`).
pub(super) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_peers_may_mint_development_tokens() {
        for ip in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.7",
            "192.168.1.2",
            "0.0.0.0",
            "::ffff:10.0.0.7",
            "2001:db8::1",
        ] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }
}
