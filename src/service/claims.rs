//! Who may act on what. A step (grant, revoke) on a shared store first
//! claims its row for this replica, and only the claim's holder records the
//! result. Converging a principal's access is exclusive: within a process
//! by a lock, across replicas on a shared store by a lease in the store. Grant,
//! revoke, extension and reconcile all converge "everything this principal
//! needs", so two of them at once on different replicas could undo each
//! other's calls; the lease makes them take turns.

use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::OwnedMutexGuard;

use super::{failpoint, Change, Service};
use crate::domain::request::{Claim, Request};

/// Between tries for a lease another replica holds.
const LEASE_POLL: Duration = Duration::from_millis(150);

pub(crate) struct PrincipalGuard {
    _local: OwnedMutexGuard<()>,
    lease: Option<Lease>,
}

struct Lease {
    name: String,
    /// The term it was taken for (`Tunables::claim_ttl`).
    ttl: Duration,
    holder: String,
    until: OffsetDateTime,
    store: std::sync::Arc<dyn crate::store::Store>,
}

impl PrincipalGuard {
    /// Whether there is still time to make a cloud call under this guard:
    /// a replica paused past (most of) its lease must not act, because
    /// another may hold it by now.
    pub(crate) fn fresh_enough(&self, now: OffsetDateTime) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|l| now + l.ttl / 3 < l.until)
    }
}

impl Drop for PrincipalGuard {
    /// Handing the lease back early spares the other replicas the wait;
    /// if this never runs (a crash), the lease simply lapses.
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = lease.store.release_lease(&lease.name, &lease.holder).await {
                        tracing::debug!(lease = %lease.name, error = %e, "lease not released; it lapses");
                    }
                });
            }
        }
    }
}

impl Service {
    /// Takes the principal's local lock and, on a shared store, its lease;
    /// `None` if the lease stayed with another replica for a whole step's
    /// time (the row stays due and is tried again).
    pub(crate) async fn principal(&self, cluster: &str, principal: &str) -> Option<PrincipalGuard> {
        let key = format!("{cluster}\u{0}{principal}");
        let local = self.locks.lock(key).await;
        if !self.store.is_shared() {
            return Some(PrincipalGuard {
                _local: local,
                lease: None,
            });
        }
        let name = format!("principal/{cluster}/{principal}");
        let ttl = self.tunables.claim_ttl;
        let deadline = std::time::Instant::now() + ttl;
        loop {
            let now = self.clock.now();
            let until = now + ttl;
            match self.store.try_lease(&name, &self.replica, until, now).await {
                Ok(true) => {
                    return Some(PrincipalGuard {
                        _local: local,
                        lease: Some(Lease {
                            name,
                            ttl,
                            holder: self.replica.clone(),
                            until,
                            store: self.store.clone(),
                        }),
                    })
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "principal lease unavailable");
                    return None;
                }
            }
            if std::time::Instant::now() >= deadline {
                tracing::info!(lease = %name, "principal busy on another replica; trying later");
                return None;
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }
}

impl Service {
    /// On a shared store, takes this row for this replica before any cloud
    /// call; `None` when another replica holds it. The row returned is what
    /// the step works from.
    pub(super) async fn claim(&self, req: Request, now: OffsetDateTime) -> Option<Request> {
        if !self.store.is_shared() {
            return Some(req);
        }
        let owner = self.replica.clone();
        let state = req.state;
        let claimed = self
            .modify(&req.id, |current| {
                if current.state != state || !current.claimable_by(&owner, now) {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                next.claim = Some(Claim {
                    owner: owner.clone(),
                    until: now + self.tunables.claim_ttl,
                });
                Change::Write(Box::new(next.clone()), Vec::new(), Some(next))
            })
            .await;
        match claimed {
            Ok(row) => row,
            Err(e) => {
                tracing::warn!(request_id = %req.id, error = %e, "cannot claim; another pass will");
                None
            }
        }
    }

    /// Last look before a cloud call: a replica that was paused (or slow)
    /// past most of its lease leaves the row to whoever holds it now.
    pub(super) fn may_act(&self, guard: &PrincipalGuard, req: &Request, point: &str) -> bool {
        failpoint(point);
        if guard.fresh_enough(self.clock.now()) {
            return true;
        }
        tracing::warn!(request_id = %req.id, "lease nearly lapsed before the cloud call; leaving the row to the next pass");
        false
    }

    /// The step's result is written only by the replica that claimed it: a
    /// replica paused past its claim finds the row taken and writes nothing.
    pub(super) fn holds_claim(&self, row: &Request) -> bool {
        !self.store.is_shared() || row.claim.as_ref().is_some_and(|c| c.owner == self.replica)
    }
}
