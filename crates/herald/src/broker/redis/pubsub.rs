//! The pub/sub connection on a single Redis, and what every pub/sub task
//! does with a message: deliver it, answer a fleet request, resync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{
    COMMAND_TIMEOUT, FleetAnswer, FleetAsk, MAX_RECONNECT_DELAY, Shared, SubCmd, unavailable,
};
use crate::broker::{BrokerError, EventSink, StoredEvent};
use bytes::Bytes;

/// The pub/sub connection: subscribe in order, deliver every message to the
/// hub, reconnect after a drop and resync every stream.
pub(super) async fn pubsub_task(
    shared: Arc<Shared>,
    client: redis::Client,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut delay = Duration::from_millis(50);
    let mut reconnect = false;
    loop {
        let connected = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await;
        let pubsub = match connected.unwrap_or_else(|_| Err(timed_out())) {
            Ok(p) => p,
            Err(e) => {
                shared.pubsub_up.store(false, Ordering::Release);
                refuse_waiting(&mut cmds, &mut wanted, &e.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                reconnect = true;
                continue;
            }
        };
        delay = Duration::from_millis(50);
        let (mut subscriber, mut messages) = pubsub.split();
        let mut channels: Vec<String> = wanted.iter().map(|s| shared.channel(s)).collect();
        channels.push(shared.control_channel());
        channels.push(shared.reply_channel(&shared.node));
        if let Err(e) = subscriber.subscribe(&channels).await {
            tracing::warn!(error = %e, "redis resubscribe failed");
            continue;
        }
        shared.pubsub_up.store(true, Ordering::Release);
        if reconnect {
            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
            tracing::info!(
                streams = wanted.len(),
                "redis pub/sub reconnected; resyncing"
            );
            resync_all(&shared, &sink, &wanted).await;
        }
        reconnect = true;
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(first) = cmd else { return };
                    // Batch whatever else is queued, keeping the order.
                    let mut batch = vec![first];
                    while let Ok(more) = cmds.try_recv() {
                        batch.push(more);
                    }
                    if let Err(e) = apply(&shared, &mut subscriber, &mut wanted, batch).await {
                        tracing::warn!(error = %e, "redis subscribe failed");
                        break;
                    }
                }
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    deliver(&shared, &sink, msg.get_channel_name(), msg.get_payload_bytes());
                }
            }
        }
        shared.pubsub_up.store(false, Ordering::Release);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

pub(super) fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "connect timed out"))
}

/// While the pub/sub connection is down: answer every waiting subscription
/// with `detail` (so hellos fail fast instead of hanging), keeping `wanted`
/// in step with the hub's requests.
pub(super) fn refuse_waiting(
    cmds: &mut mpsc::UnboundedReceiver<SubCmd>,
    wanted: &mut BTreeSet<String>,
    detail: &str,
) {
    tracing::debug!(error = %detail, "redis pub/sub connect failed");
    while let Ok(cmd) = cmds.try_recv() {
        match cmd {
            SubCmd::Subscribe(s, tx) => {
                wanted.insert(s);
                let _ = tx.send(Err(unavailable(detail)));
            }
            SubCmd::Unsubscribe(s) => {
                wanted.remove(&s);
            }
        }
    }
}

/// Apply a batch of subscription changes in order: consecutive subscribes go
/// out as one SUBSCRIBE, and each waiter is answered once it is confirmed.
async fn apply(
    shared: &Shared,
    subscriber: &mut redis::aio::PubSubSink,
    wanted: &mut BTreeSet<String>,
    batch: Vec<SubCmd>,
) -> Result<(), redis::RedisError> {
    let mut pending: Vec<(String, oneshot::Sender<Result<(), BrokerError>>)> = Vec::new();
    let mut result = Ok(());
    for cmd in batch {
        match cmd {
            SubCmd::Subscribe(stream, tx) => {
                if wanted.contains(&stream) && pending.iter().all(|(s, _)| *s != stream) {
                    let _ = tx.send(Ok(()));
                } else {
                    wanted.insert(stream.clone());
                    pending.push((stream, tx));
                }
            }
            SubCmd::Unsubscribe(stream) => {
                result = result.and(flush(shared, subscriber, &mut pending).await);
                if wanted.remove(&stream) && result.is_ok() {
                    result = subscriber.unsubscribe(shared.channel(&stream)).await;
                }
            }
        }
    }
    result.and(flush(shared, subscriber, &mut pending).await)
}

