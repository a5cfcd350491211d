//! The task that drives what falls due: it sleeps until the earliest due
//! instant in the store (or until a write makes a row due sooner), then
//! drives every due row. It is not the only caller of a step: an approval
//! reaching its quorum, an auto-approved or break-glass request, an early
//! revoke (Slack or CLI) and the offboarding check drive their row at once
//! rather than wait for it (`Service::drive`); the step itself re-reads the
//! row, so a row driven twice is driven once.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::service::Service;

/// Even with nothing due it looks again this often, so a clock jump or a
/// missed wake-up costs at most this much.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Pause when something is still due right after a pass (a row that keeps
/// failing, or one another writer holds), so it cannot spin the loop.
const BUSY_SLEEP: Duration = Duration::from_millis(100);
/// The due index keeps whole milliseconds, rounded down; waking this much
/// after an index instant means the row itself is due when it is read.
const INDEX_RESOLUTION: Duration = Duration::from_millis(1);
/// On a shared store another replica's writes wake nobody here: the due
/// index is read at least this often.
const SHARED_MAX_SLEEP: Duration = Duration::from_secs(1);

/// Whether a write that moved a row's due instant from `before` to `after`
/// must wake the scheduler: only when the row may now be due earlier than
/// the scheduler planned. A row due later, or no longer due, at worst wakes
/// it once for nothing at the old instant, where it reads the index again.
pub fn needs_wake(
    before: Option<time::OffsetDateTime>,
    after: Option<time::OffsetDateTime>,
) -> bool {
    match (before, after) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(b), Some(a)) => a < b,
    }
}

pub async fn run(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let wake = service.wake_handle();
    let max_sleep = if service.store().is_shared() {
        SHARED_MAX_SLEEP
    } else {
        MAX_SLEEP
    };
    loop {
        let lag = match service.store().next_due().await {
            Ok(Some(t)) => (service.clock().now() - t).as_seconds_f64().max(0.0),
            _ => 0.0,
        };
        service.metrics().scheduler_lag_seconds.set(lag);
        if let Err(e) = service.run_due().await {
            service.metrics().failed("store", e.metric_label());
            tracing::error!(error = %e, "scheduler pass failed");
        }
        let now = service.clock().now();
        // A row due later sleeps exactly until then (an expiry right after
        // another is not held back); only a row still due now waits longer.
        let sleep = match service.store().next_due().await {
            Ok(Some(t)) => match Duration::try_from(t - now) {
                Ok(ahead) if !ahead.is_zero() => ahead + INDEX_RESOLUTION,
                // Within the index's rounding: the row may become due in
                // under a millisecond.
                _ if now - t < INDEX_RESOLUTION => INDEX_RESOLUTION,
                _ => BUSY_SLEEP,
            },
            Ok(None) => max_sleep,
            Err(e) => {
                service.metrics().failed("store", e.metric_label());
                tracing::error!(error = %e, "cannot read the due index");
                Duration::from_secs(1)
            }
        }
        .min(max_sleep);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reconciles each cluster every `reconcile_interval`, the first time right
/// after start-up so a crash's orphans go at once.
pub async fn reconcile(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let clusters = service.config().clusters.clone();
    // A dry run makes nothing, so every active grant would look drifted and
    // there is never an orphan to remove.
    if clusters.is_empty() || service.config().dry_run {
        return;
    }
    let mut next_run: Vec<tokio::time::Instant> = vec![tokio::time::Instant::now(); clusters.len()];
    loop {
        service.spawn_standing_tick();
        let now = tokio::time::Instant::now();
        for (cluster, next) in clusters.iter().zip(next_run.iter_mut()) {
            if *next > now {
                continue;
            }
            *next = now + cluster.reconcile_interval;
            // With several replicas one reconciles each cluster per interval:
            // whoever holds the lease, which lapses if its holder dies.
            let wall = service.clock().now();
            let lease = format!("reconcile/{}", cluster.name);
            match service
                .store()
                .try_lease(
                    &lease,
                    service.replica(),
                    wall + cluster.reconcile_interval,
                    wall,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(cluster = %cluster.name, error = %e, "reconcile lease unavailable");
                    continue;
                }
            }
            service.offboard_cluster(cluster).await;
            service.quarantine_tampered(cluster).await;
            service.revoke_overlong(cluster).await;
            match service.reconcile_cluster(cluster).await {
                Ok(report) if report.removed.is_empty() && report.drifted.is_empty() => {
                    tracing::debug!(cluster = %cluster.name, "reconciled: nothing to do");
                }
                Ok(report) => {
                    tracing::info!(cluster = %cluster.name, removed = ?report.removed, drifted = ?report.drifted, "reconciled")
                }
                Err(e) => {
                    service.metrics().failed("reconcile", e.metric_label());
                    tracing::warn!(cluster = %cluster.name, error = %e, "reconcile failed; next interval retries")
                }
            }
            *next = tokio::time::Instant::now() + cluster.reconcile_interval;
        }
        let wake = next_run.iter().min().copied().unwrap_or(now + MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How often the inbox of recorded Slack clicks is looked over.
const INBOX_SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A click still in the inbox this long after it was recorded was dropped
/// by a process that died (on a shared store, another replica): the
/// replica that records a click normally finishes it within a second or
/// two, and processing one twice decides nothing twice.
pub const INBOX_GRACE: Duration = Duration::from_secs(30);

/// Takes up recorded clicks that no live process is working on. Start-up
/// does this once for the previous process; this covers a replica that
/// died while others keep serving.
pub async fn inbox_sweep(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INBOX_SWEEP_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = service.replay_clicks(INBOX_GRACE).await {
            service.metrics().failed("store", e.metric_label());
            tracing::warn!(error = %e, "cannot read the click inbox; the next sweep retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::needs_wake;
    use time::macros::datetime;

    #[test]
    fn only_an_earlier_due_instant_wakes_the_scheduler() {
        let t = datetime!(2026-11-23 12:00 UTC);
        let later = t + time::Duration::seconds(1);
        assert!(needs_wake(None, Some(t)), "newly due");
        assert!(
            needs_wake(Some(later), Some(t)),
            "due earlier (early revoke)"
        );
        assert!(!needs_wake(Some(t), Some(later)), "due later (extension)");
        assert!(!needs_wake(Some(t), Some(t)), "unchanged");
        assert!(!needs_wake(Some(t), None), "no longer due (ended)");
        assert!(!needs_wake(None, None));
    }
}
