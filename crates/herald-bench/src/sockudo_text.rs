//! `herald-bench text --target sockudo`: the token workload of `text.rs`
//! driven against Sockudo 5.2's AI transport (mutable messages with
//! appends), so its token path can be set beside Herald's text ingest.
//!
//! - Every one of `--connections` answers has its own public channel
//!   (`ai-text-<tag>-<u>`; `ai-` is the prefix the Sockudo configuration
//!   must list in `ai_transport.channels`, else no rollup), read by
//!   `--readers` Protocol V2 sockets (`/app/<key>?protocol=2`, default
//!   `append_mode=delta`: each append frame carries only the new text).
//!   V1 (Pusher protocol 7) sockets are not sent appends at all.
//! - Before the measured phase each answer's message is created by a
//!   signed `POST /apps/<id>/events` with `info` (the answer then carries
//!   its `message_serial`), as Herald's phase is preceded by `agent_started`.
//! - Then, all at once, each answer's tokens go out at `--rate` tokens/s
//!   (gaps (1 ± `--jitter`) / rate, on a fixed schedule) as one signed `POST
//!   /apps/<id>/channels/<ch>/messages/<serial>/append` each: Sockudo has no
//!   batched or streaming append, and answers every API request with
//!   `Connection: close`, so every token is a request on a new connection.
//!   Appends of one answer are sequential (concurrent ones could reorder); a
//!   token due while the previous append is still in flight waits and is
//!   counted as sent late. The answer ends with a terminal append (`extras.ai
//!   .transport.status = "complete"`, no text), which flushes what Sockudo's
//!   rollup still holds.
//! - Each token's text is the µs it was handed to Sockudo (`t<µs> `, the
//!   stamp of `text.rs`), taken just before its request is sent, so a
//!   token's latency is: handed to Sockudo's API → read by a socket. Sockudo
//!   coalesces an AI channel's appends (the first of a window at once, the
//!   rest of the window's 40 ms in one frame at its end), so a frame may
//!   carry several stamps; each counts as a token.
//! - Readers check every token arrives once and in order (stamps strictly
//!   increasing per socket; the channel `serial` skips on coalescing, so it
//!   cannot tell loss).
//!
//! Reported as `text.rs` reports (labels the same where the figure is):
//! server CPU and RSS over the measured phase (`--server-pid`), frames and
//! tokens received, sockets that read their answer whole, latency; plus the
//! appends' HTTP round trips and how many were sent behind schedule.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::{
    BenchArgs, Percentiles, Shards, Summary, Ws, api_client, cpu_ticks, dial, now_ns, rss_of,
    server_addr,
};
use crate::pusher::{Frame, Publisher, expect_event};
use crate::text::{stamped, stamps, streaming_figures};

/// The channel prefix Sockudo's `ai_transport.channels` must list for
/// these answers to get the AI transport's rollup and limits.
pub(crate) const AI_PREFIX: &str = "ai-";

/// The name of the event that creates each answer's message.
const CREATE_EVENT: &str = "answer";

/// What the readers saw, all answers together.
struct Seen {
    frames: AtomicU64,
    tokens: AtomicU64,
    out_of_order: AtomicU64,
    done: AtomicU64,
    /// Token latencies (µs): handed to Sockudo → read.
    latency: Shards,
    /// The µs (wall clock) token stamps count from.
    base_us: u64,
}

/// What the answers' producers did, all answers together.
struct Sent {
    appended: AtomicU64,
    failed: AtomicU64,
    /// Appends sent more than 1 ms after their due time (the previous one
    /// of the answer was still in flight), and their total lateness (µs).
    late: AtomicU64,
    late_us: AtomicU64,
    /// Round trips (µs) of the appends: request sent → answer read.
    round_trip: Shards,
    first_error: Mutex<Option<String>>,
}

impl Sent {
    fn fail(&self, e: anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .get_or_insert_with(|| format!("{e:#}"));
    }
}

/// The Protocol V2 WebSocket URL of app `key` (append frames in delta mode).
fn ws_url_v2(http: &str, key: &str) -> String {
    format!(
        "{}/app/{key}?protocol=2&client=herald-bench&version=1.0",
        http.trim_end_matches('/').replacen("http", "ws", 1)
    )
}

/// Open one V2 connection from `source`, subscribe it to `channel` and
/// wait until the subscription succeeded.
async fn open_v2(addr: SocketAddr, url: &str, source: IpAddr, channel: &str) -> anyhow::Result<Ws> {
    let mut ws = dial(addr, url, source).await?;
    expect_event(&mut ws, &["sockudo:connection_established"]).await?;
    let sub = json!({"event": "sockudo:subscribe", "data": {"channel": channel}});
    ws.send(Message::text(sub.to_string())).await?;
    expect_event(&mut ws, &["sockudo_internal:subscription_succeeded"]).await?;
    Ok(ws)
}

