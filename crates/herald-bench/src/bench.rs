//! A load generator for a running Herald.
//!
//! Scenarios:
//! - `fanout`: U users × K connections; events published through the HTTP
//!   API at R events/s (batched) → deliveries/s, publish→receive latency
//!   (HdrHistogram), loss (gaps in `seq`, deliveries the server counted but
//!   no client received).
//! - `connect`: connect + hello → welcome, as fast as allowed by a concurrency bound.
//! - `resume`: N clients drop their TCP connections, E events per user are
//!   published, all reconnect with `resume` → time until all caught up.
//! - `text`: N answers of E tokens at R tokens/s streamed at once over the
//!   streaming ingest → CPU, memory, history entries per answer, reload cost.
//! - `idle`: N idle connections → server RSS per connection and idle CPU
//!   (read from `/proc/<server pid>`).
//!
//! `--target sockudo` drives a Pusher-protocol server (Sockudo) through the
//! fanout and idle scenarios instead (see `pusher.rs`), and through the text
//! scenario with its AI transport's appends (see `sockudo_text.rs`).
//!
//! More connections than one process may hold (20,000 files here) are spread
//! over `--procs` worker processes (this same binary, `--worker`), each
//! binding its sockets to its own source address 127.0.0.x. Workers report
//! their histograms to the coordinator as serialized HdrHistograms.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::pusher::{self, Target};

/// Which measurement to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Fan-out throughput and publish→receive latency.
    Fanout,
    /// Connect + hello rate and latency.
    Connect,
    /// Catch-up after a mass reconnect with resume.
    Resume,
    /// Memory and CPU of idle connections.
    Idle,
    /// A long run with churn, kicks and slow consumers, sampling the
    /// server's RSS, descriptors and threads (see `soak.rs`).
    Soak,
    /// Answers streamed as text deltas over the streaming ingest, one per
    /// user at once (see `text.rs`).
    Text,
    /// The same answers read over `/ws` and over the AI SDK endpoint `/ai`,
    /// one phase each, compared by the server's CPU (see `ai.rs`).
    Ai,
}

/// Options of `herald-bench`.
#[derive(Debug, Clone, clap::Parser, Serialize, Deserialize)]
#[command(
    name = "herald-bench",
    version,
    about = "Load-test a running Herald (fanout, connect, resume, idle, soak)"
)]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Herald's HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "HERALD_JWT_HS256_SECRET")]
    pub secret: String,
    /// The server's API key.
    #[arg(long, env = "HERALD_API_KEY")]
    pub api_key: String,
    /// Connections in total.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Connections per user (fanout, ai); users = connections / per_user.
    #[arg(long, default_value_t = 10)]
    pub per_user: usize,
    /// Fanout: each group of `per_user` connections is one shared stream
    /// (`thread:bench-g<N>`) read by that many users, one connection each,
    /// instead of one user's stream; events are published to the stream.
    #[arg(long)]
    pub thread: bool,
    /// Fanout: publish each event as an `agent_text_delta` of run `answer`
    /// (part `answer`, its text the publish time `t<ns> `, the padding and a
    /// space, so the deltas a frame joins keep their stamps apart)
    /// instead of an ordinary event, so a delta's delivery is measured the
    /// same way as an ordinary event's.
    #[arg(long)]
    pub text_deltas: bool,
    /// Fanout: each ordinary event belongs to run `answer` (`run_id`), as
    /// the events of an answer do, so it is kept with its run as a delta is.
    #[arg(long, conflicts_with = "text_deltas")]
    pub in_run: bool,
    /// Events per second to publish (fanout).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds to publish (fanout) or to sample (idle).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Bytes of padding in each event's data (fanout, resume).
    #[arg(long, default_value_t = 100)]
    pub event_size: usize,
    /// Events published per user while clients are away (resume).
    #[arg(long, default_value_t = 20)]
    pub events: usize,
    /// Concurrent connection attempts.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Worker processes holding the connections (each binds 127.0.0.<2+i>).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Publish through this Herald instead of `--url` (fanout across nodes).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// PIDs of the server processes (repeat for several nodes), to read RSS
    /// (idle: the first) and CPU (fanout: all, over the publish phase) from /proc.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// PID of a Redis server, to report its CPU per 1,000 publishes (fanout).
    #[arg(long)]
    pub redis_pid: Option<u32>,
    /// The kernel-floor program (`gcc -O2 -o floor ../shared/bench/floor.c`):
    /// after the fanout, run it with the same connections, deliveries,
    /// frame size and rate, and report the server's CPU per delivery as a
    /// ratio to its figure (fanout).
    #[arg(long)]
    pub floor: Option<PathBuf>,
    /// Port of that Redis, to count its commands with `redis-cli` (text).
    #[arg(long)]
    pub redis_port: Option<u16>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write a latency-distribution plot (SVG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seconds between samples of the server (soak).
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
    /// Text: each gap between tokens is (1 ± jitter) / rate, uniformly.
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Text: sockets reading each answer.
    #[arg(long, default_value_t = 1)]
    pub readers: usize,
    /// Text: the share of those sockets that reconnect (resume) once, at
    /// the answer's middle.
    #[arg(long, default_value_t = 0.0)]
    pub reload_share: f64,
    /// The server to drive: Herald, or Sockudo over the Pusher protocol
    /// (fanout and idle; text over its AI transport's appends, see
    /// `sockudo_text.rs`; `--api-key` is then the app's key and `--secret`
    /// its secret; see `pusher.rs`).
    #[arg(long, value_enum, default_value_t = Target::Herald)]
    pub target: Target,
    /// The Pusher app id (`--target sockudo`).
    #[arg(long, default_value = "bench")]
    pub app_id: String,
    /// Most events in one publish request (fanout): each 20-ms tick's events
    /// go out in requests of at most this many.
    #[arg(long, default_value_t = 1000)]
    pub batch_max: usize,
    /// Internal: run as worker number N of a multi-process run.
    #[arg(long, hide = true)]
    pub worker: Option<usize>,
}

