//! Slack clicks are recorded before they are answered and processed after
//! (`domain::inbox`): a process that dies between the 200 and the decision
//! leaves the click in the store, and start-up or the sweep of a live
//! replica processes it. Processing decides once however often it runs.

use std::sync::Arc;
use std::time::Duration;

use super::{failpoint, failpoint_after_answer, Decision, Notice, Service};
use crate::domain::inbox::{Click, Interaction};
use crate::domain::request::RequestId;
use crate::store::{InboxEntry, StoreError};

/// The keys of the clicks this process is working on. Each use is one
/// insert, remove or lookup, so a panic elsewhere cannot leave the set
/// half-changed: a poisoned lock is taken as it is.
fn in_flight(service: &Service) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    service
        .clicks_in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Releases a click's in-flight mark however its processing ends.
struct InFlight<'a> {
    service: &'a Service,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        in_flight(self.service).remove(&self.key);
    }
}

impl Service {
    /// Takes the clicks of one delivery: records them within `deadline`
    /// and starts processing them, or says they were not taken (the caller
    /// answers non-200). The recording runs in its own task: when it
    /// outlasts the deadline, whatever it recorded is removed once it
    /// finishes, so no sweep acts on a click its clicker was told had
    /// failed.
    pub async fn take_clicks(
        self: &Arc<Self>,
        clicks: Vec<Interaction>,
        deadline: Duration,
    ) -> bool {
        let service = Arc::clone(self);
        let mut recording = tokio::spawn(async move { service.record_clicks(clicks).await });
        match tokio::time::timeout(deadline, &mut recording).await {
            Ok(Ok(Ok(fresh))) => {
                for click in fresh {
                    self.process_click(click, false);
                }
                true
            }
            Ok(_) => false,
            Err(_) => {
                let service = Arc::clone(self);
                tokio::spawn(async move {
                    if let Ok(Ok(fresh)) = recording.await {
                        service.forget_clicks(&fresh).await;
                    }
                });
                false
            }
        }
    }

    /// Makes the clicks of one delivery durable. The caller answers 200
    /// only when this succeeds; the clicks it returns are the ones not
    /// recorded before (a delivery seen again is already being processed).
    /// On failure nothing of this delivery is left to act on later: the
    /// clicker is told it failed and clicks again.
    pub(super) async fn record_clicks(
        &self,
        clicks: Vec<Interaction>,
    ) -> Result<Vec<Interaction>, StoreError> {
        let mut fresh = Vec::with_capacity(clicks.len());
        for mut click in clicks {
            click.dry_run = self.config.dry_run;
            match self.store.record_interaction(&click).await {
                Ok(true) => fresh.push(click),
                Ok(false) => {
                    tracing::info!(click = click.click.label(), "click already recorded")
                }
                Err(e) => {
                    self.metrics.failed("store", e.metric_label());
                    tracing::error!(error = %e, "cannot record a click; answering non-200");
                    // A write that failed may still have landed.
                    fresh.push(click);
                    self.forget_clicks(&fresh).await;
                    return Err(e);
                }
            }
        }
        Ok(fresh)
    }

    /// Removes clicks whose delivery was answered non-200, so that no sweep
    /// acts on a click its clicker was told had failed.
    async fn forget_clicks(&self, clicks: &[Interaction]) {
        for click in clicks {
            if let Err(e) = self.store.finish_interaction(&click.key).await {
                self.metrics.failed("store", e.metric_label());
                tracing::error!(error = %e, "a click answered non-200 may still be processed later");
            }
        }
    }

    /// Processes a recorded click in its own task; `replayed`: taken up
    /// from the store rather than just received.
    fn process_click(self: &Arc<Self>, click: Interaction, replayed: bool) {
        let service = Arc::clone(self);
        tokio::spawn(async move { service.process_recorded(click, replayed).await });
    }

    /// Processes recorded clicks older than `grace` that no task of this
    /// process is working on: at start-up (grace zero) what the previous
    /// process acknowledged and never did; later, what another replica
    /// dropped. Returns how many it took up.
    pub async fn replay_clicks(self: &Arc<Self>, grace: Duration) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let waiting = self.store.interactions().await?;
        let mut taken = 0;
        for entry in waiting {
            let click = match entry {
                InboxEntry::Click(click) => click,
                InboxEntry::Unreadable { key, message } => {
                    // Never acted on; removed so it is reported once.
                    self.metrics.failed("store", "store_corrupt");
                    tracing::error!(key = %key, error = %message, "unreadable click in the inbox removed");
                    if let Err(e) = self.store.finish_interaction(&key).await {
                        self.metrics.failed("store", e.metric_label());
                    }
                    continue;
                }
            };
            // The other mode's server, sharing the store, processes its own.
            if click.dry_run != self.config.dry_run
                || !click.abandoned(now, grace)
                || self.is_in_flight(&click.key)
            {
                continue;
            }
            taken += 1;
            tracing::info!(
                click = click.click.label(),
                received_at = %click.received_at,
                "processing a click recorded before a restart"
            );
            self.process_click(click, true);
        }
        if taken > 0 {
            self.metrics.clicks_replayed.inc_by(taken as u64);
        }
        Ok(taken)
    }

    /// The grace start-up gives recorded clicks: none on a store only this
    /// process opens; on a shared one, other replicas' clicks in flight
    /// are theirs until the sweep's grace has passed.
    pub fn startup_click_grace(&self, sweep_grace: Duration) -> Duration {
        if self.store.is_shared() {
            sweep_grace
        } else {
            Duration::ZERO
        }
    }

    fn is_in_flight(&self, key: &str) -> bool {
        in_flight(self).contains(key)
    }

    async fn process_recorded(self: &Arc<Self>, click: Interaction, replayed: bool) {
        let inserted = in_flight(self).insert(click.key.clone());
        if !inserted {
            return;
        }
        let _in_flight = InFlight {
            service: self,
            key: click.key.clone(),
        };
        // Crash tests kill the process here: after the 200, before the
        // click changed anything.
        failpoint_after_answer("after-click-answer").await;
        match click.click {
            Click::Approve | Click::Deny => {
                self.decide(Decision {
                    request_id: click.value.clone(),
                    user_id: click.user_id.clone(),
                    approve: click.click == Click::Approve,
                    response_url: click.response_url.clone(),
                })
                .await;
                // A process that died after deciding may not have updated
                // the card: the replay brings it up to date (the update
                // is idempotent).
                if let (true, Some(id)) = (replayed, RequestId::parse(&click.value)) {
                    self.announce(&id, Notice::CardOnly);
                }
            }
            Click::Extend => {
                self.extend_clicked(
                    &click.user_id,
                    &click.value,
                    click.response_url.clone(),
                    &click,
                )
                .await
            }
        }
        // Crash tests kill the process here: the click acted on, still in
        // the inbox, so the next process takes it up again.
        failpoint("after-click-processed");
        // Whatever the outcome, the clicker has been answered: the click is
        // done. A failed removal only means it is processed once more.
        if let Err(e) = self.store.finish_interaction(&click.key).await {
            self.metrics.failed("store", e.metric_label());
            tracing::warn!(error = %e, "processed click not removed from the inbox; it will be processed again");
        }
    }
}
