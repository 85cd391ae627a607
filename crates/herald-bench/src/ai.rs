//! `herald-bench ai`: what serving the AI SDK's protocol (`GET /ai`) costs
//! against `/ws`, on the same server in the same run (issue 42). Two phases
//! of `--connections` sockets each, `--per-user` sockets per user (several
//! tabs following one answer: the per-socket work weighs more): `/ws` sockets read
//! `agent_text_delta` events; `/ai` sockets follow the same kind of run
//! through a `resume` and read `text-delta` chunks. In each phase every
//! user's run gets `--events` tokens at `--rate` tokens/s over the
//! streaming ingest, all at once. Reported per phase: deltas appended and
//! received, answers whole, gaps, and the server's CPU per delta received
//! (`--server-pid`); then the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::bench::{
    BenchArgs, Summary, api_client, cpu_ticks, now_ns, open_client, server_addr, token, ws_url,
};
use crate::text::{publish_all, stream_answers, token_text};

/// The chat every run answers in.
const CHAT: &str = "chat";

#[derive(Default)]
struct Seen {
    deltas: AtomicU64,
    gaps: AtomicU64,
    done: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Ws,
    Ai,
}

/// One phase's figures.
struct Phase {
    appended: u64,
    received: u64,
    done: u64,
    gaps: u64,
    cpu_secs: Option<f64>,
    took: Duration,
}

/// An `/ai` socket of `user` following its chat's open run: the socket, once
/// the resume's `start` came.
async fn ai_follower(args: &BenchArgs, user: &str) -> anyhow::Result<crate::bench::Ws> {
    let url = ws_url(&args.url).replace("/ws", "/ai");
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(&args.secret, user)?).parse()?,
    );
    let stream = tokio::net::TcpStream::connect(server_addr(&args.url)?).await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    let resume = json!({"type": "resume", "requestId": "q", "id": CHAT, "headers": {}, "body": {}});
    ws.send(Message::text(resume.to_string())).await?;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        if let Message::Text(t) = msg? {
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("start") => return Ok(ws),
                Some("chunk") => continue,
                _ => bail!("resume answered {t}"),
            }
        }
    }
    bail!("closed before start")
}

async fn phase(args: &BenchArgs, proto: Proto, tag: u64) -> anyhow::Result<Phase> {
    let sockets = args.connections;
    let per_user = args.per_user.max(1);
    let n = sockets.div_ceil(per_user);
    let http = api_client()?;
    let addr = server_addr(&args.url)?;
    let pid = args.server_pid.first().copied();
    let answer_len: u64 = (0..args.events).map(|i| token_text(i).len() as u64).sum();
    let label = if proto == Proto::Ws { "ws" } else { "ai" };
    let users: Vec<String> = (0..n).map(|u| format!("ai-{tag}-{label}-{u}")).collect();
    let runs: Vec<String> = (0..n).map(|u| format!("run-{tag}-{label}-{u}")).collect();
    // The runs first (an `/ai` resume follows an open run).
    let starts = users.iter().zip(&runs).map(|(user, run)| {
        json!({"user_id": user, "event": "agent_started", "run_id": run, "thread_id": CHAT})
    });
    publish_all(args, &http, starts).await?;
    let seen = Arc::new(Seen::default());
    let mut readers = Vec::with_capacity(sockets);
    let source = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    for user in (0..sockets).map(|i| &users[i / per_user]) {
        let mut ws = match proto {
            Proto::Ws => {
                let url = ws_url(&args.url);
                open_client(addr, &url, source, &token(&args.secret, user)?, None)
                    .await?
                    .0
            }
            Proto::Ai => ai_follower(args, user).await?,
        };
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            let (mut last, mut len) = (None::<u64>, 0u64);
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                // Each protocol's own order: seq on /ws (a frame that joined
                // deltas covers from_seq..=seq), sequence on /ai.
                let (from, pos, delta) = match proto {
                    Proto::Ws if v["event"] == "agent_text_delta" => {
                        let seq = v["seq"].as_u64();
                        let from = v["from_seq"].as_u64().or(seq);
                        (from, seq, v["data"]["text"].as_str())
                    }
                    Proto::Ai if v["chunk"]["type"] == "text-delta" => {
                        let sequence = v["sequence"].as_u64();
                        (sequence, sequence, v["chunk"]["delta"].as_str())
                    }
                    _ => continue,
                };
                if let (Some(f), Some(l)) = (from, last)
                    && f != l + 1
                {
                    seen.gaps.fetch_add(1, Ordering::Relaxed);
                }
                last = pos;
                let covered = match (from, pos) {
                    (Some(f), Some(p)) if p >= f => p - f + 1,
                    _ => 1,
                };
                seen.deltas.fetch_add(covered, Ordering::Relaxed);
                len += delta.map_or(0, str::len) as u64;
                if len == answer_len {
                    seen.done.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    let cpu0 = pid.map(cpu_ticks).transpose()?;
    let started = Instant::now();
    let thread = Some(CHAT);
    let appended = stream_answers(args, &http, &users, &runs, thread, None).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.done.load(Ordering::Relaxed) < sockets as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let cpu1 = pid.map(cpu_ticks).transpose()?;
    for r in readers {
        r.abort();
    }
    Ok(Phase {
        appended,
        received: seen.deltas.load(Ordering::Relaxed),
        done: seen.done.load(Ordering::Relaxed),
        gaps: seen.gaps.load(Ordering::Relaxed),
        cpu_secs: cpu0.zip(cpu1).map(|(a, b)| (b - a) as f64 / 100.0), // USER_HZ
        took,
    })
}

/// Run the scenario: `/ws` first, then `/ai`, on the same server.
pub async fn ai(args: &BenchArgs) -> anyhow::Result<Summary> {
    let n = args.connections;
    let tag = now_ns();
    let ws = phase(args, Proto::Ws, tag).await.context("the /ws phase")?;
    let ai = phase(args, Proto::Ai, tag).await.context("the /ai phase")?;
    let per_user = args.per_user.max(1);
    let mut figures = vec![(
        "answers × tokens".to_owned(),
        format!(
            "{} × {} at {}/s, {per_user} socket(s) each, per protocol",
            n.div_ceil(per_user),
            args.events,
            args.rate
        ),
    )];
    let mut per_delta = Vec::new();
    for (name, p) in [("/ws", &ws), ("/ai", &ai)] {
        figures.push((format!("{name} deltas appended"), p.appended.to_string()));
        figures.push((format!("{name} deltas received"), p.received.to_string()));
        figures.push((
            format!("{name} sockets with the whole answer"),
            p.done.to_string(),
        ));
        figures.push((format!("{name} gaps"), p.gaps.to_string()));
        figures.push((
            format!("{name} took"),
            format!("{:.1} s", p.took.as_secs_f64()),
        ));
        if let Some(cpu) = p.cpu_secs {
            let us = cpu * 1e6 / p.received.max(1) as f64;
            per_delta.push(us);
            figures.push((
                format!("{name} server CPU"),
                format!("{cpu:.2} s = {us:.2} µs per delta received"),
            ));
        }
    }
    if let [w, a] = per_delta[..] {
        figures.push((
            "/ai ÷ /ws CPU per delta".to_owned(),
            format!("{:.2}×", a / w),
        ));
    }
    Ok(Summary {
        scenario: args.scenario,
        connections: n,
        failed_connections: 0,
        figures,
        latency_us: None,
    })
}
