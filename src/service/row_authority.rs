//! Spec 9.8, the parts that run outside a grant: an Active row whose
//! expiry was moved past what any grant may last is revoked, a row failing
//! its integrity MAC is ended (`tampered`), and a server never starts on a
//! store holding live rows of the other mode.

use std::sync::Arc;

use super::Change;
use super::Service;
use crate::domain::lifecycle::{self, in_force};
use crate::domain::policy::ClusterPolicy;
use crate::domain::request::{Request, State};
use crate::domain::row_check::expiry_beyond_cap;
use crate::store::StoreError;

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

    /// Spec 9.8, on every reconcile pass: the live rows of `cluster` that
    /// fail their integrity MAC are ended (`quarantine`). Sets
    /// `tollgate_tampered_rows` to the live rows of every cluster found
    /// failing by this read. Nothing to do without a key.
    pub async fn quarantine_tampered(self: &Arc<Self>, cluster: &ClusterPolicy) -> usize {
        if self.tunables.integrity.is_none() {
            return 0;
        }
        let live = match self.store.live().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(cluster = %cluster.name, error = %e, "integrity check skipped: store unavailable");
                return 0;
            }
        };
        let failing: Vec<&Request> = live
            .iter()
            .filter(|r| r.dry_run == self.config.dry_run && !self.intact(r))
            .collect();
        self.metrics.tampered_rows.set(failing.len() as i64);
        let mut ended = 0;
        for r in failing
            .into_iter()
            .filter(|r| r.access.cluster == cluster.name)
        {
            if self.quarantine(r).await {
                ended += 1;
            }
        }
        ended
    }

    /// A row read failing its integrity MAC (spec 9.8) is never acted on
    /// as written: one CAS write against the version read audits
    /// `tampered` and ends it the safe way for its state
    /// (`lifecycle::tampered`), re-signed, so it is reported once per
    /// tampered version. The security channel is told; a revoke it
    /// records is due at once. `false`: nothing written (another write
    /// got there first, or the store failed); the next pass reads it again.
    pub(crate) async fn quarantine(self: &Arc<Self>, row: &Request) -> bool {
        let now = self.clock.now();
        let effects = lifecycle::tampered(row, now);
        let entered = (effects.row.state != row.state).then_some(effects.row.state);
        let revoking = effects.row.revoke.is_some();
        tracing::error!(request_id = %row.id, state = row.state.label(), version = row.version, "row failed its integrity check (written outside Tollgate): not acted on; ending it");
        let mut audit = effects.audit;
        if self.config.dry_run {
            super::mark_dry_run(&mut audit);
        }
        match self.store.update(row, effects.row, audit).await {
            Ok(_) => {
                self.metrics.failed("store", "tampered");
                if let Some(state) = entered {
                    self.metrics.entered(state.label());
                }
                if let Some(notice) = effects.notice {
                    self.announce(&row.id, notice);
                }
                if revoking {
                    // The revoke intent makes the row due now; the
                    // scheduler drives it (not spawned from here: this
                    // runs inside `drive` itself).
                    self.wake.notify_one();
                }
                true
            }
            Err(StoreError::Conflict(_)) => false,
            Err(e) => {
                self.store_failed(&row.id, &e, "tampered row not recorded; next pass retries");
                false
            }
        }
    }
}
