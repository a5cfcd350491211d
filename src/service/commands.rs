//! `/access …`: parse, check against policy, record, and answer with an
//! ephemeral receipt; the approval card is posted after the answer.

use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use super::error::Refusal;
use super::{Change, Service};
use crate::domain::audit::AuditEvent;
use crate::domain::command::{parse, Command, RequestArgs, USAGE};
use crate::domain::directory::Need;
use crate::domain::duration::format_duration;
use crate::domain::identity::{resolve as resolve_principal, Principal};
use crate::domain::lifecycle::Mode;
use crate::domain::policy::{listed, may_request, resolve_request, ClusterPolicy, Strategy};
use crate::domain::request::{AccessSpec, Asked, CardRef, Request, RequestId, Requester, State};
use crate::domain::text::{clip, escape_slack};
use crate::slack::{blocks, SlackUser};
use crate::store::StoreError;

/// The form fields of a slash command that Tollgate reads.
#[derive(Debug, Clone, Deserialize)]
pub struct SlashCommand {
    pub user_id: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub response_url: Option<String>,
    /// Lets `/access` alone open the modal (valid for three seconds).
    #[serde(default)]
    pub trigger_id: Option<String>,
}

impl Service {
    /// Every outcome, error or not, is a message for the requester.
    pub async fn handle_command(self: &Arc<Self>, cmd: SlashCommand) -> String {
        let admitted = self
            .command_rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(&cmd.user_id, self.clock.now());
        if let Err(wait) = admitted {
            self.metrics.rejected("commands_per_minute");
            return blocks::too_many_commands(self.config.slack.commands_per_minute, wait);
        }
        let parsed = match parse(&cmd.text) {
            Ok(c) => c,
            Err(message) => return message,
        };
        match parsed {
            Command::Help => help_text(),
            Command::Modal => self.open_request_modal(&cmd).await,
            Command::Clusters => self.clusters_text(&cmd.user_id).await,
            Command::List => self.list_text(&cmd.user_id).await,
            Command::Revoke { id } => self.slack_revoke(&cmd.user_id, &id).await,
            Command::Extend { id, duration } => {
                self.request_extension(
                    &cmd.user_id,
                    &id,
                    Some(&duration),
                    cmd.response_url.clone(),
                    None,
                )
                .await
            }
            Command::Request(args) => match self.submit(&cmd, args).await {
                Ok(receipt) => receipt,
                Err(refusal) => blocks::refusal_text(&refusal),
            },
        }
    }

