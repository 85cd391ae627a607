//! The README's 60-second tour, run as written (issue 41): its commands are
//! read from README.md itself, so a tour that drifts from the binary fails
//! here. `herald serve` in development mode (on a free port instead of
//! 8080), the printed secret and key, `herald token`, a WebSocket that says
//! `hello` as the websocat line does, then every `curl` of the tour through
//! bash: each answer must hold the `"key":value` pairs the tour's `# ->`
//! comment shows, and the socket must receive what the tour says it does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const README: &str = include_str!("../../../README.md");

/// One command of the tour (continuation lines joined) and the comments
/// that follow it.
#[derive(Debug, Default)]
struct Step {
    command: String,
    /// `# -> …` and `# <- …` and `# the socket …` comments after it.
    notes: Vec<String>,
}

/// The tour's second `sh` block ("In another terminal"), as steps.
fn tour_steps() -> Vec<Step> {
    let tour = README
        .split("## A 60-second tour")
        .nth(1)
        .expect("the README has its tour")
        .split("\n## ")
        .next()
        .unwrap();
    let block = tour
        .split("```sh\n")
        .nth(2)
        .expect("the tour's second shell block")
        .split("```")
        .next()
        .unwrap();
    let mut steps: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let trimmed = line.trim();
        if let Some(note) = trimmed.strip_prefix('#') {
            let note = note.trim();
            if (note.starts_with("->") || note.starts_with("<-") || note.starts_with("the socket"))
                && let Some(last) = steps.last_mut()
            {
                last.notes.push(note.to_owned());
            }
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        pending.push_str(line.trim().trim_end_matches('\\'));
        pending.push(' ');
        if line.ends_with('\\') || line.ends_with('|') {
            continue;
        }
        steps.push(Step {
            command: std::mem::take(&mut pending).trim().to_owned(),
            notes: Vec::new(),
        });
    }
    steps
}

/// The `"key":value` pairs a note shows (values `"..."` are placeholders).
fn pairs(note: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut rest = note;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('"') else { break };
        let key = &after[..end];
        let tail = &after[end + 1..];
        let Some(value) = tail.strip_prefix(':') else {
            rest = &after[end + 1..];
            continue;
        };
        let len = if let Some(v) = value.strip_prefix('"') {
            v.find('"').map_or(value.len(), |n| n + 2)
        } else {
            value.find([',', '}', ']', ';']).unwrap_or(value.len())
        };
        let raw = &value[..len];
        if let Ok(v) = serde_json::from_str::<Value>(raw)
            && v != "..."
            && !v.is_object()
            && !v.is_array()
        {
            out.push((key.to_owned(), v));
        }
        rest = &value[len..];
    }
    out
}

/// Whether `key` holds `want` anywhere in `v`.
fn holds(v: &Value, key: &str, want: &Value) -> bool {
    match v {
        Value::Object(m) => m.get(key) == Some(want) || m.values().any(|x| holds(x, key, want)),
        Value::Array(a) => a.iter().any(|x| holds(x, key, want)),
        _ => false,
    }
}

fn check(answer: &Value, note: &str) {
    let want = pairs(note.split(';').next().unwrap());
    assert!(!want.is_empty(), "nothing to check in {note:?}");
    for (key, value) in want {
        assert!(
            holds(answer, &key, &value),
            "the tour says {note:?}; `{key}` is not {value} in {answer}"
        );
    }
}

/// The next frame that is not a ping or pong.
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

async fn next_event(ws: &mut Ws) -> Value {
    loop {
        if let Message::Text(t) = next_frame(ws).await {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "event" {
                return v;
            }
        }
    }
}

