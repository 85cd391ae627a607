//! The publish→write latency histogram (`herald_publish_to_write_seconds`).
//!
//! Every live delivery adds one sample. Through the `metrics` recorder a
//! sample costs three atomic operations on cache lines that every core
//! writes (the handle's generation and the sample block's two indexes), a
//! cache-line transfer between cores per delivery. Here a flush round
//! buckets its samples locally ([`Round`]) and adds them to the process-wide
//! counts once, with one atomic add per bucket it used; the counts are
//! rendered in Prometheus' text format next to the recorder's output.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in nanoseconds (100 µs to 10 s).
const BOUNDS_NS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Buckets: one per bound, and one above the last.
pub(crate) const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The process-wide counts (as the recorder's were).
static COUNTS: Counts = Counts::new();

/// Samples per bucket and their sum, since the process started.
struct Counts {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Counts {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// The bucket a latency falls in (its bound is the first at or above it).
fn bucket(ns: u64) -> usize {
    BOUNDS_NS
        .iter()
        .position(|&bound| ns <= bound)
        .unwrap_or(BOUNDS_NS.len())
}

/// One flush round's samples, bucketed, not yet added to the process-wide
/// counts: added by [`Round::commit`].
#[derive(Debug, Default)]
pub(crate) struct Round {
    buckets: [u64; BUCKETS],
    sum_ns: u64,
    samples: u64,
}

impl Round {
    /// Count one delivery's latency.
    pub(crate) fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.samples += 1;
    }

    /// Add the round to the process-wide counts and start over.
    pub(crate) fn commit(&mut self) {
        self.commit_to(&COUNTS);
    }

    fn commit_to(&mut self, counts: &Counts) {
        if self.samples == 0 {
            return;
        }
        for (count, total) in self.buckets.iter().zip(&counts.buckets) {
            if *count > 0 {
                total.fetch_add(*count, Ordering::Relaxed);
            }
        }
        counts.sum_ns.fetch_add(self.sum_ns, Ordering::Relaxed);
        *self = Self::default();
    }
}

/// The process-wide counts per bucket now.
pub(crate) fn snapshot() -> [u64; BUCKETS] {
    let mut out = [0; BUCKETS];
    for (o, c) in out.iter_mut().zip(&COUNTS.buckets) {
        *o = c.load(Ordering::Relaxed);
    }
    out
}

/// The upper bound of the bucket holding quantile `q` of `counts` (the
/// last finite bound for the overflow bucket); `None` without samples.
pub(crate) fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            let bound = BOUNDS_NS.get(i).or(BOUNDS_NS.last()).copied().unwrap_or(0);
            return Some(Duration::from_nanos(bound));
        }
    }
    None
}

/// Append the histogram to a Prometheus text exposition.
pub(crate) fn render(name: &str, out: &mut String) {
    render_counts(name, &COUNTS, out);
}

fn render_counts(name: &str, from: &Counts, out: &mut String) {
    let counts: Vec<u64> = from
        .buckets
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let sum = Duration::from_nanos(from.sum_ns.load(Ordering::Relaxed)).as_secs_f64();
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, count) in counts.iter().enumerate() {
        cumulative += count;
        match BOUNDS_NS.get(i) {
            Some(&bound) => {
                let le = Duration::from_nanos(bound).as_secs_f64();
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {cumulative}");
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_falls_in_the_first_bucket_at_or_above_it() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100_000), 0);
        assert_eq!(bucket(100_001), 1);
        assert_eq!(bucket(9_999_999), 6);
        assert_eq!(bucket(10_000_000_000), 13);
        assert_eq!(bucket(10_000_000_001), 14);
        assert_eq!(bucket(u64::MAX), 14);
    }

    #[test]
    fn a_quantile_is_its_buckets_bound() {
        let mut c = [0u64; BUCKETS];
        assert_eq!(quantile(&c, 0.99), None);
        c[0] = 98;
        c[3] = 1;
        c[14] = 1;
        assert_eq!(quantile(&c, 0.5), Some(Duration::from_micros(100)));
        assert_eq!(quantile(&c, 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&c, 1.0), Some(Duration::from_secs(10)));
    }

    /// A round's samples reach the rendered histogram only when committed,
    /// each in its bucket, cumulative, with their sum and count.
    #[test]
    fn a_committed_round_is_rendered_cumulatively() {
        let counts = Counts::new();
        let mut round = Round::default();
        for ms in [0.05, 3.0, 3.0, 20_000.0] {
            round.record(Duration::from_secs_f64(ms / 1000.0));
        }
        let mut before = String::new();
        render_counts("x", &counts, &mut before);
        assert!(before.contains("x_count 0\n"), "{before}");
        round.commit_to(&counts);
        round.commit_to(&counts);
        let mut out = String::new();
        render_counts("x", &counts, &mut out);
        for line in [
            "# TYPE x histogram\n",
            "x_bucket{le=\"0.0001\"} 1\n",
            "x_bucket{le=\"0.0025\"} 1\n",
            "x_bucket{le=\"0.005\"} 3\n",
            "x_bucket{le=\"10\"} 3\n",
            "x_bucket{le=\"+Inf\"} 4\n",
            "x_count 4\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
        let sum: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("x_sum "))
            .and_then(|s| s.parse().ok())
            .expect("a sum");
        assert!((sum - 20.00605).abs() < 1e-6, "sum {sum}");
    }
}