/// Shared counters of one process's connections.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) opened: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    pub(crate) received: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) closed_by_server: AtomicU64,
    /// Bytes of the events' text frames received (counted by the Pusher
    /// client only, for the mean frame size where no server metric tells it).
    pub(crate) bytes: AtomicU64,
}

/// Latency histograms, sharded to keep recording cheap.
pub(crate) struct Shards(Vec<Mutex<Histogram<u64>>>);

impl Shards {
    pub(crate) fn new() -> Self {
        Self((0..64).map(|_| Mutex::new(new_hist())).collect())
    }
    pub(crate) fn record(&self, i: usize, micros: u64) {
        let _ = self.0[i % self.0.len()].lock().record(micros.max(1));
    }
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut h = new_hist();
        for s in &self.0 {
            let _ = h.add(&*s.lock());
        }
        h
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs … 10 min, 3 significant figures; these bounds are valid constants.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// What one worker reports.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    opened: usize,
    failed: usize,
    received: u64,
    gaps: u64,
    closed_by_server: u64,
    /// Event bytes received (Pusher target).
    #[serde(default)]
    bytes: u64,
    /// Base64 V2-serialized HdrHistogram of latencies in µs.
    latency: String,
}

/// The summary printed at the end.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub(crate) scenario: Scenario,
    pub(crate) connections: usize,
    pub(crate) failed_connections: usize,
    pub(crate) figures: Vec<(String, String)>,
    pub(crate) latency_us: Option<Percentiles>,
}

/// Latency percentiles in µs.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    count: u64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

pub(crate) fn ws_url(http: &str) -> String {
    format!("{}/ws", http.replacen("http", "ws", 1))
}

pub(crate) fn server_addr(http: &str) -> anyhow::Result<SocketAddr> {
    let host = http.trim_start_matches("http://").trim_end_matches('/');
    host.parse()
        .with_context(|| format!("--url must be http://IP:PORT, got {http}"))
}

/// An HTTP client for Herald's API whose pooled connections expire before
/// the server's `http_header_timeout` (10 s) closes them as idle, so no
/// request is sent on a connection the server is closing.
pub(crate) fn api_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?)
}

/// Entry point of `herald-bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.worker.is_some() {
        return worker(args).await;
    }
    if args.procs > 1
        && matches!(
            args.scenario,
            Scenario::Resume | Scenario::Text | Scenario::Ai
        )
    {
        bail!("the resume, text and ai scenarios run in one process (at most ~19,000 connections)");
    }
    if args.target == Target::Sockudo
        && (!matches!(
            args.scenario,
            Scenario::Fanout | Scenario::Idle | Scenario::Text
        ) || args.thread)
    {
        bail!("--target sockudo runs the fanout, idle and text scenarios (without --thread)");
    }
    let summary = match args.scenario {
        Scenario::Soak => return crate::soak::soak(&args).await,
        Scenario::Fanout => fanout(&args).await?,
        Scenario::Connect => connect_scenario(&args).await?,
        Scenario::Resume => resume(&args).await?,
        Scenario::Idle => idle(&args).await?,
        Scenario::Text if args.target == Target::Sockudo => {
            crate::sockudo_text::text(&args).await?
        }
        Scenario::Text => crate::text::text(&args).await?,
        Scenario::Ai => crate::ai::ai(&args).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&summary);
    }
    Ok(())
}

// ---------------------------------------------------------------- clients --

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub(crate) fn token(secret: &str, user: &str) -> anyhow::Result<String> {
    token_with(secret, user, None)
}

/// A token for `user`, granting reading the bench's shared threads when
/// `threads` (`{"thread:bench-*": "r"}`).
fn token_with(secret: &str, user: &str, threads: Option<&str>) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        streams: Option<serde_json::Value>,
    }
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 6 * 3600;
    let streams = threads.map(|pattern| json!({ pattern: "r" }));
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub: user,
            exp,
            streams,
        },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The shared stream of fanout group `g` (`--thread`).
fn thread_of(g: usize) -> String {
    format!("thread:bench-g{g}")
}

/// Subscribe `ws` to shared stream `stream` and wait for `subscribed`.
async fn subscribe(ws: &mut Ws, stream: &str) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    let frame = json!({"type": "subscribe", "stream": stream}).to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::text(frame))
        .await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no answer to subscribe")?
            .context("closed before subscribed")??;
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("subscribed") => return Ok(()),
                Some("error") => anyhow::bail!("subscribe refused: {v}"),
                _ => {}
            }
        }
    }
}

/// Upgrade one WebSocket to `url` at `addr` from `source` (no delay, a
/// 2 KiB read buffer, no write buffer: the bench's client for every target).
pub(crate) async fn dial(addr: SocketAddr, url: &str, source: IpAddr) -> anyhow::Result<Ws> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 2048;
    cfg.write_buffer_size = 0;
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(cfg)).await?;
    Ok(ws)
}

/// Open one WebSocket from `source` and complete the hello; returns the
/// socket and the welcome.
pub(crate) async fn open_client(
    addr: SocketAddr,
    url: &str,
    source: IpAddr,
    token: &str,
    resume: Option<(String, u64)>,
) -> anyhow::Result<(Ws, serde_json::Value)> {
    let mut ws = dial(addr, url, source).await?;
    let mut hello = json!({"type": "hello", "token": token});
    if let Some((epoch, seq)) = resume {
        hello["resume"] = json!({"epoch": epoch, "seq": seq});
    }
    ws.send(Message::text(hello.to_string())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                if v["type"] == "welcome" {
                    return Ok((ws, v));
                }
                bail!("expected welcome, got {t}");
            }
            Some(Ok(Message::Close(f))) => bail!("closed at hello: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed at hello"),
        }
    }
}

