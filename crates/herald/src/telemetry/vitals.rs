//! This node's vital signs for the admin page: a sample of its connections
//! and delivery rate every [`SAMPLE_EVERY`] for the last [`KEPT`] samples
//! (five minutes), and the publish→write p99 over the last [`P99_WINDOW`]
//! samples. The sweeper feeds it; the hub answers a fleet `Status` request
//! from it. No clock is read here: every call is given the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::latency::{self, BUCKETS};

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept (five minutes' worth).
pub const KEPT: usize = 150;
/// Samples the p99 is computed over (30 s).
pub const P99_WINDOW: usize = 15;

/// One point of a node's charts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was taken (Unix milliseconds).
    pub t: u64,
    /// Live connections.
    pub connections: usize,
    /// Events queued to connections per second since the previous sample.
    pub deliveries_per_s: f64,
}

/// A node as the admin page shows it (the answer to a fleet `Status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub node: String,
    /// Herald's version on it.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Live connections now.
    pub connections: usize,
    /// Deliveries per second over the last sample period.
    pub deliveries_per_s: f64,
    /// Publish→write p99 over the last 30 s, in ms (a bucket's upper
    /// bound); `None` without deliveries.
    pub p99_ms: Option<f64>,
    /// `ok`, `unavailable`, or `none` (the memory broker).
    pub redis: String,
    /// Whether it is draining.
    pub draining: bool,
    /// The last five minutes, oldest first.
    pub series: Vec<Sample>,
}

/// What the sweeper saw at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// Monotonic time of the observation.
    pub at: Instant,
    /// The same instant in Unix milliseconds.
    pub unix_ms: u64,
    /// Live connections.
    pub connections: usize,
    /// Events queued to connections since the server started.
    pub deliveries: u64,
    /// The latency histogram's counts since the process started.
    pub latency: [u64; BUCKETS],
}

/// What the hub knows of the node at the moment it answers.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    /// Live connections.
    pub connections: usize,
    /// `ok`, `unavailable` or `none`.
    pub redis: &'static str,
    /// Whether the node is draining.
    pub draining: bool,
}

/// The samples of one node.
#[derive(Debug)]
pub struct Vitals {
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: VecDeque<Sample>,
    /// The latency counts at each kept sample (for the windowed p99).
    latency: VecDeque<[u64; BUCKETS]>,
    last: Option<Observation>,
}

impl Vitals {
    /// Vitals of a node started at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            inner: Mutex::default(),
        }
    }

    /// Take a sample from `now` unless the last one is younger than
    /// [`SAMPLE_EVERY`] (less a little slack for a late tick).
    pub fn observe(&self, now: Observation) {
        let mut inner = self.inner.lock();
        let rate = match inner.last {
            Some(last) => {
                let elapsed = now.at.saturating_duration_since(last.at);
                if elapsed < SAMPLE_EVERY.mul_f64(0.9) {
                    return;
                }
                now.deliveries.saturating_sub(last.deliveries) as f64 / elapsed.as_secs_f64()
            }
            None => 0.0,
        };
        inner.samples.push_back(Sample {
            t: now.unix_ms,
            connections: now.connections,
            deliveries_per_s: rate,
        });
        inner.latency.push_back(now.latency);
        while inner.samples.len() > KEPT {
            inner.samples.pop_front();
            inner.latency.pop_front();
        }
        inner.last = Some(now);
    }

    /// This node's status: the rate, p99 and series as of the last sample,
    /// the rest as of `now`.
    pub fn status(&self, node: &str, now: Instant, live: Live) -> NodeStatus {
        let inner = self.inner.lock();
        let p99_ms = match (inner.latency.back(), inner.latency.len()) {
            (Some(newest), n) if n > 1 => {
                let oldest = &inner.latency[n.saturating_sub(P99_WINDOW + 1)];
                let mut window = [0u64; BUCKETS];
                for (w, (a, b)) in window.iter_mut().zip(newest.iter().zip(oldest)) {
                    *w = a.saturating_sub(*b);
                }
                latency::quantile(&window, 0.99).map(|d| d.as_secs_f64() * 1000.0)
            }
            _ => None,
        };
        NodeStatus {
            node: node.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            connections: live.connections,
            deliveries_per_s: inner.samples.back().map_or(0.0, |s| s.deliveries_per_s),
            p99_ms,
            redis: live.redis.to_owned(),
            draining: live.draining,
            series: inner.samples.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(start: Instant, secs: u64, deliveries: u64, latency: [u64; BUCKETS]) -> Observation {
        Observation {
            at: start + Duration::from_secs(secs),
            unix_ms: 1_000_000 + secs * 1000,
            connections: secs as usize,
            deliveries,
            latency,
        }
    }

    fn live(connections: usize) -> Live {
        Live {
            connections,
            redis: "ok",
            draining: false,
        }
    }

    #[test]
    fn samples_are_rated_spaced_and_bounded() {
        let start = Instant::now();
        let v = Vitals::new(start);
        v.observe(at(start, 0, 0, [0; BUCKETS]));
        v.observe(at(start, 1, 500, [0; BUCKETS])); // too soon: skipped
        v.observe(at(start, 2, 1000, [0; BUCKETS]));
        let s = v.status("n1", start + Duration::from_secs(3), live(7));
        assert_eq!(s.series.len(), 2);
        assert_eq!(s.series[1].deliveries_per_s, 500.0);
        assert_eq!(s.deliveries_per_s, 500.0);
        assert_eq!((s.connections, s.uptime_s, s.redis.as_str()), (7, 3, "ok"));
        for i in 2..(KEPT as u64 + 10) {
            v.observe(at(start, i * 2, i * 1000, [0; BUCKETS]));
        }
        let s = v.status("n1", start, live(0));
        assert_eq!(s.series.len(), KEPT);
        assert!(s.series.windows(2).all(|w| w[0].t < w[1].t));
    }

    #[test]
    fn the_p99_covers_the_window_only() {
        let start = Instant::now();
        let v = Vitals::new(start);
        let mut counts = [0u64; BUCKETS];
        // Long ago: a hundred slow deliveries (bucket 10, ≤ 250 ms).
        counts[10] = 100;
        v.observe(at(start, 0, 0, counts));
        assert_eq!(v.status("n", start, live(0)).p99_ms, None);
        for i in 1..=(P99_WINDOW as u64 + 1) {
            counts[2] += 1000; // fast ones (≤ 500 µs)
            v.observe(at(start, i * 2, i, counts));
        }
        let p99 = v.status("n", start, live(0)).p99_ms.unwrap();
        assert!((p99 - 0.5).abs() < 1e-9, "{p99}");
    }
}
