//! What happens to a request when its time comes: grant after approval,
//! revoke at expiry, expire when nobody decided. Each step converges the
//! principal's access under its lock, then records the result in one CAS
//! write; a crash in between leaves a row that is still due, and the next
//! pass drives it again (converging is idempotent).

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tracing::Instrument;

use super::{Change, Notice, Service};
use crate::access::InForce;
use crate::domain::audit::{AuditEvent, ACTOR_TOLLGATE};
use crate::domain::grant::{intents_for, role_changed};
use crate::domain::request::{
    reminder_time, Claim, Event, Request, RequestId, RevokeIntent, RevokeReason, State,
};
use crate::store::StoreError;

/// Failed steps retry with capped exponential backoff; a revoke still
/// failing after this many attempts becomes `RevokeFailed` and is alerted
/// on, and retries go on.
const REVOKE_FAILED_AFTER: u32 = 5;
const RETRY_BASE: Duration = Duration::from_secs(2);
/// `TOLLGATE_RETRY_BASE` (a humantime duration) overrides the first retry
/// delay; outage drills and tests shorten it.
const RETRY_BASE_ENV: &str = "TOLLGATE_RETRY_BASE";

fn retry_base() -> Duration {
    static BASE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        std::env::var(RETRY_BASE_ENV)
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(RETRY_BASE)
    })
}
const RETRY_CAP: Duration = Duration::from_secs(300);
/// One stuck request must not hold up every other due one for long; a step
/// cut off here is simply driven again (it is idempotent). Kept well inside
/// the claim, so a step never outlives the claim it runs under.
fn drive_timeout() -> Duration {
    Duration::from_secs(60).min(claim_ttl() * 2 / 3)
}

/// A converge (reading the grants in force, then the cloud calls) that has
/// not finished by then is cut off and counts as a failed attempt of its
/// step: recorded, retried with backoff, counted and alerted on like any
/// other failure, never dropped. Well inside the step's own limit, which
/// leaves room to record the outcome (and, for a grant, one cleanup).
pub(super) fn converge_limit() -> Duration {
    drive_timeout() * 2 / 5
}

/// How long a replica's claim on a row lasts: the failover time when a
/// replica dies mid-step. `TOLLGATE_CLAIM_TTL` (humantime) overrides it for
/// drills and tests.
const CLAIM_TTL: Duration = Duration::from_secs(30);
const CLAIM_TTL_ENV: &str = "TOLLGATE_CLAIM_TTL";

pub fn claim_ttl() -> Duration {
    static TTL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TTL.get_or_init(|| {
        std::env::var(CLAIM_TTL_ENV)
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .filter(|d| *d >= Duration::from_secs(1))
            .unwrap_or(CLAIM_TTL)
    })
}

fn retry_backoff(attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    (retry_base() * factor).min(RETRY_CAP)
}

/// Crash tests arm one of these with `TOLLGATE_FAILPOINT=<name>`: the
/// process aborts right there, between a cloud call and the store write
/// that records it, exactly as a kill -9 would. Only in builds with the
/// `failpoints` feature (the test suite's); a release build ignores the
/// variable, so nobody who can set a pod's environment can make it abort.
#[cfg(not(feature = "failpoints"))]
fn failpoint(_name: &str) {}

#[cfg(feature = "failpoints")]
fn failpoint(name: &str) {
    let Ok(armed) = std::env::var("TOLLGATE_FAILPOINT") else {
        return;
    };
    if armed == name {
        tracing::error!(failpoint = name, "failpoint armed: aborting");
        std::process::abort();
    }
    // `stop:<name>` freezes the process there (SIGSTOP to itself) until it
    // is sent SIGCONT: a long pause at the worst moment, on demand.
    if armed.strip_prefix("stop:") == Some(name) {
        tracing::error!(failpoint = name, "failpoint armed: stopping");
        let _ = std::process::Command::new("kill")
            .arg("-STOP")
            .arg(std::process::id().to_string())
            .status();
    }
}

/// Up to a quarter more, so many grants failing together (one AWS outage)
/// do not all retry in the same instant.
fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    let extra = rand::thread_rng().gen_range(0..=d.as_millis() as u64 / 4);
    d + Duration::from_millis(extra)
}

/// A grant still owed access at `now`.
pub(super) fn in_force(r: &Request, now: OffsetDateTime) -> bool {
    r.state == State::Active && r.revoke.is_none() && r.expires_at.is_some_and(|e| e > now)
}

