//! Standing access (spec section 12): who can reach a cluster without
//! Tollgate, at what level. Pure: the adapter reads a cluster into a
//! [`ClusterReading`], the store names the requests behind Tollgate's marks
//! ([`GrantRecord`]), and everything from there — what is Tollgate's, what
//! Kubernetes needs for itself, levels, order, summaries, the weekly digest
//! text and its week boundary — is decided here.

use serde::Serialize;
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime, Time, Weekday};

use super::grant::{records, Scope};
use super::request::{AccessSpec, Intent, Request, State};
use super::text::{escape_slack, terminal_safe};

/// How much a standing grant allows, most powerful first (the order of
/// the listing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    ClusterAdmin,
    Admin,
    Edit,
    View,
    /// Anything else: a custom policy or ClusterRole, Kubernetes groups
    /// whose rights come from bindings, a node identity. Listed last, not
    /// because it is harmless but because what it allows is not known here.
    Custom,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::ClusterAdmin,
        Level::Admin,
        Level::Edit,
        Level::View,
        Level::Custom,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Level::ClusterAdmin => "cluster-admin",
            Level::Admin => "admin",
            Level::Edit => "edit",
            Level::View => "view",
            Level::Custom => "custom",
        }
    }
}

/// The level of an EKS access policy, by ARN or bare name.
pub fn policy_level(policy: &str) -> Level {
    match policy.rsplit('/').next().unwrap_or(policy) {
        "AmazonEKSClusterAdminPolicy" => Level::ClusterAdmin,
        "AmazonEKSAdminPolicy" => Level::Admin,
        "AmazonEKSEditPolicy" => Level::Edit,
        "AmazonEKSViewPolicy" => Level::View,
        _ => Level::Custom,
    }
}

/// The level of a binding to a ClusterRole: Kubernetes' user-facing roles
/// by name, anything else custom.
pub fn cluster_role_level(name: &str) -> Level {
    match name {
        "cluster-admin" => Level::ClusterAdmin,
        "admin" => Level::Admin,
        "edit" => Level::Edit,
        "view" => Level::View,
        _ => Level::Custom,
    }
}

/// Kubernetes groups: `system:masters` bypasses RBAC altogether; any other
/// group's rights come from bindings, so its level is not known here.
fn groups_level(groups: &[String]) -> Option<Level> {
    if groups.is_empty() {
        None
    } else if groups.iter().any(|g| g == "system:masters") {
        Some(Level::ClusterAdmin)
    } else {
        Some(Level::Custom)
    }
}

/// One associated access policy of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Association {
    pub policy: String,
    /// `cluster`, or `namespace` with `namespaces`.
    pub scope: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl Association {
    fn short(&self) -> String {
        let name = self.policy.rsplit('/').next().unwrap_or(&self.policy);
        if self.namespaces.is_empty() {
            format!("{name}({})", self.scope)
        } else {
            format!("{name}({}: {})", self.scope, self.namespaces.join(","))
        }
    }
}

/// An access entry as read, before deciding whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    pub principal: String,
    /// `STANDARD`, `EC2_LINUX`, `FARGATE_LINUX`, …
    pub kind: String,
    pub username: Option<String>,
    pub groups: Vec<String>,
    pub policies: Vec<Association>,
    /// The grant named by Tollgate's tags, when it carries them.
    pub grant_mark: Option<String>,
}

/// One `mapRoles` / `mapUsers` item of aws-auth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMapping {
    /// `mapRoles` or `mapUsers`.
    pub list: String,
    pub arn: String,
    pub username: Option<String>,
    pub groups: Vec<String>,
}

/// A ClusterRoleBinding (`namespace` None) or RoleBinding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBinding {
    pub name: String,
    pub namespace: Option<String>,
    /// `ClusterRole` or `Role`.
    pub role_kind: String,
    pub role_name: String,
    /// (kind, name): `User`, `Group`, `ServiceAccount`.
    pub subjects: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    /// The grant named by Tollgate's labels, when it carries them.
    pub grant_mark: Option<String>,
}

/// Everything one read of a cluster found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterReading {
    pub entries: Vec<RawEntry>,
    pub mappings: Vec<RawMapping>,
    pub bindings: Vec<RawBinding>,
}

impl ClusterReading {
    /// The grant ids Tollgate's marks name, for one store lookup.
    pub fn marks(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter_map(|e| e.grant_mark.as_deref())
            .chain(self.bindings.iter().filter_map(|b| b.grant_mark.as_deref()))
    }
}

/// What the store says about one request: enough to tell whether an
/// object carrying Tollgate's marks is really Tollgate's, and how much of
/// what it holds Tollgate made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GrantRecord {
    pub id: String,
    pub cluster: String,
    pub principal: String,
    #[serde(default)]
    pub k8s_user: Option<String>,
    /// What the row recorded creating before its first create call.
    #[serde(default)]
    pub intents: Vec<Intent>,
    /// The request reached Active once (a row from before intents were
    /// recorded adopts only then).
    #[serde(default)]
    pub activated: bool,
    /// Tollgate still answers for this grant's access: approved and being
    /// made, active, or its revoke not yet seen done. Only such a grant
    /// accounts for an association or a binding being there.
    #[serde(default)]
    pub holds_access: bool,
    /// What the grant was approved as. Absent from an older server's
    /// answer: such a record then accounts for nothing, and everything is
    /// listed.
    #[serde(default)]
    pub access: Option<AccessSpec>,
}

