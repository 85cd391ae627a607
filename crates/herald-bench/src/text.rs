//! `herald-bench text`: answers streamed as text deltas (issue 18). Each of
//! `--connections` users has one connection; every user gets an answer of
//! `--events` tokens at `--rate` tokens/s, all at once, each answer over its
//! own streaming ingest request (`POST /api/v1/runs/{run_id}/text`, one line
//! per token, written as it is "generated"). Reported: server CPU over the
//! streaming phase (and Redis's, with `--redis-pid`), server memory and
//! history entries per answer, Redis commands per answer (`--redis-port`),
//! delivery (every delta received, in order, the text whole), and what a
//! page reloaded at the answer's middle is sent: frames and bytes.
//!
//! As a model produces tokens: `--jitter J` spreads each gap between tokens
//! uniformly over (1 ± J) × 1/rate; `--readers K` sockets read each answer;
//! `--reload-share S` of them reconnect once at the answer's middle with
//! `resume`. Each token carries the µs it was handed to the ingest
//! (`t<µs> `, ~11 bytes), so every token read live (after the socket's
//! welcome) gives a token latency: handed to the ingest → read by a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::{
    BenchArgs, Percentiles, Shards, Summary, api_client, cpu_ticks, metric_in, metrics_page,
    now_ns, open_client, rss_of, server_addr, token, ws_url,
};

/// What the readers saw, all users together.
struct Seen {
    deltas: AtomicU64,
    tokens: AtomicU64,
    gaps: AtomicU64,
    done: AtomicU64,
    reloads: AtomicU64,
    /// Token latencies (µs) of tokens read live.
    latency: Shards,
    /// The µs (wall clock) token stamps count from.
    base_us: u64,
}

/// The token `i` of an answer (a word and a space; ~5 bytes, as LLM tokens).
pub(crate) fn token_text(i: usize) -> String {
    format!("w{} ", i % 1000)
}

async fn gauge(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<f64> {
    let metrics = metrics_page(http, base).await?;
    metric_in(&metrics, name).with_context(|| format!("no {name} in /metrics"))
}

/// What the scenario reads from the server and Redis before and after the
/// answers (each `None` when its PID or port was not given).
struct Probe {
    rss: Option<u64>,
    cpu: Option<u64>,
    /// This process's own CPU (the generator: producers and readers).
    bench_cpu: u64,
    redis_cpu: Option<u64>,
    redis_cmds: Option<u64>,
    redis_mem: Option<u64>,
}

impl Probe {
    fn read(pid: Option<u32>, args: &BenchArgs) -> anyhow::Result<Self> {
        Ok(Self {
            rss: pid.map(rss_of).transpose()?,
            cpu: pid.map(cpu_ticks).transpose()?,
            bench_cpu: cpu_ticks(std::process::id())?,
            redis_cpu: args.redis_pid.map(cpu_ticks).transpose()?,
            redis_cmds: args.redis_port.map(redis_commands).transpose()?,
            redis_mem: args
                .redis_port
                .map(|p| redis_info(p, "memory", "used_memory"))
                .transpose()?,
        })
    }
}

/// A field of Redis's `INFO section`.
fn redis_info(port: u16, section: &str, field: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", section])
        .output()
        .context("redis-cli")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {field} in INFO {section}"))
}

fn redis_commands(port: u16) -> anyhow::Result<u64> {
    redis_info(port, "stats", "total_commands_processed")
}

/// Frames and bytes a page reloaded after `seq` (resume + run replay) is
/// sent until `caught_up`.
async fn reload(args: &BenchArgs, user: &str, epoch: &str, seq: u64) -> anyhow::Result<(u64, u64)> {
    let addr = server_addr(&args.url)?;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&args.url)).await?;
    let hello = json!({"type": "hello", "token": token(&args.secret, user)?,
        "resume": {"epoch": epoch, "seq": seq}, "replay_active_runs": true});
    let _ = addr;
    futures_util::SinkExt::send(&mut ws, Message::text(hello.to_string())).await?;
    let (mut frames, mut bytes) = (0u64, 0u64);
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        if let Message::Text(t) = msg? {
            frames += 1;
            bytes += t.len() as u64;
            let v: serde_json::Value = serde_json::from_str(&t)?;
            if v["type"] == "caught_up" {
                return Ok((frames, bytes));
            }
        }
    }
    bail!("closed before caught_up")
}

