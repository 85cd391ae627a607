//! Admission of WebSocket upgrades: a bound on live connections and a
//! smaller one on connections that have not said `hello` yet, each checked
//! and taken in one atomic step (so simultaneous upgrades cannot pass a
//! bound together). A [`Slot`] holds its places until it is dropped; the
//! place among the unauthenticated is given back at the welcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `max_connections` live connections already.
    #[error("server is at its connection limit")]
    Capacity,
    /// `max_pending_connections` connections are waiting for their `hello`.
    #[error("too many connections are waiting to authenticate")]
    Pending,
}

/// The two counters and their bounds.
#[derive(Debug)]
pub struct Admission {
    live: AtomicUsize,
    pending: AtomicUsize,
    max_live: usize,
    max_pending: usize,
}

/// Take a place under `max` in `counter`, or none.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Admission {
    /// Bounds for live connections and for those before `hello`.
    pub fn new(max_live: usize, max_pending: usize) -> Self {
        Self {
            live: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            max_live,
            max_pending,
        }
    }

    /// A place for a new connection, among the live and the unauthenticated.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Refusal> {
        if !take(&self.pending, self.max_pending) {
            return Err(Refusal::Pending);
        }
        if !take(&self.live, self.max_live) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Capacity);
        }
        Ok(Slot {
            admission: self.clone(),
            pending: true,
        })
    }

    /// Connections holding a place (live, authenticated or not).
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Connections that have not been welcomed yet.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// One connection's places; given back on drop.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    pending: bool,
}

impl Slot {
    /// The connection was welcomed: it no longer counts as unauthenticated.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.admission.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
        self.admission.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_and_places_come_back() {
        let a = Arc::new(Admission::new(3, 2));
        let mut s1 = a.admit().unwrap();
        let _s2 = a.admit().unwrap();
        assert_eq!(
            a.admit().unwrap_err(),
            Refusal::Pending,
            "two before hello at most"
        );
        s1.authenticated();
        s1.authenticated(); // once only
        assert_eq!(a.pending(), 1);
        let s3 = a.admit().unwrap();
        assert_eq!(a.live(), 3);
        drop(s3);
        let mut s4 = a.admit().unwrap();
        s4.authenticated();
        assert_eq!(a.admit().unwrap_err(), Refusal::Capacity);
        assert_eq!(
            a.pending(),
            1,
            "a refusal for capacity gives its pending place back"
        );
        drop((s1, s4));
        assert_eq!((a.live(), a.pending()), (1, 1));
    }

    /// Issue 14, finding 8: the check and the take are one step, so
    /// simultaneous upgrades never pass the bound together.
    #[test]
    fn simultaneous_admissions_never_exceed_the_bound() {
        let a = Arc::new(Admission::new(50, 1000));
        let slots: Vec<Slot> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).filter_map(|_| a.admit().ok()).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(slots.len(), 50);
        assert_eq!(a.live(), 50);
    }
}
