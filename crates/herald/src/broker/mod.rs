//! The broker: where events live and how they reach every node.
//!
//! A [`Broker`] owns the streams. Publishing appends to a stream and assigns
//! `seq` within the stream's `epoch` **before** any delivery, then delivers
//! the stored events to every node's hub through its [`EventSink`] — one
//! delivery path, whatever the broker. Per stream, append and delivery are one
//! atomic step, so deliveries of a stream reach a sink in seq order. A node
//! declares interest in a stream with [`Broker::subscribe`] (confirmed before
//! the future resolves) and withdraws it with [`Broker::unsubscribe`]; the
//! hub issues both in order, under its own lock.
//!
//! Everything a broker hands out is plain data: [`StoredEvent`] is a seq and
//! the event frame's JSON bytes; wire types are built at the hub.
//!
//! [`memory::MemoryBroker`] keeps everything in this process (the default).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::catchup::StreamPosition;
use herald_core::lifecycle::Payload;
use herald_core::protocol::{EventFrame, ServerFrame};
use herald_core::stream::EventMeta;
use herald_core::stream::FromCovered;
use herald_core::text::{Delta, TEXT_DELTA, Template};
use serde::{Deserialize, Serialize};

use crate::BoxFuture;

pub mod memory;
pub mod redis;

/// The stream of a user: `user:<sub>`.
pub fn user_stream(user: &str) -> String {
    format!("user:{user}")
}

/// The user a `user:<sub>` stream belongs to.
pub fn stream_user(stream: &str) -> Option<&str> {
    stream.strip_prefix("user:")
}

/// Why a broker operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Events the caller needs were evicted (the reader must fail closed).
    #[error("history after seq {after} is no longer available")]
    Gone {
        /// The last seq the reader has.
        after: u64,
    },
    /// The broker's backing store cannot be reached (remote brokers).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The store answered, but refused this stream's operation (its data is
    /// damaged, e.g. a key of the wrong type): this stream only, not the node.
    #[error("the stream's data refused the operation: {0}")]
    Stream(String),
    /// A numbered text delta skips ahead of its part; nothing of the batch
    /// was appended.
    #[error(
        "event {position} of the batch is delta {index} of its part; the part expects {expected}"
    )]
    DeltaOutOfOrder {
        /// Its position in the batch.
        position: usize,
        /// The index it carries.
        index: u64,
        /// The index its part expects next.
        expected: u64,
    },
}

/// An event to publish; the broker assigns its seq.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The frame to store and send (`seq` is overwritten).
    pub frame: EventFrame,
    /// Publish idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Set for an `agent_text_delta`: its part, text and frame (shared with
    /// the [`EventMeta`] that describes it).
    pub delta: Option<Arc<Delta>>,
}

impl NewEvent {
    /// An event to publish at `ts` (RFC 3339).
    pub fn new(
        event: String,
        thread_id: Option<String>,
        run_id: Option<String>,
        data: serde_json::Value,
        ts: String,
    ) -> Self {
        Self {
            frame: EventFrame {
                seq: 0,
                stream: None,
                event,
                thread_id,
                run_id,
                data,
                ts,
            },
            idempotency_key: None,
            delta: None,
        }
    }

    /// An `agent_text_delta` of `run_id`'s `part` appending `text` at `ts`;
    /// `index` numbers it among the part's deltas (0-based), if given.
    pub fn text_delta(
        run_id: String,
        thread_id: Option<String>,
        part: String,
        text: &str,
        index: Option<u64>,
        ts: String,
    ) -> Self {
        let template = Template::new(&run_id, thread_id.as_deref(), &part, &ts);
        let delta = Delta::new(&part, text, index, template);
        // The frame is written from the template: `data` stays empty.
        let data = serde_json::Value::Object(serde_json::Map::new());
        Self {
            delta: Some(Arc::new(delta)),
            ..Self::new(TEXT_DELTA.to_owned(), thread_id, Some(run_id), data, ts)
        }
    }