impl GrantRecord {
    pub fn of(r: &Request) -> GrantRecord {
        GrantRecord {
            id: r.id.to_string(),
            cluster: r.access.cluster.clone(),
            principal: r.access.principal.clone(),
            k8s_user: r.access.k8s_user.clone(),
            intents: r.intents.clone(),
            activated: r.activated_at.is_some(),
            // An extension grants nothing of its own.
            holds_access: r.extends.is_none()
                && matches!(
                    r.state,
                    State::Approved | State::Active | State::RevokeFailed
                ),
            access: Some(r.access.clone()),
        }
    }

    /// Whether this row says it created `object` (`grant::row_records`).
    fn records(&self, object: &Intent) -> bool {
        self.access
            .as_ref()
            .is_some_and(|spec| records(&self.intents, self.activated, &self.id, spec, object))
    }
}

/// IAM compares role ARNs without their path and case-insensitively; a
/// Kubernetes user name compares as written.
fn same_principal(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        if s.starts_with("arn:") {
            super::identity::role_arn_key(s)
        } else {
            s.to_string()
        }
    };
    norm(a) == norm(b)
}

/// Whether an aws-auth item is Tollgate's: its `tollgate:<email>` username
/// (items carry no grant id) must be the user of a request of this store
/// for this cluster and this ARN. A forged or stale username leaves the
/// item listed as standing access.
pub fn mapping_created_by_tollgate(
    records: &[GrantRecord],
    cluster: &str,
    arn: &str,
    username: &str,
) -> bool {
    records.iter().any(|r| {
        r.cluster == cluster
            && r.k8s_user.as_deref() == Some(username)
            && same_principal(&r.principal, arn)
    })
}

/// The user name EKS gives an entry created without one, which is how
/// Tollgate creates them: any other name was set by someone else.
pub fn eks_default_username(principal: &str) -> Option<String> {
    let (prefix, rest) = principal.split_once(":role/")?;
    let account = prefix.rsplit(':').next()?;
    let name = rest.rsplit('/').next()?;
    Some(format!(
        "arn:aws:sts::{account}:assumed-role/{name}/{{{{SessionName}}}}"
    ))
}

fn association_scope(a: &Association) -> Scope {
    if a.scope == "cluster" {
        Scope::Cluster
    } else {
        Scope::from_namespaces(a.namespaces.iter().cloned())
    }
}

/// Spec 9.2 and 12: how much of an access entry is not Tollgate's. A mark
/// names a request; the entry is Tollgate's only when that request of this
/// cluster recorded creating it, and then only the associations a grant
/// Tollgate still answers for needs (that policy, within the scopes those
/// grants need together) are Tollgate's too. `None`: everything on the
/// entry is Tollgate's. Otherwise the entry as discovery lists it: whole
/// when the entry itself is not Tollgate's (or is not a `STANDARD` entry,
/// which Tollgate never creates), else only what is more — another policy
/// or a wider scope, Kubernetes groups, a user name Tollgate did not set.
pub fn entry_beyond(records: &[GrantRecord], cluster: &str, e: &RawEntry) -> Option<RawEntry> {
    let ours = e.kind == "STANDARD"
        && e.grant_mark.as_deref().is_some_and(|mark| {
            records.iter().any(|r| {
                r.id == mark
                    && r.cluster == cluster
                    && r.records(&Intent::AccessEntry {
                        principal: e.principal.clone(),
                    })
            })
        });
    if !ours {
        return Some(e.clone());
    }
    let policies: Vec<Association> = e
        .policies
        .iter()
        .filter(|a| {
            let allowed = records
                .iter()
                .filter(|r| r.cluster == cluster && r.holds_access)
                .filter_map(|r| r.access.as_ref().map(|spec| (r, spec)))
                .filter(|(r, spec)| {
                    spec.policy_arn.as_deref() == Some(a.policy.as_str())
                        && same_principal(&spec.principal, &e.principal)
                        && r.records(&Intent::Association {
                            principal: spec.principal.clone(),
                            policy: a.policy.clone(),
                        })
                })
                .map(|(_, spec)| Scope::from_namespaces(spec.namespaces.iter().cloned()))
                .reduce(|x, y| x.union(&y));
            !allowed
                .is_some_and(|allowed| super::grant::narrows(Some(&allowed), &association_scope(a)))
        })
        .cloned()
        .collect();
    let username = e.username.clone().filter(|u| {
        !u.is_empty()
            && *u != e.principal
            && Some(u.as_str()) != eks_default_username(&e.principal).as_deref()
    });
    let beyond = RawEntry {
        principal: e.principal.clone(),
        kind: e.kind.clone(),
        username,
        groups: e.groups.clone(),
        policies,
        grant_mark: e.grant_mark.clone(),
    };
    (!beyond.policies.is_empty() || !beyond.groups.is_empty() || beyond.username.is_some())
        .then_some(beyond)
}

/// What `entry_beyond` found, in words for the audit and the log.
pub fn describe_beyond(e: &RawEntry) -> String {
    let mut parts: Vec<String> = e.policies.iter().map(Association::short).collect();
    if !e.groups.is_empty() {
        parts.push(format!("kubernetes groups {}", e.groups.join(",")));
    }
    if let Some(u) = &e.username {
        parts.push(format!("username {u}"));
    }
    parts.join(", ")
}

