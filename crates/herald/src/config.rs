//! Configuration: defaults, then a TOML file, then `HERALD_*` environment
//! variables, then command-line flags — each layer overriding the one before.
//!
//! Every knob is one row of [`KEYS`]: its TOML key, its environment variable
//! (`HERALD_` + the key in upper case), its flag (`--` + the key with dashes)
//! and its default. Values of every layer are parsed by the same code, so an
//! invalid value fails at start with a message naming the key and the layer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_core::LifecycleConfig;
use herald_core::protocol::Limits;
use herald_core::ratelimit::RateLimit;
use herald_core::stream::StreamLimits;

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The URL to POST to.
    pub url: String,
    /// The HMAC secret.
    pub secret: String,
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// First backoff; doubles per retry (full jitter), capped at 5 s.
    pub backoff: Duration,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// TOML key (snake_case); the env var and flag are derived from it.
    pub name: &'static str,
    /// Default value as text; `None` means unset.
    pub default: Option<&'static str>,
    /// One-line meaning, shown in `--help` and docs/OPERATIONS.md.
    pub doc: &'static str,
}

/// Declares every configuration key once: a constant in [`key`] (used by
/// [`Config::from_raw`], so a misspelt key does not compile) and a row of
/// [`KEYS`] (env var, flag, default, doc).
macro_rules! declare_keys {
    ($($ident:ident = $name:literal, $default:expr, $doc:literal;)*) => {
        /// The name of every configuration key.
        pub mod key {
            $(#[doc = $doc] pub const $ident: &str = $name;)*
        }
        /// Every configuration key Herald reads.
        pub const KEYS: &[KeySpec] = &[$(KeySpec { name: $name, default: $default, doc: $doc }),*];
    };
}

declare_keys! {
    ADDR = "addr", None, "Listen address. Default 127.0.0.1:8080, or 0.0.0.0:$PORT when PORT is set";
    JWT_HS256_SECRET = "jwt_hs256_secret", None, "HS256 secret for client tokens, at least 32 bytes. Required (or jwt_public_key_file) unless nothing is configured (development mode)";
    JWT_PUBLIC_KEY_FILE = "jwt_public_key_file", None, "PEM public key (RSA or EC P-256) for RS256/ES256 client tokens";
    JWT_AUDIENCE = "jwt_audience", None, "Required `aud` claim, if set";
    JWT_ISSUER = "jwt_issuer", None, "Required `iss` claim, if set";
    JWT_LEEWAY = "jwt_leeway", Some("0s"), "Clock skew tolerated when checking `exp` and `nbf` (the connection expires at exp + leeway)";
    API_KEY = "api_key", None, "Bearer key of the HTTP API, at least 16 bytes. Required unless nothing is configured (development mode)";
    WEBHOOK_URL = "webhook_url", None, "Agent backend webhook for user messages and cancels. Unset: the built-in demo agent answers";
    WEBHOOK_SECRET = "webhook_secret", None, "HMAC-SHA256 key for the X-Herald-Signature header, at least 16 bytes (required with webhook_url)";
    WEBHOOK_TIMEOUT = "webhook_timeout", Some("5s"), "Timeout of one webhook attempt";
    WEBHOOK_RETRIES = "webhook_retries", Some("3"), "Webhook retries after the first attempt (on 5xx, 429, timeouts, connection errors)";
    WEBHOOK_MAX_IN_FLIGHT = "webhook_max_in_flight", Some("1024"), "Agent backend requests in flight on this node; a user_message beyond it gets nack backend_busy at once";
    WEBHOOK_MAX_IN_FLIGHT_PER_USER = "webhook_max_in_flight_per_user", Some("8"), "Agent backend requests in flight per user on this node; beyond it, nack backend_busy";
    MESSAGE_DEDUPE_WINDOW = "message_dedupe_window", Some("10m"), "A repeated user_message id within this window is acked again but forwarded once";
    MESSAGE_CLAIM_LEASE = "message_claim_lease", Some("10s"), "On Redis, how long a node's claim to forward a user_message lasts unless renewed (it is renewed every third of it while the forward runs): a node that dies mid-forward frees the message for a retry on another node within this time";
    INBOUND_RATE = "inbound_rate", Some("10"), "Inbound frames per second per connection (token bucket refill)";
    INBOUND_BURST = "inbound_burst", Some("20"), "Inbound burst per connection; frames over the bucket get error rate_limited, sustained abuse close 1008";
    HELLO_TIMEOUT = "hello_timeout", Some("10s"), "Time allowed from upgrade to a valid hello (else close 4408)";
    CLOSE_TIMEOUT = "close_timeout", Some("2s"), "Time allowed to flush, write the close frame and await the reply";
    HTTP_HEADER_TIMEOUT = "http_header_timeout", Some("10s"), "Time allowed for an HTTP request's complete head, from the accept or, on a keep-alive connection, from the previous response (so also the idle bound between requests); else the connection is closed";
    INGEST_RATE = "ingest_rate", Some("2000"), "Text ingest: deltas appended per second per request after the burst (a faster producer is slowed by not reading, never refused); deltas skipped as duplicates do not count";
    INGEST_BURST = "ingest_burst", Some("2000"), "Text ingest: deltas a request may append at once before ingest_rate applies";
    INGEST_IDLE_TIMEOUT = "ingest_idle_timeout", Some("60s"), "Text ingest: a request that brings no delta line for this long (blank lines do not count) is answered 408 stream_idle";
    HTTP_BODY_TIMEOUT = "http_body_timeout", Some("10s"), "Time allowed for a whole request body of the API (publish, disconnect), from when it is read (after the API key is checked); else 408 body_timeout. The text ingest streams and has its own idle bound";
    MAX_HTTP_CONNECTIONS = "max_http_connections", Some("1024"), "HTTP connections (before any WebSocket upgrade) served at once; a connection beyond it gets 503 overloaded (after its request head, or at once while 64 refusals are already being closed) and is closed, so a flood cannot exhaust file descriptors. Keep it well under the process's open-file limit";
    WRITE_TIMEOUT = "write_timeout", Some("10s"), "A socket that takes no byte of a pending write for this long is dropped";
    HEARTBEAT_INTERVAL = "heartbeat_interval", Some("25s"), "Interval of WebSocket pings (advertised as heartbeat_ms)";
    HEARTBEAT_TIMEOUT = "heartbeat_timeout", Some("60s"), "Inbound silence after which a connection closes (heartbeat timeout, 1001)";
    QUEUE_MAX_FRAMES = "queue_max_frames", Some("1024"), "Outbound queue bound in frames per connection (else close 4001)";
    QUEUE_MAX_BYTES = "queue_max_bytes", Some("4194304"), "Outbound queue bound in bytes per connection (else close 4001)";
    COALESCE_TEXT = "coalesce_text", Some("true"), "Join a text delta into the unsent frame of the same part a connection has queued (one covered frame; nothing waits)";
    MAX_MESSAGE_BYTES = "max_message_bytes", Some("65536"), "Largest inbound WebSocket message (else close 1009)";
    AI_MAX_MESSAGE_BYTES = "ai_max_message_bytes", Some("1048576"), "Largest inbound message on the AI SDK endpoint GET /ai (a send carries the chat's UI messages); else close 1009";
    AI_REPLAY_WINDOW = "ai_replay_window", Some("30s"), "AI SDK endpoint: a resume of a chat whose response completed less than this long ago replays that response whole (a reload right after the answer); 0s: only active responses are resumed";
    AI_ABORT_GRACE = "ai_abort_grace", Some("1s"), "AI SDK endpoint: an abort of a resumed response stops the run only if the same socket does not resume that chat within this time (useChat aborts a resume it replaces)";
    MAX_CONNECTIONS = "max_connections", Some("100000"), "Live WebSocket connections in total; further upgrades get HTTP 503";
    MAX_PENDING_CONNECTIONS = "max_pending_connections", Some("4096"), "Connections upgraded but not yet welcomed (no valid hello yet); further upgrades get HTTP 503 pending";
    MAX_CONNECTIONS_PER_USER = "max_connections_per_user", Some("32"), "Live connections per user; a further hello is closed with 1013";
    MAX_STREAMS_PER_CONNECTION = "max_streams_per_connection", Some("16"), "Shared streams one connection may read besides its own; a further subscribe gets error too_many_streams";
    SUBSCRIBE_PROXY = "subscribe_proxy", Some("false"), "Ask the agent backend (a signed subscribe_request to webhook_url) about a subscribe the token does not grant; needs webhook_url";
    SUBSCRIBE_CACHE_TTL = "subscribe_cache_ttl", Some("60s"), "How long the backend's answer to a subscribe_request is reused for that user and stream (on this node; an unsubscribe through the API forgets it on every node)";
    PRESENCE_TTL = "presence_ttl", Some("30s"), "How long a node's presence entries live unless renewed (every third of it): a node that dies takes its members out of every stream's presence within this, plus a third of it for the leave notices";
    PRESENCE_MAX_LISTED = "presence_max_listed", Some("100"), "Most users a presence answer lists (all are counted: total_users, total_connections)";
    INBOUND_ABUSE_LIMIT = "inbound_abuse_limit", Some("50"), "Frames dropped by the rate limit within 10 s that close the connection with 1008";
    HISTORY_MAX_EVENTS = "history_max_events", Some("1000"), "Events kept per user stream for resume (events of open agent runs are kept beyond it)";
    HISTORY_MAX_AGE = "history_max_age", Some("1h"), "Oldest event kept for resume";
    HISTORY_MAX_BYTES = "history_max_bytes", Some("268435456"), "Memory for history in total (payload + ~288 B per event + ~640 B per user stream + idempotency keys); the oldest events are evicted first, from users over their fair share";
    RUN_MAX_BYTES = "run_max_bytes", Some("4194304"), "Payload bytes one open agent run may hold in history (its events are kept until it closes); a run outgrowing it, or a stream's open runs outgrowing 4x it together, is closed with agent_error {reason: run_too_large}";
    MAX_OPEN_RUNS = "max_open_runs", Some("100"), "Agent runs open at once per user stream (a replaying hello reads them all); a run beyond it closes the least recently active with agent_error {reason: too_many_runs}";
    RUN_TTL = "run_ttl", Some("10m"), "An agent run with no event for this long is closed with agent_error {reason: run_timeout}";
    IDEMPOTENCY_WINDOW = "idempotency_window", Some("10m"), "How long a publish idempotency_key is remembered (the 1,000 newest per user stream, on either broker)";
    MAX_CONNECTION_AGE = "max_connection_age", Some("0s"), "A /ws connection older than this (plus up to a fifth of it more, at random, so a fleet does not reconnect in one wave) gets closing {reason: rotate} and close 1012, and its client resumes on whichever node it reaches: under a proxy or platform that cuts connections at a fixed age (Cloud Run's request timeout, a load balancer's), set it below that. 0s: never";
    DRAIN_WINDOW = "drain_window", Some("5s"), "On SIGTERM, connections are closed (1012) staggered over this window";
    METRICS_TOKEN = "metrics_token", None, "Bearer token GET /metrics requires (at least 16 bytes), so a scrape, which costs O(connections), is not open to anyone who reaches the port. Unset: /metrics answers anyone";
    ADMIN_SECRET = "admin_secret", None, "Secret that signs in to the admin page (/admin), at least 16 bytes and distinct from api_key and the JWT secret. Unset: the page is off, except in development mode, where it signs in loopback visitors without a secret";
    LOG_FORMAT = "log_format", Some("text"), "`text` or `json`";
    REDIS_URL = "redis_url", None, "`redis://[user:password@]host:port[/db]` or `rediss://…` of a single Redis, or `redis+sentinel://[user:password@]host:port[,host:port…]/<master>[/db]` to follow the master Redis Sentinel names (the credentials and db are the master's): streams live there and every node shares them. Unset: the in-process memory broker";
    REDIS_CLUSTER_URLS = "redis_cluster_urls", None, "Comma-separated `redis://` URLs of Redis Cluster seed nodes (instead of `redis_url`): streams are spread over the cluster's masters";
    ECHO_ENDPOINT = "echo_endpoint", Some("false"), "Test only: mount GET /echo, a WebSocket echo (text and binary, 16 MiB messages, no hello or auth; at most 8 at once, each closed after 30 s without a message) through the same actor and writer as /ws, for the Autobahn conformance suite. Never in production";
    REDIS_PREFIX = "redis_prefix", Some("herald"), "Prefix of Herald's Redis keys and channels (no braces or spaces), so deployments can share a Redis";
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Built-in default.
    Default,
    /// The TOML file.
    File,
    /// A `HERALD_*` environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file names a key Herald does not know.
    #[error("config file {path}: unknown key `{key}`{}", did_you_mean(.suggestion))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The unknown key.
        key: String,
        /// The nearest valid key, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A `HERALD_*` environment variable that is not a configuration key.
    #[error("unknown environment variable `{var}`{}", did_you_mean(.suggestion))]
    UnknownEnv {
        /// The variable.
        var: String,
        /// The nearest valid variable, if one is close.
        suggestion: Option<String>,
    },
    /// A value does not parse.
    #[error("config key `{key}` (from {layer:?}): {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Which layer supplied the bad value.
        layer: Layer,
        /// What is wrong.
        message: String,
    },
    /// The JWT public key file is unusable.
    #[error("config key `jwt_public_key_file`: {0}")]
    PublicKey(String),
    /// A secret outside development mode is missing.
    #[error(
        "config key `{key}` is required: `{because}` is set, so this is not development mode \
         (which runs only with none of {PRODUCTION_KEYS:?} set). {GENERATE}"
    )]
    Missing {
        /// The missing key.
        key: &'static str,
        /// The configured key that rules development mode out.
        because: &'static str,
    },
    /// `herald token` without a configured HS256 secret.
    #[error(
        "`herald token` signs with jwt_hs256_secret: set HERALD_JWT_HS256_SECRET to the \
         server's (the one `herald serve` printed in development mode, or your own). {GENERATE}"
    )]
    NoTokenSecret,
}