#[derive(Deserialize)]
struct EventLite {
    #[serde(default)]
    seq: u64,
    /// The first seq a frame of joined text deltas covers.
    #[serde(default)]
    from_seq: Option<u64>,
    #[serde(default)]
    data: DataLite,
}

#[derive(Deserialize, Default)]
struct DataLite {
    #[serde(default)]
    t: u64,
    /// A text delta's text: `t<ns> ` stamps (`--text-deltas`).
    #[serde(default)]
    text: Option<String>,
}

/// Read events until the socket ends; record latency, count gaps.
async fn read_events(
    mut ws: Ws,
    mut last: u64,
    idx: usize,
    counters: Arc<Counters>,
    hist: Arc<Shards>,
    until_seq: Option<u64>,
) -> u64 {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                if !t.starts_with("{\"type\":\"event\"") {
                    continue;
                }
                let Ok(e) = serde_json::from_str::<EventLite>(&t) else {
                    continue;
                };
                // A frame of joined deltas covers from_seq..=seq, one
                // delivery each.
                let from = e.from_seq.unwrap_or(e.seq);
                if from != last + 1 {
                    counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                last = e.seq;
                counters
                    .received
                    .fetch_add(e.seq.saturating_sub(from) + 1, Ordering::Relaxed);
                if e.data.t > 0 {
                    hist.record(idx, now_ns().saturating_sub(e.data.t) / 1000);
                }
                if let Some(text) = &e.data.text {
                    let now = now_ns();
                    for t in crate::text::stamps(text) {
                        hist.record(idx, now.saturating_sub(t) / 1000);
                    }
                }
                if until_seq.is_some_and(|u| last >= u) {
                    break;
                }
            }
            Ok(Message::Close(_)) => {
                counters.closed_by_server.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    last
}

/// The source address for connection `i` of worker `w`: 127.0.0.x, with x
/// spread over 2..=251 (4,000 connections per address, a random offset per
/// run) so runs in a row do not exhaust one address's ephemeral ports while
/// earlier ones sit in TIME_WAIT.
fn source_ip(w: usize, i: usize) -> IpAddr {
    static SALT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let salt = *SALT.get_or_init(|| rand::random::<u8>() as usize);
    let x = 2 + (salt + w * 40 + i / 4000) % 250;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, x as u8))
}

/// Open `ids` connections with bounded concurrency; each then runs `on_open`.
async fn open_many<F, Fut>(
    args: &BenchArgs,
    ids: std::ops::Range<usize>,
    worker: usize,
    counters: Arc<Counters>,
    bar: Option<ProgressBar>,
    on_open: F,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>>
where
    F: Fn(usize, Ws, serde_json::Value) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = server_addr(&args.url)?;
    let url = match args.target {
        Target::Herald => ws_url(&args.url),
        Target::Sockudo => pusher::ws_url(&args.url, &args.api_key),
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut opening = Vec::new();
    for i in ids {
        let permit = sem.clone().acquire_owned().await?;
        let group = i / args.per_user.max(1);
        if args.target == Target::Sockudo {
            let (url, counters, on_open, bar) =
                (url.clone(), counters.clone(), on_open.clone(), bar.clone());
            opening.push(tokio::spawn(async move {
                let channel = pusher::channel_of(group);
                let opened = pusher::open_client(addr, &url, source_ip(worker, i), &channel).await;
                drop(permit);
                match opened {
                    Ok(ws) => {
                        counters.opened.fetch_add(1, Ordering::Relaxed);
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                        on_open(i, ws, json!({"seq": 0})).await;
                    }
                    Err(e) => {
                        if counters.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("connection {i} failed: {e}");
                        }
                    }
                }
            }));
            continue;
        }
        let (user, thread) = if args.thread {
            (format!("bench-m{i}"), Some(thread_of(group)))
        } else {
            (format!("bench-u{group}"), None)
        };
        let tok = token_with(
            &args.secret,
            &user,
            thread.as_ref().map(|_| "thread:bench-*"),
        )?;
        let (url, counters, on_open, bar) =
            (url.clone(), counters.clone(), on_open.clone(), bar.clone());
        opening.push(tokio::spawn(async move {
            let mut opened = open_client(addr, &url, source_ip(worker, i), &tok, None).await;
            if let (Ok((ws, _)), Some(stream)) = (opened.as_mut(), thread)
                && let Err(e) = subscribe(ws, &stream).await
            {
                opened = Err(e);
            }
            drop(permit);
            match opened {
                Ok((ws, welcome)) => {
                    counters.opened.fetch_add(1, Ordering::Relaxed);
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                    on_open(i, ws, welcome).await;
                }
                Err(e) => {
                    if counters.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connection {i} failed: {e}");
                    }
                }
            }
        }));
    }
    Ok(opening)
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(msg.to_owned());
    b
}

// ---------------------------------------------------------------- workers --

/// Worker processes: open a share of the connections, say `ready`, read
/// events until `stop` arrives on stdin, then print a report line.
async fn worker(args: BenchArgs) -> anyhow::Result<()> {
    let w = args.worker.unwrap_or(0);
    let (start, end) = share(args.connections, args.procs, w);
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(Shards::new());
    let tasks = {
        let (c, h) = (counters.clone(), hist.clone());
        let target = args.target;
        open_many(
            &args,
            start..end,
            w,
            counters.clone(),
            None,
            move |i, ws, welcome| read_fleet(target, ws, welcome, i, c.clone(), h.clone()),
        )
        .await?
    };
    // Wait until every connection opened (or failed).
    while counters.opened.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed)
        < end - start
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "stop" {
            break;
        }
    }
    let report = WorkerReport {
        opened: counters.opened.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        gaps: counters.gaps.load(Ordering::Relaxed),
        closed_by_server: counters.closed_by_server.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        latency: serialize_hist(&hist.merged())?,
    };
    out.write_all(format!("{}\n", serde_json::to_string(&report)?).as_bytes())
        .await?;
    out.flush().await?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// A fleet connection's reader: Herald events from the welcome's position,
