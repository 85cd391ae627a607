//! Herald: a WebSocket gateway that streams AI-agent events to users.
//!
//! The protocol and lifecycle logic live in the sans-IO crate `herald_core`;
//! this crate performs its decisions with tokio, axum and hyper.
//!
//! Layout, in the order a request travels (each module depends only on the
//! ones below it):
//! - [`server`]: listener (large backlog), accept loop, sweeper, drain.
//! - `http`: the router — publish/kick/inspect API, health, metrics, the
//!   `GET /ws` upgrade, the embedded demo page.
//! - `admission`: the bounds on live and not-yet-authenticated sockets.
//! - `actor`: one task per socket, its only reader; carries out what the core
//!   decides (inbound frames, join and catch-up, timers), writes pings and
//!   the close, and waits out a full socket.
//! - `app`: the state one server shares (config, verifier, hub, broker, agent).
//! - [`agent`]: user messages and cancels to the agent backend — dedupe,
//!   ack/nack, the signed webhook, the built-in demo agent.
//! - `hub` ([`Hub`]): this node's connections by id and by stream; receives the
//!   broker's deliveries and hands them to connections.
//! - [`broker`]: where events live and how they reach every node — the
//!   [`broker::Broker`] trait and the in-memory broker.
//! - `connection`: the shared handle others use to send to or close a connection.
//! - `wire`: server-to-client framing (once per event) and the socket's
//!   write half, which whoever queues a frame writes through.
//! - [`auth`]: JWT verification and minting.
//! - [`config`]: defaults → TOML → `HERALD_*` env → flags, one key table.
//! - [`telemetry`]: logging, Prometheus metrics, per-server invariant counters.
//! - `clock` and `tasks`: time the tests can pause; spawned work the drain waits for.
//! - `sync`: the connection handle's mutex and wake-up, swapped for loom's
//!   under `--cfg herald_loom` (model checking).
//!
//! The public surface is what the binary, the tests and embedders need:
//! [`Server`] and [`Config`], token minting in [`auth`], the [`broker`]
//! seam, webhook signature checks in [`agent::webhook`], metrics names in
//! [`telemetry`]. Everything else is private.
//!
//! Data path: publish (HTTP) → broker (append + seq, then deliver) → hub
//! (this node's sockets for the stream) → connection (state check + merge by
//! seq + enqueue + write, under one lock) → socket; the actor writes only
//! what the publisher could not (a full socket, pings, the close).

#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;

mod actor;
mod admission;
pub mod agent;
mod app;
pub mod auth;
pub mod broker;
mod clock;
pub mod config;
mod connection;
mod http;
mod hub;
pub mod server;
mod sync;
mod tasks;
pub mod telemetry;
mod wire;

pub use broker::ConnInfo;
pub use config::Config;
pub use hub::Hub;
pub use server::Server;

/// Entry points of the fuzz targets and their corpus replay
/// (`crates/herald-fuzz`), and of `benches/publish_body.rs`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::api::ApiRefusal;

    /// What `POST /api/v1/events` makes of a body before publishing: each
    /// event as (user, event name, data length in bytes), or the refusal.
    pub fn publish_body(body: &[u8]) -> Result<Vec<(String, String, usize)>, ApiRefusal> {
        crate::http::api::check_publish_body(body)
    }

    /// How many events the publish handler reads in `body` (0 if refused);
    /// with `general_only`, without its fast path (`benches/publish_body.rs`).
    pub fn count_publish_events(body: &[u8], general_only: bool) -> usize {
        crate::http::api::count_publish_events(body, general_only)
    }
}

/// A boxed, sendable future (keeps the broker and agent traits object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
