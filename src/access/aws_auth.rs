//! The `aws-auth` strategy: one `mapRoles`/`mapUsers` item per principal in
//! `kube-system/aws-auth`, written with optimistic concurrency. Every item
//! Tollgate did not add stays exactly as it was.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::Api;
use rand::Rng;
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::kube::KubeClients;
use super::{AccessEngine, AccessError, Converged, InForce, Look, Owned};
use crate::domain::policy::ClusterPolicy;
use crate::domain::readback::{self, ReadBack};
use crate::domain::request::{AccessSpec, Intent};

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "aws-auth";
/// Read-modify-write attempts before giving up on a busy ConfigMap.
const MAX_ATTEMPTS: u32 = 8;

/// The one rule for role paths lives with principal resolution.
pub use crate::domain::identity::strip_role_path;

/// Which list of aws-auth an ARN belongs in, and that list's ARN key.
fn list_for(arn: &str) -> Result<(&'static str, &'static str), String> {
    if arn.contains(":role/") {
        Ok(("mapRoles", "rolearn"))
    } else if arn.contains(":user/") {
        Ok(("mapUsers", "userarn"))
    } else {
        Err(format!(
            "`{arn}` is neither an IAM role nor an IAM user ARN"
        ))
    }
}

fn item_field<'a>(item: &'a Value, key: &str) -> Option<&'a str> {
    item.get(key).and_then(Value::as_str)
}

/// The ARN of an item. The authenticator decodes items case-insensitively
/// (`rolearn` and `roleARN` are the same key) and compares ARNs in lower
/// case; so does Tollgate, or it could append an item that silently wins
/// over someone else's.
fn item_arn(item: &Value, key: &str) -> Option<String> {
    item_arn_as_written(item, key).map(|a| a.to_ascii_lowercase())
}

fn item_arn_as_written(item: &Value, key: &str) -> Option<String> {
    item.as_mapping()?.iter().find_map(|(k, v)| {
        let k = k.as_str()?;
        if k.eq_ignore_ascii_case(key) {
            v.as_str().map(strip_role_path)
        } else {
            None
        }
    })
}

pub use crate::domain::identity::is_grant_username;

/// The new `data` of aws-auth, or `None` when it already says what it
/// should. Pure, so the merge rules are tested without a cluster.
pub fn plan(
    data: &BTreeMap<String, String>,
    principal: &str,
    username: &str,
    groups: Option<&[String]>,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let arn = strip_role_path(principal);
    let arn_key = arn.to_ascii_lowercase();
    let (list, key) = list_for(&arn)?;
    let items: Vec<Value> = match data.get(list).map(|s| s.trim()) {
        None | Some("") => Vec::new(),
        Some(text) => serde_yaml::from_str(text)
            .map_err(|e| format!("aws-auth {list} is not valid YAML: {e}"))?,
    };
    let same_arn = |i: &Value| item_arn(i, key).as_deref() == Some(arn_key.as_str());
    let mine = |i: &Value| same_arn(i) && item_field(i, "username") == Some(username);
    let wanted = groups.map(|g| {
        let mut m = Mapping::new();
        m.insert(key.into(), arn.clone().into());
        m.insert("username".into(), username.into());
        m.insert(
            "groups".into(),
            Value::Sequence(g.iter().map(|s| s.clone().into()).collect()),
        );
        Value::Mapping(m)
    });
    if wanted.is_some() {
        // Only adding can shadow; removing Tollgate's own item is always
        // allowed, whatever else appeared meanwhile.
        if let Some(other) = items.iter().find(|i| same_arn(i) && !mine(i)) {
            return Err(format!(
                "{arn} is already mapped in aws-auth {list} (username `{}`) by someone else; Tollgate will not shadow that mapping",
                item_field(other, "username").unwrap_or("?")
            ));
        }
    }
    let existing: Vec<&Value> = items.iter().filter(|i| mine(i)).collect();
    let unchanged = match &wanted {
        Some(w) => existing.len() == 1 && existing[0] == w,
        None => existing.is_empty(),
    };
    if unchanged {
        return Ok(None);
    }
    let mut next: Vec<Value> = items.iter().filter(|i| !mine(i)).cloned().collect();
    next.extend(wanted);
    let mut out = data.clone();
    if next.is_empty() {
        out.remove(list);
    } else {
        // Written as JSON, which is YAML too: every string stays quoted, so
        // a value like `yes` or `off` cannot turn into a YAML 1.1 boolean
        // for the authenticator and break every mapping.
        let text = serde_json::to_string_pretty(&next)
            .map_err(|e| format!("serialising aws-auth: {e}"))?;
        out.insert(list.to_string(), text);
    }
    Ok(Some(out))
}

