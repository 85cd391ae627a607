//! Sans-IO core of Herald.
//!
//! Nothing in this crate touches a socket or reads a clock: every function that
//! depends on time takes `now` as an argument, and every effect is returned to
//! the caller as a value. The server crate (`herald`) drives it from tokio.
//!
//! Layout:
//! - [`aisdk`]: the AI SDK `WebSocketChatTransport` wire protocol (client
//!   frames validated, server frames written, per-response sequences) and
//!   Herald's run events as UI message chunks.
//! - [`backoff`]: the doubling, capped delay between reconnect attempts.
//! - [`close`]: why a connection closed, who decided it, and the WebSocket close code.
//! - [`lifecycle`]: the per-connection state machine (`Handshaking → Ready →
//!   Closing → Closed`) with its bounded outbound queue. It decides what may be
//!   written and when, and hands out the cleanup token exactly once.
//! - [`protocol`]: wire protocol v1 — client frames parsed and validated, server
//!   frames serialized, limits.
//! - [`session`]: what an inbound client frame means in the connection's state
//!   (close, reply, or an action for the I/O layer).
//! - [`catchup`]: the join decision (resume or reset) and the merge-by-seq
//!   catch-up that takes a connection from "subscribed" to "live" with no gap
//!   and no duplicate.
//! - [`stream`]: per-user event streams — `epoch`, `seq`, bounded history,
//!   agent runs, resume decisions.
//! - [`text`]: answer text streamed as deltas, and the entries that compact
//!   consecutive deltas of one part in history.
//! - [`ratelimit`]: the per-connection inbound token bucket.
//! - [`queue`]: the FIFO that keeps its front item inline (a connection's
//!   outbound queue, which almost always holds one frame or none).

#![forbid(unsafe_code)]

pub mod aisdk;
pub mod backoff;
pub mod catchup;
pub mod close;
pub mod lifecycle;
pub mod protocol;
pub mod queue;
pub mod ratelimit;
pub mod session;
pub mod stream;
pub mod text;

pub use catchup::LiveOutcome;
pub use close::{CloseInfo, CloseReason, Initiator};
pub use lifecycle::{Connection, LifecycleConfig, Payload, SendRefused, State, Transmit};
