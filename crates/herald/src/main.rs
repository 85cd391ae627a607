//! The `herald` binary: `serve`, `token` and `probe`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// mimalloc instead of glibc malloc: with thousands of connections glibc's
/// arena consolidation (`_int_malloc`/`unlink_chunk`) was ~20 % of server CPU
/// in `perf` profiles of `herald bench fanout` (docs/BENCHMARKS.md).
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With `--features dhat-heap`: every allocation goes through dhat, which
/// writes a heap profile (`dhat-heap.json`) when the process exits.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static GLOBAL: dhat::Alloc = dhat::Alloc;
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};
use herald::config::{Config, JwtKey, KEYS, RawConfig, env_name, flag_name};
use herald::{Server, auth, telemetry};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "A WebSocket gateway for AI-agent chat products"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (zero configuration works: development keys are generated).
    Serve(ConfigArgs),
    /// Print a client JWT signed with the configured HS256 secret.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Exit 0 if a Herald answers 200 at URL (a container's health check:
    /// the image has no curl), else print why and exit 1.
    Probe {
        /// What to ask (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// How long the whole check may take.
        #[arg(long, default_value = "2s")]
        timeout: humantime::Duration,
    },
}

/// `--config FILE` plus one flag per configuration key.
struct ConfigArgs {
    file: Option<PathBuf>,
    flags: BTreeMap<&'static str, String>,
}

impl FromArgMatches for ConfigArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = BTreeMap::new();
        for k in KEYS {
            if let Some(v) = m.get_one::<String>(k.name) {
                flags.insert(k.name, v.clone());
            }
        }
        Ok(Self {
            file: m.get_one::<PathBuf>("config").cloned(),
            flags,
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ConfigArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration file"),
        );
        KEYS.iter().fold(cmd, |cmd, k| {
            cmd.arg(
                Arg::new(k.name)
                    .long(flag_name(k.name))
                    .value_name("VALUE")
                    .help(format!("{} [env: {}]", k.doc, env_name(k.name))),
            )
        })
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let raw = RawConfig::load(self.file.as_deref(), std::env::vars(), &self.flags)?;
        Ok(Config::from_raw(&raw)?)
    }
}

fn main() -> anyhow::Result<()> {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    #[cfg(feature = "dhat-heap")]
    sample_heap();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => {
            let config = args.load()?;
            telemetry::init_logging(config.log_format);
            runtime()?.block_on(serve(config))
        }
        Cmd::Token { user, ttl, config } => {
            let raw = RawConfig::load(config.file.as_deref(), std::env::vars(), &config.flags)?;
            let secret = &herald::config::token_secret(&raw)?;
            println!("{}", auth::mint_hs256(secret, &user, Duration::from(ttl))?);
            Ok(())
        }
        Cmd::Probe { url, timeout } => match probe(&url, Duration::from(timeout)) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("herald probe {url}: {e:#}");
                std::process::exit(1);
            }
        },
    }
}

/// GET `url` (plain `http://host:port/path`) and require a 200 within `timeout`.
fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs can be probed")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("no address for {host}"))?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    write!(
        sock,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = sock.read(&mut head)?;
    let status = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .unwrap_or("none");
    anyhow::ensure!(status == "200", "answered {status}");
    Ok(())
}

/// With `--features dhat-heap`: the live heap as the gauge `herald_heap_bytes`,
/// read from dhat every second (the soak samples it beside RSS).
#[cfg(feature = "dhat-heap")]
fn sample_heap() {
    std::thread::spawn(|| {
        loop {
            let live = dhat::HeapStats::get().curr_bytes;
            metrics::gauge!("herald_heap_bytes").set(live as f64);
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    if config.dev_mode
        && let JwtKey::Hs256(secret) = &config.jwt_key
    {
        let demo = auth::mint_hs256(secret, "demo", Duration::from_secs(24 * 3600))?;
        tracing::warn!(
            "DEVELOPMENT MODE: nothing configured; a JWT secret and an API key were generated for this run only, and POST /dev/token mints tokens for loopback clients"
        );
        eprintln!(
            "\n  HERALD_JWT_HS256_SECRET={secret}\n  HERALD_API_KEY={}\n  a token for user `demo` (24h): {demo}\n",
            config.api_key
        );
    }
    if config.echo_endpoint {
        tracing::warn!(
            "TEST ONLY: echo_endpoint is on; GET /echo echoes any WebSocket message with no authentication"
        );
    }
    let server = Server::start(config).await?;
    eprintln!("herald listening on {}", server.local_addr());
    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
