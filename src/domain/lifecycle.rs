//! What each lifecycle event does to a request: one pure function per
//! event taking the row as read, the event's facts and `now`, and giving
//! the new row, the audit events to write with it and the notice to send
//! afterwards — or a typed refusal when the event does not apply to the row
//! any more. `transition` (the state table) is asked inside each; nothing
//! else sets a state. The service only loads the row, calls one of these,
//! writes the result in one CAS write and performs the I/O around it.

use serde_json::{json, Value};
use std::time::Duration;
use time::OffsetDateTime;

use super::audit::{AuditEvent, ACTOR_TOLLGATE};
use super::duration::format_duration;
use super::readback::Verified;
use super::request::{
    reminder_time, Event, IllegalTransition, Request, RevokeIntent, RevokeReason, State, Vote,
};

/// `RevokeIntent::by` for a revoke forced from the command line.
pub const CLI_PREFIX: &str = "cli:";

/// A revoke still failing after this many attempts turns the grant
/// `RevokeFailed` and is alerted on; retries go on.
pub const REVOKE_FAILED_AFTER: u32 = 5;

/// What the people involved are told after a state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    CardOnly,
    Granted,
    GrantFailed,
    Denied,
    Expired,
    Revoked,
    RevokeFailing {
        error: String,
    },
    /// A revoke that had been alerted on finally went through.
    RevokeRecovered,
    /// An approved extension moved its grant's expiry.
    Extended,
    /// A stored row failed the check against the configuration (spec
    /// 9.8): the requester is told the grant failed, the security channel
    /// that the store holds a row Tollgate would not have written.
    InvalidRow {
        why: String,
    },
}

/// What an event does: the row to write, its audit events, and what to
/// tell people once it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Effects {
    pub row: Request,
    pub audit: Vec<AuditEvent>,
    pub notice: Option<Notice>,
}

impl Effects {
    fn new(row: Request) -> Self {
        Effects {
            row,
            audit: Vec::new(),
            notice: None,
        }
    }

    fn audit(mut self, event: &str, actor: &str, now: OffsetDateTime, details: Value) -> Self {
        self.audit.push(AuditEvent::for_request(
            &self.row, event, actor, now, details,
        ));
        self
    }

    fn notice(mut self, notice: Notice) -> Self {
        self.notice = Some(notice);
        self
    }
}

/// Why an event does not apply to the row as it is now; nothing is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The request is no longer (or was never) waiting for a decision; the
    /// state it is in, `Expired` once its deadline has passed.
    #[error("the request is already {}", .0.label())]
    NotPending(State),
    #[error("this approver's vote is already counted")]
    AlreadyVoted,
    /// The event's time has not come (an approval deadline not reached).
    #[error("not due yet")]
    NotDue,
    /// A revoke was already asked for.
    #[error("a revoke is already under way")]
    AlreadyRevoking,
    /// The request has ended (or never held access): nothing to revoke.
    #[error("the request is {}", .0.label())]
    Ended(State),
}

/// A grant still owed access at `now`.
pub fn in_force(r: &Request, now: OffsetDateTime) -> bool {
    r.state == State::Active && r.revoke.is_none() && r.expires_at.is_some_and(|e| e > now)
}

pub fn rfc3339(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
}

/// The audit details of a revoke: its reason, and for an admin's, who.
pub fn revoke_details(intent: Option<&RevokeIntent>) -> Value {
    let reason = intent.map(|i| i.reason.label()).unwrap_or("expiry");
    let mut details = json!({"reason": reason});
    if let Some(user) = intent.and_then(|i| i.by.strip_prefix(CLI_PREFIX)) {
        details["via"] = json!("cli");
        details["os_user"] = json!(user);
    }
    if let Some(i) = intent.filter(|i| i.reason == RevokeReason::Early) {
        details["by"] = json!(i.by);
    }
    if let Some(note) = intent.and_then(|i| i.note.as_deref()) {
        details["note"] = json!(note);
    }
    details
}

/// Nobody decided before the approval deadline.
pub fn expire(row: &Request, now: OffsetDateTime) -> Result<Effects, Refused> {
    if row.state != State::Pending {
        return Err(Refused::NotPending(row.state));
    }
    if row.approval_deadline > now {
        return Err(Refused::NotDue);
    }
    let mut next = row.clone();
    next.apply(Event::ApprovalTimeout)?;
    next.ended_at = Some(now);
    Ok(Effects::new(next)
        .audit("expired", ACTOR_TOLLGATE, now, json!({}))
        .notice(Notice::Expired))
}

/// A decision click must find the request still pending and in time.
fn decidable(row: &Request, now: OffsetDateTime) -> Result<(), Refused> {
    if row.state != State::Pending {
        return Err(Refused::NotPending(row.state));
    }
    // Past its deadline a request is expired even if the scheduler has not
    // got to it yet.
    if now >= row.approval_deadline {
        return Err(Refused::NotPending(State::Expired));
    }
    Ok(())
}

/// An approver denied the request.
pub fn deny(row: &Request, user: &str, now: OffsetDateTime) -> Result<Effects, Refused> {
    decidable(row, now)?;
    let mut next = row.clone();
    next.decided_by = Some(user.to_string());
    next.ended_at = Some(now);
    next.apply(Event::Deny)?;
    Ok(Effects::new(next)
        .audit("denied", user, now, json!({}))
        .notice(Notice::Denied))
}

