//! The one task that owns time: it sleeps until the earliest due instant in
//! the store (or until a write wakes it), then drives what is due.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::service::Service;

/// Even with nothing due it looks again this often, so a clock jump or a
/// missed wake-up costs at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Floor between passes, so a row that keeps failing cannot spin the loop.
const MIN_SLEEP: Duration = Duration::from_millis(100);

pub async fn run(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let wake = service.wake_handle();
    loop {
        if let Err(e) = service.run_due().await {
            tracing::error!(error = %e, "scheduler pass failed");
        }
        let now = service.clock().now();
        let sleep = match service.store().next_due().await {
            Ok(Some(t)) => Duration::try_from(t - now).unwrap_or(Duration::ZERO),
            Ok(None) => MAX_SLEEP,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the due index");
                Duration::from_secs(1)
            }
        }
        .clamp(MIN_SLEEP, MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
