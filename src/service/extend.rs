//! Extensions and the reminder before expiry. An extension is a request of
//! its own, naming the grant it extends and decided by the same rules; once
//! approved it moves the grant's expiry in place, so access never drops and
//! nothing is revoked and granted again.

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use super::{Change, Service};
use crate::domain::audit::AuditEvent;
use crate::domain::duration::{format_duration, parse_in_range};
use crate::domain::grant::{namespace_refused, role_changed};
use crate::domain::inbox::Interaction;
use crate::domain::lifecycle::{self, in_force, Mode};
use crate::domain::policy::{check_total_duration, listed, may_request, mention_list};
use crate::domain::request::{Request, RequestId, State};
use crate::domain::text::{clip, escape_slack};
use crate::slack::blocks;
use crate::store::StoreError;

/// Whether `ext` is an extension of `grant` asked for by `user`: a row a
/// derived id finds is this click's own only then.
fn filed_by(ext: &Request, grant: &RequestId, user: &str) -> bool {
    ext.extends.as_ref() == Some(grant) && ext.requester.user_id == user
}

/// The answer to a click whose extension is already on file.
fn already_filed(ext: &Request) -> String {
    format!(
        "Extension {} of {} by {} is already recorded ({}).",
        ext.id,
        ext.extends.as_ref().map(|g| g.as_str()).unwrap_or("?"),
        format_duration(ext.duration),
        ext.state.label().replace('_', " ")
    )
}

/// Why an extension row does not belong to the grant it names, if it does
/// not: an extension asked through Tollgate copies the grant's access and
/// requester, so any difference is a row written by hand.
fn extension_mismatch(ext: &Request, grant: &Request) -> Option<String> {
    let (a, g) = (&ext.access, &grant.access);
    let same_access = a.cluster == g.cluster
        && a.role == g.role
        && a.principal == g.principal
        && a.namespaces == g.namespaces;
    if !same_access {
        return Some(format!(
            "extension {} names access other than its grant {}'s",
            ext.id, grant.id
        ));
    }
    if ext.requester.user_id != grant.requester.user_id {
        return Some(format!(
            "extension {} was not asked by the requester of {}",
            ext.id, grant.id
        ));
    }
    if ext.dry_run != grant.dry_run {
        return Some(format!(
            "extension {} and its grant {} were made by servers of different modes",
            ext.id, grant.id
        ));
    }
    None
}

/// The answer for a row this server's mode does not act on.
pub(super) fn other_mode(id: &RequestId, dry_run: bool) -> String {
    let server = if dry_run {
        "a dry-run server (`serve --dry-run`)"
    } else {
        "a live server"
    };
    format!("{id} belongs to {server}; this one changes nothing for it.")
}

/// What applying an approved extension found.
enum Applied {
    /// The grant's expiry moved (now, or by an earlier pass of this same
    /// extension).
    Moved(Box<Request>),
    /// The grant had ended; there is nothing left to extend.
    Ended(String),
}