/// Marks of another tool managing aws-auth, which may overwrite Tollgate's
/// items on its next sync.
pub fn foreign_managers(cm: &ConfigMap) -> Vec<String> {
    let mut found = Vec::new();
    let keys = cm
        .metadata
        .labels
        .iter()
        .flatten()
        .chain(cm.metadata.annotations.iter().flatten());
    for (k, v) in keys {
        let k_l = k.to_ascii_lowercase();
        let v_l = v.to_ascii_lowercase();
        let mark = k == "kubectl.kubernetes.io/last-applied-configuration"
            || k_l.contains("helm.sh")
            || k_l.contains("argocd.argoproj.io")
            || k_l.contains("terraform")
            || (k == "app.kubernetes.io/managed-by" && v_l != "tollgate");
        if mark {
            let shown = if k == "kubectl.kubernetes.io/last-applied-configuration" {
                "…"
            } else {
                v.as_str()
            };
            found.push(format!("{k}={shown}"));
        }
    }
    found
}

pub struct AwsAuthStrategy {
    kube: Arc<KubeClients>,
}

impl AwsAuthStrategy {
    pub fn new(kube: Arc<KubeClients>) -> Self {
        AwsAuthStrategy { kube }
    }
}

fn error(cluster: &ClusterPolicy, operation: &'static str, message: String) -> AccessError {
    AccessError::Aws {
        cluster: cluster.name.clone(),
        operation,
        message,
    }
}

pub async fn read(api: &Api<ConfigMap>, cluster: &ClusterPolicy) -> Result<ConfigMap, AccessError> {
    api.get(NAME).await.map_err(|e| read_error(cluster, e))
}

fn read_error(cluster: &ClusterPolicy, e: kube::Error) -> AccessError {
    match e {
        kube::Error::Api(s) if s.code == 404 => error(
            cluster,
            "read aws-auth",
            format!(
                "{NAMESPACE}/{NAME} does not exist on cluster {}; Tollgate never creates it",
                cluster.name
            ),
        ),
        e => error(cluster, "read aws-auth", e.to_string()),
    }
}

impl AwsAuthStrategy {
    /// `read`, telling the client cache about a refused token.
    async fn read(
        &self,
        api: &Api<ConfigMap>,
        cluster: &ClusterPolicy,
    ) -> Result<ConfigMap, AccessError> {
        api.get(NAME).await.map_err(|e| {
            self.kube.note_error(cluster, &e);
            read_error(cluster, e)
        })
    }
}

/// Items of aws-auth whose username marks them as Tollgate's.
pub fn owned_items(data: &BTreeMap<String, String>) -> Vec<Owned> {
    let mut out = Vec::new();
    for (list, key) in [("mapRoles", "rolearn"), ("mapUsers", "userarn")] {
        let Some(text) = data.get(list) else { continue };
        let items: Vec<Value> = serde_yaml::from_str(text).unwrap_or_default();
        for item in &items {
            if let (Some(arn), Some(user)) =
                (item_arn_as_written(item, key), item_field(item, "username"))
            {
                if is_grant_username(user) {
                    out.push(Owned {
                        intent: Some(Intent::AwsAuthItem {
                            arn: arn.to_ascii_lowercase(),
                            username: user.to_string(),
                        }),
                        instance: None,
                        principal: arn,
                        grant_id: None,
                        object: format!("aws-auth {list} item for {user}"),
                        holds: None,
                    });
                }
            }
        }
    }
    out
}

