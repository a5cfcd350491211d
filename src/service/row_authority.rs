//! Spec 9.8, the parts that run outside a grant: an Active row whose
//! expiry was moved past what any grant may last is revoked, and a server
//! never starts on a store holding live rows of the other mode.

use std::sync::Arc;

use super::Change;
use super::Service;
use crate::domain::lifecycle::{self, in_force};
use crate::domain::policy::ClusterPolicy;
use crate::domain::request::State;
use crate::domain::row_check::expiry_beyond_cap;

impl Service {
    /// Active grants on `cluster` whose row says they last past
    /// `activated_at + max_total_duration`: no write of Tollgate's makes
    /// such a row (extensions stop at the cap), so it was edited in the
    /// store. The grant is revoked now (reason `invalid_row`) and the
    /// security channel told. Runs on every reconcile pass.
    pub async fn revoke_overlong(self: &Arc<Self>, cluster: &ClusterPolicy) -> usize {
        let live = match self.store.live().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(cluster = %cluster.name, error = %e, "expiry check skipped: store unavailable");
                return 0;
            }
        };
        let now = self.clock.now();
        let mut revoked = 0;
        for r in live
            .iter()
            .filter(|r| r.access.cluster == cluster.name && in_force(r, now) && self.acts_on(r))
        {
            if expiry_beyond_cap(r, cluster, now).is_none() {
                continue;
            }
            let marked = self
                .modify(&r.id, |current| {
                    // Judged again on the row as it is now.
                    let why = match expiry_beyond_cap(current, cluster, now) {
                        Some(why) if current.state == State::Active => why,
                        _ => return Change::Keep(None),
                    };
                    Change::event(&r.id, lifecycle::invalid_grant(current, &why, now))
                })
                .await;
            match marked {
                Ok(Some(notice)) => {
                    revoked += 1;
                    self.metrics.failed("reconcile", "invalid_row");
                    tracing::error!(request_id = %r.id, "expiry moved past max_total_duration in the store: revoking");
                    self.announce(&r.id, notice);
                    let service = Arc::clone(self);
                    let id = r.id.clone();
                    tokio::spawn(async move { service.drive(&id).await });
                }
                Ok(None) => {}
                Err(e) => {
                    self.store_failed(&r.id, &e, "invalid expiry not recorded; next pass retries")
                }
            }
        }
        revoked
    }
}