/// An approver's vote; at the quorum the request is approved (the row is
/// then `Approved`, and the grant step is due at once).
pub fn approve(row: &Request, user: &str, now: OffsetDateTime) -> Result<Effects, Refused> {
    decidable(row, now)?;
    if row.has_vote_from(user) {
        return Err(Refused::AlreadyVoted);
    }
    let mut next = row.clone();
    next.approvals.push(Vote {
        user: user.to_string(),
        at: now,
    });
    let votes = json!({"approvals": next.approvals.len(), "required": next.required_approvals});
    let mut effects = Effects::new(next).audit("approval", user, now, votes);
    let next = &mut effects.row;
    if super::policy::quorum_reached(next.approvals.len(), next.required_approvals) {
        next.apply(Event::QuorumReached)?;
        next.approved_at = Some(now);
        next.decided_by = Some(user.to_string());
        let approvers: Vec<&str> = next.approvals.iter().map(|v| v.user.as_str()).collect();
        let details = json!({"approvers": approvers});
        effects = effects.audit("approved", user, now, details);
    }
    Ok(effects.notice(Notice::CardOnly))
}

/// Approved with no click (auto-approve, break-glass), as the request is
/// created: `decided_by` names the rule. The audit of such a decision is
/// written with the request (`requested` and the rule's events).
pub fn approve_without_click(
    row: &Request,
    decided_by: &str,
    now: OffsetDateTime,
) -> Result<Request, Refused> {
    let mut next = row.clone();
    next.apply(Event::QuorumReached)?;
    next.approved_at = Some(now);
    next.decided_by = Some(decided_by.to_string());
    Ok(next)
}

/// How a request is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Approval,
    AutoApproved,
    BreakGlass,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Approval => "approval",
            Mode::AutoApproved => "auto-approve",
            Mode::BreakGlass => "break-glass",
        }
    }

    /// What records a decision made without a click, beside `requested`.
    pub fn decision_audit(self, req: &Request, now: OffsetDateTime) -> Vec<AuditEvent> {
        let (event, via) = match self {
            Mode::Approval => return Vec::new(),
            Mode::AutoApproved => ("auto_approved", "auto_approve"),
            Mode::BreakGlass => ("break_glass", "break_glass"),
        };
        let details = match self {
            Mode::BreakGlass => json!({"reason": req.reason}),
            _ => json!({}),
        };
        vec![
            AuditEvent::for_request(req, event, &req.requester.user_id, now, details),
            AuditEvent::for_request(req, "approved", ACTOR_TOLLGATE, now, json!({"via": via})),
        ]
    }

    /// Recorded as approved at once when no human decides, so the grant is
    /// driven exactly like an approved request.
    pub fn preapprove(self, req: &mut Request, now: OffsetDateTime) {
        if self == Mode::Approval {
            return;
        }
        // A new row is Pending, from which approval is always legal.
        if let Ok(approved) = approve_without_click(req, self.label(), now) {
            *req = approved;
        }
    }

    /// How a receipt names the decision.
    pub fn label_title(self) -> &'static str {
        match self {
            Mode::Approval => "Request",
            Mode::AutoApproved => "Auto-approved",
            Mode::BreakGlass => "Break-glass",
        }
    }
}

/// The requester or an admin withdrew a pending request.
pub fn cancel(
    row: &Request,
    actor: &str,
    details: Value,
    now: OffsetDateTime,
) -> Result<Effects, Refused> {
    let mut next = row.clone();
    next.apply(Event::Cancel)?;
    next.ended_at = Some(now);
    Ok(Effects::new(next)
        .audit("cancelled", actor, now, details)
        .notice(Notice::CardOnly))
}

/// Someone (or the offboarding check) asked for the access to end now. Only
/// the intent is written; the revoke step removes the access and audits
/// `revoked` with the intent's reason once it is gone.
pub fn revoke_requested(row: &Request, intent: RevokeIntent) -> Result<Effects, Refused> {
    if !matches!(
        row.state,
        State::Approved | State::Active | State::RevokeFailed
    ) {
        return Err(Refused::Ended(row.state));
    }
    if row.revoke.is_some() {
        return Err(Refused::AlreadyRevoking);
    }
    let mut next = row.clone();
    next.revoke = Some(intent);
    next.retry_at = None;
    Ok(Effects::new(next))
}

/// What a successful grant step knew: when access was put in place and how
/// long the role's reminder comes before the end.
#[derive(Clone, Debug)]
pub struct GrantMade {
    /// When the converge started: the grant's clock starts then, and the
    /// Kubernetes objects carry `activated_at + duration` as their expiry.
    pub activated_at: OffsetDateTime,
    pub reminder_before: Option<Duration>,
    /// How long the step took, for the audit.
    pub grant_ms: u64,
}

/// The step's bookkeeping cleared: it is this replica's no more, and its
/// retries start over.
fn step_done(row: &Request) -> Request {
    let mut next = row.clone();
    next.claim = None;
    next.attempts = 0;
    next.retry_at = None;
    next
}

/// A failed attempt of the current step: counted, and tried again after
/// `delay(attempts)`.
fn step_failed(row: &Request, now: OffsetDateTime, delay: impl FnOnce(u32) -> Duration) -> Request {
    let mut next = row.clone();
    next.claim = None;
    next.attempts += 1;
    next.retry_at = Some(now + delay(next.attempts));
    next
}

