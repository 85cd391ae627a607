//! The `herald` binary: zero-config `serve`, `token`, config errors, SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{BIN, serve, sigterm};

use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn zero_config_serve_prints_dev_keys_and_serves() {
    let (mut child, addr, printed) = serve(&[("HERALD_ADDR", "127.0.0.1:0")]);
    assert!(printed.contains("DEVELOPMENT MODE"), "{printed}");
    let secret = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("HERALD_JWT_HS256_SECRET="))
        .unwrap()
        .to_owned();
    let api_key = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("HERALD_API_KEY="))
        .unwrap()
        .to_owned();

    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("http://{addr}/api/v1/events"))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({"user_id": "demo", "event": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Dev mode serves the demo page, the client module and the dev token endpoint.
    let page = http
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("import { HeraldClient } from '/herald.js'"));
    let js = http
        .get(format!("http://{addr}/herald.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let t: serde_json::Value = http
        .post(format!("http://{addr}/dev/token"))
        .json(&serde_json::json!({"user": "pat"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("ey"));

    // `herald token` with the printed secret mints a token the server accepts.
    let out = Command::new(BIN)
        .args(["token", "--user", "alice", "--ttl", "10m"])
        .env("HERALD_JWT_HS256_SECRET", &secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    use futures_util::StreamExt;
    let (mut ws, welcome) = common::hello_at(&addr, &token).await;
    assert_eq!(welcome["user_id"], "alice");

    // SIGTERM: drain (closing + 1012) and exit 0.
    let started = Instant::now();
    sigterm(&child);
    let mut saw_closing = false;
    let mut code = None;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            tokio_tungstenite::tungstenite::Message::Text(t) if t.contains("\"closing\"") => {
                saw_closing = true
            }
            tokio_tungstenite::tungstenite::Message::Close(f) => {
                code = f.map(|f| u16::from(f.code))
            }
            _ => {}
        }
    }
    assert!(saw_closing);
    assert_eq!(code, Some(1012));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "drain took {:?}",
        started.elapsed()
    );
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let out = Command::new(BIN)
        .arg("serve")
        .env("HERALD_HELLO_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hello_timeout"), "{err}");
}

#[test]
fn token_without_a_secret_explains_what_to_set() {
    let out = Command::new(BIN)
        .args(["token", "--user", "a"])
        .env_remove("HERALD_JWT_HS256_SECRET")
        .env_remove("HERALD_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HERALD_JWT_HS256_SECRET"));
}

/// Issue 14, findings 6 and 7, end to end: a webhook configured without a
/// JWT secret or API key (the setup that used to serve an open token minter
/// on 0.0.0.0), or only an API key, or only a secret, stops start-up naming
/// what is missing; `herald token` with a secret but no API key still mints.
#[test]
fn partial_configuration_stops_the_server_naming_the_missing_key() {
    let strong = "0123456789abcdef0123456789abcdef";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("PORT", "0"),
                ("HERALD_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
                ("HERALD_WEBHOOK_SECRET", "w-0123456789abcdef"),
            ],
            "`jwt_hs256_secret` is required",
        ),
        (
            &[("HERALD_API_KEY", "k-0123456789abcdef")],
            "`jwt_hs256_secret` is required",
        ),
        (
            &[("HERALD_JWT_HS256_SECRET", strong)],
            "`api_key` is required",
        ),
        (
            &[
                ("HERALD_JWT_HS256_SECRET", "short"),
                ("HERALD_API_KEY", "k-0123456789abcdef"),
            ],
            "too short",
        ),
    ];
    for (env, says) in cases {
        let out = Command::new(BIN)
            .arg("serve")
            .env_remove("HERALD_JWT_HS256_SECRET")
            .env_remove("HERALD_API_KEY")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{env:?}: {err}");
    }
    let out = Command::new(BIN)
        .args(["token", "--user", "a"])
        .env_remove("HERALD_API_KEY")
        .env("HERALD_JWT_HS256_SECRET", strong)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout);
    assert_eq!(token.trim().split('.').count(), 3, "{token}");
}

#[tokio::test]
async fn json_logs_carry_conn_id_and_user_id() {
    let (mut child, addr, _, rx) = common::serve_with_logs(&[
        ("HERALD_ADDR", "127.0.0.1:0"),
        (
            "HERALD_JWT_HS256_SECRET",
            "log-secret-0123456789-abcdefghijklmnop",
        ),
        ("HERALD_API_KEY", "log-key-0123456789abc"),
        ("HERALD_LOG_FORMAT", "json"),
        ("HERALD_LOG", "herald=debug"),
    ]);
    use futures_util::StreamExt;
    let token = herald::auth::mint_hs256(
        "log-secret-0123456789-abcdefghijklmnop",
        "logan",
        Duration::from_secs(60),
    )
    .unwrap();
    let (mut ws, _) = common::hello_at(&addr, &token).await;
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    // The close is logged (debug, expected) as JSON with the connection's span fields.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = None;
    while Instant::now() < deadline && found.is_none() {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && line.contains("connection closed")
        {
            found = Some(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = found.expect("a `connection closed` log line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(v["reason"], "client_close");
    assert_eq!(v["level"], "DEBUG");
    let span = &v["span"];
    assert_eq!(span["user_id"], "logan", "{line}");
    assert!(
        span["conn_id"].as_str().is_some_and(|c| c.len() == 16),
        "{line}"
    );
}

/// `herald probe` (the container image's health check): 0 for a ready
/// server, 1 with the reason for a draining one, a closed port or a path
/// that is not 200.
#[test]
fn probe_exits_0_only_for_a_ready_server() {
    let probe = |url: &str| {
        Command::new(BIN)
            .args(["probe", "--url", url, "--timeout", "2s"])
            .output()
            .unwrap()
    };
    let (mut child, addr, _) = serve(&[
        ("HERALD_ADDR", "127.0.0.1:0"),
        ("HERALD_DRAIN_WINDOW", "2s"),
        ("HERALD_JWT_HS256_SECRET", common::SECRET),
        ("HERALD_API_KEY", common::API_KEY),
    ]);
    let ready = probe(&format!("http://{addr}/readyz"));
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let missing = probe(&format!("http://{addr}/nowhere"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    // Draining: /readyz answers 503 while the connections are closed (this
    // one, never read, holds the drain for its close timeout).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_ws, _) = runtime.block_on(common::hello_at(&addr, &common::token("probe")));
    sigterm(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = probe(&format!("http://{addr}/readyz"));
        if String::from_utf8_lossy(&out.stderr).contains("answered 503") {
            assert_eq!(out.status.code(), Some(1));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never answered 503 while draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait().unwrap();
    let gone = probe(&format!("http://{addr}/readyz"));
    assert_eq!(gone.status.code(), Some(1), "nothing listening");
}