/// The request a binding is named after, when that request of `cluster`
/// recorded creating it there: the binding is Tollgate's by name and row,
/// whatever its labels say.
pub fn binding_record<'a>(
    records: &'a [GrantRecord],
    cluster: &str,
    b: &RawBinding,
) -> Option<&'a GrantRecord> {
    let id = super::grant::binding_grant(&b.name)?;
    records.iter().find(|r| {
        r.id == id.as_str()
            && r.cluster == cluster
            && r.records(&Intent::Binding {
                namespace: b.namespace.clone(),
                name: b.name.clone(),
            })
    })
}

/// How a binding of `r`'s differs from what its grant was approved as —
/// its ClusterRole, bound to its user alone — in words; `None` when it
/// binds exactly that.
pub fn binding_differs(r: &GrantRecord, b: &RawBinding) -> Option<String> {
    let spec = r.access.as_ref()?;
    let mut out = Vec::new();
    if b.role_kind != "ClusterRole" || spec.cluster_role.as_deref() != Some(b.role_name.as_str()) {
        out.push(format!(
            "binds {} {} where its grant recorded ClusterRole {}",
            b.role_kind,
            b.role_name,
            spec.cluster_role.as_deref().unwrap_or("none")
        ));
    }
    let expected: Vec<(String, String)> = spec
        .k8s_user
        .iter()
        .map(|u| ("User".to_string(), u.clone()))
        .collect();
    if b.subjects != expected {
        let have: Vec<String> = b.subjects.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push(format!(
            "binds {} where its grant recorded {}",
            if have.is_empty() {
                "no subject".to_string()
            } else {
                have.join(", ")
            },
            spec.k8s_user
                .as_deref()
                .map(|u| format!("User {u}"))
                .unwrap_or_else(|| "no user".into())
        ));
    }
    (!out.is_empty()).then(|| out.join("; "))
}

/// Spec 9.2 and 12: whether a binding is Tollgate's. It is judged by its
/// name, whatever its labels say: the request it is named after must be a
/// grant of this cluster Tollgate still answers for, whose row recorded
/// this binding, and the binding must still bind exactly what that grant
/// was approved as — its ClusterRole, to its user alone. A binding whose
/// role or subjects were changed, or that outlived its grant, is standing
/// access.
pub fn binding_created_by_tollgate(records: &[GrantRecord], cluster: &str, b: &RawBinding) -> bool {
    binding_record(records, cluster, b)
        .is_some_and(|r| r.holds_access && binding_differs(r, b).is_none())
}

/// Node identities in aws-auth: a `system:node:` username with no group
/// beyond what nodes need. A "node" mapping that also grants, say,
/// `system:masters` is listed.
fn is_node_mapping(m: &RawMapping) -> bool {
    const NODE_GROUPS: [&str; 3] = [
        "system:bootstrappers",
        "system:nodes",
        "system:node-proxier",
    ];
    m.username
        .as_deref()
        .is_some_and(|u| u.starts_with("system:node:"))
        && m.groups.iter().all(|g| NODE_GROUPS.contains(&g.as_str()))
}

/// A `system:` subject of a binding Kubernetes or EKS set up for itself
/// (labelled `kubernetes.io/bootstrapping=rbac-defaults`, or named
/// `system:…` / `eks:…`). The same subject in a binding someone else made
/// (cluster-admin for `system:authenticated`, say) is listed.
fn is_platform_subject(b: &RawBinding, subject: &str) -> bool {
    subject.starts_with("system:")
        && (b
            .labels
            .get("kubernetes.io/bootstrapping")
            .map(String::as_str)
            == Some("rbac-defaults")
            || b.name.starts_with("system:")
            || b.name.starts_with("eks:"))
}

/// One way into a cluster that does not go through Tollgate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StandingGrant {
    pub cluster: String,
    pub level: Level,
    /// `access-entry`, `aws-auth`, `ClusterRoleBinding` or `RoleBinding`.
    pub source: &'static str,
    /// IAM principal ARN, or the Kubernetes user or group name.
    pub principal: String,
    /// Entry type (`STANDARD`, `EC2_LINUX`, …), aws-auth list (`mapRoles`,
    /// `mapUsers`), or subject kind (`User`, `Group`).
    #[serde(rename = "type")]
    pub kind: String,
    pub username: Option<String>,
    pub groups: Vec<String>,
    pub policies: Vec<Association>,
    pub binding: Option<String>,
    pub namespace: Option<String>,
    pub cluster_role: Option<String>,
}

impl StandingGrant {
    /// One line of `tollgate discover`, the principal padded to
    /// `principal_width` so the details line up. Every field is read from
    /// a cluster, where anyone who can edit aws-auth or a binding writes
    /// what they like: each is passed through `terminal_safe`.
    pub fn text_line(&self, principal_width: usize) -> String {
        let mut details = vec![format!("type={}", self.kind)];
        if let Some(u) = &self.username {
            details.push(format!("username={u}"));
        }
        if !self.groups.is_empty() {
            details.push(format!("groups={}", self.groups.join(",")));
        }
        if !self.policies.is_empty() {
            let p: Vec<String> = self.policies.iter().map(Association::short).collect();
            details.push(format!("policies={}", p.join(",")));
        }
        if let Some(b) = &self.binding {
            match &self.namespace {
                Some(ns) => details.push(format!("binding={ns}/{b}")),
                None => details.push(format!("binding={b}")),
            }
        }
        if let Some(r) = &self.cluster_role {
            details.push(format!("clusterrole={r}"));
        }
        format!(
            "{:<13} {:<16} {:<18} {:<principal_width$}  {}",
            self.level.label(),
            terminal_safe(&self.cluster),
            self.source,
            terminal_safe(&self.principal),
            terminal_safe(&details.join(" "))
        )
    }
}

