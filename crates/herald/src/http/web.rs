//! The embedded demo page, the browser client module, and the development
//! token endpoint. Nothing is read from the file system.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
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
/// zero-config development mode, never when a secret or key is configured.
pub(super) async fn dev_token(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), "bad_body", r.body_text()))?;
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
    let token = crate::auth::mint_hs256(secret, user, Duration::from_secs(24 * 3600))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(json!({ "token": token })))
}