/// How to make a strong secret, said wherever one is missing or weak.
const GENERATE: &str = "Generate one with `openssl rand -base64 32`.";

/// Keys that only a real deployment sets: with any of them, Herald does not
/// generate secrets or serve the development token route.
pub const PRODUCTION_KEYS: [&str; 7] = [
    key::JWT_HS256_SECRET,
    key::JWT_PUBLIC_KEY_FILE,
    key::API_KEY,
    key::WEBHOOK_URL,
    key::WEBHOOK_SECRET,
    key::REDIS_URL,
    key::REDIS_CLUSTER_URLS,
];

/// Shortest HS256 secret accepted: the hash's output size (RFC 7518 §3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Shortest API key or webhook secret accepted.
pub const MIN_KEY_BYTES: usize = 16;

fn at_least(min: usize) -> impl Fn(&str) -> Result<String, String> {
    move |v: &str| {
        if v.len() < min {
            Err(format!(
                "{} bytes is too short to be secret: at least {min} are required. {GENERATE}",
                v.len()
            ))
        } else {
            Ok(v.to_owned())
        }
    }
}

/// How the admin page (`/admin`) is entered.
#[derive(Clone)]
pub struct AdminConfig {
    /// Signs the page's session cookies; the sign-in secret when
    /// `needs_secret` (generated otherwise).
    pub secret: String,
    /// False in development mode without `admin_secret`: loopback visitors
    /// sign in without one, others are refused.
    pub needs_secret: bool,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("secret", &"<redacted>")
            .field("needs_secret", &self.needs_secret)
            .finish()
    }
}