/// Access is in place.
pub fn granted(row: &Request, made: &GrantMade, now: OffsetDateTime) -> Result<Effects, Refused> {
    let mut next = step_done(row);
    next.apply(Event::Granted)?;
    let expires_at = made.activated_at + next.duration;
    next.activated_at = Some(made.activated_at);
    next.expires_at = Some(expires_at);
    next.remind_at = made
        .reminder_before
        .and_then(|before| reminder_time(expires_at, next.duration, before));
    let details = json!({
        "expires_at": rfc3339(next.expires_at),
        "policy": next.access.policy_arn,
        "namespaces": next.access.namespaces,
        "grant_ms": made.grant_ms,
    });
    Ok(Effects::new(next)
        .audit("granted", ACTOR_TOLLGATE, now, details)
        .notice(Notice::Granted))
}

/// A grant that failed or was revoked before it was made has had its access
/// converged away: it ends `Failed` (its `grant_failed` was audited when it
/// failed) or `Revoked` (audited now, `before_grant`).
pub fn abandoned_cleared(
    row: &Request,
    verified: Verified,
    now: OffsetDateTime,
) -> Result<Effects, Refused> {
    let mut next = step_done(row);
    next.ended_at = Some(now);
    if next.failure.is_some() {
        next.apply(Event::GrantFailed)?;
        return Ok(Effects::new(next).notice(Notice::GrantFailed));
    }
    next.apply(Event::Revoked)?;
    next.verified_at = verified.at();
    let mut details = revoke_details(next.revoke.as_ref());
    details["before_grant"] = json!(true);
    verified.annotate(&mut details);
    Ok(Effects::new(next)
        .audit("revoked", ACTOR_TOLLGATE, now, details)
        .notice(Notice::Revoked))
}

/// Converging an abandoned grant's access away failed (`error`): tried
/// again later. A revoke before the grant (no grant failure noted) that
/// keeps failing is a failing revoke: audited and alerted once at the same
/// threshold as any revoke; the row stays Approved (nothing was recorded
/// as granted) and its step goes on retrying.
pub fn cleanup_failed(
    row: &Request,
    error: &str,
    now: OffsetDateTime,
    delay: impl FnOnce(u32) -> Duration,
) -> Result<Effects, Refused> {
    if row.state != State::Approved {
        return Err(IllegalTransition {
            from: row.state,
            event: Event::GrantFailed,
        }
        .into());
    }
    let effects = Effects::new(step_failed(row, now, delay));
    if effects.row.failure.is_none() && effects.row.attempts == REVOKE_FAILED_AFTER {
        let details =
            json!({"error": error, "attempts": effects.row.attempts, "before_grant": true});
        return Ok(effects
            .audit("revoke_failed", ACTOR_TOLLGATE, now, details)
            .notice(Notice::RevokeFailing {
                error: error.to_string(),
            }));
    }
    Ok(effects)
}

/// A grant failed (`error`). It is audited at once; it ends `Failed` only
/// when nothing of it is left (`cleanup` is `None`), and otherwise stays
/// Approved with the failure noted while the cleanup is retried.
pub fn grant_failed(
    row: &Request,
    error: &str,
    cleanup: Option<&str>,
    now: OffsetDateTime,
    delay: impl FnOnce(u32) -> Duration,
) -> Result<Effects, Refused> {
    let mut details = json!({"error": error});
    let mut next = match cleanup {
        None => {
            let mut next = row.clone();
            next.claim = None;
            next.apply(Event::GrantFailed)?;
            next.ended_at = Some(now);
            next
        }
        Some(cleanup_error) => {
            if row.state != State::Approved {
                return Err(IllegalTransition {
                    from: row.state,
                    event: Event::GrantFailed,
                }
                .into());
            }
            details["cleanup_pending"] = json!(cleanup_error);
            step_failed(row, now, delay)
        }
    };
    next.failure = Some(error.to_string());
    let notice = if cleanup.is_none() {
        Notice::GrantFailed
    } else {
        Notice::CardOnly
    };
    Ok(Effects::new(next)
        .audit("grant_failed", ACTOR_TOLLGATE, now, details)
        .notice(notice))
}

/// `details.reason` of the audit events of a row that failed the check
/// against the configuration (spec 9.8).
pub const INVALID_ROW: &str = "invalid_row";

/// An Approved row that fails the check against the configuration (`why`,
/// from `domain::row_check`): `grant_failed` with `details.reason`
/// `invalid_row`, and the security channel is told. Nothing is made; a row
/// whose earlier attempt recorded intents keeps its cleanup (`cleanup`) as
/// any failed grant does.
pub fn row_rejected(
    row: &Request,
    why: &str,
    cleanup: Option<&str>,
    now: OffsetDateTime,
    delay: impl FnOnce(u32) -> Duration,
) -> Result<Effects, Refused> {
    let error =
        format!("the stored request is not one Tollgate would grant ({why}); nothing was granted");
    let mut effects = grant_failed(row, &error, cleanup, now, delay)?;
    for a in &mut effects.audit {
        a.details["reason"] = json!(INVALID_ROW);
    }
    Ok(effects.notice(Notice::InvalidRow {
        why: why.to_string(),
    }))
}