    /// The event as published to `stream`: an event of a shared stream
    /// names it (`"stream"` right after its seq); one of a user's own stream
    /// (`None`, or a `user:` name) does not.
    pub fn in_stream(mut self, stream: Option<&str>) -> Self {
        let shared = stream.filter(|s| stream_user(s).is_none());
        self.frame.stream = shared.map(str::to_owned);
        if let Some(d) = self.delta.take() {
            let d = Arc::unwrap_or_clone(d);
            let template = d.template.in_stream(shared);
            self.delta = Some(Arc::new(Delta { template, ..d }));
        }
        self
    }

    /// What the stream's retention needs to know of it.
    pub fn meta(&self) -> EventMeta {
        EventMeta {
            event: self.frame.event.clone(),
            run_id: self.frame.run_id.clone(),
            thread_id: self.frame.thread_id.clone(),
            delta: self.delta.clone(),
            answers: self.answers().map(str::to_owned),
        }
    }

    /// The `user_message` id its run answers, if it names one (`data.message_id`
    /// of an event of a run; the broker reads it when the event opens the run).
    pub fn answers(&self) -> Option<&str> {
        self.frame.run_id.as_ref()?;
        self.frame
            .data
            .get(herald_core::stream::turns::ANSWERS_FIELD)?
            .as_str()
    }

    /// Everything after `{"type":"event","seq":N` in its frame (`None` if
    /// the serializer did not start the frame with its type and seq).
    pub fn frame_tail(&self) -> Option<String> {
        match &self.delta {
            Some(d) => Some(d.template.tail(&d.text)),
            None => {
                let (json, head) = self.serialized()?;
                Some(json[head..].to_owned())
            }
        }
    }

    /// Its frame with `seq`, serialized once for history and every delivery.
    pub fn encode(&self, seq: u64) -> Bytes {
        let json = match &self.delta {
            Some(d) => {
                let mut json = d.template.frame(seq, seq, &d.text);
                // Kept in history: no spare capacity.
                json.shrink_to_fit();
                json
            }
            // The frame as serialized with its own seq, the head rewritten
            // with `seq`: no copy of `data` and no second serialization.
            None => match self.serialized() {
                Some((json, head)) => {
                    let head_out = event_head(seq);
                    let mut out = String::with_capacity(head_out.len() + json.len() - head);
                    out.push_str(&head_out);
                    out.push_str(&json[head..]);
                    out
                }
                None => {
                    let mut frame = self.frame.clone();
                    frame.seq = seq;
                    let mut json = ServerFrame::Event(&frame).to_json();
                    json.shrink_to_fit();
                    json
                }
            },
        };
        Bytes::from(json)
    }

    /// Its `event` frame serialized with `frame.seq`, and the length of the
    /// `{"type":"event","seq":N` it starts with (`None` if it does not).
    fn serialized(&self) -> Option<(String, usize)> {
        let json = ServerFrame::Event(&self.frame).to_json();
        let head = event_head(self.frame.seq);
        json.starts_with(&head).then_some((json, head.len()))
    }
}

/// The start of an `event` frame up to its seq: `{"type":"event","seq":N`.
fn event_head(seq: u64) -> String {
    format!("{{\"type\":\"event\",\"seq\":{seq}")
}

/// A stored event: its seq and the JSON text of its `event` frame. Read
/// from history, one frame may cover a range of compacted text deltas
/// (`from..=seq`, see [`herald_core::text`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the stream (the last seq the frame covers).
    pub seq: u64,
    /// The first seq the frame covers (`seq` for one event).
    pub from: u64,
    /// The serialized `event` frame (UTF-8 JSON).
    pub json: Bytes,
}

impl StoredEvent {
    /// One event with `seq`.
    pub fn new(seq: u64, json: impl Into<Bytes>) -> Self {
        Self {
            seq,
            from: seq,
            json: json.into(),
        }
    }
}

impl Payload for StoredEvent {
    fn wire_len(&self) -> usize {
        self.json.len()
    }
}

impl FromCovered for StoredEvent {
    fn from_covered(from: u64, to: u64, json: String) -> Self {
        Self {
            seq: to,
            from,
            json: json.into(),
        }
    }
}

/// The result of publishing one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The event's seq in the stream.
    pub seq: u64,
    /// The stream's epoch.
    pub epoch: String,
    /// Live connections on this node the event was queued to.
    pub delivered: usize,
    /// True when the idempotency key was seen before (nothing appended).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// The `agent_error {reason: "run_timeout"}` that closes a silent run.
