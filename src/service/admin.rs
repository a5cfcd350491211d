//! What operators do from the command line: list live grants, force a
//! revoke, read the audit log. The CLI reaches these through the running
//! server's admin socket, or directly on the store when no server runs.

use serde_json::json;
use std::sync::Arc;

use super::error::{Refusal, ServiceError};
use super::{Change, Notice, Revoker, Service};
use crate::domain::audit::{AuditEvent, ACTOR_TOLLGATE};
use crate::domain::lifecycle::{self, Refused};
use crate::domain::request::{Request, RequestId, RevokeIntent, RevokeReason, State};
use crate::store::prune::{self, PrunePlan};

pub use crate::domain::lifecycle::CLI_PREFIX;

impl Service {
    /// What `store prune --before` would remove (see `store::prune`).
    pub async fn prune_plan(
        &self,
        before: time::OffsetDateTime,
    ) -> Result<PrunePlan, ServiceError> {
        Ok(prune::plan(self.store.as_ref(), before).await?)
    }

    pub async fn prune_apply(
        &self,
        plan: &PrunePlan,
        before: time::OffsetDateTime,
    ) -> Result<String, ServiceError> {
        let (rows, events) = prune::apply(self.store.as_ref(), plan, before).await?;
        self.store.flush().await?;
        Ok(prune::summary(rows, events, before))
    }

    /// The gauges that describe the store (`tollgate_grants_active`,
    /// `tollgate_overdue_grants`), set from the live rows when scraped so
    /// they can never drift from it. A store that cannot be read leaves the
    /// last values (and counts as a failed store step).
    pub async fn refresh_gauges(&self) {
        let all = match self.store.live().await {
            Ok(all) => all,
            Err(e) => {
                self.metrics.failed("store", e.metric_label());
                return;
            }
        };
        let now = self.clock.now();
        let holding: Vec<&Request> = all
            .iter()
            .filter(|r| matches!(r.state, State::Active | State::RevokeFailed))
            .collect();
        let overdue = holding
            .iter()
            .filter(|r| r.expires_at.is_some_and(|e| e <= now))
            .count();
        self.metrics.grants_active.set(holding.len() as i64);
        self.metrics.overdue_grants.set(overdue as i64);
    }

    /// Requests that still hold or may still get access.
    pub async fn live_requests(&self) -> Result<Vec<Request>, ServiceError> {
        let mut out: Vec<Request> = self.store.live().await?;
        out.sort_by_key(|r| r.created_at);
        Ok(out)
    }

    /// An admin's forced revoke (see `revoke_request`).
    pub async fn admin_revoke(
        self: &Arc<Self>,
        id_text: &str,
        reason: Option<&str>,
        os_user: &str,
    ) -> Result<String, ServiceError> {
        let who = Revoker::Cli {
            os_user: os_user.to_string(),
            note: reason.map(str::to_string),
        };
        self.revoke_request(id_text, who).await
    }

    /// Ends a request early: a pending one is cancelled, an approved one is
    /// never granted (or converged away), an active one is revoked now.
    /// Returns what happened, for the person who asked.
    pub async fn revoke_request(
        self: &Arc<Self>,
        id_text: &str,
        who: Revoker,
    ) -> Result<String, ServiceError> {
        let id = RequestId::parse(id_text).ok_or_else(|| Refusal::NotAnId(id_text.to_string()))?;
        let now = self.clock.now();
        let (actor, details, intent) = match &who {
            Revoker::Cli { os_user, note } => (
                ACTOR_TOLLGATE.to_string(),
                json!({"via": "cli", "os_user": os_user, "note": note}),
                RevokeIntent {
                    reason: RevokeReason::Admin,
                    by: format!("{CLI_PREFIX}{os_user}"),
                    note: note.clone(),
                    at: now,
                },
            ),
            Revoker::Slack { user } => (
                user.clone(),
                json!({"via": "slack"}),
                RevokeIntent {
                    reason: RevokeReason::Early,
                    by: user.clone(),
                    note: None,
                    at: now,
                },
            ),
        };
        let outcome = self
            .modify(&id, |current| {
                let decided = if current.state == State::Pending {
                    lifecycle::cancel(current, &actor, details.clone(), now)
                } else {
                    // Audited as `revoked` (with who and why) once the
                    // access is actually gone.
                    lifecycle::revoke_requested(current, intent.clone())
                };
                match decided {
                    Ok(e) => {
                        let state = e.row.state;
                        Change::Write(Box::new(e.row), e.audit, Ok(state))
                    }
                    Err(Refused::AlreadyRevoking) => Change::Keep(Ok(current.state)),
                    Err(_) => Change::Keep(Err(current.state)),
                }
            })
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound(_) => {
                    ServiceError::from(Refusal::NoSuchRequest(id.to_string()))
                }
                other => ServiceError::from(other),
            })?;
        match outcome {
            Ok(State::Cancelled) => {
                self.announce(&id, Notice::CardOnly);
                Ok(format!(
                    "{id} was pending; it is cancelled and will never be granted."
                ))
            }
            Ok(_) => {
                // Revoke now rather than wait for the scheduler's next pass.
                self.drive(&id).await;
                match self.store.get(&id).await? {
                    Some(r) if r.state == State::Revoked => {
                        Ok(format!("{id} is revoked; its access is gone."))
                    }
                    Some(r) => Ok(format!(
                        "{id} is marked for revocation but is still {} (Tollgate keeps retrying).",
                        r.state.label()
                    )),
                    None => Err(Refusal::Vanished(id.to_string()).into()),
                }
            }
            Err(state) => Err(Refusal::AlreadyEnded {
                id: id.to_string(),
                state: state.label().replace('_', " "),
            }
            .into()),
        }
    }

    pub async fn audit_since(
        &self,
        since: Option<time::OffsetDateTime>,
    ) -> Result<Vec<AuditEvent>, ServiceError> {
        Ok(self.store.audit_since(since).await?)
    }
}
