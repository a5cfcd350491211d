//! Reads a cluster for standing-access discovery (spec section 12): its
//! access entries with their associations, and, where Tollgate reaches the
//! cluster through Kubernetes, the aws-auth items and every binding to a
//! ClusterRole. Only List/Describe/get calls; what the answers mean is
//! decided in `domain::standing`.

use async_trait::async_trait;
use aws_sdk_eks::error::ProvideErrorMetadata;
use aws_sdk_eks::types::AccessScopeType;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::Api;
use std::sync::Arc;

use super::access_entry::{TAG_GRANT, TAG_MANAGED_BY, TAG_MANAGED_BY_VALUE};
use super::aws::{describe_error, AwsClients};
use super::kube::KubeClients;
use super::session_rbac::{LABEL_GRANT, LABEL_MANAGED_BY, MANAGED_BY};
use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::standing::{Association, ClusterReading, RawBinding, RawEntry, RawMapping};

/// A cluster discovery could not read: which call failed and why, as the
/// operator is shown it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// Reads one cluster.
#[async_trait]
pub trait StandingReader: Send + Sync + 'static {
    async fn read(&self, cluster: &ClusterPolicy) -> Result<ClusterReading, Unreadable>;
}

/// Whether Tollgate talks to this cluster's Kubernetes API, so discovery
/// reads aws-auth and the bindings there too.
pub fn reached_through_kubernetes(cluster: &ClusterPolicy) -> bool {
    cluster.strategy != Strategy::AccessEntry || cluster.endpoint.is_some()
}

pub struct ClusterReader {
    aws: Arc<AwsClients>,
    kube: Arc<KubeClients>,
}

impl ClusterReader {
    pub fn new(aws: Arc<AwsClients>, kube: Arc<KubeClients>) -> Self {
        ClusterReader { aws, kube }
    }