pub(super) fn rfc3339(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
}

/// Whether a step runs only when due (the scheduler) or regardless of its
/// retry time (start-up recovery).
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Due,
    Now,
}

impl Service {
    /// Runs everything due now.
    pub async fn run_due(self: &Arc<Self>) -> Result<usize, StoreError> {
        let ids = self.store.due(self.clock.now()).await?;
        Ok(self.drive_all(ids, When::Due).await)
    }

    /// Start-up recovery, before the HTTP port opens: every overdue grant is
    /// revoked (whatever its retry time), every approved request is granted
    /// or cleaned up, undecided requests past their deadline expire, and
    /// cards that were never posted are posted.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut ids = Vec::new();
        for r in self.store.live().await? {
            let overdue = r.expires_at.is_some_and(|e| e <= now) || r.revoke.is_some();
            match r.state {
                State::Approved => ids.push(r.id),
                State::Active | State::RevokeFailed if overdue => ids.push(r.id),
                State::Pending if r.approval_deadline <= now => ids.push(r.id),
                State::Pending if r.card.is_none() => {
                    let service = Arc::clone(self);
                    tokio::spawn(async move { service.post_card(&r.id).await });
                }
                _ => {}
            }
        }
        Ok(self.drive_all(ids, When::Now).await)
    }

    async fn drive_all(self: &Arc<Self>, ids: Vec<RequestId>, when: When) -> usize {
        let count = ids.len();
        // One task per request, so a burst of expiries is driven on every
        // core rather than polled in turn from this one.
        let mut work = tokio::task::JoinSet::new();
        for id in ids {
            let service = Arc::clone(self);
            work.spawn(async move {
                let span = tracing::info_span!("request", request_id = %id);
                if tokio::time::timeout(
                    drive_timeout(),
                    service.drive_when(&id, when).instrument(span),
                )
                .await
                .is_err()
                {
                    tracing::error!(request_id = %id, "step timed out; it will be driven again");
                }
            });
        }
        while work.join_next().await.is_some() {}
        count
    }

    pub async fn drive(self: &Arc<Self>, id: &RequestId) {
        let span = tracing::info_span!("request", request_id = %id);
        let step = self.drive_when(id, When::Due).instrument(span);
        if tokio::time::timeout(drive_timeout(), step).await.is_err() {
            tracing::error!(request_id = %id, "step timed out; it will be driven again");
        }
    }

    async fn drive_when(self: &Arc<Self>, id: &RequestId, when: When) {
        let req = match self.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "store read failed");
                return;
            }
        };
        let now = self.clock.now();
        match req.state {
            State::Pending => self.expire(id).await,
            State::Approved if req.extends.is_some() && !req.grant_abandoned() => {
                self.apply_extension(&req).await
            }
            State::Approved => self.grant(&req, when).await,
            // Only the reminder is due: the grant itself stays.
            State::Active
                if when == When::Due
                    && req.step_due().is_none_or(|t| t > now)
                    && req.reminder_due().is_some_and(|t| t <= now) =>
            {
                self.remind(id).await
            }
            State::Active | State::RevokeFailed => self.revoke(&req, when).await,
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
            .live_for(&req.access.cluster, &req.access.principal)
            .await?
            .into_iter()
            .filter(|r| r.id != req.id && in_force(r, now))
            .collect())
    }

    /// Converges `req`'s principal to `others`, plus `req` itself when
    /// `include` names its planned expiry. Any object created is credited to `req` when it is
    /// being granted, otherwise to a grant that stays.
    async fn converge_with(
        &self,
        req: &Request,
        others: &[Request],
        include: Option<OffsetDateTime>,
    ) -> Result<(), String> {
        let configured = self.config.cluster(&req.access.cluster).ok_or_else(|| {
            format!(
                "cluster {} is no longer in the configuration",
                req.access.cluster
            )
        })?;
        // The strategy the grant was made with, whatever the configuration
        // says now: a cluster switched to another strategy mid-grant still
        // has this grant's objects removed the way they were made.
        let strategy = req.access.strategy_or(configured.strategy);
        let cluster = if strategy == configured.strategy {
            std::borrow::Cow::Borrowed(configured)
        } else {
            let mut c = configured.clone();
            c.strategy = strategy;
            std::borrow::Cow::Owned(c)
        };
        let cluster = cluster.as_ref();
        let mut grants: Vec<InForce<'_>> = others
            .iter()
            .filter(|g| g.access.strategy_or(configured.strategy) == strategy)
            .map(|g| InForce {
                grant_id: g.id.as_str(),
                spec: &g.access,
                expires_at: g.expires_at,
            })
            .collect();
        if let Some(expires_at) = include {
            grants.push(InForce {
                grant_id: req.id.as_str(),
                spec: &req.access,
                expires_at: Some(expires_at),
            });
        }
        let creator = if include.is_some() {
            req.id.as_str()
        } else {
            grants
                .first()
                .map(|g| g.grant_id)
                .unwrap_or(req.id.as_str())
        };
        self.access
            .converge(cluster, &req.access.principal, &grants, creator)
            .await
            .map_err(|e| e.to_string())
    }

    /// Converges with `req` in or out, reading the other grants first.
    pub(super) async fn converge_for(
        &self,
        req: &Request,
        include: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<(), String> {
        let limit = self.converge_limit();
        let converge = async {
            let others = self
                .others_in_force(req, now)
                .await
                .map_err(|e| format!("cannot read the grants in force: {e}"))?;
            self.converge_with(req, &others, include).await
        };
        tokio::time::timeout(limit, converge)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "cut off after {:.1} s without an answer from the cluster",
                    limit.as_secs_f64()
                ))
            })
    }

    /// On a shared store, takes this row for this replica before any cloud
    /// call; `None` when another replica holds it. The row returned is what
    /// the step works from.
    async fn claim(&self, req: Request, now: OffsetDateTime) -> Option<Request> {
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
                    until: now + claim_ttl(),
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
    fn may_act(
        &self,
        guard: &super::principal::PrincipalGuard,
        req: &Request,
        point: &str,
    ) -> bool {
        failpoint(point);
        if guard.fresh_enough(self.clock.now()) {
            return true;
        }
        tracing::warn!(request_id = %req.id, "lease nearly lapsed before the cloud call; leaving the row to the next pass");
        false
    }

    /// The step's result is written only by the replica that claimed it: a
    /// replica paused past its claim finds the row taken and writes nothing.
    fn holds_claim(&self, row: &Request) -> bool {
        !self.store.is_shared() || row.claim.as_ref().is_some_and(|c| c.owner == self.replica)
    }

    /// Re-reads `id` under its principal's lock; `None` if it no longer
    /// needs this step.
    async fn fresh(&self, id: &RequestId, ok: impl Fn(&Request) -> bool) -> Option<Request> {
        match self.store.get(id).await {
            Ok(Some(r)) if ok(&r) => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "store read failed");
                None
            }
        }
    }

    async fn grant(self: &Arc<Self>, snapshot: &Request, when: When) {
        let Some(_working) = self.begin_work().await else {
            return;
        };
        let id = &snapshot.id;
        let Some(_guard) = self
            .principal(&snapshot.access.cluster, &snapshot.access.principal)
            .await
        else {
            return;
        };
        let now = self.clock.now();
        let Some(req) = self
            .fresh(id, |r| {
                r.state == State::Approved
                    && (when == When::Now || r.step_due().is_some_and(|t| t <= now))
            })
            .await
        else {
            return;
        };
        let Some(req) = self.claim(req, now).await else {
            return;
        };
        if !self.may_act(&_guard, &req, "after-grant-claim") {
            return;
        }
        let started = std::time::Instant::now();

        if !req.grant_abandoned() {
            // An approver approved a precise change; a role edited since
            // then fails the grant rather than granting something else.
            if let Some(changed) = self
                .config
                .cluster(&req.access.cluster)
                .and_then(|c| role_changed(c, &req.access))
            {
                tracing::error!(request_id = %id, error = %changed, "grant refused");
                // Only a row that recorded intents can have left anything.
                let cleanup = if req.intents.is_empty() {
                    None
                } else {
                    self.converge_for(&req, None, now).await.err()
                };
                let _ = self.record_grant_failure(&req, changed, cleanup).await;
                return;
            }
            // What the converge may create is in the store before any
            // create call: that record, not a tag, makes it Tollgate's.
            if !self.record_intents(&req).await {
                return;
            }
        }

        // A grant that failed, or was revoked before it was made, is only
        // ever converged away; it becomes terminal once that succeeds, so
        // nothing it may have left behind goes unrecorded.
        let abandoned = req.grant_abandoned();
        // The clock starts as access is put in place; Kubernetes objects carry
        // this expiry, so the row must record the same instant.
        let planned_expiry = now + req.duration;
        let reminder_before = self
            .config
            .cluster(&req.access.cluster)
            .and_then(|c| c.roles.get(&req.access.role))
            .map(|r| r.limits.reminder_before);
        // Spec 9.1: the principal shown to approvers is still the
        // requester's, or nothing is made.
        if !abandoned {
            if let Err(message) = self.recheck_identity(&req).await {
                // A retry after a crash may find access the first try made
                // (its intents are recorded): it goes with the refusal,
                // so the failure never leaves anything granted.
                let cleanup = if req.intents.is_empty() {
                    None
                } else {
                    self.converge_for(&req, None, now).await.err()
                };
                let _ = self.record_grant_failure(&req, message, cleanup).await;
                return;
            }
        }
        let mut verified = None;
        let (granted, failure) = if abandoned {
            let began = std::time::Instant::now();
            let removed = match self.converge_for(&req, None, now).await {
                // Revoked before it was granted: read back like any revoke
                // when a first try may have made something (its intents are
                // recorded before any create call), since the row ends as
                // `revoked`. With none recorded nothing was ever created:
                // there is nothing of this grant's to find, and reading
                // would only find someone else's access. A failed grant's
                // cleanup is not a revoke and is not read back.
                Ok(()) if req.failure.is_none() && req.intents.is_empty() => {
                    Ok(super::readback::Verified::At(self.clock.now()))
                }
                Ok(()) if req.failure.is_none() => self.read_back(&req, now, began).await,
                Ok(()) => Ok(super::readback::Verified::NotChecked),
                Err(message) => Err(message),
            };
            verified = removed.as_ref().ok().copied();
            (false, removed.err())
        } else {
            match self.converge_for(&req, Some(planned_expiry), now).await {
                Ok(()) => {
                    failpoint("after-grant-converge");
                    (true, None)
                }
                Err(message) => {
                    tracing::error!(request_id = %id, error = %message, "grant failed");
                    let cleanup = self.converge_for(&req, None, now).await.err();
                    let _ = self.record_grant_failure(&req, message, cleanup).await;
                    return;
                }
            }
        };
        let done_at = self.clock.now();
        let recorded = self
            .modify(id, |current| {
                if current.state != State::Approved || !self.holds_claim(current) {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                next.claim = None;
                if let Some(message) = &failure {
                    next.attempts += 1;
                    next.retry_at = Some(done_at + jittered(retry_backoff(next.attempts)));
                    tracing::error!(request_id = %next.id, error = %message, attempts = next.attempts, "cleanup of an abandoned grant failed; retrying");
                    // A revoke before the grant that keeps failing is a
                    // failing revoke: audited and alerted once at the same
                    // threshold. The row stays Approved (nothing was
                    // recorded as granted) and its step goes on retrying.
                    if next.failure.is_none() && next.attempts == REVOKE_FAILED_AFTER {
                        let audit = AuditEvent::for_request(
                            &next,
                            "revoke_failed",
                            ACTOR_TOLLGATE,
                            done_at,
                            json!({"error": message, "attempts": next.attempts, "before_grant": true}),
                        );
                        let notice = Notice::RevokeFailing {
                            error: message.clone(),
                        };
                        return Change::Write(Box::new(next), vec![audit], Some(notice));
                    }
                    return Change::Write(Box::new(next), Vec::new(), None);
                }
                next.attempts = 0;
                next.retry_at = None;
                if granted {
                    if next.apply(Event::Granted).is_err() {
                        return Change::Keep(None);
                    }
                    // The clock starts when access is put in place, not at
                    // approval.
                    next.activated_at = Some(now);
                    next.expires_at = Some(planned_expiry);
                    next.remind_at = reminder_before.and_then(|before| {
                        reminder_time(planned_expiry, next.duration, before)
                    });
                    let audit = AuditEvent::for_request(
                        &next,
                        "granted",
                        ACTOR_TOLLGATE,
                        done_at,
                        json!({
                            "expires_at": rfc3339(next.expires_at),
                            "policy": next.access.policy_arn,
                            "namespaces": next.access.namespaces,
                            "grant_ms": started.elapsed().as_millis() as u64,
                        }),
                    );
                    return Change::Write(Box::new(next), vec![audit], Some(Notice::Granted));
                }
                next.ended_at = Some(done_at);
                if next.failure.is_some() {
                    if next.apply(Event::GrantFailed).is_err() {
                        return Change::Keep(None);
                    }
                    return Change::Write(Box::new(next), Vec::new(), Some(Notice::GrantFailed));
                }
                if next.apply(Event::Revoked).is_err() {
                    return Change::Keep(None);
                }
                let mut details = super::admin::revoke_details(next.revoke.as_ref());
                details["before_grant"] = json!(true);
                if let Some(verified) = verified {
                    next.verified_at = verified.at();
                    verified.annotate(&mut details);
                }
                let audit = AuditEvent::for_request(&next, "revoked", ACTOR_TOLLGATE, done_at, details);
                Change::Write(Box::new(next), vec![audit], Some(Notice::Revoked))
            })
            .await;
        drop(_guard);
        if abandoned && req.failure.is_none() && failure.is_some() {
            self.metrics.revoke_failures.inc();
        }
        match recorded {
            Ok(Some(notice)) => {
                if granted {
                    if let Ok(Some(row)) = self.store.get(id).await {
                        if let (Some(approved), Some(active)) = (row.approved_at, row.activated_at)
                        {
                            let seconds = (active - approved).as_seconds_f64().max(0.0);
                            self.metrics.grant_seconds.observe(seconds);
                        }
                    }
                }
                tracing::info!(request_id = %id, granted, "grant step recorded");
                self.announce(id, notice);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "grant step made but not recorded; it will be driven again")
            }
        }
    }

    /// Writes on the row, in one CAS write, what granting it may create;
    /// false when the row could not be written (the step runs again).
    async fn record_intents(&self, req: &Request) -> bool {
        let Some(cluster) = self.config.cluster(&req.access.cluster) else {
            // The converge reports the missing cluster.
            return true;
        };
        let strategy = req.access.strategy_or(cluster.strategy);
        let wanted = intents_for(strategy, req.id.as_str(), &req.access);
        if wanted.iter().all(|i| req.intents.contains(i)) {
            return true;
        }
        let written = self
            .modify(&req.id, |current| {
                if current.state != State::Approved || !self.holds_claim(current) {
                    return Change::Keep(false);
                }
                let mut next = current.clone();
                for i in &wanted {
                    if !next.intents.contains(i) {
                        next.intents.push(i.clone());
                    }
                }
                Change::Write(Box::new(next), Vec::new(), true)
            })
            .await;
        match written {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(request_id = %req.id, error = %e, "cannot record what the grant will create; it will be driven again");
                false
            }
        }
    }

    /// A failed grant is audited at once. It becomes `Failed` only when
    /// whatever part of it was made is gone again; until then it stays
    /// Approved with the failure noted, and the cleanup is retried.
    async fn record_grant_failure(
        self: &Arc<Self>,
        req: &Request,
        message: String,
        cleanup: Option<String>,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let notice = self
            .modify(&req.id, |current| {
                if current.state != State::Approved || !self.holds_claim(current) {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                next.claim = None;
                next.failure = Some(message.clone());
                let mut details = json!({"error": message});
                let notice = match &cleanup {
                    None => {
                        if next.apply(Event::GrantFailed).is_err() {
                            return Change::Keep(None);
                        }
                        next.ended_at = Some(now);
                        Some(Notice::GrantFailed)
                    }
                    Some(cleanup_error) => {
                        tracing::error!(request_id = %next.id, error = %cleanup_error, "cleanup after failed grant failed; retrying");
                        details["cleanup_pending"] = json!(cleanup_error);
                        next.attempts += 1;
                        next.retry_at = Some(now + jittered(retry_backoff(next.attempts)));
                        Some(Notice::CardOnly)
                    }
                };
                let audit = AuditEvent::for_request(&next, "grant_failed", ACTOR_TOLLGATE, now, details);
                Change::Write(Box::new(next), vec![audit], notice)
            })
            .await?;
        if let Some(notice) = notice {
            self.announce(&req.id, notice);
        }
        Ok(())
    }

    async fn revoke(self: &Arc<Self>, snapshot: &Request, when: When) {
        let Some(_working) = self.begin_work().await else {
            return;
        };
        let id = &snapshot.id;
        let Some(_guard) = self
            .principal(&snapshot.access.cluster, &snapshot.access.principal)
            .await
        else {
            return;
        };
        let now = self.clock.now();
        let overdue = |r: &Request| r.expires_at.is_some_and(|e| e <= now) || r.revoke.is_some();
        let Some(req) = self
            .fresh(id, |r| {
                matches!(r.state, State::Active | State::RevokeFailed)
                    && match when {
                        When::Due => r.step_due().is_some_and(|t| t <= now),
                        When::Now => overdue(r),
                    }
            })
            .await
        else {
            return;
        };
        let Some(req) = self.claim(req, now).await else {
            return;
        };
        if !self.may_act(&_guard, &req, "after-revoke-claim") {
            return;
        }
        // Spec 10.2: the revoke counts once the cluster, read back, no
        // longer shows the access; until then it is a failed attempt.
        let began = std::time::Instant::now();
        let result = match self.converge_for(&req, None, now).await {
            Ok(()) => self.read_back(&req, now, began).await,
            Err(message) => Err(message),
        };
        if result.is_ok() {
            failpoint("after-revoke-converge");
        }
        let done_at = self.clock.now();
        let recorded = self
            .modify(id, |current| {
                if !matches!(current.state, State::Active | State::RevokeFailed)
                    || !self.holds_claim(current)
                {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                next.claim = None;
                match &result {
                    Ok(verified) => {
                        let _ = next.apply(Event::Revoked);
                        next.verified_at = verified.at();
                        if next.revoke.is_none() {
                            next.revoke = Some(RevokeIntent {
                                reason: RevokeReason::Expiry,
                                by: ACTOR_TOLLGATE.into(),
                                note: None,
                                at: next.expires_at.unwrap_or(done_at),
                            });
                        }
                        next.ended_at = Some(done_at);
                        next.retry_at = None;
                        let lateness = next
                            .expires_at
                            .map(|e| (done_at - e).as_seconds_f64().max(0.0));
                        let audit =
                            AuditEvent::for_request(&next, "revoked", ACTOR_TOLLGATE, done_at, {
                                let mut details =
                                    super::admin::revoke_details(next.revoke.as_ref());
                                details["lateness_seconds"] = json!(lateness);
                                details["attempts"] = json!(next.attempts + 1);
                                verified.annotate(&mut details);
                                details
                            });
                        let recovered = current.state == State::RevokeFailed;
                        Change::Write(
                            Box::new(next),
                            vec![audit],
                            Some(if recovered {
                                Notice::RevokeRecovered
                            } else {
                                Notice::Revoked
                            }),
                        )
                    }
                    Err(message) => {
                        next.attempts += 1;
                        next.retry_at = Some(done_at + jittered(retry_backoff(next.attempts)));
                        let mut audit = Vec::new();
                        let mut notice = None;
                        if next.attempts >= REVOKE_FAILED_AFTER && next.state == State::Active {
                            let _ = next.apply(Event::RevokeFailing);
                            audit.push(AuditEvent::for_request(
                                &next,
                                "revoke_failed",
                                ACTOR_TOLLGATE,
                                done_at,
                                json!({"error": message, "attempts": next.attempts}),
                            ));
                            notice = Some(Notice::RevokeFailing {
                                error: message.clone(),
                            });
                        }
                        Change::Write(Box::new(next), audit, notice)
                    }
                }
            })
            .await;
        drop(_guard);
        if let Err(message) = &result {
            self.metrics.revoke_failures.inc();
            tracing::error!(request_id = %id, error = %message, "revoke failed; will retry");
        }
        match recorded {
            Ok(Some(notice)) => {
                if result.is_ok() {
                    if let Some(expired) = req.expires_at {
                        let lateness = (done_at - expired).as_seconds_f64().max(0.0);
                        self.metrics.revoke_lateness_seconds.observe(lateness);
                    }
                    tracing::info!(request_id = %id, "revoked");
                }
                self.announce(id, notice);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "revoke step not recorded; it will run again")
            }
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
            self.announce(id, Notice::Expired);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the `failpoints` feature (a release build) an armed
    /// failpoint does nothing: this test would abort the test process
    /// otherwise. `cargo test --lib` (no features) runs it.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn release_builds_ignore_failpoints() {
        // SAFETY (edition 2021: not unsafe): the variable is only read by
        // failpoint(), and this is the only test that sets it.
        std::env::set_var("TOLLGATE_FAILPOINT", "release-check");
        failpoint("release-check");
        std::env::remove_var("TOLLGATE_FAILPOINT");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_backoff(1), Duration::from_secs(2));
        assert_eq!(retry_backoff(2), Duration::from_secs(4));
        assert_eq!(retry_backoff(5), Duration::from_secs(32));
        assert_eq!(retry_backoff(30), RETRY_CAP);
    }
}