/// Create the message of the answer on `channel`; its `message_serial`.
async fn create(api: &Publisher, channel: &str) -> anyhow::Result<String> {
    // `info` makes Sockudo answer with the channel's publish receipt.
    let body = json!({"name": CREATE_EVENT, "channel": channel, "data": "", "info": ""});
    let v = api
        .post_json("/events", body.to_string().into_bytes())
        .await?;
    v["channels"][channel]["message_serial"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no message_serial in {v}"))
}

/// Append `body` to message `serial` on `channel`.
async fn append(
    api: &Publisher,
    channel: &str,
    serial: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let path = format!("/channels/{channel}/messages/{serial}/append");
    let v = api.post_json(&path, body.to_string().into_bytes()).await?;
    anyhow::ensure!(v["status"] == "applied", "append not applied: {v}");
    Ok(())
}

/// Stream one answer: `tokens` appends at `rate` tokens/s with `jitter`,
/// then the terminal append.
#[allow(clippy::too_many_arguments)]
async fn stream_answer(
    api: Publisher,
    channel: String,
    serial: String,
    tokens: usize,
    rate: u64,
    jitter: f64,
    base_us: u64,
    sent: Arc<Sent>,
) {
    let interval = 1.0 / rate as f64;
    let mut due = Instant::now();
    for i in 0..tokens {
        if i > 0 {
            let spread = 1.0 + jitter * (rand::random::<f64>() * 2.0 - 1.0);
            due += Duration::from_secs_f64(interval * spread);
            let now = Instant::now();
            if now > due + Duration::from_millis(1) {
                sent.late.fetch_add(1, Ordering::Relaxed);
                sent.late_us
                    .fetch_add((now - due).as_micros() as u64, Ordering::Relaxed);
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let text = stamped(now_ns() / 1000 - base_us, "");
        let t = Instant::now();
        match append(&api, &channel, &serial, json!({ "data": text })).await {
            Ok(()) => {
                sent.round_trip.record(i, t.elapsed().as_micros() as u64);
                sent.appended.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => sent.fail(e),
        }
    }
    let end = json!({"data": "", "extras": {"ai": {"transport": {"status": "complete"}}}});
    if let Err(e) = append(&api, &channel, &serial, end).await {
        sent.fail(e);
    }
}

/// One socket reading one answer: every token once, in order, the latency
/// of each.
async fn read_answer(mut ws: Ws, idx: usize, seen: Arc<Seen>, tokens: u64) {
    let (mut last, mut got) = (0u64, 0u64);
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(f) = serde_json::from_str::<Frame>(&t) else {
            continue;
        };
        match f.event.as_ref() {
            "sockudo:message.append" => {}
            "sockudo:ping" => {
                let pong = Message::text(r#"{"event":"sockudo:pong","data":{}}"#);
                if ws.send(pong).await.is_err() {
                    return;
                }
                continue;
            }
            _ => continue,
        }
        seen.frames.fetch_add(1, Ordering::Relaxed);
        let now_us = now_ns() / 1000 - seen.base_us;
        for at in stamps(f.data.as_deref().unwrap_or_default()) {
            got += 1;
            seen.tokens.fetch_add(1, Ordering::Relaxed);
            if at <= last {
                seen.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            last = at;
            seen.latency.record(idx, now_us.saturating_sub(at));
        }
        if got >= tokens {
            seen.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Run the scenario against Sockudo.
pub async fn text(args: &BenchArgs) -> anyhow::Result<Summary> {
    if args.reload_share > 0.0 {
        bail!("--reload-share (resume mid-answer) is not measured with --target sockudo");
    }
    let n = args.connections;
    let tokens = args.events;
    let rate = args.rate.max(1);
    let jitter = args.jitter.clamp(0.0, 1.0);
    let addr = server_addr(&args.url)?;
    let url = ws_url_v2(&args.url, &args.api_key);
    // Sockudo closes every API connection after its answer: each request
    // (create, append) opens a new one whatever the pool.
    let http = api_client()?;
    let api = Publisher::new(http, &args.url, &args.app_id, &args.api_key, &args.secret);
    let pid = args.server_pid.first().copied();
    let base_us = now_ns() / 1000;
    let seen = Arc::new(Seen {
        frames: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        out_of_order: AtomicU64::new(0),
        done: AtomicU64::new(0),
        latency: Shards::new(),
        base_us,
    });
    let sent = Arc::new(Sent {
        appended: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        late: AtomicU64::new(0),
        late_us: AtomicU64::new(0),
        round_trip: Shards::new(),
        first_error: Mutex::new(None),
    });
    let per_answer = args.readers.max(1);
    // Channels of this run only: a run in a row against the same server
    // would otherwise read the previous run's answers.
    let tag = now_ns();
    let channel_of = |u: usize| format!("{AI_PREFIX}text-{tag}-{u}");

    // `--readers` sockets per answer.
    let mut readers = Vec::with_capacity(n * per_answer);
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for k in 0..per_answer {
        for u in 0..n {
            let ws = open_v2(addr, &url, source, &channel_of(u))
                .await
                .with_context(|| format!("socket {} of answer {u}", k + 1))?;
            let seen = seen.clone();
            readers.push(tokio::spawn(read_answer(
                ws,
                k * n + u,
                seen,
                tokens as u64,
            )));
        }
    }
    eprintln!("{} connections open", n * per_answer);

    // Every answer's message, 64 creates at a time.
    let serials: Vec<String> = futures_util::stream::iter(0..n)
        .map(|u| {
            let (api, channel) = (api.clone(), channel_of(u));
            async move { create(&api, &channel).await }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("creating the answers' messages")?;
    let rss_before = pid.map(rss_of).transpose()?;
    let cpu_before = pid.map(cpu_ticks).transpose()?;

    // The answers, all at once.
    let started = Instant::now();
    let streams: Vec<_> = serials
        .into_iter()
        .enumerate()
        .map(|(u, serial)| {
            tokio::spawn(stream_answer(
                api.clone(),
                channel_of(u),
                serial,
                tokens,
                rate,
                jitter,
                base_us,
                sent.clone(),
            ))
        })
        .collect();
    for s in streams {
        s.await?;
    }
    let streamed = started.elapsed();
    // Every reader has its whole text (or give it 30 s more).
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.done.load(Ordering::Relaxed) < (n * per_answer) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_at = started.elapsed();
    let rss_after = pid.map(rss_of).transpose()?;
    let cpu_after = pid.map(cpu_ticks).transpose()?;
    for r in readers {
        r.abort();
    }

    let appended = sent.appended.load(Ordering::Relaxed);
    let failed = sent.failed.load(Ordering::Relaxed);
    let received = seen.tokens.load(Ordering::Relaxed);
    let expected = (n * per_answer * tokens) as u64;
    let late = sent.late.load(Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    let rtt = sent.round_trip.merged();
    let per = |v: f64| v / n as f64;
    let mut figures = vec![
        (
            "answers × tokens".into(),
            format!("{n} × {tokens} at {rate}/s"),
        ),
        ("deltas appended".into(), appended.to_string()),
        (
            "append requests failed (first error)".into(),
            match sent.first_error.lock().as_ref() {
                Some(e) => format!("{failed} ({e})"),
                None => failed.to_string(),
            },
        ),
        (
            "sockets per answer".into(),
            format!("{per_answer} (protocol 2, append_mode delta)"),
        ),
        (
            "token gaps (1 ± jitter) / rate".into(),
            format!("jitter {jitter}"),
        ),
        (
            "delta frames received / tokens received".into(),
            format!("{} / {received}", seen.frames.load(Ordering::Relaxed)),
        ),
        (
            "sockets that read their answer whole".into(),
            seen.done.load(Ordering::Relaxed).to_string(),
        ),
        (
            "tokens missing / out of order".into(),
            format!(
                "{} / {}",
                expected.saturating_sub(received),
                seen.out_of_order.load(Ordering::Relaxed)
            ),
        ),
        (
            "append round trip p50 / p99 / max".into(),
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                ms(rtt.value_at_quantile(0.5)),
                ms(rtt.value_at_quantile(0.99)),
                ms(rtt.max())
            ),
        ),
        (
            "appends sent > 1 ms behind schedule (mean lateness)".into(),
            format!(
                "{late} ({:.2} ms)",
                ms(sent.late_us.load(Ordering::Relaxed) / late.max(1))
            ),
        ),
    ];
    figures.extend(streaming_figures(streamed, delivered_at, appended));
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        let secs = (b - a) as f64 / 100.0; // USER_HZ
        figures.push((
            "server CPU".into(),
            format!(
                "{secs:.1} s = {:.1} ms per answer, {:.2} µs per delta appended, {:.2} µs per token delivered",
                per(secs) * 1e3,
                secs * 1e6 / appended.max(1) as f64,
                secs * 1e6 / received.max(1) as f64
            ),
        ));
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        figures.push((
            "server RSS per answer".into(),
            format!("{:.1} KiB", per(b as f64 - a as f64) / 1024.0),
        ));
    }
    Ok(Summary {
        scenario: args.scenario,
        connections: n * per_answer,
        failed_connections: 0,
        figures,
        latency_us: Percentiles::of(&seen.latency.merged()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_url_asks_for_protocol_2() {
        assert_eq!(
            ws_url_v2("http://127.0.0.1:6341/", "k"),
            "ws://127.0.0.1:6341/app/k?protocol=2&client=herald-bench&version=1.0"
        );
    }

    #[test]
    fn a_coalesced_frame_yields_each_stamp() {
        // Two appends rolled up into one frame, as Sockudo sends them.
        let frame =
            r#"{"event":"sockudo:message.append","channel":"ai-x","data":"t17 t42 ","serial":4}"#;
        let f: Frame = serde_json::from_str(frame).unwrap();
        let got: Vec<u64> = stamps(f.data.as_deref().unwrap()).collect();
        assert_eq!(got, [17, 42]);
    }
}