#[async_trait]
impl AccessEngine for AwsAuthStrategy {
    /// One list call returns every marked object, so `look` narrows
    /// nothing here.
    async fn owned(
        &self,
        cluster: &ClusterPolicy,
        _look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError> {
        let client = self.kube.client(cluster).await?;
        let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
        let cm = self.read(&api, cluster).await?;
        Ok(owned_items(&cm.data.unwrap_or_default()))
    }

    async fn missing(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.kube.client(cluster).await?;
        let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
        let data = self.read(&api, cluster).await?.data.unwrap_or_default();
        let have = item_groups(&data, principal).map_err(|m| error(cluster, "read aws-auth", m))?;
        Ok(grants
            .iter()
            .filter(|g| {
                let user = g.spec.k8s_user.as_deref().unwrap_or_default();
                !have.iter().any(|(u, groups)| {
                    u == user && g.spec.groups.iter().all(|want| groups.contains(want))
                })
            })
            .map(|g| g.grant_id.to_string())
            .collect())
    }

    /// Reads `kube-system/aws-auth` again: Tollgate's item for the revoked
    /// grant's user must be gone, or (while other grants of the principal
    /// are in force) map none of the revoked grant's groups that they do
    /// not need; and no other item of the same ARN may map those groups
    /// either (converge refuses to grant over a foreign item of the ARN,
    /// so one that appeared since was added during the grant, e.g. by the
    /// grantee under another username). A list that cannot be parsed fails
    /// the read-back.
    async fn verify_removed(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        _revoked_id: &str,
        revoked: &AccessSpec,
        grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError> {
        let Some(user) = revoked.k8s_user.as_deref() else {
            // Such a grant never wrote an item (converge refuses it).
            return Ok(ReadBack::Removed);
        };
        let client = self.kube.client(cluster).await?;
        let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
        let data = self.read(&api, cluster).await?.data.unwrap_or_default();
        let items =
            item_groups(&data, principal).map_err(|m| error(cluster, "read aws-auth", m))?;
        let item = items
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, g)| g.as_slice());
        let justified: Option<Vec<String>> = (!grants.is_empty()).then(|| {
            grants
                .iter()
                .flat_map(|g| g.spec.groups.iter().cloned())
                .collect()
        });
        let mut findings: Vec<String> =
            readback::aws_auth_left(&revoked.groups, item, justified.as_deref())
                .into_iter()
                .collect();
        findings.extend(readback::aws_auth_others_left(
            &revoked.groups,
            user,
            &items,
            justified.as_deref().unwrap_or_default(),
        ));
        Ok(ReadBack::from_findings(findings))
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        _creator: &str,
    ) -> Result<Converged, AccessError> {
        let client = self.kube.client(cluster).await?;
        let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
        let mut users: Vec<&str> = grants
            .iter()
            .filter_map(|g| g.spec.k8s_user.as_deref())
            .collect();
        users.sort();
        users.dedup();
        if users.len() > 1 {
            // One aws-auth item maps one ARN to one user; two people behind
            // one IAM principal cannot both be told apart in the cluster.
            return Err(error(
                cluster,
                "update aws-auth",
                format!("{principal} is the IAM principal of several requesters ({}); give each their own principal in [identity]", users.join(", ")),
            ));
        }
        if !grants.is_empty() && users.is_empty() {
            return Err(error(
                cluster,
                "update aws-auth",
                "the grant names no Kubernetes user".into(),
            ));
        }
        let username = users.first().map(|u| u.to_string());
        let mut groups: Vec<String> = grants
            .iter()
            .flat_map(|g| g.spec.groups.iter().cloned())
            .collect();
        groups.sort();
        groups.dedup();
        for attempt in 0..MAX_ATTEMPTS {
            let mut cm = self.read(&api, cluster).await?;
            let data = cm.data.clone().unwrap_or_default();
            // With no grant in force the username comes from what Tollgate
            // wrote before: any item of this ARN whose user is Tollgate's.
            let user = match &username {
                Some(u) => u.clone(),
                None => match existing_tollgate_user(&data, principal)
                    .map_err(|m| error(cluster, "update aws-auth", m))?
                {
                    Some(u) => u,
                    None => return Ok(Converged::default()),
                },
            };
            let wanted = (!grants.is_empty()).then_some(groups.as_slice());
            let Some(next) = plan(&data, principal, &user, wanted)
                .map_err(|m| error(cluster, "update aws-auth", m))?
            else {
                return Ok(Converged::default());
            };
            cm.data = Some(next);
            match api.replace(NAME, &PostParams::default(), &cm).await {
                Ok(_) => return Ok(Converged::default()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let base = 20u64 << attempt.min(6);
                    let jitter = rand::thread_rng().gen_range(0..=base);
                    tracing::debug!(cluster = %cluster.name, attempt, "aws-auth changed underneath; retrying");
                    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                }
                Err(e) => {
                    self.kube.note_error(cluster, &e);
                    return Err(error(cluster, "update aws-auth", e.to_string()));
                }
            }
        }
        Err(error(
            cluster,
            "update aws-auth",
            format!("gave up after {MAX_ATTEMPTS} conflicting writes"),
        ))
    }
}

