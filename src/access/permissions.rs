//! The Kubernetes permissions each strategy uses, so `tollgate check` can ask
//! the cluster about exactly those (SelfSubjectAccessReview) instead of
//! inferring them from one successful read. Kept next to the strategies:
//! a new API call there needs a line here, and the shipped manifests and the
//! Kubernetes stand-in's RBAC test keep the three in step.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};

use super::aws_auth;
use crate::domain::policy::{ClusterPolicy, Strategy};

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// One verb on one resource, as RBAC names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    /// API group, empty for the core group.
    pub group: &'static str,
    pub resource: &'static str,
    /// None: every namespace (or a cluster-scoped resource).
    pub namespace: Option<&'static str>,
    /// None: every object of the resource.
    pub name: Option<String>,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resource = match self.group {
            "" => self.resource.to_string(),
            g => format!("{}.{g}", self.resource),
        };
        write!(f, "{} {resource}", self.verb)?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        match self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None if self.resource == "clusterrolebindings" || self.resource == "clusterroles" => {
                Ok(())
            }
            None => write!(f, " in all namespaces"),
        }
    }
}

/// What the strategy of `cluster` does on its Kubernetes API; empty for
/// access-entry clusters, which Tollgate changes through the EKS API only.
pub fn required(cluster: &ClusterPolicy) -> Vec<Permission> {
    let any = |verb, group, resource| Permission {
        verb,
        group,
        resource,
        namespace: None,
        name: None,
    };
    match cluster.strategy {
        Strategy::AccessEntry => Vec::new(),
        Strategy::SessionRbac => {
            // Bindings: create, read back on a name clash and after a
            // revoke (verified revocation), list by label
            // in every namespace, replace to move the expiry, delete.
            let mut out: Vec<Permission> = ["rolebindings", "clusterrolebindings"]
                .into_iter()
                .flat_map(|resource| {
                    ["get", "list", "create", "update", "delete"]
                        .into_iter()
                        .map(move |verb| any(verb, RBAC_GROUP, resource))
                })
                .collect();
            // Writing a binding to a ClusterRole needs `bind` on it.
            let mut roles: Vec<&String> = cluster
                .roles
                .values()
                .filter_map(|r| r.cluster_role.as_ref())
                .collect();
            roles.sort();
            roles.dedup();
            out.extend(roles.into_iter().map(|role| Permission {
                name: Some(role.clone()),
                ..any("bind", RBAC_GROUP, "clusterroles")
            }));
            out
        }
        Strategy::AwsAuth => ["get", "update"]
            .into_iter()
            .map(|verb| Permission {
                namespace: Some(aws_auth::NAMESPACE),
                name: Some(aws_auth::NAME.to_string()),
                ..any(verb, "", "configmaps")
            })
            .collect(),
    }
}

/// The review that asks the API server whether Tollgate may do `p`.
pub fn review(p: &Permission) -> SelfSubjectAccessReview {
    SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(p.verb.to_string()),
                group: Some(p.group.to_string()),
                resource: Some(p.resource.to_string()),
                namespace: p.namespace.map(str::to_string),
                name: p.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::RolePolicy;

    fn cluster(strategy: Strategy, roles: &[Option<&str>]) -> ClusterPolicy {
        let mut c = crate::domain::policy::tests::cluster();
        c.strategy = strategy;
        c.roles = roles
            .iter()
            .enumerate()
            .map(|(i, role)| {
                let name = format!("r{i}");
                let policy = RolePolicy {
                    name: name.clone(),
                    cluster_role: role.map(str::to_string),
                    ..c.roles.values().next().cloned().expect("a role")
                };
                (name, policy)
            })
            .collect();
        c
    }

    #[test]
    fn session_rbac_needs_every_binding_verb_and_bind_on_each_configured_role() {
        let c = cluster(
            Strategy::SessionRbac,
            &[Some("view"), Some("edit"), Some("view"), None],
        );
        let lines: Vec<String> = required(&c).iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 12, "{lines:#?}");
        assert!(lines.contains(
            &"update rolebindings.rbac.authorization.k8s.io in all namespaces".to_string()
        ));
        assert!(lines.contains(&"list clusterrolebindings.rbac.authorization.k8s.io".to_string()));
        assert_eq!(
            &lines[10..],
            [
                "bind clusterroles.rbac.authorization.k8s.io \"edit\"",
                "bind clusterroles.rbac.authorization.k8s.io \"view\""
            ]
        );
    }

    #[test]
    fn aws_auth_needs_get_and_update_on_its_configmap_only() {
        let lines: Vec<String> = required(&cluster(Strategy::AwsAuth, &[None]))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "get configmaps \"aws-auth\" in namespace kube-system",
                "update configmaps \"aws-auth\" in namespace kube-system"
            ]
        );
        assert!(required(&cluster(Strategy::AccessEntry, &[None])).is_empty());
    }

    #[test]
    fn the_review_carries_every_attribute() {
        let p = &required(&cluster(Strategy::AwsAuth, &[None]))[1];
        let json = serde_json::to_value(review(p)).unwrap();
        assert_eq!(
            json["spec"]["resourceAttributes"],
            serde_json::json!({"verb": "update", "group": "", "resource": "configmaps", "namespace": "kube-system", "name": "aws-auth"})
        );
    }
}
