//! What happens to a request when its time comes: grant after approval,
//! revoke at expiry, expire when nobody decided. Each step converges the
//! principal's access under its lock, then records the result in one CAS
//! write; a crash in between leaves a row the next run picks up again.

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::{Change, Service};
use crate::access::InForce;
use crate::domain::audit::{AuditEvent, ACTOR_TOLLGATE};
use crate::domain::policy::ClusterPolicy;
use crate::domain::request::{Event, Request, RequestId, RevokeIntent, RevokeReason, State};
use crate::slack::blocks;
use crate::store::StoreError;

/// Failed revokes retry with capped exponential backoff, and are flagged
/// `RevokeFailed` (and alerted on) after this many attempts.
const REVOKE_FAILED_AFTER: u32 = 5;
const REVOKE_BACKOFF_BASE: Duration = Duration::from_secs(2);
const REVOKE_BACKOFF_CAP: Duration = Duration::from_secs(300);

fn revoke_backoff(attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    (REVOKE_BACKOFF_BASE * factor).min(REVOKE_BACKOFF_CAP)
}

/// A grant still owed access at `now`.
fn in_force(r: &Request, now: OffsetDateTime) -> bool {
    r.state == State::Active && r.revoke.is_none() && r.expires_at.is_some_and(|e| e > now)
}

impl Service {
    /// Runs everything due now; at start-up this is the recovery pass that
    /// revokes what expired while Tollgate was down.
    pub async fn run_due(self: &Arc<Self>) -> Result<usize, StoreError> {
        let ids = self.store.due(self.clock.now()).await?;
        let count = ids.len();
        let work = ids.into_iter().map(|id| {
            let service = Arc::clone(self);
            async move { service.drive(&id).await }
        });
        futures::future::join_all(work).await;
        Ok(count)
    }