/// An Active grant whose row was edited past what any grant may last
/// (`why`): revoked now, with reason `invalid_row` (spec 9.8). Only the
/// intent is written, as for any early revoke; the audit `revoked` names
/// the reason once the access is gone.
pub fn invalid_grant(row: &Request, why: &str, now: OffsetDateTime) -> Result<Effects, Refused> {
    let intent = RevokeIntent {
        reason: RevokeReason::InvalidRow,
        by: ACTOR_TOLLGATE.into(),
        note: Some(why.to_string()),
        at: now,
    };
    let effects = revoke_requested(row, intent)?;
    Ok(effects.notice(Notice::InvalidRow {
        why: why.to_string(),
    }))
}

/// What the security channel and the audit say of a row failing its
/// integrity MAC (spec 9.8).
pub const TAMPERED_WHY: &str =
    "its integrity MAC is missing or wrong: the row was written into the store outside Tollgate";

/// A live row whose integrity MAC is missing or wrong (spec 9.8): never
/// acted on as written. It is audited `tampered` (this write re-signs the
/// row, so once per tampered version) and ended the safe way for its
/// state: Pending ends (Expired); Approved with nothing recorded fails
/// (`invalid_row`); Approved with intents, Active and RevokeFailed get a
/// revoke intent (`invalid_row`), so whatever it holds is removed at once
/// and counts for no other converge meanwhile. Only Tollgate's own
/// bookkeeping is kept from the row: the revoke converges the principal to
/// the other grants in force, whatever this row says it granted.
pub fn tampered(row: &Request, now: OffsetDateTime) -> Effects {
    let why = TAMPERED_WHY;
    let ended = match row.state {
        State::Pending => {
            let mut next = row.clone();
            next.apply(Event::ApprovalTimeout).ok().map(|()| {
                next.ended_at = Some(now);
                next.failure = Some(why.to_string());
                Effects::new(next)
            })
        }
        State::Approved if row.intents.is_empty() && row.revoke.is_none() => {
            row_rejected(row, why, None, now, |_| Duration::ZERO).ok()
        }
        State::Approved | State::Active | State::RevokeFailed => invalid_grant(row, why, now).ok(),
        _ => None,
    };
    // Already ending (a revoke intent recorded, say): only re-signed and
    // audited, so it is not reported again.
    let mut effects = ended.unwrap_or_else(|| Effects::new(row.clone()));
    effects.notice = Some(Notice::InvalidRow {
        why: why.to_string(),
    });
    effects.audit.insert(
        0,
        AuditEvent::for_request(
            row,
            "tampered",
            ACTOR_TOLLGATE,
            now,
            json!({"state": row.state.label(), "version": row.version, "detail": why}),
        ),
    );
    effects
}

/// The access is gone: at expiry, or early with the intent's reason.
pub fn revoked(row: &Request, verified: Verified, now: OffsetDateTime) -> Result<Effects, Refused> {
    let recovered = row.state == State::RevokeFailed;
    let mut next = row.clone();
    next.claim = None;
    next.apply(Event::Revoked)?;
    if next.revoke.is_none() {
        next.revoke = Some(RevokeIntent {
            reason: RevokeReason::Expiry,
            by: ACTOR_TOLLGATE.into(),
            note: None,
            at: next.expires_at.unwrap_or(now),
        });
    }
    next.ended_at = Some(now);
    next.retry_at = None;
    let lateness = next.expires_at.map(|e| (now - e).as_seconds_f64().max(0.0));
    let mut details = revoke_details(next.revoke.as_ref());
    details["lateness_seconds"] = json!(lateness);
    details["attempts"] = json!(next.attempts + 1);
    next.verified_at = verified.at();
    verified.annotate(&mut details);
    Ok(Effects::new(next)
        .audit("revoked", ACTOR_TOLLGATE, now, details)
        .notice(if recovered {
            Notice::RevokeRecovered
        } else {
            Notice::Revoked
        }))
}

/// A revoke attempt failed (`error`): retried with backoff; the
/// `REVOKE_FAILED_AFTER`th failure turns the grant `RevokeFailed`, audited
/// and alerted on once.
pub fn revoke_failed(
    row: &Request,
    error: &str,
    now: OffsetDateTime,
    delay: impl FnOnce(u32) -> Duration,
) -> Result<Effects, Refused> {
    if !matches!(row.state, State::Active | State::RevokeFailed) {
        return Err(IllegalTransition {
            from: row.state,
            event: Event::RevokeFailing,
        }
        .into());
    }
    let mut effects = Effects::new(step_failed(row, now, delay));
    let next = &mut effects.row;
    if next.attempts >= REVOKE_FAILED_AFTER && next.state == State::Active {
        next.apply(Event::RevokeFailing)?;
        let details = json!({"error": error, "attempts": next.attempts});
        effects = effects
            .audit("revoke_failed", ACTOR_TOLLGATE, now, details)
            .notice(Notice::RevokeFailing {
                error: error.to_string(),
            });
    }
    Ok(effects)
}

