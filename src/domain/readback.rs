//! Verified revocation (spec 10.2): after a revoke converges, the cluster is
//! read back and judged here. What counts is the revoked grant's own access
//! beyond what the grants still in force and the access that existed before
//! Tollgate (baselines) justify: a colleague's overlapping grant or a
//! pre-existing association may legitimately keep some of the same access
//! for the same principal, and that is not a failed revoke.

use std::collections::{BTreeMap, BTreeSet};

use super::grant::{Baselines, Scope};

/// What a read-back after a revoke found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadBack {
    /// The revoked grant's access is gone from the cluster.
    Removed,
    /// The cluster still shows some of it: what, in words for the audit
    /// and the alert.
    StillThere(Vec<String>),
    /// Nothing was read (`serve --dry-run` makes no changes to verify).
    NotChecked,
}

impl ReadBack {
    /// One of each kind, folded: anything still there wins.
    pub fn from_findings(findings: Vec<String>) -> ReadBack {
        if findings.is_empty() {
            ReadBack::Removed
        } else {
            ReadBack::StillThere(findings)
        }
    }
}

/// What the revoke step records about its read-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Seen gone at this instant.
    At(time::OffsetDateTime),
    /// Not read back (`serve --dry-run`): recorded as `verified: false`.
    NotChecked,
}

impl Verified {
    /// The audit details a `revoked` event gains.
    pub fn annotate(self, details: &mut serde_json::Value) {
        match self {
            Verified::At(t) => {
                details["verified"] = serde_json::json!(true);
                details["verified_at"] = serde_json::json!(super::lifecycle::rfc3339(Some(t)));
            }
            Verified::NotChecked => details["verified"] = serde_json::json!(false),
        }
    }

    pub fn at(self) -> Option<time::OffsetDateTime> {
        match self {
            Verified::At(t) => Some(t),
            Verified::NotChecked => None,
        }
    }
}

/// The scope of `policy` the cluster may still show after a revoke: what
/// the remaining grants need, unioned with the recorded baseline.
///
/// A policy with no baseline on record that no grant needs is owed in
/// full: Tollgate records a baseline (possibly "none") before it makes any
/// association and forgets it only once a read shows the association back
/// at that baseline. No record therefore means nothing of Tollgate's is
/// left on it: either the converge (or an earlier read-back) just saw the
/// pre-Tollgate association restored and forgot it, or Tollgate never
/// associated it at all (a revoke before the grant was made). Whatever the
/// cluster shows for it then predates or is not Tollgate's, and judging it
/// would flag a restored baseline as a failed revoke forever.
pub fn justified_scope(
    policy: &str,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
) -> Option<Scope> {
    if !baselines.contains_key(policy) && !desired.contains_key(policy) {
        return Some(Scope::Cluster);
    }
    let base = baselines.get(policy).cloned().flatten();
    match (desired.get(policy), base) {
        (Some(d), Some(b)) => Some(d.union(&b)),
        (Some(d), None) => Some(d.clone()),
        (None, b) => b,
    }
}

/// access-entry: the part of a revoked association (`policy`, namespaces
/// `revoked_ns`, empty = cluster-wide) that `current` (what
/// ListAssociatedAccessPolicies shows for that policy) still gives beyond
/// `justified`.
pub fn association_left(
    policy: &str,
    revoked_ns: &[String],
    current: Option<&Scope>,
    justified: Option<&Scope>,
) -> Option<String> {
    let current = current?;
    let justified_ns: Option<&BTreeSet<String>> = match justified {
        // Everything the revoked grant gave is still owed to someone.
        Some(Scope::Cluster) => return None,
        Some(Scope::Namespaces(ns)) => Some(ns),
        None => None,
    };
    let owed = |ns: &str| justified_ns.is_some_and(|j| j.contains(ns));
    if revoked_ns.is_empty() {
        // A cluster-wide grant covered every namespace: anything of the
        // policy beyond what is owed is its access.
        return match current {
            Scope::Cluster => Some(format!("{policy} still associated cluster-wide")),
            Scope::Namespaces(have) => {
                let extra: Vec<&str> = have
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !owed(n))
                    .collect();
                (!extra.is_empty()).then(|| {
                    format!(
                        "{policy} still associated for namespaces {}",
                        extra.join(", ")
                    )
                })
            }
        };
    }
    let left: BTreeSet<&str> = revoked_ns
        .iter()
        .map(String::as_str)
        .filter(|n| match current {
            Scope::Cluster => true,
            Scope::Namespaces(have) => have.contains(*n),
        })
        .filter(|n| !owed(n))
        .collect();
    (!left.is_empty()).then(|| {
        let list: Vec<&str> = left.into_iter().collect();
        format!(
            "{policy} still associated for namespaces {}",
            list.join(", ")
        )
    })
}