/// The (username, groups) of every item mapping `principal`'s ARN.
/// A list that cannot be parsed is an error, never "no items": a check
/// that read it as empty would pass a revoke whose item is still there.
fn item_groups(
    data: &BTreeMap<String, String>,
    principal: &str,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let arn = strip_role_path(principal);
    let Ok((list, key)) = list_for(&arn) else {
        return Ok(Vec::new());
    };
    let Some(text) = data.get(list) else {
        return Ok(Vec::new());
    };
    let items: Vec<Value> =
        serde_yaml::from_str(text).map_err(|e| format!("aws-auth {list} cannot be parsed: {e}"))?;
    let arn_key = arn.to_ascii_lowercase();
    Ok(items
        .iter()
        .filter(|i| item_arn(i, key).as_deref() == Some(arn_key.as_str()))
        .map(|i| {
            let user = item_field(i, "username").unwrap_or_default().to_string();
            let groups = i
                .get("groups")
                .and_then(Value::as_sequence)
                .map(|g| {
                    g.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            (user, groups)
        })
        .collect())
}

/// The Tollgate user of an item mapping `principal`'s ARN, if any. A list
/// that cannot be parsed is an error: a revoke that took it for "no item"
/// would be recorded while the item stays.
fn existing_tollgate_user(
    data: &BTreeMap<String, String>,
    principal: &str,
) -> Result<Option<String>, String> {
    Ok(item_groups(data, principal)?
        .into_iter()
        .map(|(user, _)| user)
        .find(|u| is_grant_username(u)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "- rolearn: arn:aws:iam::123:role/node\n  username: system:node:{{EC2PrivateDNSName}}\n  groups:\n    - system:bootstrappers\n    - system:nodes\n";

    fn data() -> BTreeMap<String, String> {
        BTreeMap::from([("mapRoles".to_string(), NODES.to_string())])
    }

    fn items(d: &BTreeMap<String, String>, list: &str) -> Vec<Value> {
        serde_yaml::from_str(&d[list]).unwrap()
    }

    #[test]
    fn strips_sso_paths_only_from_roles() {
        assert_eq!(
            strip_role_path("arn:aws:iam::123:role/aws-reserved/sso.amazonaws.com/eu-west-1/AWSReservedSSO_Dev_abc"),
            "arn:aws:iam::123:role/AWSReservedSSO_Dev_abc"
        );
        assert_eq!(
            strip_role_path("arn:aws:iam::123:role/alice"),
            "arn:aws:iam::123:role/alice"
        );
        assert_eq!(
            strip_role_path("arn:aws:iam::123:user/bob"),
            "arn:aws:iam::123:user/bob"
        );
    }

    #[test]
    fn adds_then_removes_exactly_its_item() {
        let groups = vec!["tollgate-debug".to_string()];
        let sso =
            "arn:aws:iam::123:role/aws-reserved/sso.amazonaws.com/eu-west-1/AWSReservedSSO_Dev_abc";
        let added = plan(&data(), sso, "tollgate:a@x.com", Some(&groups))
            .unwrap()
            .unwrap();
        let list = items(&added, "mapRoles");
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0],
            items(&data(), "mapRoles")[0],
            "node role untouched"
        );
        assert_eq!(
            item_field(&list[1], "rolearn"),
            Some("arn:aws:iam::123:role/AWSReservedSSO_Dev_abc")
        );
        assert_eq!(
            plan(&added, sso, "tollgate:a@x.com", Some(&groups)).unwrap(),
            None,
            "idempotent"
        );

        let removed = plan(&added, sso, "tollgate:a@x.com", None)
            .unwrap()
            .unwrap();
        assert_eq!(items(&removed, "mapRoles"), items(&data(), "mapRoles"));
        assert_eq!(plan(&removed, sso, "tollgate:a@x.com", None).unwrap(), None);
    }

    #[test]
    fn users_go_to_map_users_and_groups_update_in_place() {
        let one = vec!["a".to_string()];
        let two = vec!["a".to_string(), "b".to_string()];
        let d = plan(
            &data(),
            "arn:aws:iam::123:user/bob",
            "tollgate:bob@x.com",
            Some(&one),
        )
        .unwrap()
        .unwrap();
        assert_eq!(items(&d, "mapUsers").len(), 1);
        let d = plan(
            &d,
            "arn:aws:iam::123:user/bob",
            "tollgate:bob@x.com",
            Some(&two),
        )
        .unwrap()
        .unwrap();
        let users = items(&d, "mapUsers");
        assert_eq!(users.len(), 1);
        assert_eq!(
            users[0]["groups"],
            Value::Sequence(vec!["a".into(), "b".into()])
        );
        let d = plan(&d, "arn:aws:iam::123:user/bob", "tollgate:bob@x.com", None)
            .unwrap()
            .unwrap();
        assert!(!d.contains_key("mapUsers"));
    }

    #[test]
    fn refuses_to_shadow_a_foreign_mapping() {
        let err = plan(
            &data(),
            "arn:aws:iam::123:role/node",
            "tollgate:a@x.com",
            Some(&["g".to_string()]),
        )
        .unwrap_err();
        assert!(
            err.contains("already mapped") && err.contains("system:node"),
            "{err}"
        );
    }

    #[test]
    fn matches_keys_and_arns_like_the_authenticator() {
        let foreign = "- roleARN: arn:aws:iam::123:role/Alice\n  username: alice-admin\n  groups: [system:masters]\n";
        let d = BTreeMap::from([("mapRoles".to_string(), foreign.to_string())]);
        let err = plan(
            &d,
            "arn:aws:iam::123:role/alice",
            "tollgate:a@x.com",
            Some(&["g".to_string()]),
        )
        .unwrap_err();
        assert!(err.contains("already mapped"), "{err}");
    }

    #[test]
    fn removal_is_never_blocked_by_a_later_foreign_mapping() {
        let sso = "arn:aws:iam::123:role/alice";
        let added = plan(&data(), sso, "tollgate:a@x.com", Some(&["g".to_string()]))
            .unwrap()
            .unwrap();
        let mut roles = items(&added, "mapRoles");
        roles.push(
            serde_yaml::from_str(
                "{rolearn: 'arn:aws:iam::123:role/alice', username: eksctl-user, groups: [x]}",
            )
            .unwrap(),
        );
        let d = BTreeMap::from([(
            "mapRoles".to_string(),
            serde_json::to_string(&roles).unwrap(),
        )]);
        let removed = plan(&d, sso, "tollgate:a@x.com", None).unwrap().unwrap();
        let left = items(&removed, "mapRoles");
        assert_eq!(left.len(), 2);
        assert!(left
            .iter()
            .all(|i| item_field(i, "username") != Some("tollgate:a@x.com")));
    }

    #[test]
    fn other_items_keep_their_meaning_through_a_rewrite() {
        let tricky = "- rolearn: arn:aws:iam::123:role/x\n  username: \"yes\"\n  groups:\n    - 'off'\n    - \"007\"\n";
        let d = BTreeMap::from([("mapRoles".to_string(), tricky.to_string())]);
        let out = plan(
            &d,
            "arn:aws:iam::123:role/alice",
            "tollgate:a@x.com",
            Some(&["g".to_string()]),
        )
        .unwrap()
        .unwrap();
        let text = &out["mapRoles"];
        assert!(
            text.contains("\"yes\"") && text.contains("\"off\"") && text.contains("\"007\""),
            "{text}"
        );
        assert_eq!(items(&out, "mapRoles")[0], items(&d, "mapRoles")[0]);
    }

    #[test]
    fn only_requesters_usernames_are_grants() {
        assert!(is_grant_username("tollgate:alice@example.com"));
        assert!(!is_grant_username("tollgate:controller"));
        assert!(!is_grant_username("tollgate:{{SessionNameRaw}}"));
        assert!(!is_grant_username("alice@example.com"));
    }
}
