//! The actor's side of shared streams (issue 39): `subscribe` and
//! `unsubscribe`, and the catch-up of each subscription.
//!
//! A connection reads its user's own stream and up to
//! `max_streams_per_connection` shared ones (`thread:abc`), each with its
//! own epoch, seq, resume position and merge-by-seq in the lifecycle (I3
//! per stream). Who may read or write a shared stream comes from the
//! token's `streams` claim ([`crate::auth::Claims::access`]). A refused
//! subscribe is answered `error {code: forbidden, stream}` whether or not
//! the stream exists, and touches nothing: the user learns nothing of it.

use herald_core::catchup::{HistoryRequest, Plan, decide_join};
use herald_core::protocol::{ServerFrame, Subscribe, codes};

use std::time::Duration;

use super::{Actor, HISTORY_PAGE, frames};
use crate::auth::Access;
use crate::clock;
use crate::connection::SubRefused;
use crate::telemetry;
use crate::wire::OutFrame;

/// A connection relays `typing` to a stream at most once per this.
const TYPING_EVERY: Duration = Duration::from_secs(1);

impl Actor {
    /// What the token grants on `stream`.
    pub(super) fn access(&self, stream: &str) -> Access {
        self.claims
            .as_ref()
            .map_or(Access::None, |c| c.access(stream))
    }

    /// Subscribe to a shared stream the token grants: register the
    /// subscription (its live events are held from here), subscribe the
    /// node, read the stream's position, decide resume or reset, and queue
    /// `subscribed`; the catch-up then replays what the decision needs.
    pub(super) async fn on_subscribe(&mut self, sub: Subscribe) {
        let stream = sub.stream.as_str();
        let mut access = self.access(stream);
        if access == Access::None && self.app.config().subscribe_proxy {
            match self.ask_backend(stream).await {
                Some(granted) => access = granted,
                None => return,
            }
        }
        if access == Access::None {
            metrics::counter!(telemetry::SUBSCRIBES, "outcome" => "forbidden").increment(1);
            self.stream_error(
                stream,
                codes::FORBIDDEN,
                "no such stream, or not yours to read",
            );
            return;
        }
        let max = self.app.config().max_streams_per_connection;
        let id = match self.conn.add_sub(stream, access == Access::Write, max) {
            Ok(id) => id,
            Err(SubRefused::Already) => {
                self.stream_error(stream, codes::INVALID_FIELD, "already subscribed");
                return;
            }
            Err(SubRefused::TooMany) => {
                let message = format!("a connection reads at most {max} shared streams");
                self.stream_error(stream, codes::TOO_MANY_STREAMS, &message);
                return;
            }
            Err(SubRefused::NotReady) => return,
        };
        let hub = self.app.hub().clone();
        let joined = hub.subscribe_shared(stream, &self.conn, id).await;
        let position = match joined {
            Ok(()) => self.app.broker().position(stream).await,
            Err(e) => Err(e),
        };
        let pos = match position {
            Ok(pos) => pos,
            Err(e) => {
                tracing::warn!(error = %e, stream, "broker failed at subscribe");
                self.conn.remove_sub(stream);
                hub.unsubscribe_shared(stream, self.conn.id, id);
                metrics::counter!(telemetry::SUBSCRIBES, "outcome" => "unavailable").increment(1);
                self.stream_error(stream, codes::BROKER_UNAVAILABLE, "try again later");
                return;
            }
        };
        let resume = sub.resume.as_ref().map(|r| (r.epoch.as_str(), r.seq));
        let decision = decide_join(&pos, resume, sub.replay_active_runs);
        if decision.reset && resume.is_some() {
            metrics::counter!(telemetry::RESETS, "cause" => "shared_stream").increment(1);
        }
        let replaying = !matches!(decision.plan, Plan::Live { .. });
        let frame = ServerFrame::Subscribed {
            stream,
            epoch: &pos.epoch,
            seq: pos.last_seq,
            resumed: decision.resumed,
            reset: decision.reset,
            replaying,
            write: access == Access::Write,
        }
        .to_json();
        self.conn.set_sub_epoch(id, &pos.epoch);
        if replaying {
            self.sub_replaying.push(id);
        }
        self.conn.with_core(|c| {
            c.start_subscription(id, OutFrame::from(frame), decision.plan);
        });
        metrics::counter!(telemetry::SUBSCRIBES, "outcome" => "subscribed").increment(1);
        if let Some(user) = self.conn.user() {
            hub.presence_dirty(stream, user);
        }
    }

