//! Block Kit messages. Every piece of user-typed text passes through
//! `escape_slack` here, and nowhere else builds message text.

use serde_json::{json, Value};
use time::{OffsetDateTime, UtcOffset};

use super::Message;
use crate::domain::duration::format_duration;
use crate::domain::grant::Scope;
use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::request::{Request, State};
use crate::domain::text::escape_slack;

pub const ACTION_APPROVE: &str = "approve";
pub const ACTION_DENY: &str = "deny";
/// The reminder DM's button (spec 8.2); its value is the grant's id.
pub const ACTION_EXTEND: &str = "extend";

fn section(text: &str) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})
}

fn context(text: &str) -> Value {
    json!({"type": "context", "elements": [{"type": "mrkdwn", "text": text}]})
}

/// `16:40 UTC`, or with the date when it is not today.
pub fn utc_time(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let hm = format!("{:02}:{:02}", t.hour(), t.minute());
    if t.date() == now.to_offset(UtcOffset::UTC).date() {
        format!("{hm} UTC")
    } else {
        format!("{hm} UTC on {}", t.date())
    }
}

/// `16:40:02 UTC` (with the date when it is not today): the instant a
/// read-back saw access gone, to the second.
pub fn utc_time_secs(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let hms = format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    if t.date() == now.to_offset(UtcOffset::UTC).date() {
        format!("{hms} UTC")
    } else {
        format!("{hms} UTC on {}", t.date())
    }
}

/// What a revoked request's messages say about the removal: verified by a
/// read-back of the cluster (spec 10.2), or not read back (dry run).
fn removal(req: &Request, now: OffsetDateTime) -> String {
    match req.verified_at {
        Some(t) => format!("access removed, verified at {}", utc_time_secs(t, now)),
        None => "removal not verified by a read-back of the cluster".to_string(),
    }
}

/// The requester's wall-clock time, from Slack's profile offset.
pub fn local_time(t: OffsetDateTime, offset_secs: i32, tz: Option<&str>) -> String {
    let offset = UtcOffset::from_whole_seconds(offset_secs).unwrap_or(UtcOffset::UTC);
    let local = t.to_offset(offset);
    let (h, m, _) = offset.as_hms();
    let zone = tz.map(|z| format!("{z}, ")).unwrap_or_default();
    format!(
        "{} {:02}:{:02} ({zone}UTC{}{:02}:{:02})",
        local.date(),
        local.hour(),
        local.minute(),
        if offset.is_negative() { '-' } else { '+' },
        h.abs(),
        m.abs()
    )
}

/// Exactly what approval changes, so an approver approves a precise change;
/// for mrkdwn text (principals and user names come from Slack emails, so
/// they are escaped: an address can neither ping nor forge a link).
pub fn change_description(req: &Request) -> String {
    describe_change(req, escape_slack)
}

/// `change_description` for a `plain_text` object, which shows text as is.
fn change_description_plain(req: &Request) -> String {
    describe_change(req, str::to_string)
}

fn describe_change(req: &Request, esc: fn(&str) -> String) -> String {
    let a = &req.access;
    let user = esc(a.k8s_user.as_deref().unwrap_or(&a.principal));
    let principal = esc(&a.principal);
    if let Some(arn) = &a.policy_arn {
        let scope = Scope::from_namespaces(a.namespaces.iter().cloned());
        let policy = arn.rsplit('/').next().unwrap_or(arn);
        format!(
            "associate {policy}, {}, to {} on {}",
            scope.describe(),
            principal,
            a.cluster
        )
    } else if let Some(role) = &a.cluster_role {
        let target = if a.namespaces.is_empty() {
            "a ClusterRoleBinding".to_string()
        } else {
            format!("RoleBindings in {}", a.namespaces.join(", "))
        };
        format!(
            "bind ClusterRole {role} to user {user} with {target} on {}",
            a.cluster
        )
    } else {
        format!(
            "map {} to user {user} with groups {} in aws-auth on {}",
            principal,
            a.groups.join(", "),
            a.cluster
        )
    }
}