    pub(super) async fn submit(
        self: &Arc<Self>,
        cmd: &SlashCommand,
        args: RequestArgs,
    ) -> Result<String, Refusal> {
        let cluster =
            self.config
                .cluster(&args.cluster)
                .ok_or_else(|| Refusal::UnknownCluster {
                    asked: args.cluster.clone(),
                    known: self
                        .config
                        .clusters
                        .iter()
                        .map(|c| c.name.clone())
                        .collect(),
                })?;
        // Break-glass is capped by its own max_duration, not the role's,
        // and its reason is the rest of the line.
        let break_glass_view;
        let cluster = match (&args.break_glass, &cluster.break_glass) {
            (None, _) => cluster,
            (Some(_), None) => {
                self.audit_break_glass_refused(
                    &cmd.user_id,
                    cluster,
                    "not allowed on this cluster",
                )
                .await;
                return Err(Refusal::NoBreakGlass {
                    cluster: cluster.name.clone(),
                });
            }
            (Some(_), Some(bg)) => {
                let mut c = cluster.clone();
                for r in c.roles.values_mut() {
                    r.limits.max_duration = bg.max_duration;
                    r.limits.min_duration = r.limits.min_duration.min(bg.max_duration);
                }
                break_glass_view = c;
                &break_glass_view
            }
        };
        let mut resolved = match resolve_request(cluster, &args) {
            Ok(r) => r,
            Err(why) => {
                if args.break_glass.is_some() {
                    self.audit_break_glass_refused(&cmd.user_id, cluster, &why)
                        .await;
                }
                return Err(Refusal::Policy(why));
            }
        };
        if let Some(reason) = &args.break_glass {
            resolved.reason = reason.clone();
        }
        let role = cluster
            .roles
            .get(&resolved.role)
            .ok_or_else(|| Refusal::RoleNotConfigured {
                role: resolved.role.clone(),
                cluster: cluster.name.clone(),
            })?;

        // Remembered answers will do: nothing is granted before approval,
        // and an auto-approved or break-glass grant asks Slack afresh at
        // grant (`recheck_identity`, `row_members`).
        let user = self.requesting_user(&cmd.user_id, Need::Recent).await?;
        if !role.requesters.is_empty() {
            let members = self.group_members(&role.requesters, Need::Recent).await;
            if !may_request(role, &user.id, &members) {
                return Err(Refusal::MayNotRequest {
                    role: role.name.clone(),
                    cluster: cluster.name.clone(),
                    who: role.requesters.clone(),
                });
            }
        }
        let mode = match &cluster.break_glass {
            Some(bg) if args.break_glass.is_some() => {
                let members = self.group_members(&bg.allowed, Need::Recent).await;
                if !listed(&bg.allowed, &user.id, &members) {
                    self.audit_break_glass_refused(&user.id, cluster, "not in break_glass.allowed")
                        .await;
                    return Err(Refusal::MayNotBreakGlass {
                        cluster: cluster.name.clone(),
                        who: bg.allowed.clone(),
                    });
                }
                Mode::BreakGlass
            }
            _ if !role.auto_approve.is_empty()
                && listed(
                    &role.auto_approve,
                    &user.id,
                    &self.group_members(&role.auto_approve, Need::Recent).await,
                ) =>
            {
                Mode::AutoApproved
            }
            _ => Mode::Approval,
        };
        let email = user.email.clone().unwrap_or_default();
        // Resolved now, stored, shown on the card, and resolved again at
        // grant time (spec 9.1).
        let resolved_principal = resolve_principal(
            &self.config.identity,
            &cluster.account_id,
            cluster.strategy,
            &email,
        );
        let Principal {
            principal,
            k8s_user,
        } = match resolved_principal {
            Ok(p) => p,
            Err(why) => {
                if mode == Mode::BreakGlass {
                    self.audit_break_glass_refused(&user.id, cluster, "no principal")
                        .await;
                }
                return Err(Refusal::Policy(why));
            }
        };
        // Only what waits on approvers counts: break-glass and auto-approved
        // requests put nothing in front of them, and break-glass must work
        // in an incident whatever else is waiting.
        if mode == Mode::Approval {
            self.pending_room(&user.id, user.email.as_deref().unwrap_or_default(), None)
                .await?;
        }

        let now = self.clock.now();
        let mut req = Request::pending(
            Asked {
                id: RequestId::generate(&mut rand::thread_rng()),
                requester: Requester {
                    user_id: user.id.clone(),
                    email,
                    tz: user.tz.clone(),
                    tz_offset_secs: user.tz_offset_secs,
                },
                access: AccessSpec {
                    cluster: cluster.name.clone(),
                    role: role.name.clone(),
                    principal,
                    policy_arn: match cluster.strategy {
                        Strategy::AccessEntry => role.access_policy.clone(),
                        _ => None,
                    },
                    namespaces: resolved.namespaces.clone(),
                    // Only the cluster's strategy's fields, so the card
                    // describes the change that approval will really make.
                    cluster_role: (cluster.strategy == Strategy::SessionRbac)
                        .then(|| role.cluster_role.clone())
                        .flatten(),
                    groups: if cluster.strategy == Strategy::AwsAuth {
                        role.groups.clone()
                    } else {
                        Vec::new()
                    },
                    k8s_user: Some(k8s_user),
                    strategy: Some(cluster.strategy),
                },
                reason: resolved.reason.clone(),
                duration: resolved.duration,
                approval_timeout: role.limits.approval_timeout,
                required_approvals: role.limits.required_approvals,
                response_url: cmd.response_url.clone(),
            },
            now,
        );
        mode.preapprove(&mut req, now);
        let recorded = self
            .create_fresh(&mut req, |req| {
                let mut audit = vec![AuditEvent::for_request(
                    req,
                    "requested",
                    &req.requester.user_id,
                    now,
                    json!({
                        "role": req.access.role,
                        "duration": format_duration(req.duration),
                        "namespaces": req.access.namespaces,
                        "reason": req.reason,
                        "policy": req.access.policy_arn,
                    }),
                )];
                audit.extend(mode.decision_audit(req, now));
                audit
            })
            .await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record request");
            return Err(Refusal::StoreUnavailable { what: "requested" });
        }
        self.wake.notify_one();
        self.metrics.entered(State::Pending.label());
        tracing::info!(request_id = %req.id, cluster = %req.access.cluster, role = %req.access.role, "requested");