/// access-entry: the entry Tollgate created is still there although it
/// should be gone (`should_be_gone`: the store says Tollgate created it,
/// nobody else set anything on it, and no association is owed).
pub fn entry_left(entry_exists: bool, should_be_gone: bool) -> Option<String> {
    (entry_exists && should_be_gone).then(|| "access entry still exists".to_string())
}

/// session-rbac: the revoked grant's own bindings (named after it, so no
/// other grant shares them) that still exist and still bind its user.
pub fn bindings_left(still_bound: &[String]) -> Vec<String> {
    still_bound
        .iter()
        .map(|b| format!("{b} still exists"))
        .collect()
}

/// aws-auth: Tollgate's item for the revoked grant's user (`item_groups`:
/// its groups, `None` when there is no such item), judged against the
/// groups the grants still in force need (`justified`, `None` when none
/// is in force, so the item itself must be gone).
pub fn aws_auth_left(
    revoked_groups: &[String],
    item_groups: Option<&[String]>,
    justified: Option<&[String]>,
) -> Option<String> {
    let have = item_groups?;
    let Some(justified) = justified else {
        return Some("aws-auth item still maps the user".to_string());
    };
    let left: BTreeSet<&str> = revoked_groups
        .iter()
        .map(String::as_str)
        .filter(|g| have.iter().any(|h| h == g) && !justified.iter().any(|j| j == g))
        .collect();
    (!left.is_empty()).then(|| {
        let list: Vec<&str> = left.into_iter().collect();
        format!("aws-auth item still maps groups {}", list.join(", "))
    })
}

/// aws-auth: items of the revoked grant's ARN under other usernames
/// (`items`: username and groups of each) that map any of its groups the
/// grants still in force (`justified`) do not need.
pub fn aws_auth_others_left(
    revoked_groups: &[String],
    revoked_user: &str,
    items: &[(String, Vec<String>)],
    justified: &[String],
) -> Vec<String> {
    items
        .iter()
        .filter(|(user, _)| user != revoked_user)
        .filter_map(|(user, have)| {
            let left: BTreeSet<&str> = revoked_groups
                .iter()
                .map(String::as_str)
                .filter(|g| have.iter().any(|h| h == g) && !justified.iter().any(|j| j == g))
                .collect();
            (!left.is_empty()).then(|| {
                let list: Vec<&str> = left.into_iter().collect();
                format!(
                    "aws-auth item for {user} still maps groups {}",
                    list.join(", ")
                )
            })
        })
        .collect()
}