fn when(req: &Request, now: OffsetDateTime) -> String {
    match req.expires_at {
        Some(exp) => format!("until {}", utc_time(exp, now)),
        None => format!("for {} from approval", format_duration(req.duration)),
    }
}

/// The card's first line: only the mention and names from the config
/// (role, cluster) and ids Tollgate made, in mrkdwn.
fn card_header(req: &Request) -> String {
    if let Some(grant) = &req.extends {
        return format!(
            "*<@{}> asks to extend {grant} (`{}` on {}) by {}* ({})",
            req.requester.user_id,
            req.access.role,
            req.access.cluster,
            format_duration(req.duration),
            req.id,
        );
    }
    format!(
        "*<@{}> requests `{}` on {}* ({})",
        req.requester.user_id, req.access.role, req.access.cluster, req.id,
    )
}

/// What approval does and why, with everything a user can influence
/// (reason, emails, ARNs, namespaces) in a `plain_text` object: Slack shows
/// it as typed, so it can neither format the card nor ping anyone.
fn card_details(req: &Request, now: OffsetDateTime) -> Value {
    let reason = if req.reason.trim().is_empty() {
        "(no reason given)".to_string()
    } else {
        req.reason.clone()
    };
    let change = change_description_plain(req);
    let text = match &req.extends {
        Some(_) => format!(
            "Approval will keep access to {change} in place {} longer; nothing is revoked and granted again.\nReason: {reason}",
            format_duration(req.duration),
        ),
        None => format!("Approval will {change} {}.\nReason: {reason}", when(req, now)),
    };
    json!({"type": "section", "text": {"type": "plain_text", "text": text, "emoji": false}})
}