/// The text ingest's bounds, per request.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// Deltas appended per second after the burst.
    pub per_second: u64,
    /// Deltas appended at once before the rate applies.
    pub burst: u64,
    /// Longest time without a delta line.
    pub idle_timeout: Duration,
}

/// Raw values per key with the layer each came from.
#[derive(Debug, Default, Clone)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Layer)>,
}

impl RawConfig {
    /// Defaults, overridden by the file (if any), then by `env`, then by `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &BTreeMap<&'static str, String>,
    ) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::default();
        for k in KEYS {
            if let Some(d) = k.default {
                raw.values.insert(k.name, (d.to_owned(), Layer::Default));
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Toml {
                        path: path.to_owned(),
                        message: e.message().to_owned(),
                    })?;
            for (key, value) in table {
                let spec =
                    KEYS.iter()
                        .find(|k| k.name == key)
                        .ok_or_else(|| ConfigError::UnknownKey {
                            path: path.to_owned(),
                            suggestion: nearest_key(&key),
                            key: key.clone(),
                        })?;
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    other => {
                        return Err(ConfigError::Invalid {
                            key: spec.name,
                            layer: Layer::File,
                            message: format!(
                                "expected a string or number, got {}",
                                other.type_str()
                            ),
                        });
                    }
                };
                raw.values.insert(spec.name, (text, Layer::File));
            }
        }
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for var in env.keys().filter(|v| v.starts_with(ENV_PREFIX)) {
            if NOT_CONFIG_ENV.contains(&var.as_str())
                || KEYS.iter().any(|k| env_name(k.name) == *var)
            {
                continue;
            }
            let key = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            return Err(ConfigError::UnknownEnv {
                var: var.clone(),
                suggestion: nearest_key(&key).map(env_name),
            });
        }
        for k in KEYS {
            if let Some(v) = env.get(&env_name(k.name)) {
                raw.values.insert(k.name, (v.clone(), Layer::Env));
            }
        }
        if !raw.values.contains_key(key::ADDR)
            && let Some(port) = env.get("PORT")
        {
            raw.values
                .insert(key::ADDR, (format!("0.0.0.0:{port}"), Layer::Env));
        }
        for (k, v) in flags {
            raw.values.insert(k, (v.clone(), Layer::Flag));
        }
        Ok(raw)
    }

    /// Set one key (used by tests and embedders); `key` must be in [`KEYS`].
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        if let Some(spec) = KEYS.iter().find(|k| k.name == key) {
            self.values.insert(spec.name, (value.into(), Layer::Flag));
        }
        self
    }

    fn get(&self, key: &'static str) -> Option<(&str, Layer)> {
        self.values.get(key).map(|(v, l)| (v.as_str(), *l))
    }

    fn parse<T>(
        &self,
        key: &'static str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((v, layer)) => f(v).map(Some).map_err(|message| ConfigError::Invalid {
                key,
                layer,
                message,
            }),
        }
    }

    fn required<T>(
        &self,
        key: &'static str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.parse(key, f)?.ok_or(ConfigError::Invalid {
            key,
            layer: Layer::Default,
            message: "missing".to_owned(),
        })
    }
}

