//! Spec 9.8: the store is the approval authority, and anyone who can write
//! it could otherwise talk Tollgate into granting. So a row is judged
//! against the configuration in force before it is acted on: an `Approved`
//! row before anything is created, an `Active` row's expiry against the
//! total a grant may last. Pure: the caller asks Slack for group members
//! (fresh) and passes them in.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use time::OffsetDateTime;

use super::duration::{format_duration, DurationRange};
use super::lifecycle::Mode;
use super::policy::{check_approver, listed, may_request, quorum_reached, ClusterPolicy};
use super::request::{Request, State};

/// The members of the user groups (`S…`) named in the role's lists, asked
/// fresh at grant time. A group Slack could not list contributes nobody, so
/// a row that depends on it fails rather than passes.
#[derive(Clone, Debug, Default)]
pub struct Members {
    pub approvers: HashSet<String>,
    pub auto_approve: HashSet<String>,
    pub break_glass: HashSet<String>,
    pub requesters: HashSet<String>,
}

/// How far a replica's clock may run behind the one that wrote a time on
/// a row before that time counts as "in the future".
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a row may not be granted as written at `now`, if it may not. `None`
/// means the row is what Tollgate itself would have written under the
/// current configuration.
pub fn invalid_row(
    row: &Request,
    cluster: &ClusterPolicy,
    members: &Members,
    now: OffsetDateTime,
) -> Option<String> {
    // A first attempt recorded in the future would start the grant's
    // clock (and its cap) there.
    if let Some(started) = row.first_attempt_at.filter(|t| *t > now + CLOCK_SKEW) {
        return Some(format!(
            "its first attempt is recorded in the future ({})",
            super::lifecycle::rfc3339(Some(started)).unwrap_or_default()
        ));
    }
    // A grant approved longer ago than its role's total cap allows cannot
    // be in force any more: an older, validly signed version of a row
    // written back (spec 9.8 notes that a MAC cannot tell versions apart)
    // would otherwise start its whole duration again from now.
    if row.state == State::Approved && row.extends.is_none() {
        if let (Some(approved), Some(role)) = (row.approved_at, cluster.roles.get(&row.access.role))
        {
            if approved + role.limits.max_total_duration <= now {
                return Some(format!(
                    "it was approved at {}, longer ago than `max_total_duration` allows",
                    super::lifecycle::rfc3339(Some(approved)).unwrap_or_default()
                ));
            }
        }
    }
    check(row, cluster, members).err()
}

fn check(row: &Request, cluster: &ClusterPolicy, members: &Members) -> Result<(), String> {
    let Some(role) = cluster.roles.get(&row.access.role) else {
        return Err(format!(
            "{} has no role `{}`",
            cluster.name, row.access.role
        ));
    };
    if let Some(why) = super::grant::invalid_namespace(&row.access) {
        return Err(why);
    }
    let requester = row.requester.user_id.as_str();
    if !may_request(role, requester, &members.requesters) {
        return Err(format!(
            "{requester} may not request `{}` on {}",
            role.name, cluster.name
        ));
    }
    let limits = &role.limits;
    let in_range = |range: &DurationRange| -> Result<(), String> {
        if row.duration.is_zero() || row.duration < range.min || row.duration > range.max {
            return Err(format!(
                "duration {} is not {}",
                format_duration(row.duration),
                range.describe()
            ));
        }
        Ok(())
    };
    if row.duration > limits.max_total_duration {
        return Err(format!(
            "duration {} is over max_total_duration {}",
            format_duration(row.duration),
            format_duration(limits.max_total_duration)
        ));
    }
    match row.decided_by.as_deref() {
        // Only a request (never an extension) can be break-glass: its range
        // is the break-glass one, and the requester must still be allowed it.
        Some(by) if by == Mode::BreakGlass.label() && row.extends.is_none() => {
            let Some(bg) = &cluster.break_glass else {
                return Err(format!("{} no longer allows break-glass", cluster.name));
            };
            if !listed(&bg.allowed, requester, &members.break_glass) {
                return Err(format!(
                    "{requester} is not in break_glass.allowed on {}",
                    cluster.name
                ));
            }
            in_range(&DurationRange {
                min: limits.min_duration.min(bg.max_duration),
                max: bg.max_duration,
            })
        }
        Some(by) if by == Mode::AutoApproved.label() => {
            if !listed(&role.auto_approve, requester, &members.auto_approve) {
                return Err(format!(
                    "{requester} is not auto-approved for `{}` on {}",
                    role.name, cluster.name
                ));
            }
            in_range(&limits.range())
        }
        // Approved by people: each vote from a distinct user who may
        // approve this role now, enough of them for its quorum now.
        _ => {
            in_range(&limits.range())?;
            let mut seen = BTreeSet::new();
            for vote in &row.approvals {
                if !seen.insert(vote.user.as_str()) {
                    return Err(format!("{} voted more than once", vote.user));
                }
                check_approver(role, requester, &vote.user, &members.approvers)
                    .map_err(|_| format!("{} may not approve this request", vote.user))?;
            }
            if !quorum_reached(seen.len(), limits.required_approvals) {
                return Err(format!(
                    "{} approval(s) recorded, `{}` on {} needs {}",
                    seen.len(),
                    role.name,
                    cluster.name,
                    limits.required_approvals.max(1)
                ));
            }
            Ok(())
        }
    }
}