impl Service {
    /// `/access extend <id> <duration>`, and the reminder's Extend button
    /// (no duration: the grant's own again). A recorded click names the
    /// ids its extension may be filed under (`Interaction::extension_ids`),
    /// so processing the same click again files nothing more.
    pub(super) async fn request_extension(
        self: &Arc<Self>,
        user: &str,
        id_text: &str,
        duration_text: Option<&str>,
        response_url: Option<String>,
        click: Option<&Interaction>,
    ) -> String {
        let Some(id) = RequestId::parse(id_text) else {
            return format!(
                "`{}` is not a request id (like R-7F3K2).",
                escape_slack(&clip(id_text, 20))
            );
        };
        let mut click_id = None;
        if let Some(click) = click {
            for candidate in click.extension_ids() {
                match self.store.get(&candidate).await {
                    Ok(None) => {
                        click_id = Some(candidate);
                        break;
                    }
                    Ok(Some(ext)) if filed_by(&ext, &id, user) => return already_filed(&ext),
                    // Another request holds that id: the next candidate.
                    Ok(Some(_)) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "store read failed");
                        return "Tollgate's store is temporarily unavailable; nothing was requested. Please try again in a minute.".into();
                    }
                }
            }
            if click_id.is_none() {
                return format!(
                    "Tollgate could not file an extension of {id} for this click; nothing was requested. Ask with `/access extend {id} <duration>`."
                );
            }
        }
        let grant = match self.store.get(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => return format!("Tollgate has no request {id}."),
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                return "Tollgate's store is temporarily unavailable; nothing was requested. Please try again in a minute.".into();
            }
        };
        // A dry-run server never extends a live grant, nor a live one a
        // dry-run grant (spec 9.8).
        if !self.acts_on(&grant) {
            return other_mode(&id, grant.dry_run);
        }
        if let Some(original) = &grant.extends {
            return format!("{id} is itself an extension; extend the grant {original} instead.");
        }
        if grant.requester.user_id != user {
            return format!("Only the requester of {id} can extend it.");
        }
        let now = self.clock.now();
        if !in_force(&grant, now) {
            return format!(
                "{id} is {}, not active, so there is nothing to extend. Request access again with `/access eks …`.",
                grant.state.label().replace('_', " ")
            );
        }
        // One open extension per grant: a double click on Extend must not
        // file two. Extensions carry their grant's cluster and principal,
        // so that principal's live rows hold any open one.
        match self
            .store
            .live_for(&grant.access.cluster, &grant.access.principal)
            .await
        {
            Ok(all) => {
                if let Some(open) = all.iter().find(|r| {
                    r.extends.as_ref() == Some(&grant.id)
                        && matches!(r.state, State::Pending | State::Approved)
                }) {
                    return format!(
                        "{id} already has an extension waiting: {} (by {}). It is decided before another can be asked for.",
                        open.id,
                        format_duration(open.duration)
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                return "Tollgate's store is temporarily unavailable; nothing was requested. Please try again in a minute.".into();
            }
        }
        let Some(role) = self
            .config
            .cluster(&grant.access.cluster)
            .and_then(|c| c.roles.get(&grant.access.role))
        else {
            return format!(
                "`{}` on {} is no longer configured; {id} cannot be extended.",
                grant.access.role, grant.access.cluster
            );
        };
        // An extension keeps the grant's own namespaces (it cannot name
        // others); a namespace denied since the grant is not kept longer.
        if let Some(why) = self
            .config
            .cluster(&grant.access.cluster)
            .and_then(|c| namespace_refused(c, &grant.access))
        {
            return format!("{id} cannot be extended: {why}. Nothing was requested.");
        }
        let text = duration_text
            .map(str::to_string)
            .unwrap_or_else(|| format_duration(grant.duration));
        let by = match parse_in_range(&text, &role.limits.range()) {
            Ok(d) => d,
            Err(e) => {
                return format!(
                    "{e} (role `{}` on {})",
                    grant.access.role, grant.access.cluster
                )
            }
        };
        // Spec 9.3: never past max_total_duration from activation, whoever
        // (or nothing) approves it.
        if let (Some(active), Some(expires)) = (grant.activated_at, grant.expires_at) {
            let so_far = Duration::try_from(expires - active).unwrap_or_default();
            if let Err(why) = check_total_duration(so_far, by, role.limits.max_total_duration) {
                return format!("{why} Nothing was requested for {id}.");
            }
        }
        // Asked fresh (spec 9.9): an auto-approved extension moves the
        // expiry with no other look at the requester's account or groups.
        let fresh = self.asked_now();
        let requester = match self.requesting_user(user, fresh).await {
            Ok(u) => u,
            Err(why) => return blocks::refusal_text(&why),
        };
        // Guests never extend, even where they may request (spec 9.1).
        if requester.is_guest {
            return "Slack guest accounts cannot extend access; nothing was requested.".into();
        }
        // Who may request is asked again: being allowed once is not a
        // standing right to more time.
        if !role.requesters.is_empty() {
            let members = self.group_members(&role.requesters, fresh).await;
            if !may_request(role, user, &members) {
                return format!(
                    "You may no longer request `{}` on {}, so {id} cannot be extended. Who may: {}.",
                    role.name,
                    grant.access.cluster,
                    mention_list(&role.requesters)
                );
            }
        }
        let mode = if !role.auto_approve.is_empty()
            && listed(
                &role.auto_approve,
                user,
                &self.group_members(&role.auto_approve, fresh).await,
            ) {
            Mode::AutoApproved
        } else {
            Mode::Approval
        };
        if mode == Mode::Approval {
            let email = requester.email.as_deref().unwrap_or_default();
            let grant_at = Some((
                grant.access.cluster.as_str(),
                grant.access.principal.as_str(),
            ));
            if let Err(why) = self.pending_room(user, email, grant_at).await {
                return blocks::refusal_text(&why);
            }
        }
        let fixed_id = click_id.is_some();
        let mut ext = Request::extension_of(
            &grant,
            click_id.unwrap_or_else(|| RequestId::generate(&mut rand::thread_rng())),
            by,
            now,
            role.limits.approval_timeout,
            role.limits.required_approvals,
            response_url,
        );
        mode.preapprove(&mut ext, now);
        let audit = |ext: &Request| {
            let mut audit = vec![AuditEvent::for_request(
                ext,
                "requested",
                user,
                now,
                json!({"extends": grant.id.as_str(), "duration": format_duration(by)}),
            )];
            audit.extend(mode.decision_audit(ext, now));
            audit
        };
        let recorded = if fixed_id {
            self.store.create(&ext, audit(&ext)).await
        } else {
            self.create_fresh(&mut ext, audit).await
        };
        if let Err(StoreError::Exists(_)) = recorded {
            // Another pass over the same click (another replica's sweep)
            // filed it in between, or an unrelated request took the id.
            return match self.store.get(&ext.id).await {
                Ok(Some(filed)) if filed_by(&filed, &id, user) => already_filed(&filed),
                _ => format!("Tollgate could not file an extension of {id} just now; nothing was requested. Please click again."),
            };
        }
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record extension");
            return "Tollgate's store is temporarily unavailable; nothing was requested. Please try again in a minute.".into();
        }
        self.wake.notify_one();
        self.metrics.entered(ext.state.label());
        tracing::info!(request_id = %ext.id, extends = %grant.id, "extension requested");
        let service = Arc::clone(self);
        let ext_id = ext.id.clone();
        tokio::spawn(async move {
            if mode != Mode::Approval {
                service.drive(&ext_id).await;
            }
            service.post_card(&ext_id).await;
        });
        let until = grant
            .expires_at
            .map(|t| blocks::utc_time(t, now))
            .unwrap_or_default();
        match mode {
            Mode::Approval => format!(
                "Extension {} of {} by {} sent for approval. Your access stays in place meanwhile (until {until} unless extended); you'll get a DM when it's decided.",
                ext.id, grant.id, format_duration(by)
            ),
            _ => format!(
                "Extension {} of {} by {} is auto-approved; the new expiry follows in a DM.",
                ext.id,
                grant.id,
                format_duration(by)
            ),
        }
    }

    /// The reminder's Extend button: the same duration again; the answer
    /// goes back ephemerally where the button was clicked.
    pub(super) async fn extend_clicked(
        self: &Arc<Self>,
        user: &str,
        grant_id: &str,
        response_url: Option<String>,
        click: &Interaction,
    ) {
        let text = self
            .request_extension(user, grant_id, None, response_url.clone(), Some(click))
            .await;
        self.respond(response_url.as_deref(), text).await;
    }

    /// An approved extension: the grant's expiry moves under the principal's
    /// lock, so a revoke of the same grant either sees the new expiry or has
    /// already finished (and then the extension fails, said so).
    pub(super) async fn apply_extension(self: &Arc<Self>, ext: &Request) {
        let Some(grant_id) = ext.extends.clone() else {
            return;
        };
        // Asked before the principal's lock and the work permit: a revoke
        // of the grant never waits on Slack behind this extension, nor do
        // notices or a shutdown's drain.
        let members = self.row_members(ext).await;
        let Some(_working) = self.begin_work().await else {
            return;
        };
        let Some(guard) = self
            .principal(&ext.access.cluster, &ext.access.principal)
            .await
        else {
            return;
        };
        let now = self.clock.now();
        // Spec 9.8: an extension row is checked like a grant's before it
        // moves anything (a forged one would otherwise buy time up to the
        // cap), and it must be about the grant it names: the same access,
        // asked by the same requester. Its own row is otherwise checked
        // against a role and a principal the grant never had.
        let grant_row = match self.store.get(&grant_id).await {
            Ok(row) => row,
            Err(e) => {
                self.store_failed(&ext.id, &e, "store read failed");
                return;
            }
        };
        let mismatch = grant_row.as_ref().and_then(|g| extension_mismatch(ext, g));
        let invalid = match mismatch {
            Some(why) => Some(why),
            None => self.invalid_row(ext, &members),
        };
        if let Some(why) = invalid {
            tracing::error!(request_id = %ext.id, error = %why, "stored extension refused");
            self.metrics.failed("grant", "invalid_row");
            let rejected = self
                .modify(&ext.id, |current| {
                    if current.state != State::Approved {
                        return Change::Keep(None);
                    }
                    Change::event(
                        &ext.id,
                        lifecycle::row_rejected(current, &why, None, now, |_| Duration::ZERO),
                    )
                })
                .await;
            match rejected {
                Ok(Some(notice)) => self.announce(&ext.id, notice),
                Ok(None) => {}
                Err(e) => self.store_failed(&ext.id, &e, "refused extension not recorded"),
            }
            return;
        }
        let applied = self
            .modify(&grant_id, |grant| {
                if grant.extended_by.contains(&ext.id) {
                    return Change::Keep(Applied::Moved(Box::new(grant.clone())));
                }
                // A grant of the other mode (a dry-run grant on a live
                // server, or the reverse) is never moved from here.
                if !self.acts_on(grant) {
                    return Change::Keep(Applied::Ended(other_mode(&grant.id, grant.dry_run)));
                }
                // Checked before the store write too; again here, on the
                // grant as this write finds it.
                if let Some(why) = extension_mismatch(ext, grant) {
                    return Change::Keep(Applied::Ended(why));
                }
                // The limits are the grant's role's: the extension's row
                // names the same one (checked above), but the grant is what
                // is moved.
                let cluster = self.config.cluster(&grant.access.cluster);
                let role_limits = cluster
                    .and_then(|c| c.roles.get(&grant.access.role))
                    .map(|r| r.limits.clone());
                let reminder_before = role_limits.as_ref().map(|l| l.reminder_before);
                let max_total = role_limits.map(|l| l.max_total_duration);
                // A live claim on an Active grant means a replica is revoking it.
                let revoking = grant.claim.as_ref().is_some_and(|c| c.until > now);
                let Some(expires_at) = grant
                    .expires_at
                    .filter(|_| in_force(grant, now) && !revoking)
                else {
                    return Change::Keep(Applied::Ended(format!(
                        "{} had already ended when the extension was approved",
                        grant.id
                    )));
                };
                // The grant's access as approved must still be what its
                // role gives: more time on a role edited since would be
                // time on something nobody approved.
                let changed = match self.config.cluster(&grant.access.cluster) {
                    Some(c) => role_changed(c, &grant.access),
                    None => Some(format!(
                        "the cluster {} is no longer configured",
                        grant.access.cluster
                    )),
                };
                if let Some(changed) = changed {
                    return Change::Keep(Applied::Ended(format!(
                        "{} cannot be extended: {changed}",
                        grant.id
                    )));
                }
                // Checked when asked for; checked again here because the
                // config may have lowered the cap since.
                if let (Some(active), Some(max_total)) = (grant.activated_at, max_total) {
                    let so_far = Duration::try_from(expires_at - active).unwrap_or_default();
                    if let Err(why) = check_total_duration(so_far, ext.duration, max_total) {
                        return Change::Keep(Applied::Ended(why));
                    }
                }
                // Spec 9.7, checked on the grant's own namespaces: the
                // config may have denied one since the extension was asked.
                if let Some(why) = cluster.and_then(|c| namespace_refused(c, &grant.access)) {
                    return Change::Keep(Applied::Ended(why));
                }
                let e = lifecycle::extend_grant(grant, ext, expires_at, reminder_before, now);
                let moved = Applied::Moved(Box::new(e.row.clone()));
                Change::Write(Box::new(e.row), e.audit, moved)
            })
            .await;
        let applied = match applied {
            Ok(a) => a,
            Err(crate::store::StoreError::NotFound(_)) => {
                Applied::Ended(format!("{grant_id} no longer exists"))
            }
            Err(e) => {
                tracing::error!(request_id = %ext.id, error = %e, "extension not applied; it will be driven again");
                return;
            }
        };
        // Kubernetes objects carry the expiry as an annotation; the store is
        // what revokes, so a failure here is only logged.
        // The annotation rewrite is a cloud call: only while the lease is fresh.
        let fresh = guard.fresh_enough(self.clock.now());
        if let (true, Applied::Moved(grant)) = (fresh, &applied) {
            if let Err(e) = self.converge_for(grant, grant.expires_at, now).await {
                tracing::warn!(request_id = %grant.id, error = %e, "expiry annotation not updated");
            }
        }
        drop(guard);
        let recorded = self
            .modify(&ext.id, |current| {
                if current.state != State::Approved {
                    return Change::Keep(None);
                }
                let effects = match &applied {
                    Applied::Moved(grant) => {
                        lifecycle::extension_applied(current, grant.expires_at, now)
                    }
                    Applied::Ended(why) => lifecycle::extension_failed(current, why, now),
                };
                Change::event(&ext.id, effects)
            })
            .await;
        match recorded {
            Ok(Some(notice)) => {
                tracing::info!(request_id = %ext.id, grant = %grant_id, "extension applied");
                self.announce(&ext.id, notice);
                if let Ok(Some(grant)) = self.store.get(&grant_id).await {
                    self.refresh_card(&grant).await;
                }
            }
            Ok(None) => {}
            Err(e) => self.store_failed(
                &ext.id,
                &e,
                "extension applied but not recorded; it will be driven again",
            ),
        }
    }

    /// The reminder DM, sent once: the row is marked first, so a crash
    /// loses at most one reminder and never sends two.
    pub(super) async fn remind(self: &Arc<Self>, id: &RequestId) {
        let now = self.clock.now();
        let due = self
            .modify(id, |current| {
                if current.reminder_due().is_none_or(|t| t > now) {
                    return Change::Keep(None);
                }
                let mut next = current.clone();
                next.remind_at = None;
                Change::Write(Box::new(next.clone()), Vec::new(), Some(next))
            })
            .await;
        match due {
            Ok(Some(req)) => {
                tracing::info!(request_id = %id, "reminder due");
                let service = Arc::clone(self);
                tokio::spawn(async move {
                    let msg = blocks::reminder_dm(&req, service.clock.now());
                    service.dm(&req.requester.user_id, msg).await;
                });
            }
            Ok(None) => {}
            Err(e) => tracing::error!(request_id = %id, error = %e, "reminder not recorded"),
        }
    }
}
