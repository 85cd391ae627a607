//! Time for the I/O shell, in one place.
//!
//! Monotonic time comes from tokio's clock, so tests can pause and advance it
//! (`tokio::time::pause`); the sans-IO core only ever receives it as an
//! argument. Wall-clock time is used for event timestamps and JWT expiry only.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The current monotonic instant (tokio's clock: paused in tests that pause it).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The current wall-clock time as RFC 3339 with milliseconds (event `ts`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch (JWT `exp`, webhook timestamps).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
