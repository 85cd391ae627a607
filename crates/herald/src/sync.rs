//! The synchronization primitives of the connection handle
//! ([`crate::connection::ConnShared`]): parking_lot's mutex and tokio's
//! `Notify` in every build, loom's under `--cfg herald_loom`, so the model
//! checker explores every interleaving of the real handle's sends, closes,
//! wake-ups and cleanup (`connection/loom.rs`; docs/RELIABILITY.md says how
//! to run it).

#[cfg(not(herald_loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(not(herald_loom))]
pub(crate) use std::sync::atomic::AtomicU64;
#[cfg(not(herald_loom))]
pub(crate) use tokio::sync::Notify;

#[cfg(herald_loom)]
pub(crate) use loom_shim::{AtomicU64, Mutex, MutexGuard, Notify};

#[cfg(herald_loom)]
mod loom_shim {
    pub(crate) use loom::sync::MutexGuard;
    pub(crate) use loom::sync::atomic::AtomicU64;

    /// loom's mutex with parking_lot's signature (no poisoning).
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    /// tokio's `Notify` semantics for one waiter: `notify_one` with no one
    /// waiting stores a permit that the next wait consumes.
    #[derive(Debug)]
    pub(crate) struct Notify {
        permit: loom::sync::Mutex<bool>,
        cv: loom::sync::Condvar,
    }

    impl Notify {
        pub(crate) fn new() -> Self {
            Self {
                permit: loom::sync::Mutex::new(false),
                cv: loom::sync::Condvar::new(),
            }
        }

        pub(crate) fn notify_one(&self) {
            let mut permit = self
                .permit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *permit = true;
            self.cv.notify_one();
        }

        /// Block until a permit is there, and take it (the model's actor).
        pub(crate) fn wait(&self) {
            let mut permit = self
                .permit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while !*permit {
                permit = self
                    .cv
                    .wait(permit)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            *permit = false;
        }

        /// The async wait of the real actor, which the model does not run.
        pub(crate) async fn notified(&self) {
            self.wait()
        }
    }
}
