//! Who may request and approve what, for how long (spec section 4). The
//! types are the config after defaults → cluster → role resolution.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::command::RequestArgs;
use super::duration::{format_duration, parse_in_range, DurationRange};
use super::namespaces::NamespaceRules;
use super::text::{clip, escape_slack};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    AccessEntry,
    SessionRbac,
    AwsAuth,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::AccessEntry => "access-entry",
            Strategy::SessionRbac => "session-rbac",
            Strategy::AwsAuth => "aws-auth",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min_duration: Duration,
    pub max_duration: Duration,
    pub default_duration: Duration,
    pub approval_timeout: Duration,
    pub reminder_before: Duration,
    pub reconcile_interval: Duration,
    /// A grant with all its extensions never lasts longer (spec 9.3).
    pub max_total_duration: Duration,
    pub required_approvals: u32,
    pub allow_self_approval: bool,
    pub require_reason: bool,
}

impl Limits {
    pub fn range(&self) -> DurationRange {
        DurationRange {
            min: self.min_duration,
            max: self.max_duration,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakGlass {
    pub allowed: Vec<String>,
    pub max_duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolePolicy {
    pub name: String,
    /// Full ARN of the EKS access policy (access-entry strategy).
    pub access_policy: Option<String>,
    pub cluster_role: Option<String>,
    pub groups: Vec<String>,
    pub namespaced: bool,
    pub auto_approve: Vec<String>,
    pub approvers: Vec<String>,
    pub requesters: Vec<String>,
    pub limits: Limits,
    /// Spec 9.7: the server namespace, `deny_namespaces`, the role's
    /// `namespaces` allow-list and `sensitive_namespaces`.
    pub namespace_rules: NamespaceRules,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub name: String,
    pub region: String,
    pub account_id: String,
    pub assume_role_arn: Option<String>,
    pub strategy: Strategy,
    pub endpoint: Option<String>,
    pub ca_file: Option<String>,
    pub approval_channel: String,
    pub dm_approvers: bool,
    pub default_role: Option<String>,
    pub roles: BTreeMap<String, RolePolicy>,
    pub break_glass: Option<BreakGlass>,
    pub reconcile_interval: Duration,
    /// `[clusters.backstop]`: EventBridge Scheduler undoes each association
    /// if Tollgate does not (access-entry clusters only).
    pub backstop: Option<super::backstop::Backstop>,
}

pub use super::identity::IdentityPolicy;

/// A request after it has been checked against its cluster's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRequest {
    pub role: String,
    pub duration: Duration,
    pub namespaces: Vec<String>,
    pub reason: String,
}

impl ClusterPolicy {
    pub fn role_names(&self) -> String {
        self.roles
            .keys()
            .map(|r| format!("`{r}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The word after the duration is the role when it names one; otherwise it
/// starts the reason and the default role applies (spec 8.7).
pub fn resolve_request(
    cluster: &ClusterPolicy,
    args: &RequestArgs,
) -> Result<ResolvedRequest, String> {
    let (role, reason_words) = match args.words.split_first() {
        Some((first, rest)) if cluster.roles.contains_key(first.as_str()) => (first.clone(), rest),
        _ => match &cluster.default_role {
            Some(default) => (default.clone(), &args.words[..]),
            None => {
                let hint = args
                    .words
                    .first()
                    .map(|w| {
                        format!(
                            "`{}` is not a role on {}. ",
                            escape_slack(&clip(w, 40)),
                            cluster.name
                        )
                    })
                    .unwrap_or_default();
                return Err(format!(
                    "{hint}Name a role after the duration: {}.",
                    cluster.role_names()
                ));
            }
        },
    };
    let policy = cluster.roles.get(&role).ok_or_else(|| {
        format!(
            "The default role `{role}` of {} is not configured; ask an admin.",
            cluster.name
        )
    })?;
    let namespaces = args.namespaces.clone().unwrap_or_default();
    if cluster.strategy == Strategy::AwsAuth && !namespaces.is_empty() {
        return Err(format!(
            "{} grants through aws-auth groups, which are cluster-wide; `--ns` cannot narrow them. Namespace limits come from the RBAC bindings of the role's groups.",
            cluster.name
        ));
    }
    if policy.namespaced && namespaces.is_empty() {
        return Err(format!(
            "The role `{role}` on {} is namespaced: add `--ns <namespace>[,<namespace>…]`.",
            cluster.name
        ));
    }
    // Spec 9.7: before anything is recorded, break-glass included.
    policy
        .namespace_rules
        .check(&namespaces)
        .map_err(|refusal| {
            format!(
                "{} Nothing was requested.",
                refusal.message(&role, &cluster.name)
            )
        })?;
    let duration = parse_in_range(&args.duration, &policy.limits.range())
        .map_err(|e| format!("{e} (role `{role}` on {})", cluster.name))?;
    // A break-glass reason is the request's reason (spec 8.7): the one
    // command that must work in an incident is never refused for lacking one.
    let reason = match &args.break_glass {
        Some(why) => why.clone(),
        None => reason_words.join(" "),
    };
    if policy.limits.require_reason && reason.trim().is_empty() {
        return Err(format!(
            "Requests for `{role}` on {} need a reason, e.g. a ticket: `/access eks {} {} {role} INC-1234`.",
            cluster.name,
            cluster.name,
            format_duration(duration)
        ));
    }
    Ok(ResolvedRequest {
        role,
        duration,
        namespaces,
        reason,
    })
}

/// Spec 9.3: a grant, with all its extensions, lasts at most `max_total`
/// from the moment it became Active. `so_far` is that moment to the current
/// expiry; the refusal says how much is left.
pub fn check_total_duration(
    so_far: Duration,
    by: Duration,
    max_total: Duration,
) -> Result<(), String> {
    if so_far.saturating_add(by) <= max_total {
        return Ok(());
    }
    let left = max_total.saturating_sub(so_far);
    // Whole seconds: sub-second rests are noise in a message.
    let left = Duration::from_secs(left.as_secs());
    Err(if left.is_zero() {
        format!(
            "A grant with its extensions may last at most {} and this one has no time left to add; request access again instead.",
            format_duration(max_total)
        )
    } else {
        format!(
            "A grant with its extensions may last at most {}; this one can be extended by {} at most.",
            format_duration(max_total),
            format_duration(left)
        )
    })
}

/// `members` holds the user ids of the user groups named in the list.
pub fn listed(list: &[String], user: &str, members: &HashSet<String>) -> bool {
    list.iter().any(|id| id == user) || members.contains(user)
}

pub fn may_request(role: &RolePolicy, user: &str, members: &HashSet<String>) -> bool {
    role.requesters.is_empty() || listed(&role.requesters, user, members)
}

/// Whether a click on Approve counts. `approver_members` holds the members
/// of the user groups among the approvers.
pub fn check_approver(
    role: &RolePolicy,
    requester: &str,
    clicker: &str,
    approver_members: &HashSet<String>,
) -> Result<(), String> {
    if clicker == requester && !role.limits.allow_self_approval {
        return Err("You cannot approve your own request; another approver has to.".into());
    }
    if !listed(&role.approvers, clicker, approver_members) {
        return Err(format!(
            "You are not an approver for `{}` requests. Approvers: {}.",
            role.name,
            mention_list(&role.approvers)
        ));
    }
    Ok(())
}

pub fn quorum_reached(distinct_approvals: usize, required: u32) -> bool {
    distinct_approvals >= required.max(1) as usize
}

/// Slack renders `<@U…>` and `<!subteam^S…>` as names.
pub fn mention_list(ids: &[String]) -> String {
    if ids.is_empty() {
        return "nobody is configured".into();
    }
    ids.iter()
        .map(|id| {
            if id.starts_with('S') {
                format!("<!subteam^{id}>")
            } else {
                format!("<@{id}>")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::command::{parse, Command};

    pub(crate) fn limits() -> Limits {
        Limits {
            min_duration: Duration::from_secs(300),
            max_duration: Duration::from_secs(4 * 3600),
            default_duration: Duration::from_secs(3600),
            approval_timeout: Duration::from_secs(1800),
            reminder_before: Duration::from_secs(600),
            reconcile_interval: Duration::from_secs(300),
            max_total_duration: Duration::from_secs(12 * 3600),
            required_approvals: 1,
            allow_self_approval: false,
            require_reason: false,
        }
    }

    fn role(name: &str, namespaced: bool) -> RolePolicy {
        RolePolicy {
            name: name.into(),
            access_policy: Some(format!("arn:aws:eks::aws:cluster-access-policy/{name}")),
            cluster_role: None,
            groups: vec![],
            namespaced,
            auto_approve: vec![],
            approvers: vec!["U0APP".into(), "S0ONCALL".into()],
            requesters: vec![],
            limits: limits(),
            namespace_rules: NamespaceRules::default(),
        }
    }

    pub(crate) fn cluster() -> ClusterPolicy {
        ClusterPolicy {
            name: "prod".into(),
            region: "us-east-1".into(),
            account_id: "111122223333".into(),
            assume_role_arn: None,
            strategy: Strategy::AccessEntry,
            endpoint: None,
            ca_file: None,
            approval_channel: "C0APPROVALS".into(),
            dm_approvers: false,
            default_role: Some("view".into()),
            roles: BTreeMap::from([
                ("view".to_string(), role("view", false)),
                ("edit".to_string(), role("edit", true)),
            ]),
            break_glass: None,
            reconcile_interval: Duration::from_secs(300),
            backstop: None,
        }
    }

    fn resolve(text: &str) -> Result<ResolvedRequest, String> {
        match parse(text)? {
            Command::Request(args) => resolve_request(&cluster(), &args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn role_word_or_default_role() {
        let r = resolve("eks prod 2h edit --ns payments INC-1").unwrap();
        assert_eq!((r.role.as_str(), r.reason.as_str()), ("edit", "INC-1"));
        assert_eq!(r.namespaces, vec!["payments"]);
        let r = resolve("eks prod 2h debugging the thing").unwrap();
        assert_eq!(
            (r.role.as_str(), r.reason.as_str()),
            ("view", "debugging the thing")
        );
    }

    #[test]
    fn namespaced_role_needs_ns() {
        let err = resolve("eks prod 2h edit").unwrap_err();
        assert!(err.contains("namespaced"), "{err}");
    }

    #[test]
    fn unknown_role_without_default_is_refused_naming_roles() {
        let mut c = cluster();
        c.default_role = None;
        let Command::Request(args) = parse("eks prod 1h wizard").unwrap() else {
            panic!()
        };
        let err = resolve_request(&c, &args).unwrap_err();
        assert!(
            err.contains("`wizard` is not a role") && err.contains("`edit`"),
            "{err}"
        );
    }

    #[test]
    fn durations_checked_against_role_range() {
        for bad in ["0s", "-1h", "99999h", "1m"] {
            let err = resolve(&format!("eks prod {bad} view")).unwrap_err();
            assert!(err.contains("between 5m and 4h"), "{bad}: {err}");
        }
    }

    #[test]
    fn aws_auth_refuses_ns_and_reason_can_be_required() {
        let mut c = cluster();
        c.strategy = Strategy::AwsAuth;
        let Command::Request(args) = parse("eks prod 1h view --ns a").unwrap() else {
            panic!()
        };
        assert!(resolve_request(&c, &args)
            .unwrap_err()
            .contains("cluster-wide"));
        let mut c = cluster();
        c.roles.get_mut("view").unwrap().limits.require_reason = true;
        let Command::Request(args) = parse("eks prod 1h view").unwrap() else {
            panic!()
        };
        assert!(resolve_request(&c, &args)
            .unwrap_err()
            .contains("need a reason"));
    }

    #[test]
    fn break_glass_reason_is_the_reason() {
        let mut c = cluster();
        c.roles.get_mut("view").unwrap().limits.require_reason = true;
        let Command::Request(args) = parse("eks prod 30m view --break-glass SEV1 INC-999").unwrap()
        else {
            panic!()
        };
        assert_eq!(resolve_request(&c, &args).unwrap().reason, "SEV1 INC-999");
    }

    /// Spec 9.7: refused by `resolve_request`, so before anything is
    /// recorded, whichever way the request came (command, modal or
    /// break-glass all resolve here), naming the rule.
    #[test]
    fn protected_namespaces_are_refused_naming_the_rule() {
        for (text, rule) in [
            ("eks prod 1h edit --ns tollgate", "[server] namespace"),
            (
                "eks prod 1h edit --ns payments,kube-system",
                "deny_namespaces",
            ),
            ("eks prod 1h view --ns kube-node-lease", "deny_namespaces"),
            (
                "eks prod 30m edit --ns tollgate --break-glass SEV1",
                "[server] namespace",
            ),
        ] {
            let err = resolve(text).unwrap_err();
            assert!(
                err.contains(rule) && err.contains("Nothing was requested"),
                "{text}: {err}"
            );
        }
        // An allow-list: only those, never the server namespace, and a
        // cluster-wide request would reach every namespace.
        let mut c = cluster();
        c.roles.get_mut("view").unwrap().namespace_rules.allow =
            Some(vec!["team-*".into(), "kube-system".into(), "*".into()]);
        let parsed = |t: &str| match parse(t).unwrap() {
            Command::Request(args) => args,
            other => panic!("{other:?}"),
        };
        assert!(resolve_request(&c, &parsed("eks prod 1h view --ns kube-system")).is_ok());
        let err = resolve_request(&c, &parsed("eks prod 1h view --ns tollgate")).unwrap_err();
        assert!(err.contains("[server] namespace"), "{err}");
        c.roles.get_mut("view").unwrap().namespace_rules.allow = Some(vec!["team-*".into()]);
        let err = resolve_request(&c, &parsed("eks prod 1h view --ns web")).unwrap_err();
        assert!(
            err.contains("`namespaces`") && err.contains("team-*"),
            "{err}"
        );
        let err = resolve_request(&c, &parsed("eks prod 1h view")).unwrap_err();
        assert!(err.contains("--ns"), "{err}");
        assert!(resolve_request(&c, &parsed("eks prod 1h view --ns team-a")).is_ok());
    }

    /// Spec 9.3: the time a grant may still be extended by.
    #[test]
    fn extensions_stop_at_the_total_cap() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert!(check_total_duration(h(10), h(2), h(12)).is_ok());
        let err = check_total_duration(h(11), h(2), h(12)).unwrap_err();
        assert!(err.contains("12h") && err.contains("1h"), "{err}");
        let err = check_total_duration(h(12), Duration::from_secs(60), h(12)).unwrap_err();
        assert!(err.contains("no time left"), "{err}");
    }

    #[test]
    fn approvers_groups_and_self_approval() {
        let c = cluster();
        let view = &c.roles["view"];
        let none = HashSet::new();
        let oncall = HashSet::from(["U0MEMBER".to_string()]);
        assert!(check_approver(view, "U0REQ", "U0APP", &none).is_ok());
        assert!(check_approver(view, "U0REQ", "U0MEMBER", &oncall).is_ok());
        assert!(check_approver(view, "U0REQ", "U0MEMBER", &none)
            .unwrap_err()
            .contains("not an approver"));
        assert!(check_approver(view, "U0APP", "U0APP", &none)
            .unwrap_err()
            .contains("your own"));
        let mut selfie = view.clone();
        selfie.limits.allow_self_approval = true;
        assert!(check_approver(&selfie, "U0APP", "U0APP", &none).is_ok());
    }

    #[test]
    fn quorum_counts_distinct_approvals() {
        assert!(!quorum_reached(0, 1));
        assert!(quorum_reached(1, 1));
        assert!(!quorum_reached(1, 2));
        assert!(quorum_reached(2, 2));
        assert!(
            quorum_reached(1, 0),
            "zero is treated as one: nobody gets access unreviewed by accident"
        );
    }

    #[test]
    fn requesters_restrict_when_listed() {
        let mut r = cluster().roles["view"].clone();
        assert!(may_request(&r, "U1", &HashSet::new()));
        r.requesters = vec!["S0DEV".into()];
        assert!(!may_request(&r, "U1", &HashSet::new()));
        assert!(may_request(&r, "U1", &HashSet::from(["U1".to_string()])));
    }
}
