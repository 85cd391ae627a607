//! Reconnect backoff: a delay that doubles from `base` after each failure,
//! capped at `max`, back to `base` after a success. Pure: the caller sleeps.

use std::time::Duration;

/// A doubling, capped delay between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starting at `base`, never above `max` (`max` below `base` is `base`).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            next: base,
        }
    }

    /// The delay to wait after a failure; the next one is twice it, capped.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// An attempt succeeded: the next failure waits `base` again.
    pub fn succeeded(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_to_the_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::new(50 * MS, 2000 * MS);
        let delays: Vec<u128> = (0..8).map(|_| b.failed().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        b.succeeded();
        assert_eq!(b.failed(), 50 * MS);
        assert_eq!(b.failed(), 100 * MS);
    }

    proptest! {
        /// Each delay is twice the one before or the cap, never above it.
        #[test]
        fn every_delay_doubles_or_is_capped(base in 1u64..1000, max in 1u64..100_000, n in 1usize..40) {
            let ms = Duration::from_millis;
            let mut b = Backoff::new(ms(base), ms(max));
            let cap = ms(max.max(base));
            let mut prev = b.failed();
            prop_assert_eq!(prev, ms(base));
            for _ in 0..n {
                let d = b.failed();
                prop_assert!(d <= cap);
                prop_assert_eq!(d, (prev * 2).min(cap));
                prev = d;
            }
        }
    }
}