/// Prefix of Herald's environment variables.
const ENV_PREFIX: &str = "HERALD_";

/// `HERALD_*` variables that are not configuration keys: the log filter, and
/// the variables Herald's test tools and example read.
pub const NOT_CONFIG_ENV: &[&str] = &["HERALD_LOG", "HERALD_BIN", "HERALD_URL"];

/// The environment variable of a key.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

fn did_you_mean<T: std::fmt::Display>(suggestion: &Option<T>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

/// The valid key nearest to `key` by edit distance, if it is close enough
/// to be a typo (at most a third of its length).
fn nearest_key(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (edit_distance(key, k.name), k.name))
        .min()
        .filter(|(d, _)| *d <= key.len().div_ceil(3).max(1))
        .map(|(_, name)| name)
}

/// Levenshtein distance (keys are short ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The command-line flag of a key (without the leading dashes).
pub fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

fn duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("`{v}` is not a duration like 10s or 500ms ({e})"))
}

fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{v}` is not true or false")),
    }
}

/// A duration of at least 100 ms (a period something is renewed at).
fn at_least_100ms(v: &str) -> Result<Duration, String> {
    let d = duration(v)?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{v}` is not a positive integer")),
    }
}

fn url(v: &str) -> Result<String, String> {
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(v.to_owned())
    } else {
        Err(format!("`{v}` is not an http:// or https:// URL"))
    }
}

fn redis_url(v: &str) -> Result<String, String> {
    if v.starts_with("redis://") || v.starts_with("rediss://") {
        Ok(v.to_owned())
    } else {
        Err("is not a redis:// or rediss:// URL".to_owned())
    }
}

/// `redis_url`: one Redis, or Sentinels and their master set.
fn redis_or_sentinel_url(v: &str) -> Result<String, String> {
    if v.starts_with(crate::broker::redis::SENTINEL_SCHEME) {
        crate::broker::redis::check_sentinel_url(v)?;
        Ok(v.to_owned())
    } else {
        redis_url(v).map_err(|_| {
            "is not a redis://, rediss:// or redis+sentinel://host:port[,…]/<master> URL".to_owned()
        })
    }
}

fn redis_prefix(v: &str) -> Result<String, String> {
    if v.is_empty() || v.contains(['{', '}']) || v.chars().any(char::is_whitespace) {
        Err(format!("`{v}` must be non-empty, without braces or spaces"))
    } else {
        Ok(v.to_owned())
    }
}

fn non_empty(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(v.to_owned())
    }
}

/// How client tokens are verified.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// HS256 with a shared secret.
    Hs256(String),
    /// RS256 or ES256 with a PEM public key (the algorithm follows the key type).
    PublicKeyPem(Vec<u8>),
}

pub use crate::telemetry::LogFormat;

/// Bounds on agent backend requests in flight on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightLimits {
    /// In total.
    pub total: usize,
    /// Per user.
    pub per_user: usize,
}

/// The AI SDK endpoint's (`GET /ai`) settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AiConfig {
    /// Largest inbound message.
    pub max_message_bytes: usize,
    /// How long an abort of a resumed response waits for the socket to
    /// resume the chat again before it stops the run.
    pub abort_grace: Duration,
    /// How long after its end a completed response is still replayed.
    pub replay_window: Duration,
}

