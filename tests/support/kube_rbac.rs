//! RBAC for the Kubernetes stand-in: what Tollgate's own identity may do,
//! read from the ClusterRoles/Roles and their bindings that the project ships
//! in `manifests/`, evaluated the way kube-apiserver's RBAC authorizer does
//! (rules are additive; a rule matches when its apiGroups, resources, verbs
//! and, if present, resourceNames all match; `*` matches anything).
//!
//! Tollgate authenticates as a member of the group `tollgate:controller`
//! (docs/strategies.md); only bindings naming that group count.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The group Tollgate's IAM role is mapped to on every cluster.
pub const TOLLGATE_GROUP: &str = "tollgate:controller";
/// The user name a cluster maps Tollgate's role to (`tollgate:{{SessionNameRaw}}`
/// with the session name the SDK picks); only used in messages.
pub const TOLLGATE_USER: &str = "tollgate:tollgate";

/// The shipped manifests that give Tollgate its Kubernetes rights.
pub const RBAC_MANIFESTS: [&str; 2] = ["rbac-session-rbac.yaml", "rbac-aws-auth.yaml"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

/// Rules granted to Tollgate, cluster-wide (from ClusterRoleBindings) or in
/// one namespace (from RoleBindings).
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    pub cluster: Vec<Rule>,
    pub namespaced: Vec<(String, Vec<Rule>)>,
}

/// What one request asks to do, as the authorizer sees it.
#[derive(Clone, Debug)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    /// Empty for cluster-scoped requests and all-namespace lists.
    pub namespace: String,
    /// Empty for collections.
    pub name: String,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn rules_of(role: &Value) -> Vec<Rule> {
    role["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| Rule {
                    api_groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                    resource_names: strings(&r["resourceNames"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn binds_tollgate(binding: &Value) -> bool {
    binding["subjects"].as_array().is_some_and(|subjects| {
        subjects
            .iter()
            .any(|s| s["kind"] == "Group" && s["name"] == TOLLGATE_GROUP)
    })
}

/// The repository's `manifests/` directory.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// The YAML of the shipped RBAC manifests, concatenated.
pub fn shipped_yaml() -> String {
    RBAC_MANIFESTS
        .iter()
        .map(|file| {
            let path = manifests_dir().join(file);
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

impl Rbac {
    /// Tollgate's rights from the shipped manifests.
    pub fn shipped() -> Rbac {
        Rbac::from_yaml(&shipped_yaml())
    }

    /// Tollgate's rights from multi-document YAML holding (Cluster)Roles and
    /// (Cluster)RoleBindings. A binding to a role the YAML does not define
    /// grants nothing, as on a cluster where the role was never applied.
    pub fn from_yaml(yaml: &str) -> Rbac {
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("RBAC manifest is valid YAML"))
            .filter(|v: &Value| !v.is_null())
            .collect();
        let find = |kind: &str, name: &str, ns: Option<&str>| {
            docs.iter()
                .find(|d| {
                    d["kind"] == kind
                        && d["metadata"]["name"] == name
                        && ns.is_none_or(|ns| d["metadata"]["namespace"] == ns)
                })
                .map(rules_of)
                .unwrap_or_default()
        };
        let mut rbac = Rbac::default();
        for doc in docs.iter().filter(|d| binds_tollgate(d)) {
            let role = doc["roleRef"]["name"].as_str().unwrap_or_default();
            let role_kind = doc["roleRef"]["kind"].as_str().unwrap_or_default();
            match doc["kind"].as_str() {
                Some("ClusterRoleBinding") if role_kind == "ClusterRole" => {
                    rbac.cluster.extend(find("ClusterRole", role, None));
                }
                Some("RoleBinding") => {
                    let ns = doc["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string();
                    let rules = match role_kind {
                        "ClusterRole" => find("ClusterRole", role, None),
                        _ => find("Role", role, Some(&ns)),
                    };
                    rbac.namespaced.push((ns, rules));
                }
                _ => {}
            }
        }
        rbac
    }

    /// Whether Tollgate may do `attrs`.
    pub fn allows(&self, attrs: &Attributes) -> bool {
        let matches = |rules: &[Rule]| rules.iter().any(|r| rule_matches(r, attrs));
        matches(&self.cluster)
            || (!attrs.namespace.is_empty()
                && self
                    .namespaced
                    .iter()
                    .any(|(ns, rules)| *ns == attrs.namespace && matches(rules)))
    }
}

fn has(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn rule_matches(rule: &Rule, attrs: &Attributes) -> bool {
    has(&rule.verbs, &attrs.verb)
        && has(&rule.api_groups, &attrs.group)
        && has(&rule.resources, &attrs.resource)
        && (rule.resource_names.is_empty()
            || (!attrs.name.is_empty() && rule.resource_names.contains(&attrs.name)))
}

/// kube-apiserver's 403 for a request RBAC refused.
pub fn forbidden_body(attrs: &Attributes) -> Value {
    let qualified = if attrs.group.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}.{}", attrs.resource, attrs.group)
    };
    let subject = if attrs.name.is_empty() {
        qualified.clone()
    } else {
        format!("{qualified} \"{}\"", attrs.name)
    };
    let scope = if attrs.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", attrs.namespace)
    };
    let mut details = json!({"kind": attrs.resource});
    if !attrs.name.is_empty() {
        details["name"] = json!(attrs.name);
    }
    if !attrs.group.is_empty() {
        details["group"] = json!(attrs.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "{subject} is forbidden: User \"{TOLLGATE_USER}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            attrs.verb, attrs.resource, attrs.group
        ),
        "reason": "Forbidden",
        "details": details,
        "code": 403,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn rules_match_like_the_rbac_authorizer() {
        let rbac = Rbac::from_yaml(
            "kind: ClusterRole\nmetadata: {name: c}\nrules:\n- apiGroups: [g]\n  resources: [r]\n  verbs: [get]\n- apiGroups: [g]\n  resources: [x]\n  verbs: [bind]\n  resourceNames: [view]\n---\nkind: ClusterRoleBinding\nmetadata: {name: c}\nroleRef: {kind: ClusterRole, name: c}\nsubjects: [{kind: Group, name: 'tollgate:controller'}]\n---\nkind: Role\nmetadata: {name: n, namespace: kube-system}\nrules:\n- apiGroups: ['']\n  resources: [configmaps]\n  verbs: ['*']\n---\nkind: RoleBinding\nmetadata: {name: n, namespace: kube-system}\nroleRef: {kind: Role, name: n}\nsubjects: [{kind: Group, name: 'tollgate:controller'}]\n---\nkind: ClusterRoleBinding\nmetadata: {name: other}\nroleRef: {kind: ClusterRole, name: c}\nsubjects: [{kind: Group, name: someone-else}]\n",
        );
        assert!(rbac.allows(&attrs("get", "g", "r", "", "any")));
        assert!(rbac.allows(&attrs("get", "g", "r", "ns", "")));
        assert!(!rbac.allows(&attrs("list", "g", "r", "", "")));
        assert!(rbac.allows(&attrs("bind", "g", "x", "", "view")));
        assert!(!rbac.allows(&attrs("bind", "g", "x", "", "admin")));
        assert!(!rbac.allows(&attrs("bind", "g", "x", "", "")));
        assert!(rbac.allows(&attrs("update", "", "configmaps", "kube-system", "a")));
        assert!(!rbac.allows(&attrs("update", "", "configmaps", "default", "a")));
        assert!(!rbac.allows(&attrs("update", "", "configmaps", "", "")));
    }
}