/// Publish `events` through `POST /api/v1/events`, 500 a request.
pub(crate) async fn publish_all(
    args: &BenchArgs,
    http: &reqwest::Client,
    events: impl Iterator<Item = serde_json::Value>,
) -> anyhow::Result<()> {
    let events: Vec<serde_json::Value> = events.collect();
    for batch in events.chunks(500) {
        http.post(format!("{}/api/v1/events", args.url))
            .bearer_auth(&args.api_key)
            .json(&json!({ "events": batch }))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Stream `args.events` tokens at `args.rate` to run `runs[u]` of each user
/// `users[u]` (thread `thread`), one streaming ingest request per answer,
/// all at once; returns the deltas appended.
pub(crate) async fn stream_answers(
    args: &BenchArgs,
    http: &reqwest::Client,
    users: &[String],
    runs: &[String],
    thread: Option<&str>,
    stamp: Option<u64>,
) -> anyhow::Result<u64> {
    let (tokens, rate) = (args.events, args.rate.max(1));
    let mut streams = Vec::with_capacity(users.len());
    for (user, run) in users.iter().zip(runs) {
        let mut url = format!("{}/api/v1/runs/{run}/text?user_id={user}", args.url);
        if let Some(t) = thread {
            url.push_str(&format!("&thread_id={t}"));
        }
        let interval = 1.0 / rate as f64;
        let jitter = args.jitter.clamp(0.0, 1.0);
        let body = futures_util::stream::unfold(0usize, move |i| async move {
            if i >= tokens {
                return None;
            }
            if i > 0 {
                let spread = 1.0 + jitter * (rand::random::<f64>() * 2.0 - 1.0);
                tokio::time::sleep(Duration::from_secs_f64(interval * spread)).await;
            }
            let text = match stamp {
                Some(base) => stamped(now_ns() / 1000 - base, ""),
                None => token_text(i),
            };
            let line = json!({"part": "answer", "index": i, "text": text}).to_string() + "\n";
            Some((Ok::<_, std::io::Error>(line.into_bytes()), i + 1))
        });
        let req = http
            .post(url)
            .bearer_auth(&args.api_key)
            // Generous: a saturated server reads the bodies slower than they are written.
            .timeout(Duration::from_secs(tokens as u64 * 20 / rate + 120))
            .body(reqwest::Body::wrap_stream(body))
            .send();
        streams.push(tokio::spawn(async move {
            let resp = req.await?;
            let status = resp.status();
            let report: serde_json::Value = resp.json().await?;
            anyhow::ensure!(status.is_success(), "{status}: {report}");
            anyhow::Ok(report)
        }));
    }
    let mut appended = 0u64;
    for s in streams {
        let report = s.await??;
        appended += report["appended"].as_u64().unwrap_or(0);
    }
    Ok(appended)
}

/// Run the scenario.
pub async fn text(args: &BenchArgs) -> anyhow::Result<Summary> {
    let n = args.connections;
    let tokens = args.events;
    let rate = args.rate.max(1);
    let addr = server_addr(&args.url)?;
    let url = ws_url(&args.url);
    let http = api_client()?;
    let pid = args.server_pid.first().copied();
    let base_us = now_ns() / 1000;
    let seen = Arc::new(Seen {
        deltas: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        done: AtomicU64::new(0),
        reloads: AtomicU64::new(0),
        latency: Shards::new(),
        base_us,
    });
    let per_answer = args.readers.max(1);
    let reloaders =
        (per_answer as f64 * n as f64 * args.reload_share.clamp(0.0, 1.0)).round() as usize;
    // Users of this run only: a run in a row against the same server would
    // otherwise stream into the previous run's answers (same run and part).
    let tag = now_ns();
    let user_of = |u: usize| format!("text-{tag}-{u}");

    // `--readers` sockets per answer: every delta in order (seq + 1), every
    // token once; the first `reloaders` of them reconnect at the middle.
    let mut epochs = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n * per_answer);
    let source = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    for k in 0..per_answer {
        for u in 0..n {
            let user = user_of(u);
            let jwt = token(&args.secret, &user)?;
            let (ws, welcome) = open_client(addr, &url, source, &jwt, None).await?;
            if k == 0 {
                epochs.push(welcome["epoch"].as_str().unwrap_or_default().to_owned());
            }
            let reload = k * n + u < reloaders;
            let (seen, url) = (seen.clone(), url.clone());
            readers.push(tokio::spawn(async move {
                read_answer(ws, welcome, seen, tokens as u64, reload, addr, url, jwt).await
            }));
        }
    }
    eprintln!("{} connections open", n * per_answer);
    // The gauge is refreshed by the sweeper (1 s).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let history_before = gauge(&http, &args.url, "herald_history_events")
        .await
        .unwrap_or(f64::NAN);
    let starts = (0..n)
        .map(|u| json!({"user_id": user_of(u), "event": "agent_started", "run_id": "answer"}));
    publish_all(args, &http, starts).await?;
    let before = Probe::read(pid, args)?;

    // The answers: one streaming request each, a line every 1/rate s.
    let started = Instant::now();
    let runs: Vec<String> = (0..n).map(|_| "answer".to_owned()).collect();
    let users: Vec<String> = (0..n).map(user_of).collect();
    let appended = stream_answers(args, &http, &users, &runs, None, Some(base_us)).await?;
    let streamed = started.elapsed();
    // Every reader has its whole text (or give it 30 s more).
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.done.load(Ordering::Relaxed) < (n * per_answer) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_at = started.elapsed();
    let after = Probe::read(pid, args)?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let history = gauge(&http, &args.url, "herald_history_events")
        .await
        .unwrap_or(f64::NAN);
    // On Redis the gauge is not kept: count user 0's log entries instead.
    let redis_entries = match args.redis_port {
        Some(port) => {
            let key = format!("herald:{{user:{}}}:log", user_of(0));
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "XLEN", &key])
                .output()
                .context("redis-cli")?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        }
        None => None,
    };
    // A page of user 0 reloaded at the answer's middle (its agent_started is
    // seq 1, so token k is seq 1 + k).
    let (reload_frames, reload_bytes) =
        reload(args, &user_of(0), &epochs[0], 1 + tokens as u64 / 2).await?;
    let (full_frames, full_bytes) = reload(args, &user_of(0), "", 0).await?;
    for r in readers {
        r.abort();
    }

    let ticks = 100.0; // USER_HZ
    let per = |v: f64| v / n as f64;
    let [took, per_second] = streaming_figures(streamed, delivered_at, appended);
    let mut figures = vec![
        (
            "answers × tokens".into(),
            format!("{n} × {tokens} at {rate}/s"),
        ),
        ("deltas appended".into(), appended.to_string()),
        (
            "sockets per answer (reconnected mid-answer)".into(),
            format!("{per_answer} ({})", seen.reloads.load(Ordering::Relaxed)),
        ),
        (
            "token gaps (1 ± jitter) / rate".into(),
            format!("jitter {}", args.jitter),
        ),
        (
            "delta frames received / tokens received".into(),
            format!(
                "{} / {}",
                seen.deltas.load(Ordering::Relaxed),
                seen.tokens.load(Ordering::Relaxed)
            ),
        ),
        (
            "sockets that read their answer whole".into(),
            seen.done.load(Ordering::Relaxed).to_string(),
        ),
        (
            "seq gaps".into(),
            seen.gaps.load(Ordering::Relaxed).to_string(),
        ),
        took,
        per_second,
        (
            "history entries per answer (agent_started + text)".into(),
            match redis_entries {
                Some(e) => format!("{e} (user 0's Redis log)"),
                None => format!("{:.2}", per(history - history_before)),
            },
        ),
        (
            "page reloaded mid-answer: frames / bytes".into(),
            format!("{reload_frames} / {reload_bytes}"),
        ),
        (
            "page opened after the answer: frames / bytes".into(),
            format!("{full_frames} / {full_bytes}"),
        ),
    ];
    if let (Some(a), Some(b)) = (before.cpu, after.cpu) {
        let secs = (b - a) as f64 / ticks;
        let read = seen.tokens.load(Ordering::Relaxed).max(1) as f64;
        figures.push((
            "server CPU".into(),
            format!(
                "{secs:.1} s = {:.1} ms per answer, {:.2} µs per delta appended, {:.2} µs per token delivered",
                per(secs) * 1e3,
                secs * 1e6 / appended.max(1) as f64,
                secs * 1e6 / read
            ),
        ));
    }
    {
        // The generator's own CPU, and the cores the three processes kept
        // busy together over the window (of this machine's, all shared).
        let secs = after.bench_cpu.saturating_sub(before.bench_cpu) as f64 / ticks;
        let read = seen.tokens.load(Ordering::Relaxed).max(1) as f64;
        let span = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / ticks,
            _ => 0.0,
        };
        let all = secs + span(before.cpu, after.cpu) + span(before.redis_cpu, after.redis_cpu);
        figures.push((
            "generator CPU (this process)".into(),
            format!(
                "{secs:.1} s = {:.2} µs per token delivered; with the server's and Redis's, {:.2} cores busy over {:.1} s",
                secs * 1e6 / read,
                all / delivered_at.as_secs_f64(),
                delivered_at.as_secs_f64()
            ),
        ));
    }
    if let (Some(a), Some(b)) = (before.redis_cpu, after.redis_cpu) {
        let secs = (b - a) as f64 / ticks;
        figures.push((
            "redis CPU".into(),
            format!(
                "{secs:.1} s = {:.1} ms per answer, {:.2} µs per delta",
                per(secs) * 1e3,
                secs * 1e6 / appended.max(1) as f64
            ),
        ));
    }
    if let (Some(a), Some(b)) = (before.redis_cmds, after.redis_cmds) {
        figures.push((
            "redis commands per answer".into(),
            format!(
                "{:.0} ({:.1} per delta)",
                per((b - a) as f64),
                (b - a) as f64 / appended.max(1) as f64
            ),
        ));
    }
    if let (Some(a), Some(b)) = (before.redis_mem, after.redis_mem) {
        figures.push((
            "redis used_memory per answer".into(),
            format!("{:.1} KiB", per(b as f64 - a as f64) / 1024.0),
        ));
    }
    if let (Some(a), Some(b)) = (before.rss, after.rss) {
        figures.push((
            "server RSS per answer".into(),
            format!("{:.1} KiB", per(b as f64 - a as f64) / 1024.0),
        ));
    }
    Ok(Summary {
        scenario: args.scenario,
        connections: n,
        failed_connections: 0,
        figures,
        latency_us: Percentiles::of(&seen.latency.merged()),
    })
}