    /// Relay "typing" to the stream's other members (write permission
    /// needed; at most one relay per [`TYPING_EVERY`] per subscription, the
    /// rest dropped; nothing stored).
    pub(super) async fn on_typing(&mut self, stream: &str) {
        let Some(sub) = self.conn.sub(stream).filter(|s| s.write) else {
            self.stream_error(
                stream,
                codes::FORBIDDEN,
                "subscribe to the stream, with write permission, first",
            );
            return;
        };
        let now = clock::now();
        self.typing_at.retain(|(id, at)| {
            now.saturating_duration_since(*at) < TYPING_EVERY && self.conn.sub_by_id(*id).is_some()
        });
        if self.typing_at.iter().any(|(id, _)| *id == sub.id) {
            metrics::counter!(telemetry::TYPING, "outcome" => "dropped").increment(1);
            return;
        }
        self.typing_at.push((sub.id, now));
        let Some(user) = self.conn.user().map(str::to_owned) else {
            return;
        };
        let frame = ServerFrame::Typing {
            stream,
            user_id: &user,
        }
        .to_json();
        match self.app.broker().signal(stream, Some(&user), frame).await {
            Ok(()) => metrics::counter!(telemetry::TYPING, "outcome" => "relayed").increment(1),
            Err(e) => tracing::debug!(error = %e, "typing not relayed"),
        }
    }

    /// Answer who is in a stream this connection reads.
    pub(super) async fn on_presence(&mut self, stream: &str) {
        if self.conn.sub(stream).is_none() {
            self.stream_error(stream, codes::FORBIDDEN, "subscribe to the stream first");
            return;
        }
        let limit = self.app.config().presence_max_listed;
        match self.app.broker().presence(stream, limit).await {
            Ok(p) => {
                let frame = ServerFrame::Presence {
                    stream,
                    users: &p.users,
                    total_users: p.total_users,
                    total_connections: p.total_connections,
                };
                let _ = self.conn.send(OutFrame::from(frame.to_json()));
            }
            Err(e) => {
                tracing::warn!(error = %e, stream, "presence unavailable");
                self.stream_error(stream, codes::BROKER_UNAVAILABLE, "try again later");
            }
        }
    }

    /// What the backend grants on `stream` (`subscribe_proxy`): its answer
    /// from the cache, or asked now; `None` when it could not be asked
    /// (answered `error {code: backend_unavailable}`).
    async fn ask_backend(&mut self, stream: &str) -> Option<Access> {
        let user = self.conn.user()?.to_owned();
        let hub = self.app.hub().clone();
        let ttl = self.app.config().subscribe_cache_ttl;
        if let Some(access) = hub.cached_grant(stream, &user, ttl) {
            return Some(access);
        }
        match self
            .app
            .inbound()
            .ask_subscribe(&user, stream, &self.conn.id_str)
            .await
        {
            Ok(access) => {
                hub.cache_grant(stream, &user, access);
                Some(access)
            }
            Err(e) => {
                tracing::warn!(error = %e, stream, "subscribe request not answered");
                self.stream_error(
                    stream,
                    "backend_unavailable",
                    "the agent backend did not answer; try again later",
                );
                None
            }
        }
    }

    /// After a `refresh`: each subscription is judged again by the new
    /// token (or, with `subscribe_proxy`, by the backend's answer while it
    /// is kept; without one, it stays).
    /// One no longer granted ends with `unsubscribed {reason: forbidden}`;
    /// one granted read only loses its write permission.
    pub(super) fn recheck_subscriptions(&mut self) {
        let Some(user) = self.conn.user().map(str::to_owned) else {
            return;
        };
        let proxy = self.app.config().subscribe_proxy;
        let ttl = self.app.config().subscribe_cache_ttl;
        let hub = self.app.hub().clone();
        for sub in self.conn.subs() {
            let mut access = self.access(&sub.stream);
            if access == Access::None && proxy {
                // No answer kept: the backend granted it; left as it is.
                match hub.cached_grant(&sub.stream, &user, ttl) {
                    Some(cached) => access = cached,
                    None => continue,
                }
            }
            match access {
                Access::None => {
                    if self.conn.remove_sub(&sub.stream).is_some() {
                        hub.unsubscribe_shared(&sub.stream, self.conn.id, sub.id);
                        self.sub_replaying.retain(|i| *i != sub.id);
                        hub.presence_dirty(&sub.stream, &user);
                        let frame = ServerFrame::Unsubscribed {
                            stream: &sub.stream,
                            reason: "forbidden",
                        };
                        let _ = self.conn.send(OutFrame::from(frame.to_json()));
                    }
                }
                Access::Read => self.conn.set_sub_write(sub.id, false),
                Access::Write => self.conn.set_sub_write(sub.id, true),
            }
        }
    }