/// or Pusher events (`pusher::read_events`).
async fn read_fleet(
    target: Target,
    ws: Ws,
    welcome: serde_json::Value,
    i: usize,
    counters: Arc<Counters>,
    hist: Arc<Shards>,
) {
    match target {
        Target::Herald => {
            let last = welcome["seq"].as_u64().unwrap_or(0);
            read_events(ws, last, i, counters, hist, None).await;
        }
        Target::Sockudo => pusher::read_events(ws, i, counters, hist).await,
    }
}

fn share(total: usize, procs: usize, w: usize) -> (usize, usize) {
    let procs = procs.max(1);
    (total * w / procs, total * (w + 1) / procs)
}

fn serialize_hist(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

fn deserialize_hist(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Connections held in this process: counters, latencies, reader tasks.
type LocalFleet = (Arc<Counters>, Arc<Shards>, Vec<tokio::task::JoinHandle<()>>);

/// A worker process: the child, its stdin, its stdout lines.
type WorkerProc = (
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
);

/// Connections held by worker processes (or in-process when `procs` is 1).
struct Fleet {
    children: Vec<WorkerProc>,
    local: Option<LocalFleet>,
}

impl Fleet {
    async fn start(args: &BenchArgs) -> anyhow::Result<Fleet> {
        if args.procs <= 1 {
            let counters = Arc::new(Counters::default());
            let hist = Arc::new(Shards::new());
            let b = bar(args.connections as u64, "connecting");
            let (c, h) = (counters.clone(), hist.clone());
            let target = args.target;
            let tasks = open_many(
                args,
                0..args.connections,
                0,
                counters.clone(),
                Some(b.clone()),
                move |i, ws, welcome| read_fleet(target, ws, welcome, i, c.clone(), h.clone()),
            )
            .await?;
            while counters.opened.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed)
                < args.connections
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            b.finish_and_clear();
            return Ok(Fleet {
                children: Vec::new(),
                local: Some((counters, hist, tasks)),
            });
        }
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for w in 0..args.procs {
            let mut a = args.clone();
            a.worker = Some(w);
            let mut child = tokio::process::Command::new(&exe)
                .args(worker_argv(&a))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            children.push((child, stdin, BufReader::new(stdout).lines()));
        }
        eprintln!(
            "waiting for {} workers to open {} connections…",
            args.procs, args.connections
        );
        for (_, _, lines) in &mut children {
            match lines.next_line().await? {
                Some(l) if l == "ready" => {}
                other => bail!("worker failed to start: {other:?}"),
            }
        }
        Ok(Fleet {
            children,
            local: None,
        })
    }

    fn received(&self) -> Option<u64> {
        self.local
            .as_ref()
            .map(|(c, _, _)| c.received.load(Ordering::Relaxed))
    }

    async fn stop(mut self) -> anyhow::Result<(WorkerReport, Histogram<u64>)> {
        let mut total = WorkerReport::default();
        let mut hist = new_hist();
        if let Some((c, h, tasks)) = self.local.take() {
            for t in tasks {
                t.abort();
            }
            total.opened = c.opened.load(Ordering::Relaxed);
            total.failed = c.failed.load(Ordering::Relaxed);
            total.received = c.received.load(Ordering::Relaxed);
            total.gaps = c.gaps.load(Ordering::Relaxed);
            total.closed_by_server = c.closed_by_server.load(Ordering::Relaxed);
            total.bytes = c.bytes.load(Ordering::Relaxed);
            let _ = hist.add(h.merged());
        }
        for (mut child, mut stdin, mut lines) in self.children {
            stdin.write_all(b"stop\n").await?;
            stdin.flush().await?;
            let line = lines.next_line().await?.context("worker report")?;
            let r: WorkerReport = serde_json::from_str(&line)?;
            total.opened += r.opened;
            total.failed += r.failed;
            total.received += r.received;
            total.gaps += r.gaps;
            total.closed_by_server += r.closed_by_server;
            total.bytes += r.bytes;
            let _ = hist.add(&deserialize_hist(&r.latency)?);
            let _ = child.wait().await;
        }
        Ok((total, hist))
    }
}

fn worker_argv(a: &BenchArgs) -> Vec<String> {
    let s = |v: &dyn ToString| v.to_string();
    let scenario = match a.scenario {
        Scenario::Fanout => "fanout",
        Scenario::Connect => "connect",
        Scenario::Resume => "resume",
        Scenario::Idle => "idle",
        Scenario::Soak => "soak",
        Scenario::Text => "text",
        Scenario::Ai => "ai",
    };
    let mut argv = vec![
        scenario.to_owned(),
        "--url".into(),
        a.url.clone(),
        "--secret".into(),
        a.secret.clone(),
        "--api-key".into(),
        a.api_key.clone(),
        "--connections".into(),
        s(&a.connections),
        "--per-user".into(),
        s(&a.per_user),
        "--concurrency".into(),
        s(&(a.concurrency / a.procs.max(1)).max(1)),
        "--procs".into(),
        s(&a.procs),
        "--worker".into(),
        s(&a.worker.unwrap_or(0)),
        "--target".into(),
        match a.target {
            Target::Herald => "herald".into(),
            Target::Sockudo => "sockudo".into(),
        },
        "--app-id".into(),
        a.app_id.clone(),
    ];
    if a.thread {
        argv.push("--thread".into());
    }
    argv
}

// -------------------------------------------------------------- scenarios --

async fn fanout(args: &BenchArgs) -> anyhow::Result<Summary> {
    let fleet = Fleet::start(args).await?;
    let users = args.connections.div_ceil(args.per_user.max(1));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;
    let endpoint = format!(
        "{}/api/v1/events",
        args.publish_url.as_deref().unwrap_or(&args.url)
    );
    let per_user = args.per_user.max(1);
    // Connections of user `u` (the last user may have fewer).
    let conns_of = |u: usize| per_user.min(args.connections.saturating_sub(u * per_user)) as u64;
    let cpu_start: Vec<u64> = args
        .server_pid
        .iter()
        .map(|p| cpu_ticks(*p))
        .collect::<anyhow::Result<_>>()?;
    let redis_start = args.redis_pid.map(cpu_ticks).transpose()?;
    let sockudo = args.target == Target::Sockudo;
    let publisher = pusher::Publisher::new(
        http.clone(),
        args.publish_url.as_deref().unwrap_or(&args.url),
        &args.app_id,
        &args.api_key,
        &args.secret,
    );
    // Pusher target: the generator numbers each channel's events.
    let mut seqs = vec![0u64; users];
    let wire_start = if sockudo {
        None
    } else {
        wire_out(&http, &args.url).await
    };
    let published = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let pad = "x".repeat(args.event_size);
    let ticks_per_sec = 50u64;
    let per_tick = (args.rate / ticks_per_sec).max(1) as usize;
    let total_ticks = args.duration * ticks_per_sec;
    let b = bar(total_ticks, "publishing");
    let mut interval = tokio::time::interval(Duration::from_millis(1000 / ticks_per_sec));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let inflight = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let mut next_user = 0usize;
    for _ in 0..total_ticks {
        interval.tick().await;
        let mut remaining = per_tick;
        while remaining > 0 {
            let n = remaining.min(args.batch_max.max(1));
            remaining -= n;
            let t = now_ns();
            let mut batch_expected = 0;
            if sockudo {
                let picks: Vec<(usize, u64)> = (0..n)
                    .map(|_| {
                        next_user = (next_user + 1) % users;
                        batch_expected += conns_of(next_user);
                        seqs[next_user] += 1;
                        (next_user, seqs[next_user])
                    })
                    .collect();
                let body = pusher::Publisher::batch_body(&picks, t, &pad);
                let permit = inflight.clone().acquire_owned().await?;
                let (publisher, published, expected, errors) = (
                    publisher.clone(),
                    published.clone(),
                    expected.clone(),
                    errors.clone(),
                );
                tokio::spawn(async move {
                    match publisher.post_batch(body).await {
                        Ok(()) => {
                            expected.fetch_add(batch_expected, Ordering::Relaxed);
                            published.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("publish failed: {e:#}");
                            }
                        }
                    }
                    drop(permit);
                });
                continue;
            }
            let events: Vec<_> = (0..n)
                .map(|_| {
                    next_user = (next_user + 1) % users;
                    batch_expected += conns_of(next_user);
                    let mut e = if args.text_deltas {
                        json!({"event": "agent_text_delta", "run_id": "answer",
                            "data": {"part": "answer", "text": crate::text::stamped(t, &pad)}})
                    } else if args.in_run {
                        json!({"event": "bench", "run_id": "answer", "data": {"t": t, "pad": pad}})
                    } else {
                        json!({"event": "bench", "data": {"t": t, "pad": pad}})
                    };
                    if args.thread {
                        e["stream"] = json!(thread_of(next_user));
                    } else {
                        e["user_id"] = json!(format!("bench-u{next_user}"));
                    }
                    e
                })
                .collect();
            let body = json!({ "events": events });
            let permit = inflight.clone().acquire_owned().await?;
            let (http, endpoint, key, published, delivered, expected, errors) = (
                http.clone(),
                endpoint.clone(),
                args.api_key.clone(),
                published.clone(),
                delivered.clone(),
                expected.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let r = http
                    .post(&endpoint)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await;
                let parsed = match r {
                    Ok(r) => r
                        .json::<serde_json::Value>()
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match parsed.as_ref().map(|v| v["results"].as_array()) {
                    Ok(Some(results)) => {
                        expected.fetch_add(batch_expected, Ordering::Relaxed);
                        published.fetch_add(results.len() as u64, Ordering::Relaxed);
                        let d: u64 = results.iter().filter_map(|r| r["delivered"].as_u64()).sum();
                        delivered.fetch_add(d, Ordering::Relaxed);
                    }
                    _ => {
                        // The whole answer (an error body has no `results`).
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("publish failed: {parsed:?}");
                        }
                    }
                }
                drop(permit);
            });
        }
        b.inc(1);
        if let Some(rx) = fleet.received() {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            b.set_message(format!("{:.0} dlv/s", rx as f64 / secs));
        }
    }
    let _ = inflight.acquire_many(64).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let cpu_ticks_used: u64 = args
        .server_pid
        .iter()
        .zip(&cpu_start)
        .map(|(p, t0)| cpu_ticks(*p).map(|t| t.saturating_sub(*t0)))
        .sum::<anyhow::Result<u64>>()?;
    let redis_ticks = match (args.redis_pid, redis_start) {
        (Some(p), Some(t0)) => Some(cpu_ticks(p)?.saturating_sub(t0)),
        _ => None,
    };
    b.finish_and_clear();
    // Let the last deliveries land.
    let target = expected.load(Ordering::Relaxed);
    let wait_until = Instant::now() + Duration::from_secs(10);
    while fleet.received().is_some_and(|r| r < target) && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if fleet.received().is_none() {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let wire_end = if sockudo {
        None
    } else {
        wire_out(&http, &args.url).await
    };
    let (report, hist) = fleet.stop().await?;
    let elapsed = publish_secs;
    let published = published.load(Ordering::Relaxed);
    // The mean frame the server wrote (welcomes included, a rounding error).
    let frame_bytes = match (wire_start, wire_end) {
        (Some((f0, b0)), Some((f1, b1))) if f1 > f0 => Some((b1 - b0) / (f1 - f0)),
        // The Pusher target: the mean event frame as the clients received it.
        _ if sockudo && report.received > 0 => Some(report.bytes as f64 / report.received as f64),
        _ => None,
    };
    let figures = vec![
        (
            "target".into(),
            match args.target {
                Target::Herald => "herald (POST /api/v1/events)".to_owned(),
                Target::Sockudo => format!("sockudo (Pusher protocol 7, app {})", args.app_id),
            },
        ),
        (
            "publish requests".into(),
            format!(
                "{} per 20-ms tick, at most {} events each ({per_tick} events per tick)",
                per_tick.div_ceil(args.batch_max.max(1)),
                args.batch_max.max(1),
            ),
        ),
        (
            "users × connections each".into(),
            format!("{users} × {}", args.per_user),
        ),
        (
            "event size (data padding)".into(),
            format!(
                "{} B{}",
                args.event_size,
                if args.text_deltas {
                    " (agent_text_delta: the text's)"
                } else if args.in_run {
                    " (each event in run `answer`)"
                } else {
                    ""
                }
            ),
        ),
        (
            "events published".into(),
            format!("{published} ({:.0}/s)", published as f64 / elapsed),
        ),
        (
            "deliveries queued (as the API reports)".into(),
            if sockudo {
                "n/a (the Pusher API does not report it)".into()
            } else {
                delivered.load(Ordering::Relaxed).to_string()
            },
        ),
        ("deliveries expected".into(), target.to_string()),
        (
            "deliveries received".into(),
            format!(
                "{} ({:.0}/s)",
                report.received,
                report.received as f64 / elapsed
            ),
        ),
        (
            "lost (expected − received)".into(),
            target.saturating_sub(report.received).to_string(),
        ),
        ("seq gaps".into(), report.gaps.to_string()),
        (
            "closed by server".into(),
            report.closed_by_server.to_string(),
        ),
        (
            "publish requests failed".into(),
            errors.load(Ordering::Relaxed).to_string(),
        ),
    ];
    let mut figures = figures;
    if !args.server_pid.is_empty() {
        let cpu_secs = cpu_ticks_used as f64 / 100.0; // USER_HZ
        figures.push((
            "server CPU over the publish phase".into(),
            format!(
                "{cpu_secs:.2} s ({:.0} % of one core)",
                100.0 * cpu_secs / elapsed
            ),
        ));
        figures.push((
            "server CPU per delivery".into(),
            format!("{:.2} µs", cpu_secs * 1e6 / report.received.max(1) as f64),
        ));
    }
    if let Some(bytes) = frame_bytes {
        let what = if sockudo {
            "mean event frame (payload, as received)"
        } else {
            "mean frame written"
        };
        figures.push((what.into(), format!("{bytes:.0} B")));
    }
    // Fewer frames than deliveries: text deltas joined in a socket's queue
    // (one frame covering from_seq..=seq).
    if let (Some((f0, _)), Some((f1, _))) = (wire_start, wire_end)
        && report.received > 0
    {
        figures.push((
            "frames written per delivery received".into(),
            format!("{:.3}", (f1 - f0) / report.received as f64),
        ));
    }
    if let Some(path) = &args.floor {
        // The payload plus a 2–4 byte header, as the server writes it.
        let size = frame_bytes.map_or(300, |b| b as u64 + 4);
        let rate = (report.received as f64 / elapsed) as u64;
        let floor = run_floor(path, args.connections, report.received, size, rate)?;
        figures.push((
            "kernel floor per delivery (floor.c, same N, rate, size)".into(),
            format!("{floor:.2} µs"),
        ));
        if !args.server_pid.is_empty() {
            let cpu_us = cpu_ticks_used as f64 / 100.0 * 1e6 / report.received.max(1) as f64;
            figures.push((
                "server CPU per delivery ÷ floor".into(),
                format!("{:.2}×", cpu_us / floor),
            ));
        }
    }
    if let Some(ticks) = redis_ticks {
        let secs = ticks as f64 / 100.0;
        figures.push((
            "Redis CPU per 1,000 publishes".into(),
            format!("{:.1} ms", secs * 1e3 * 1000.0 / published.max(1) as f64),
        ));
    }
    finish(args, report, hist, figures)
}