fn votes(req: &Request) -> String {
    if req.approvals.is_empty() {
        return format!(
            "{} (no approval needed)",
            req.decided_by.as_deref().unwrap_or("tollgate")
        );
    }
    req.approvals
        .iter()
        .map(|v| format!("<@{}>", v.user))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The approval card: buttons while Pending, the outcome once decided.
/// `sensitive`: the request's namespaces that match the role's
/// `sensitive_namespaces` (spec 9.7), marked for the approver.
pub fn card(req: &Request, now: OffsetDateTime, sensitive: &[String]) -> Message {
    let mut blocks = vec![section(&card_header(req)), card_details(req, now)];
    if !sensitive.is_empty() {
        // Plain text like every name that came with a request.
        let text = format!(
            "\u{26a0} Sensitive {}: {} (sensitive_namespaces). Approve only what the reason needs.",
            if sensitive.len() == 1 {
                "namespace"
            } else {
                "namespaces"
            },
            sensitive.join(", ")
        );
        blocks.push(json!({"type": "section", "block_id": "sensitive", "text": {"type": "plain_text", "text": text, "emoji": false}}));
    }
    let status = match req.state {
        State::Pending => {
            let mut s = format!(
                "Waiting for approval: {} of {} so far.",
                req.approvals.len(),
                req.required_approvals
            );
            if !req.approvals.is_empty() {
                s.push_str(&format!(" Approved by {}.", votes(req)));
            }
            s
        }
        State::Approved => format!("Approved by {}; granting…", votes(req)),
        State::Active => format!(
            "Approved by {} at {}. Access active {}.",
            votes(req),
            req.approved_at
                .map(|t| utc_time(t, now))
                .unwrap_or_default(),
            when(req, now)
        ),
        State::Denied => format!(
            "Denied by <@{}>.",
            req.decided_by.as_deref().unwrap_or("tollgate")
        ),
        State::Expired => "Expired: nobody decided in time.".to_string(),
        State::Cancelled => "Cancelled.".to_string(),
        State::Failed => format!(
            "Approved by {}, but the grant failed: {}",
            votes(req),
            req.failure.as_deref().map(escape_slack).unwrap_or_default()
        ),
        State::Revoked => format!(
            "Approved by {}. Access ended at {}; {}.",
            votes(req),
            req.ended_at.map(|t| utc_time(t, now)).unwrap_or_default(),
            removal(req, now)
        ),
        State::RevokeFailed => "Revoking is failing; Tollgate keeps retrying.".to_string(),
        State::Applied => format!(
            "Approved by {}. {} now lasts {} longer.",
            votes(req),
            req.extends
                .as_ref()
                .map(|g| g.to_string())
                .unwrap_or_default(),
            format_duration(req.duration)
        ),
    };
    blocks.push(context(&status));
    if req.state == State::Pending {
        blocks.push(json!({
            "type": "actions",
            "block_id": format!("decide:{}", req.id),
            "elements": [
                {"type": "button", "action_id": ACTION_APPROVE, "value": req.id.as_str(),
                 "style": "primary", "text": {"type": "plain_text", "text": "Approve"}},
                {"type": "button", "action_id": ACTION_DENY, "value": req.id.as_str(),
                 "style": "danger", "text": {"type": "plain_text", "text": "Deny"}}
            ]
        }));
    }
    Message {
        text: format!(
            "{} requests {} on {} ({}): {}",
            escape_slack(&req.requester.email),
            req.access.role,
            req.access.cluster,
            req.id,
            req.state.label()
        ),
        blocks,
    }
}

/// The shared IAM role session-rbac users assume, told apart by session
/// name (spec 3).
pub const SESSION_RBAC_ROLE: &str = "tollgate-k8s-access";

/// What the requester runs to connect, with the expiry in their time zone.
pub fn granted_dm(req: &Request, cluster: &ClusterPolicy) -> Message {
    let until = req
        .expires_at
        .map(|t| local_time(t, req.requester.tz_offset_secs, req.requester.tz.as_deref()))
        .unwrap_or_default();
    let next = match req.access.namespaces.first() {
        Some(ns) => format!("kubectl get pods -n {ns}"),
        None => "kubectl get pods -A".to_string(),
    };
    let (name, region) = (&cluster.name, &cluster.region);
    let how = match cluster.strategy {
        Strategy::SessionRbac => {
            let profile = format!("tollgate-{name}");
            format!(
                "Connect through the shared role, with your email as the session name:\n```aws configure set profile.{profile}.role_arn arn:aws:iam::{}:role/{SESSION_RBAC_ROLE}\naws configure set profile.{profile}.role_session_name {}\naws configure set profile.{profile}.source_profile default\naws eks update-kubeconfig --name {name} --region {region} --profile {profile}\n{next}```",
                cluster.account_id, req.requester.email
            )
        }
        Strategy::AccessEntry | Strategy::AwsAuth => format!(
            "Connect with AWS credentials for `{}`:\n```aws eks update-kubeconfig --name {name} --region {region}\n{next}```",
            req.access.principal
        ),
    };
    let text = format!(
        "Your access {} is active: `{}` on *{name}* until {until}.\n{how}\nTollgate removes the access at expiry; you'll get a message then.",
        req.id, req.access.role
    );
    Message {
        text: format!("Access {} on {name} is active until {until}", req.id),
        blocks: vec![section(&text)],
    }
}

pub fn denied_dm(req: &Request) -> Message {
    Message::plain(format!(
        "Your request {} for `{}` on {} was denied by <@{}>.",
        req.id,
        req.access.role,
        req.access.cluster,
        req.decided_by.as_deref().unwrap_or("tollgate")
    ))
}

pub fn failed_dm(req: &Request) -> Message {
    if let Some(grant) = &req.extends {
        return Message::plain(format!(
            "Your extension {} of {grant} was approved but could not be applied: {}. Request access again with `/access eks …`.",
            req.id,
            req.failure.as_deref().map(escape_slack).unwrap_or_default()
        ));
    }
    Message::plain(format!(
        "Your request {} for `{}` on {} was approved, but Tollgate could not grant it: {}. Whatever part of it was made has been removed again. Ask an admin to run `tollgate check`.",
        req.id,
        req.access.role,
        req.access.cluster,
        req.failure.as_deref().map(escape_slack).unwrap_or_default()
    ))
}

pub fn revoked_dm(req: &Request, now: OffsetDateTime) -> Message {
    let why = match req.revoke.as_ref().map(|r| r.reason) {
        Some(crate::domain::request::RevokeReason::Early) => "revoked early",
        Some(crate::domain::request::RevokeReason::Admin) => "revoked by an admin",
        Some(crate::domain::request::RevokeReason::Offboarded) => {
            "been revoked because your Slack account was deactivated or made a guest"
        }
        Some(crate::domain::request::RevokeReason::InvalidRow) => {
            "been revoked because its stored record was changed outside Tollgate"
        }
        _ => "expired",
    };
    Message::plain(format!(
        "Your access {} (`{}` on {}) has {why}: {}.",
        req.id,
        req.access.role,
        req.access.cluster,
        removal(req, now)
    ))
}

pub fn revoke_failing_alert(req: &Request, error: &str) -> Message {
    Message::plain(format!(
        ":rotating_light: Tollgate cannot revoke {} (`{}` on {} for `{}`) after {} attempts: {}. The access is still in place; Tollgate keeps retrying. Check AWS permissions and `tollgate check`.",
        req.id,
        req.access.role,
        req.access.cluster,
        req.access.principal,
        req.attempts,
        escape_slack(error)
    ))
}

/// Spec 9.8: a stored row Tollgate would not have written (a forged or
/// edited `Approved` row, an `Active` expiry moved past the cap). Someone
/// with write access to the store may be trying to grant themselves access.
pub fn invalid_row_alert(req: &Request, why: &str) -> Message {
    let done = if req.state == crate::domain::request::State::Active
        || req.state == crate::domain::request::State::RevokeFailed
    {
        "It is being revoked now."
    } else {
        "Nothing was granted."
    };
    Message::plain(format!(
        ":rotating_light: The store holds a request Tollgate would not have written: {} (`{}` on {} for `{}`): {}. {done} Check who can write Tollgate's table or volume.",
        req.id,
        req.access.role,
        req.access.cluster,
        req.access.principal,
        escape_slack(why)
    ))
}

pub fn revoke_recovered_alert(req: &Request, now: OffsetDateTime) -> Message {
    Message::plain(format!(
        ":white_check_mark: All clear: {} (`{}` on {} for `{}`) is revoked after {} attempts: {}.",
        req.id,
        req.access.role,
        req.access.cluster,
        req.access.principal,
        req.attempts + 1,
        removal(req, now)
    ))
}

/// Standing access Tollgate would have put back at the end of a grant was
/// removed during it (spec 9.6): it is not re-created, and security hears
/// of it, since someone changed who can reach the cluster.
pub fn baseline_gone_alert(
    cluster: &str,
    principal: &str,
    policy: &str,
    scope: &crate::domain::grant::Scope,
    grant: &str,
) -> Message {
    use crate::domain::text::escape_slack;
    Message::plain(format!(
        ":warning: Standing access removed during a grant on {}: `{}` had `{}` ({}) before Tollgate's grant {}; someone removed it while the grant was in force. Tollgate did not re-create it.",
        escape_slack(cluster),
        escape_slack(principal),
        escape_slack(policy),
        escape_slack(&scope.describe()),
        escape_slack(grant),
    ))
}

/// The security channel's notice. The reason is shown in `plain_text`
/// (as typed, unable to format or ping); the notification text, which
/// Slack reads as mrkdwn, has it escaped.
pub fn break_glass_alert(req: &Request) -> Message {
    let header = format!(
        ":rotating_light: *BREAK-GLASS* by <@{}> on *{}*: `{}` for {} ({}). Review it in the approval channel.",
        req.requester.user_id,
        req.access.cluster,
        req.access.role,
        format_duration(req.duration),
        req.id,
    );
    Message {
        text: format!(
            "BREAK-GLASS by <@{}> on {} ({}). Reason: {}",
            req.requester.user_id,
            req.access.cluster,
            req.id,
            escape_slack(&req.reason)
        ),
        blocks: vec![
            section(&header),
            json!({"type": "section", "text": {"type": "plain_text", "text": format!("Reason: {}", req.reason), "emoji": false}}),
        ],
    }
}

/// `reminder_before` ahead of expiry, with a button asking for the same
/// duration again through the same approval rules.
pub fn reminder_dm(req: &Request, now: OffsetDateTime) -> Message {
    let until = req
        .expires_at
        .map(|t| local_time(t, req.requester.tz_offset_secs, req.requester.tz.as_deref()))
        .unwrap_or_default();
    let left = req
        .expires_at
        .map(|t| (t - now).max(time::Duration::ZERO))
        .and_then(|d| std::time::Duration::try_from(d).ok())
        .map(|d| format_duration(std::time::Duration::from_secs(d.as_secs().max(1))))
        .unwrap_or_default();
    let text = format!(
        "Your access {} (`{}` on {}) ends at {until}, in about {left}. Need longer? Extend it by {} (it goes through approval again), or `/access extend {} <duration>`.",
        req.id,
        req.access.role,
        req.access.cluster,
        format_duration(req.duration),
        req.id
    );
    Message {
        text: format!(
            "Access {} on {} ends in about {left}",
            req.id, req.access.cluster
        ),
        blocks: vec![
            section(&text),
            json!({
                "type": "actions",
                "block_id": format!("remind:{}", req.id),
                "elements": [
                    {"type": "button", "action_id": ACTION_EXTEND, "value": req.id.as_str(),
                     "text": {"type": "plain_text", "text": format!("Extend by {}", format_duration(req.duration))}}
                ]
            }),
        ],
    }
}

/// The requester's answer once an extension is approved and applied.
pub fn extended_dm(extension: &Request, grant: &Request) -> Message {
    let until = grant
        .expires_at
        .map(|t| {
            local_time(
                t,
                grant.requester.tz_offset_secs,
                grant.requester.tz.as_deref(),
            )
        })
        .unwrap_or_default();
    Message::plain(format!(
        "Extension {} approved: your access {} (`{}` on {}) now lasts until {until}.",
        extension.id, grant.id, grant.access.role, grant.access.cluster
    ))
}

pub fn expired_dm(req: &Request) -> Message {
    Message::plain(format!(
        "Your request {} for `{}` on {} expired: nobody decided within the approval window. Ask again if you still need it.",
        req.id, req.access.role, req.access.cluster
    ))
}

/// The words for a refused command or click (`service::Refusal`): built
/// here, where every other Slack text is, from the refusal's facts.
/// `[slack] commands_per_minute` reached: nothing was done.
pub fn too_many_commands(limit: u32, wait: std::time::Duration) -> String {
    format!(
        "You sent {limit} Tollgate commands within the last minute, the most allowed; nothing was done. Try again in {}s.",
        wait.as_secs()
    )
}

pub fn refusal_text(r: &crate::service::Refusal) -> String {
    use crate::domain::policy::mention_list;
    use crate::domain::text::clip;
    use crate::service::Refusal;
    match r {
        Refusal::Policy(why) => why.clone(),
        Refusal::UnknownCluster { asked, known } => format!(
            "There is no cluster `{}`. Clusters you can ask for: {}.",
            escape_slack(&clip(asked, 60)),
            if known.is_empty() {
                "none are configured".to_string()
            } else {
                known
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        Refusal::NoBreakGlass { cluster } => {
            format!("{cluster} does not allow break-glass; ask for access the usual way.")
        }
        Refusal::RoleNotConfigured { role, cluster } => {
            format!("The role `{role}` is not configured on {cluster}.")
        }
        Refusal::MayNotRequest { role, cluster, who } => format!(
            "You may not request `{role}` on {cluster}. Who may: {}.",
            mention_list(who)
        ),
        Refusal::MayNotBreakGlass { cluster, who } => format!(
            "You may not use break-glass on {cluster}. Who may: {}. Nothing was granted; ask for access the usual way.",
            mention_list(who)
        ),
        Refusal::ProfileUnavailable => "Tollgate could not look up your Slack profile just now; nothing was requested. Please try again.".into(),
        Refusal::DeactivatedOrBot => "Deactivated accounts and bots cannot request access.".into(),
        Refusal::Guest => "Slack guest accounts cannot request access here; nothing was requested. Ask an admin if you need it.".into(),
        Refusal::StoreUnavailable { what } => format!(
            "Tollgate's store is temporarily unavailable; nothing was {what}. Please try again in a minute."
        ),
        Refusal::TooManyPending { pending, max } => format!(
            "You already have {} pending requests, the most Tollgate accepts from one person ({max}): {}. Wait for a decision or cancel one with `/access revoke <id>`; nothing was requested.",
            pending.len(),
            pending.join(", ")
        ),
        Refusal::RequesterUnconfirmed => "Tollgate could not look up the requester's Slack profile; your click was not counted. Try again.".into(),
        Refusal::RequesterOffboarded { id, what } => format!(
            "{id} cannot be approved: the requester's Slack account is now {what}. Your click was not counted."
        ),
        Refusal::NotAnId(text) => {
            format!("`{}` is not a request id (like R-7F3K2)", clip(text, 20))
        }
        Refusal::NoSuchRequest(id) => format!("Tollgate has no request {id}."),
        Refusal::AlreadyEnded { id, state } => {
            format!("{id} is already {state}; nothing to revoke.")
        }
        Refusal::Vanished(id) => format!("{id} disappeared from the store"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::{AccessSpec, Asked, RequestId, Requester};

    #[test]
    fn the_inbox_knows_every_button_that_changes_something() {
        use crate::domain::inbox::Click;
        assert_eq!(Click::from_action_id(ACTION_APPROVE), Some(Click::Approve));
        assert_eq!(Click::from_action_id(ACTION_DENY), Some(Click::Deny));
        assert_eq!(Click::from_action_id(ACTION_EXTEND), Some(Click::Extend));
        for click in [Click::Approve, Click::Deny, Click::Extend] {
            assert_eq!(Click::from_action_id(click.label()), Some(click));
        }
    }

    /// Every mrkdwn text in `blocks`, and every plain_text.
    fn texts(blocks: &[Value]) -> (Vec<String>, Vec<String>) {
        fn walk(v: &Value, md: &mut Vec<String>, plain: &mut Vec<String>) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::String(t)) = o.get("text") {
                        match o.get("type").and_then(Value::as_str) {
                            Some("mrkdwn") => md.push(t.clone()),
                            Some("plain_text") => plain.push(t.clone()),
                            _ => {}
                        }
                    }
                    o.values().for_each(|v| walk(v, md, plain));
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, md, plain)),
                _ => {}
            }
        }
        let (mut md, mut plain) = (Vec::new(), Vec::new());
        blocks.iter().for_each(|b| walk(b, &mut md, &mut plain));
        (md, plain)
    }

    #[test]
    fn user_text_on_the_card_cannot_format_or_ping() {
        let now = time::macros::datetime!(2026-11-23 16:40 UTC);
        let reason = "*urgent* <!channel> _see_ <https://evil.example|docs> `x`";
        let email = "m*a_l~l`o<r>y@example.com";
        let req = Request::pending(
            Asked {
                id: RequestId::parse("R-7F3K2").unwrap(),
                requester: Requester {
                    user_id: "U1".into(),
                    email: email.into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "prod".into(),
                    role: "view".into(),
                    principal: format!("arn:aws:iam::1:role/{email}"),
                    policy_arn: None,
                    namespaces: vec!["payments".into()],
                    cluster_role: Some("edit".into()),
                    groups: vec![],
                    k8s_user: Some(format!("tollgate:{email}")),
                    strategy: None,
                },
                reason: reason.into(),
                duration: std::time::Duration::from_secs(3600),
                approval_timeout: std::time::Duration::from_secs(600),
                required_approvals: 1,
                response_url: None,
            },
            now,
        );
        let msg = card(&req, now, &[]);
        let (md, plain) = texts(&msg.blocks);
        assert!(!plain.iter().any(|t| t.contains("Sensitive")), "{plain:?}");
        let marked = card(&req, now, &["payments".to_string()]);
        let (_, marked) = texts(&marked.blocks);
        assert!(
            marked
                .iter()
                .any(|t| t.contains("Sensitive namespace: payments (sensitive_namespaces)")),
            "{marked:?}"
        );
        for text in &md {
            assert!(
                !text.contains("urgent") && !text.contains("m*a_l"),
                "{text}"
            );
        }
        // Shown as typed, in plain text.
        assert!(plain.iter().any(|t| t.contains(reason)), "{plain:?}");
        assert!(plain.iter().any(|t| t.contains(email)), "{plain:?}");
        // The notification text (mrkdwn) escapes what could ping or link.
        assert!(
            !msg.text.contains('<') && !msg.text.contains('>'),
            "{}",
            msg.text
        );

        let alert = break_glass_alert(&req);
        let (md, plain) = texts(&alert.blocks);
        assert!(md.iter().all(|t| !t.contains("urgent")), "{md:?}");
        assert!(plain.iter().any(|t| t.contains(reason)), "{plain:?}");
        assert!(alert.text.contains("&lt;!channel&gt;") && !alert.text.contains("<!channel>"));
    }

    #[test]
    fn local_time_uses_offset() {
        let t = time::macros::datetime!(2026-11-23 16:40 UTC);
        assert_eq!(
            local_time(t, 3600, Some("Europe/Berlin")),
            "2026-11-23 17:40 (Europe/Berlin, UTC+01:00)"
        );
        assert_eq!(
            local_time(t, -5 * 3600 - 1800, None),
            "2026-11-23 11:10 (UTC-05:30)"
        );
    }

    #[test]
    fn revoked_messages_say_when_the_removal_was_verified() {
        let now = time::macros::datetime!(2026-11-23 16:45 UTC);
        let mut req = Request::pending(
            Asked {
                id: RequestId::parse("R-7F3K2").unwrap(),
                requester: Requester {
                    user_id: "U1".into(),
                    email: "alice@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "prod".into(),
                    role: "view".into(),
                    principal: "arn:aws:iam::1:role/alice".into(),
                    policy_arn: None,
                    namespaces: vec![],
                    cluster_role: Some("view".into()),
                    groups: vec![],
                    k8s_user: Some("tollgate:alice@example.com".into()),
                    strategy: None,
                },
                reason: "r".into(),
                duration: std::time::Duration::from_secs(3600),
                approval_timeout: std::time::Duration::from_secs(600),
                required_approvals: 1,
                response_url: None,
            },
            now,
        );
        req.state = State::Revoked;
        req.ended_at = Some(time::macros::datetime!(2026-11-23 16:40:02 UTC));
        req.verified_at = Some(time::macros::datetime!(2026-11-23 16:40:02 UTC));
        let dm = revoked_dm(&req, now).text;
        assert!(
            dm.ends_with("has expired: access removed, verified at 16:40:02 UTC."),
            "{dm}"
        );
        let card = serde_json::to_string(&card(&req, now, &[]).blocks).unwrap();
        assert!(
            card.contains("access removed, verified at 16:40:02 UTC."),
            "{card}"
        );
        req.verified_at = None;
        let dm = revoked_dm(&req, now).text;
        assert!(dm.contains("not verified"), "{dm}");
        assert!(!dm.contains("verified at"), "{dm}");
        assert_eq!(
            utc_time_secs(time::macros::datetime!(2026-11-22 09:05:07 UTC), now),
            "09:05:07 UTC on 2026-11-22"
        );
    }

    #[test]
    fn utc_time_adds_date_when_not_today() {
        let t = time::macros::datetime!(2026-11-23 16:40 UTC);
        assert_eq!(utc_time(t, t), "16:40 UTC");
        assert_eq!(
            utc_time(t, t - time::Duration::days(1)),
            "16:40 UTC on 2026-11-23"
        );
    }
}
