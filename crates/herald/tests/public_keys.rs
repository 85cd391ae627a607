//! RS256 and ES256 with a configured PEM public key, over real sockets; the
//! HS256-with-the-public-key confusion attack and `aud`/`iss` checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use herald::config::JwtKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

async fn server_with_key(public: &str, aud: Option<&str>, iss: Option<&str>) -> herald::Server {
    let mut cfg = config();
    cfg.jwt_key = JwtKey::PublicKeyPem(std::fs::read(fixture(public)).unwrap());
    cfg.jwt_audience = aud.map(Into::into);
    cfg.jwt_issuer = iss.map(Into::into);
    start_with(cfg).await
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": herald::auth::unix_now() + 600})
}

async fn hello_result(
    server: &herald::Server,
    token: &str,
) -> Result<Value, (Option<u16>, String)> {
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, json!({"type": "hello", "token": token})).await;
    let first = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    .unwrap();
    match first {
        Some(Ok(Message::Text(t))) => Ok(serde_json::from_str(&t).unwrap()),
        Some(Ok(Message::Close(f))) => Err((
            f.as_ref().map(|f| u16::from(f.code)),
            f.map(|f| f.reason.to_string()).unwrap_or_default(),
        )),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn rs256_with_a_public_key() {
    let server = server_with_key("rsa-public.pem", None, None).await;
    let private =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap();
    let w = hello_result(&server, &sign(Algorithm::RS256, &private, claims("rosa")))
        .await
        .unwrap();
    assert_eq!(w["user_id"], "rosa");
    // Algorithm confusion: HS256 "signed" with the public key as the secret.
    let public_bytes = std::fs::read(fixture("rsa-public.pem")).unwrap();
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_bytes),
        claims("mallory"),
    );
    assert_eq!(
        hello_result(&server, &forged).await.unwrap_err().0,
        Some(4401)
    );
    // An HS256 token with the test secret is not accepted either.
    assert_eq!(
        hello_result(&server, &token("mallory"))
            .await
            .unwrap_err()
            .0,
        Some(4401)
    );
}

#[tokio::test]
async fn es256_with_a_public_key() {
    let server = server_with_key("ec-public.pem", None, None).await;
    let private =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("ec-private.pem")).unwrap()).unwrap();
    let w = hello_result(&server, &sign(Algorithm::ES256, &private, claims("esme")))
        .await
        .unwrap();
    assert_eq!(w["user_id"], "esme");
    let other = server_with_key("rsa-public.pem", None, None).await;
    let (code, reason) = hello_result(&other, &sign(Algorithm::ES256, &private, claims("esme")))
        .await
        .unwrap_err();
    assert_eq!(
        (code, reason.as_str()),
        (Some(4401), "algorithm not allowed")
    );
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let server = server_with_key(
        "ec-public.pem",
        Some("herald"),
        Some("https://auth.example"),
    )
    .await;
    let private =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("ec-private.pem")).unwrap()).unwrap();
    let mut good = claims("ada");
    good["aud"] = json!("herald");
    good["iss"] = json!("https://auth.example");
    assert!(
        hello_result(&server, &sign(Algorithm::ES256, &private, good.clone()))
            .await
            .is_ok()
    );
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    assert_eq!(
        hello_result(&server, &sign(Algorithm::ES256, &private, wrong_aud))
            .await
            .unwrap_err(),
        (Some(4401), "wrong audience".into())
    );
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    assert_eq!(
        hello_result(&server, &sign(Algorithm::ES256, &private, wrong_iss))
            .await
            .unwrap_err(),
        (Some(4401), "wrong issuer".into())
    );
    let no_aud = claims("ada");
    assert_eq!(
        hello_result(&server, &sign(Algorithm::ES256, &private, no_aud))
            .await
            .unwrap_err()
            .0,
        Some(4401)
    );
}

#[tokio::test]
async fn total_connection_limit_refuses_upgrades_with_503() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let server = start_with(cfg).await;
    let _a = connect(&server, "a").await;
    let _b = connect(&server, "b").await;
    match tokio_tungstenite::connect_async(ws_url(&server)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
}

/// Issue 14, finding 8: sockets that never say `hello` have their own,
/// smaller bound, so they cannot take the places of authenticated users;
/// the places come back when the hello timeout closes them.
#[tokio::test]
async fn sockets_before_hello_have_their_own_bound() {
    let mut cfg = config();
    cfg.max_connections = 20;
    cfg.max_pending_connections = 5;
    cfg.lifecycle.hello_timeout = Duration::from_millis(500);
    let server = start_with(cfg).await;
    let mut users = Vec::new();
    for i in 0..10 {
        users.push(connect(&server, &format!("u{i}")).await.0);
    }
    let mut anonymous = Vec::new();
    for _ in 0..5 {
        anonymous.push(open(&server, &[], None).await);
    }
    let refused = |r| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            (resp.status().as_u16(), body)
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (status, body) = refused(tokio_tungstenite::connect_async(ws_url(&server)).await);
    assert_eq!(status, 503);
    assert!(body.contains("\"pending\""), "{body}");
    assert_eq!(
        server.hub().len(),
        15,
        "the total bound (20) is not what refused it"
    );
    // The connected users are unaffected.
    send_json(&mut users[0], json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut users[0]).await["type"], "pong");
    // The hello timeout frees the places; a new user gets in.
    for ws in &mut anonymous {
        expect_close(ws, 4408).await;
    }
    let mut ok = false;
    for _ in 0..50 {
        if tokio_tungstenite::connect_async(ws_url(&server))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "places before hello come back");
}