        let service = Arc::clone(self);
        let id = req.id.clone();
        if mode != Mode::Approval {
            let security = (mode == Mode::BreakGlass)
                .then(|| self.config.slack.security_channel.clone())
                .flatten();
            tokio::spawn(async move {
                service.drive(&id).await;
                // The approval channel still gets a card: the record of what
                // was granted without a click, for review.
                service.post_card(&id).await;
                if let (Some(channel), Ok(Some(req))) = (security, service.store.get(&id).await) {
                    if let Err(e) = service
                        .slack
                        .post(&channel, &blocks::break_glass_alert(&req))
                        .await
                    {
                        tracing::error!(request_id = %id, error = %e, "break-glass announcement not delivered");
                    }
                }
            });
            return Ok(format!(
                "{} {}: granting `{}` on {} for {} now. It will {}. {}",
                mode.label_title(),
                req.id,
                req.access.role,
                cluster.name,
                format_duration(req.duration),
                blocks::change_description(&req),
                match mode {
                    Mode::BreakGlass =>
                        "The security channel has been told and a review card posted.",
                    _ => "A notice is posted in the approval channel.",
                }
            ));
        }
        tokio::spawn(async move { service.post_card(&id).await });

        Ok(format!(
            "Request {} sent to <#{}> for approval: `{}` on {} for {} from approval. Approval will {}. You'll get a DM when it's decided.",
            req.id,
            cluster.approval_channel,
            req.access.role,
            cluster.name,
            format_duration(req.duration),
            blocks::change_description(&req),
        ))
    }

    /// The Slack profile of someone asking for access, as `need` requires
    /// it (spec 9.9); deactivated accounts and bots are refused. A profile
    /// Slack rate-limits is waited for, not refused: the command was
    /// acknowledged already and its answer follows (`directory`).
    pub(super) async fn requesting_user(&self, id: &str, need: Need) -> Result<SlackUser, Refusal> {
        let user = match self.profile(id, need).await {
            Ok(user) => user,
            Err(e) => {
                tracing::warn!(error = %e, "users.info failed");
                return Err(Refusal::ProfileUnavailable);
            }
        };
        if user.deleted || user.is_bot {
            return Err(Refusal::DeactivatedOrBot);
        }
        if user.is_guest && !self.config.identity.allow_guests {
            return Err(Refusal::Guest);
        }
        Ok(user)
    }

    /// `max_pending_per_user` (spec 9.3): the requests waiting on approvers,
    /// extensions included, counted across every cluster.
    ///
    /// Read per cluster through the live rows of the principal the user's
    /// email maps to there (`live_for`), not by decoding every live request:
    /// a command's cost follows the requester's own requests, however many
    /// others are pending (spec 11). A request made under an earlier
    /// mapping (the email or the principal template changed since) is not
    /// counted; the limit guards approvers' attention, it grants nothing.
    /// An extension also names its grant's (cluster, principal) in `also`,
    /// so its own principal's requests count even when the email no longer
    /// maps to it.
    pub(super) async fn pending_room(
        &self,
        user: &str,
        email: &str,
        also: Option<(&str, &str)>,
    ) -> Result<(), Refusal> {
        let unavailable = |e: StoreError| {
            tracing::error!(error = %e, "store read failed");
            Refusal::StoreUnavailable { what: "requested" }
        };
        let mut places: std::collections::BTreeSet<(String, String)> = self
            .config
            .clusters
            .iter()
            .filter_map(|cluster| {
                resolve_principal(
                    &self.config.identity,
                    &cluster.account_id,
                    cluster.strategy,
                    email,
                )
                .ok()
                .map(|Principal { principal, .. }| (cluster.name.clone(), principal))
            })
            .collect();
        places.extend(also.map(|(c, p)| (c.to_string(), p.to_string())));
        let mut pending: Vec<String> = Vec::new();
        for (cluster, principal) in &places {
            let live = self
                .store
                .live_for(cluster, principal)
                .await
                .map_err(unavailable)?;
            pending.extend(
                live.iter()
                    .filter(|r| r.requester.user_id == user && r.state == State::Pending)
                    .map(|r| format!("{} (`{}` on {})", r.id, r.access.role, r.access.cluster)),
            );
        }
        let max = self.config.max_pending_per_user as usize;
        if pending.len() >= max {
            return Err(Refusal::TooManyPending { pending, max });
        }
        Ok(())
    }

    /// Records a new request; ids are short for people's sake, so a
    /// collision just draws another.
    pub(super) async fn create_fresh(
        &self,
        req: &mut Request,
        audit: impl Fn(&Request) -> Vec<AuditEvent>,
    ) -> Result<(), StoreError> {
        // Spec 9.8: the mode that made a row is part of it, so the other
        // mode never acts on it.
        req.dry_run = self.config.dry_run;
        let mut attempts = 0;
        loop {
            match self.store.create(req, audit(req)).await {
                Err(StoreError::Exists(_)) if attempts < 5 => {
                    attempts += 1;
                    req.id = RequestId::generate(&mut rand::thread_rng());
                }
                other => return other,
            }
        }
    }

    /// A refused break-glass attempt is audited, never announced.
    async fn audit_break_glass_refused(&self, user: &str, cluster: &ClusterPolicy, why: &str) {
        let event = AuditEvent {
            ts: self.clock.now(),
            event: "break_glass".into(),
            request_id: String::new(),
            actor: user.to_string(),
            cluster: cluster.name.clone(),
            principal: String::new(),
            details: json!({"refused": true, "why": why}),
            mac: None,
        };
        if let Err(e) = self.store.append_audit(vec![event]).await {
            tracing::error!(error = %e, "break-glass refusal not audited");
        }
    }

    /// `/access revoke <id>`: the requester, or an approver of that role.
    async fn slack_revoke(self: &Arc<Self>, user: &str, id_text: &str) -> String {
        let Some(id) = RequestId::parse(id_text) else {
            return format!(
                "`{}` is not a request id (like R-7F3K2).",
                escape_slack(&clip(id_text, 20))
            );
        };
        let req = match self.store.get(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => return format!("Tollgate has no request {id}."),
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                return "Tollgate's store is temporarily unavailable; nothing was revoked. Please try again in a minute.".into();
            }
        };
        if req.requester.user_id != user {
            let approvers = self
                .config
                .cluster(&req.access.cluster)
                .and_then(|c| c.roles.get(&req.access.role))
                .map(|r| r.approvers.clone())
                .unwrap_or_default();
            let members = self.group_members(&approvers, Need::Recent).await;
            if !crate::domain::policy::listed(&approvers, user, &members) {
                return format!(
                    "Only the requester or an approver of `{}` on {} can revoke {id}.",
                    req.access.role, req.access.cluster
                );
            }
        }
        let who = super::Revoker::Slack {
            user: user.to_string(),
        };
        self.revoke_request(id.as_str(), who)
            .await
            .unwrap_or_else(|e| e.to_string())
    }

    pub(super) async fn post_card(&self, id: &RequestId) {
        let Ok(Some(req)) = self.store.get(id).await else {
            return;
        };
        let Some(cluster) = self.config.cluster(&req.access.cluster) else {
            return;
        };
        let channel = cluster.approval_channel.clone();
        let msg = blocks::card(&req, self.clock.now(), &self.sensitive_namespaces(&req));
        match self
            .send("approval card", || self.slack.post(&channel, &msg))
            .await
        {
            Ok(ts) => {
                let card = CardRef { channel, ts };
                let copies = if cluster.dm_approvers {
                    self.card_copies(&req, &msg).await
                } else {
                    Vec::new()
                };
                let stored = self
                    .modify(id, |current| {
                        let mut next = current.clone();
                        next.card = Some(card.clone());
                        next.card_copies = copies.clone();
                        Change::Write(Box::new(next), Vec::new(), ())
                    })
                    .await;
                match stored {
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "card posted but not recorded")
                    }
                    // A click may have decided the request while the copies
                    // were being sent; they must not keep showing buttons.
                    Ok(()) => {
                        if let Ok(Some(now)) = self.store.get(id).await {
                            if now.state != State::Pending {
                                self.refresh_card(&now).await;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "approval card not posted");
                let text = match e.code() {
                    Some("not_in_channel") | Some("channel_not_found") | Some("is_archived") => format!(
                        "Tollgate cannot post your request {} in <#{channel}> (Slack says `{}`). Ask someone there to invite the app (`/invite @Tollgate`). Your request stays pending until it is decided or expires.",
                        req.id,
                        e.code().unwrap_or_default()
                    ),
                    _ => format!(
                        "Tollgate could not post the approval card for {} just now ({e}). Your request stays pending.",
                        req.id
                    ),
                };
                self.respond(req.response_url.as_deref(), text).await;
            }
        }
    }

    /// `dm_approvers`: each approver (user-group members included) but the
    /// requester gets the card as a DM.
    async fn card_copies(&self, req: &Request, msg: &crate::slack::Message) -> Vec<CardRef> {
        let approvers = self
            .config
            .cluster(&req.access.cluster)
            .and_then(|c| c.roles.get(&req.access.role))
            .map(|r| r.approvers.clone())
            .unwrap_or_default();
        let mut users: Vec<String> = approvers
            .iter()
            .filter(|a| !a.starts_with('S'))
            .cloned()
            .chain(self.group_members(&approvers, Need::Recent).await)
            .filter(|u| *u != req.requester.user_id)
            .collect();
        users.sort();
        users.dedup();
        let mut copies = Vec::new();
        for user in users {
            if let Some(at) = self.dm_at(&user, msg.clone()).await {
                copies.push(at);
            }
        }
        copies
    }

    /// Only what `user` may request (`requesters`), with each role's limits.
    async fn clusters_text(&self, user: &str) -> String {
        let offer = self.offer_for(user).await;
        if offer.is_empty() {
            return "There is no cluster you may request.".into();
        }
        let mut out = String::from("Clusters you can request:\n");
        for (name, allowed) in &offer {
            let Some(c) = self.config.cluster(name) else {
                continue;
            };
            let roles: Vec<String> = c
                .roles
                .values()
                .filter(|r| allowed.contains(&r.name))
                .map(|r| {
                    format!(
                        "`{}`{} ({}–{}{}{})",
                        r.name,
                        if r.namespaced { " (needs --ns)" } else { "" },
                        format_duration(r.limits.min_duration),
                        format_duration(r.limits.max_duration),
                        match r.limits.required_approvals {
                            1 => String::new(),
                            n => format!(", {n} approvals"),
                        },
                        if r.limits.require_reason {
                            ", reason required"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            out.push_str(&format!("• *{}*: {}\n", c.name, roles.join(", ")));
        }
        out
    }

    async fn list_text(&self, user: &str) -> String {
        let all = match self.store.live().await {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(error = %e, "cannot list requests");
                return "Tollgate's store is temporarily unavailable; please try again in a minute.".into();
            }
        };
        let mine: Vec<String> = all
            .iter()
            .filter(|r| r.requester.user_id == user && !r.state.is_terminal())
            .map(|r| {
                let until = r
                    .expires_at
                    .map(|t| format!(" until {}", blocks::utc_time(t, self.clock.now())))
                    .unwrap_or_default();
                let extends = r
                    .extends
                    .as_ref()
                    .map(|g| format!(" (extends {g} by {})", format_duration(r.duration)))
                    .unwrap_or_default();
                format!(
                    "• {} `{}` on {}{extends}: {}{until}",
                    r.id,
                    r.access.role,
                    r.access.cluster,
                    r.state.label()
                )
            })
            .collect();
        if mine.is_empty() {
            "You have no pending or active requests.".into()
        } else {
            format!("Your requests:\n{}", mine.join("\n"))
        }
    }
}

fn help_text() -> String {
    USAGE.to_string()
}
