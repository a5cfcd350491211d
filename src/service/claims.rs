//! Who may act on what. A step (grant, revoke) on a shared store first
//! claims its row for this replica, and only the claim's holder records the
//! result. Converging a principal's access is exclusive: within a process
//! by a lock, across replicas on a shared store by a lease in the store. Grant,
//! revoke, extension and reconcile all converge "everything this principal
//! needs", so two of them at once on different replicas could undo each
//! other's calls; the lease makes them take turns.

use std::collections::HashMap;
use std::sync::Arc;
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
    key: String,
    fences: Arc<Fences>,
}

/// A converge cut off by its time limit may leave a call in flight (the
/// SDK future is dropped, the request may already be with EKS): it counts
/// as possibly applied. Until one lease term after the cut-off no
/// converge of that (cluster, principal) starts, here or on another
/// replica (the lease is renewed for that term and not handed back), so
/// every read a converge judges by — including the one that forgets a
/// baseline (spec 9.6) — is taken after Tollgate's own last write could
/// still land.
#[derive(Default)]
pub(crate) struct Fences {
    until: std::sync::Mutex<HashMap<String, OffsetDateTime>>,
    /// Converges of a key under way (`InFlight`): a guard dropped while
    /// one runs was cut off with it, and keeps its lease like a fenced one.
    in_flight: std::sync::Mutex<HashMap<String, usize>>,
}

impl Fences {
    fn enter(&self, key: &str) {
        if let Ok(mut map) = self.in_flight.lock() {
            *map.entry(key.to_string()).or_default() += 1;
        }
    }