pub fn run_timeout_event(run_id: &str, thread_id: Option<String>) -> NewEvent {
    run_closed_event(run_id, thread_id, "run_timeout")
}

/// The `agent_error {reason}` that closes a run on the server's decision
/// (`run_timeout`, `run_too_large`).
pub fn run_closed_event(run_id: &str, thread_id: Option<String>, reason: &str) -> NewEvent {
    NewEvent::new(
        herald_core::stream::runs::ERROR.to_owned(),
        thread_id,
        Some(run_id.to_owned()),
        serde_json::json!({ "reason": reason }),
        crate::clock::now_rfc3339(),
    )
}

/// An open run of a stream, and its thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRef {
    /// The run.
    pub run_id: String,
    /// The thread its first event named, if any.
    pub thread_id: Option<String>,
}

/// A run closed by the sweeper because it was silent for `run_ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredRun {
    /// The stream.
    pub stream: String,
    /// The run.
    pub run_id: String,
    /// Its thread, if any.
    pub thread_id: Option<String>,
}

/// Size of what the broker holds, for metrics and docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BrokerStats {
    /// Streams held.
    pub streams: usize,
    /// Events held.
    pub events: usize,
    /// Serialized event bytes held (payload only).
    pub bytes: usize,
    /// Memory charged against `history_max_bytes` (payload + per-event overhead).
    pub charged_bytes: usize,
    /// The last waits between pub/sub reconnection attempts, newest last
    /// (remote brokers; at most 32).
    pub reconnect_waits: Vec<std::time::Duration>,
    /// Streams whose Cluster slot moved and were followed to the new
    /// master (each follow started; Redis Cluster only).
    pub slot_follows: u64,
}

/// One row of `GET /api/v1/connections`: a connection as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    /// Connection id.
    pub conn_id: String,
    /// The node holding it.
    pub node: String,
    /// User, once authenticated.
    pub user_id: Option<String>,
    /// Lifecycle state.
    pub state: String,
    /// Milliseconds since the upgrade.
    pub age_ms: u64,
    /// Frames waiting to be written.
    pub queue_depth: usize,
    /// Bytes waiting in the live queue.
    pub queued_bytes: usize,
    /// Highest seq the client acknowledged.
    pub acked_seq: u64,
}

/// A question every node's hub answers (through the broker, so a request to
/// any node reaches the connections on all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FleetRequest {
    /// Close every connection of `stream` with 4409.
    Kick {
        /// The stream.
        stream: String,
    },
    /// Stop agent run `run_id` of `user` (or of shared stream `stream`)
    /// wherever the built-in demo agent runs it.
    CancelRun {
        /// The run's user (the requester, for a shared stream's run).
        user: String,
        /// The run.
        run_id: String,
        /// The shared stream the run is in, if any (absent from nodes of
        /// an earlier version: their requests name a user's own run).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
    },
    /// End `user`'s subscriptions to shared stream `stream`
    /// (`unsubscribed {reason: removed}`).
    Unsubscribe {
        /// The shared stream.
        stream: String,
        /// The user removed from it.
        user: String,
    },
    /// Describe the connections of `stream` (or all), at most `limit` rows.
    List {
        /// The stream, or every connection.
        stream: Option<String>,
        /// Most rows per node.
        limit: usize,
        /// Only connections in this lifecycle state (`open`, …), if given
        /// (absent from nodes of an earlier version: all states).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<String>,
    },
    /// Describe the node (the admin page's node table and charts).
    Status,
}

/// One node's answer to a [`FleetRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetReply {
    /// Connections this node closed (`Kick`), runs it stopped
    /// (`CancelRun`), or subscriptions it ended (`Unsubscribe`).
    pub closed: usize,
    /// Connections this node describes (`List`), in conn_id order.
    pub rows: Vec<ConnInfo>,
    /// Connections this node has that match (`List`), before the limit.
    pub total: usize,
    /// The node itself (`Status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::telemetry::vitals::NodeStatus>,
}

/// How a user's presence in a shared stream changed, fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// It did not (other connections of the user are there, or were not).
    None,
    /// The user's first connection joined.
    Joined,
    /// The user's last connection left.
    Left,
}

