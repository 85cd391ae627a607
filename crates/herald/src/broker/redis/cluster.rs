//! The pub/sub connection on a Redis Cluster: sharded subscriptions per
//! stream, following slot moves.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};

use super::pubsub::{PING_EVERY, RESYNC_RETRY, deliver, refuse_waiting, resync_all, timed_out};
use super::{COMMAND_TIMEOUT, MAX_RECONNECT_DELAY, RedisNodes, Shared, SubCmd, unavailable};
use crate::broker::EventSink;

/// Attempts to follow a moved slot before the connection is rebuilt.
const FOLLOW_ATTEMPTS: u32 = 8;

/// The pub/sub side on a Redis Cluster: one RESP3 cluster connection whose
/// pushes arrive on a channel. Stream channels are sharded (SSUBSCRIBE on the
/// slot's master); the control and reply channels are ordinary
/// (cluster-wide). A sharded subscription the server drops (its slot moved)
/// is followed to the new master; when that cannot be confirmed, or a
/// connection of the cluster drops, the whole connection is rebuilt: a new
/// one subscribes to everything again and every stream is resynced. redis-rs
/// repairs its cluster connection by itself too, but not always (concurrent
/// slot refreshes can leave it with no connection at all), so Herald trusts
/// only subscriptions it has seen confirmed.
pub(super) async fn cluster_pubsub_task(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let RedisNodes::Cluster(urls) = &shared.nodes else {
        return;
    };
    let (broken_tx, mut broken) = mpsc::unbounded_channel::<()>();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut rebuilt = false;
    // Streams resynced after a rebuild whose position could not be read yet.
    let mut unsynced: BTreeSet<String> = BTreeSet::new();
    loop {
        // A new client each time, so pushes of the old connection (its
        // drops included) do not reach the new one.
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
        let mut conn = connect(&client, &shared, &mut cmds, &mut wanted).await;
        // Followers of the previous connection stop with it.
        let generation = CancellationToken::new();
        shared.pubsub_up.store(true, Ordering::Release);
        if rebuilt {
            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
            tracing::info!(
                streams = wanted.len(),
                "redis cluster pub/sub rebuilt; resyncing"
            );
            unsynced = resync_all(&shared, &sink, &wanted).await;
        } else {
            shared.heartbeat().await;
        }
        rebuilt = true;
        // Reports of the previous connection are stale.
        while broken.try_recv().is_ok() {}
        let mut liveness = tokio::time::interval(PING_EVERY);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RESYNC_RETRY);
        loop {
            tokio::select! {
                _ = retry.tick(), if !unsynced.is_empty() => {
                    unsynced.retain(|s| wanted.contains(s));
                    unsynced = resync_all(&shared, &sink, &unsynced).await;
                }
                _ = liveness.tick() => {
                    // Every master holds sharded subscriptions: each must answer.
                    let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                    let pong = tokio::time::timeout(
                        COMMAND_TIMEOUT,
                        conn.route_command(redis::cmd("PING"), all),
                    )
                    .await;
                    if !matches!(pong, Ok(Ok(_))) {
                        tracing::warn!("a redis cluster pub/sub connection stopped answering; rebuilding");
                        break;
                    }
                }
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
                _ = broken.recv() => break,
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
                            // The server dropped a sharded subscription: its
                            // slot moved to another master.
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
                                let follow = follow_moved_slot(
                                    shared.clone(),
                                    sink.clone(),
                                    conn.clone(),
                                    stream,
                                    broken_tx.clone(),
                                );
                                let generation = generation.clone();
                                tokio::spawn(async move {
                                    tokio::select! {
                                        () = follow => {}
                                        () = generation.cancelled() => {}
                                    }
                                });
                            }
                        }
                        redis::PushKind::Disconnection => {
                            tracing::warn!("a redis cluster pub/sub connection dropped; rebuilding");
                            break;
                        }
                        other => tracing::debug!(kind = ?other, "redis push"),
                    }
                }
            }
        }
        generation.cancel();
        shared.pubsub_up.store(false, Ordering::Release);
    }
}

/// A new cluster connection subscribed to the control and reply channels and
/// to every wanted stream, retried with backoff until it is; subscriptions
/// asked for meanwhile are refused (the hub fails those hellos fast).
async fn connect(
    client: &redis::cluster::ClusterClient,
    shared: &Shared,
    cmds: &mut mpsc::UnboundedReceiver<SubCmd>,
    wanted: &mut BTreeSet<String>,
) -> redis::cluster_async::ClusterConnection {
    let mut delay = Duration::from_millis(50);
    loop {
        let connected = async {
            let mut c = client.get_async_connection().await?;
            c.subscribe(&[shared.control_channel(), shared.reply_channel(&shared.node)])
                .await?;
            for stream in wanted.iter() {
                tokio::time::timeout(COMMAND_TIMEOUT, c.ssubscribe(shared.channel(stream)))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))?;
            }
            Ok::<_, redis::RedisError>(c)
        };
        match connected.await {
            Ok(c) => return c,
            Err(e) => {
                shared.pubsub_up.store(false, Ordering::Release);
                refuse_waiting(cmds, wanted, &e.to_string());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    }
}

/// Resubscribe to `stream`'s sharded channel after its slot moved, until a
/// probe this node publishes on it is received (so the subscription is known
/// to be on the slot's new master), then resync the stream. When that does
/// not happen within a few attempts (about 2 s), the connection is reported
/// `broken` and rebuilt.
async fn follow_moved_slot(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut conn: redis::cluster_async::ClusterConnection,
    stream: String,
    broken: mpsc::UnboundedSender<()>,
) {
    let channel = shared.channel(&stream);
    for attempt in 0..FOLLOW_ATTEMPTS {
        tokio::time::sleep(Duration::from_millis(50) * attempt).await;
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
            if !resync_all(&shared, &sink, &streams).await.is_empty() {
                // The rebuilt connection resyncs every stream (and retries).
                let _ = broken.send(());
            }
            return;
        }
    }
    tracing::warn!(stream = %stream, "could not resubscribe after a slot move; rebuilding");
    let _ = broken.send(());
}