    async fn entries(&self, cluster: &ClusterPolicy) -> Result<Vec<RawEntry>, String> {
        let eks = self.aws.eks(cluster).await;
        let mut principals = Vec::new();
        let mut token = None;
        loop {
            let page = match eks
                .list_access_entries()
                .cluster_name(&cluster.name)
                .set_next_token(token)
                .send()
                .await
            {
                Ok(page) => page,
                // A cluster still in CONFIG_MAP mode has no access entries;
                // where Tollgate reads its aws-auth, that is the whole story.
                Err(e)
                    if e.code() == Some("InvalidRequestException")
                        && reached_through_kubernetes(cluster) =>
                {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(format!("ListAccessEntries: {}", describe_error(&e))),
            };
            principals.extend(page.access_entries().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for principal in principals {
            let described = match eks
                .describe_access_entry()
                .cluster_name(&cluster.name)
                .principal_arn(&principal)
                .send()
                .await
            {
                Ok(d) => d,
                // Deleted between the list and now: nothing standing.
                Err(e) if e.code() == Some("ResourceNotFoundException") => continue,
                Err(e) => return Err(format!("DescribeAccessEntry: {}", describe_error(&e))),
            };
            let Some(entry) = described.access_entry() else {
                continue;
            };
            let tags = entry.tags().cloned().unwrap_or_default();
            let grant_mark = (tags.get(TAG_MANAGED_BY).map(String::as_str)
                == Some(TAG_MANAGED_BY_VALUE))
            .then(|| tags.get(TAG_GRANT).cloned())
            .flatten();
            out.push(RawEntry {
                principal: principal.clone(),
                kind: entry.r#type().unwrap_or("STANDARD").to_string(),
                username: entry
                    .username()
                    .filter(|u| !u.is_empty())
                    .map(str::to_string),
                groups: entry.kubernetes_groups().to_vec(),
                policies: self.associations(&eks, cluster, &principal).await?,
                grant_mark,
            });
        }
        Ok(out)
    }

    async fn associations(
        &self,
        eks: &aws_sdk_eks::Client,
        cluster: &ClusterPolicy,
        principal: &str,
    ) -> Result<Vec<Association>, String> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = match eks
                .list_associated_access_policies()
                .cluster_name(&cluster.name)
                .principal_arn(principal)
                .set_next_token(token)
                .send()
                .await
            {
                Ok(page) => page,
                Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(out),
                Err(e) => {
                    return Err(format!(
                        "ListAssociatedAccessPolicies: {}",
                        describe_error(&e)
                    ))
                }
            };
            for a in page.associated_access_policies() {
                let scope = a.access_scope();
                let namespaced =
                    scope.and_then(|s| s.r#type()) == Some(&AccessScopeType::Namespace);
                out.push(Association {
                    policy: a.policy_arn().unwrap_or_default().to_string(),
                    scope: if namespaced { "namespace" } else { "cluster" }.into(),
                    namespaces: scope.map(|s| s.namespaces().to_vec()).unwrap_or_default(),
                });
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn kubernetes(
        &self,
        cluster: &ClusterPolicy,
        reading: &mut ClusterReading,
    ) -> Result<(), String> {
        let client = self.kube.client(cluster).await.map_err(|e| e.to_string())?;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), super::aws_auth::NAMESPACE);
        match cms.get_opt(super::aws_auth::NAME).await {
            Ok(Some(cm)) => reading.mappings = mappings(&cm.data.unwrap_or_default())?,
            Ok(None) => {}
            Err(e) => return Err(format!("get kube-system/aws-auth: {e}")),
        }
        let all = ListParams::default();
        let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
        for crb in crbs
            .list(&all)
            .await
            .map_err(|e| format!("list ClusterRoleBindings: {e}"))?
        {
            reading.bindings.push(raw_binding(
                &crb.metadata,
                &crb.role_ref,
                crb.subjects.as_deref(),
            ));
        }
        let rbs: Api<RoleBinding> = Api::all(client);
        for rb in rbs
            .list(&all)
            .await
            .map_err(|e| format!("list RoleBindings: {e}"))?
        {
            reading.bindings.push(raw_binding(
                &rb.metadata,
                &rb.role_ref,
                rb.subjects.as_deref(),
            ));
        }
        Ok(())
    }
}

pub(crate) fn raw_binding(
    meta: &ObjectMeta,
    role: &RoleRef,
    subjects: Option<&[Subject]>,
) -> RawBinding {
    let labels = meta.labels.clone().unwrap_or_default();
    let grant_mark = (labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY))
        .then(|| labels.get(LABEL_GRANT).cloned())
        .flatten();
    RawBinding {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        role_kind: role.kind.clone(),
        role_name: role.name.clone(),
        subjects: subjects
            .unwrap_or_default()
            .iter()
            .map(|s| (s.kind.clone(), s.name.clone()))
            .collect(),
        labels,
        grant_mark,
    }
}

/// The `mapRoles` and `mapUsers` items of aws-auth's data. Keys compare
/// case-insensitively, as the authenticator reads them; an unparseable list
/// is an error, not an empty one (it would hide whatever it holds).
pub fn mappings(
    data: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<RawMapping>, String> {
    let mut out = Vec::new();
    for (list, key) in [("mapRoles", "rolearn"), ("mapUsers", "userarn")] {
        let Some(text) = data.get(list) else { continue };
        let items: Vec<serde_yaml::Value> = serde_yaml::from_str::<Option<Vec<_>>>(text)
            .map_err(|e| format!("aws-auth {list} is not a YAML list: {e}"))?
            .unwrap_or_default();
        for item in items {
            let Some(map) = item.as_mapping() else {
                continue;
            };
            let field = |name: &str| {
                map.iter()
                    .find(|(k, _)| k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
                    .map(|(_, v)| v)
            };
            let Some(arn) = field(key).and_then(|v| v.as_str()) else {
                continue;
            };
            out.push(RawMapping {
                list: list.to_string(),
                arn: arn.to_string(),
                username: field("username")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                groups: field("groups")
                    .and_then(|v| v.as_sequence())
                    .map(|s| {
                        s.iter()
                            .filter_map(|g| g.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

#[async_trait]
impl StandingReader for ClusterReader {
    async fn read(&self, cluster: &ClusterPolicy) -> Result<ClusterReading, Unreadable> {
        let mut reading = ClusterReading {
            entries: self.entries(cluster).await.map_err(Unreadable)?,
            ..Default::default()
        };
        if reached_through_kubernetes(cluster) {
            self.kubernetes(cluster, &mut reading)
                .await
                .map_err(Unreadable)?;
        }
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_lists_case_insensitively_and_refuses_garbage() {
        let data = std::collections::BTreeMap::from([
            (
                "mapRoles".to_string(),
                "- roleARN: arn:aws:iam::1:role/admin\n  username: admin\n  groups: [system:masters]\n".to_string(),
            ),
            (
                "mapUsers".to_string(),
                "- userarn: arn:aws:iam::1:user/bob\n  username: bob\n".to_string(),
            ),
        ]);
        let m = mappings(&data).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].arn, "arn:aws:iam::1:role/admin");
        assert_eq!(m[0].groups, ["system:masters"]);
        assert_eq!(
            (m[1].list.as_str(), m[1].username.as_deref()),
            ("mapUsers", Some("bob"))
        );
        let bad =
            std::collections::BTreeMap::from([("mapRoles".to_string(), "{{nope".to_string())]);
        assert!(mappings(&bad).is_err());
    }
}
