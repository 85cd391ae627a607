//! Herald: a WebSocket gateway that streams AI-agent events to users.
//!
//! The protocol and lifecycle logic live in the sans-IO crate `herald_core`;
//! this crate drives it with tokio, axum and hyper.
//!
//! Layout (request path, top to bottom):
//! - [`server`]: listener (large backlog), accept loop, shared [`server::App`], drain.
//! - [`api`]: HTTP routes — publish, disconnect, connections, health, metrics.
//! - [`ws`]: the `GET /ws` upgrade (limits, token from header or subprotocol).
//! - [`actor`]: one task per socket, the only writer; drives the lifecycle.
//! - [`connection`]: the shared handle others use to send to or close a connection.
//! - [`registry`]: connections by id and by user; publish (append, then fan out); cleanup.
//! - [`history`]: the history store trait and the in-memory store.
//! - [`inbound`]: user messages and cancels to the agent backend (dedupe, ack/nack).
//! - [`webhook`]: the signed, retrying webhook backend; [`demo`]: the built-in demo agent.
//! - [`auth`]: JWT verification and minting.
//! - [`config`]: defaults → TOML → `HERALD_*` env → flags.
//! - [`web`]: the embedded demo page, `/herald.js` and the dev-only token endpoint.
//! - [`bench`]: `herald bench`, the load generator.
//! - [`telemetry`]: logging, Prometheus metrics, per-server invariant counters.

#![forbid(unsafe_code)]

pub mod actor;
pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod connection;
pub mod demo;
pub mod history;
pub mod inbound;
pub mod registry;
pub mod server;
pub mod telemetry;
pub mod web;
pub mod webhook;
pub mod ws;

pub use config::Config;
pub use server::Server;