/// An approved extension moves its grant's expiry (the grant's row); the
/// grant records the extension so a second pass does not move it again.
pub fn extend_grant(
    grant: &Request,
    ext: &Request,
    expires_at: OffsetDateTime,
    reminder_before: Option<Duration>,
    now: OffsetDateTime,
) -> Effects {
    let mut next = grant.clone();
    let new_expiry = expires_at + ext.duration;
    next.expires_at = Some(new_expiry);
    next.extended_by.push(ext.id.clone());
    next.remind_at = reminder_before.and_then(|before| {
        let left = Duration::try_from(new_expiry - now).unwrap_or_default();
        reminder_time(new_expiry, left, before)
    });
    let details = json!({
        "extension": ext.id.as_str(),
        "by": format_duration(ext.duration),
        "expires_at": rfc3339(Some(new_expiry)),
        "previous_expires_at": rfc3339(Some(expires_at)),
    });
    let actor = ext.decided_by.as_deref().unwrap_or(ACTOR_TOLLGATE);
    Effects::new(next).audit("extended", actor, now, details)
}

/// The extension's own row once its grant moved (to `new_expiry`).
pub fn extension_applied(
    ext: &Request,
    new_expiry: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<Effects, Refused> {
    let mut next = ext.clone();
    next.ended_at = Some(now);
    next.apply(Event::ExtensionApplied)?;
    next.expires_at = new_expiry;
    Ok(Effects::new(next).notice(Notice::Extended))
}

/// The extension could not be applied: its grant had ended, or the total
/// would pass the cap (`why`).
pub fn extension_failed(ext: &Request, why: &str, now: OffsetDateTime) -> Result<Effects, Refused> {
    let mut next = ext.clone();
    next.ended_at = Some(now);
    next.apply(Event::GrantFailed)?;
    next.failure = Some(why.to_string());
    Ok(Effects::new(next)
        .audit("grant_failed", ACTOR_TOLLGATE, now, json!({"error": why}))
        .notice(Notice::GrantFailed))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::request::{AccessSpec, Asked, Claim, RequestId, Requester};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-23 12:00 UTC);
    const MIN: Duration = Duration::from_secs(60);

    /// Alice's pending `view` request on prod, an hour long, as other
    /// domain tests start from too.
    pub(crate) fn pending(required_approvals: u32) -> Request {
        Request::pending(
            Asked {
                id: RequestId::parse("R-7F3K2").unwrap(),
                requester: Requester {
                    user_id: "U0ALICE".into(),
                    email: "alice@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "prod".into(),
                    role: "view".into(),
                    principal: "arn:aws:iam::111122223333:role/alice".into(),
                    policy_arn: Some("AmazonEKSViewPolicy".into()),
                    namespaces: vec![],
                    cluster_role: None,
                    groups: vec![],
                    k8s_user: None,
                    strategy: None,
                },
                reason: "INC-1".into(),
                duration: 60 * MIN,
                approval_timeout: 30 * MIN,
                required_approvals,
                response_url: None,
            },
            T0,
        )
    }

    fn approved() -> Request {
        approve(&pending(1), "U0APP", T0 + MIN).unwrap().row
    }

    #[test]
    fn a_tampered_row_is_ended_the_safe_way_for_its_state() {
        let now = T0 + 3 * MIN;
        let names = |e: &Effects| e.audit.iter().map(|a| a.event.clone()).collect::<Vec<_>>();
        // Pending: ends, nothing decided on it.
        let e = tampered(&pending(1), now);
        assert_eq!(e.row.state, State::Expired);
        assert_eq!(names(&e), ["tampered"]);
        // Approved, nothing made yet: fails, never granted.
        let e = tampered(&approved(), now);
        assert_eq!(e.row.state, State::Failed);
        assert_eq!(names(&e), ["tampered", "grant_failed"]);
        assert_eq!(e.audit[1].details["reason"], INVALID_ROW);
        // Approved with intents: whatever the first attempt made is removed.
        let mut started = approved();
        started.intents = vec![crate::domain::request::Intent::AccessEntry {
            principal: started.access.principal.clone(),
        }];
        let e = tampered(&started, now);
        assert_eq!(e.row.state, State::Approved);
        assert!(e.row.grant_abandoned());
        // Active: revoked at once.
        let e = tampered(&active(), now);
        assert_eq!(e.row.state, State::Active);
        let intent = e.row.revoke.as_ref().unwrap();
        assert_eq!(intent.reason, RevokeReason::InvalidRow);
        assert!(e.row.step_due().unwrap() <= now, "due now");
        assert_eq!(e.audit[0].details["version"], active().version);
        assert!(matches!(e.notice, Some(Notice::InvalidRow { .. })));
        // Already revoking: audited and re-signed, nothing else changes.
        let revoking = e.row.clone();
        let e = tampered(&revoking, now);
        assert_eq!(e.row, revoking);
        assert_eq!(names(&e), ["tampered"]);
    }

    fn active() -> Request {
        let made = GrantMade {
            activated_at: T0 + 2 * MIN,
            reminder_before: Some(10 * MIN),
            grant_ms: 40,
        };
        granted(&approved(), &made, T0 + 2 * MIN).unwrap().row
    }

    fn names(e: &Effects) -> Vec<&str> {
        e.audit.iter().map(|a| a.event.as_str()).collect()
    }

    fn doubling(n: u32) -> Duration {
        Duration::from_secs(2u64 << (n - 1))
    }

    #[test]
    fn expire_ends_an_undecided_request_at_its_deadline_only() {
        let row = pending(1);
        assert_eq!(expire(&row, T0 + 29 * MIN), Err(Refused::NotDue));
        let e = expire(&row, T0 + 30 * MIN).unwrap();
        assert_eq!(e.row.state, State::Expired);
        assert_eq!(e.row.ended_at, Some(T0 + 30 * MIN));
        assert_eq!(names(&e), ["expired"]);
        assert_eq!(e.notice, Some(Notice::Expired));
        assert_eq!(
            expire(&e.row, T0 + 31 * MIN),
            Err(Refused::NotPending(State::Expired))
        );
    }

    #[test]
    fn approve_counts_votes_and_approves_at_the_quorum() {
        let row = pending(2);
        let first = approve(&row, "U0A", T0 + MIN).unwrap();
        assert_eq!(first.row.state, State::Pending);
        assert_eq!(names(&first), ["approval"]);
        assert_eq!(first.audit[0].details["approvals"], 1);
        assert_eq!(first.notice, Some(Notice::CardOnly));
        assert_eq!(
            approve(&first.row, "U0A", T0 + MIN),
            Err(Refused::AlreadyVoted)
        );
        let second = approve(&first.row, "U0B", T0 + 2 * MIN).unwrap();
        assert_eq!(second.row.state, State::Approved);
        assert_eq!(second.row.approved_at, Some(T0 + 2 * MIN));
        assert_eq!(second.row.decided_by.as_deref(), Some("U0B"));
        assert_eq!(names(&second), ["approval", "approved"]);
        assert_eq!(second.audit[1].details["approvers"], json!(["U0A", "U0B"]));
        assert_eq!(second.notice, Some(Notice::CardOnly));
        // Past the deadline a click finds the request expired.
        assert_eq!(
            approve(&row, "U0A", T0 + 30 * MIN),
            Err(Refused::NotPending(State::Expired))
        );
    }

    #[test]
    fn deny_ends_the_request() {
        let e = deny(&pending(1), "U0APP", T0 + MIN).unwrap();
        assert_eq!(e.row.state, State::Denied);
        assert_eq!(e.row.decided_by.as_deref(), Some("U0APP"));
        assert_eq!(e.row.ended_at, Some(T0 + MIN));
        assert_eq!(names(&e), ["denied"]);
        assert_eq!(e.audit[0].actor, "U0APP");
        assert_eq!(e.notice, Some(Notice::Denied));
        assert_eq!(
            deny(&e.row, "U0APP", T0 + MIN),
            Err(Refused::NotPending(State::Denied))
        );
    }

    #[test]
    fn approve_without_click_goes_through_the_state_table() {
        let row = approve_without_click(&pending(1), "auto-approve", T0).unwrap();
        assert_eq!(row.state, State::Approved);
        assert_eq!(row.approved_at, Some(T0));
        assert_eq!(row.decided_by.as_deref(), Some("auto-approve"));
        assert!(approve_without_click(&row, "auto-approve", T0).is_err());
    }

    #[test]
    fn cancel_ends_a_pending_request() {
        let e = cancel(&pending(1), "U0ALICE", json!({"via": "slack"}), T0 + MIN).unwrap();
        assert_eq!(e.row.state, State::Cancelled);
        assert_eq!(e.row.ended_at, Some(T0 + MIN));
        assert_eq!(names(&e), ["cancelled"]);
        assert_eq!(e.audit[0].details, json!({"via": "slack"}));
        assert_eq!(e.notice, Some(Notice::CardOnly));
        assert!(matches!(
            cancel(&active(), "U0ALICE", json!({}), T0),
            Err(Refused::Illegal(_))
        ));
    }

    #[test]
    fn granted_starts_the_clock_when_access_is_in_place() {
        let mut row = approved();
        row.attempts = 2;
        row.retry_at = Some(T0);
        row.claim = Some(Claim {
            owner: "a".into(),
            until: T0 + 5 * MIN,
        });
        let made = GrantMade {
            activated_at: T0 + 2 * MIN,
            reminder_before: Some(10 * MIN),
            grant_ms: 40,
        };
        let e = granted(&row, &made, T0 + 3 * MIN).unwrap();
        assert_eq!(e.row.state, State::Active);
        assert_eq!(e.row.activated_at, Some(T0 + 2 * MIN));
        assert_eq!(e.row.expires_at, Some(T0 + 62 * MIN));
        assert_eq!(e.row.remind_at, Some(T0 + 52 * MIN));
        assert_eq!((e.row.attempts, e.row.retry_at), (0, None));
        assert_eq!(e.row.claim, None);
        assert_eq!(names(&e), ["granted"]);
        assert_eq!(e.audit[0].ts, T0 + 3 * MIN);
        assert_eq!(e.audit[0].details["expires_at"], "2026-11-23T13:02:00Z");
        assert_eq!(e.audit[0].details["grant_ms"], 40);
        assert_eq!(e.notice, Some(Notice::Granted));
        assert!(granted(&e.row, &made, T0).is_err());
    }

    #[test]
    fn grant_failed_ends_the_request_only_when_nothing_is_left() {
        let e = grant_failed(&approved(), "boom", None, T0 + 2 * MIN, doubling).unwrap();
        assert_eq!(e.row.state, State::Failed);
        assert_eq!(e.row.failure.as_deref(), Some("boom"));
        assert_eq!(e.row.ended_at, Some(T0 + 2 * MIN));
        assert_eq!(names(&e), ["grant_failed"]);
        assert_eq!(e.audit[0].details, json!({"error": "boom"}));
        assert_eq!(e.notice, Some(Notice::GrantFailed));

        let e = grant_failed(&approved(), "boom", Some("left"), T0 + 2 * MIN, doubling).unwrap();
        assert_eq!(e.row.state, State::Approved);
        assert!(e.row.grant_abandoned());
        assert_eq!(e.row.attempts, 1);
        assert_eq!(e.row.retry_at, Some(T0 + 2 * MIN + Duration::from_secs(2)));
        assert_eq!(names(&e), ["grant_failed"]);
        assert_eq!(
            e.audit[0].details,
            json!({"error": "boom", "cleanup_pending": "left"})
        );
        assert_eq!(e.notice, Some(Notice::CardOnly));
    }

    #[test]
    fn an_abandoned_grant_ends_once_its_access_is_gone() {
        let failed = grant_failed(&approved(), "boom", Some("left"), T0, doubling)
            .unwrap()
            .row;
        let again = cleanup_failed(&failed, "eks down", T0 + MIN, doubling).unwrap();
        assert_eq!(again.row.attempts, 2);
        assert_eq!(again.row.retry_at, Some(T0 + MIN + Duration::from_secs(4)));
        assert!(again.audit.is_empty() && again.notice.is_none());

        let e = abandoned_cleared(&again.row, Verified::NotChecked, T0 + 2 * MIN).unwrap();
        assert_eq!(e.row.state, State::Failed);
        assert_eq!((e.row.attempts, e.row.retry_at), (0, None));
        assert!(
            e.audit.is_empty(),
            "grant_failed was audited when it failed"
        );
        assert_eq!(e.notice, Some(Notice::GrantFailed));

        let intent = RevokeIntent {
            reason: RevokeReason::Early,
            by: "U0ALICE".into(),
            note: None,
            at: T0,
        };
        let revoking = revoke_requested(&approved(), intent).unwrap().row;
        let seen = T0 + 2 * MIN;
        let e = abandoned_cleared(&revoking, Verified::At(seen), T0 + 2 * MIN).unwrap();
        assert_eq!(e.row.state, State::Revoked);
        assert_eq!(e.row.verified_at, Some(seen));
        assert_eq!(names(&e), ["revoked"]);
        assert_eq!(
            e.audit[0].details,
            json!({"reason": "early", "by": "U0ALICE", "before_grant": true,
                   "verified": true, "verified_at": "2026-11-23T12:02:00Z"})
        );
        assert_eq!(e.notice, Some(Notice::Revoked));
    }

    #[test]
    fn a_revoke_before_the_grant_that_keeps_failing_is_alerted_once() {
        let mut row = approved();
        for attempt in 1..=REVOKE_FAILED_AFTER + 1 {
            let e = cleanup_failed(&row, "eks down", T0 + MIN, doubling).unwrap();
            assert_eq!(e.row.state, State::Approved);
            assert_eq!(e.row.attempts, attempt);
            if attempt == REVOKE_FAILED_AFTER {
                assert_eq!(names(&e), ["revoke_failed"]);
                assert_eq!(
                    e.audit[0].details,
                    json!({"error": "eks down", "attempts": attempt, "before_grant": true})
                );
                assert_eq!(
                    e.notice,
                    Some(Notice::RevokeFailing {
                        error: "eks down".into()
                    })
                );
            } else {
                assert!(e.audit.is_empty() && e.notice.is_none());
            }
            row = e.row;
        }
    }

    #[test]
    fn a_rejected_row_fails_with_reason_invalid_row_and_tells_security() {
        let e = row_rejected(&approved(), "0 approval(s)", None, T0 + MIN, doubling).unwrap();
        assert_eq!(e.row.state, State::Failed);
        assert!(e.row.failure.as_deref().unwrap().contains("0 approval(s)"));
        assert_eq!(names(&e), ["grant_failed"]);
        assert_eq!(e.audit[0].details["reason"], INVALID_ROW);
        assert_eq!(
            e.notice,
            Some(Notice::InvalidRow {
                why: "0 approval(s)".into()
            })
        );
        // Only an Approved row can be refused at grant.
        assert!(row_rejected(&active(), "x", None, T0, doubling).is_err());
    }

    #[test]
    fn an_overlong_grant_is_revoked_now_with_reason_invalid_row() {
        let e = invalid_grant(&active(), "moved", T0 + 5 * MIN).unwrap();
        assert_eq!(e.row.state, State::Active);
        let intent = e.row.revoke.as_ref().unwrap();
        assert_eq!(intent.reason, RevokeReason::InvalidRow);
        assert_eq!(e.row.step_due(), Some(T0 + 5 * MIN));
        assert_eq!(
            e.notice,
            Some(Notice::InvalidRow {
                why: "moved".into()
            })
        );
        let done = revoked(&e.row, Verified::At(T0 + 6 * MIN), T0 + 6 * MIN).unwrap();
        assert_eq!(done.audit[0].details["reason"], INVALID_ROW);
        assert_eq!(done.audit[0].details["note"], "moved");
        assert!(invalid_grant(&done.row, "moved", T0).is_err());
    }

    #[test]
    fn revoked_at_expiry_records_lateness_and_reason() {
        let row = active();
        let e = revoked(
            &row,
            Verified::NotChecked,
            T0 + 62 * MIN + Duration::from_secs(3),
        )
        .unwrap();
        assert_eq!(e.row.state, State::Revoked);
        assert_eq!(e.row.verified_at, None);
        assert_eq!(
            e.row.revoke.as_ref().map(|i| i.reason),
            Some(RevokeReason::Expiry)
        );
        assert_eq!(e.row.ended_at, Some(T0 + 62 * MIN + Duration::from_secs(3)));
        assert_eq!(names(&e), ["revoked"]);
        assert_eq!(
            e.audit[0].details,
            json!({"reason": "expiry", "lateness_seconds": 3.0, "attempts": 1, "verified": false})
        );
        assert_eq!(e.notice, Some(Notice::Revoked));
    }

    #[test]
    fn a_failing_revoke_is_retried_then_alerted_then_recovers() {
        let mut row = active();
        for attempt in 1..REVOKE_FAILED_AFTER {
            let e = revoke_failed(&row, "eks down", T0 + 62 * MIN, doubling).unwrap();
            assert_eq!(e.row.state, State::Active);
            assert_eq!(e.row.attempts, attempt);
            assert!(e.audit.is_empty() && e.notice.is_none());
            row = e.row;
        }
        let e = revoke_failed(&row, "eks down", T0 + 63 * MIN, doubling).unwrap();
        assert_eq!(e.row.state, State::RevokeFailed);
        assert_eq!(
            e.row.retry_at,
            Some(T0 + 63 * MIN + Duration::from_secs(32))
        );
        assert_eq!(names(&e), ["revoke_failed"]);
        assert_eq!(
            e.audit[0].details,
            json!({"error": "eks down", "attempts": REVOKE_FAILED_AFTER})
        );
        assert_eq!(
            e.notice,
            Some(Notice::RevokeFailing {
                error: "eks down".into()
            })
        );
        // Alerted once: further failures only back off.
        let more = revoke_failed(&e.row, "eks down", T0 + 64 * MIN, doubling).unwrap();
        assert!(more.audit.is_empty() && more.notice.is_none());
        let done = revoked(&more.row, Verified::At(T0 + 65 * MIN), T0 + 65 * MIN).unwrap();
        assert_eq!(done.row.state, State::Revoked);
        assert_eq!(names(&done), ["revoked"]);
        assert_eq!(done.audit[0].details["attempts"], REVOKE_FAILED_AFTER + 2);
        assert_eq!(done.notice, Some(Notice::RevokeRecovered));
    }

    #[test]
    fn revoke_requested_records_the_intent_once() {
        let intent = RevokeIntent {
            reason: RevokeReason::Admin,
            by: format!("{CLI_PREFIX}root"),
            note: Some("leaver".into()),
            at: T0 + 5 * MIN,
        };
        let e = revoke_requested(&active(), intent.clone()).unwrap();
        assert_eq!(e.row.state, State::Active);
        assert_eq!(e.row.revoke.as_ref(), Some(&intent));
        assert_eq!(e.row.step_due(), Some(T0 + 5 * MIN));
        assert!(e.audit.is_empty() && e.notice.is_none());
        assert_eq!(
            revoke_requested(&e.row, intent.clone()),
            Err(Refused::AlreadyRevoking)
        );
        assert_eq!(
            revoke_requested(&pending(1), intent),
            Err(Refused::Ended(State::Pending))
        );
        let done = revoked(&e.row, Verified::At(T0 + 5 * MIN), T0 + 5 * MIN).unwrap();
        assert_eq!(
            done.audit[0].details,
            json!({"reason": "admin", "via": "cli", "os_user": "root", "note": "leaver",
                   "lateness_seconds": 0.0, "attempts": 1,
                   "verified": true, "verified_at": "2026-11-23T12:05:00Z"})
        );
    }

    #[test]
    fn an_extension_moves_its_grant_then_ends_applied_or_failed() {
        let grant = active();
        let mut ext = Request::extension_of(
            &grant,
            RequestId::parse("R-9QX4M").unwrap(),
            30 * MIN,
            T0 + 10 * MIN,
            30 * MIN,
            1,
            None,
        );
        ext = approve(&ext, "U0APP", T0 + 11 * MIN).unwrap().row;
        let moved = extend_grant(
            &grant,
            &ext,
            grant.expires_at.unwrap(),
            Some(10 * MIN),
            T0 + 12 * MIN,
        );
        assert_eq!(moved.row.state, State::Active);
        assert_eq!(moved.row.expires_at, Some(T0 + 92 * MIN));
        assert_eq!(moved.row.remind_at, Some(T0 + 82 * MIN));
        assert_eq!(moved.row.extended_by, vec![ext.id.clone()]);
        assert_eq!(names(&moved), ["extended"]);
        assert_eq!(moved.audit[0].actor, "U0APP");
        assert_eq!(moved.audit[0].request_id, "R-7F3K2");
        assert_eq!(moved.audit[0].details["by"], "30m");
        assert_eq!(moved.notice, None);

        let e = extension_applied(&ext, moved.row.expires_at, T0 + 12 * MIN).unwrap();
        assert_eq!(e.row.state, State::Applied);
        assert_eq!(e.row.expires_at, Some(T0 + 92 * MIN));
        assert!(e.audit.is_empty());
        assert_eq!(e.notice, Some(Notice::Extended));

        let e = extension_failed(&ext, "R-7F3K2 had already ended", T0 + 12 * MIN).unwrap();
        assert_eq!(e.row.state, State::Failed);
        assert_eq!(e.row.failure.as_deref(), Some("R-7F3K2 had already ended"));
        assert_eq!(names(&e), ["grant_failed"]);
        assert_eq!(e.notice, Some(Notice::GrantFailed));
    }
}