/// The standing grants of one cluster reading, Tollgate's own and the
/// platform's left out, sorted by level.
pub fn classify(
    cluster: &str,
    reading: &ClusterReading,
    records: &[GrantRecord],
) -> Vec<StandingGrant> {
    let mut out = Vec::new();
    for e in &reading.entries {
        // Tollgate's own part of an entry is left out; anything more on it
        // is listed, whatever its mark says.
        let Some(e) = entry_beyond(records, cluster, e) else {
            continue;
        };
        let e = &e;
        let level = e
            .policies
            .iter()
            .map(|p| policy_level(&p.policy))
            .chain(groups_level(&e.groups))
            .min()
            .unwrap_or(Level::Custom);
        out.push(StandingGrant {
            cluster: cluster.to_string(),
            level,
            source: "access-entry",
            principal: e.principal.clone(),
            kind: e.kind.clone(),
            username: e.username.clone(),
            groups: e.groups.clone(),
            policies: e.policies.clone(),
            binding: None,
            namespace: None,
            cluster_role: None,
        });
    }
    for m in &reading.mappings {
        if is_node_mapping(m) {
            continue;
        }
        if let Some(user) = m.username.as_deref() {
            if super::identity::is_grant_username(user)
                && mapping_created_by_tollgate(records, cluster, &m.arn, user)
            {
                continue;
            }
        }
        out.push(StandingGrant {
            cluster: cluster.to_string(),
            level: groups_level(&m.groups).unwrap_or(Level::Custom),
            source: "aws-auth",
            principal: m.arn.clone(),
            kind: m.list.clone(),
            username: m.username.clone(),
            groups: m.groups.clone(),
            policies: Vec::new(),
            binding: None,
            namespace: None,
            cluster_role: None,
        });
    }
    for b in &reading.bindings {
        if b.role_kind != "ClusterRole" || binding_created_by_tollgate(records, cluster, b) {
            continue;
        }
        for (kind, name) in &b.subjects {
            if !matches!(kind.as_str(), "User" | "Group") || is_platform_subject(b, name) {
                continue;
            }
            out.push(StandingGrant {
                cluster: cluster.to_string(),
                level: cluster_role_level(&b.role_name),
                source: if b.namespace.is_some() {
                    "RoleBinding"
                } else {
                    "ClusterRoleBinding"
                },
                principal: name.clone(),
                kind: kind.clone(),
                username: None,
                groups: Vec::new(),
                policies: Vec::new(),
                binding: Some(b.name.clone()),
                namespace: b.namespace.clone(),
                cluster_role: Some(b.role_name.clone()),
            });
        }
    }
    sort(&mut out);
    out
}

/// By level (most powerful first), then cluster, source, principal.
pub fn sort(grants: &mut [StandingGrant]) {
    grants.sort_by(|a, b| {
        (
            a.level,
            &a.cluster,
            a.source,
            &a.principal,
            &a.namespace,
            &a.binding,
        )
            .cmp(&(
                b.level,
                &b.cluster,
                b.source,
                &b.principal,
                &b.namespace,
                &b.binding,
            ))
    });
}

/// Standing grants per level, every level present (zeros included, so a
/// gauge falls to 0 rather than keeping its last value).
pub fn summary(grants: &[StandingGrant]) -> BTreeMap<Level, u64> {
    let mut out: BTreeMap<Level, u64> = Level::ALL.iter().map(|l| (*l, 0)).collect();
    for g in grants {
        *out.entry(g.level).or_default() += 1;
    }
    out
}

/// What discovery found on one cluster: its standing grants, or why it
/// could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStanding {
    pub cluster: String,
    pub result: Result<Vec<StandingGrant>, String>,
}

/// `prod-cluster: 3 standing (cluster-admin 1, admin 0, edit 1, view 0, custom 1)`
pub fn summary_line(c: &ClusterStanding) -> String {
    match &c.result {
        Ok(grants) => {
            let counts: Vec<String> = summary(grants)
                .iter()
                .map(|(l, n)| format!("{} {n}", l.label()))
                .collect();
            format!(
                "{}: {} standing ({})",
                terminal_safe(&c.cluster),
                grants.len(),
                counts.join(", ")
            )
        }
        Err(e) => format!(
            "{}: cannot be read: {}",
            terminal_safe(&c.cluster),
            terminal_safe(&e.to_string())
        ),
    }
}

/// The JSON object of a cluster's summary line (`--json`).
pub fn summary_json(c: &ClusterStanding) -> serde_json::Value {
    match &c.result {
        Ok(grants) => {
            let counts: serde_json::Map<String, serde_json::Value> = summary(grants)
                .iter()
                .map(|(l, n)| (l.label().to_string(), (*n).into()))
                .collect();
            serde_json::json!({"cluster": c.cluster, "total": grants.len(), "summary": counts})
        }
        Err(e) => serde_json::json!({"cluster": c.cluster, "error": e}),
    }
}