async fn flush(
    shared: &Shared,
    subscriber: &mut redis::aio::PubSubSink,
    pending: &mut Vec<(String, oneshot::Sender<Result<(), BrokerError>>)>,
) -> Result<(), redis::RedisError> {
    if pending.is_empty() {
        return Ok(());
    }
    let channels: Vec<String> = pending.iter().map(|(s, _)| shared.channel(s)).collect();
    let result = subscriber.subscribe(&channels).await;
    for (_, tx) in pending.drain(..) {
        let _ = tx.send(result.as_ref().map(|_| ()).map_err(unavailable));
    }
    result
}

/// Handle one pub/sub message: a stream's event goes to the hub; a fleet
/// request is answered on the asker's reply channel; an answer goes to the
/// request waiting for it.
pub(super) fn deliver(
    shared: &Arc<Shared>,
    sink: &Weak<dyn EventSink>,
    channel: &str,
    payload: &[u8],
) {
    if channel == shared.control_channel() {
        answer(shared, sink, payload);
        return;
    }
    if channel == shared.reply_channel(&shared.node) {
        match serde_json::from_slice::<FleetAnswer>(payload) {
            Ok(a) => {
                if let Some(tx) = shared.pending.lock().get(&a.id) {
                    let _ = tx.send(a.reply);
                }
            }
            Err(e) => tracing::error!(error = %e, "malformed fleet answer"),
        }
        return;
    }
    let Some(stream) = shared.stream_of(channel) else {
        return;
    };
    if let Some(probe) = payload.strip_prefix(b"probe\n") {
        // A subscription probe: ours is answered, another node's ignored.
        let mut parts = probe.splitn(2, |b| *b == b'\n');
        if parts.next() == Some(shared.node.as_bytes())
            && let Some(id) = parts
                .next()
                .and_then(|id| std::str::from_utf8(id).ok()?.parse::<u64>().ok())
            && let Some(tx) = shared.probes.lock().remove(&id)
        {
            let _ = tx.send(());
        }
        return;
    }
    let mut parts = payload.splitn(3, |b| *b == b'\n');
    let (Some(epoch), Some(seq), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        tracing::error!(stream, "malformed message on a herald channel");
        return;
    };
    let (Ok(epoch), Some(seq)) = (
        std::str::from_utf8(epoch),
        std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()),
    ) else {
        tracing::error!(stream, "malformed message on a herald channel");
        return;
    };
    if let Some(sink) = sink.upgrade() {
        let event = StoredEvent::new(seq, Bytes::copy_from_slice(json));
        sink.deliver(stream, epoch, &[event], crate::clock::now());
    }
}

/// Answer a fleet request from the hub and send the answer (off the reader).
fn answer(shared: &Arc<Shared>, sink: &Weak<dyn EventSink>, payload: &[u8]) {
    let ask: FleetAsk = match serde_json::from_slice(payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "malformed fleet request");
            return;
        }
    };
    let Some(sink) = sink.upgrade() else { return };
    let reply = sink.answer(&ask.request);
    let payload = match serde_json::to_string(&FleetAnswer { id: ask.id, reply }) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a fleet answer");
            return;
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let channel = shared.reply_channel(&ask.from);
        if let Err(e) = shared.publish_raw(channel, payload).await {
            tracing::warn!(error = %e, "cannot send a fleet answer");
        }
    });
}

/// After a pub/sub reconnect: tell the hub where every stream is, so its
/// connections read what they missed from the log.
pub(super) async fn resync_all(
    shared: &Shared,
    sink: &Weak<dyn EventSink>,
    wanted: &BTreeSet<String>,
) {
    let mut positions = HashMap::new();
    for stream in wanted {
        match shared.position(stream).await {
            Ok(pos) => {
                positions.insert(stream.clone(), pos);
            }
            Err(e) => tracing::warn!(error = %e, stream = %stream, "resync failed"),
        }
    }
    if let Some(sink) = sink.upgrade() {
        for (stream, pos) in positions {
            metrics::counter!(crate::telemetry::BROKER_CATCH_UPS).increment(1);
            sink.resync(&stream, &pos.epoch, pos.last_seq);
        }
    }
}
