//! The declarative heart of the grant engine: from the set of grants that
//! should be in force, compute what the cluster must look like, and the
//! smallest set of changes that gets it there. Grant, revoke, extend and
//! reconcile are all "converge to this set".

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::request::AccessSpec;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    Cluster,
    Namespaces(BTreeSet<String>),
}

impl Scope {
    pub fn from_namespaces<I: IntoIterator<Item = S>, S: Into<String>>(namespaces: I) -> Self {
        let set: BTreeSet<String> = namespaces.into_iter().map(Into::into).collect();
        if set.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(set)
        }
    }

    /// Cluster scope wins; namespaces are unioned.
    pub fn union(&self, other: &Scope) -> Scope {
        match (self, other) {
            (Scope::Namespaces(a), Scope::Namespaces(b)) => {
                Scope::Namespaces(a.union(b).cloned().collect())
            }
            _ => Scope::Cluster,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Scope::Cluster => "cluster-wide".to_string(),
            Scope::Namespaces(ns) => {
                let list: Vec<&str> = ns.iter().map(String::as_str).collect();
                format!("namespaces {}", list.join(", "))
            }
        }
    }
}

/// Per access policy, what the given grants need together.
pub fn desired_policies<'a, I>(grants: I) -> BTreeMap<String, Scope>
where
    I: IntoIterator<Item = &'a AccessSpec>,
{
    let mut out: BTreeMap<String, Scope> = BTreeMap::new();
    for grant in grants {
        let Some(policy) = &grant.policy_arn else {
            continue;
        };
        let scope = Scope::from_namespaces(grant.namespaces.iter().cloned());
        let merged = match out.get(policy) {
            Some(existing) => existing.union(&scope),
            None => scope,
        };
        out.insert(policy.clone(), merged);
    }
    out
}

/// What existed before Tollgate first touched a policy for a principal:
/// `None` means "no association", and restoring it means disassociating.
pub type Baselines = BTreeMap<String, Option<Scope>>;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AssociationPlan {
    /// Record these before any cloud call, so a crash mid-way still knows
    /// what to restore.
    pub new_baselines: Baselines,
    pub associate: Vec<(String, Scope)>,
    pub disassociate: Vec<String>,
    /// Policies no grant needs any more, restored above; forget them after.
    pub forget_baselines: Vec<String>,
    /// At least one association must exist, so the access entry must too.
    pub needs_entry: bool,
}

/// Only policies that are desired or have a recorded baseline are touched;
/// every other association of the principal is left as it is.
pub fn plan_associations(
    current: &BTreeMap<String, Scope>,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
) -> AssociationPlan {
    let mut plan = AssociationPlan::default();
    let mut all_baselines = baselines.clone();
    for policy in desired.keys() {
        if !baselines.contains_key(policy) {
            let before = current.get(policy).cloned();
            plan.new_baselines.insert(policy.clone(), before.clone());
            all_baselines.insert(policy.clone(), before);
        }
    }
    let touched: BTreeSet<&String> = desired.keys().chain(all_baselines.keys()).collect();
    for policy in touched {
        let base = all_baselines.get(policy).cloned().flatten();
        let target = match (desired.get(policy), base) {
            (Some(d), Some(b)) => Some(d.union(&b)),
            (Some(d), None) => Some(d.clone()),
            (None, b) => b,
        };
        match target {
            Some(scope) => {
                plan.needs_entry = true;
                if current.get(policy) != Some(&scope) {
                    plan.associate.push((policy.clone(), scope));
                }
            }
            None => {
                if current.contains_key(policy) {
                    plan.disassociate.push(policy.clone());
                }
            }
        }
        if !desired.contains_key(policy) && baselines.contains_key(policy) {
            plan.forget_baselines.push(policy.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDIT: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy";
    const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";

    fn spec(policy: &str, ns: &[&str]) -> AccessSpec {
        AccessSpec {
            cluster: "c".into(),
            role: "r".into(),
            principal: "p".into(),
            policy_arn: Some(policy.into()),
            namespaces: ns.iter().map(|s| s.to_string()).collect(),
            cluster_role: None,
            groups: vec![],
            k8s_user: None,
        }
    }

    fn ns(list: &[&str]) -> Scope {
        Scope::from_namespaces(list.iter().copied())
    }

    #[test]
    fn namespaces_union_and_cluster_wins() {
        let d = desired_policies(&[spec(EDIT, &["a"]), spec(EDIT, &["b"]), spec(VIEW, &[])]);
        assert_eq!(d[EDIT], ns(&["a", "b"]));
        assert_eq!(d[VIEW], Scope::Cluster);
        let d = desired_policies(&[spec(EDIT, &["a"]), spec(EDIT, &[])]);
        assert_eq!(d[EDIT], Scope::Cluster);
    }

    #[test]
    fn first_grant_records_absent_baseline_and_associates() {
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&BTreeMap::new(), &desired, &Baselines::new());
        assert_eq!(
            plan.new_baselines,
            Baselines::from([(EDIT.to_string(), None)])
        );
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["a"]))]);
        assert!(plan.disassociate.is_empty());
        assert!(plan.needs_entry);
    }

    #[test]
    fn converged_state_plans_nothing() {
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), None)]);
        let plan = plan_associations(&current, &desired, &baselines);
        assert!(plan.associate.is_empty() && plan.disassociate.is_empty());
        assert!(plan.new_baselines.is_empty() && plan.forget_baselines.is_empty());
    }

    #[test]
    fn last_grant_ending_disassociates_and_forgets() {
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), None)]);
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines);
        assert_eq!(plan.disassociate, vec![EDIT.to_string()]);
        assert_eq!(plan.forget_baselines, vec![EDIT.to_string()]);
        assert!(!plan.needs_entry);
    }

    #[test]
    fn preexisting_association_is_kept_in_union_and_restored() {
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["x"]))]);
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&current, &desired, &Baselines::new());
        assert_eq!(plan.new_baselines[EDIT], Some(ns(&["x"])));
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["a", "x"]))]);

        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a", "x"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), Some(ns(&["x"])))]);
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines);
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["x"]))]);
        assert!(plan.disassociate.is_empty());
        assert_eq!(plan.forget_baselines, vec![EDIT.to_string()]);
    }

    #[test]
    fn untouched_policies_are_left_alone() {
        let current = BTreeMap::from([(VIEW.to_string(), Scope::Cluster)]);
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&current, &desired, &Baselines::new());
        assert!(!plan.disassociate.contains(&VIEW.to_string()));
        assert!(plan.associate.iter().all(|(p, _)| p != VIEW));
        let plan = plan_associations(&current, &BTreeMap::new(), &Baselines::new());
        assert_eq!(plan, AssociationPlan::default());
    }
}