    /// Stop reading a shared stream: `unsubscribed {reason: client}`.
    pub(super) fn on_unsubscribe(&mut self, stream: &str) {
        match self.conn.remove_sub(stream) {
            Some(sub) => {
                self.app
                    .hub()
                    .unsubscribe_shared(stream, self.conn.id, sub.id);
                self.sub_replaying.retain(|i| *i != sub.id);
                if let Some(user) = self.conn.user() {
                    self.app.hub().presence_dirty(stream, user);
                }
                let frame = ServerFrame::Unsubscribed {
                    stream,
                    reason: "client",
                };
                let _ = self.conn.send(OutFrame::from(frame.to_json()));
            }
            None => self.stream_error(stream, codes::NOT_SUBSCRIBED, "not subscribed"),
        }
    }

    /// Read what subscription `id`'s catch-up asks for and hand it over; a
    /// gap closes the connection (4001), as for the own stream.
    pub(super) async fn catch_up_sub(&mut self, id: u32, request: HistoryRequest) {
        let Some(sub) = self.conn.sub_by_id(id) else {
            return;
        };
        let Some(epoch) = sub.epoch.clone() else {
            return;
        };
        let broker = self.app.broker();
        let result = match request {
            HistoryRequest::Range { after, until } => {
                match broker
                    .history(&sub.stream, &epoch, after, until, HISTORY_PAGE)
                    .await
                {
                    Ok(page) => {
                        metrics::counter!(telemetry::EVENTS_REPLAYED).increment(page.len() as u64);
                        let page = frames(page);
                        self.conn
                            .with_core(|c| c.push_sub_history(id, page))
                            .map_err(|gap| gap.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            HistoryRequest::Runs { until } => {
                match broker.open_run_events(&sub.stream, &epoch, until).await {
                    Ok(events) => {
                        metrics::counter!(telemetry::EVENTS_REPLAYED)
                            .increment(events.len() as u64);
                        let frames = frames(events).into_iter().map(|(_, _, f)| f);
                        self.conn.with_core(|c| c.push_sub_runs(id, frames));
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        self.sub_caught_up(id, &sub.stream);
        if let Err(e) = result {
            tracing::debug!(error = %e, stream = %sub.stream, "shared stream catch-up failed");
            metrics::counter!(telemetry::RESETS, "cause" => "history_gone").increment(1);
            self.close(
                herald_core::CloseReason::SlowConsumer,
                herald_core::Initiator::Server,
                "history evicted during replay; resume again",
            );
        }
    }

    /// Once subscription `id`'s replay is over, queue its `caught_up`
    /// (under the lock of the push, so no live event of it comes between).
    fn sub_caught_up(&mut self, id: u32, stream: &str) {
        if !self.sub_replaying.contains(&id) {
            return;
        }
        let done = self.conn.with_core(|c| {
            if c.sub_catching_up(id) {
                return false;
            }
            let seq = c.sub_sent_seq(id).unwrap_or(0);
            let frame = ServerFrame::CaughtUp {
                seq,
                stream: Some(stream),
            };
            c.push_catch_up_frame(OutFrame::from(frame.to_json()));
            true
        });
        if done {
            self.sub_replaying.retain(|i| *i != id);
        }
    }

    /// An `error` frame about `stream`.
    pub(super) fn stream_error(&self, stream: &str, code: &str, message: &str) {
        let frame = ServerFrame::StreamError {
            code,
            message,
            stream,
        };
        let _ = self.conn.send(OutFrame::from(frame.to_json()));
    }
}
