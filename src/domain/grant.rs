//! The declarative heart of the grant engine: from the set of grants that
//! should be in force, compute what the cluster must look like, and the
//! smallest set of changes that gets it there. Grant, revoke, extend and
//! reconcile are all "converge to this set".

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::policy::{ClusterPolicy, Strategy};
use super::request::{AccessSpec, Intent, Request};

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

/// Whose marks the principal's access entry carries, as the converge read
/// it (spec 8.3, 9.6). Only an entry no Tollgate marked can hold standing
/// access worth recording as a baseline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryMark {
    /// There is no entry.
    Absent,
    /// An entry without `managed-by=tollgate`: made outside any Tollgate.
    Unmarked,
    /// Marked by this installation (or, made before installations were
    /// marked, by none).
    Ours,
    /// Marked by another installation, named by its `tollgate-instance`.
    Other(String),
}

/// Reads an existing object's marks: `managed_by` is its `managed-by`
/// tag (or label), `instance` its `tollgate-instance`, `ours` this
/// installation's `[server] instance`.
pub fn entry_mark(managed_by: Option<&str>, instance: Option<&str>, ours: &str) -> EntryMark {
    if managed_by != Some("tollgate") {
        return EntryMark::Unmarked;
    }
    match instance {
        Some(other) if other != ours => EntryMark::Other(other.to_string()),
        _ => EntryMark::Ours,
    }
}

/// Standing access a baseline would have restored that is gone: someone
/// removed it while Tollgate's grant was in force (spec 9.6). It is not
/// re-created; the baseline is rewritten to "none" (a grant still needs
/// the policy) or forgotten, and the loss is reported (`baseline_gone`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoneBaseline {
    pub policy: String,
    /// What the baseline recorded before it vanished.
    pub scope: Scope,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AssociationPlan {
    /// Record these before any cloud call, so a crash mid-way still knows
    /// what to restore. A gone baseline a grant still needs is rewritten
    /// here as `None`.
    pub new_baselines: Baselines,
    pub associate: Vec<(String, Scope)>,
    pub disassociate: Vec<String>,
    /// Policies no grant needs any more, seen already restored (or whose
    /// standing access is gone); forget them.
    pub forget_baselines: Vec<String>,
    /// Baselines whose standing access vanished: reported, never restored.
    pub gone: Vec<GoneBaseline>,
    /// At least one association must exist, so the access entry must too.
    pub needs_entry: bool,
    /// The entry is another installation's: nothing may be granted on it
    /// (spec 9.6). Set only when grants want access; nothing else is
    /// planned then.
    pub other_installation: Option<String>,
}

/// Standing access that vanished while Tollgate held the policy: an
/// association Tollgate makes over a baseline always includes it, and
/// Tollgate never disassociates a policy whose baseline holds access nor
/// narrows it below the baseline, so its absence, or a scope that no
/// longer covers it, means someone else removed or narrowed it (or the
/// whole entry). Restoring it would put back what they took away.
pub fn vanished_baselines(
    current: &BTreeMap<String, Scope>,
    baselines: &Baselines,
) -> Vec<GoneBaseline> {
    baselines
        .iter()
        .filter_map(|(policy, base)| {
            let scope = base.clone()?;
            let kept = current
                .get(policy)
                .is_some_and(|now| narrows(Some(now), &scope));
            (!kept).then(|| GoneBaseline {
                policy: policy.clone(),
                scope,
            })
        })
        .collect()
}

