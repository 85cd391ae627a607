//! `herald-bench soak`: a long run at moderate load with everything that
//! churns — clients that reconnect with resume, kicks through the API, slow
//! consumers that stop reading — while the server's RSS, open descriptors
//! and threads (from /proc) and its live connections (from /metrics) are
//! sampled every `--sample-secs`. The report gives each series' least-squares
//! slope per hour over the run after a warm-up, and the steady readers' loss
//! and gap counts (every event published to them must arrive, in order).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::{
    BenchArgs, api_client, metric_in, metrics_page, open_client, rss_of, server_addr, token, ws_url,
};

/// Steady readers: they read everything and check seqs (no loss, no gap).
const STEADY: usize = 50;
/// Churners: connect, read a while, leave, come back with resume.
const CHURNERS: usize = 100;
/// Slow consumers: connect and never read (the server closes them 4001).
const SLOW: usize = 10;

#[derive(Default)]
struct Counts {
    reconnects: AtomicU64,
    kicks: AtomicU64,
    slow_closed: AtomicU64,
    published: AtomicU64,
    steady_received: AtomicU64,
    steady_gaps: AtomicU64,
    /// Events a reader got twice or out of order (a seq at or below the last).
    repeats: AtomicU64,
    /// Gaps seen by churners after their welcome or resume.
    churn_gaps: AtomicU64,
    resets: AtomicU64,
    errors: AtomicU64,
}

/// What every client task needs: where to connect, how to sign its token,
/// where to count, when to stop.
struct Ctx {
    addr: SocketAddr,
    url: String,
    secret: String,
    counts: Arc<Counts>,
    deadline: Instant,
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    rss: f64,
    fds: f64,
    threads: f64,
    live: f64,
    /// What the broker charges to `history_max_bytes` (`herald_history_bytes`).
    history: f64,
    /// The live heap (`herald_heap_bytes`, only from a `dhat-heap` build; NaN otherwise).
    heap: f64,
    /// Tasks alive in the server's runtime (`herald_tasks_alive`).
    tasks: f64,
}

/// Run the soak: `--duration` seconds, `--rate` events/s in total.
pub async fn soak(args: &BenchArgs) -> anyhow::Result<()> {
    let Some(&pid) = args.server_pid.first() else {
        bail!("soak needs --server-pid to sample the server");
    };
    let addr = server_addr(&args.url)?;
    let url = ws_url(&args.url);
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let http = api_client()?;
    // The server before any client: what it must come back to.
    let baseline = sample(&http, &args.url, pid, 0.0).await?;
    let mut tasks = Vec::new();
    let ctx = Arc::new(Ctx {
        addr,
        url: url.clone(),
        secret: args.secret.clone(),
        counts: counts.clone(),
        deadline,
    });
    for i in 0..STEADY {
        tasks.push(tokio::spawn(steady(ctx.clone(), i)));
    }
    for i in 0..CHURNERS {
        tasks.push(tokio::spawn(churner(ctx.clone(), i)));
    }
    for i in 0..SLOW {
        tasks.push(tokio::spawn(slow(ctx.clone(), i)));
    }
    tasks.push(tokio::spawn(publisher(
        http.clone(),
        args.clone(),
        counts.clone(),
        deadline,
    )));
    tasks.push(tokio::spawn(kicker(
        http.clone(),
        args.clone(),
        counts.clone(),
        deadline,
    )));

    let started = Instant::now();
    let mut samples = Vec::new();
    let every = Duration::from_secs(args.sample_secs.max(1));
    while Instant::now() < deadline {
        // One failed read of /metrics is a missing sample, not the end of the run.
        let s = match sample(&http, &args.url, pid, started.elapsed().as_secs_f64()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("soak: sample skipped: {e}");
                tokio::time::sleep(every).await;
                continue;
            }
        };
        eprintln!(
            "soak t={:>5.0}s rss={:.1} MiB history={:.1} MiB heap={:.1} MiB fds={} threads={} tasks={} live={} published={} reconnects={} resets={} kicks={} slow_closed={} gaps={}",
            s.t,
            s.rss / 1048576.0,
            s.history / 1048576.0,
            s.heap / 1048576.0,
            s.fds,
            s.threads,
            s.tasks,
            s.live,
            counts.published.load(Ordering::Relaxed),
            counts.reconnects.load(Ordering::Relaxed),
            counts.resets.load(Ordering::Relaxed),
            counts.kicks.load(Ordering::Relaxed),
            counts.slow_closed.load(Ordering::Relaxed),
            counts.steady_gaps.load(Ordering::Relaxed),
        );
        samples.push(s);
        tokio::time::sleep(every).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    // After everyone left: the server should be back to no connections.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = sample(&http, &args.url, pid, started.elapsed().as_secs_f64()).await?;
    report(args, &samples, end, &counts);
    // The server's count of resets, by cause (what the clients saw as `reset`).
    let page = metrics_page(&http, &args.url).await?;
    let causes: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("herald_resets_total{"))
        .collect();
    if causes.is_empty() {
        println!("  server resets by cause: none");
    } else {
        println!("  server resets by cause: {}", causes.join(", "));
    }
    let failures = verdict(&counts, &baseline, &end);
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        bail!("soak: FAIL: {}", failures.join("; "))
    }
}