/// The typed, validated configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub addr: SocketAddr,
    /// Client token verification key.
    pub jwt_key: JwtKey,
    /// Required `aud`, if any.
    pub jwt_audience: Option<String>,
    /// Required `iss`, if any.
    pub jwt_issuer: Option<String>,
    /// Tolerated clock skew for `exp`.
    pub jwt_leeway: Duration,
    /// API bearer key.
    pub api_key: String,
    /// The webhook backend, if configured (else the demo agent answers).
    pub webhook: Option<WebhookConfig>,
    /// How long user message ids are remembered for deduplication.
    pub message_dedupe_window: Duration,
    /// Lease of a node's claim to forward a message (renewed while it runs).
    pub message_claim_lease: Duration,
    /// Bounds on agent backend requests in flight.
    pub in_flight: InFlightLimits,
    /// Inbound rate limit per connection.
    pub rate_limit: RateLimit,
    /// True when neither a JWT key nor an API key was configured: both were
    /// generated for this run and development conveniences are on.
    pub dev_mode: bool,
    /// Lifecycle timeouts and queue bounds.
    pub lifecycle: LifecycleConfig,
    /// Inbound size limits.
    pub limits: Limits,
    /// The AI SDK endpoint's bounds.
    pub ai: AiConfig,
    /// Longest a socket write may block.
    pub write_timeout: Duration,
    /// Bound on an HTTP request head, and on keep-alive idleness.
    pub http_header_timeout: Duration,
    /// The text ingest's per-request bounds.
    pub ingest: IngestLimits,
    /// Bearer token `/metrics` requires, if set.
    pub metrics_token: Option<String>,
    /// The admin page, if it is on.
    pub admin: Option<AdminConfig>,
    /// Deadline for a whole non-streaming request body.
    pub http_body_timeout: Duration,
    /// HTTP connections (not yet upgraded) served at once.
    pub max_http_connections: usize,
    /// Total live connection limit.
    pub max_connections: usize,
    /// Per-user live connection limit.
    pub max_connections_per_user: usize,
    /// Shared streams one connection may read besides its own.
    pub max_streams_per_connection: usize,
    /// Ask the backend about subscribes the token does not grant.
    pub subscribe_proxy: bool,
    /// How long a backend's subscribe answer is reused.
    pub subscribe_cache_ttl: Duration,
    /// Lifetime of a node's presence entries unless renewed.
    pub presence_ttl: Duration,
    /// Most users a presence answer lists.
    pub presence_max_listed: usize,
    /// Limit on connections before their `hello` is accepted.
    pub max_pending_connections: usize,
    /// Drain window on shutdown.
    pub drain_window: Duration,
    /// Rotate `/ws` connections older than this (plus jitter); `None`: never.
    pub max_connection_age: Option<Duration>,
    /// Per-stream history retention.
    pub stream_limits: StreamLimits,
    /// Total history bytes.
    pub history_max_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// The Redis broker, if configured (else the memory broker).
    pub redis: Option<crate::broker::redis::RedisConfig>,
    /// Mount the test-only `GET /echo` (RFC 6455 conformance runs).
    pub echo_endpoint: bool,
    /// Echo connections open at once (beyond: HTTP 503); 8.
    pub echo_max_connections: usize,
    /// An echo connection with no message for this long is closed; 30 s.
    pub echo_idle_timeout: Duration,
}

