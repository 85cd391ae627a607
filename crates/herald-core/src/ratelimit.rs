//! Inbound rate limiting: a token bucket per connection, with strikes for
//! sustained abuse.

use std::time::{Duration, Instant};

/// Token bucket settings.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Frames per second refilled.
    pub per_second: f64,
    /// Bucket size (largest burst).
    pub burst: f64,
    /// Frames rejected within one `strike_window` that close the connection (1008).
    pub max_strikes: u32,
    /// Window over which rejected frames are counted.
    pub strike_window: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 10.0,
            burst: 20.0,
            max_strikes: 50,
            strike_window: Duration::from_secs(10),
        }
    }
}

/// What to do with one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Process it.
    Allow,
    /// Drop it; `notify` is true for the first rejection of a burst (answer
    /// `error {code:"rate_limited"}` once, not once per dropped frame).
    Reject {
        /// Whether to tell the client.
        notify: bool,
    },
    /// Sustained abuse: close with 1008.
    Close,
}

/// The bucket of one connection.
#[derive(Debug, Clone)]
pub struct Bucket {
    cfg: RateLimit,
    tokens: f64,
    last: Instant,
    strikes: u32,
    strikes_since: Instant,
    notified: bool,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(cfg: RateLimit, now: Instant) -> Self {
        Self {
            tokens: cfg.burst,
            cfg,
            last: now,
            strikes: 0,
            strikes_since: now,
            notified: false,
        }
    }

    /// Account for one inbound frame at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.cfg.per_second).min(self.cfg.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.notified = false;
            return Verdict::Allow;
        }
        if now.saturating_duration_since(self.strikes_since) > self.cfg.strike_window {
            self.strikes = 0;
            self.strikes_since = now;
        }
        self.strikes += 1;
        if self.strikes >= self.cfg.max_strikes {
            return Verdict::Close;
        }
        let notify = !self.notified;
        self.notified = true;
        Verdict::Reject { notify }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_then_close_on_sustained_abuse() {
        let t0 = Instant::now();
        let cfg = RateLimit {
            per_second: 10.0,
            burst: 3.0,
            max_strikes: 4,
            strike_window: Duration::from_secs(10),
        };
        let mut b = Bucket::new(cfg, t0);
        for _ in 0..3 {
            assert_eq!(b.check(t0), Verdict::Allow);
        }
        assert_eq!(b.check(t0), Verdict::Reject { notify: true });
        assert_eq!(b.check(t0), Verdict::Reject { notify: false });
        // 100 ms refills one token.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.check(t1), Verdict::Allow);
        assert_eq!(b.check(t1), Verdict::Reject { notify: true });
        assert_eq!(b.check(t1), Verdict::Close);
    }

    /// One token, three strikes within a second.
    fn one_token_bucket(per_second: f64, now: Instant) -> Bucket {
        let cfg = RateLimit {
            per_second,
            burst: 1.0,
            max_strikes: 3,
            strike_window: Duration::from_secs(1),
        };
        Bucket::new(cfg, now)
    }

    #[test]
    fn strikes_expire() {
        let t0 = Instant::now();
        let mut b = one_token_bucket(1.0, t0);
        assert_eq!(b.check(t0), Verdict::Allow);
        assert_eq!(b.check(t0), Verdict::Reject { notify: true });
        assert_eq!(b.check(t0), Verdict::Reject { notify: false });
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(b.check(t1), Verdict::Allow);
        assert!(matches!(b.check(t1), Verdict::Reject { .. }));
    }

    /// Mutation testing (issue 17): a strike exactly one window after the
    /// first still counts (the window is inclusive).
    #[test]
    fn strikes_at_the_window_edge_still_count() {
        let t0 = Instant::now();
        // The strikes_expire bucket, refilling too slowly to matter here.
        let mut b = one_token_bucket(0.0001, t0);
        assert_eq!(b.check(t0), Verdict::Allow);
        assert_eq!(b.check(t0), Verdict::Reject { notify: true });
        let edge = t0 + Duration::from_secs(1);
        assert_eq!(b.check(edge), Verdict::Reject { notify: false });
        assert_eq!(b.check(edge), Verdict::Close);
    }
}