async fn connect_scenario(args: &BenchArgs) -> anyhow::Result<Summary> {
    let addr = server_addr(&args.url)?;
    let url = ws_url(&args.url);
    let hist = Arc::new(Shards::new());
    let counters = Arc::new(Counters::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let b = bar(args.connections as u64, "connecting");
    let keep = Arc::new(Mutex::new(Vec::with_capacity(args.connections)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let permit = sem.clone().acquire_owned().await?;
        let tok = token(&args.secret, &format!("bench-c{i}"))?;
        let (url, hist, counters, keep, b) = (
            url.clone(),
            hist.clone(),
            counters.clone(),
            keep.clone(),
            b.clone(),
        );
        let source = source_ip(0, i);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            match open_client(addr, &url, source, &tok, None).await {
                Ok((ws, _)) => {
                    hist.record(i, t0.elapsed().as_micros() as u64);
                    counters.opened.fetch_add(1, Ordering::Relaxed);
                    keep.lock().push(ws);
                }
                Err(e) => {
                    if counters.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connect {i} failed: {e}");
                    }
                }
            }
            b.inc(1);
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    b.finish_and_clear();
    let opened = counters.opened.load(Ordering::Relaxed);
    drop(keep);
    let report = WorkerReport {
        opened,
        failed: counters.failed.load(Ordering::Relaxed),
        ..WorkerReport::default()
    };
    let figures = vec![
        ("connect + hello".into(), format!("{opened} in {secs:.2} s")),
        ("rate".into(), format!("{:.0} /s", opened as f64 / secs)),
        ("concurrency".into(), args.concurrency.to_string()),
    ];
    finish(args, report, hist.merged(), figures)
}

async fn resume(args: &BenchArgs) -> anyhow::Result<Summary> {
    let addr = server_addr(&args.url)?;
    let url = ws_url(&args.url);
    let n = args.connections;
    // 1. Connect everyone (one user each) and note the stream positions.
    let positions = Arc::new(Mutex::new(vec![(String::new(), 0u64); n]));
    let counters = Arc::new(Counters::default());
    let b = bar(n as u64, "connecting");
    let held = Arc::new(Mutex::new(Vec::new()));
    let (p, h) = (positions.clone(), held.clone());
    let mut one_user = args.clone();
    one_user.per_user = 1;
    let tasks = open_many(
        &one_user,
        0..n,
        0,
        counters.clone(),
        Some(b.clone()),
        move |i, ws, welcome| {
            let (p, h) = (p.clone(), h.clone());
            async move {
                p.lock()[i] = (
                    welcome["epoch"].as_str().unwrap_or_default().to_owned(),
                    welcome["seq"].as_u64().unwrap_or(0),
                );
                h.lock().push(ws);
            }
        },
    )
    .await?;
    for t in tasks {
        let _ = t.await;
    }
    b.finish_and_clear();
    // 2. Everyone drops (TCP, no close frame).
    held.lock().clear();
    // 3. Publish E events per user while they are away.
    let http = api_client()?;
    let pad = "x".repeat(args.event_size);
    let per_batch = (1000 / args.events.max(1)).max(1);
    let b = bar(n as u64, "publishing");
    for chunk in (0..n).collect::<Vec<_>>().chunks(per_batch) {
        let events: Vec<_> = chunk
            .iter()
            .flat_map(|u| (0..args.events).map(move |_| *u))
            .map(|u| json!({"user_id": format!("bench-u{u}"), "event": "bench", "data": {"pad": pad}}))
            .collect();
        let r = http
            .post(format!("{}/api/v1/events", args.url))
            .bearer_auth(&args.api_key)
            .json(&json!({ "events": events }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("publish failed: HTTP {}", r.status());
        }
        b.inc(chunk.len() as u64);
    }
    b.finish_and_clear();
    // 4. Everyone reconnects with resume; time until all caught up.
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(Shards::new());
    let caught_up = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let b = bar(n as u64, "catching up");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let tok = token(&args.secret, &format!("bench-u{i}"))?;
        let (epoch, seq) = positions.lock()[i].clone();
        let (url, counters, hist, caught_up, b) = (
            url.clone(),
            counters.clone(),
            hist.clone(),
            caught_up.clone(),
            b.clone(),
        );
        let target = seq + args.events as u64;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let opened = open_client(addr, &url, source_ip(1, i), &tok, Some((epoch, seq))).await;
            drop(permit);
            if let Ok((ws, welcome)) = opened {
                counters.opened.fetch_add(1, Ordering::Relaxed);
                if welcome["resumed"] != true {
                    counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                let last = read_events(
                    ws,
                    seq,
                    i,
                    counters.clone(),
                    Arc::new(Shards::new()),
                    Some(target),
                )
                .await;
                if last >= target {
                    hist.record(i, t0.elapsed().as_micros() as u64);
                    caught_up.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            b.inc(1);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    b.finish_and_clear();
    let replayed = counters.received.load(Ordering::Relaxed);
    let report = WorkerReport {
        opened: counters.opened.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        received: replayed,
        gaps: counters.gaps.load(Ordering::Relaxed),
        ..WorkerReport::default()
    };
    let figures = vec![
        (
            "clients × events missed".into(),
            format!("{n} × {}", args.events),
        ),
        ("all caught up in".into(), format!("{secs:.2} s")),
        (
            "caught up".into(),
            format!("{} of {n}", caught_up.load(Ordering::Relaxed)),
        ),
        (
            "replayed events".into(),
            format!("{replayed} ({:.0}/s)", replayed as f64 / secs),
        ),
        ("gaps or resets".into(), report.gaps.to_string()),
    ];
    finish(args, report, hist.merged(), figures)
}

async fn idle(args: &BenchArgs) -> anyhow::Result<Summary> {
    let pid = *args
        .server_pid
        .first()
        .context("the idle scenario needs --server-pid to read /proc")?;
    let rss_before = rss_of(pid)?;
    let fleet = Fleet::start(args).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // let allocations settle
    let rss_after = rss_of(pid)?;
    let cpu0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let cpu_secs = (cpu_ticks(pid)? - cpu0) as f64 / 100.0; // USER_HZ
    let wall = t0.elapsed().as_secs_f64();
    let rss_end = rss_of(pid)?;
    let (report, hist) = fleet.stop().await?;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / report.opened.max(1) as f64;
    let per_conn_end = (rss_end.saturating_sub(rss_before)) as f64 / report.opened.max(1) as f64;
    let figures = vec![
        (
            "server RSS before".into(),
            format!("{:.1} MiB", rss_before as f64 / 1048576.0),
        ),
        (
            "server RSS with connections".into(),
            format!("{:.1} MiB", rss_after as f64 / 1048576.0),
        ),
        (
            "RSS per idle connection".into(),
            format!("{:.0} B ({:.2} KiB)", per_conn, per_conn / 1024.0),
        ),
        (
            format!("RSS per idle connection after {} s", args.duration),
            format!("{:.0} B ({:.2} KiB)", per_conn_end, per_conn_end / 1024.0),
        ),
        (
            "server CPU while idle".into(),
            format!(
                "{:.2} % of one core over {wall:.0} s",
                100.0 * cpu_secs / wall
            ),
        ),
    ];
    finish(args, report, hist, figures)
}

/// The server's Prometheus page (`GET {base}/metrics`).
pub(crate) async fn metrics_page(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    Ok(http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// Frames and bytes the server has written so far (from its /metrics).
async fn wire_out(http: &reqwest::Client, base: &str) -> Option<(f64, f64)> {
    let page = metrics_page(http, base).await.ok()?;
    Some((
        metric_in(&page, "herald_frames_out_total")?,
        metric_in(&page, "herald_bytes_out_total")?,
    ))
}

/// Run the kernel-floor program (`floor N D S R`) and return its CPU µs
/// per delivery.
fn run_floor(
    path: &std::path::Path,
    n: usize,
    d: u64,
    size: u64,
    rate: u64,
) -> anyhow::Result<f64> {
    let out = std::process::Command::new(path)
        .args([
            n.to_string(),
            d.max(1).to_string(),
            size.to_string(),
            rate.max(1).to_string(),
        ])
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("floor printed {line:?}"))?;
    v["us_per_delivery"]
        .as_f64()
        .context("floor output has no us_per_delivery")
}

/// The value of metric `name` (no labels) in a Prometheus text page.
pub(crate) fn metric_in(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

pub(crate) fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok(utime + stime)
}

// ---------------------------------------------------------------- output --

fn finish(
    args: &BenchArgs,
    report: WorkerReport,
    hist: Histogram<u64>,
    figures: Vec<(String, String)>,
) -> anyhow::Result<Summary> {
    if let Some(path) = &args.plot
        && !hist.is_empty()
    {
        std::fs::write(
            path,
            plot_svg(&hist, &format!("herald-bench {:?}", args.scenario)),
        )?;
        eprintln!("latency plot written to {}", path.display());
    }
    Ok(Summary {
        scenario: args.scenario,
        connections: report.opened,
        failed_connections: report.failed,
        figures,
        latency_us: Percentiles::of(&hist),
    })
}

fn print_table(s: &Summary) {
    let mut rows: Vec<(String, String)> = vec![
        (
            "scenario".into(),
            format!("{:?}", s.scenario).to_lowercase(),
        ),
        (
            "connections".into(),
            format!("{} ({} failed)", s.connections, s.failed_connections),
        ),
    ];
    rows.extend(s.figures.iter().cloned());
    if let Some(p) = &s.latency_us {
        let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
        rows.push(("latency samples".into(), p.count.to_string()));
        rows.push((
            "latency p50 / p90".into(),
            format!("{} / {}", ms(p.p50), ms(p.p90)),
        ));
        rows.push((
            "latency p99 / p99.9".into(),
            format!("{} / {}", ms(p.p99), ms(p.p999)),
        ));
        rows.push(("latency max".into(), ms(p.max)));
    }
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let line = "-".repeat(w + 40);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    let _ = writeln!(out, "{line}");
}

/// A latency-by-percentile plot (log-scaled percentile axis), as SVG.
fn plot_svg(h: &Histogram<u64>, title: &str) -> String {
    let (w, ht, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 20.0);
    let plot_w = w - left - right;
    let plot_h = ht - top - bottom;
    // x: 0 → p0, 1 → p90, 2 → p99, 3 → p99.9, 4 → p99.99
    let x_of = |q: f64| (-(1.0 - q).max(1e-4).log10()).min(4.0) / 4.0 * plot_w + left;
    let max_ms = (h.max() as f64 / 1000.0).max(0.001);
    let y_of = |ms: f64| top + plot_h - (ms / max_ms) * plot_h;
    let mut pts = String::new();
    for i in 0..=400 {
        let x = i as f64 / 100.0; // 0..4
        let q = 1.0 - 10f64.powf(-x);
        let ms = h.value_at_quantile(q.min(1.0)) as f64 / 1000.0;
        pts.push_str(&format!("{:.1},{:.1} ", x_of(q), y_of(ms)));
    }
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{ht}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{left}' y='22' font-size='15' font-weight='bold'>{title}: latency by percentile ({} samples)</text>",
        h.len()
    );
    for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99"].iter().enumerate() {
        let x = left + plot_w * i as f64 / 4.0;
        svg.push_str(&format!("<line x1='{x}' y1='{top}' x2='{x}' y2='{}' stroke='#ddd'/><text x='{x}' y='{}' text-anchor='middle'>{label}</text>", top + plot_h, top + plot_h + 18.0));
    }
    for i in 0..=4 {
        let ms = max_ms * i as f64 / 4.0;
        let y = y_of(ms);
        svg.push_str(&format!("<line x1='{left}' y1='{y:.1}' x2='{}' y2='{y:.1}' stroke='#eee'/><text x='{}' y='{:.1}' text-anchor='end'>{ms:.2} ms</text>", left + plot_w, left - 6.0, y + 4.0));
    }
    svg.push_str(&format!(
        "<polyline fill='none' stroke='#3b5bdb' stroke-width='2' points='{pts}'/>"
    ));
    svg.push_str(&format!(
        "<text x='{}' y='{}' text-anchor='middle'>percentile</text></svg>",
        left + plot_w / 2.0,
        ht - 8.0
    ));
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        let parts: Vec<_> = (0..3).map(|w| share(10, 3, w)).collect();
        assert_eq!(parts, vec![(0, 3), (3, 6), (6, 10)]);
    }

    #[test]
    fn histograms_survive_serialization() {
        let mut h = new_hist();
        for v in [10, 200, 3000] {
            h.record(v).unwrap();
        }
        let back = deserialize_hist(&serialize_hist(&h).unwrap()).unwrap();
        assert_eq!((back.len(), back.max()), (3, h.max()));
        assert!(plot_svg(&back, "t").starts_with("<svg"));
    }
}