    pub async fn drive(self: &Arc<Self>, id: &RequestId) {
        let req = match self.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "store read failed");
                return;
            }
        };
        let now = self.clock.now();
        let due = req.next_due().is_some_and(|t| t <= now);
        match req.state {
            State::Pending if due => self.expire(id).await,
            State::Approved => self.grant(id).await,
            State::Active | State::RevokeFailed if due => self.revoke(id).await,
            _ => {}
        }
    }

    /// The other grants of the same principal on the same cluster that
    /// still need access: the engine converges to their union.
    async fn others_in_force(
        &self,
        req: &Request,
        now: OffsetDateTime,
    ) -> Result<Vec<Request>, StoreError> {
        Ok(self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|r| {
                r.id != req.id
                    && r.access.cluster == req.access.cluster
                    && r.access.principal == req.access.principal
                    && in_force(r, now)
            })
            .collect())
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        req: &Request,
        grants: &[Request],
    ) -> Result<(), String> {
        let in_force: Vec<InForce<'_>> = grants
            .iter()
            .map(|g| InForce {
                grant_id: g.id.as_str(),
                spec: &g.access,
            })
            .collect();
        self.access
            .converge(cluster, &req.access.principal, &in_force, req.id.as_str())
            .await
            .map_err(|e| e.to_string())
    }

    fn lock_key(req: &Request) -> String {
        format!("{}\u{0}{}", req.access.cluster, req.access.principal)
    }

    async fn grant(self: &Arc<Self>, id: &RequestId) {
        let Ok(Some(snapshot)) = self.store.get(id).await else {
            return;
        };
        let _guard = self.locks.lock(Self::lock_key(&snapshot)).await;
        let req = match self.store.get(id).await {
            Ok(Some(r)) if r.state == State::Approved => r,
            _ => return,
        };
        let now = self.clock.now();
        let Some(cluster) = self.config.cluster(&req.access.cluster).cloned() else {
            return self
                .fail_grant(id, "the cluster is no longer configured".into())
                .await;
        };
        let mut grants = match self.others_in_force(&req, now).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "store read failed");
                return;
            }
        };
        let revoked_before_grant = req.revoke.is_some();
        if !revoked_before_grant {
            grants.push(req.clone());
        }
        let started = std::time::Instant::now();
        if let Err(message) = self.converge(&cluster, &req, &grants).await {
            tracing::error!(request_id = %id, error = %message, "grant failed");
            // Undo whatever part of this grant was made; the others stay.
            grants.retain(|g| g.id != req.id);
            if let Err(cleanup) = self.converge(&cluster, &req, &grants).await {
                tracing::error!(request_id = %id, error = %cleanup, "cleanup after failed grant failed; the reconciler will retry");
            }
            return self.fail_grant(id, message).await;
        }
        let active_at = self.clock.now();
        let recorded = self
            .modify(id, |current| {
                if current.state != State::Approved {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                if revoked_before_grant {
                    let _ = next.apply(Event::Revoked);
                    next.ended_at = Some(active_at);
                    let reason = next.revoke.as_ref().map(|r| r.reason.label()).unwrap_or("early");
                    let audit = AuditEvent::for_request(&next, "revoked", ACTOR_TOLLGATE, active_at, json!({"reason": reason, "before_grant": true}));
                    return Change::Write(Box::new(next), vec![audit], Some(false));
                }
                if next.apply(Event::Granted).is_err() {
                    return Change::Keep(None);
                }
                // The clock starts when access is in place, not at approval.
                next.activated_at = Some(active_at);
                next.expires_at = Some(active_at + next.duration);
                let audit = AuditEvent::for_request(
                    &next,
                    "granted",
                    ACTOR_TOLLGATE,
                    active_at,
                    json!({
                        "expires_at": next.expires_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
                        "policy": next.access.policy_arn,
                        "namespaces": next.access.namespaces,
                        "grant_ms": started.elapsed().as_millis() as u64,
                    }),
                );
                Change::Write(Box::new(next), vec![audit], Some(true))
            })
            .await;
        drop(_guard);
        match recorded {
            Ok(Some(true)) => {
                tracing::info!(request_id = %id, "granted");
                if let Ok(Some(current)) = self.store.get(id).await {
                    self.refresh_card(&current).await;
                    self.dm(
                        &current.requester.user_id,
                        blocks::granted_dm(&current, &cluster.region),
                    )
                    .await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "grant made but not recorded; it will be driven again")
            }
        }
    }

    async fn fail_grant(&self, id: &RequestId, message: String) {
        let now = self.clock.now();
        let result = self
            .modify(id, |current| {
                let mut next = current.clone();
                if next.apply(Event::GrantFailed).is_err() {
                    return Change::Keep(false);
                }
                next.failure = Some(message.clone());
                next.ended_at = Some(now);
                let audit = AuditEvent::for_request(
                    &next,
                    "grant_failed",
                    ACTOR_TOLLGATE,
                    now,
                    json!({"error": message}),
                );
                Change::Write(Box::new(next), vec![audit], true)
            })
            .await;
        if let Ok(true) = result {
            if let Ok(Some(current)) = self.store.get(id).await {
                self.refresh_card(&current).await;
                self.dm(&current.requester.user_id, blocks::failed_dm(&current))
                    .await;
            }
        }
    }

    async fn revoke(self: &Arc<Self>, id: &RequestId) {
        let Ok(Some(snapshot)) = self.store.get(id).await else {
            return;
        };
        let _guard = self.locks.lock(Self::lock_key(&snapshot)).await;
        let now = self.clock.now();
        let req = match self.store.get(id).await {
            Ok(Some(r))
                if matches!(r.state, State::Active | State::RevokeFailed)
                    && r.next_due().is_some_and(|t| t <= now) =>
            {
                r
            }
            _ => return,
        };
        let Some(cluster) = self.config.cluster(&req.access.cluster).cloned() else {
            tracing::error!(request_id = %id, cluster = %req.access.cluster, "cannot revoke: cluster no longer configured");
            return;
        };
        let others = match self.others_in_force(&req, now).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "store read failed");
                return;
            }
        };
        let result = self.converge(&cluster, &req, &others).await;
        let done_at = self.clock.now();
        let recorded = self
            .modify(id, |current| {
                if !matches!(current.state, State::Active | State::RevokeFailed) {
                    return Change::Keep(false);
                }
                let mut next = current.clone();
                match &result {
                    Ok(()) => {
                        let _ = next.apply(Event::Revoked);
                        if next.revoke.is_none() {
                            next.revoke = Some(RevokeIntent {
                                reason: RevokeReason::Expiry,
                                by: ACTOR_TOLLGATE.into(),
                                at: next.expires_at.unwrap_or(done_at),
                            });
                        }
                        next.ended_at = Some(done_at);
                        next.retry_at = None;
                        let reason = next.revoke.as_ref().map(|r| r.reason.label()).unwrap_or("expiry");
                        let lateness = next.expires_at.map(|e| (done_at - e).as_seconds_f64().max(0.0));
                        let audit = AuditEvent::for_request(
                            &next,
                            "revoked",
                            ACTOR_TOLLGATE,
                            done_at,
                            json!({"reason": reason, "lateness_seconds": lateness, "attempts": next.revoke_attempts + 1}),
                        );
                        Change::Write(Box::new(next), vec![audit], true)
                    }
                    Err(message) => {
                        next.revoke_attempts += 1;
                        next.retry_at = Some(done_at + revoke_backoff(next.revoke_attempts));
                        let mut audit = Vec::new();
                        if next.revoke_attempts == REVOKE_FAILED_AFTER && next.state == State::Active {
                            let _ = next.apply(Event::RevokeFailing);
                            audit.push(AuditEvent::for_request(
                                &next,
                                "revoke_failed",
                                ACTOR_TOLLGATE,
                                done_at,
                                json!({"error": message, "attempts": next.revoke_attempts}),
                            ));
                        }
                        Change::Write(Box::new(next), audit, false)
                    }
                }
            })
            .await;
        drop(_guard);
        match (&result, recorded) {
            (Ok(()), Ok(true)) => {
                tracing::info!(request_id = %id, "revoked");
                if let Ok(Some(current)) = self.store.get(id).await {
                    self.refresh_card(&current).await;
                    self.dm(
                        &current.requester.user_id,
                        blocks::revoked_dm(&current, done_at),
                    )
                    .await;
                }
            }
            (Err(message), _) => {
                tracing::error!(request_id = %id, error = %message, "revoke failed; will retry")
            }
            (_, Err(e)) => {
                tracing::error!(request_id = %id, error = %e, "revoke made but not recorded; it will run again")
            }
            _ => {}
        }
    }

    async fn expire(self: &Arc<Self>, id: &RequestId) {
        let now = self.clock.now();
        let result = self
            .modify(id, |current| {
                if current.state != State::Pending || current.approval_deadline > now {
                    return Change::Keep(false);
                }
                let mut next = current.clone();
                if next.apply(Event::ApprovalTimeout).is_err() {
                    return Change::Keep(false);
                }
                next.ended_at = Some(now);
                let audit =
                    AuditEvent::for_request(&next, "expired", ACTOR_TOLLGATE, now, json!({}));
                Change::Write(Box::new(next), vec![audit], true)
            })
            .await;
        if let Ok(true) = result {
            if let Ok(Some(current)) = self.store.get(id).await {
                self.refresh_card(&current).await;
                self.dm(&current.requester.user_id, blocks::expired_dm(&current))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(revoke_backoff(1), Duration::from_secs(2));
        assert_eq!(revoke_backoff(2), Duration::from_secs(4));
        assert_eq!(revoke_backoff(5), Duration::from_secs(32));
        assert_eq!(revoke_backoff(30), REVOKE_BACKOFF_CAP);
    }
}
