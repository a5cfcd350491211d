//! The steps that change access, and when they run: grant after approval,
//! revoke at expiry or on request, expire when nobody decided. Each step
//! converges the principal's access under its lock and claim
//! (`service::claims`), then records what `domain::lifecycle` decides in
//! one CAS write; a crash in between leaves a row that is still due, and
//! the next pass drives it again (converging is idempotent). `run_due` is
//! the scheduler's pass, `recover` the start-up one (before the port opens),
//! `drive` the immediate one after a click or command.

use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tracing::Instrument;

use super::error::{GrantRefusal, ServiceError};
use super::readback::RevokeTimes;
use super::{failpoint, Change, Service};
use crate::access::InForce;
use crate::domain::grant::{intents_for, namespace_refused, role_changed};
use crate::domain::lifecycle::Mode;
use crate::domain::lifecycle::{self, in_force};
use crate::domain::readback::Verified;
use crate::domain::request::{Request, RequestId, State};
use crate::domain::row_check::{self, capped_expiry, expiry_cap, Members};
use crate::store::StoreError;

/// Failed steps retry with capped exponential backoff from
/// `Tunables::retry_base` (`domain::lifecycle::REVOKE_FAILED_AFTER` says
/// when a failing revoke is alerted on; retries go on).
const RETRY_CAP: Duration = Duration::from_secs(300);

fn retry_backoff(base: Duration, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    (base * factor).min(RETRY_CAP)
}

/// Up to a quarter more, so many grants failing together (one AWS outage)
/// do not all retry in the same instant.
fn jittered(d: Duration) -> Duration {
    use rand::Rng;
    let extra = rand::thread_rng().gen_range(0..=d.as_millis() as u64 / 4);
    d + Duration::from_millis(extra)
}

/// Whether a step runs only when due (the scheduler) or regardless of its
/// retry time (start-up recovery).
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Due,
    Now,
}