    fn leave(&self, key: &str) {
        if let Ok(mut map) = self.in_flight.lock() {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    fn in_flight(&self, key: &str) -> bool {
        self.in_flight.lock().is_ok_and(|map| map.contains_key(key))
    }

    fn set(&self, key: &str, until: OffsetDateTime) {
        if let Ok(mut map) = self.until.lock() {
            let entry = map.entry(key.to_string()).or_insert(until);
            *entry = (*entry).max(until);
        }
    }

    /// When the fence on `key` ends, if it has not yet; an ended one is
    /// dropped.
    fn active(&self, key: &str, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let mut map = self.until.lock().ok()?;
        match map.get(key) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Whether a fence was put on `key` since it was last cleared: the
    /// guard then leaves its lease to lapse.
    fn is_set(&self, key: &str) -> bool {
        self.until.lock().is_ok_and(|map| map.contains_key(key))
    }

    fn clear(&self, key: &str) {
        if let Ok(mut map) = self.until.lock() {
            map.remove(key);
        }
    }
}

/// How long a fenced principal waits, if it may wait at all: a fence that
/// outlasts a whole lease term leaves the step to a later pass.
fn fence_wait(until: OffsetDateTime, now: OffsetDateTime, term: Duration) -> Option<Duration> {
    let left = Duration::try_from(until - now).unwrap_or_default();
    (left <= term).then_some(left)
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
        // Fenced: the lease stays taken until it lapses, so no replica
        // reads this principal while a cut-off call may still land.
        // A converge still in flight means this guard is being dropped with
        // it (the step's outer time limit): its `InFlight` sets the fence,
        // whichever of the two is dropped first.
        if self.fences.is_set(&self.key) || self.fences.in_flight(&self.key) {
            return;
        }
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
        let local = self.locks.lock(key.clone()).await;
        let now = self.clock.now();
        if let Some(until) = self.fences.active(&key, now) {
            // A fence longer than a term: the step is left to a later pass.
            let wait = fence_wait(until, now, self.tunables.claim_ttl)?;
            tracing::info!(cluster, principal, wait = ?wait, "a cut-off call may still land; waiting before converging");
            tokio::time::sleep(wait).await;
            self.fences.clear(&key);
        }
        if !self.store.is_shared() {
            return Some(PrincipalGuard {
                _local: local,
                lease: None,
                key,
                fences: self.fences.clone(),
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
                        key,
                        fences: self.fences.clone(),
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

/// A converge of one (cluster, principal) under way. Whatever cuts it off
/// — its own converge limit, or the step's outer time limit dropping the
/// whole step with it — may leave a call in flight, so a converge that
/// never reached `finish` fences the principal when dropped, and the
/// principal's guard keeps its lease (see `Fences`).
pub(crate) struct InFlight {
    cluster: String,
    principal: String,
    key: String,
    fences: Arc<Fences>,
    clock: Arc<dyn crate::clock::Clock>,
    term: Duration,
    /// On a shared store: the lease to renew for the fence's term.
    lease: Option<(String, String, Arc<dyn crate::store::Store>)>,
    done: bool,
}

impl InFlight {
    /// The converge returned (or its cut-off was fenced already).
    pub(crate) fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.fences.leave(&self.key);
        if self.done {
            return;
        }
        let now = self.clock.now();
        self.fences.set(&self.key, now + self.term);
        tracing::warn!(cluster = %self.cluster, principal = %self.principal, term = ?self.term, "step cut off mid-converge; no converge of this principal for one lease term");
        if let Some((name, holder, store)) = self.lease.take() {
            let until = now + self.term;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = store.try_lease(&name, &holder, until, now).await {
                        tracing::warn!(lease = %name, error = %e, "lease not renewed; it lapses at its old term");
                    }
                });
            }
        }
    }
}

impl Service {
    /// Marks a converge of (cluster, principal) as under way until
    /// `InFlight::finish`; see `InFlight`.
    pub(crate) fn in_flight(&self, cluster: &str, principal: &str) -> InFlight {
        let key = format!("{cluster}\u{0}{principal}");
        self.fences.enter(&key);
        InFlight {
            cluster: cluster.to_string(),
            principal: principal.to_string(),
            key,
            fences: self.fences.clone(),
            clock: self.clock.clone(),
            term: self.tunables.claim_ttl,
            lease: self.store.is_shared().then(|| {
                (
                    format!("principal/{cluster}/{principal}"),
                    self.replica.clone(),
                    self.store.clone(),
                )
            }),
            done: false,
        }
    }

    /// Runs one converge of (cluster, principal) under the converge limit;
    /// `None` when the limit cut it off, the principal then fenced. A step
    /// cut off around it by its own time limit fences it too (`InFlight`).
    pub(crate) async fn converge_limited<T>(
        &self,
        cluster: &str,
        principal: &str,
        converge: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let in_flight = self.in_flight(cluster, principal);
        let out = tokio::time::timeout(self.tunables.converge_limit, converge).await;
        if out.is_err() {
            self.fence(cluster, principal).await;
        }
        in_flight.finish();
        out.ok()
    }

    /// A converge of this (cluster, principal) was cut off by its time
    /// limit: fences it for one lease term (see `Fences`). On a shared
    /// store the lease is renewed for that term, so other replicas wait too;
    /// if the renewal cannot be written the lease lapses at its old term.
    pub(crate) async fn fence(&self, cluster: &str, principal: &str) {
        let term = self.tunables.claim_ttl;
        let key = format!("{cluster}\u{0}{principal}");
        self.fences.set(&key, self.clock.now() + term);
        tracing::warn!(cluster, principal, term = ?term, "converge cut off mid-call; no converge of this principal for one lease term");
        if self.store.is_shared() {
            let name = format!("principal/{cluster}/{principal}");
            let now = self.clock.now();
            match self
                .store
                .try_lease(&name, &self.replica, now + term, now)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(lease = %name, "lease already taken over; it was past its term")
                }
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "lease not renewed; it lapses at its old term")
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_holds_until_its_end_and_no_longer() {
        let fences = Fences::default();
        let now = OffsetDateTime::UNIX_EPOCH;
        let secs = time::Duration::seconds;
        assert_eq!(fences.active("k", now), None);
        fences.set("k", now + secs(5));
        fences.set("k", now + secs(1));
        assert_eq!(
            fences.active("k", now),
            Some(now + secs(5)),
            "a later cut-off never shortens a fence"
        );
        assert!(fences.is_set("k") && !fences.is_set("other"));
        assert_eq!(fences.active("other", now), None);
        assert_eq!(fences.active("k", now + secs(6)), None);
        assert!(!fences.is_set("k"), "an ended fence is gone");
    }

    #[test]
    fn a_fenced_principal_waits_at_most_one_term() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let term = Duration::from_secs(30);
        assert_eq!(
            fence_wait(now + time::Duration::seconds(3), now, term),
            Some(Duration::from_secs(3))
        );
        assert_eq!(fence_wait(now, now, term), Some(Duration::ZERO));
        assert_eq!(
            fence_wait(now + time::Duration::seconds(31), now, term),
            None
        );
    }
}
