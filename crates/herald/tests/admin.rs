//! The admin page's calls (`/admin/api/*`) against real servers: sign-in
//! and its refusals, the CSRF and origin guards, what the page lists, and
//! kicking a user across two nodes on a real Redis. The page itself is
//! driven in Chromium by `clients/js/test/admin.test.mjs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis_server::{Redis, node_config};
use common::*;
use herald::config::AdminConfig;
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-0123456789";

fn with_admin(mut c: herald::Config) -> herald::Config {
    c.admin = Some(AdminConfig {
        secret: ADMIN.into(),
        needs_secret: true,
    });
    c
}

/// Sign in at `addr` with `body`: the status and the `Set-Cookie` header.
async fn sign_in_at(addr: &str, body: Value) -> (u16, Option<String>) {
    let r = client()
        .post(format!("http://{addr}/admin/api/session"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let cookie = r
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), cookie)
}

/// The `name=value` part of a `Set-Cookie` header.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

async fn signed_in(addr: &str) -> String {
    let (status, cookie) = sign_in_at(addr, json!({"secret": ADMIN})).await;
    assert_eq!(status, 204);
    pair(&cookie.expect("a session cookie"))
}

/// An admin call as the page makes it (the header and the cookie).
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    cookie: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{addr}{path}");
    let req = match method {
        "GET" => client().get(url),
        _ => client().post(url).json(&body.unwrap_or(json!({}))),
    };
    let r = req
        .header("X-Herald-Admin", "1")
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_page_is_off_in_production_without_an_admin_secret() {
    let server = start().await;
    for path in ["/admin", "/admin/admin.js", "/admin/api/session"] {
        let r = client().get(http_url(&server, path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_admin_secret_equal_to_the_api_key_is_refused() {
    let raw = |admin: &str| {
        let mut raw = herald::config::RawConfig::load(None, [], &Default::default()).unwrap();
        raw.set("jwt_hs256_secret", SECRET)
            .set("api_key", API_KEY)
            .set("admin_secret", admin);
        herald::Config::from_raw(&raw)
    };
    for same in [API_KEY, SECRET] {
        let err = raw(same).unwrap_err().to_string();
        assert!(err.contains("admin_secret"), "{err}");
    }
    assert!(raw(ADMIN).unwrap().admin.is_some());
}

#[tokio::test]
async fn the_page_allows_only_its_own_script_and_style() {
    let server = start_with(with_admin(config())).await;
    let r = client()
        .get(http_url(&server, "/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("style-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.contains("/admin/admin.js") && html.contains("/admin/admin.css"));
    // Every script has a src; no inline style (the CSP would block them).
    for tag in html.split("<script").skip(1) {
        assert!(
            tag.split('>').next().unwrap().contains("src="),
            "inline script: {tag}"
        );
    }
    assert!(
        !html.contains("<style") && !html.contains(" style="),
        "inline style"
    );
    let js = client()
        .get(http_url(&server, "/admin/admin.js"))
        .send()
        .await
        .unwrap();
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(!js.text().await.unwrap().contains("eval("));
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_secret_a_missing_header_a_forged_cookie_and_another_origin_are_refused() {
    let server = start_with(with_admin(config())).await;
    let addr = server.local_addr().to_string();
    let (status, cookie) = sign_in_at(&addr, json!({"secret": "not-the-admin-secret"})).await;
    assert_eq!((status, cookie), (401, None));
    let (status, cookie) = sign_in_at(&addr, json!({})).await;
    assert_eq!((status, cookie), (401, None));
    // Not signed in.
    let (status, body) = call(&addr, "GET", "/admin/api/nodes", "", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("not_signed_in"))
    );
    // The API key is not the admin secret.
    let (status, _) = sign_in_at(&addr, json!({"secret": API_KEY})).await;
    assert_eq!(status, 401);
    let cookie = signed_in(&addr).await;
    // A forged expiry keeps the signature of another.
    let (name, value) = cookie.split_once('=').unwrap();
    let (_, sig) = value.split_once('.').unwrap();
    let forged = format!("{name}=99999999999.{sig}");
    let (status, _) = call(&addr, "GET", "/admin/api/nodes", &forged, None).await;
    assert_eq!(status, 401);
    // Without the header (what a cross-site form sends).
    let r = client()
        .get(format!("http://{addr}/admin/api/nodes"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "missing_admin_header");
    // From another origin.
    let r = client()
        .post(format!("http://{addr}/admin/api/kick"))
        .header("X-Herald-Admin", "1")
        .header(COOKIE, &cookie)
        .header(ORIGIN, "http://evil.example")
        .json(&json!({"user": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The real cookie works.
    let (status, body) = call(&addr, "GET", "/admin/api/nodes", &cookie, None).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn ten_wrong_secrets_in_a_minute_close_sign_in_with_429() {
    let server = start_with(with_admin(config())).await;
    let addr = server.local_addr().to_string();
    for _ in 0..10 {
        let (status, _) = sign_in_at(&addr, json!({"secret": "wrong-wrong-wrong"})).await;
        assert_eq!(status, 401);
    }
    let (status, cookie) = sign_in_at(&addr, json!({"secret": ADMIN})).await;
    assert_eq!((status, cookie), (429, None));
    server.shutdown().await;
}

#[tokio::test]
async fn the_session_cookie_is_http_only_same_site_strict_and_scoped_to_admin() {
    let server = start_with(with_admin(config())).await;
    let addr = server.local_addr().to_string();
    let (status, cookie) = sign_in_at(&addr, json!({"secret": ADMIN})).await;
    assert_eq!(status, 204);
    let cookie = cookie.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.contains(ADMIN),
        "the cookie carries the secret: {cookie}"
    );
    let r = client()
        .get(format!("http://{addr}/admin/api/session"))
        .header(COOKIE, pair(&cookie))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"signed_in": true, "needs_secret": true}));
    server.shutdown().await;
}

#[tokio::test]
async fn signed_in_the_admin_lists_inspects_publishes_and_kicks() {
    let server = start_with(with_admin(config())).await;
    let addr = server.local_addr().to_string();
    let cookie = signed_in(&addr).await;
    let (mut a1, _) = connect(&server, "alice").await;
    let (mut a2, _) = connect(&server, "alice").await;
    let (mut bob, _) = connect(&server, "bob").await;
    post(
        &server,
        "/api/v1/events",
        json!({"user_id": "bob", "event": "agent_started", "run_id": "r-open", "thread_id": "t1"}),
    )
    .await;
    event_within(&mut bob, Duration::from_secs(5), "agent_started").await;

    let (status, nodes) = call(&addr, "GET", "/admin/api/nodes", &cookie, None).await;
    assert_eq!(status, 200, "{nodes}");
    let node = &nodes["nodes"][0];
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(node["connections"], 3);
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["redis"], "none");
    let id = node["node"].as_str().unwrap().to_owned();

    let list = |q: String| {
        let (addr, cookie) = (addr.clone(), cookie.clone());
        async move {
            let (status, body) = call(
                &addr,
                "GET",
                &format!("/admin/api/connections{q}"),
                &cookie,
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let all = list(String::new()).await;
    assert_eq!(all["total"], 3);
    let alice = list("?user=alice".into()).await;
    let users: Vec<&str> = alice["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "alice"]);
    assert_eq!(list("?state=ready".into()).await["total"], 3);
    assert_eq!(list("?state=closing".into()).await["total"], 0);
    assert_eq!(list(format!("?node={id}")).await["total"], 3);
    assert_eq!(list("?node=another-node".into()).await["total"], 0);
    let one = list("?limit=1".into()).await;
    assert_eq!(
        (
            one["connections"].as_array().unwrap().len(),
            &one["truncated"]
        ),
        (1, &json!(true))
    );

    let (status, published) = call(
        &addr,
        "POST",
        "/admin/api/publish",
        &cookie,
        Some(json!({"user": "bob", "event": "admin_test", "data": {"text": "hello"}})),
    )
    .await;
    assert_eq!(status, 200, "{published}");
    let seq = published["seq"].as_u64().unwrap();
    let got = event_within(&mut bob, Duration::from_secs(5), "admin_test").await;
    assert_eq!(
        (got["seq"].as_u64(), &got["data"]["text"]),
        (Some(seq), &json!("hello"))
    );
    // An event the API would refuse is refused here too.
    let (status, body) = call(
        &addr,
        "POST",
        "/admin/api/publish",
        &cookie,
        Some(json!({"user": "bob", "event": "", "data": {}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, stream) = call(
        &addr,
        "GET",
        "/admin/api/stream?name=user:bob",
        &cookie,
        None,
    )
    .await;
    assert_eq!(status, 200, "{stream}");
    assert_eq!(stream["last_seq"].as_u64(), Some(seq));
    assert_eq!(
        stream["open_runs"],
        json!([{"run_id": "r-open", "thread_id": "t1"}])
    );
    let events: Vec<&str> = stream["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["agent_started", "admin_test"]);
    let (status, _) = call(&addr, "GET", "/admin/api/stream?name=", &cookie, None).await;
    assert_eq!(status, 400);
    // Looking at a stream that does not exist finds nothing, twice (it is
    // not created by the look).
    for _ in 0..2 {
        let (status, body) = call(
            &addr,
            "GET",
            "/admin/api/stream?name=room:nobody",
            &cookie,
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("no_such_stream")),
            "{body}"
        );
    }
    let (status, _) = call(
        &addr,
        "GET",
        "/admin/api/connections?state=bogus",
        &cookie,
        None,
    )
    .await;
    assert_eq!(status, 400);

    let (status, kicked) = call(
        &addr,
        "POST",
        "/admin/api/kick",
        &cookie,
        Some(json!({"user": "alice"})),
    )
    .await;
    assert_eq!((status, &kicked["closed"]), (200, &json!(2)), "{kicked}");
    expect_close(&mut a1, 4409).await;
    expect_close(&mut a2, 4409).await;
    // Bob's socket is untouched.
    publish(&server, "bob", "after_kick", json!({})).await;
    event_within(&mut bob, Duration::from_secs(5), "after_kick").await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_node_samples_follow_its_deliveries() {
    let server = start_with(with_admin(config())).await;
    let addr = server.local_addr().to_string();
    let cookie = signed_in(&addr).await;
    let (mut ws, _) = connect(&server, "cy").await;
    // Deliveries keep coming until a sample has counted some.
    let mut seen = None;
    for i in 0..100 {
        publish(&server, "cy", "tick", json!({"i": i})).await;
        event_within(&mut ws, Duration::from_secs(5), "tick").await;
        let (_, nodes) = call(&addr, "GET", "/admin/api/nodes", &cookie, None).await;
        let series = nodes["nodes"][0]["series"].as_array().unwrap().clone();
        if let Some(s) = series
            .iter()
            .find(|s| s["deliveries_per_s"].as_f64().unwrap() > 0.0)
        {
            seen = Some((s.clone(), nodes["nodes"][0]["p99_ms"].clone()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sample, p99) = seen.expect("a sample with deliveries within 100 rounds");
    assert_eq!(sample["connections"], 1);
    assert!(p99.as_f64().is_some_and(|ms| ms > 0.0), "{p99}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_the_page_sees_both_nodes_and_kicks_on_both() {
    let redis = Redis::start();
    let n1 = start_with(with_admin(node_config(&redis))).await;
    let n2 = start_with(with_admin(node_config(&redis))).await;
    let (mut on1, _) = connect(&n1, "dee").await;
    let (mut on2, _) = connect(&n2, "dee").await;
    let (_other, _) = connect(&n2, "eve").await;
    // A session from node 1 is good on node 2 (they share the secret).
    let cookie = signed_in(&n1.local_addr().to_string()).await;
    let addr2 = n2.local_addr().to_string();
    let (status, nodes) = call(&addr2, "GET", "/admin/api/nodes", &cookie, None).await;
    assert_eq!(status, 200, "{nodes}");
    let mut counts: Vec<(u64, &str)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["connections"].as_u64().unwrap(),
                n["redis"].as_str().unwrap(),
            )
        })
        .collect();
    counts.sort();
    assert_eq!(counts, [(1, "ok"), (2, "ok")]);
    let (status, body) = call(
        &addr2,
        "GET",
        "/admin/api/stream?name=user:nobody",
        &cookie,
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_such_stream")),
        "{body}"
    );
    let (status, body) = call(
        &addr2,
        "GET",
        "/admin/api/stream?name=user:dee",
        &cookie,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, all) = call(
        &addr2,
        "GET",
        "/admin/api/connections?user=dee",
        &cookie,
        None,
    )
    .await;
    assert_eq!(all["total"], 2, "{all}");
    let (status, kicked) = call(
        &addr2,
        "POST",
        "/admin/api/kick",
        &cookie,
        Some(json!({"user": "dee"})),
    )
    .await;
    assert_eq!((status, &kicked["closed"]), (200, &json!(2)), "{kicked}");
    expect_close(&mut on1, 4409).await;
    expect_close(&mut on2, 4409).await;
    n1.shutdown().await;
    n2.shutdown().await;
}

/// The binary in development mode: a loopback visitor signs in without a
/// secret. With a secret, neither it nor a wrong one reaches the logs,
/// even at debug level.
#[tokio::test]
async fn development_mode_signs_in_loopback_visitors_and_no_secret_is_logged() {
    let (mut dev, addr, _) = serve(&[("HERALD_ADDR", "127.0.0.1:0")]);
    let r = client()
        .get(format!("http://{addr}/admin/api/session"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"signed_in": false, "needs_secret": false}));
    let (status, cookie) = sign_in_at(&addr, json!({})).await;
    assert_eq!(status, 204);
    let (status, _) = call(
        &addr,
        "GET",
        "/admin/api/nodes",
        &pair(&cookie.unwrap()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    dev.kill().unwrap();
    dev.wait().unwrap();

    let wrong = "a-wrong-admin-secret-9876";
    let (mut prod, addr, printed, logs) = serve_with_logs(&[
        ("HERALD_JWT_HS256_SECRET", SECRET),
        ("HERALD_API_KEY", API_KEY),
        ("HERALD_ADMIN_SECRET", ADMIN),
        ("HERALD_LOG", "debug"),
        ("HERALD_ADDR", "127.0.0.1:0"),
    ]);
    assert_eq!(sign_in_at(&addr, json!({"secret": wrong})).await.0, 401);
    let cookie = signed_in(&addr).await;
    let (status, _) = call(&addr, "GET", "/admin/api/nodes", &cookie, None).await;
    assert_eq!(status, 200);
    // The refusal and the sign-in are logged (the proof the log is read).
    let mut logged = printed;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !logged.contains("admin signed in") && std::time::Instant::now() < deadline {
        if let Ok(line) = logs.recv_timeout(Duration::from_millis(200)) {
            logged.push_str(&line);
            logged.push('\n');
        }
    }
    prod.kill().unwrap();
    prod.wait().unwrap();
    assert!(logged.contains("admin sign-in refused"), "{logged}");
    assert!(logged.contains("admin signed in"), "{logged}");
    assert!(
        !logged.contains(ADMIN) && !logged.contains(wrong),
        "{logged}"
    );
}