/// Only policies that are desired or have a recorded baseline are touched;
/// every other association of the principal is left as it is.
///
/// The baseline rules (spec 9.6):
/// * A policy's baseline is what `current` shows for it only when the entry
///   carries no Tollgate mark of any installation and no baseline of this
///   store is on record for the principal. A baseline is recorded before
///   every association Tollgate makes and kept while any grant needs the
///   policy, so "none on record" means no grant of this store is in force
///   (or ever associated anything): nothing `current` shows can be
///   Tollgate's own in-flight work. Otherwise the baseline is "none", and
///   whatever is there is removed when the last grant ends — fail closed.
/// * An entry marked by another installation is never granted over
///   (`other_installation`): refused when the plan would add access (a
///   policy with no baseline of this store on record, or an association
///   wider than what is there). Taking access away is never refused for a
///   mark: tags are forgeable (spec 8.7) and the store decides (9.2), so
///   while baselines of this store are on record a converge that wants
///   nothing, or less, removes and restores as on any other entry.
///   Otherwise a retag of a granted entry would leave its access in place
///   for good.
/// * A baseline holding access whose association is gone (removed, or the
///   whole entry deleted) is not re-created: `gone`.
pub fn plan_associations(
    current: &BTreeMap<String, Scope>,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
    entry: &EntryMark,
) -> AssociationPlan {
    let refused = |name: &String| AssociationPlan {
        other_installation: Some(name.clone()),
        ..AssociationPlan::default()
    };
    if let EntryMark::Other(name) = entry {
        if desired.keys().any(|p| !baselines.contains_key(p)) {
            return refused(name);
        }
        let plan = plan_for(current, desired, baselines, entry);
        if plan
            .associate
            .iter()
            .any(|(p, scope)| !narrows(current.get(p), scope))
        {
            return refused(name);
        }
        return plan;
    }
    plan_for(current, desired, baselines, entry)
}