/// Who is in a shared stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Users present with their connection counts, by user id, at most
    /// the limit asked for.
    pub users: Vec<herald_core::protocol::PresentUser>,
    /// Users present in all.
    pub total_users: usize,
    /// Their connections in all.
    pub total_connections: usize,
}

/// Who forwards a `user_message` id (deduplication across nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageClaim {
    /// This call claimed the id: forward it, then settle the claim.
    New,
    /// Another node is forwarding it now.
    InFlight,
    /// It was forwarded and accepted within the window.
    Accepted,
}

/// A random id for this process's node (shown in connection listings).
pub fn new_node_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let suffix = format!("{:08x}", rand::random::<u32>());
    if host.is_empty() {
        suffix
    } else {
        format!("{host}-{suffix}")
    }
}

/// Where a broker delivers stored events: this node's hub.
pub trait EventSink: Send + Sync + Debug {
    /// Deliver `events` (in seq order) of `stream` in `epoch` to this node's
    /// connections; returns how many connections they were queued to.
    /// `published_at` is when the publish started, as well as this node
    /// knows (for the publish-to-write latency histogram).
    fn deliver(
        &self,
        stream: &str,
        epoch: &str,
        events: &[StoredEvent],
        published_at: Instant,
    ) -> usize;

    /// Deliveries for `stream` may have been missed (the broker's connection
    /// dropped and came back); the stream is now at `last_seq` in `epoch`.
    /// Every local connection catches up from history, or — when the epoch
    /// changed — is closed so its client resumes and is told `reset`.
    fn resync(&self, stream: &str, epoch: &str, last_seq: u64);

    /// Answer a request of some node (this one included).
    fn answer(&self, request: &FleetRequest) -> FleetReply;

    /// Hand an ephemeral frame (`json`: presence or typing, not stored, no
    /// seq) to this node's subscribers of shared stream `stream`, except
    /// the connections of `from_user` when given.
    fn signal(&self, _stream: &str, _from_user: Option<&str>, _json: &str) {}
}

/// Where events live and how they reach every node.
pub trait Broker: Send + Sync + Debug {
    /// Append `events` to `stream` in order (atomically for the stream),
    /// assigning seqs, then deliver them through the sink of every node. A
    /// repeated idempotency key appends and delivers nothing and returns the
    /// original position.
    fn publish<'a>(
        &'a self,
        stream: &'a str,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'a, Result<Vec<Published>, BrokerError>>;

