//! `herald-bench` smoke tests: every scenario, tiny, against a real server;
//! the JSON summary must report what happened. (No timing assertions.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use herald::{Config, Server};
use serde_json::Value;

const SECRET: &str = "bench-secret-0123456789-abcdefghijklm";
const API_KEY: &str = "bench-api-key-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_herald-bench");

async fn start() -> Server {
    Server::start(Config::for_tests(SECRET, API_KEY))
        .await
        .expect("server starts")
}

async fn bench(server: &herald::Server, args: &[&str]) -> Value {
    let url = format!("http://{}", server.local_addr());
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).args([
        "--url",
        &url,
        "--secret",
        SECRET,
        "--api-key",
        API_KEY,
        "--json",
    ]);
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn figure<'a>(summary: &'a Value, name: &str) -> &'a str {
    summary["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == name)
        .and_then(|f| f[1].as_str())
        .unwrap_or_else(|| panic!("no figure {name} in {summary}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    let server = start().await;

    let s = bench(
        &server,
        &[
            "fanout",
            "-n",
            "40",
            "--per-user",
            "4",
            "--rate",
            "200",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(s["connections"], 40);
    assert_eq!(figure(&s, "lost (expected − received)"), "0");
    assert_eq!(figure(&s, "seq gaps"), "0");
    assert!(s["latency_us"]["count"].as_u64().unwrap() > 0);

    let s = bench(
        &server,
        &[
            "fanout",
            "-n",
            "40",
            "--per-user",
            "4",
            "--rate",
            "200",
            "--duration",
            "1",
            "--procs",
            "2",
        ],
    )
    .await;
    assert_eq!(s["connections"], 40, "two worker processes hold 20 each");
    assert_eq!(figure(&s, "lost (expected − received)"), "0");

    let s = bench(&server, &["connect", "-n", "50"]).await;
    assert_eq!(s["latency_us"]["count"], 50);

    let s = bench(&server, &["resume", "-n", "20", "--events", "5"]).await;
    assert_eq!(figure(&s, "caught up"), "20 of 20");
    assert_eq!(figure(&s, "gaps or resets"), "0");
    assert!(figure(&s, "replayed events").starts_with("100 "));

    let pid = std::process::id().to_string();
    let s = bench(
        &server,
        &["idle", "-n", "30", "--duration", "1", "--server-pid", &pid],
    )
    .await;
    assert_eq!(s["connections"], 30);
    assert!(figure(&s, "RSS per idle connection").ends_with("KiB)"));

    let s = bench(
        &server,
        &["text", "-n", "5", "--events", "60", "--rate", "300"],
    )
    .await;
    assert_eq!(figure(&s, "deltas appended"), "300");
    assert_eq!(figure(&s, "deltas received"), "300");
    assert_eq!(figure(&s, "answers received whole"), "5");
    assert_eq!(figure(&s, "seq gaps"), "0");

    // The soak (issue 41): its verdict is its exit status; here a short run
    // on a healthy server passes (`verdict`'s unit tests show it can fail).
    let url = format!("http://{}", server.local_addr());
    let out = tokio::process::Command::new(BIN)
        .args([
            "soak",
            "--duration",
            "4",
            "--rate",
            "300",
            "--sample-secs",
            "1",
        ])
        .args(["--url", &url, "--secret", SECRET, "--api-key", API_KEY])
        .args(["--server-pid", &pid])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("soak: PASS"), "{stdout}");
}