/// Descriptors and runtime tasks the server may hold after the run beyond
/// its baseline (the metrics scrape's own connection, timers settling).
const END_SLACK: f64 = 8.0;

/// What makes the soak fail: any gap, repeat or reorder a reader saw, any
/// reset (every client resumes within the history the server keeps, so a
/// reset is unexplained), connections left, or descriptors or tasks the
/// server did not give back once every client left.
fn verdict(c: &Counts, baseline: &Sample, end: &Sample) -> Vec<String> {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for (what, n) in [
        ("steady readers' gaps", l(&c.steady_gaps)),
        ("churners' gaps", l(&c.churn_gaps)),
        ("events repeated or out of order", l(&c.repeats)),
        ("resets", l(&c.resets)),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    if end.live > 0.0 {
        failures.push(format!("{} connections left after the run", end.live));
    }
    if end.fds > baseline.fds + END_SLACK {
        failures.push(format!(
            "open fds grew from {} to {}",
            baseline.fds, end.fds
        ));
    }
    if end.tasks > baseline.tasks + END_SLACK {
        failures.push(format!(
            "runtime tasks grew from {} to {}",
            baseline.tasks, end.tasks
        ));
    }
    if l(&c.steady_received) == 0 {
        failures.push("the steady readers received nothing".into());
    }
    failures
}

async fn sample(http: &reqwest::Client, base: &str, pid: u32, t: f64) -> anyhow::Result<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .context("the soak reads /proc/PID/fd (Linux, same user)")?
        .count() as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no Threads in /proc/PID/status")?;
    let metrics = metrics_page(http, base).await?;
    let gauge = |name: &str| metric_in(&metrics, name).unwrap_or(f64::NAN);
    Ok(Sample {
        t,
        rss: rss_of(pid)? as f64,
        fds,
        threads,
        live: gauge("herald_connections_live"),
        history: gauge("herald_history_bytes"),
        heap: gauge("herald_heap_bytes"),
        tasks: gauge("herald_tasks_alive"),
    })
}

/// Least-squares slope of `y` over `t`, per hour.
fn slope_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    cov / var * 3600.0
}

