//! `tollgate store prune`: removing ended requests, and their audit events,
//! that ended before a cutoff. Rows in a terminal state never change again,
//! so what the plan selected is still prunable when it is applied; the
//! events are handed to the operator before anything is removed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use time::OffsetDateTime;

use super::{AuditEntry, Store, StoreError};
use crate::domain::request::{Request, RequestId};

/// Whether `req` ended before `before`. A live request never is, whatever
/// its age: it may still hold access.
pub fn prunable(req: &Request, before: OffsetDateTime) -> bool {
    req.state.is_terminal() && req.ended_at.unwrap_or(req.created_at) < before
}

/// What one prune removes: the rows, and every audit event that names one
/// of them, in log order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PrunePlan {
    pub ids: Vec<RequestId>,
    pub audit: Vec<AuditEntry>,
}

/// Reads the whole store: pruning is the one operation whose cost is the
/// history's, and it is run by an operator, not on any request's path.
pub async fn plan(store: &dyn Store, before: OffsetDateTime) -> Result<PrunePlan, StoreError> {
    let ids: BTreeSet<RequestId> = store
        .list()
        .await?
        .into_iter()
        .filter(|r| prunable(r, before))
        .map(|r| r.id)
        .collect();
    let audit = store
        .audit_entries()
        .await?
        .into_iter()
        .filter(|e| RequestId::parse(&e.event.request_id).is_some_and(|id| ids.contains(&id)))
        .collect();
    Ok(PrunePlan {
        ids: ids.into_iter().collect(),
        audit,
    })
}

/// Removes what `plan` selected, checking each row again: one that is gone
/// already (a second run) is skipped, one that is not prunable is an error
/// and nothing of it is removed.
pub async fn apply(
    store: &dyn Store,
    plan: &PrunePlan,
    before: OffsetDateTime,
) -> Result<(usize, usize), StoreError> {
    let mut ids = Vec::new();
    for id in &plan.ids {
        match store.get(id).await? {
            Some(row) if prunable(&row, before) => ids.push(id.clone()),
            Some(_) => {
                return Err(StoreError::Backend(format!(
                    "{id} did not end before the cutoff; nothing was removed"
                )))
            }
            None => {}
        }
    }
    // Only events the store itself says belong to those requests, and only
    // those the plan (what the operator received) named: a plan cannot
    // remove another request's events, nor one that was never exported.
    let named: BTreeSet<_> = plan.audit.iter().map(|e| e.position).collect();
    let belongs: BTreeSet<&str> = ids.iter().map(RequestId::as_str).collect();
    let positions: Vec<_> = store
        .audit_entries()
        .await?
        .into_iter()
        .filter(|e| named.contains(&e.position) && belongs.contains(e.event.request_id.as_str()))
        .map(|e| e.position)
        .collect();
    store.remove_ended(&ids, &positions).await?;
    Ok((ids.len(), positions.len()))
}

/// The line `store prune` ends with.
pub fn summary(rows: usize, events: usize, before: OffsetDateTime) -> String {
    let cutoff = before
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| before.to_string());
    format!("removed {rows} requests that ended before {cutoff} and their {events} audit events")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::{AccessSpec, Asked, Requester, State};
    use std::time::Duration;
    use time::macros::datetime;

    fn row(state: State, ended: Option<OffsetDateTime>) -> Request {
        let mut r = Request::pending(
            Asked {
                id: RequestId::parse("R-AAAAA").unwrap(),
                requester: Requester {
                    user_id: "U1".into(),
                    email: "a@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "c".into(),
                    role: "view".into(),
                    principal: "arn:aws:iam::1:role/a".into(),
                    policy_arn: None,
                    namespaces: vec![],
                    cluster_role: None,
                    groups: vec![],
                    k8s_user: None,
                    strategy: None,
                },
                reason: "r".into(),
                duration: Duration::from_secs(60),
                approval_timeout: Duration::from_secs(60),
                required_approvals: 1,
                response_url: None,
            },
            datetime!(2026-01-01 0:00 UTC),
        );
        r.state = state;
        r.ended_at = ended;
        r
    }

    #[test]
    fn only_requests_that_ended_before_the_cutoff() {
        let cutoff = datetime!(2026-06-01 0:00 UTC);
        let before = Some(datetime!(2026-05-31 23:59 UTC));
        let after = Some(datetime!(2026-06-01 0:00 UTC));
        assert!(prunable(&row(State::Revoked, before), cutoff));
        assert!(prunable(&row(State::Denied, before), cutoff));
        assert!(
            !prunable(&row(State::Revoked, after), cutoff),
            "the cutoff itself stays"
        );
        // Live rows stay whatever their age.
        assert!(!prunable(&row(State::Active, before), cutoff));
        assert!(!prunable(&row(State::Pending, None), cutoff));
        // A terminal row without an end time counts from its creation.
        assert!(prunable(&row(State::Expired, None), cutoff));
    }
}
