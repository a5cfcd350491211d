//! Identity after the request (spec 9.1): the principal is resolved again
//! before a grant is made, and requesters who left (deactivated, or made a
//! guest where guests may not hold access) lose what they have.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::error::{GrantRefusal, Refusal};
use super::Service;
use crate::domain::identity::resolve as resolve_principal;
use crate::domain::lifecycle::in_force;
use crate::domain::policy::ClusterPolicy;
use crate::domain::request::{Request, RevokeIntent, RevokeReason, State};
use crate::slack::{SlackError, SlackUser};

/// Slack's answer for an id it no longer knows.
const USER_NOT_FOUND: &str = "user_not_found";

/// A profile lookup during a grant or an offboarding pass; long enough for
/// a slow Slack, short against the claim a grant holds.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a Slack account may no longer hold access, if it may not.
pub(super) fn offboarded(user: &SlackUser, allow_guests: bool) -> Option<&'static str> {
    if user.deleted {
        Some("deactivated")
    } else if user.is_bot {
        Some("a bot")
    } else if user.is_guest && !allow_guests {
        Some("a guest")
    } else {
        None
    }
}

impl Service {
    async fn lookup(&self, user: &str) -> Result<SlackUser, SlackError> {
        // Fresh (spec 9.9): approval, grant and offboarding see what Slack
        // says now; only while it rate-limits may a young answer stand in.
        let fresh = self.asked_now();
        match tokio::time::timeout(LOOKUP_TIMEOUT, self.profile(user, fresh)).await {
            Ok(r) => r,
            Err(_) => Err(SlackError::Transport {
                method: "users.info",
                message: "timed out".into(),
            }),
        }
    }

    /// Before an approval counts: the requester's account may still get
    /// access. Unsure (Slack not answering) means the click is not counted.
    pub(super) async fn requester_still_here(&self, req: &Request) -> Result<(), Refusal> {
        let why = match self.lookup(&req.requester.user_id).await {
            Ok(u) => offboarded(&u, self.config.identity.allow_guests),
            Err(e) if e.code() == Some(USER_NOT_FOUND) => Some("unknown to Slack"),
            Err(e) => {
                tracing::warn!(error = %e, "users.info failed for a requester");
                return Err(Refusal::RequesterUnconfirmed);
            }
        };
        match why {
            None => Ok(()),
            Some(what) => Err(Refusal::RequesterOffboarded {
                id: req.id.to_string(),
                what,
            }),
        }
    }

    /// Just before a grant is made: the requester still holds the account
    /// the request was made from, and it still maps to the principal (and
    /// Kubernetes username) stored on the request and shown on the card.
    /// A difference fails the grant: nothing is created.
    pub(super) async fn recheck_identity(&self, req: &Request) -> Result<(), GrantRefusal> {
        let Some(cluster) = self.config.cluster(&req.access.cluster) else {
            return Err(GrantRefusal::ClusterGone(req.access.cluster.clone()));
        };
        let user = match self.lookup(&req.requester.user_id).await {
            Ok(u) => u,
            Err(e) if e.code() == Some(USER_NOT_FOUND) => return Err(GrantRefusal::AccountGone),
            // Access goes to a confirmed principal or nowhere.
            Err(e) => return Err(GrantRefusal::Unconfirmed(e)),
        };
        if let Some(what) = offboarded(&user, self.config.identity.allow_guests) {
            return Err(GrantRefusal::Offboarded(what));
        }
        let email = user.email.unwrap_or_default();
        let resolved = resolve_principal(
            &self.config.identity,
            &cluster.account_id,
            cluster.strategy,
            &email,
        )
        .map_err(GrantRefusal::NoPrincipal)?;
        if resolved.principal != req.access.principal
            || req
                .access
                .k8s_user
                .as_ref()
                .is_some_and(|u| *u != resolved.k8s_user)
        {
            return Err(GrantRefusal::PrincipalChanged {
                was: req.access.principal.clone(),
                now: resolved.principal,
            });
        }
        Ok(())
    }

    /// Spec 9.1: Active grants on `cluster` whose requester is now
    /// deactivated (or a guest where guests may not hold access) are revoked,
    /// audited `revoked` with reason `offboarded`. Runs on every reconcile
    /// pass, so access ends within one `reconcile_interval`. A requester
    /// Slack cannot be asked about right now keeps access until the next
    /// pass: only a definite answer revokes.
    pub async fn offboard_cluster(self: &Arc<Self>, cluster: &ClusterPolicy) -> usize {
        let live = match self.store.live().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(cluster = %cluster.name, error = %e, "offboarding check skipped: store unavailable");
                return 0;
            }
        };
        let now = self.clock.now();
        let mut by_user: BTreeMap<String, Vec<Request>> = BTreeMap::new();
        for r in live {
            if r.access.cluster == cluster.name
                && in_force(&r, now)
                && r.extends.is_none()
                && self.acts_on(&r)
            {
                by_user
                    .entry(r.requester.user_id.clone())
                    .or_default()
                    .push(r);
            }
        }
        let mut revoked = 0;
        for (user, grants) in by_user {
            let why = match self.lookup(&user).await {
                Ok(u) => offboarded(&u, self.config.identity.allow_guests),
                Err(e) if e.code() == Some(USER_NOT_FOUND) => Some("unknown to Slack"),
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "offboarding check: profile lookup failed; next pass retries");
                    None
                }
            };
            let Some(why) = why else { continue };
            for grant in grants {
                if self.mark_offboarded(&grant, why).await {
                    revoked += 1;
                    tracing::info!(request_id = %grant.id, user = %user, why, "requester offboarded: revoking");
                    // Now rather than at the scheduler's next look.
                    let service = Arc::clone(self);
                    let id = grant.id.clone();
                    tokio::spawn(async move { service.drive(&id).await });
                }
            }
        }
        revoked
    }

    /// Records the revoke intent (one CAS write); the revoke itself, and its
    /// `revoked` audit with reason `offboarded`, follow like any other.
    async fn mark_offboarded(&self, grant: &Request, why: &str) -> bool {
        let now = self.clock.now();
        let note = format!("requester's Slack account is {why}");
        let marked = self
            .modify(&grant.id, |current| {
                if current.revoke.is_some()
                    || !matches!(current.state, State::Active | State::RevokeFailed)
                {
                    return super::Change::Keep(false);
                }
                let intent = RevokeIntent {
                    reason: RevokeReason::Offboarded,
                    by: crate::domain::audit::ACTOR_TOLLGATE.to_string(),
                    note: Some(note.clone()),
                    at: now,
                };
                match crate::domain::lifecycle::revoke_requested(current, intent) {
                    Ok(e) => super::Change::Write(Box::new(e.row), e.audit, true),
                    Err(_) => super::Change::Keep(false),
                }
            })
            .await;
        match marked {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(request_id = %grant.id, error = %e, "offboarding revoke not recorded; next pass retries");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(deleted: bool, is_bot: bool, is_guest: bool) -> SlackUser {
        SlackUser {
            id: "U1".into(),
            email: Some("a@example.com".into()),
            deleted,
            is_bot,
            is_guest,
            tz: None,
            tz_offset_secs: 0,
        }
    }

    #[test]
    fn who_is_offboarded() {
        assert_eq!(offboarded(&user(false, false, false), false), None);
        assert_eq!(
            offboarded(&user(true, false, false), true),
            Some("deactivated")
        );
        assert_eq!(offboarded(&user(false, true, false), true), Some("a bot"));
        assert_eq!(
            offboarded(&user(false, false, true), false),
            Some("a guest")
        );
        assert_eq!(offboarded(&user(false, false, true), true), None);
    }
}