fn report(args: &BenchArgs, samples: &[Sample], end: Sample, c: &Counts) {
    // The first two minutes (or the first fifth) are warm-up: allocator
    // arenas, history filling to its bounds.
    let warm = (args.duration as f64 / 5.0).min(120.0);
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm).collect();
    let series = |f: fn(&Sample) -> f64| -> (f64, f64, f64, f64) {
        let pts: Vec<(f64, f64)> = steady.iter().map(|s| (s.t, f(s))).collect();
        let min = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64;
        (slope_per_hour(&pts), min, max, mean)
    };
    println!(
        "soak: {} s, {} samples after a {warm:.0} s warm-up, {} events/s",
        args.duration,
        steady.len(),
        args.rate
    );
    for (name, f, unit, scale) in [
        (
            "RSS",
            (|s: &Sample| s.rss) as fn(&Sample) -> f64,
            "MiB",
            1048576.0,
        ),
        ("history charged", |s: &Sample| s.history, "MiB", 1048576.0),
        (
            "RSS - history",
            |s: &Sample| s.rss - s.history,
            "MiB",
            1048576.0,
        ),
        ("heap (dhat build)", |s: &Sample| s.heap, "MiB", 1048576.0),
        ("open fds", |s: &Sample| s.fds, "", 1.0),
        ("threads", |s: &Sample| s.threads, "", 1.0),
        ("runtime tasks", |s: &Sample| s.tasks, "", 1.0),
        ("live connections", |s: &Sample| s.live, "", 1.0),
    ] {
        let (slope, min, max, mean) = series(f);
        if mean.is_nan() {
            continue;
        }
        println!(
            "  {name:<17} mean {:>9.2}{unit} min {:>9.2} max {:>9.2} slope {:>+9.3}{unit}/h",
            mean / scale,
            min / scale,
            max / scale,
            slope / scale
        );
    }
    // Means by sixth of the run: a plateau and a leak look different here.
    let sixth = args.duration as f64 / 6.0;
    let means = |f: fn(&Sample) -> f64| -> Vec<String> {
        (0..6)
            .map(|k| {
                let part: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.t >= k as f64 * sixth && s.t < (k + 1) as f64 * sixth)
                    .map(f)
                    .collect();
                let mean = part.iter().sum::<f64>() / part.len().max(1) as f64;
                format!("{:.1}", mean / 1048576.0)
            })
            .collect()
    };
    println!(
        "  RSS by sixth of the run (MiB): {}",
        means(|s| s.rss).join(", ")
    );
    if samples.iter().any(|s| !s.heap.is_nan()) {
        println!(
            "  heap by sixth of the run (MiB): {}",
            means(|s| s.heap).join(", ")
        );
    }
    println!(
        "  after the run: rss {:.1} MiB (history {:.1} MiB), fds {}, threads {}, tasks {}, live connections {}",
        end.rss / 1048576.0,
        end.history / 1048576.0,
        end.fds,
        end.threads,
        end.tasks,
        end.live
    );
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "  published {} events; steady readers received {} with {} gaps; churners {} gaps; {} repeated or out of order; {} reconnects with resume ({} resets), {} kicks, {} slow consumers closed, {} client errors",
        l(&c.published),
        l(&c.steady_received),
        l(&c.steady_gaps),
        l(&c.churn_gaps),
        l(&c.repeats),
        l(&c.reconnects),
        l(&c.resets),
        l(&c.kicks),
        l(&c.slow_closed),
        l(&c.errors)
    );
}

/// Count a resume answered with `reset`; the first 20 are described on stderr
/// (where the client asked to resume and what the welcome said).
fn note_reset(c: &Counts, user: &str, asked: Option<&(String, u64)>, welcome: &serde_json::Value) {
    let n = c.resets.fetch_add(1, Ordering::Relaxed);
    if n < 20 {
        let (epoch, seq) = asked.map_or(("-", 0), |(e, s)| (e.as_str(), *s));
        eprintln!(
            "soak: reset #{} for {user}: asked ({epoch}, {seq}), welcome epoch {} seq {}",
            n + 1,
            welcome["epoch"],
            welcome["seq"]
        );
    }
}

fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8))
}