impl Service {
    /// How long a step that has failed `attempts` times waits before the
    /// next try.
    fn retry_delay(&self, attempts: u32) -> Duration {
        jittered(retry_backoff(self.tunables.retry_base, attempts))
    }

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
            if r.dry_run == self.config.dry_run && !self.intact(&r) {
                // Ended (spec 9.8); whatever it recorded to revoke or
                // clean up is driven with the rest, before the port opens.
                if self.quarantine(&r).await {
                    ids.push(r.id);
                }
                continue;
            }
            if !self.acts_on(&r) {
                continue;
            }
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
                    service.tunables.step_limit(),
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
        if tokio::time::timeout(self.tunables.step_limit(), step)
            .await
            .is_err()
        {
            tracing::error!(request_id = %id, "step timed out; it will be driven again");
        }
    }

    async fn drive_when(self: &Arc<Self>, id: &RequestId, when: When) {
        let req = match self.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                self.store_failed(id, &e, "store read failed");
                return;
            }
        };
        if req.dry_run == self.config.dry_run && !self.intact(&req) {
            self.quarantine(&req).await;
            return;
        }
        if !self.acts_on(&req) {
            // Debug, not warn: on a table shared with a replica of the other
            // mode (start-up refuses any other way to get here) the row is
            // due on every pass until that replica drives it.
            tracing::debug!(request_id = %id, dry_run = req.dry_run, "row made in the other mode (serve --dry-run or live); not acted on");
            return;
        }
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
    pub(super) async fn others_in_force(
        &self,
        req: &Request,
        now: OffsetDateTime,
    ) -> Result<Vec<Request>, StoreError> {
        Ok(self
            .store
            .live_for(&req.access.cluster, &req.access.principal)
            .await?
            .into_iter()
            .filter(|r| r.id != req.id && in_force(r, now) && self.acts_on(r))
            .collect())
    }

    /// Spec 9.8: a live server never acts on rows `serve --dry-run` made,
    /// nor a dry-run server on live ones; with a row integrity key, only a
    /// row carrying a valid MAC is acted on or counted in force (one that
    /// fails is ended by `quarantine`).
    pub(crate) fn acts_on(&self, row: &Request) -> bool {
        row.dry_run == self.config.dry_run && self.intact(row)
    }

    /// Whether `row` passes the integrity check (always, with no key).
    pub(crate) fn intact(&self, row: &Request) -> bool {
        crate::domain::integrity::intact(self.tunables.integrity.as_ref(), row)
    }

    /// Converges `req`'s principal to `others`, plus `req` itself when
    /// `include` names its planned expiry. Any object created is credited to `req` when it is
    /// being granted, otherwise to a grant that stays.
    pub(super) async fn converge_with(
        &self,
        req: &Request,
        others: &[Request],
        include: Option<OffsetDateTime>,
    ) -> Result<(), ServiceError> {
        let configured = self
            .config
            .cluster(&req.access.cluster)
            .ok_or_else(|| ServiceError::ClusterGone(req.access.cluster.clone()))?;
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
        // Spec 9.8: what the cloud side carries (backstop schedules,
        // expiry annotations) never follows an expiry written past the
        // total a grant may last.
        let now = self.clock.now();
        let mut grants: Vec<InForce<'_>> = others
            .iter()
            .filter(|g| g.access.strategy_or(configured.strategy) == strategy)
            .map(|g| InForce {
                expires_at: capped_expiry(g, configured, now),
                ..InForce::of(g)
            })
            .collect();
        if let Some(expires_at) = include {
            let capped = configured
                .roles
                .get(&req.access.role)
                .zip(req.activated_at.or(req.first_attempt_at))
                .map(|(role, started)| {
                    let started = started.min(now);
                    expires_at.min(expiry_cap(started, role.limits.max_total_duration))
                })
                .unwrap_or(expires_at);
            grants.push(InForce {
                grant_id: req.id.as_str(),
                spec: &req.access,
                expires_at: Some(capped),
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
        let converged = self
            .access
            .converge(cluster, &req.access.principal, &grants, creator)
            .await?;
        self.report_baselines_gone(
            &cluster.name,
            &req.access.principal,
            req.id.as_str(),
            &converged.baselines_gone,
        )
        .await;
        Ok(())
    }

    /// Converges with `req` in or out, reading the other grants first.
    pub(super) async fn converge_for(
        &self,
        req: &Request,
        include: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<(), ServiceError> {
        let limit = self.tunables.converge_limit;
        let converge = async {
            let others = self
                .others_in_force(req, now)
                .await
                .map_err(ServiceError::InForceUnreadable)?;
            self.converge_with(req, &others, include).await
        };
        self.converge_limited(&req.access.cluster, &req.access.principal, converge)
            .await
            .unwrap_or(Err(ServiceError::CutOff(limit)))
    }

    /// Re-reads `id` under its principal's lock; `None` if it no longer
    /// needs this step.
    async fn fresh(&self, id: &RequestId, ok: impl Fn(&Request) -> bool) -> Option<Request> {
        match self.store.get(id).await {
            Ok(Some(r)) if ok(&r) => Some(r),
            Ok(_) => None,
            Err(e) => {
                self.store_failed(id, &e, "store read failed");
                None
            }
        }
    }

    async fn grant(self: &Arc<Self>, snapshot: &Request, when: When) {
        // Memberships from the snapshot: a row whose mode changed since
        // is judged against groups asked for another mode and fails.
        // Asked before the work permit: a lookup waiting out Slack's
        // `Retry-After` holds up neither notices nor a shutdown's drain.
        let members = if snapshot.grant_abandoned() {
            Members::default()
        } else {
            self.row_members(snapshot).await
        };
        // Spec 9.1: the principal shown to approvers is still the
        // requester's, or nothing is made. Asked fresh from Slack before
        // the principal's lock, so a revoke of another of its grants never
        // waits on Slack behind this one; requester and access never
        // change on a row, so the answer holds for the row read under it.
        let identity = if snapshot.grant_abandoned() {
            Ok(())
        } else {
            self.recheck_identity(snapshot).await
        };
        let Some(_working) = self.begin_work().await else {
            return;
        };
        let id = &snapshot.id;
        let Some(guard) = self
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
        if !self.may_act(&guard, &req, "after-grant-claim") {
            return;
        }
        let started = std::time::Instant::now();

        if !req.grant_abandoned() {
            // An approver approved a precise change; a role edited since
            // then fails the grant rather than granting something else.
            // Likewise a namespace denied since (spec 9.7).
            if let Some(refusal) = self.config.cluster(&req.access.cluster).and_then(|c| {
                role_changed(c, &req.access)
                    .map(GrantRefusal::RoleChanged)
                    .or_else(|| {
                        namespace_refused(c, &req.access).map(GrantRefusal::NamespaceRefused)
                    })
            }) {
                tracing::error!(request_id = %id, error = %refusal, "grant refused");
                // Only a row that recorded intents can have left anything.
                let cleanup = if req.intents.is_empty() {
                    None
                } else {
                    self.converge_for(&req, None, now).await.err()
                };
                self.record_grant_failure(&req, refusal.into(), cleanup)
                    .await;
                return;
            }
            // Spec 9.8: the row is what the store says was approved, and
            // anyone who can write the store could have written it; it is
            // granted only if it is what Tollgate itself would have written
            // under the configuration in force now.
            if let Some(why) = self.invalid_row(&req, &members) {
                tracing::error!(request_id = %id, error = %why, "stored row refused");
                let cleanup = if req.intents.is_empty() {
                    None
                } else {
                    self.converge_for(&req, None, now).await.err()
                };
                let refusal = GrantRefusal::InvalidRow(why).into();
                self.record_grant_failure(&req, refusal, cleanup).await;
                return;
            }
        }
        let req = if req.grant_abandoned() {
            req
        } else {
            // What the converge may create is in the store before any
            // create call: that record, not a tag, makes it Tollgate's.
            // The same write fixes when the grant started (spec 9.8).
            match self.record_intents(&req, now).await {
                Some(row) => row,
                None => return,
            }
        };

        // A grant that failed, or was revoked before it was made, is only
        // ever converged away; it becomes terminal once that succeeds, so
        // nothing it may have left behind goes unrecorded.
        let abandoned = req.grant_abandoned();
        // The clock starts when the grant is first attempted (recorded
        // with its intents, before any create call); Kubernetes objects
        // carry this expiry, so the row records the same instant. A
        // re-drive after a crash reuses it: it never moves the expiry.
        let started_at = req.first_attempt_at.unwrap_or(now);
        let planned_expiry = req.planned_expiry(now);
        let reminder_before = self
            .config
            .cluster(&req.access.cluster)
            .and_then(|c| c.roles.get(&req.access.role))
            .map(|r| r.limits.reminder_before);
        if !abandoned {
            let refused = if planned_expiry <= now {
                // A re-drive after the grant's whole time went by: there
                // is nothing left to grant.
                Err(GrantRefusal::EndedBeforeGranted)
            } else if snapshot.grant_abandoned() {
                // Not asked above; never granted without the check.
                self.recheck_identity(&req).await
            } else {
                identity
            };
            if let Err(refusal) = refused {
                // A retry after a crash may find access the first try made
                // (its intents are recorded): it goes with the refusal,
                // so the failure never leaves anything granted.
                let cleanup = if req.intents.is_empty() {
                    None
                } else {
                    self.converge_for(&req, None, now).await.err()
                };
                self.record_grant_failure(&req, refusal.into(), cleanup)
                    .await;
                return;
            }
        }
        let mut verified = None;
        let (granted, failure) = if abandoned {
            // Revoked before it was granted: read back like any revoke
            // when a first try may have made something (its intents are
            // recorded before any create call), since the row ends as
            // `revoked`. With none recorded nothing was ever created:
            // there is nothing of this grant's to find, and reading would
            // only find someone else's access. A failed grant's cleanup is
            // not a revoke and is not read back.
            let removed = if req.failure.is_none() && !req.intents.is_empty() {
                self.remove_and_read_back(&req, now, &mut RevokeTimes::default())
                    .await
            } else {
                self.converge_for(&req, None, now).await.map(|()| {
                    if req.failure.is_none() {
                        Verified::At(self.clock.now())
                    } else {
                        Verified::NotChecked
                    }
                })
            };
            verified = removed.as_ref().ok().copied();
            (false, removed.err())
        } else {
            match self.converge_for(&req, Some(planned_expiry), now).await {
                Ok(()) => {
                    failpoint("after-grant-converge");
                    (true, None)
                }
                Err(error) => {
                    tracing::error!(request_id = %id, error = %error, "grant failed");
                    // A converge cut off mid-call may still have a call in
                    // flight: reading now could judge before it lands (and
                    // forget a baseline it then contradicts). The principal
                    // is fenced for a lease term; the cleanup is the next
                    // pass's, after it.
                    let cleanup = if matches!(error, ServiceError::CutOff(_)) {
                        Some(ServiceError::CutOff(self.tunables.converge_limit))
                    } else {
                        self.converge_for(&req, None, now).await.err()
                    };
                    self.record_grant_failure(&req, error, cleanup).await;
                    return;
                }
            }
        };
        if let Some(error) = &failure {
            self.metrics.failed("grant", error.metric_label());
        }
        let done_at = self.clock.now();
        let made = lifecycle::GrantMade {
            activated_at: started_at,
            reminder_before,
            grant_ms: started.elapsed().as_millis() as u64,
        };
        if let Some(error) = &failure {
            tracing::error!(request_id = %id, error = %error, "cleanup of an abandoned grant failed; retrying");
        }
        let recorded = self
            .modify(id, |current| {
                if current.state != State::Approved || !self.holds_claim(current) {
                    return Change::Keep(None);
                }
                let effects = match &failure {
                    Some(error) => {
                        lifecycle::cleanup_failed(current, &error.to_string(), done_at, |n| {
                            self.retry_delay(n)
                        })
                    }
                    None if granted => lifecycle::granted(current, &made, done_at),
                    None => lifecycle::abandoned_cleared(
                        current,
                        verified.unwrap_or(Verified::NotChecked),
                        done_at,
                    ),
                };
                Change::event(id, effects)
            })
            .await;
        drop(guard);
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
            Err(e) => self.store_failed(
                id,
                &e,
                "grant step made but not recorded; it will be driven again",
            ),
        }
    }

    /// The group memberships the row check of `req` needs (spec 9.8),
    /// asked of Slack now, not remembered from the approval. Asked before
    /// the principal's lock is taken: a revoke waiting on that lock never
    /// waits on Slack.
    pub(super) async fn row_members(&self, req: &Request) -> Members {
        let mut members = Members::default();
        let Some(cluster) = self.config.cluster(&req.access.cluster) else {
            return members;
        };
        // Asked fresh (spec 9.9): a member removed from a group since the
        // approval is seen now; only a 429 lets a young answer stand in.
        let fresh = self.asked_now();
        if let Some(role) = cluster.roles.get(&req.access.role) {
            let by = req.decided_by.as_deref();
            members.requesters = self.group_members(&role.requesters, fresh).await;
            if by == Some(Mode::AutoApproved.label()) {
                members.auto_approve = self.group_members(&role.auto_approve, fresh).await;
            } else if by == Some(Mode::BreakGlass.label()) {
                if let Some(bg) = &cluster.break_glass {
                    members.break_glass = self.group_members(&bg.allowed, fresh).await;
                }
            } else {
                members.approvers = self.group_members(&role.approvers, fresh).await;
            }
        }
        members
    }

    /// Spec 9.8: why `req` may not be granted as stored, if it may not,
    /// judged with memberships `row_members` asked for.
    pub(super) fn invalid_row(&self, req: &Request, members: &Members) -> Option<String> {
        // A cluster no longer configured is reported by the converge.
        let cluster = self.config.cluster(&req.access.cluster)?;
        row_check::invalid_row(req, cluster, members, self.clock.now())
    }

    /// Writes on the row, in one CAS write, what granting it may create
    /// and when the grant was first attempted (`now`, unless a previous
    /// attempt recorded it); the row as written, or `None` when it could
    /// not be written (the step runs again).
    async fn record_intents(&self, req: &Request, now: OffsetDateTime) -> Option<Request> {
        let wanted = match self.config.cluster(&req.access.cluster) {
            Some(cluster) => {
                let strategy = req.access.strategy_or(cluster.strategy);
                intents_for(strategy, req.id.as_str(), &req.access)
            }
            // The converge reports the missing cluster.
            None => Vec::new(),
        };
        if req.first_attempt_at.is_some() && wanted.iter().all(|i| req.intents.contains(i)) {
            return Some(req.clone());
        }
        let written = self
            .modify(&req.id, |current| {
                // Only the row that was checked is granted: one changed in
                // between (beyond this step's own bookkeeping) is driven
                // again from the top, and checked again.
                if current.state != State::Approved
                    || !self.holds_claim(current)
                    || !same_request(current, req)
                {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                for i in &wanted {
                    if !next.intents.contains(i) {
                        next.intents.push(i.clone());
                    }
                }
                next.first_attempt_at = next.first_attempt_at.or(Some(now));
                Change::Write(Box::new(next.clone()), Vec::new(), Some(next))
            })
            .await;
        match written {
            // Later writes read the row afresh (`modify`), so the version
            // this copy carries is never used as a guard.
            Ok(row) => row,
            Err(e) => {
                self.store_failed(
                    &req.id,
                    &e,
                    "cannot record what the grant will create; it will be driven again",
                );
                None
            }
        }
    }

    /// A failed grant is audited at once. It becomes `Failed` only when
    /// whatever part of it was made is gone again; until then it stays
    /// Approved with the failure noted, and the cleanup is retried.
    /// A store that cannot take the record leaves the row Approved and due:
    /// the next pass fails (or succeeds) again and records it then.
    async fn record_grant_failure(
        self: &Arc<Self>,
        req: &Request,
        error: ServiceError,
        cleanup: Option<ServiceError>,
    ) {
        self.metrics.failed("grant", error.metric_label());
        let message = error.to_string();
        let invalid = match &error {
            ServiceError::GrantRefused(GrantRefusal::InvalidRow(why)) => Some(why.clone()),
            _ => None,
        };
        let now = self.clock.now();
        let cleanup = cleanup.map(|e| e.to_string());
        if let Some(cleanup_error) = &cleanup {
            tracing::error!(request_id = %req.id, error = %cleanup_error, "cleanup after failed grant failed; retrying");
        }
        let notice = self
            .modify(&req.id, |current| {
                if current.state != State::Approved || !self.holds_claim(current) {
                    return Change::Keep(None);
                }
                let mut effects = match &invalid {
                    Some(why) => {
                        lifecycle::row_rejected(current, why, cleanup.as_deref(), now, |n| {
                            self.retry_delay(n)
                        })
                    }
                    None => {
                        lifecycle::grant_failed(current, &message, cleanup.as_deref(), now, |n| {
                            self.retry_delay(n)
                        })
                    }
                };
                if let (Ok(effects), Some(reason)) = (effects.as_mut(), error.audit_reason()) {
                    for event in &mut effects.audit {
                        event.details["reason"] = serde_json::json!(reason);
                    }
                }
                Change::event(&req.id, effects)
            })
            .await;
        match notice {
            Ok(Some(notice)) => self.announce(&req.id, notice),
            Ok(None) => {}
            Err(e) => self.store_failed(
                &req.id,
                &e,
                "grant failure not recorded; it will be driven again",
            ),
        }
    }

    async fn revoke(self: &Arc<Self>, snapshot: &Request, when: When) {
        let started = std::time::Instant::now();
        let Some(_working) = self.begin_work().await else {
            return;
        };
        let id = &snapshot.id;
        let Some(guard) = self
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
        if !self.may_act(&guard, &req, "after-revoke-claim") {
            return;
        }
        // Spec 10.2: the revoke counts once the cluster, read back, no
        // longer shows the access; until then it is a failed attempt.
        let claimed = started.elapsed();
        let mut times = RevokeTimes::default();
        let result = self.remove_and_read_back(&req, now, &mut times).await;
        if result.is_ok() {
            failpoint("after-revoke-converge");
        }
        let recording = std::time::Instant::now();
        let done_at = self.clock.now();
        let recorded = self
            .modify(id, |current| {
                if !matches!(current.state, State::Active | State::RevokeFailed)
                    || !self.holds_claim(current)
                {
                    return Change::Keep(None);
                }
                let effects = match &result {
                    Ok(verified) => lifecycle::revoked(current, *verified, done_at),
                    Err(error) => {
                        lifecycle::revoke_failed(current, &error.to_string(), done_at, |n| {
                            self.retry_delay(n)
                        })
                    }
                };
                Change::event(id, effects)
            })
            .await;
        let record = recording.elapsed();
        drop(guard);
        if let Err(error) = &result {
            self.metrics.revoke_failures.inc();
            self.metrics.failed("revoke", error.metric_label());
            tracing::error!(request_id = %id, error = %error, "revoke failed; will retry");
        }
        match recorded {
            Ok(Some(notice)) => {
                if result.is_ok() {
                    if let Some(expired) = req.expires_at {
                        let lateness = (done_at - expired).as_seconds_f64().max(0.0);
                        self.metrics.revoke_lateness_seconds.observe(lateness);
                    }
                    // Milliseconds per step: the lock, lease and claim
                    // (`claimed`), the steps of `remove_and_read_back`,
                    // and the write that records it with its audit event.
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::info!(
                        request_id = %id,
                        claimed_ms = ms(claimed),
                        in_force_ms = ms(times.in_force),
                        converge_ms = ms(times.converge),
                        remove_ms = ms(times.remove),
                        read_back_ms = ms(times.read_back),
                        record_ms = ms(record),
                        "revoked"
                    );
                }
                self.announce(id, notice);
            }
            Ok(None) => {}
            Err(e) => self.store_failed(id, &e, "revoke step not recorded; it will run again"),
        }
    }

    async fn expire(self: &Arc<Self>, id: &RequestId) {
        let now = self.clock.now();
        let result = self
            .modify(id, |current| {
                Change::event(id, lifecycle::expire(current, now))
            })
            .await;
        match result {
            Ok(Some(notice)) => self.announce(id, notice),
            Ok(None) => {}
            Err(e) => self.store_failed(id, &e, "expiry not recorded; it will run again"),
        }
    }
}

/// Whether `a` and `b` are the same request apart from what the grant
/// step itself writes (version, claim, intents, first attempt, MAC).
fn same_request(a: &Request, b: &Request) -> bool {
    let mut a = a.clone();
    a.version = b.version;
    a.claim = b.claim.clone();
    a.intents = b.intents.clone();
    a.first_attempt_at = b.first_attempt_at;
    a.mac = b.mac.clone();
    a == *b
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
        let base = Duration::from_secs(2);
        assert_eq!(retry_backoff(base, 1), Duration::from_secs(2));
        assert_eq!(retry_backoff(base, 2), Duration::from_secs(4));
        assert_eq!(retry_backoff(base, 5), Duration::from_secs(32));
        assert_eq!(retry_backoff(base, 30), RETRY_CAP);
    }
}