/// The last Monday 09:00 UTC at or before `now`: the weekly digest's
/// boundary.
pub fn week_boundary(now: OffsetDateTime) -> OffsetDateTime {
    let now = now.to_offset(time::UtcOffset::UTC);
    let days_since_monday = i64::from(now.weekday().number_days_from_monday());
    let monday = (now - Duration::days(days_since_monday))
        .replace_time(Time::from_hms(9, 0, 0).unwrap_or(Time::MIDNIGHT));
    debug_assert_eq!(monday.weekday(), Weekday::Monday);
    if monday > now {
        monday - Duration::weeks(1)
    } else {
        monday
    }
}

/// The boundary passed in `(previous, now]`, if one was: the digest is
/// posted once per boundary, by the first pass after it.
pub fn boundary_crossed(previous: OffsetDateTime, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let b = week_boundary(now);
    (previous < b && b <= now).then_some(b)
}

/// The weekly digest for the security channel; every name escaped.
pub fn digest_text(clusters: &[ClusterStanding], week_of: OffsetDateTime) -> String {
    let mut text = format!(
        "*Standing access* — who can reach each cluster without Tollgate (week of {}):",
        week_of.date()
    );
    for c in clusters {
        text.push_str("\n• ");
        text.push_str(&escape_slack(&summary_line(c)));
    }
    text.push_str(
        "\nRun `tollgate discover` for the list; move each standing admin to a Tollgate role.",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn entry(principal: &str, kind: &str, policies: &[(&str, &[&str])]) -> RawEntry {
        RawEntry {
            principal: principal.into(),
            kind: kind.into(),
            username: None,
            groups: Vec::new(),
            policies: policies
                .iter()
                .map(|(p, ns)| Association {
                    policy: format!("arn:aws:eks::aws:cluster-access-policy/{p}"),
                    scope: if ns.is_empty() {
                        "cluster"
                    } else {
                        "namespace"
                    }
                    .into(),
                    namespaces: ns.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            grant_mark: None,
        }
    }

    fn binding(name: &str, ns: Option<&str>, role: &str, subjects: &[(&str, &str)]) -> RawBinding {
        RawBinding {
            name: name.into(),
            namespace: ns.map(str::to_string),
            role_kind: "ClusterRole".into(),
            role_name: role.into(),
            subjects: subjects
                .iter()
                .map(|(k, n)| (k.to_string(), n.to_string()))
                .collect(),
            labels: BTreeMap::new(),
            grant_mark: None,
        }
    }

    fn record(id: &str, cluster: &str, principal: &str, user: Option<&str>) -> GrantRecord {
        let access = AccessSpec {
            cluster: cluster.into(),
            role: "r".into(),
            principal: principal.into(),
            policy_arn: None,
            namespaces: Vec::new(),
            cluster_role: None,
            groups: Vec::new(),
            k8s_user: user.map(str::to_string),
            strategy: None,
        };
        GrantRecord {
            id: id.into(),
            cluster: cluster.into(),
            principal: principal.into(),
            k8s_user: user.map(str::to_string),
            intents: Vec::new(),
            activated: true,
            holds_access: true,
            access: Some(access),
        }
    }

    /// An access-entry grant of `policy` over `ns`, with what it recorded.
    fn entry_record(
        id: &str,
        cluster: &str,
        principal: &str,
        policy: &str,
        ns: &[&str],
    ) -> GrantRecord {
        let mut r = record(id, cluster, principal, None);
        let spec = r.access.as_mut().unwrap();
        spec.policy_arn = Some(format!("arn:aws:eks::aws:cluster-access-policy/{policy}"));
        spec.namespaces = ns.iter().map(|s| s.to_string()).collect();
        r.intents = crate::domain::grant::intents_for(
            crate::domain::policy::Strategy::AccessEntry,
            id,
            spec,
        );
        r
    }

    /// A session-rbac grant of `role` over `ns`, with what it recorded.
    fn binding_record(id: &str, cluster: &str, user: &str, role: &str, ns: &[&str]) -> GrantRecord {
        let mut r = record(id, cluster, user, Some(user));
        let spec = r.access.as_mut().unwrap();
        spec.cluster_role = Some(role.into());
        spec.namespaces = ns.iter().map(|s| s.to_string()).collect();
        r.intents = crate::domain::grant::intents_for(
            crate::domain::policy::Strategy::SessionRbac,
            id,
            spec,
        );
        r
    }

    #[test]
    fn levels_follow_policies_roles_and_masters() {
        assert_eq!(
            policy_level("AmazonEKSClusterAdminPolicy"),
            Level::ClusterAdmin
        );
        assert_eq!(
            policy_level("arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy"),
            Level::Edit
        );
        assert_eq!(
            policy_level("arn:aws:eks::aws:cluster-access-policy/AmazonEKSAdminViewPolicy"),
            Level::Custom
        );
        assert_eq!(cluster_role_level("view"), Level::View);
        assert_eq!(cluster_role_level("cluster-admin"), Level::ClusterAdmin);
        assert_eq!(cluster_role_level("my-ops"), Level::Custom);
        let mut e = entry(
            "arn:aws:iam::1:role/x",
            "STANDARD",
            &[("AmazonEKSViewPolicy", &[])],
        );
        e.groups = vec!["system:masters".into()];
        let out = classify(
            "c",
            &ClusterReading {
                entries: vec![e],
                ..Default::default()
            },
            &[],
        );
        assert_eq!(
            out[0].level,
            Level::ClusterAdmin,
            "system:masters outranks view"
        );
    }

    #[test]
    fn lists_every_entry_but_tollgates_own_sorted_by_level() {
        let mut tollgate = entry(
            "arn:aws:iam::1:role/alice",
            "STANDARD",
            &[("AmazonEKSViewPolicy", &[])],
        );
        tollgate.grant_mark = Some("R-AAAAA".into());
        let reading = ClusterReading {
            entries: vec![
                entry("arn:aws:iam::1:role/node", "EC2_LINUX", &[]),
                entry(
                    "arn:aws:iam::1:role/dev",
                    "STANDARD",
                    &[("AmazonEKSEditPolicy", &["payments"])],
                ),
                entry(
                    "arn:aws:iam::1:role/admin",
                    "STANDARD",
                    &[("AmazonEKSClusterAdminPolicy", &[])],
                ),
                tollgate,
            ],
            ..Default::default()
        };
        let records = [entry_record(
            "R-AAAAA",
            "prod",
            "arn:aws:iam::1:role/alice",
            "AmazonEKSViewPolicy",
            &[],
        )];
        let out = classify("prod", &reading, &records);
        let got: Vec<(&str, Level)> = out
            .iter()
            .map(|g| (g.principal.as_str(), g.level))
            .collect();
        assert_eq!(
            got,
            [
                ("arn:aws:iam::1:role/admin", Level::ClusterAdmin),
                ("arn:aws:iam::1:role/dev", Level::Edit),
                ("arn:aws:iam::1:role/node", Level::Custom),
            ]
        );
        assert!(
            out[1]
                .text_line(0)
                .contains("AmazonEKSEditPolicy(namespace: payments)"),
            "{}",
            out[1].text_line(0)
        );
        // Text read from a cluster cannot drive the operator's terminal.
        let mut hostile = out[0].clone();
        hostile.principal = "arn:aws:iam::1:role/x\u{1b}[1A\u{1b}[2K".into();
        hostile.username = Some("ok\rhidden".into());
        hostile.cluster = "prod\u{1b}]0;title\u{7}".into();
        let line = hostile.text_line(0);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\u{1b}[1A"), "{line}");
        let failed = ClusterStanding {
            cluster: "c\u{1b}[31m".into(),
            result: Err("denied\u{1b}[0m".into()),
        };
        assert!(!summary_line(&failed).chars().any(char::is_control));
        let s = summary(&out);
        assert_eq!(
            (
                s[&Level::ClusterAdmin],
                s[&Level::Edit],
                s[&Level::Custom],
                s[&Level::View]
            ),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn a_forged_mark_does_not_hide_access() {
        // Tagged as Tollgate's, but the store's request is for someone
        // else, on another cluster, or does not exist.
        let mut forged = entry(
            "arn:aws:iam::1:role/mallory",
            "STANDARD",
            &[("AmazonEKSClusterAdminPolicy", &[])],
        );
        forged.grant_mark = Some("R-AAAAA".into());
        let reading = ClusterReading {
            entries: vec![forged],
            ..Default::default()
        };
        for records in [
            vec![],
            vec![entry_record(
                "R-AAAAA",
                "prod",
                "arn:aws:iam::1:role/alice",
                "AmazonEKSClusterAdminPolicy",
                &[],
            )],
            vec![entry_record(
                "R-AAAAA",
                "staging",
                "arn:aws:iam::1:role/mallory",
                "AmazonEKSClusterAdminPolicy",
                &[],
            )],
        ] {
            let out = classify("prod", &reading, &records);
            assert_eq!(out.len(), 1, "{records:?}");
            assert_eq!(out[0].level, Level::ClusterAdmin);
        }
    }

    #[test]
    fn kubernetes_platform_subjects_and_tollgate_bindings_are_left_out() {
        let mut defaults = binding(
            "cluster-admin",
            None,
            "cluster-admin",
            &[("Group", "system:masters")],
        );
        defaults
            .labels
            .insert("kubernetes.io/bootstrapping".into(), "rbac-defaults".into());
        let mut ours = binding(
            "tollgate-r-bbbbb",
            Some("payments"),
            "edit",
            &[("User", "tollgate:bob@example.com")],
        );
        ours.grant_mark = Some("R-BBBBB".into());
        let mut forged = binding(
            "tollgate-r-ccccc",
            None,
            "cluster-admin",
            &[("User", "mallory")],
        );
        forged.grant_mark = Some("R-CCCCC".into());
        let reading = ClusterReading {
            bindings: vec![
                defaults,
                binding(
                    "system:node-proxier",
                    None,
                    "system:node-proxier",
                    &[("User", "system:kube-proxy")],
                ),
                binding(
                    "ops-admins",
                    None,
                    "cluster-admin",
                    &[("Group", "ops"), ("ServiceAccount", "ci")],
                ),
                binding("carol-view", None, "view", &[("User", "carol")]),
                binding(
                    "everyone-admin",
                    None,
                    "cluster-admin",
                    &[("Group", "system:authenticated")],
                ),
                ours,
                forged,
                RawBinding {
                    role_kind: "Role".into(),
                    ..binding("ns-role", Some("a"), "x", &[("User", "dave")])
                },
            ],
            mappings: vec![
                RawMapping {
                    list: "mapRoles".into(),
                    arn: "arn:aws:iam::1:role/node".into(),
                    username: Some("system:node:{{EC2PrivateDNSName}}".into()),
                    groups: vec!["system:bootstrappers".into(), "system:nodes".into()],
                },
                RawMapping {
                    list: "mapRoles".into(),
                    arn: "arn:aws:iam::1:role/node-or-not".into(),
                    username: Some("system:node:{{EC2PrivateDNSName}}".into()),
                    groups: vec!["system:nodes".into(), "system:masters".into()],
                },
                RawMapping {
                    list: "mapRoles".into(),
                    arn: "arn:aws:iam::1:role/Admin".into(),
                    username: Some("admin".into()),
                    groups: vec!["system:masters".into()],
                },
                RawMapping {
                    list: "mapRoles".into(),
                    arn: "arn:aws:iam::1:role/erin".into(),
                    username: Some("tollgate:erin@example.com".into()),
                    groups: vec!["tollgate-debug".into()],
                },
            ],
            ..Default::default()
        };
        let records = [
            binding_record(
                "R-BBBBB",
                "dev",
                "tollgate:bob@example.com",
                "edit",
                &["payments"],
            ),
            record(
                "R-DDDDD",
                "dev",
                "arn:aws:iam::1:role/sso/erin",
                Some("tollgate:erin@example.com"),
            ),
        ];
        let out = classify("dev", &reading, &records);
        let got: Vec<(&str, &str, Level)> = out
            .iter()
            .map(|g| (g.source, g.principal.as_str(), g.level))
            .collect();
        assert_eq!(
            got,
            [
                ("ClusterRoleBinding", "mallory", Level::ClusterAdmin),
                ("ClusterRoleBinding", "ops", Level::ClusterAdmin),
                (
                    "ClusterRoleBinding",
                    "system:authenticated",
                    Level::ClusterAdmin
                ),
                ("aws-auth", "arn:aws:iam::1:role/Admin", Level::ClusterAdmin),
                (
                    "aws-auth",
                    "arn:aws:iam::1:role/node-or-not",
                    Level::ClusterAdmin
                ),
                ("ClusterRoleBinding", "carol", Level::View),
            ]
        );
    }

    /// Issue 21: a mark naming a request of this store hides nothing that
    /// request did not create and does not still need.
    #[test]
    fn a_marked_entry_shows_whatever_its_request_did_not_make() {
        const MALLORY: &str = "arn:aws:iam::1:role/mallory";
        let mut marked = entry(MALLORY, "STANDARD", &[("AmazonEKSClusterAdminPolicy", &[])]);
        marked.grant_mark = Some("R-AAAAA".into());
        let listed = |records: &[GrantRecord], e: &RawEntry| {
            classify(
                "prod",
                &ClusterReading {
                    entries: vec![e.clone()],
                    ..Default::default()
                },
                records,
            )
        };
        // A denied request: it never recorded anything, whatever its
        // principal and cluster.
        let mut denied = record("R-AAAAA", "prod", MALLORY, None);
        denied.activated = false;
        denied.holds_access = false;
        let out = listed(&[denied], &marked);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].level, Level::ClusterAdmin);
        // A view grant that recorded the entry, ended: its entry is
        // Tollgate's, the ClusterAdmin association is not.
        let mut ended = entry_record("R-AAAAA", "prod", MALLORY, "AmazonEKSViewPolicy", &[]);
        ended.holds_access = false;
        let out = listed(&[ended.clone()], &marked);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].level, Level::ClusterAdmin);
        assert_eq!(out[0].policies.len(), 1);
        // The same grant in force: its view association is Tollgate's,
        // ClusterAdmin beside it is still listed, alone.
        let mut active = ended.clone();
        active.holds_access = true;
        let mut both = marked.clone();
        both.policies
            .extend(entry(MALLORY, "STANDARD", &[("AmazonEKSViewPolicy", &[])]).policies);
        let out = listed(&[active.clone()], &both);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]
                .policies
                .iter()
                .map(|p| p.policy.as_str())
                .collect::<Vec<_>>(),
            ["arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"]
        );
        // Just what the grant needs: nothing to list.
        let view = entry(MALLORY, "STANDARD", &[("AmazonEKSViewPolicy", &[])]);
        let view = RawEntry {
            grant_mark: Some("R-AAAAA".into()),
            ..view
        };
        assert!(listed(&[active.clone()], &view).is_empty());
        assert!(entry_beyond(&[active.clone()], "prod", &view).is_none());
        // A wider scope than the grant needs, groups, a user name: listed.
        let scoped = entry_record("R-AAAAA", "prod", MALLORY, "AmazonEKSViewPolicy", &["a"]);
        let out = listed(std::slice::from_ref(&scoped), &view);
        assert_eq!(out.len(), 1, "cluster-wide view for a grant of namespace a");
        let narrow = RawEntry {
            policies: entry(MALLORY, "STANDARD", &[("AmazonEKSViewPolicy", &["a"])]).policies,
            ..view.clone()
        };
        assert!(listed(&[scoped], &narrow).is_empty());
        let grouped = RawEntry {
            groups: vec!["system:masters".into()],
            ..view.clone()
        };
        let out = listed(&[active.clone()], &grouped);
        assert_eq!((out.len(), out[0].level), (1, Level::ClusterAdmin));
        assert!(
            out[0].policies.is_empty(),
            "the grant's own view is not listed"
        );
        let named = RawEntry {
            username: Some("admin".into()),
            ..view.clone()
        };
        let beyond = entry_beyond(&[active.clone()], "prod", &named).unwrap();
        assert_eq!(describe_beyond(&beyond), "username admin");
        let defaulted = RawEntry {
            username: eks_default_username(MALLORY),
            ..view.clone()
        };
        assert!(entry_beyond(&[active.clone()], "prod", &defaulted).is_none());
        // A grant for another principal, another cluster's, or one that
        // never recorded an association accounts for nothing.
        let mut alice = active.clone();
        alice.access.as_mut().unwrap().principal = "arn:aws:iam::1:role/alice".into();
        assert!(entry_beyond(&[active.clone(), alice], "prod", &view).is_none());
        let mut entry_only = active.clone();
        entry_only
            .intents
            .retain(|i| matches!(i, Intent::AccessEntry { .. }));
        assert!(entry_beyond(&[entry_only], "prod", &view).is_some());
        assert!(entry_beyond(&[active], "staging", &view).is_some());
    }

    /// Issue 21: a binding named after a grant is judged by what that
    /// grant's row recorded, whatever its labels or subjects say.
    #[test]
    fn a_binding_is_tollgates_only_as_its_row_recorded_it() {
        const BOB: &str = "tollgate:bob@example.com";
        let rec = binding_record("R-BBBBB", "dev", BOB, "edit", &["payments"]);
        let ours = binding(
            "tollgate-r-bbbbb",
            Some("payments"),
            "edit",
            &[("User", BOB)],
        );
        assert!(binding_created_by_tollgate(
            std::slice::from_ref(&rec),
            "dev",
            &ours
        ));
        let out = |b: &RawBinding, records: &[GrantRecord]| {
            classify(
                "dev",
                &ClusterReading {
                    bindings: vec![b.clone()],
                    ..Default::default()
                },
                records,
            )
        };
        assert!(out(&ours, std::slice::from_ref(&rec)).is_empty());
        let widened = RawBinding {
            role_name: "cluster-admin".into(),
            ..ours.clone()
        };
        assert_eq!(
            out(&widened, std::slice::from_ref(&rec))[0].level,
            Level::ClusterAdmin
        );
        let swapped = binding(
            "tollgate-r-bbbbb",
            Some("payments"),
            "edit",
            &[("User", "mallory")],
        );
        assert_eq!(
            out(&swapped, std::slice::from_ref(&rec))[0].principal,
            "mallory"
        );
        let added = binding(
            "tollgate-r-bbbbb",
            Some("payments"),
            "edit",
            &[("User", BOB), ("Group", "ops")],
        );
        assert_eq!(out(&added, std::slice::from_ref(&rec)).len(), 2);
        let elsewhere = binding(
            "tollgate-r-bbbbb",
            Some("kube-system"),
            "edit",
            &[("User", BOB)],
        );
        assert_eq!(out(&elsewhere, std::slice::from_ref(&rec)).len(), 1);
        let mut ended = rec.clone();
        ended.holds_access = false;
        assert_eq!(out(&ours, &[ended]).len(), 1, "outlived its grant");
        let mut denied = record("R-BBBBB", "dev", BOB, Some(BOB));
        denied.activated = false;
        assert_eq!(out(&ours, &[denied]).len(), 1);
        // What the reconciler reports of a binding its store did create.
        assert_eq!(binding_differs(&rec, &ours), None);
        let why = binding_differs(&rec, &swapped).unwrap();
        assert!(why.contains("User mallory") && why.contains(BOB), "{why}");
        let why = binding_differs(&rec, &widened).unwrap();
        assert!(why.contains("cluster-admin"), "{why}");
    }

    #[test]
    fn week_boundary_is_monday_nine_utc() {
        assert_eq!(
            week_boundary(datetime!(2026-11-23 09:00 UTC)),
            datetime!(2026-11-23 09:00 UTC)
        );
        assert_eq!(
            week_boundary(datetime!(2026-11-23 08:59 UTC)),
            datetime!(2026-11-16 09:00 UTC)
        );
        assert_eq!(
            week_boundary(datetime!(2026-11-29 23:00 UTC)),
            datetime!(2026-11-23 09:00 UTC)
        );
        assert_eq!(
            week_boundary(datetime!(2026-11-24 01:00 +02:00)),
            datetime!(2026-11-23 09:00 UTC)
        );
        assert_eq!(
            boundary_crossed(
                datetime!(2026-11-23 08:55 UTC),
                datetime!(2026-11-23 09:00 UTC)
            ),
            Some(datetime!(2026-11-23 09:00 UTC))
        );
        assert_eq!(
            boundary_crossed(
                datetime!(2026-11-23 09:00 UTC),
                datetime!(2026-11-23 09:05 UTC)
            ),
            None
        );
        assert_eq!(
            boundary_crossed(
                datetime!(2026-11-25 10:00 UTC),
                datetime!(2026-11-26 10:00 UTC)
            ),
            None
        );
    }

    #[test]
    fn digest_escapes_names() {
        let c = ClusterStanding {
            cluster: "<!channel>".into(),
            result: Err("x <https://evil|y>".into()),
        };
        let text = digest_text(&[c], datetime!(2026-11-23 09:00 UTC));
        assert!(
            !text.contains("<!channel>") && !text.contains("<https"),
            "{text}"
        );
        assert!(text.contains("&lt;!channel&gt;"), "{text}");
    }
}
