//! The pub/sub connection on a Redis Cluster: sharded subscriptions per
//! stream, following slot moves.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use herald_core::backoff::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};

use super::pubsub::{RESYNC_RETRY, deliver, refuse_waiting, resync_all, timed_out};
use super::{RedisNodes, Shared, SubCmd, unavailable};
use crate::broker::EventSink;

/// Attempts to follow a moved slot before the connection is rebuilt.
const FOLLOW_ATTEMPTS: u32 = 8;

/// How long following a moved slot may take, all attempts together, before
/// the connection is rebuilt (a new client reads the slot map afresh).
const FOLLOW_WITHIN: Duration = Duration::from_secs(3);

/// How often every master is asked what this connection holds there
/// (`CLIENT INFO`): an answer proves the path is alive, its `sub`/`ssub`
/// counts that no subscription was lost without a word.
const AUDIT_EVERY: Duration = Duration::from_secs(1);

/// The regular channels this connection always holds: control and replies.
const CHANNELS: usize = 2;

/// The pub/sub side on a Redis Cluster: one RESP3 cluster connection whose
/// pushes arrive on a channel. Stream channels are sharded (SSUBSCRIBE on the
/// slot's master); the control and reply channels are ordinary
/// (cluster-wide). A sharded subscription the server drops (its slot moved)
/// is followed to the new master; when that cannot be confirmed, or a
/// connection of the cluster drops, the whole connection is rebuilt: a new
/// one subscribes to everything again and every stream is resynced. redis-rs
/// repairs its cluster connection by itself too, but not always (concurrent
/// slot refreshes can leave it with no connection at all), so Herald trusts
/// only subscriptions it has seen confirmed, and audits them each second:
/// when the masters report fewer than it holds, twice running (a drop the
/// server announced may still be on its way), the connection is rebuilt.
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
            .connection_timeout(shared.timing.command_timeout)
            .response_timeout(shared.timing.command_timeout)
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
        // Streams of this connection being followed to a new master: not
        // held anywhere until their follower resubscribes.
        let following = Arc::new(AtomicUsize::new(0));
        let mut short = false;
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
        let mut audit = tokio::time::interval(AUDIT_EVERY);
        audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RESYNC_RETRY);
        loop {
            tokio::select! {
                _ = retry.tick(), if !unsynced.is_empty() => {
                    unsynced.retain(|s| wanted.contains(s));
                    unsynced = resync_all(&shared, &sink, &unsynced).await;
                }
                _ = audit.tick() => {
                    // Every master holds sharded subscriptions: each must answer.
                    let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                    let mut client_info = redis::cmd("CLIENT");
                    client_info.arg("INFO");
                    let info = tokio::time::timeout(
                        shared.timing.command_timeout,
                        conn.route_command(client_info, all),
                    )
                    .await;
                    let Ok(Ok(info)) = info else {
                        tracing::warn!("a redis cluster pub/sub connection stopped answering; rebuilding");
                        break;
                    };
                    let expected = Held {
                        channels: CHANNELS,
                        shard: wanted.len().saturating_sub(following.load(Ordering::Acquire)),
                    };
                    let held = Held::of(&info);
                    if held.is_some_and(|h| h.covers(&expected)) {
                        short = false;
                    } else if short {
                        tracing::warn!(?held, ?expected, "redis cluster pub/sub subscriptions lost without notice; rebuilding");
                        break;
                    } else {
                        short = true;
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
                            let Some(stream) = shared.stream_of(&channel).map(std::borrow::Cow::into_owned) else {
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
                                let followed = Following::start(&following);
                                tokio::spawn(async move {
                                    let _followed = followed;
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

/// What a cluster pub/sub connection holds on the masters, summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// Regular channels (`sub`).
    channels: usize,
    /// Sharded channels (`ssub`).
    shard: usize,
}

impl Held {
    /// The sums of `sub` and `ssub` over a `CLIENT INFO` answered by each
    /// master (a map of node to its line); `None` when a master answered
    /// with an error or something that is not a client line.
    fn of(info: &redis::Value) -> Option<Held> {
        let redis::Value::Map(nodes) = info else {
            return None;
        };
        let mut held = Held {
            channels: 0,
            shard: 0,
        };
        for (_, line) in nodes {
            let line = redis::from_redis_value_ref::<String>(line).ok()?;
            let field = |name: &str| {
                line.split_ascii_whitespace().find_map(|f| {
                    f.strip_prefix(name)?
                        .strip_prefix('=')?
                        .parse::<usize>()
                        .ok()
                })
            };
            held.channels += field("sub")?;
            held.shard += field("ssub")?;
        }
        Some(held)
    }

    /// Holds at least what `expected` says (more is harmless: a channel
    /// resubscribed on a second node, an unsubscribe still on its way).
    fn covers(&self, expected: &Held) -> bool {
        self.channels >= expected.channels && self.shard >= expected.shard
    }
}

/// One stream being followed to its slot's new master, counted while its
/// follower runs (cancelled or not).
struct Following(Arc<AtomicUsize>);

impl Following {
    fn start(count: &Arc<AtomicUsize>) -> Following {
        count.fetch_add(1, Ordering::AcqRel);
        Following(count.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
    let mut backoff = Backoff::new(shared.timing.reconnect_base, shared.timing.reconnect_max);
    loop {
        let connected = async {
            let mut c = client.get_async_connection().await?;
            c.subscribe(&[shared.control_channel(), shared.reply_channel(&shared.node)])
                .await?;
            for stream in wanted.iter() {
                tokio::time::timeout(
                    shared.timing.command_timeout,
                    c.ssubscribe(shared.channel(stream)),
                )
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
                shared.back_off(&mut backoff).await;
            }
        }
    }
}

/// Resubscribe to `stream`'s sharded channel after its slot moved, until a
/// probe this node publishes on it is received (so the subscription is known
/// to be on the slot's new master), then resync the stream. When that does
/// not happen within [`FOLLOW_ATTEMPTS`] attempts and [`FOLLOW_WITHIN`], the
/// connection is reported `broken` and rebuilt.
async fn follow_moved_slot(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut conn: redis::cluster_async::ClusterConnection,
    stream: String,
    broken: mpsc::UnboundedSender<()>,
) {
    shared.slot_follows.fetch_add(1, Ordering::Relaxed);
    let channel = shared.channel(&stream);
    let deadline = tokio::time::Instant::now() + FOLLOW_WITHIN;
    let within = |limit: Duration| (tokio::time::Instant::now() + limit).min(deadline);
    for attempt in 0..FOLLOW_ATTEMPTS {
        tokio::time::sleep_until(within(Duration::from_millis(50) * attempt)).await;
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        match tokio::time::timeout_at(
            within(shared.timing.command_timeout),
            conn.ssubscribe(&channel),
        )
        .await
        {
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
        let heard = matches!(
            tokio::time::timeout_at(within(shared.timing.command_timeout), sent).await,
            Ok(Ok(_))
        ) && tokio::time::timeout_at(within(Duration::from_millis(500)), rx)
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

#[cfg(test)]
mod tests {
    //! The audit's reading of `CLIENT INFO`, without a cluster.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use redis::Value;

    fn line(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn nodes(lines: Vec<Value>) -> Value {
        Value::Map(
            lines
                .into_iter()
                .enumerate()
                .map(|(i, l)| (line(&format!("127.0.0.1:{}", 7000 + i)), l))
                .collect(),
        )
    }

    #[test]
    fn the_masters_counts_are_summed() {
        let info = nodes(vec![
            line("id=3 addr=127.0.0.1:1 flags=P db=0 sub=2 psub=0 ssub=1 multi=-1"),
            line("id=9 addr=127.0.0.1:2 flags=P db=0 sub=0 psub=5 ssub=3 multi=-1"),
            Value::VerbatimString {
                format: redis::VerbatimFormat::Text,
                text: "id=4 sub=1 psub=0 ssub=0\n".into(),
            },
        ]);
        assert_eq!(
            Held::of(&info),
            Some(Held {
                channels: 3,
                shard: 4
            })
        );
    }

    #[test]
    fn an_error_or_a_line_without_counts_reads_as_nothing() {
        let err = redis::parse_redis_value(b"-LOADING Redis is loading the dataset\r\n").unwrap();
        assert!(matches!(err, Value::ServerError(_)));
        assert_eq!(Held::of(&nodes(vec![line("sub=1 ssub=1"), err])), None);
        assert_eq!(Held::of(&nodes(vec![line("id=3 sub=1 psub=0")])), None);
        assert_eq!(Held::of(&line("sub=1 ssub=1")), None);
    }

    #[test]
    fn fewer_held_than_expected_is_short_and_more_is_not() {
        let expected = Held {
            channels: 2,
            shard: 3,
        };
        let held = |channels, shard| Held { channels, shard };
        assert!(held(2, 3).covers(&expected));
        assert!(held(4, 5).covers(&expected));
        assert!(!held(1, 3).covers(&expected));
        assert!(!held(2, 2).covers(&expected));
    }
}
