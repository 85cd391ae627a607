//! The pub/sub connection on a single Redis, and what every pub/sub task
//! does with a message: deliver it, answer a fleet request, resync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::backoff::Backoff;
use tokio::sync::{mpsc, oneshot};

use super::{FleetAnswer, FleetAsk, Shared, SubCmd, unavailable};
use crate::broker::{BrokerError, EventSink, StoredEvent};
use bytes::Bytes;

/// How soon a resync that could not read a stream's position is retried.
pub(super) const RESYNC_RETRY: Duration = Duration::from_secs(1);

/// How long resubscribing to every wanted stream at once may take (one
/// SUBSCRIBE with a channel per stream; tens of thousands on a busy node).
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pub/sub connection: subscribe in order, deliver every message to the
/// hub, reconnect after a drop and resync every stream.
pub(super) async fn pubsub_task(
    shared: Arc<Shared>,
    sink: Weak<dyn EventSink>,
    mut cmds: mpsc::UnboundedReceiver<SubCmd>,
) {
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let timing = shared.timing;
    let mut backoff = Backoff::new(timing.reconnect_base, timing.reconnect_max);
    let mut reconnect = false;
    // Streams resynced after a reconnect whose position could not be read yet.
    let mut unsynced: BTreeSet<String> = BTreeSet::new();
    loop {
        // Connected means subscribed to everything wanted: a refused
        // SUBSCRIBE (an ACL without channel rights) backs off like a
        // refused connection.
        let connected = async {
            // Dialled anew each time: with Sentinel, the master may have moved.
            let pubsub = tokio::time::timeout(timing.command_timeout, async {
                shared.dial().await?.get_async_pubsub().await
            })
            .await
            .unwrap_or_else(|_| Err(timed_out()))?;
            let (mut subscriber, messages) = pubsub.split();
            let mut channels: Vec<String> = wanted.iter().map(|s| shared.channel(s)).collect();
            channels.push(shared.control_channel());
            channels.push(shared.reply_channel(&shared.node));
            tokio::time::timeout(RESUBSCRIBE_TIMEOUT, subscriber.subscribe(&channels))
                .await
                .unwrap_or_else(|_| Err(timed_out()))?;
            Ok::<_, redis::RedisError>((subscriber, messages))
        };
        let (mut subscriber, mut messages) = match connected.await {
            Ok(c) => c,
            Err(e) => {
                shared.pubsub_up.store(false, Ordering::Release);
                tracing::warn!(error = %e, "redis pub/sub (re)subscribe failed");
                refuse_waiting(&mut cmds, &mut wanted, &e.to_string());
                shared.back_off(&mut backoff).await;
                reconnect = true;
                continue;
            }
        };
        backoff.succeeded();
        shared.pubsub_up.store(true, Ordering::Release);
        if reconnect {
            metrics::counter!(crate::telemetry::BROKER_PUBSUB_RECONNECTS).increment(1);
            tracing::info!(
                streams = wanted.len(),
                "redis pub/sub reconnected; resyncing"
            );
            unsynced = resync_all(&shared, &sink, &wanted).await;
        }
        reconnect = true;
        let mut liveness = tokio::time::interval(timing.ping_every);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RESYNC_RETRY);
        loop {
            tokio::select! {
                _ = retry.tick(), if !unsynced.is_empty() => {
                    unsynced.retain(|s| wanted.contains(s));
                    unsynced = resync_all(&shared, &sink, &unsynced).await;
                }
                _ = shared.master_switch() => {
                    tracing::warn!("redis sentinel switched the master; redialling pub/sub");
                    break;
                }
                _ = liveness.tick() => {
                    // A half-open connection delivers nothing and reports
                    // nothing: only a command it does not answer shows it.
                    let pong = tokio::time::timeout(timing.command_timeout, subscriber.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        tracing::warn!("redis pub/sub connection stopped answering");
                        break;
                    }
                }
                cmd = cmds.recv() => {
                    let Some(first) = cmd else { return };
                    // Batch whatever else is queued, keeping the order.
                    let mut batch = vec![first];
                    while let Ok(more) = cmds.try_recv() {
                        batch.push(more);
                    }
                    // Bounded (by what a hello waits for its subscription):
                    // a SUBSCRIBE on a half-open connection would otherwise
                    // hold this task, and its PING, for good.
                    let applied = tokio::time::timeout(
                        timing.subscribe_timeout,
                        apply(&shared, &mut subscriber, &mut wanted, batch),
                    )
                    .await
                    .unwrap_or_else(|_| Err(timed_out()));
                    if let Err(e) = applied {
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

/// A waiter for a subscription's confirmation.
type Waiter = oneshot::Sender<Result<(), BrokerError>>;

/// One step of applying a batch of subscription changes.
#[derive(Debug)]
enum Step {
    /// The stream's channel is already subscribed (and confirmed): answer now.
    Confirmed(Waiter),
    /// One SUBSCRIBE for these streams; each waiter is answered with its result.
    Subscribe(Vec<(String, Waiter)>),
    /// UNSUBSCRIBE the stream's channel.
    Unsubscribe(String),
}

/// What a batch of subscription changes takes, in order, given what is
/// subscribed (`wanted`, updated): consecutive subscribes go out as one
/// SUBSCRIBE, a stream already subscribed is confirmed at once, unless its
/// SUBSCRIBE is in this batch and not yet confirmed (then its waiter waits
/// for that), and an unsubscribe first sends the subscribes before it.
fn plan(wanted: &mut BTreeSet<String>, batch: Vec<SubCmd>) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut pending: Vec<(String, Waiter)> = Vec::new();
    for cmd in batch {
        match cmd {
            SubCmd::Subscribe(stream, tx) => {
                if wanted.contains(&stream) && pending.iter().all(|(s, _)| *s != stream) {
                    steps.push(Step::Confirmed(tx));
                } else {
                    wanted.insert(stream.clone());
                    pending.push((stream, tx));
                }
            }
            SubCmd::Unsubscribe(stream) => {
                if !pending.is_empty() {
                    steps.push(Step::Subscribe(std::mem::take(&mut pending)));
                }
                if wanted.remove(&stream) {
                    steps.push(Step::Unsubscribe(stream));
                }
            }
        }
    }
    if !pending.is_empty() {
        steps.push(Step::Subscribe(pending));
    }
    steps
}

/// Apply a batch of subscription changes (see [`plan`]); after a failed
/// command the connection is rebuilt, so no UNSUBSCRIBE is sent after one.
async fn apply(
    shared: &Shared,
    subscriber: &mut redis::aio::PubSubSink,
    wanted: &mut BTreeSet<String>,
    batch: Vec<SubCmd>,
) -> Result<(), redis::RedisError> {
    let mut result = Ok(());
    for step in plan(wanted, batch) {
        match step {
            Step::Confirmed(tx) => {
                let _ = tx.send(Ok(()));
            }
            Step::Subscribe(waiters) => {
                let channels: Vec<String> =
                    waiters.iter().map(|(s, _)| shared.channel(s)).collect();
                let done = subscriber.subscribe(&channels).await;
                for (_, tx) in waiters {
                    let _ = tx.send(done.as_ref().map(|_| ()).map_err(unavailable));
                }
                result = result.and(done);
            }
            Step::Unsubscribe(stream) if result.is_ok() => {
                result = subscriber.unsubscribe(shared.channel(&stream)).await;
            }
            Step::Unsubscribe(_) => {}
        }
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
    let stream = stream.as_ref();
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
    if let Some(signal) = payload.strip_prefix(b"signal\n") {
        // An ephemeral frame (presence, typing): `<from user>\n<json>`.
        let mut parts = signal.splitn(2, |b| *b == b'\n');
        if let (Some(from), Some(json)) = (parts.next(), parts.next())
            && let (Ok(from), Ok(json)) = (std::str::from_utf8(from), std::str::from_utf8(json))
            && let Some(sink) = sink.upgrade()
        {
            sink.signal(stream, (!from.is_empty()).then_some(from), json);
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
/// connections read what they missed from the log. Returns the streams whose
/// position could not be read, for the caller to retry: until then their
/// connections would not know they missed anything.
pub(super) async fn resync_all(
    shared: &Shared,
    sink: &Weak<dyn EventSink>,
    wanted: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut positions = HashMap::new();
    let mut failed = BTreeSet::new();
    for stream in wanted {
        match shared.position(stream).await {
            Ok(pos) => {
                positions.insert(stream.clone(), pos);
            }
            Err(e) => {
                tracing::warn!(error = %e, stream = %stream, "resync failed; retrying");
                failed.insert(stream.clone());
            }
        }
    }
    if let Some(sink) = sink.upgrade() {
        for (stream, pos) in positions {
            metrics::counter!(crate::telemetry::BROKER_CATCH_UPS).increment(1);
            sink.resync(&stream, &pos.epoch, pos.last_seq);
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    //! What a pub/sub message turns into, without a Redis: the parsing and
    //! routing in `deliver` and the waiting-subscription refusal are pure.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex as StdMutex;
    use std::time::Instant;

    use herald_core::stream::StreamLimits;

    use super::*;
    use crate::broker::{FleetReply, FleetRequest};

    /// One delivered event: stream, epoch, from, seq, JSON.
    type Delivered = (String, String, u64, u64, Vec<u8>);

    /// Records what the pub/sub side hands the hub.
    #[derive(Debug, Default)]
    struct Recorder {
        delivered: StdMutex<Vec<Delivered>>,
        asked: StdMutex<Vec<String>>,
    }

    impl EventSink for Recorder {
        fn deliver(&self, stream: &str, epoch: &str, events: &[StoredEvent], _: Instant) -> usize {
            let mut d = self.delivered.lock().unwrap();
            for e in events {
                d.push((stream.into(), epoch.into(), e.from, e.seq, e.json.to_vec()));
            }
            events.len()
        }
        // Only `resync_all` calls it, after a reconnect (the Redis suites).
        fn resync(&self, _: &str, _: &str, _: u64) {}
        fn answer(&self, request: &FleetRequest) -> FleetReply {
            self.asked.lock().unwrap().push(format!("{request:?}"));
            FleetReply {
                closed: 3,
                ..FleetReply::default()
            }
        }
    }

    fn shared() -> Arc<Shared> {
        Shared::unconnected("n1", StreamLimits::default())
    }

    fn sink(r: &Arc<Recorder>) -> Weak<dyn EventSink> {
        let s: Arc<dyn EventSink> = r.clone();
        Arc::downgrade(&s)
    }

    #[test]
    fn a_stream_message_reaches_the_hub_with_its_epoch_seq_and_json() {
        let (sh, rec) = (shared(), Arc::new(Recorder::default()));
        let ch = sh.channel("user:ann");
        // The JSON may itself hold newlines: only the first two split.
        deliver(&sh, &sink(&rec), &ch, b"ep1\n42\n{\"a\":\n1}");
        assert_eq!(
            *rec.delivered.lock().unwrap(),
            vec![(
                "user:ann".to_owned(),
                "ep1".to_owned(),
                42,
                42,
                b"{\"a\":\n1}".to_vec()
            )]
        );
    }

    #[test]
    fn malformed_and_foreign_messages_reach_nobody() {
        let (sh, rec) = (shared(), Arc::new(Recorder::default()));
        let ch = sh.channel("user:ann");
        for bad in [
            &b"ep1\n42"[..],
            b"ep1",
            b"ep1\nx42\n{}",
            b"ep1\n\n{}",
            b"\xff\n1\n{}",
        ] {
            deliver(&sh, &sink(&rec), &ch, bad);
        }
        // Not a herald channel of this prefix.
        deliver(&sh, &sink(&rec), "other:{user:ann}:ch", b"ep1\n1\n{}");
        deliver(&sh, &sink(&rec), "hx:{user:ann}:log", b"ep1\n1\n{}");
        assert!(rec.delivered.lock().unwrap().is_empty());
    }

    #[test]
    fn a_probe_answers_only_this_nodes_waiter_and_is_not_an_event() {
        let (sh, rec) = (shared(), Arc::new(Recorder::default()));
        let ch = sh.channel("user:ann");
        let (mine, mut mine_rx) = oneshot::channel();
        let (other, mut other_rx) = oneshot::channel();
        sh.probes.lock().insert(7, mine);
        sh.probes.lock().insert(8, other);
        // Another node's probe with id 8 and a malformed one change nothing.
        deliver(&sh, &sink(&rec), &ch, b"probe\nn2\n8");
        deliver(&sh, &sink(&rec), &ch, b"probe\nn1\nx");
        assert!(other_rx.try_recv().is_err());
        assert_eq!(sh.probes.lock().len(), 2);
        deliver(&sh, &sink(&rec), &ch, b"probe\nn1\n7");
        assert_eq!(mine_rx.try_recv(), Ok(()));
        assert!(sh.probes.lock().contains_key(&8));
        assert_eq!(sh.probes.lock().len(), 1);
        assert!(rec.delivered.lock().unwrap().is_empty());
    }

    #[test]
    fn a_fleet_answer_goes_to_its_request_and_is_not_an_event() {
        let (sh, rec) = (shared(), Arc::new(Recorder::default()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        sh.pending.lock().insert(5, tx);
        let answer = |id: u64| {
            serde_json::to_vec(&FleetAnswer {
                id,
                reply: FleetReply {
                    closed: id as usize,
                    ..FleetReply::default()
                },
            })
            .unwrap()
        };
        // To another node, or for another request: not ours.
        deliver(&sh, &sink(&rec), &sh.reply_channel("n2"), &answer(5));
        deliver(&sh, &sink(&rec), &sh.reply_channel("n1"), &answer(6));
        deliver(&sh, &sink(&rec), &sh.reply_channel("n1"), b"not json");
        assert!(rx.try_recv().is_err());
        deliver(&sh, &sink(&rec), &sh.reply_channel("n1"), &answer(5));
        assert_eq!(rx.try_recv().map(|r| r.closed), Ok(5));
        assert!(rec.delivered.lock().unwrap().is_empty());
        assert!(rec.asked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_fleet_request_is_answered_by_the_hub() {
        let (sh, rec) = (shared(), Arc::new(Recorder::default()));
        let ask = serde_json::to_vec(&FleetAsk {
            id: 1,
            from: "n2".into(),
            request: FleetRequest::Kick {
                stream: "user:ann".into(),
            },
        })
        .unwrap();
        deliver(&sh, &sink(&rec), &sh.control_channel(), b"{");
        assert!(rec.asked.lock().unwrap().is_empty());
        deliver(&sh, &sink(&rec), &sh.control_channel(), &ask);
        assert_eq!(rec.asked.lock().unwrap().len(), 1);
        assert!(rec.asked.lock().unwrap()[0].contains("user:ann"));
        assert!(rec.delivered.lock().unwrap().is_empty());
    }

    #[test]
    fn while_down_waiting_subscriptions_are_refused_and_wanted_follows_the_hub() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (a_tx, mut a_rx) = oneshot::channel();
        let (b_tx, mut b_rx) = oneshot::channel();
        tx.send(SubCmd::Subscribe("a".into(), a_tx)).unwrap();
        tx.send(SubCmd::Subscribe("b".into(), b_tx)).unwrap();
        tx.send(SubCmd::Unsubscribe("a".into())).unwrap();
        let mut wanted = BTreeSet::from(["c".to_owned()]);
        refuse_waiting(&mut rx, &mut wanted, "down");
        assert!(matches!(
            a_rx.try_recv(),
            Ok(Err(BrokerError::Unavailable(_)))
        ));
        assert!(matches!(
            b_rx.try_recv(),
            Ok(Err(BrokerError::Unavailable(_)))
        ));
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            ["b".to_owned(), "c".to_owned()]
        );
        assert!(rx.try_recv().is_err());
    }

    fn sub(stream: &str) -> (SubCmd, oneshot::Receiver<Result<(), BrokerError>>) {
        let (tx, rx) = oneshot::channel();
        (SubCmd::Subscribe(stream.into(), tx), rx)
    }

    fn shape(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::Confirmed(_) => "confirmed".to_owned(),
                Step::Subscribe(w) => {
                    let streams: Vec<&str> = w.iter().map(|(s, _)| s.as_str()).collect();
                    format!("subscribe {}", streams.join(" "))
                }
                Step::Unsubscribe(s) => format!("unsubscribe {s}"),
            })
            .collect()
    }

    #[test]
    fn a_batch_subscribes_once_and_confirms_only_what_redis_confirmed() {
        // `a` is subscribed; `b` is new and asked for twice in the batch.
        let mut wanted = BTreeSet::from(["a".to_owned()]);
        let (b1, _b1) = sub("b");
        let (a, mut a_rx) = sub("a");
        let (b2, mut b2_rx) = sub("b");
        let (c, _c) = sub("c");
        let steps = plan(&mut wanted, vec![b1, a, b2, c]);
        assert_eq!(shape(&steps), ["confirmed", "subscribe b b c"]);
        for step in steps {
            if let Step::Confirmed(tx) = step {
                tx.send(Ok(())).unwrap();
            }
        }
        // The second `b` waits for b's SUBSCRIBE, like the first.
        assert!(matches!(a_rx.try_recv(), Ok(Ok(()))));
        assert!(b2_rx.try_recv().is_err());
        assert_eq!(wanted, BTreeSet::from(["a", "b", "c"].map(String::from)));
    }

    #[test]
    fn an_unsubscribe_sends_the_subscribes_before_it_and_only_for_a_wanted_stream() {
        let mut wanted = BTreeSet::from(["old".to_owned()]);
        let (x1, _x1) = sub("x");
        let (x2, _x2) = sub("x");
        let batch = vec![
            x1,
            SubCmd::Unsubscribe("x".into()),
            x2,
            SubCmd::Unsubscribe("never".into()),
            SubCmd::Unsubscribe("old".into()),
        ];
        let steps = plan(&mut wanted, batch);
        assert_eq!(
            shape(&steps),
            [
                "subscribe x",
                "unsubscribe x",
                "subscribe x",
                "unsubscribe old"
            ]
        );
        assert_eq!(wanted, BTreeSet::from(["x".to_owned()]));
        assert!(plan(&mut wanted, Vec::new()).is_empty());
    }
}