/// The latest a grant activated at `activated_at` may last to (spec 9.3).
pub fn expiry_cap(activated_at: OffsetDateTime, max_total: Duration) -> OffsetDateTime {
    activated_at + max_total
}

/// An Active row whose expiry is past what the configuration lets any
/// grant last (`max_total_duration` from activation): no path of
/// Tollgate's writes such an expiry, so the row was edited behind its back.
/// A row with no activation time cannot be judged this way and is left to
/// the other checks.
pub fn expiry_beyond_cap(
    row: &Request,
    cluster: &ClusterPolicy,
    now: OffsetDateTime,
) -> Option<String> {
    let role = cluster.roles.get(&row.access.role)?;
    let (active, expires) = (row.activated_at?, row.expires_at?);
    // Moving the activation forward with the expiry would move the cap
    // too; an Active grant was activated in the past.
    if active > now + CLOCK_SKEW {
        return Some(format!(
            "activation {} is in the future",
            super::lifecycle::rfc3339(Some(active)).unwrap_or_default()
        ));
    }
    let cap = expiry_cap(active, role.limits.max_total_duration);
    (expires > cap).then(|| {
        format!(
            "expiry {} is past activation + max_total_duration ({})",
            super::lifecycle::rfc3339(Some(expires)).unwrap_or_default(),
            super::lifecycle::rfc3339(Some(cap)).unwrap_or_default()
        )
    })
}

/// The expiry the cloud side may carry for a grant (backstop schedules,
/// Kubernetes annotations): never past the cap, whatever the row says,
/// counted from an activation no later than `now`.
pub fn capped_expiry(
    row: &Request,
    cluster: &ClusterPolicy,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let expires = row.expires_at?;
    let max_total = cluster
        .roles
        .get(&row.access.role)
        .map(|r| r.limits.max_total_duration);
    match (row.activated_at, max_total) {
        (Some(active), Some(max_total)) => {
            Some(expires.min(expiry_cap(active.min(now), max_total)))
        }
        _ => Some(expires),
    }
}

