//! Approve / Deny clicks. Each click is one CAS write; a double click, a
//! Slack retry or eight approvers at once still reach the quorum once.

use std::sync::Arc;
use tracing::Instrument;

use super::{Change, Notice, Service};
use crate::domain::lifecycle::{self, Refused};
use crate::domain::policy::{check_approver, listed};
use crate::domain::request::{RequestId, State};

#[derive(Debug, Clone)]
pub struct Decision {
    pub request_id: String,
    pub user_id: String,
    pub approve: bool,
    pub response_url: Option<String>,
}

enum Outcome {
    NotPending(State),
    AlreadyVoted,
    Voted { quorum: bool },
    Denied,
}

impl Service {
    pub async fn decide(self: &Arc<Self>, d: Decision) {
        let span = tracing::info_span!("request", request_id = %d.request_id, user = %d.user_id);
        self.decide_inner(d).instrument(span).await
    }

    async fn decide_inner(self: &Arc<Self>, d: Decision) {
        let reply = |text: String| {
            let url = d.response_url.clone();
            async move { self.respond(url.as_deref(), text).await }
        };
        let Some(id) = RequestId::parse(&d.request_id) else {
            return reply("That button names no request Tollgate knows.".into()).await;
        };
        let req = match self.store.get(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => return reply(format!("Tollgate has no request {id}.")).await,
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                return reply(
                    "Tollgate's store is temporarily unavailable; your click was not counted. Please try again in a minute."
                        .into(),
                )
                .await;
            }
        };
        // A card of the other mode's server (a shared table, a channel both
        // post to): a click here would record a decision this server never
        // acts on, or approve a row the other mode would then grant.
        if !self.acts_on(&req) {
            tracing::warn!(request_id = %id, dry_run = req.dry_run, "click on a request of the other mode; not counted");
            return reply(format!(
                "{} Your click was not counted.",
                super::extend::other_mode(&id, req.dry_run)
            ))
            .await;
        }
        if req.state != State::Pending {
            return reply(not_pending_text(&id, req.state)).await;
        }
        let Some(role) = self
            .config
            .cluster(&req.access.cluster)
            .and_then(|c| c.roles.get(&req.access.role))
        else {
            return reply(format!(
                "{} names `{}` on {}, which the configuration no longer has; it cannot be decided.",
                id, req.access.role, req.access.cluster
            ))
            .await;
        };
        // Asked fresh, not remembered (spec 9.9): a deactivated approver or
        // one removed from the approvers' group loses the power at once.
        let fresh = self.asked_now();
        match self.profile(&d.user_id, fresh).await {
            Ok(u) if u.deleted || u.is_bot => {
                return reply("Deactivated accounts and bots cannot decide requests.".into()).await
            }
            // Guests never approve, whatever `allow_guests` says (spec 9.1).
            Ok(u) if u.is_guest => {
                return reply(
                    "Slack guest accounts cannot decide requests; your click was not counted."
                        .into(),
                )
                .await
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "users.info failed for a decision");
                return reply("Tollgate could not look up your Slack profile; your click was not counted. Try again.".into()).await;
            }
        }
        // An offboarded requester's request cannot be approved (spec 9.1).
        if d.approve {
            if let Err(why) = self.requester_still_here(&req).await {
                return reply(crate::slack::blocks::refusal_text(&why)).await;
            }
        }
        let members = self.group_members(&role.approvers, fresh).await;
        let allowed = if d.approve {
            check_approver(role, &req.requester.user_id, &d.user_id, &members)
        } else if listed(&role.approvers, &d.user_id, &members) {
            Ok(())
        } else {
            check_approver(role, &req.requester.user_id, &d.user_id, &members)
        };
        if let Err(why) = allowed {
            return reply(why).await;
        }

        let now = self.clock.now();
        let user = d.user_id.clone();
        let approve = d.approve;
        let outcome = self
            .modify(&id, |current| {
                let decided = if approve {
                    lifecycle::approve(current, &user, now)
                } else {
                    lifecycle::deny(current, &user, now)
                };
                match decided {
                    Ok(e) => {
                        let outcome = match e.row.state {
                            State::Denied => Outcome::Denied,
                            state => Outcome::Voted {
                                quorum: state == State::Approved,
                            },
                        };
                        Change::Write(Box::new(e.row), e.audit, outcome)
                    }
                    Err(Refused::AlreadyVoted) => Change::Keep(Outcome::AlreadyVoted),
                    Err(Refused::NotPending(state)) => Change::Keep(Outcome::NotPending(state)),
                    Err(_) => Change::Keep(Outcome::NotPending(current.state)),
                }
            })
            .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "decision not recorded");
                return reply("Tollgate's store is temporarily unavailable; your decision was not recorded. Please try again in a minute.".into()).await;
            }
        };
        match outcome {
            Outcome::NotPending(state) => reply(not_pending_text(&id, state)).await,
            Outcome::AlreadyVoted => {
                reply(format!("Your approval of {id} is already counted.")).await
            }
            Outcome::Voted { quorum } => {
                tracing::info!(request_id = %id, approver = %d.user_id, quorum, "approval");
                self.announce(&id, Notice::CardOnly);
                if quorum {
                    self.drive(&id).await;
                }
            }
            Outcome::Denied => {
                tracing::info!(request_id = %id, by = %d.user_id, "denied");
                self.announce(&id, Notice::Denied);
            }
        }
    }
}

fn not_pending_text(id: &RequestId, state: State) -> String {
    format!(
        "{id} is already {}; your click changed nothing.",
        state.label().replace('_', " ")
    )
}
