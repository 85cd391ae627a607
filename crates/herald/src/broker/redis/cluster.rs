//! The pub/sub connection on a Redis Cluster: sharded subscriptions per
//! stream, following slot moves.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::pubsub::{deliver, refuse_waiting, resync_all, timed_out};
use super::{COMMAND_TIMEOUT, MAX_RECONNECT_DELAY, RedisNodes, Shared, SubCmd, unavailable};
use crate::broker::EventSink;

/// The pub/sub side on a Redis Cluster: one RESP3 cluster connection whose
/// pushes arrive on a channel. Stream channels are sharded (SSUBSCRIBE on the
/// slot's master; redis-rs resubscribes after reconnects and slot moves); the
/// control and reply channels are ordinary (cluster-wide). A disconnection
/// push resyncs every stream, once right after and once a little later.
pub(super) async fn cluster_pubsub_task(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let RedisNodes::Cluster(urls) = &shared.nodes else {
        return;
    };
    let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
    let client = match redis::cluster::ClusterClientBuilder::new(urls.clone())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(push_tx)
        .connection_timeout(COMMAND_TIMEOUT)
        .response_timeout(COMMAND_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "redis cluster client");
            return;
        }
    };
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut delay = Duration::from_millis(50);
    let mut conn = loop {
        let connected = async {
            let mut c = client.get_async_connection().await?;
            c.subscribe(&[shared.control_channel(), shared.reply_channel(&shared.node)])
                .await?;
            Ok::<_, redis::RedisError>(c)
        };
        let connected = tokio::time::timeout(COMMAND_TIMEOUT * 2, connected).await;
        match connected.unwrap_or_else(|_| Err(timed_out())) {
            Ok(c) => break c,
            Err(e) => {
                refuse_waiting(&mut cmds, &mut wanted, &e.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    };
    shared.heartbeat().await;
    for stream in &wanted {
        if let Err(e) = conn.ssubscribe(shared.channel(stream)).await {
            tracing::warn!(error = %e, "redis ssubscribe failed");
        }
    }
    shared.pubsub_up.store(true, Ordering::Release);
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(SubCmd::Subscribe(stream, tx)) => {
                    if wanted.contains(&stream) {
                        let _ = tx.send(Ok(()));
                        continue;
                    }
                    // One slot per channel: sharded subscriptions go one by one.
                    let done = conn.ssubscribe(shared.channel(&stream)).await;
                    if done.is_ok() {
                        wanted.insert(stream);
                    }
                    let _ = tx.send(done.map_err(unavailable));
                }
                Some(SubCmd::Unsubscribe(stream)) => {
                    if wanted.remove(&stream)
                        && let Err(e) = conn.sunsubscribe(shared.channel(&stream)).await
                    {
                        tracing::warn!(error = %e, "redis sunsubscribe failed");
                    }
                }
            },
            push = pushes.recv() => {
                let Some(push) = push else { return };
                match push.kind {
                    redis::PushKind::Message | redis::PushKind::SMessage => {
                        let mut data = push.data.into_iter();
                        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                            continue;
                        };
                        let (Ok(channel), Ok(payload)) = (
                            redis::from_redis_value::<String>(channel),
                            redis::from_redis_value::<Vec<u8>>(payload),
                        ) else {
                            continue;
                        };
                        deliver(&shared, &sink, &channel, &payload);
                    }
                    redis::PushKind::SUnsubscribe => {
                        // The server dropped a sharded subscription: its slot
                        // moved to another master. Subscribe again until a
                        // probe published on the channel comes back, then
                        // catch up what was published meanwhile.
                        let Some(channel) = push
                            .data
                            .into_iter()
                            .next()
                            .and_then(|c| redis::from_redis_value::<String>(c).ok())
                        else {
                            continue;
                        };
                        let Some(stream) = shared.stream_of(&channel).map(str::to_owned) else {
                            continue;
                        };
                        tracing::debug!(stream = %stream, "sharded subscription dropped by the server");
                        if wanted.contains(&stream) {
                            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
                            tokio::spawn(follow_moved_slot(
                                shared.clone(),
                                sink.clone(),
                                conn.clone(),
                                stream,
                            ));
                        }
                    }
                    redis::PushKind::Disconnection => {
                        metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
                        tracing::warn!("a redis cluster pub/sub connection dropped; resyncing");
                        let (shared, sink, streams) = (shared.clone(), sink.clone(), wanted.clone());
                        tokio::spawn(async move {
                            for wait in [Duration::from_millis(500), Duration::from_secs(2)] {
                                tokio::time::sleep(wait).await;
                                resync_all(&shared, &sink, &streams).await;
                            }
                        });
                    }
                    other => tracing::debug!(kind = ?other, "redis push"),
                }
            }
        }
    }
}

/// Resubscribe to `stream`'s sharded channel after its slot moved, until a
/// probe this node publishes on it is received (so the subscription is known
/// to be on the slot's new master), then resync the stream.
async fn follow_moved_slot(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut conn: redis::cluster_async::ClusterConnection,
    stream: String,
) {
    let channel = shared.channel(&stream);
    for attempt in 0..40u32 {
        tokio::time::sleep(Duration::from_millis(50) * attempt.min(10)).await;
        match tokio::time::timeout(COMMAND_TIMEOUT, conn.ssubscribe(&channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, attempt, "resubscribing a moved slot");
                continue;
            }
            Err(_) => {
                tracing::debug!(attempt, "resubscribing a moved slot timed out");
                continue;
            }
        }
        let (tx, rx) = oneshot::channel();
        let probe = shared.next_request.fetch_add(1, Ordering::Relaxed);
        shared.probes.lock().insert(probe, tx);
        let sent = async {
            let mut cmd_conn = shared.conn().await?;
            redis::cmd("SPUBLISH")
                .arg(&channel)
                .arg(format!("probe\n{}\n{probe}", shared.node))
                .query_async::<usize>(&mut cmd_conn)
                .await
                .map_err(unavailable)
        };
        let heard = sent.await.is_ok()
            && tokio::time::timeout(Duration::from_millis(500), rx)
                .await
                .is_ok();
        shared.probes.lock().remove(&probe);
        if heard {
            tracing::debug!(stream = %stream, attempt, "resubscribed after a slot move");
            let streams = BTreeSet::from([stream]);
            resync_all(&shared, &sink, &streams).await;
            return;
        }
    }
    tracing::error!(stream = %stream, "could not resubscribe after a slot move");
}