impl Config {
    /// Validate raw values into a config. With none of [`PRODUCTION_KEYS`]
    /// set, secrets are generated and `dev_mode` is on; with any of them, a
    /// JWT key and an API key are required. Weak secrets are refused.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        let addr = raw
            .parse(key::ADDR, |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| format!("`{v}` is not an address like 127.0.0.1:8080"))
            })?
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let secret = raw.parse(key::JWT_HS256_SECRET, at_least(MIN_HS256_SECRET_BYTES))?;
        let key_file = raw.parse(key::JWT_PUBLIC_KEY_FILE, |v| Ok(PathBuf::from(v)))?;
        let api_key = raw.parse(key::API_KEY, at_least(MIN_KEY_BYTES))?;
        let production = PRODUCTION_KEYS.into_iter().find(|k| raw.get(k).is_some());
        let dev_mode = production.is_none();
        if let Some(because) = production {
            if secret.is_none() && key_file.is_none() {
                return Err(ConfigError::Missing {
                    key: key::JWT_HS256_SECRET,
                    because,
                });
            }
            if api_key.is_none() {
                return Err(ConfigError::Missing {
                    key: key::API_KEY,
                    because,
                });
            }
        }
        let jwt_key = match (secret, key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: key::JWT_PUBLIC_KEY_FILE,
                    layer: Layer::Default,
                    message: "set either jwt_hs256_secret or jwt_public_key_file, not both"
                        .to_owned(),
                });
            }
            (Some(s), None) => JwtKey::Hs256(s),
            (None, Some(path)) => JwtKey::PublicKeyPem(
                std::fs::read(&path)
                    .map_err(|e| ConfigError::PublicKey(format!("{}: {e}", path.display())))?,
            ),
            (None, None) => JwtKey::Hs256(random_secret()),
        };
        let limits = Limits {
            max_message_bytes: raw.required(key::MAX_MESSAGE_BYTES, positive)?,
            ..Limits::default()
        };
        let log_format = raw.required(key::LOG_FORMAT, |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{v}` is not `text` or `json`")),
        })?;
        if raw.required(key::SUBSCRIBE_PROXY, boolean)? && raw.get(key::WEBHOOK_URL).is_none() {
            return Err(ConfigError::Invalid {
                key: key::SUBSCRIBE_PROXY,
                layer: Layer::Default,
                message: "needs webhook_url (the backend it asks)".to_owned(),
            });
        }
        let admin_secret = raw.parse(key::ADMIN_SECRET, at_least(MIN_KEY_BYTES))?;
        if let Some(admin) = &admin_secret {
            let jwt_secret = match &jwt_key {
                JwtKey::Hs256(s) => Some(s.as_str()),
                JwtKey::PublicKeyPem(_) => None,
            };
            if api_key.as_deref() == Some(admin.as_str()) || jwt_secret == Some(admin.as_str()) {
                return Err(ConfigError::Invalid {
                    key: key::ADMIN_SECRET,
                    layer: Layer::Default,
                    message: "must differ from api_key and jwt_hs256_secret (each secret grants \
                              different powers)"
                        .to_owned(),
                });
            }
        }
        Ok(Config {
            addr,
            jwt_key,
            jwt_audience: raw.parse(key::JWT_AUDIENCE, non_empty)?,
            jwt_issuer: raw.parse(key::JWT_ISSUER, non_empty)?,
            jwt_leeway: raw.required(key::JWT_LEEWAY, duration)?,
            api_key: api_key.unwrap_or_else(random_secret),
            webhook: match raw.parse(key::WEBHOOK_URL, url)? {
                None => None,
                Some(url) => Some(WebhookConfig {
                    url,
                    secret: raw
                        .parse(key::WEBHOOK_SECRET, at_least(MIN_KEY_BYTES))?
                        .ok_or(ConfigError::Invalid {
                            key: key::WEBHOOK_SECRET,
                            layer: Layer::Default,
                            message: "required when webhook_url is set".to_owned(),
                        })?,
                    timeout: raw.required(key::WEBHOOK_TIMEOUT, duration)?,
                    retries: raw.required(key::WEBHOOK_RETRIES, |v| {
                        v.parse::<u32>()
                            .map_err(|_| format!("`{v}` is not a non-negative integer"))
                    })?,
                    backoff: Duration::from_millis(200),
                }),
            },
            message_dedupe_window: raw.required(key::MESSAGE_DEDUPE_WINDOW, duration)?,
            message_claim_lease: raw.required(key::MESSAGE_CLAIM_LEASE, duration)?,
            in_flight: InFlightLimits {
                total: raw.required(key::WEBHOOK_MAX_IN_FLIGHT, positive)?,
                per_user: raw.required(key::WEBHOOK_MAX_IN_FLIGHT_PER_USER, positive)?,
            },
            rate_limit: RateLimit {
                per_second: raw.required(key::INBOUND_RATE, positive)? as f64,
                burst: raw.required(key::INBOUND_BURST, positive)? as f64,
                max_strikes: raw.required(key::INBOUND_ABUSE_LIMIT, positive)? as u32,
                ..RateLimit::default()
            },
            dev_mode,
            lifecycle: LifecycleConfig {
                hello_timeout: raw.required(key::HELLO_TIMEOUT, duration)?,
                close_timeout: raw.required(key::CLOSE_TIMEOUT, duration)?,
                max_queue_frames: raw.required(key::QUEUE_MAX_FRAMES, positive)?,
                max_queue_bytes: raw.required(key::QUEUE_MAX_BYTES, positive)?,
                heartbeat_interval: raw.required(key::HEARTBEAT_INTERVAL, duration)?,
                heartbeat_timeout: raw.required(key::HEARTBEAT_TIMEOUT, duration)?,
                coalesce: raw.required(key::COALESCE_TEXT, boolean)?,
            },
            limits,
            ai: AiConfig {
                max_message_bytes: raw.required(key::AI_MAX_MESSAGE_BYTES, positive)?,
                abort_grace: raw.required(key::AI_ABORT_GRACE, duration)?,
                replay_window: raw.required(key::AI_REPLAY_WINDOW, duration)?,
            },
            write_timeout: raw.required(key::WRITE_TIMEOUT, duration)?,
            http_header_timeout: raw.required(key::HTTP_HEADER_TIMEOUT, duration)?,
            http_body_timeout: raw.required(key::HTTP_BODY_TIMEOUT, duration)?,
            metrics_token: raw.parse(key::METRICS_TOKEN, at_least(MIN_KEY_BYTES))?,
            admin: match admin_secret {
                Some(secret) => Some(AdminConfig {
                    secret,
                    needs_secret: true,
                }),
                None if dev_mode => Some(AdminConfig {
                    secret: random_secret(),
                    needs_secret: false,
                }),
                None => None,
            },
            ingest: IngestLimits {
                per_second: raw.required(key::INGEST_RATE, positive)? as u64,
                burst: raw.required(key::INGEST_BURST, positive)? as u64,
                idle_timeout: raw.required(key::INGEST_IDLE_TIMEOUT, duration)?,
            },
            max_http_connections: raw.required(key::MAX_HTTP_CONNECTIONS, positive)?,
            max_connections: raw.required(key::MAX_CONNECTIONS, positive)?,
            max_connections_per_user: raw.required(key::MAX_CONNECTIONS_PER_USER, positive)?,
            max_streams_per_connection: raw.required(key::MAX_STREAMS_PER_CONNECTION, positive)?,
            subscribe_proxy: raw.required(key::SUBSCRIBE_PROXY, boolean)?,
            subscribe_cache_ttl: raw.required(key::SUBSCRIBE_CACHE_TTL, duration)?,
            presence_ttl: raw.required(key::PRESENCE_TTL, at_least_100ms)?,
            presence_max_listed: raw.required(key::PRESENCE_MAX_LISTED, positive)?,
            max_pending_connections: raw.required(key::MAX_PENDING_CONNECTIONS, positive)?,
            drain_window: raw.required(key::DRAIN_WINDOW, duration)?,
            max_connection_age: Some(raw.required(key::MAX_CONNECTION_AGE, duration)?)
                .filter(|age| !age.is_zero()),
            stream_limits: StreamLimits {
                max_events: raw.required(key::HISTORY_MAX_EVENTS, positive)?,
                max_age: raw.required(key::HISTORY_MAX_AGE, duration)?,
                run_ttl: raw.required(key::RUN_TTL, duration)?,
                max_run_bytes: raw.required(key::RUN_MAX_BYTES, positive)?,
                max_runs_bytes: raw
                    .required(key::RUN_MAX_BYTES, positive)?
                    .saturating_mul(4),
                idempotency_window: raw.required(key::IDEMPOTENCY_WINDOW, duration)?,
                max_open_runs: raw.required(key::MAX_OPEN_RUNS, positive)?,
                ..StreamLimits::default()
            },
            history_max_bytes: raw.required(key::HISTORY_MAX_BYTES, positive)?,
            log_format,
            redis: {
                use crate::broker::redis::{RedisConfig, RedisNodes};
                let single = raw.parse(key::REDIS_URL, redis_or_sentinel_url)?;
                let cluster = raw.parse(key::REDIS_CLUSTER_URLS, |v| {
                    v.split(',')
                        .map(|u| redis_url(u.trim()))
                        .collect::<Result<Vec<_>, _>>()
                })?;
                let nodes = match (single, cluster) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Invalid {
                            key: key::REDIS_CLUSTER_URLS,
                            layer: Layer::Default,
                            message: "set either redis_url or redis_cluster_urls, not both"
                                .to_owned(),
                        });
                    }
                    (Some(url), None) if url.starts_with(crate::broker::redis::SENTINEL_SCHEME) => {
                        Some(RedisNodes::Sentinel(url))
                    }
                    (Some(url), None) => Some(RedisNodes::Single(url)),
                    (None, Some(urls)) => Some(RedisNodes::Cluster(urls)),
                    (None, None) => None,
                };
                match nodes {
                    None => None,
                    Some(nodes) => Some(RedisConfig {
                        nodes,
                        prefix: raw.required(key::REDIS_PREFIX, redis_prefix)?,
                        timing: Default::default(),
                    }),
                }
            },
            echo_endpoint: raw.required(key::ECHO_ENDPOINT, boolean)?,
            echo_max_connections: 8,
            echo_idle_timeout: Duration::from_secs(30),
        })
    }

    /// A config for tests: loopback, port 0, fixed secret and API key.
    pub fn for_tests(secret: &str, api_key: &str) -> Self {
        let mut raw = RawConfig::load(None, [], &BTreeMap::new()).unwrap_or_default();
        raw.set(key::ADDR, "127.0.0.1:0")
            .set(key::JWT_HS256_SECRET, secret)
            .set(key::API_KEY, api_key);
        // The defaults are valid by construction (checked by a unit test).
        match Config::from_raw(&raw) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid: {e}"),
        }
    }
}

/// The HS256 secret `herald token` signs with: `jwt_hs256_secret`, required
/// and as strong as the server requires (nothing else is needed to mint).
pub fn token_secret(raw: &RawConfig) -> Result<String, ConfigError> {
    raw.parse(key::JWT_HS256_SECRET, at_least(MIN_HS256_SECRET_BYTES))?
        .ok_or(ConfigError::NoTokenSecret)
}

/// 32 random bytes, URL-safe base64.
pub fn random_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid_and_zero_config_is_dev_mode() {
        let raw = RawConfig::load(None, [], &BTreeMap::new()).unwrap();
        let c = Config::from_raw(&raw).unwrap();
        assert!(c.dev_mode);
        assert_eq!(c.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.lifecycle.hello_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_message_bytes, 65536);
    }

    #[test]
    fn port_env_listens_on_all_interfaces() {
        let raw = RawConfig::load(
            None,
            [("PORT".to_owned(), "9000".to_owned())],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            Config::from_raw(&raw).unwrap().addr,
            "0.0.0.0:9000".parse().unwrap()
        );
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(
            &file,
            "addr = \"127.0.0.1:1\"\napi_key = \"file-0123456789abcdef\"\nhello_timeout = \"3s\"\n",
        )
        .unwrap();
        let env = [
            (
                "HERALD_API_KEY".to_owned(),
                "env-0123456789abcdef".to_owned(),
            ),
            ("HERALD_JWT_HS256_SECRET".to_owned(), STRONG.to_owned()),
            ("HERALD_ADDR".to_owned(), "127.0.0.1:2".to_owned()),
        ];
        let raw = RawConfig::load(Some(&file), env, &flags(&[("addr", "127.0.0.1:3")])).unwrap();
        let c = Config::from_raw(&raw).unwrap();
        assert_eq!(c.addr, "127.0.0.1:3".parse().unwrap());
        assert_eq!(c.api_key, "env-0123456789abcdef");
        assert_eq!(c.lifecycle.hello_timeout, Duration::from_secs(3));
        assert!(!c.dev_mode);
    }

    const STRONG: &str = "0123456789abcdef0123456789abcdef";

    fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_raw(&RawConfig::load(None, env, &BTreeMap::new())?)
    }

    /// Issue 14, findings 6 and 7: development mode (generated secrets, the
    /// token route) only when nothing production-like is configured; any
    /// partial configuration names the missing key instead of generating a
    /// secret nobody knows.
    #[test]
    fn partial_configuration_is_refused_naming_the_missing_key() {
        type Env<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Env, &str, &str)] = &[
            (
                &[("HERALD_API_KEY", "k-0123456789abcdef")],
                "jwt_hs256_secret",
                "api_key",
            ),
            (
                &[("HERALD_JWT_HS256_SECRET", STRONG)],
                "api_key",
                "jwt_hs256_secret",
            ),
            (
                &[
                    ("HERALD_WEBHOOK_URL", "http://agent.internal/hook"),
                    ("HERALD_WEBHOOK_SECRET", "w-0123456789abcdef"),
                ],
                "jwt_hs256_secret",
                "webhook_url",
            ),
            (
                &[("HERALD_REDIS_URL", "redis://r:6379")],
                "jwt_hs256_secret",
                "redis_url",
            ),
        ];
        for (env, missing, because) in cases {
            let err = from_env(env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Missing { key, because: b } if key == missing && b == because),
                "{env:?}: {err}"
            );
            assert!(err.to_string().contains("openssl rand"), "{err}");
        }
        // A public key instead of the HS256 secret is enough.
        let pem_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(pem_file.path(), "not checked here").unwrap();
        let pem = pem_file.path().to_string_lossy().into_owned();
        let c = from_env(&[
            ("HERALD_JWT_PUBLIC_KEY_FILE", &pem),
            ("HERALD_API_KEY", "k-0123456789abcdef"),
        ])
        .unwrap();
        assert!(!c.dev_mode);
        // Nothing at all, even listening on every interface: development mode.
        let c = from_env(&[("PORT", "9000")]).unwrap();
        assert!(c.dev_mode);
        let full = from_env(&[
            ("HERALD_JWT_HS256_SECRET", STRONG),
            ("HERALD_API_KEY", "k-0123456789abcdef"),
            ("HERALD_WEBHOOK_URL", "http://agent.internal/hook"),
            ("HERALD_WEBHOOK_SECRET", "w-0123456789abcdef"),
        ])
        .unwrap();
        assert!(!full.dev_mode);
    }

    /// Issue 14, finding 10: short secrets are refused, saying how to make one.
    #[test]
    fn weak_secrets_are_refused() {
        let ok_key = ("HERALD_API_KEY", "k-0123456789abcdef");
        let ok_jwt = ("HERALD_JWT_HS256_SECRET", STRONG);
        let short_jwt = &STRONG[..31];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("HERALD_JWT_HS256_SECRET", "x"), ok_key],
                "jwt_hs256_secret",
            ),
            (
                &[("HERALD_JWT_HS256_SECRET", short_jwt), ok_key],
                "jwt_hs256_secret",
            ),
            (&[ok_jwt, ("HERALD_API_KEY", "k")], "api_key"),
            (&[ok_jwt, ("HERALD_API_KEY", "0123456789abcde")], "api_key"),
            (
                &[
                    ok_jwt,
                    ok_key,
                    ("HERALD_WEBHOOK_URL", "http://a/h"),
                    ("HERALD_WEBHOOK_SECRET", "s"),
                ],
                "webhook_secret",
            ),
        ];
        for (env, weak) in cases {
            let err = from_env(env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key, .. } if key == weak),
                "{env:?}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("too short") && text.contains("openssl rand"),
                "{text}"
            );
        }
        // Exactly the minimum passes.
        from_env(&[
            ("HERALD_JWT_HS256_SECRET", STRONG),
            ("HERALD_API_KEY", "0123456789abcdef"),
        ])
        .unwrap();
        let raw = RawConfig::load(
            None,
            [("HERALD_JWT_HS256_SECRET".to_owned(), "short".to_owned())],
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(
            token_secret(&raw).is_err(),
            "herald token refuses a weak secret"
        );
        let raw = RawConfig::load(None, [], &BTreeMap::new()).unwrap();
        assert!(matches!(
            token_secret(&raw),
            Err(ConfigError::NoTokenSecret)
        ));
    }

    #[test]
    fn invalid_values_name_the_key() {
        let raw = RawConfig::load(
            None,
            [("HERALD_HELLO_TIMEOUT".to_owned(), "soon".to_owned())],
            &BTreeMap::new(),
        )
        .unwrap();
        let err = Config::from_raw(&raw).unwrap_err().to_string();
        assert!(
            err.contains("hello_timeout") && err.contains("Env"),
            "{err}"
        );
        let raw = RawConfig::load(None, [], &flags(&[("queue_max_frames", "0")])).unwrap();
        assert!(
            Config::from_raw(&raw)
                .unwrap_err()
                .to_string()
                .contains("queue_max_frames")
        );
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(&file, "adr = \"x\"\n").unwrap();
        let err = RawConfig::load(Some(&file), [], &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `adr`"), "{err}");
        assert!(err.contains("did you mean `addr`"), "{err}");
    }

    #[test]
    fn unknown_env_vars_are_rejected_with_the_nearest_key() {
        let env = [("HERALD_API_KYE".to_owned(), "k".to_owned())];
        let err = RawConfig::load(None, env, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`HERALD_API_KYE`"), "{err}");
        assert!(err.contains("did you mean `HERALD_API_KEY`"), "{err}");
        let env = [("HERALD_ZZZZZZZZZZZZZZZ".to_owned(), "1".to_owned())];
        let err = RawConfig::load(None, env, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("did you mean"), "{err}");
        // The log filter is not a config key and is allowed.
        let env = [("HERALD_LOG".to_owned(), "debug".to_owned())];
        assert!(RawConfig::load(None, env, &BTreeMap::new()).is_ok());
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/OPERATIONS.md must list every key with its env var, flag,
    /// default and description, exactly as the code declares them (issue 17:
    /// the guard used to check names only, so a changed default went unseen).
    #[test]
    fn operations_doc_lists_every_key() {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        let mut wrong = Vec::new();
        for k in KEYS {
            let default = k.default.map_or("—".to_owned(), |d| format!("`{d}`"));
            let row = format!(
                "| `{}` | `{}` | `--{}` | {} | {} |",
                k.name,
                env_name(k.name),
                flag_name(k.name),
                default,
                k.doc
            );
            let prefix = format!("| `{}` |", k.name);
            let found = doc.lines().find(|l| l.starts_with(&prefix));
            if found != Some(row.as_str()) {
                wrong.push(format!("docs: {found:?}\ncode: {row}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "docs/OPERATIONS.md differs from the code:\n{}",
            wrong.join("\n")
        );
    }
}