/// A reader that stays: every event of its user must arrive once, in order.
async fn steady(ctx: Arc<Ctx>, i: usize) {
    let (addr, url, c, deadline) = (ctx.addr, &ctx.url, &ctx.counts, ctx.deadline);
    let user = format!("steady{i}");
    let Ok(tok) = token(&ctx.secret, &user) else {
        return;
    };
    let mut position: Option<(String, u64)> = None;
    while Instant::now() < deadline {
        let (mut ws, welcome) =
            match open_client(addr, url, source(i), &tok, position.clone()).await {
                Ok(v) => v,
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        if welcome["reset"] == true {
            note_reset(c, &user, position.as_ref(), &welcome);
        }
        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
        let mut last = match &position {
            Some((e, s)) if *e == epoch && welcome["reset"] != true => *s,
            _ => welcome["seq"].as_u64().unwrap_or(0),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, ws.next()).await {
                Err(_) => {
                    let _ = ws.close(None).await;
                    return;
                }
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"event\"") => {
                    let seq = serde_json::from_str::<serde_json::Value>(&t)
                        .ok()
                        .and_then(|v| v["seq"].as_u64())
                        .unwrap_or(0);
                    if seq <= last {
                        c.repeats.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if seq != last + 1 {
                        c.steady_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    last = seq;
                    c.steady_received.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
        // Kicked (or dropped): come back where it left off.
        position = Some((epoch, last));
        c.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connect, read for 1–5 s, leave (a close, or a drop without one), return with resume.
async fn churner(ctx: Arc<Ctx>, i: usize) {
    let (addr, url, c, deadline) = (ctx.addr, &ctx.url, &ctx.counts, ctx.deadline);
    let user = format!("churn{}", i % 40);
    let Ok(tok) = token(&ctx.secret, &user) else {
        return;
    };
    let mut position: Option<(String, u64)> = None;
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let Ok((mut ws, welcome)) =
            open_client(addr, url, source(STEADY + i), &tok, position.clone()).await
        else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        c.reconnects.fetch_add(1, Ordering::Relaxed);
        if welcome["reset"] == true {
            note_reset(c, &user, position.as_ref(), &welcome);
        }
        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
        // Resumed: the replay starts after where it left off.
        let mut last = match &position {
            Some((e, s)) if *e == epoch && welcome["reset"] != true => *s,
            _ => welcome["seq"].as_u64().unwrap_or(0),
        };
        let stay = Duration::from_millis(1000 + (rand::random::<u64>() % 4000));
        let until = Instant::now() + stay;
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(until.saturating_duration_since(Instant::now()), ws.next()).await
        {
            if let Message::Text(t) = msg
                && t.starts_with("{\"type\":\"event\"")
                && let Some(seq) = serde_json::from_str::<serde_json::Value>(&t)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
            {
                if seq <= last {
                    c.repeats.fetch_add(1, Ordering::Relaxed);
                } else {
                    if seq != last + 1 {
                        c.churn_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    last = seq;
                }
            }
        }
        if round.is_multiple_of(3) {
            drop(ws); // gone without a close frame
        } else {
            let _ = ws.send(Message::Close(None)).await;
        }
        position = Some((epoch, last));
    }
}

/// Connect and never read: the server closes it as a slow consumer (4001)
/// once its queue is over the bound, or it is kicked; then it returns.
async fn slow(ctx: Arc<Ctx>, i: usize) {
    let (addr, url, c, deadline) = (ctx.addr, &ctx.url, &ctx.counts, ctx.deadline);
    let user = format!("slow{i}");
    let Ok(tok) = token(&ctx.secret, &user) else {
        return;
    };
    while Instant::now() < deadline {
        let Ok((ws, _)) = open_client(addr, url, source(STEADY + CHURNERS + i), &tok, None).await
        else {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        // Hold it unread for 20 s, then see how it ended.
        tokio::time::sleep(
            Duration::from_secs(20).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        let mut ws = ws;
        let mut closed = false;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            if matches!(msg, Ok(Message::Close(_)) | Err(_)) {
                closed = true;
                break;
            }
        }
        if closed {
            c.slow_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `--rate` events/s in batches of 50, to every user above (slow users get
/// 16 KB events so their queues fill).
async fn publisher(http: reqwest::Client, args: BenchArgs, c: Arc<Counts>, deadline: Instant) {
    let batch = 50u64;
    let every = Duration::from_secs_f64(batch as f64 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(every);
    let pad = "x".repeat(args.event_size);
    let big = "y".repeat(16 * 1024);
    let mut n = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let events: Vec<_> = (0..batch)
            .map(|_| {
                n += 1;
                let (user, data) = match n % 10 {
                    0..=5 => (format!("steady{}", n % STEADY as u64), &pad),
                    6..=8 => (format!("churn{}", n % 40), &pad),
                    _ => (format!("slow{}", n % SLOW as u64), &big),
                };
                json!({"user_id": user, "event": "soak", "data": {"n": n, "pad": data}})
            })
            .collect();
        let sent = http
            .post(format!("{}/api/v1/events", args.url))
            .bearer_auth(&args.api_key)
            .json(&json!({ "events": events }))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                c.published.fetch_add(batch, Ordering::Relaxed);
            }
            _ => {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Every 5 s, kick one steady user and one churning user.
async fn kicker(http: reqwest::Client, args: BenchArgs, c: Arc<Counts>, deadline: Instant) {
    let mut k = 0usize;
    // The first kick a second in (so a short run has one), then every 5 s;
    // none after the deadline. A kick counts when it closed a connection.
    let mut next = Instant::now() + Duration::from_secs(1);
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_secs(5);
        k += 1;
        for user in [format!("steady{}", k % STEADY), format!("churn{}", k % 40)] {
            let r = http
                .post(format!("{}/api/v1/disconnect", args.url))
                .bearer_auth(&args.api_key)
                .json(&json!({ "user_id": user }))
                .send()
                .await;
            let Ok(r) = r else { continue };
            let closed = r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["disconnected"].as_u64())
                .unwrap_or(0);
            if closed > 0 {
                c.kicks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(fds: f64, tasks: f64, live: f64) -> Sample {
        Sample {
            t: 0.0,
            rss: 0.0,
            fds,
            threads: 0.0,
            live,
            history: 0.0,
            heap: f64::NAN,
            tasks,
        }
    }

    /// The soak fails on any gap, repeat or reset, on connections left and
    /// on descriptors or tasks not given back; a clean run passes.
    #[test]
    fn the_verdict_fails_on_every_kind_of_fault() {
        let base = sample(100.0, 50.0, 0.0);
        let clean = Counts::default();
        clean.steady_received.store(10, Ordering::Relaxed);
        assert!(verdict(&clean, &base, &sample(104.0, 55.0, 0.0)).is_empty());
        type Fault = (&'static str, fn(&Counts));
        let faults: [Fault; 4] = [
            ("gaps", |c| {
                c.steady_gaps.store(1, Ordering::Relaxed);
            }),
            ("churners", |c| {
                c.churn_gaps.store(1, Ordering::Relaxed);
            }),
            ("repeated", |c| {
                c.repeats.store(1, Ordering::Relaxed);
            }),
            ("resets", |c| {
                c.resets.store(1, Ordering::Relaxed);
            }),
        ];
        for (what, fault) in faults {
            let c = Counts::default();
            c.steady_received.store(10, Ordering::Relaxed);
            fault(&c);
            let failures = verdict(&c, &base, &base);
            assert!(
                failures.iter().any(|f| f.contains(what)),
                "{what}: {failures:?}"
            );
        }
        for (end, what) in [
            (sample(100.0, 50.0, 3.0), "connections left"),
            (sample(140.0, 50.0, 0.0), "open fds grew"),
            (sample(100.0, 90.0, 0.0), "runtime tasks grew"),
        ] {
            let failures = verdict(&clean, &base, &end);
            assert!(
                failures.iter().any(|f| f.contains(what)),
                "{what}: {failures:?}"
            );
        }
        assert!(
            !verdict(&Counts::default(), &base, &base).is_empty(),
            "nothing received"
        );
    }
}