/// The policies whose association `plan` leaves in place although no
/// grant wants it and no baseline of this store says it is standing
/// access: their backstop schedules stay, whatever the backstop plan says,
/// so a converge that chose not to remove an association never also takes
/// away the schedule that would.
pub fn left_in_place(
    current: &BTreeMap<String, Scope>,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
    plan: &AssociationPlan,
) -> Vec<String> {
    current
        .iter()
        .filter(|(p, scope)| {
            !desired.contains_key(*p)
                && !plan.disassociate.contains(*p)
                && !plan.associate.iter().any(|(q, _)| q == *p)
                && baselines.get(*p) != Some(&Some((*scope).clone()))
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// Whether associating `new` only takes access away from what `current`
/// gives (or gives exactly that).
pub fn narrows(current: Option<&Scope>, new: &Scope) -> bool {
    match (current, new) {
        (None, _) => false,
        (Some(Scope::Cluster), _) => true,
        (Some(Scope::Namespaces(_)), Scope::Cluster) => false,
        (Some(Scope::Namespaces(had)), Scope::Namespaces(ns)) => ns.is_subset(had),
    }
}

fn plan_for(
    current: &BTreeMap<String, Scope>,
    desired: &BTreeMap<String, Scope>,
    baselines: &Baselines,
    entry: &EntryMark,
) -> AssociationPlan {
    let mut plan = AssociationPlan::default();
    let mut all_baselines = baselines.clone();
    for gone in vanished_baselines(current, baselines) {
        all_baselines.insert(gone.policy.clone(), None);
        if desired.contains_key(&gone.policy) {
            plan.new_baselines.insert(gone.policy.clone(), None);
        }
        plan.gone.push(gone);
    }
    let may_snapshot = baselines.is_empty() && *entry == EntryMark::Unmarked;
    for policy in desired.keys() {
        if !baselines.contains_key(policy) {
            let before = if may_snapshot {
                current.get(policy).cloned()
            } else {
                None
            };
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
        let in_place = current.get(policy) == target.as_ref();
        match target {
            Some(scope) => {
                plan.needs_entry = true;
                if !in_place {
                    plan.associate.push((policy.clone(), scope));
                }
            }
            None => {
                if !in_place {
                    plan.disassociate.push(policy.clone());
                }
            }
        }
        // A baseline is forgotten only once a read shows it restored: a
        // restore call that answered success without taking effect (seen
        // by the read-back after a revoke) is then made again, because
        // what to put back is still known. The read is this converge's
        // first, made under the principal's lease after every earlier
        // write of Tollgate's returned or could no longer land (a step cut
        // off mid-call fences the principal for a lease term).
        if in_place && !desired.contains_key(policy) && baselines.contains_key(policy) {
            plan.forget_baselines.push(policy.clone());
        }
    }
    plan
}

/// The name of a grant's RoleBindings / ClusterRoleBinding (spec 8.3).
pub fn binding_name(grant_id: &str) -> String {
    format!("tollgate-{}", grant_id.to_ascii_lowercase())
}

/// The ARN an aws-auth item maps for a principal (role path dropped, by
/// the one rule in `identity`).
pub fn aws_auth_arn(principal: &str) -> String {
    super::identity::strip_role_path(principal)
}

/// Everything converging `spec` with `strategy` may create: recorded on the
/// grant's row before the first create call, so that "created by
/// Tollgate" is something its store says, not something a tag claims.
pub fn intents_for(strategy: Strategy, grant_id: &str, spec: &AccessSpec) -> Vec<Intent> {
    let mut out = Vec::new();
    match strategy {
        Strategy::AccessEntry => {
            out.push(Intent::AccessEntry {
                principal: spec.principal.clone(),
            });
            if let Some(policy) = &spec.policy_arn {
                out.push(Intent::Association {
                    principal: spec.principal.clone(),
                    policy: policy.clone(),
                });
            }
        }
        Strategy::SessionRbac => {
            let name = binding_name(grant_id);
            if spec.namespaces.is_empty() {
                out.push(Intent::Binding {
                    namespace: None,
                    name,
                });
            } else {
                for ns in &spec.namespaces {
                    out.push(Intent::Binding {
                        namespace: Some(ns.clone()),
                        name: name.clone(),
                    });
                }
            }
        }
        Strategy::AwsAuth => {
            if let Some(user) = &spec.k8s_user {
                out.push(Intent::AwsAuthItem {
                    arn: aws_auth_arn(&spec.principal).to_ascii_lowercase(),
                    username: user.clone(),
                });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Why a grant approved as `spec` may not be made under the current
/// configuration of `cluster`, if it may not: the role it names must still
/// give exactly what was approved (strategy, access policy, ClusterRole,
/// groups). An approver approved a precise change; a config edit since
/// then must not turn it into another one.
pub fn role_changed(cluster: &ClusterPolicy, spec: &AccessSpec) -> Option<String> {
    let Some(role) = cluster.roles.get(&spec.role) else {
        return Some(format!(
            "the role changed since approval: {} no longer has a role `{}`",
            cluster.name, spec.role
        ));
    };
    let stored = spec.strategy_or(cluster.strategy);
    let differs = if role.namespaced && spec.namespaces.is_empty() {
        // Approved cluster-wide; the role now allows only namespaces.
        Some("it is now namespaced, and this grant is cluster-wide".to_string())
    } else if stored != cluster.strategy {
        Some(format!(
            "strategy {} is now {}",
            stored.name(),
            cluster.strategy.name()
        ))
    } else {
        match stored {
            Strategy::AccessEntry if spec.policy_arn != role.access_policy => Some(format!(
                "access policy {} is now {}",
                spec.policy_arn.as_deref().unwrap_or("none"),
                role.access_policy.as_deref().unwrap_or("none")
            )),
            Strategy::SessionRbac if spec.cluster_role != role.cluster_role => Some(format!(
                "ClusterRole {} is now {}",
                spec.cluster_role.as_deref().unwrap_or("none"),
                role.cluster_role.as_deref().unwrap_or("none")
            )),
            Strategy::AwsAuth if spec.groups != role.groups => Some(format!(
                "groups [{}] are now [{}]",
                spec.groups.join(", "),
                role.groups.join(", ")
            )),
            _ => None,
        }
    };
    differs.map(|what| {
        format!(
            "the role changed since approval: role `{}` on {}: {what}; nothing was granted, request it again",
            spec.role, cluster.name
        )
    })
}

/// Spec 9.7 at grant time (and when an extension would keep access in
/// place longer): why the namespaces of `spec` may no longer be granted
/// under the current configuration, if they may not. A row approved before
/// a namespace was denied, or written straight into the store, gets
/// nothing.
pub fn namespace_refused(cluster: &ClusterPolicy, spec: &AccessSpec) -> Option<String> {
    // First, and whatever the role: the rules below match names, and a
    // stored `*` or `kube-*` is no name (their globs take it literally)
    // while EKS access scopes take it as a wildcard.
    if let Some(why) = invalid_namespace(spec) {
        return Some(why);
    }
    let role = cluster.roles.get(&spec.role)?;
    role.namespace_rules
        .check(&spec.namespaces)
        .err()
        .map(|refusal| {
            format!(
                "a namespace rule refuses it: {}",
                refusal.message(&spec.role, &cluster.name)
            )
        })
}

/// Why a stored row's namespaces are not all Kubernetes namespace names
/// (RFC 1123 labels), if one is not: the same test as a request's
/// `--ns` (spec 9.7). Only a row written straight into the store fails it.
pub fn invalid_namespace(spec: &AccessSpec) -> Option<String> {
    spec.namespaces
        .iter()
        .find_map(|ns| super::command::validate_namespace(ns).err())
}

/// Whether `row` says it created `object`: the one test of "created by
/// Tollgate" (spec 9.2). A row from before intents were recorded (none
/// stored) adopts an object that matches what it would have created: its
/// own principal's entry and associations, bindings named after it, its
/// principal's aws-auth item under its username.
pub fn row_records(row: &Request, object: &Intent) -> bool {
    records(
        &row.intents,
        row.activated_at.is_some(),
        row.id.as_str(),
        &row.access,
        object,
    )
}

/// `row_records` over the parts of a row it reads: what the row recorded
/// (`intents`), whether it ever became Active, its id and its access. The
/// standing-access records carried over the admin socket hold just these.
pub fn records(
    intents: &[Intent],
    activated: bool,
    id: &str,
    spec: &AccessSpec,
    object: &Intent,
) -> bool {
    if intents.contains(object) {
        return true;
    }
    if !intents.is_empty() {
        return false;
    }
    // Adoption is for rows from before intents were recorded, and only for
    // those that reached Active: a pending, denied or cancelled request
    // never created anything, so a forged tag naming it adopts nothing.
    if !activated {
        return false;
    }
    match object {
        Intent::AccessEntry { principal } => *principal == spec.principal,
        Intent::Association { principal, policy } => {
            *principal == spec.principal && spec.policy_arn.as_deref() == Some(policy.as_str())
        }
        Intent::Binding { name, .. } => *name == binding_name(id),
        Intent::AwsAuthItem { arn, username } => {
            aws_auth_arn(&spec.principal).eq_ignore_ascii_case(arn)
                && spec.k8s_user.as_deref() == Some(username.as_str())
        }
    }
}

/// The grant a binding is named after (`tollgate-<id lowercased>`), if its
/// name is one: a binding is judged by the name a row recorded, whatever
/// its labels or subjects now say.
pub fn binding_grant(name: &str) -> Option<super::request::RequestId> {
    let id = name.strip_prefix("tollgate-")?;
    let parsed = super::request::RequestId::parse(id)?;
    (binding_name(parsed.as_str()) == name).then_some(parsed)
}

/// Whether an association with `scope` gives what a grant for
/// `namespaces` needs (empty = cluster-wide).
pub fn scope_covers(scope: &Scope, namespaces: &[String]) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Namespaces(have) => {
            !namespaces.is_empty() && namespaces.iter().all(|n| have.contains(n))
        }
    }
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
            strategy: None,
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
        let plan = plan_associations(
            &BTreeMap::new(),
            &desired,
            &Baselines::new(),
            &EntryMark::Absent,
        );
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
        let plan = plan_associations(&current, &desired, &baselines, &EntryMark::Unmarked);
        assert!(plan.associate.is_empty() && plan.disassociate.is_empty());
        assert!(plan.new_baselines.is_empty() && plan.forget_baselines.is_empty());
    }

    #[test]
    fn last_grant_ending_disassociates_and_forgets() {
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), None)]);
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines, &EntryMark::Unmarked);
        assert_eq!(plan.disassociate, vec![EDIT.to_string()]);
        assert!(
            plan.forget_baselines.is_empty(),
            "forgotten only once seen restored"
        );
        assert!(!plan.needs_entry);
        let plan = plan_associations(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &baselines,
            &EntryMark::Unmarked,
        );
        assert!(plan.disassociate.is_empty());
        assert_eq!(plan.forget_baselines, vec![EDIT.to_string()]);
    }

    #[test]
    fn preexisting_association_is_kept_in_union_and_restored() {
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["x"]))]);
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&current, &desired, &Baselines::new(), &EntryMark::Unmarked);
        assert_eq!(plan.new_baselines[EDIT], Some(ns(&["x"])));
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["a", "x"]))]);

        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a", "x"]))]);
        let baselines = Baselines::from([(EDIT.to_string(), Some(ns(&["x"])))]);
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines, &EntryMark::Unmarked);
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["x"]))]);
        assert!(plan.disassociate.is_empty());
        assert!(plan.forget_baselines.is_empty());
        let restored = BTreeMap::from([(EDIT.to_string(), ns(&["x"]))]);
        let plan = plan_associations(
            &restored,
            &BTreeMap::new(),
            &baselines,
            &EntryMark::Unmarked,
        );
        assert!(plan.associate.is_empty());
        assert_eq!(plan.forget_baselines, vec![EDIT.to_string()]);
    }

    #[test]
    fn untouched_policies_are_left_alone() {
        let current = BTreeMap::from([(VIEW.to_string(), Scope::Cluster)]);
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&current, &desired, &Baselines::new(), &EntryMark::Unmarked);
        assert!(!plan.disassociate.contains(&VIEW.to_string()));
        assert!(plan.associate.iter().all(|(p, _)| p != VIEW));
        let plan = plan_associations(
            &current,
            &BTreeMap::new(),
            &Baselines::new(),
            &EntryMark::Unmarked,
        );
        assert_eq!(plan, AssociationPlan::default());
    }

    #[test]
    fn marks_name_the_installation() {
        assert_eq!(entry_mark(None, None, "blue"), EntryMark::Unmarked);
        assert_eq!(
            entry_mark(Some("someone"), Some("blue"), "blue"),
            EntryMark::Unmarked
        );
        assert_eq!(
            entry_mark(Some("tollgate"), Some("blue"), "blue"),
            EntryMark::Ours
        );
        assert_eq!(
            entry_mark(Some("tollgate"), None, "blue"),
            EntryMark::Ours,
            "made before installations were marked"
        );
        assert_eq!(
            entry_mark(Some("tollgate"), Some("green"), "blue"),
            EntryMark::Other("green".into())
        );
    }

    #[test]
    fn another_installations_entry_is_never_granted_over() {
        let current = BTreeMap::from([(VIEW.to_string(), Scope::Cluster)]);
        let desired = desired_policies(&[spec(VIEW, &["payments"])]);
        let other = EntryMark::Other("green".into());
        let plan = plan_associations(&current, &desired, &Baselines::new(), &other);
        assert_eq!(plan.other_installation.as_deref(), Some("green"));
        assert!(
            plan.new_baselines.is_empty() && plan.associate.is_empty() && !plan.needs_entry,
            "nothing recorded, nothing made: {plan:?}"
        );
        // Wider than what is there, over a baseline of this store: refused.
        let on_record = Baselines::from([(VIEW.to_string(), None)]);
        let narrow = BTreeMap::from([(VIEW.to_string(), ns(&["a"]))]);
        let plan = plan_associations(&narrow, &desired, &on_record, &other);
        assert_eq!(plan.other_installation.as_deref(), Some("green"));
        assert!(plan.associate.is_empty() && plan.disassociate.is_empty());
    }

    #[test]
    fn an_association_left_in_place_keeps_its_schedule() {
        let current = BTreeMap::from([
            (VIEW.to_string(), Scope::Cluster),
            (EDIT.to_string(), ns(&["payments"])),
        ]);
        let baselines = Baselines::from([
            (VIEW.to_string(), Some(Scope::Cluster)),
            (EDIT.to_string(), None),
        ]);
        // A plan that removes EDIT: nothing is left in place (VIEW is its
        // own restored baseline).
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines, &EntryMark::Ours);
        assert_eq!(plan.disassociate, vec![EDIT.to_string()]);
        assert!(left_in_place(&current, &BTreeMap::new(), &baselines, &plan).is_empty());
        // A plan that (for whatever reason) leaves EDIT there: its
        // schedule must stay.
        let idle = AssociationPlan::default();
        assert_eq!(
            left_in_place(&current, &BTreeMap::new(), &baselines, &idle),
            vec![EDIT.to_string()]
        );
    }

    /// The attack: an entry this store granted on is retagged as another
    /// installation's; a revoke (nothing wanted) must still take the
    /// access away, not forget its baselines and leave it for good.
    #[test]
    fn a_retagged_entry_still_loses_what_this_store_granted() {
        let other = EntryMark::Other("zzz".into());
        let current = BTreeMap::from([
            (VIEW.to_string(), Scope::Cluster),
            (EDIT.to_string(), ns(&["payments"])),
        ]);
        let baselines = Baselines::from([
            (VIEW.to_string(), Some(ns(&["x"]))),
            (EDIT.to_string(), None),
        ]);
        let plan = plan_associations(&current, &BTreeMap::new(), &baselines, &other);
        assert_eq!(plan.other_installation, None);
        assert_eq!(plan.disassociate, vec![EDIT.to_string()]);
        assert_eq!(plan.associate, vec![(VIEW.to_string(), ns(&["x"]))]);
        assert!(plan.forget_baselines.is_empty(), "{plan:?}");
        assert!(plan.gone.is_empty(), "{plan:?}");
        // Narrowing (one of two grants ends) is not refused either.
        let desired = desired_policies(&[spec(EDIT, &["payments"])]);
        let wide = BTreeMap::from([(EDIT.to_string(), ns(&["payments", "orders"]))]);
        let edit_only = Baselines::from([(EDIT.to_string(), None)]);
        let plan = plan_associations(&wide, &desired, &edit_only, &other);
        assert_eq!(plan.other_installation, None);
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["payments"]))]);
        // Nothing of this store on record: nothing to take away or forget.
        let plan = plan_associations(&current, &BTreeMap::new(), &Baselines::new(), &other);
        assert_eq!(plan, AssociationPlan::default());
    }

    #[test]
    fn baselines_come_only_from_unmarked_entries_with_nothing_on_record() {
        let current = BTreeMap::from([(VIEW.to_string(), Scope::Cluster)]);
        let desired = desired_policies(&[spec(VIEW, &["payments"])]);
        let plan = plan_associations(&current, &desired, &Baselines::new(), &EntryMark::Unmarked);
        assert_eq!(plan.new_baselines[VIEW], Some(Scope::Cluster));
        // On an entry Tollgate marked, what is there is not standing access.
        let plan = plan_associations(&current, &desired, &Baselines::new(), &EntryMark::Ours);
        assert_eq!(plan.new_baselines[VIEW], None);
        assert_eq!(plan.associate, vec![(VIEW.to_string(), ns(&["payments"]))]);
        // A baseline on record means a grant of this store is in force: an
        // association found now for another policy may be anyone's (another
        // installation's, Tollgate's own call still landing); it is not
        // taken for standing access.
        let on_record = Baselines::from([(EDIT.to_string(), None)]);
        let plan = plan_associations(&current, &desired, &on_record, &EntryMark::Unmarked);
        assert_eq!(plan.new_baselines[VIEW], None);
    }

    #[test]
    fn vanished_standing_access_is_not_recreated() {
        let base = Baselines::from([(EDIT.to_string(), Some(ns(&["x"])))]);
        let gone = vec![GoneBaseline {
            policy: EDIT.into(),
            scope: ns(&["x"]),
        }];
        // The grant ended; the pre-existing association was removed during it.
        let plan = plan_associations(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &base,
            &EntryMark::Unmarked,
        );
        assert!(plan.associate.is_empty(), "{plan:?}");
        assert!(
            !plan.needs_entry,
            "no entry is created to restore a baseline"
        );
        assert_eq!(plan.forget_baselines, vec![EDIT.to_string()]);
        assert_eq!(plan.gone, gone);
        // The whole entry was deleted: the same.
        let plan = plan_associations(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &base,
            &EntryMark::Absent,
        );
        assert!(plan.associate.is_empty() && !plan.needs_entry);
        assert_eq!(plan.gone, gone);
        // Still in force: the grant keeps its own access, the baseline
        // becomes "none", so its end removes only what Tollgate made.
        let desired = desired_policies(&[spec(EDIT, &["a"])]);
        let plan = plan_associations(&BTreeMap::new(), &desired, &base, &EntryMark::Unmarked);
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["a"]))]);
        assert_eq!(
            plan.new_baselines,
            Baselines::from([(EDIT.to_string(), None)])
        );
        assert_eq!(plan.gone, gone);
        // A baseline that only narrowed is restored as before.
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a", "x"]))]);
        let plan = plan_associations(&current, &BTreeMap::new(), &base, &EntryMark::Unmarked);
        assert!(plan.gone.is_empty());
        assert_eq!(plan.associate, vec![(EDIT.to_string(), ns(&["x"]))]);
        // Narrowed by an admin below the baseline during the grant (x
        // taken away): what they took away is not put back.
        let current = BTreeMap::from([(EDIT.to_string(), ns(&["a"]))]);
        let plan = plan_associations(&current, &BTreeMap::new(), &base, &EntryMark::Unmarked);
        assert_eq!(plan.gone, gone);
        assert!(
            !plan.associate.iter().any(|(_, scope)| *scope == ns(&["x"])),
            "{plan:?}"
        );
    }

    fn granted(id: &str, spec: AccessSpec, intents: Vec<Intent>) -> Request {
        let mut row = Request::pending(
            crate::domain::request::Asked {
                id: crate::domain::request::RequestId::parse(id).unwrap(),
                requester: crate::domain::request::Requester {
                    user_id: "U1".into(),
                    email: "alice@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: spec,
                reason: String::new(),
                duration: std::time::Duration::from_secs(60),
                approval_timeout: std::time::Duration::from_secs(60),
                required_approvals: 1,
                response_url: None,
            },
            time::OffsetDateTime::UNIX_EPOCH,
        );
        row.intents = intents;
        row.activated_at = Some(time::OffsetDateTime::UNIX_EPOCH);
        row
    }

    #[test]
    fn intents_name_what_each_strategy_creates() {
        let mut s = spec(EDIT, &["b", "a"]);
        s.principal = "arn:aws:iam::1:role/x/alice".into();
        s.k8s_user = Some("tollgate:alice@example.com".into());
        assert_eq!(
            intents_for(Strategy::AccessEntry, "R-AAAAA", &s),
            vec![
                Intent::AccessEntry {
                    principal: s.principal.clone()
                },
                Intent::Association {
                    principal: s.principal.clone(),
                    policy: EDIT.into()
                },
            ]
        );
        assert_eq!(
            intents_for(Strategy::SessionRbac, "R-AAAAA", &s),
            vec![
                Intent::Binding {
                    namespace: Some("a".into()),
                    name: "tollgate-r-aaaaa".into()
                },
                Intent::Binding {
                    namespace: Some("b".into()),
                    name: "tollgate-r-aaaaa".into()
                },
            ]
        );
        assert_eq!(
            intents_for(Strategy::AwsAuth, "R-AAAAA", &s),
            vec![Intent::AwsAuthItem {
                arn: "arn:aws:iam::1:role/alice".into(),
                username: "tollgate:alice@example.com".into()
            }]
        );
    }

    #[test]
    fn a_row_records_only_what_it_said_it_would_create() {
        let s = spec(VIEW, &[]);
        let alice = Intent::AccessEntry {
            principal: "p".into(),
        };
        let admin = Intent::AccessEntry {
            principal: "arn:aws:iam::1:role/admin".into(),
        };
        let row = granted(
            "R-AAAAA",
            s.clone(),
            intents_for(Strategy::AccessEntry, "R-AAAAA", &s),
        );
        assert!(row_records(&row, &alice));
        assert!(
            !row_records(&row, &admin),
            "a real grant id on someone else's entry"
        );
        // A row from before intents were recorded adopts only what it would
        // have created: its own principal's entry and policy.
        let legacy = granted("R-AAAAA", s.clone(), Vec::new());
        assert!(row_records(&legacy, &alice));
        let mut never_active = legacy.clone();
        never_active.activated_at = None;
        assert!(
            !row_records(&never_active, &alice),
            "a request that never became Active created nothing to adopt"
        );
        assert!(!row_records(&legacy, &admin));
        assert!(row_records(
            &legacy,
            &Intent::Association {
                principal: "p".into(),
                policy: VIEW.into()
            }
        ));
        assert!(!row_records(
            &legacy,
            &Intent::Association {
                principal: "p".into(),
                policy: EDIT.into()
            }
        ));
        assert!(row_records(
            &legacy,
            &Intent::Binding {
                namespace: None,
                name: "tollgate-r-aaaaa".into()
            }
        ));
        assert!(!row_records(
            &legacy,
            &Intent::Binding {
                namespace: None,
                name: "tollgate-r-bbbbb".into()
            }
        ));
    }

    /// Spec 9.7: a row whose namespaces are denied now (config changed
    /// since approval, or the row was written by hand) is refused at grant.
    #[test]
    fn a_denied_namespace_at_grant_time_is_named() {
        let mut cluster = crate::domain::policy::tests::cluster();
        let mut s = spec("arn:aws:eks::aws:cluster-access-policy/edit", &["payments"]);
        s.role = "edit".into();
        assert_eq!(namespace_refused(&cluster, &s), None);
        for ns in ["tollgate", "kube-system"] {
            s.namespaces = vec!["payments".into(), ns.into()];
            let why = namespace_refused(&cluster, &s).unwrap();
            assert!(why.contains(ns) && why.contains("namespace rule"), "{why}");
        }
        s.namespaces = vec!["payments".into()];
        cluster
            .roles
            .get_mut("edit")
            .unwrap()
            .namespace_rules
            .deny
            .push("pay*".into());
        let why = namespace_refused(&cluster, &s).unwrap();
        assert!(why.contains("\"pay*\""), "{why}");
    }

    /// Security review M1: a row edited to a wildcard namespace passes no
    /// rule by the glob that would refuse it (a name's `*` is literal to
    /// the globs), yet EKS would take it as a wildcard. It is refused as
    /// no namespace name, whatever the role's rules.
    #[test]
    fn a_stored_wildcard_namespace_is_refused_at_grant() {
        let mut cluster = crate::domain::policy::tests::cluster();
        let mut s = spec("arn:aws:eks::aws:cluster-access-policy/edit", &["payments"]);
        s.role = "edit".into();
        // An allow-list a wildcard would otherwise slip through.
        cluster.roles.get_mut("edit").unwrap().namespace_rules.allow = Some(vec!["*".into()]);
        assert_eq!(namespace_refused(&cluster, &s), None);
        for bad in ["*", "kube-*", "Payments", "-x", ""] {
            s.namespaces = vec!["payments".into(), bad.into()];
            let why = namespace_refused(&cluster, &s)
                .unwrap_or_else(|| panic!("{bad:?} passed at grant"));
            assert!(why.contains("not a valid namespace name"), "{why}");
            assert!(invalid_namespace(&s).is_some());
        }
        s.namespaces = vec!["payments".into(), "kube-x1".into()];
        assert_eq!(invalid_namespace(&s), None);
    }

    #[test]
    fn a_role_changed_since_approval_is_named() {
        let cluster = crate::domain::policy::tests::cluster();
        let mut s = spec("arn:aws:eks::aws:cluster-access-policy/view", &[]);
        s.cluster = "prod".into();
        s.role = "view".into();
        s.strategy = Some(Strategy::AccessEntry);
        assert_eq!(role_changed(&cluster, &s), None);
        // A row written before the strategy was stored reads as what its
        // fields say.
        s.strategy = None;
        assert_eq!(role_changed(&cluster, &s), None);

        let mut admin = s.clone();
        admin.policy_arn =
            Some("arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy".into());
        let why = role_changed(&cluster, &admin).unwrap();
        assert!(why.starts_with("the role changed since approval"), "{why}");
        assert!(why.contains("AmazonEKSClusterAdminPolicy"), "{why}");

        let mut gone = s.clone();
        gone.role = "debug".into();
        assert!(role_changed(&cluster, &gone)
            .unwrap()
            .contains("no longer has a role"));

        let mut narrowed = cluster.clone();
        if let Some(view) = narrowed.roles.get_mut("view") {
            view.namespaced = true;
        }
        assert!(role_changed(&narrowed, &s)
            .unwrap()
            .contains("now namespaced"));
        let mut scoped = s.clone();
        scoped.namespaces = vec!["payments".into()];
        assert_eq!(role_changed(&narrowed, &scoped), None);

        let mut rbac = cluster.clone();
        rbac.strategy = Strategy::SessionRbac;
        let mut stored = s.clone();
        stored.strategy = Some(Strategy::AccessEntry);
        assert!(role_changed(&rbac, &stored)
            .unwrap()
            .contains("strategy access-entry is now session-rbac"));
    }

    #[test]
    fn a_binding_name_names_its_grant() {
        assert_eq!(
            binding_grant("tollgate-r-aaaaa").map(|id| id.to_string()),
            Some("R-AAAAA".to_string())
        );
        assert_eq!(
            binding_grant("tollgate-R-AAAAA"),
            None,
            "names are lowercase"
        );
        assert_eq!(binding_grant("ops-r-aaaaa"), None);
        assert_eq!(binding_grant("tollgate-r-aaaaa-x"), None);
    }

    #[test]
    fn scopes_cover_what_a_grant_needs() {
        assert!(scope_covers(&Scope::Cluster, &[]));
        assert!(scope_covers(&Scope::Cluster, &["a".into()]));
        assert!(scope_covers(&ns(&["a", "b"]), &["a".into()]));
        assert!(!scope_covers(&ns(&["a"]), &["a".into(), "b".into()]));
        assert!(
            !scope_covers(&ns(&["a"]), &[]),
            "namespaces never cover cluster-wide"
        );
    }
}
