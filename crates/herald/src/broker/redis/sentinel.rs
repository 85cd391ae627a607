//! Redis Sentinel: `redis+sentinel://[user:password@]host:port[,host:port…]/<master>[/<db>]`
//! names the Sentinels to ask and the master set they watch; every
//! connection Herald makes (the command connection, the pub/sub one) asks
//! them where the master is now. The credentials and database are the
//! master's; the Sentinels are asked without them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, RedisConnectionInfo, RedisError, RedisResult};

use super::Shared;

/// The URL scheme of a Sentinel address.
pub const SCHEME: &str = "redis+sentinel://";

/// A parsed Sentinel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SentinelUrl {
    /// `redis://host:port` of each Sentinel.
    pub(super) sentinels: Vec<String>,
    /// The master set's name.
    pub(super) master: String,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

fn invalid(why: &str) -> RedisError {
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "invalid Sentinel URL",
        why.to_owned(),
    ))
}

/// Percent-decoded URL user info (`%40` for `@` in a password).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl SentinelUrl {
    /// Parse `redis+sentinel://[user:password@]h:p[,h:p…]/<master>[/<db>]`.
    pub(super) fn parse(url: &str) -> RedisResult<Self> {
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with redis+sentinel://"))?;
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it names no master set (…/<master>)"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(decode(user)).filter(|u| !u.is_empty()),
                    Some(decode(pass)),
                ),
                None => (Some(decode(u)), None),
            },
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        if sentinels.is_empty() {
            return Err(invalid("it names no Sentinel (host:port)"));
        }
        let (master, db) = match path.split_once('/') {
            Some((m, db)) => (
                m,
                db.parse::<i64>()
                    .map_err(|_| invalid("the database after the master is not a number"))?,
            ),
            None => (path, 0),
        };
        if master.is_empty() {
            return Err(invalid("the master set's name is empty"));
        }
        // Each Sentinel address must be one redis-rs accepts.
        for s in &sentinels {
            redis::Client::open(s.as_str())?;
        }
        Ok(Self {
            sentinels,
            master: master.to_owned(),
            username,
            password,
            db,
        })
    }

    /// A client that asks the Sentinels for the master.
    pub(super) fn client(&self) -> RedisResult<SentinelClient> {
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p);
        }
        SentinelClient::build(
            self.sentinels.clone(),
            self.master.clone(),
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(redis)),
            SentinelServerType::Master,
        )
    }
}

/// Wait between attempts to reach a Sentinel's notices.
const RETRY: Duration = Duration::from_secs(1);

/// Listen to a Sentinel's `+switch-master` notices for this master set and
/// move both connections to the new master at once, rather than writing to
/// a demoted master until the next error (writes it would acknowledge and
/// then lose when it resyncs from the new one). Runs until aborted.
pub(super) async fn follow_switches(shared: Arc<Shared>) {
    let Some(sentinels) = &shared.sentinel else {
        return;
    };
    loop {
        let listened = async {
            let client = sentinels
                .client
                .lock()
                .await
                .async_get_sentinel_client()
                .await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            let mut notices = pubsub.on_message();
            while let Some(msg) = notices.next().await {
                // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                let text: String = msg.get_payload().unwrap_or_default();
                if text.split(' ').next() == Some(sentinels.master.as_str()) {
                    tracing::warn!(notice = %text, "redis sentinel switched the master");
                    metrics::counter!(crate::telemetry::BROKER_RECONNECTS).increment(1);
                    shared.master_switched();
                }
            }
            Ok::<_, RedisError>(())
        };
        if let Err(e) = listened.await {
            tracing::debug!(error = %e, "redis sentinel notices unavailable; retrying");
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_sentinel_url_names_sentinels_master_credentials_and_db() {
        let u =
            SentinelUrl::parse("redis+sentinel://bob:p%40ss@10.0.0.1:26379,10.0.0.2:26380/main/3")
                .unwrap();
        assert_eq!(
            u.sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26380"]
        );
        assert_eq!(u.master, "main");
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.db),
            (Some("bob"), Some("p@ss"), 3)
        );
        let u = SentinelUrl::parse("redis+sentinel://:pw@h:1/m").unwrap();
        assert_eq!(
            (u.username, u.password.as_deref(), u.db),
            (None, Some("pw"), 0)
        );
        for bad in [
            "redis://h:1/m",
            "redis+sentinel://h:1",
            "redis+sentinel:///m",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/m/x",
        ] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
