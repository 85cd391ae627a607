//! Background work the server owns: webhook deliveries, demo-agent runs,
//! HTTP connections. Every task is spawned through [`Tasks`], so shutdown can
//! wait for them to finish and cancel whatever outlives the drain window —
//! nothing keeps running after [`crate::Server::shutdown`] returns.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The server's spawned tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Spawn `fut`, tracked and cancellable.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// Stop taking new work, wait up to `grace` for running tasks, then cancel
    /// the rest and wait for them to unwind. Returns how many were cancelled.
    pub(crate) async fn shutdown(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.cancel.cancel();
        self.tracker.wait().await;
        left
    }
}