    /// The stream's epoch, latest seq and oldest seq still in history
    /// (creating the stream if needed).
    fn position<'a>(
        &'a self,
        stream: &'a str,
    ) -> BoxFuture<'a, Result<StreamPosition, BrokerError>>;

    /// Up to `limit` events with `after < seq <= until`, in order; `Gone` if
    /// the first of them was evicted or the stream is no longer in `epoch`.
    fn history<'a>(
        &'a self,
        stream: &'a str,
        epoch: &'a str,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, BrokerError>>;

    /// The events of the stream's open runs with `seq <= until`, in order;
    /// `Gone` if the stream is no longer in `epoch`.
    fn open_run_events<'a>(
        &'a self,
        stream: &'a str,
        epoch: &'a str,
        until: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, BrokerError>>;

    /// The open runs of `stream`, in no order.
    fn open_runs<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<RunRef>, BrokerError>>;

    /// Whether `stream` exists (it has an epoch); looking creates nothing.
    fn exists<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Whether `run_id` is an open run of `stream`.
    fn is_open_run<'a>(
        &'a self,
        stream: &'a str,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Declare this node's interest in `stream`. The call registers the
    /// interest at once (calls are ordered); the future resolves once
    /// deliveries for the stream are certain to reach this node's sink.
    fn subscribe(&self, stream: &str) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Withdraw this node's interest in `stream` (the last local connection left).
    fn unsubscribe(&self, stream: &str);

    /// Enforce age bounds, drop idle streams, and close the runs silent for
    /// longer than `run_ttl` by publishing [`run_timeout_event`] to them —
    /// exactly once across nodes. Returns the runs it closed.
    fn sweep(&self, now: Instant) -> BoxFuture<'_, Vec<ExpiredRun>>;

    /// Ask every node's hub (this one included) and collect the answers;
    /// nodes that do not answer in time are left out.
    fn ask_fleet(
        &self,
        request: FleetRequest,
    ) -> BoxFuture<'_, Result<Vec<FleetReply>, BrokerError>>;

    /// Claim `user_message` `id` of `stream` for forwarding, for `lease`
    /// unless renewed ([`Broker::renew_claim`]). One process deduplicates by
    /// itself, so the memory broker always answers `New`; the Redis broker
    /// answers for the whole fleet.
    fn claim_message<'a>(
        &'a self,
        _stream: &'a str,
        _id: &'a str,
        _lease: Duration,
    ) -> BoxFuture<'a, Result<MessageClaim, BrokerError>> {
        Box::pin(async { Ok(MessageClaim::New) })
    }

    /// Extend this node's claim on `id` to `lease` from now (while its
    /// forward runs); a claim that lapsed and was taken by another node is
    /// left alone.
    fn renew_claim<'a>(
        &'a self,
        _stream: &'a str,
        _id: &'a str,
        _lease: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Settle a claim: `accepted` keeps the id as accepted for `window`;
    /// otherwise this node's claim is released so a retry is forwarded again
    /// (another node's claim, taken after this one lapsed, is left alone).
    fn settle_message<'a>(
        &'a self,
        _stream: &'a str,
        _id: &'a str,
        _accepted: bool,
        _window: Duration,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Set this node's count of `user`'s connections reading shared stream
    /// `stream` (0: none; the entry lives `ttl` unless refreshed) and say
    /// whether that changed the user's presence fleet-wide.
    fn presence_set<'a>(
        &'a self,
        stream: &'a str,
        user: &'a str,
        count: usize,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<PresenceChange, BrokerError>>;

    /// Renew this node's entries of `stream` (`users` with their counts)
    /// for `ttl`, and drop the entries of other nodes that were not renewed
    /// in time (a node that died): the users that left with them.
    fn presence_refresh<'a>(
        &'a self,
        stream: &'a str,
        users: Vec<(String, usize)>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, BrokerError>>;

    /// Who is in `stream`: at most `limit` users listed, all counted.
    fn presence<'a>(
        &'a self,
        stream: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Presence, BrokerError>>;

    /// Send an ephemeral frame to every node's subscribers of `stream`
    /// ([`EventSink::signal`]).
    fn signal<'a>(
        &'a self,
        stream: &'a str,
        from_user: Option<&'a str>,
        json: String,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Whether the broker can serve requests now (`/readyz`).
    fn is_ready(&self) -> bool {
        true
    }

    /// Whether the streams live outside this process (Redis).
    fn remote(&self) -> bool {
        false
    }

    /// Current size.
    fn stats(&self) -> BrokerStats;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame serialized from a copy whose seq was set: what `encode`
    /// must produce without making that copy.
    fn copied(event: &NewEvent, seq: u64) -> String {
        let mut frame = event.frame.clone();
        frame.seq = seq;
        ServerFrame::Event(&frame).to_json()
    }

    #[test]
    fn encode_writes_the_frame_with_the_given_seq() {
        let data =
            serde_json::json!({"text": "é \"quoted\" \\ \u{1F600}", "n": [1, 2.5, null], "seq": 7});
        let mut event = NewEvent::new(
            "agent_thinking".into(),
            Some("t-1".into()),
            Some("r-1".into()),
            data,
            "2026-12-02T06:00:00.000Z".into(),
        );
        for own in [0, 9, 123_456] {
            event.frame.seq = own;
            for seq in [1, 10, 99, 100_000, u64::MAX] {
                let json = event.encode(seq);
                assert_eq!(std::str::from_utf8(&json).unwrap(), copied(&event, seq));
            }
        }
        let bare = NewEvent::new("x".into(), None, None, serde_json::json!({}), "ts".into());
        assert_eq!(&bare.encode(3)[..], copied(&bare, 3).as_bytes());
        assert_eq!(
            bare.frame_tail().as_deref(),
            copied(&bare, 0).strip_prefix("{\"type\":\"event\",\"seq\":0")
        );
    }
}