/// The streaming phase's figures (how long it took, until all was
/// delivered, and the deltas/s of all answers), as both targets report them.
pub(crate) fn streaming_figures(
    streamed: Duration,
    delivered_at: Duration,
    appended: u64,
) -> [(String, String); 2] {
    [
        (
            "streaming took".into(),
            format!(
                "{:.1} s (all delivered at {:.1} s)",
                streamed.as_secs_f64(),
                delivered_at.as_secs_f64()
            ),
        ),
        (
            "deltas/s (all answers)".into(),
            format!("{:.0}", appended as f64 / streamed.as_secs_f64()),
        ),
    ]
}

/// The time stamps (`t<n>`, space-separated words) in a text of one or more
/// joined deltas.
pub(crate) fn stamps(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.split(' ')
        .filter_map(|t| t.strip_prefix('t')?.parse().ok())
}

/// A delta's text stamped with `t` (the word `t<t> `), then `pad` and a
/// closing space when there is a pad, so a frame that joins several (their
/// texts run together) keeps every stamp.
pub(crate) fn stamped(t: u64, pad: &str) -> String {
    if pad.is_empty() {
        format!("t{t} ")
    } else {
        format!("t{t} {pad} ")
    }
}

/// One socket reading one answer: every delta in seq order, each token
/// once, the latency of each token read live; with `reload`, reconnect
/// once at the answer's middle and resume.
#[allow(clippy::too_many_arguments)]
async fn read_answer(
    mut ws: crate::bench::Ws,
    mut welcome: serde_json::Value,
    seen: Arc<Seen>,
    tokens: u64,
    mut reload: bool,
    addr: std::net::SocketAddr,
    url: String,
    jwt: String,
) {
    let (mut last, mut got) = (0u64, 0u64);
    loop {
        let live_after = welcome["seq"].as_u64().unwrap_or(0);
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                continue;
            };
            if v["type"] != "event" {
                continue;
            }
            let seq = v["seq"].as_u64().unwrap_or(0);
            let from = v["from_seq"].as_u64().unwrap_or(seq);
            if last != 0 && from != last + 1 {
                seen.gaps.fetch_add(1, Ordering::Relaxed);
            }
            last = seq;
            if v["event"] != "agent_text_delta" {
                continue;
            }
            seen.deltas.fetch_add(1, Ordering::Relaxed);
            let now_us = now_ns() / 1000 - seen.base_us;
            let text = v["data"]["text"].as_str().unwrap_or_default();
            for at in stamps(text) {
                got += 1;
                seen.tokens.fetch_add(1, Ordering::Relaxed);
                if seq > live_after {
                    seen.latency.record(seq as usize, now_us.saturating_sub(at));
                }
            }
            if got >= tokens {
                seen.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if reload && got >= tokens / 2 {
                break;
            }
        }
        if !reload {
            return;
        }
        // The page reloads: a new socket resumes after the last seq read.
        reload = false;
        drop(ws);
        let source = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
        match open_client(addr, &url, source, &jwt, Some((epoch, last))).await {
            Ok((w, v)) => {
                seen.reloads.fetch_add(1, Ordering::Relaxed);
                (ws, welcome) = (w, v);
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_stamped_deltas_keep_every_stamp() {
        for pad in ["", "x", "xxxx"] {
            let joined: String = [11, 22, 33].map(|t| stamped(t, pad)).concat();
            assert_eq!(
                stamps(&joined).collect::<Vec<_>>(),
                [11, 22, 33],
                "{joined:?}"
            );
        }
    }
}