/// Spec 9.8: a server in one mode (`dry_run`) refuses a store that holds
/// live rows made in the other, naming them and what ends them. A dry-run
/// row acted on by a live server would turn a casually approved trial into
/// real access; a live row acted on by a dry-run server would be recorded
/// revoked with its access left in place.
pub fn mode_mismatch(dry_run: bool, live: &[Request]) -> Option<String> {
    let other: Vec<&Request> = live
        .iter()
        .filter(|r| r.dry_run != dry_run && !r.state.is_terminal())
        .collect();
    if other.is_empty() {
        return None;
    }
    let (this, that, serve) = if dry_run {
        ("dry-run", "live", "tollgate serve")
    } else {
        ("live", "dry-run", "tollgate serve --dry-run")
    };
    // The first few by name; a store full of them needs no full list to
    // make the point (`tollgate grants list` shows them all).
    const NAMED: usize = 10;
    let mut listed: Vec<String> = other
        .iter()
        .take(NAMED)
        .map(|r| {
            format!(
                "{} ({}, `{}` on {} for {})",
                r.id,
                r.state.label(),
                r.access.role,
                r.access.cluster,
                r.requester.email
            )
        })
        .collect();
    if other.len() > NAMED {
        listed.push(format!("and {} more", other.len() - NAMED));
    }
    Some(format!(
        "refusing to start a {this} server: the store holds {} {that} request(s) not yet ended: {}. \
         A {this} server never acts on {that} rows. End them first: start `{serve}` on this store \
         and run `tollgate grants revoke <id>` for each (or let them expire), then start this one again.",
        other.len(),
        listed.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lifecycle::{approve, approve_without_click, granted, GrantMade};
    use crate::domain::policy::tests::cluster;
    use crate::domain::policy::BreakGlass;
    use crate::domain::request::{AccessSpec, Asked, RequestId, Requester, Vote};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-23 12:00 UTC);
    const H: Duration = Duration::from_secs(3600);

    fn pending(duration: Duration) -> Request {
        Request::pending(
            Asked {
                id: RequestId::parse("R-7F3K2").unwrap(),
                requester: Requester {
                    user_id: "U0REQ".into(),
                    email: "req@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "prod".into(),
                    role: "view".into(),
                    principal: "arn:aws:iam::111122223333:role/req".into(),
                    policy_arn: Some("arn:aws:eks::aws:cluster-access-policy/view".into()),
                    namespaces: vec![],
                    cluster_role: None,
                    groups: vec![],
                    k8s_user: None,
                    strategy: None,
                },
                reason: "INC-1".into(),
                duration,
                approval_timeout: H,
                required_approvals: 1,
                response_url: None,
            },
            T0,
        )
    }

    fn approved_by(users: &[&str], duration: Duration) -> Request {
        let mut row = pending(duration);
        for u in users {
            row.approvals.push(Vote {
                user: u.to_string(),
                at: T0,
            });
        }
        row.state = crate::domain::request::State::Approved;
        row.decided_by = users.last().map(|u| u.to_string());
        row
    }

    fn none() -> Members {
        Members::default()
    }

    /// The checks as the grant step asks them, an hour after the rows'
    /// times.
    fn invalid_row(row: &Request, c: &ClusterPolicy, m: &Members) -> Option<String> {
        super::invalid_row(row, c, m, T0 + H)
    }

    fn expiry_beyond_cap(row: &Request, c: &ClusterPolicy) -> Option<String> {
        super::expiry_beyond_cap(row, c, T0 + H)
    }

    fn capped_expiry(row: &Request, c: &ClusterPolicy) -> Option<OffsetDateTime> {
        super::capped_expiry(row, c, T0 + H)
    }

    /// An older, validly approved version of a row written back long after
    /// (a MAC cannot tell versions apart) does not start its duration again:
    /// a grant approved longer ago than the role's total cap is refused.
    #[test]
    fn an_approval_older_than_the_total_cap_is_refused() {
        let row = approve(&pending(H), "U0APP", T0).unwrap().row;
        let cap = cluster().roles["view"].limits.max_total_duration;
        assert_eq!(
            super::invalid_row(&row, &cluster(), &none(), T0 + cap - H),
            None
        );
        let why = super::invalid_row(&row, &cluster(), &none(), T0 + cap)
            .expect("an approval past the cap was granted");
        assert!(why.contains("max_total_duration"), "{why}");
    }

    /// Security review M1: a row edited to a wildcard namespace is not
    /// what Tollgate would have written.
    #[test]
    fn a_stored_namespace_that_is_no_name_is_refused() {
        let mut row = approve(&pending(H), "U0APP", T0).unwrap().row;
        row.access.namespaces = vec!["payments".into()];
        assert_eq!(invalid_row(&row, &cluster(), &none()), None);
        for bad in ["*", "kube-*"] {
            row.access.namespaces = vec![bad.into()];
            let why = invalid_row(&row, &cluster(), &none())
                .unwrap_or_else(|| panic!("{bad} passed the row check"));
            assert!(why.contains("not a valid namespace name"), "{why}");
        }
    }

    #[test]
    fn times_recorded_in_the_future_are_refused() {
        let mut row = approve(&pending(H), "U0APP", T0).unwrap().row;
        row.first_attempt_at = Some(T0 + H + CLOCK_SKEW);
        assert_eq!(
            invalid_row(&row, &cluster(), &none()),
            None,
            "within the skew"
        );
        row.first_attempt_at = Some(T0 + 3650 * 24 * H);
        assert!(invalid_row(&row, &cluster(), &none())
            .unwrap()
            .contains("in the future"));

        let made = GrantMade {
            activated_at: T0,
            reminder_before: None,
            grant_ms: 1,
        };
        let mut active = granted(&approve(&pending(H), "U0APP", T0).unwrap().row, &made, T0)
            .unwrap()
            .row;
        // Activation and expiry moved out together: the cap moves with
        // the activation, so the activation itself gives it away.
        active.activated_at = Some(T0 + 3650 * 24 * H);
        active.expires_at = Some(T0 + 3650 * 24 * H + H);
        assert!(expiry_beyond_cap(&active, &cluster())
            .unwrap()
            .contains("in the future"));
        assert_eq!(
            capped_expiry(&active, &cluster()),
            Some(T0 + H + 12 * H),
            "capped from now, not from the future activation"
        );
    }

    #[test]
    fn a_row_tollgate_wrote_passes() {
        let row = approve(&pending(H), "U0APP", T0).unwrap().row;
        assert_eq!(invalid_row(&row, &cluster(), &none()), None);
        // An approver who is a member of a listed group, asked now.
        let members = Members {
            approvers: HashSet::from(["U0MEMBER".to_string()]),
            ..none()
        };
        let row = approve(&pending(H), "U0MEMBER", T0).unwrap().row;
        assert_eq!(invalid_row(&row, &cluster(), &members), None);
    }

    #[test]
    fn a_forged_row_with_no_approvals_and_ten_years_fails() {
        let mut row = approved_by(&[], 3650 * 24 * H);
        row.decided_by = None;
        let why = invalid_row(&row, &cluster(), &none()).unwrap();
        assert!(why.contains("max_total_duration"), "{why}");
        let row = approved_by(&[], H);
        let why = invalid_row(&row, &cluster(), &none()).unwrap();
        assert!(why.contains("0 approval(s)"), "{why}");
    }

    #[test]
    fn duration_outside_the_roles_range_fails() {
        // The role's range is 5m..4h, the total cap 12h.
        let why = invalid_row(&approved_by(&["U0APP"], 5 * H), &cluster(), &none()).unwrap();
        assert!(why.contains("between 5m and 4h"), "{why}");
        let why = invalid_row(
            &approved_by(&["U0APP"], Duration::from_secs(60)),
            &cluster(),
            &none(),
        )
        .unwrap();
        assert!(why.contains("between"), "{why}");
    }

    #[test]
    fn votes_must_be_distinct_current_approvers_and_not_the_requester() {
        let mut c = cluster();
        c.roles.get_mut("view").unwrap().limits.required_approvals = 2;
        let why = invalid_row(&approved_by(&["U0APP", "U0APP"], H), &c, &none()).unwrap();
        assert!(why.contains("more than once"), "{why}");
        let why = invalid_row(&approved_by(&["U0APP", "U0MALLORY"], H), &c, &none()).unwrap();
        assert!(why.contains("U0MALLORY may not approve"), "{why}");
        // A member of the approver group when approved, removed since.
        let why = invalid_row(&approved_by(&["U0APP", "U0MEMBER"], H), &c, &none()).unwrap();
        assert!(why.contains("U0MEMBER"), "{why}");
        // The quorum is the role's now, not the one the row records.
        let mut one = approved_by(&["U0APP"], H);
        one.required_approvals = 1;
        let why = invalid_row(&one, &c, &none()).unwrap();
        assert!(why.contains("needs 2"), "{why}");
        // The requester's own vote counts only where self-approval is on.
        let mut own = approved_by(&["U0REQ"], H);
        c.roles.get_mut("view").unwrap().limits.required_approvals = 1;
        c.roles
            .get_mut("view")
            .unwrap()
            .approvers
            .push("U0REQ".into());
        assert!(invalid_row(&own, &c, &none())
            .unwrap()
            .contains("U0REQ may not approve"));
        c.roles.get_mut("view").unwrap().limits.allow_self_approval = true;
        own.decided_by = Some("U0REQ".into());
        assert_eq!(invalid_row(&own, &c, &none()), None);
    }

    #[test]
    fn a_recorded_mode_must_still_apply_to_the_requester() {
        let mut c = cluster();
        let auto = approve_without_click(&pending(H), Mode::AutoApproved.label(), T0).unwrap();
        assert!(invalid_row(&auto, &c, &none())
            .unwrap()
            .contains("not auto-approved"));
        c.roles.get_mut("view").unwrap().auto_approve = vec!["S0SRE".into()];
        let sre = Members {
            auto_approve: HashSet::from(["U0REQ".to_string()]),
            ..none()
        };
        assert_eq!(invalid_row(&auto, &c, &sre), None);

        let glass = approve_without_click(&pending(H), Mode::BreakGlass.label(), T0).unwrap();
        assert!(invalid_row(&glass, &c, &none())
            .unwrap()
            .contains("no longer allows break-glass"));
        c.break_glass = Some(BreakGlass {
            allowed: vec!["U0REQ".into()],
            max_duration: 30 * Duration::from_secs(60),
        });
        assert!(
            invalid_row(&glass, &c, &none())
                .unwrap()
                .contains("between 5m and 30m"),
            "break-glass is capped by its own max_duration"
        );
        let short = approve_without_click(
            &pending(Duration::from_secs(600)),
            Mode::BreakGlass.label(),
            T0,
        )
        .unwrap();
        assert_eq!(invalid_row(&short, &c, &none()), None);
        c.break_glass.as_mut().unwrap().allowed = vec!["U0OTHER".into()];
        assert!(invalid_row(&short, &c, &none())
            .unwrap()
            .contains("break_glass.allowed"));
    }

    #[test]
    fn requesters_and_roles_are_asked_now() {
        let mut c = cluster();
        let row = approve(&pending(H), "U0APP", T0).unwrap().row;
        c.roles.get_mut("view").unwrap().requesters = vec!["S0DEV".into()];
        assert!(invalid_row(&row, &c, &none())
            .unwrap()
            .contains("may not request"));
        c.roles.remove("view");
        assert!(invalid_row(&row, &c, &none())
            .unwrap()
            .contains("no role `view`"));
    }

    #[test]
    fn a_store_with_live_rows_of_the_other_mode_is_refused_naming_them() {
        let live = approve(&pending(H), "U0APP", T0).unwrap().row;
        let mut trial = live.clone();
        trial.id = RequestId::parse("R-9QX4M").unwrap();
        trial.dry_run = true;
        let mut ended = trial.clone();
        ended.id = RequestId::parse("R-AAAAA").unwrap();
        ended.state = crate::domain::request::State::Revoked;

        assert_eq!(mode_mismatch(false, std::slice::from_ref(&live)), None);
        assert_eq!(mode_mismatch(true, &[trial.clone(), ended.clone()]), None);
        let why = mode_mismatch(false, &[live.clone(), trial.clone(), ended.clone()]).unwrap();
        assert!(why.contains("R-9QX4M") && !why.contains("R-7F3K2"), "{why}");
        assert!(
            !why.contains("R-AAAAA"),
            "ended rows are no obstacle: {why}"
        );
        assert!(
            why.contains("tollgate serve --dry-run") && why.contains("tollgate grants revoke"),
            "{why}"
        );
        let why = mode_mismatch(true, &[live, trial]).unwrap();
        assert!(why.contains("R-7F3K2") && !why.contains("R-9QX4M"), "{why}");
        assert!(why.contains("start `tollgate serve` on"), "{why}");
    }

    #[test]
    fn an_expiry_moved_past_the_total_cap_is_caught_and_capped() {
        let row = approve(&pending(H), "U0APP", T0).unwrap().row;
        let made = GrantMade {
            activated_at: T0,
            reminder_before: None,
            grant_ms: 1,
        };
        let mut active = granted(&row, &made, T0).unwrap().row;
        assert_eq!(expiry_beyond_cap(&active, &cluster()), None);
        assert_eq!(capped_expiry(&active, &cluster()), Some(T0 + H));
        // Extended up to the 12h cap: still fine.
        active.expires_at = Some(T0 + 12 * H);
        assert_eq!(expiry_beyond_cap(&active, &cluster()), None);
        // Moved by a direct write to ten years out.
        active.expires_at = Some(T0 + 3650 * 24 * H);
        let why = expiry_beyond_cap(&active, &cluster()).unwrap();
        assert!(why.contains("max_total_duration"), "{why}");
        assert_eq!(capped_expiry(&active, &cluster()), Some(T0 + 12 * H));
    }
}