/// What the tour says the socket receives after a step.
async fn socket_sees(ws: &mut Ws, note: &str) {
    let said = note.split("the socket").nth(1).unwrap_or_default().trim();
    if let Some(code) = said.strip_prefix("is closed with ") {
        let code: u16 = code.trim().parse().expect("a close code");
        loop {
            if let Message::Close(frame) = next_frame(ws).await {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(code), "{note}");
                return;
            }
        }
    } else if let Some(what) = said.strip_prefix("receives the text ") {
        // Delta frames, joined or not, until their text is the tour's:
        // each starts right after the one before.
        let want = what.split('"').nth(1).expect("the text, quoted");
        let (mut text, mut last) = (String::new(), None::<u64>);
        while text.len() < want.len() {
            let e = next_event(ws).await;
            assert_eq!(e["event"], "agent_text_delta", "{note}: {e}");
            let seq = e["seq"].as_u64().unwrap();
            let from = e["from_seq"].as_u64().unwrap_or(seq);
            if let Some(last) = last {
                assert_eq!(from, last + 1, "{e}");
            }
            last = Some(seq);
            text.push_str(e["data"]["text"].as_str().unwrap());
        }
        assert_eq!(text, want, "{note}");
    } else if let Some(frame) = said.strip_prefix("receives ") {
        check(&next_event(ws).await, frame);
    } else {
        panic!("the tour says something this test does not know: {note:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_runs_as_written() {
    let (mut child, addr, printed) = serve(&[("HERALD_ADDR", "127.0.0.1:0")]);
    let value_of = |name: &str| {
        printed
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("`herald serve` printed no {name}: {printed}"))
            .to_owned()
    };
    let (secret, key) = (
        value_of("HERALD_JWT_HS256_SECRET"),
        value_of("HERALD_API_KEY"),
    );
    let steps = tour_steps();
    let here = |cmd: &str| {
        cmd.replace("cargo run -q --", BIN)
            .replace("localhost:8080", &addr)
            .replace("127.0.0.1:8080", &addr)
    };
    let bash = |cmd: &str| {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", cmd])
            .env("HERALD_JWT_HS256_SECRET", &secret)
            .env("HERALD_API_KEY", &key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let mut token = None;
    let mut ws: Option<Ws> = None;
    let mut ran = 0;
    for (i, step) in steps.iter().enumerate() {
        let cmd = step.command.as_str();
        if cmd.starts_with("export ") {
            // The printed values, set above for every command.
            assert!(cmd.contains("HERALD_"), "{cmd}");
        } else if let Some(line) = cmd.strip_prefix("TOKEN=") {
            token = Some(bash(&format!("TOKEN={}; printf %s \"$TOKEN\"", here(line))));
        } else if cmd.starts_with("websocat") {
            let url = cmd
                .split_whitespace()
                .find(|w| w.starts_with("ws://"))
                .expect("the websocat line names a URL");
            assert!(cmd.contains("--protocol herald.v1"), "{cmd}");
            let mut req = here(url).into_client_request().unwrap();
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("herald.v1"),
            );
            let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            // The frame the tour types into websocat (the next "command").
            let hello = steps[i + 1].command.replace(
                "<paste $TOKEN>",
                token.as_deref().expect("the token comes before the socket"),
            );
            socket.send(Message::text(hello)).await.unwrap();
            let Message::Text(welcome) = next_frame(&mut socket).await else {
                panic!("no welcome")
            };
            let welcome: Value = serde_json::from_str(&welcome).unwrap();
            for note in &steps[i + 1].notes {
                check(&welcome, note.trim_start_matches("<-"));
            }
            ws = Some(socket);
        } else if cmd.starts_with("{\"type\":\"hello\"") {
            // Sent above.
        } else {
            let answer = bash(&here(cmd));
            ran += 1;
            for note in &step.notes {
                if let Some(shown) = note.strip_prefix("->") {
                    let answer: Value = serde_json::from_str(&answer)
                        .unwrap_or_else(|e| panic!("{cmd}: {e}: {answer}"));
                    check(&answer, shown);
                }
                if note.contains("the socket") {
                    socket_sees(ws.as_mut().expect("a socket by now"), note).await;
                }
            }
        }
    }
    assert!(ran >= 4, "the tour's commands: {steps:?}");
    assert!(ws.is_some(), "the tour opens a socket");
    sigterm(&child);
    assert!(child.wait().unwrap().success(), "a drain exits 0");
    let _ = child.kill();
}

/// The parser of the tour's notes reads what the tour shows.
#[test]
fn notes_are_read_as_key_value_pairs() {
    let p = pairs(r#"{"lines":2,"appended":2,"epoch":"...","ok":true,"user_id":"alice"}; more"#);
    assert_eq!(
        p,
        vec![
            ("lines".into(), Value::from(2)),
            ("appended".into(), Value::from(2)),
            ("ok".into(), Value::from(true)),
            ("user_id".into(), Value::from("alice")),
        ]
    );
    let steps = tour_steps();
    assert!(
        steps
            .iter()
            .any(|s| s.command.starts_with("printf ") && s.command.contains("| curl"))
    );
}