/// Baselines a read-back has seen restored: policies no grant needs any
/// more whose association is exactly what existed before Tollgate. Only
/// these may be forgotten; one whose restore is not visible yet stays
/// recorded, so the next attempt still knows what to put back.
pub fn restored_baselines(
    current: &BTreeMap<String, Scope>,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
) -> Vec<String> {
    baselines
        .iter()
        .filter(|(policy, base)| {
            !desired.contains_key(*policy) && current.get(*policy) == base.as_ref()
        })
        .map(|(policy, _)| policy.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDIT: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy";

    fn ns(list: &[&str]) -> Scope {
        Scope::from_namespaces(list.iter().copied())
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_gone_association_is_removed() {
        assert_eq!(association_left(EDIT, &names(&["a"]), None, None), None);
        assert_eq!(association_left(EDIT, &[], None, None), None);
    }

    #[test]
    fn an_association_kept_by_a_lying_api_is_still_there() {
        let left = association_left(EDIT, &names(&["a"]), Some(&ns(&["a"])), None).unwrap();
        assert!(left.contains("namespaces a"), "{left}");
        let left = association_left(EDIT, &[], Some(&Scope::Cluster), None).unwrap();
        assert!(left.contains("cluster-wide"), "{left}");
        // A namespaced grant under a cluster-wide association that nothing
        // owes is still in place.
        assert!(association_left(EDIT, &names(&["a"]), Some(&Scope::Cluster), None).is_some());
    }

    #[test]
    fn access_owed_to_other_grants_or_a_baseline_is_not_the_revoked_grants() {
        // Another grant still needs namespace a: only b was this grant's.
        let owed = ns(&["a"]);
        assert_eq!(
            association_left(EDIT, &names(&["a"]), Some(&ns(&["a"])), Some(&owed)),
            None
        );
        let left = association_left(
            EDIT,
            &names(&["a", "b"]),
            Some(&ns(&["a", "b"])),
            Some(&owed),
        )
        .unwrap();
        assert!(left.ends_with("namespaces b"), "{left}");
        // A cluster-wide baseline owes everything.
        assert_eq!(
            association_left(EDIT, &[], Some(&Scope::Cluster), Some(&Scope::Cluster)),
            None
        );
        // A cluster-wide revoked grant restored to a namespaced baseline.
        assert_eq!(
            association_left(EDIT, &[], Some(&ns(&["x"])), Some(&ns(&["x"]))),
            None
        );
        let left = association_left(EDIT, &[], Some(&ns(&["x", "y"])), Some(&ns(&["x"]))).unwrap();
        assert!(left.ends_with("namespaces y"), "{left}");
        // Namespaces the revoked grant never had are not its access.
        assert_eq!(
            association_left(EDIT, &names(&["a"]), Some(&ns(&["x"])), None),
            None
        );
    }

    #[test]
    fn justified_scope_is_remaining_grants_and_baseline() {
        let desired = BTreeMap::from([(EDIT.to_string(), ns(&["a"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), Some(ns(&["x"])))]);
        assert_eq!(
            justified_scope(EDIT, &desired, &baselines),
            Some(ns(&["a", "x"]))
        );
        assert_eq!(
            justified_scope(EDIT, &BTreeMap::new(), &baselines),
            Some(ns(&["x"]))
        );
        let none = Baselines::from([(EDIT.to_string(), None)]);
        assert_eq!(
            justified_scope(EDIT, &BTreeMap::new(), &none),
            None,
            "a recorded absent baseline owes nothing"
        );
        // No record at all: the baseline was seen restored and forgotten
        // (or nothing was ever associated), so what is there is not ours.
        assert_eq!(
            justified_scope(EDIT, &BTreeMap::new(), &Baselines::new()),
            Some(Scope::Cluster)
        );
        assert_eq!(justified_scope(EDIT, &desired, &none), Some(ns(&["a"])));
    }

    #[test]
    fn an_entry_counts_only_when_it_should_be_gone() {
        assert!(entry_left(true, true).is_some());
        assert_eq!(entry_left(true, false), None);
        assert_eq!(entry_left(false, true), None);
    }

    #[test]
    fn aws_auth_groups_owed_to_remaining_grants_are_not_left() {
        let revoked = names(&["debug", "view"]);
        assert_eq!(aws_auth_left(&revoked, None, None), None);
        assert!(aws_auth_left(&revoked, Some(&names(&["debug", "view"])), None).is_some());
        assert!(
            aws_auth_left(&revoked, Some(&[]), None).is_some(),
            "with nothing in force the item itself is access"
        );
        let still = names(&["view"]);
        assert_eq!(
            aws_auth_left(&revoked, Some(&still), Some(&still)),
            None,
            "another grant still needs view"
        );
        let left = aws_auth_left(&revoked, Some(&names(&["debug", "view"])), Some(&still)).unwrap();
        assert!(left.ends_with("groups debug"), "{left}");
    }

    #[test]
    fn other_items_of_the_arn_mapping_revoked_groups_are_left() {
        let revoked = names(&["debug", "view"]);
        let items = vec![
            ("tollgate:alice".to_string(), names(&["debug"])),
            ("admin".to_string(), names(&["view", "debug"])),
            ("reader".to_string(), names(&["other"])),
        ];
        assert_eq!(
            aws_auth_others_left(&revoked, "tollgate:alice", &items, &[]),
            vec!["aws-auth item for admin still maps groups debug, view".to_string()]
        );
        assert_eq!(
            aws_auth_others_left(
                &revoked,
                "tollgate:alice",
                &items,
                &names(&["debug", "view"])
            ),
            Vec::<String>::new(),
            "groups a grant in force still needs"
        );
    }

    #[test]
    fn bindings_still_there_are_named() {
        assert!(bindings_left(&[]).is_empty());
        assert_eq!(
            bindings_left(&names(&["RoleBinding a/tollgate-r-aaaaa"])),
            vec!["RoleBinding a/tollgate-r-aaaaa still exists".to_string()]
        );
    }

    #[test]
    fn only_baselines_seen_restored_are_forgotten() {
        let baselines = Baselines::from([
            (EDIT.to_string(), None),
            ("view".to_string(), Some(ns(&["x"]))),
            ("admin".to_string(), None),
        ]);
        let desired = BTreeMap::from([("admin".to_string(), Scope::Cluster)]);
        // EDIT still associated (a lying disassociate): kept; view restored.
        let current = BTreeMap::from([
            (EDIT.to_string(), ns(&["a"])),
            ("view".to_string(), ns(&["x"])),
            ("admin".to_string(), Scope::Cluster),
        ]);
        assert_eq!(
            restored_baselines(&current, &desired, &baselines),
            vec!["view".to_string()]
        );
        let current = BTreeMap::from([("view".to_string(), ns(&["x"]))]);
        assert_eq!(
            restored_baselines(&current, &BTreeMap::new(), &baselines),
            vec!["admin".to_string(), EDIT.to_string(), "view".to_string()]
        );
    }
}
