//! The `session-rbac` strategy: one RoleBinding per namespace (or one
//! ClusterRoleBinding) per grant, for user `tollgate:<email>`, each marked
//! as Tollgate's with the labels and annotation of spec 8.3.

use async_trait::async_trait;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::kube::KubeClients;
use super::standing::raw_binding;
use super::{store_knows, AccessEngine, AccessError, Converged, Holds, InForce, Look, Owned};
use crate::config::DEFAULT_INSTANCE;
use crate::domain::grant::{entry_mark, EntryMark};
use crate::domain::policy::ClusterPolicy;
use crate::domain::readback::{self, ReadBack};
use crate::domain::request::{AccessSpec, Intent};
use crate::store::{AccessRecords, Store};

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_GRANT: &str = "tollgate.dev/grant";
pub const LABEL_INSTANCE: &str = "tollgate.dev/instance";
pub const ANNOTATION_EXPIRES: &str = "tollgate.dev/expires-at";
pub const MANAGED_BY: &str = "tollgate";

/// Where one binding lives: `None` namespace means a ClusterRoleBinding.
/// How far the API server's clock may run behind Tollgate's when a
/// binding's creation time is compared with a grant's first attempt.
const RECORDED_CLOCK_SKEW: time::Duration = time::Duration::minutes(1);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BindingKey {
    pub namespace: Option<String>,
    pub name: String,
}

pub use crate::domain::grant::binding_name;

struct Desired {
    grant_id: String,
    cluster_role: String,
    expires_at: Option<String>,
}

pub struct SessionRbacStrategy {
    kube: Arc<KubeClients>,
    store: Arc<dyn AccessRecords>,
    instance: String,
}

/// A binding as it is found: where, which grant it names, what it says.
struct Found {
    grant: Option<String>,
    instance: Option<String>,
    expires_at: Option<String>,
}

impl Found {
    fn marked_for(&self, instance: &str) -> bool {
        self.instance.as_deref().is_none_or(|i| i == instance)
    }
}

fn kube_error(
    kube: &KubeClients,
    cluster: &ClusterPolicy,
    operation: &'static str,
    e: kube::Error,
) -> AccessError {
    kube.note_error(cluster, &e);
    AccessError::Aws {
        cluster: cluster.name.clone(),
        operation,
        message: e.to_string(),
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn meta(key: &BindingKey, d: &Desired, instance: &str) -> ObjectMeta {
    let mut annotations = BTreeMap::new();
    if let Some(exp) = &d.expires_at {
        annotations.insert(ANNOTATION_EXPIRES.to_string(), exp.clone());
    }
    ObjectMeta {
        name: Some(key.name.clone()),
        namespace: key.namespace.clone(),
        labels: Some(BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
            (LABEL_GRANT.to_string(), d.grant_id.clone()),
            (LABEL_INSTANCE.to_string(), instance.to_string()),
        ])),
        annotations: Some(annotations),
        ..Default::default()
    }
}

fn subject(user: &str) -> Vec<Subject> {
    vec![Subject {
        kind: "User".into(),
        name: user.to_string(),
        api_group: Some("rbac.authorization.k8s.io".into()),
        namespace: None,
    }]
}

fn role_ref(cluster_role: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: "ClusterRole".into(),
        name: cluster_role.to_string(),
    }
}

fn for_user(subjects: Option<&Vec<Subject>>, user: &str) -> bool {
    subjects.is_some_and(|s| s.iter().any(|s| s.kind == "User" && s.name == user))
}

fn expiry_of(meta: &ObjectMeta) -> Option<String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_EXPIRES))
        .cloned()
}

fn annotate_expiry(meta: &mut ObjectMeta, d: &Desired) {
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    match &d.expires_at {
        Some(exp) => {
            annotations.insert(ANNOTATION_EXPIRES.to_string(), exp.clone());
        }
        None => {
            annotations.remove(ANNOTATION_EXPIRES);
        }
    }
}

fn grant_label(meta: &ObjectMeta) -> Option<&str> {
    label(meta, LABEL_GRANT)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn found(meta: &ObjectMeta) -> Found {
    Found {
        grant: grant_label(meta).map(str::to_string),
        instance: label(meta, LABEL_INSTANCE).map(str::to_string),
        expires_at: expiry_of(meta),
    }
}

/// The bindings `row` recorded creating (namespace, name): its intents, or
/// for a row from before intents were recorded, what it would have made.
fn recorded_bindings(row: &crate::domain::request::Request) -> Vec<(Option<String>, String)> {
    use crate::domain::grant::{intents_for, row_records};
    use crate::domain::policy::Strategy;
    let candidates = if row.intents.is_empty() {
        intents_for(Strategy::SessionRbac, row.id.as_str(), &row.access)
    } else {
        row.intents.clone()
    };
    candidates
        .into_iter()
        .filter(|i| row_records(row, i))
        .filter_map(|i| match i {
            Intent::Binding { namespace, name } => Some((namespace, name)),
            _ => None,
        })
        .collect()
}

impl SessionRbacStrategy {
    pub fn new(kube: Arc<KubeClients>, store: Arc<dyn Store>) -> Self {
        let store: Arc<dyn AccessRecords> = Arc::new(store);
        SessionRbacStrategy {
            kube,
            store,
            instance: DEFAULT_INSTANCE.into(),
        }
    }

    /// The installation name written on every binding (`[server] instance`).
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = instance.to_string();
        self
    }

    /// Bindings for `user` marked as this installation's that exist now,
    /// with what each carries.
    async fn owned(
        &self,
        client: &kube::Client,
        cluster: &ClusterPolicy,
        user: &str,
    ) -> Result<BTreeMap<BindingKey, Found>, AccessError> {
        let selector = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
        let mut out = BTreeMap::new();
        let rbs: Api<RoleBinding> = Api::all(client.clone());
        for rb in rbs
            .list(&selector)
            .await
            .map_err(|e| kube_error(&self.kube, cluster, "list RoleBindings", e))?
        {
            let f = found(&rb.metadata);
            if for_user(rb.subjects.as_ref(), user) && f.marked_for(&self.instance) {
                out.insert(
                    BindingKey {
                        namespace: rb.metadata.namespace.clone(),
                        name: rb.metadata.name.clone().unwrap_or_default(),
                    },
                    f,
                );
            }
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
        for crb in crbs
            .list(&selector)
            .await
            .map_err(|e| kube_error(&self.kube, cluster, "list ClusterRoleBindings", e))?
        {
            let f = found(&crb.metadata);
            if for_user(crb.subjects.as_ref(), user) && f.marked_for(&self.instance) {
                out.insert(
                    BindingKey {
                        namespace: None,
                        name: crb.metadata.name.clone().unwrap_or_default(),
                    },
                    f,
                );
            }
        }
        Ok(out)
    }

    async fn create(
        &self,
        client: &kube::Client,
        cluster: &ClusterPolicy,
        user: &str,
        key: &BindingKey,
        d: &Desired,
    ) -> Result<(), AccessError> {
        let result = match &key.namespace {
            Some(ns) => {
                let api: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
                let rb = RoleBinding {
                    metadata: meta(key, d, &self.instance),
                    role_ref: role_ref(&d.cluster_role),
                    subjects: Some(subject(user)),
                };
                match api.create(&PostParams::default(), &rb).await {
                    Ok(_) => Ok(()),
                    Err(e) if status_code(&e) == Some(409) => {
                        let existing = api
                            .get(&key.name)
                            .await
                            .map_err(|e| kube_error(&self.kube, cluster, "get RoleBinding", e))?;
                        Err(existing.metadata)
                    }
                    Err(e) => return Err(kube_error(&self.kube, cluster, "create RoleBinding", e)),
                }
            }
            None => {
                let api: Api<ClusterRoleBinding> = Api::all(client.clone());
                let crb = ClusterRoleBinding {
                    metadata: meta(key, d, &self.instance),
                    role_ref: role_ref(&d.cluster_role),
                    subjects: Some(subject(user)),
                };
                match api.create(&PostParams::default(), &crb).await {
                    Ok(_) => Ok(()),
                    Err(e) if status_code(&e) == Some(409) => {
                        let existing = api.get(&key.name).await.map_err(|e| {
                            kube_error(&self.kube, cluster, "get ClusterRoleBinding", e)
                        })?;
                        Err(existing.metadata)
                    }
                    Err(e) => {
                        return Err(kube_error(
                            &self.kube,
                            cluster,
                            "create ClusterRoleBinding",
                            e,
                        ))
                    }
                }
            }
        };
        let existing = match result {
            Ok(()) => return Ok(()),
            Err(meta) => meta,
        };
        let object = match &key.namespace {
            Some(ns) => format!("RoleBinding {ns}/{}", key.name),
            None => format!("ClusterRoleBinding {}", key.name),
        };
        match entry_mark(
            label(&existing, LABEL_MANAGED_BY),
            label(&existing, LABEL_INSTANCE),
            &self.instance,
        ) {
            // Already there from an earlier attempt at the same grant.
            EntryMark::Ours if grant_label(&existing) == Some(d.grant_id.as_str()) => Ok(()),
            // Spec 9.6: never granted over, and named.
            EntryMark::Other(instance) => Err(AccessError::OtherInstallation {
                cluster: cluster.name.clone(),
                principal: user.to_string(),
                object,
                instance,
            }),
            _ => Err(AccessError::Aws {
                cluster: cluster.name.clone(),
                operation: "create binding",
                message: format!(
                    "{object} already exists and was not created by Tollgate for {}; it was left alone and nothing was granted",
                    d.grant_id
                ),
            }),
        }
    }

    /// Rewrites the expires-at annotation with a read-modify-replace; a
    /// concurrent writer's change makes the replace fail with 409 and the
    /// object is read again.
    async fn set_expiry(
        &self,
        client: &kube::Client,
        cluster: &ClusterPolicy,
        key: &BindingKey,
        d: &Desired,
    ) -> Result<(), AccessError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let result = match &key.namespace {
                Some(ns) => {
                    let api: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
                    let mut rb = api
                        .get(&key.name)
                        .await
                        .map_err(|e| kube_error(&self.kube, cluster, "get RoleBinding", e))?;
                    annotate_expiry(&mut rb.metadata, d);
                    api.replace(&key.name, &PostParams::default(), &rb)
                        .await
                        .map(|_| ())
                }
                None => {
                    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
                    let mut crb = api.get(&key.name).await.map_err(|e| {
                        kube_error(&self.kube, cluster, "get ClusterRoleBinding", e)
                    })?;
                    annotate_expiry(&mut crb.metadata, d);
                    api.replace(&key.name, &PostParams::default(), &crb)
                        .await
                        .map(|_| ())
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if status_code(&e) == Some(409) => continue,
                Err(e) => return Err(kube_error(&self.kube, cluster, "update binding expiry", e)),
            }
        }
        Err(AccessError::Aws {
            cluster: cluster.name.clone(),
            operation: "update binding expiry",
            message: format!("{} kept changing concurrently", key.name),
        })
    }

    /// `None` when the binding does not exist; else its creation time, as
    /// the API server recorded it.
    async fn created_at(
        &self,
        client: &kube::Client,
        cluster: &ClusterPolicy,
        key: &BindingKey,
    ) -> Result<Option<Option<time::OffsetDateTime>>, AccessError> {
        let created = match &key.namespace {
            Some(ns) => Api::<RoleBinding>::namespaced(client.clone(), ns)
                .get_opt(&key.name)
                .await
                .map(|b| b.map(|b| b.metadata.creation_timestamp)),
            None => Api::<ClusterRoleBinding>::all(client.clone())
                .get_opt(&key.name)
                .await
                .map(|b| b.map(|b| b.metadata.creation_timestamp)),
        }
        .map_err(|e| kube_error(&self.kube, cluster, "get binding", e))?;
        Ok(created.map(|t| {
            t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok())
        }))
    }

    async fn delete(
        &self,
        client: &kube::Client,
        cluster: &ClusterPolicy,
        key: &BindingKey,
    ) -> Result<(), AccessError> {
        let result = match &key.namespace {
            Some(ns) => Api::<RoleBinding>::namespaced(client.clone(), ns)
                .delete(&key.name, &DeleteParams::default())
                .await
                .map(|_| ()),
            None => Api::<ClusterRoleBinding>::all(client.clone())
                .delete(&key.name, &DeleteParams::default())
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(kube_error(&self.kube, cluster, "delete binding", e)),
        }
    }
}

#[async_trait]
impl AccessEngine for SessionRbacStrategy {
    /// One list call returns every marked object, so `look` narrows
    /// nothing here.
    async fn owned(
        &self,
        cluster: &ClusterPolicy,
        _look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError> {
        let client = self.kube.client(cluster).await?;
        let selector = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
        let users = |subjects: Option<&Vec<Subject>>| -> Vec<String> {
            subjects
                .into_iter()
                .flatten()
                .filter(|s| s.kind == "User")
                .map(|s| s.name.clone())
                .collect()
        };
        let mut out = Vec::new();
        let rbs: Api<RoleBinding> = Api::all(client.clone());
        for rb in rbs
            .list(&selector)
            .await
            .map_err(|e| kube_error(&self.kube, cluster, "list RoleBindings", e))?
        {
            let f = found(&rb.metadata);
            if !f.marked_for(&self.instance) {
                continue;
            }
            let holds = Holds::Binding(raw_binding(
                &rb.metadata,
                &rb.role_ref,
                rb.subjects.as_deref(),
            ));
            for principal in users(rb.subjects.as_ref()) {
                out.push(Owned {
                    holds: Some(holds.clone()),
                    principal,
                    grant_id: f.grant.clone(),
                    instance: f.instance.clone(),
                    intent: Some(Intent::Binding {
                        namespace: rb.metadata.namespace.clone(),
                        name: rb.metadata.name.clone().unwrap_or_default(),
                    }),
                    object: format!(
                        "RoleBinding {}/{}",
                        rb.metadata.namespace.as_deref().unwrap_or_default(),
                        rb.metadata.name.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(client);
        for crb in crbs
            .list(&selector)
            .await
            .map_err(|e| kube_error(&self.kube, cluster, "list ClusterRoleBindings", e))?
        {
            let f = found(&crb.metadata);
            if !f.marked_for(&self.instance) {
                continue;
            }
            let holds = Holds::Binding(raw_binding(
                &crb.metadata,
                &crb.role_ref,
                crb.subjects.as_deref(),
            ));
            for principal in users(crb.subjects.as_ref()) {
                out.push(Owned {
                    holds: Some(holds.clone()),
                    principal,
                    grant_id: f.grant.clone(),
                    instance: f.instance.clone(),
                    intent: Some(Intent::Binding {
                        namespace: None,
                        name: crb.metadata.name.clone().unwrap_or_default(),
                    }),
                    object: format!(
                        "ClusterRoleBinding {}",
                        crb.metadata.name.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
        Ok(out)
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        user: &str,
        grants: &[InForce<'_>],
        _creator: &str,
    ) -> Result<Converged, AccessError> {
        let client = self.kube.client(cluster).await?;
        let mut desired: BTreeMap<BindingKey, Desired> = BTreeMap::new();
        for g in grants {
            let Some(cluster_role) = &g.spec.cluster_role else {
                continue;
            };
            let name = binding_name(g.grant_id);
            let namespaces: Vec<Option<String>> = if g.spec.namespaces.is_empty() {
                vec![None]
            } else {
                g.spec.namespaces.iter().cloned().map(Some).collect()
            };
            for namespace in namespaces {
                desired.insert(
                    BindingKey {
                        namespace,
                        name: name.clone(),
                    },
                    Desired {
                        grant_id: g.grant_id.to_string(),
                        cluster_role: cluster_role.clone(),
                        expires_at: g.expires_at.and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        }),
                    },
                );
            }
        }
        let existing = self.owned(&client, cluster, user).await?;
        for (key, d) in &desired {
            match existing.get(key) {
                None => self.create(&client, cluster, user, key, d).await?,
                // An extension moved the expiry: the binding says so too.
                Some(shown) if shown.expires_at != d.expires_at => {
                    self.set_expiry(&client, cluster, key, d).await?
                }
                Some(_) => {}
            }
        }
        for (key, f) in existing.iter().filter(|(k, _)| !desired.contains_key(*k)) {
            // Only a binding the store says a grant created goes; one that
            // merely carries the labels is someone else's.
            let object = Intent::Binding {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            };
            if store_knows(
                self.store.as_ref(),
                &cluster.name,
                f.grant.as_deref(),
                &object,
            )
            .await?
            {
                self.delete(&client, cluster, key).await?;
            } else {
                tracing::warn!(cluster = %cluster.name, binding = %key.name, grant = ?f.grant, "binding carries Tollgate's labels but its store did not create it; left alone");
            }
        }
        Ok(Converged::default())
    }

    /// Deletes every binding the revoked grant's row recorded, by name,
    /// whatever its labels or subjects now say: the converge finds
    /// bindings by their marks and their user, which a grantee allowed to
    /// edit bindings can change; the name and the row cannot be.
    async fn remove_recorded(
        &self,
        cluster: &ClusterPolicy,
        _user: &str,
        revoked_id: &str,
    ) -> Result<(), AccessError> {
        let Some(id) = crate::domain::request::RequestId::parse(revoked_id) else {
            return Ok(());
        };
        let Some(row) = self.store.get(&id).await? else {
            return Ok(());
        };
        if row.access.cluster != cluster.name {
            return Ok(());
        }
        let keys: Vec<BindingKey> = recorded_bindings(&row)
            .into_iter()
            .map(|(namespace, name)| BindingKey { namespace, name })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let client = self.kube.client(cluster).await?;
        // A name recorded before the create call may have been taken by
        // someone else first (the create then failed): a binding created
        // before the grant was first attempted cannot be Tollgate's, and
        // is left for the read-back to report.
        let since = row.first_attempt_at.map(|t| t - RECORDED_CLOCK_SKEW);
        for key in &keys {
            match self.created_at(&client, cluster, key).await? {
                None => {}
                Some(created) if since.is_some_and(|s| created.is_some_and(|c| c < s)) => {
                    tracing::warn!(cluster = %cluster.name, binding = %key.name, "a binding named for the grant existed before it; left alone");
                }
                Some(_) => self.delete(&client, cluster, key).await?,
            }
        }
        Ok(())
    }

    /// A GET of each binding the revoked grant was given (named after it,
    /// so no other grant shares one, and `grants`, which never holds the
    /// revoked grant, has nothing to add): any that still exists is its
    /// access still in place, whatever its labels or subjects say.
    async fn verify_removed(
        &self,
        cluster: &ClusterPolicy,
        _user: &str,
        revoked_id: &str,
        revoked: &AccessSpec,
        _grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError> {
        let client = self.kube.client(cluster).await?;
        let name = binding_name(revoked_id);
        let mut still_bound = Vec::new();
        let namespaces: Vec<Option<&String>> = if revoked.namespaces.is_empty() {
            vec![None]
        } else {
            revoked.namespaces.iter().map(Some).collect()
        };
        for ns in namespaces {
            let what = match ns {
                Some(ns) => {
                    let found = Api::<RoleBinding>::namespaced(client.clone(), ns)
                        .get_opt(&name)
                        .await
                        .map_err(|e| kube_error(&self.kube, cluster, "get RoleBinding", e))?;
                    match found {
                        Some(_) => format!("RoleBinding {ns}/{name}"),
                        None => continue,
                    }
                }
                None => {
                    let found = Api::<ClusterRoleBinding>::all(client.clone())
                        .get_opt(&name)
                        .await
                        .map_err(|e| {
                            kube_error(&self.kube, cluster, "get ClusterRoleBinding", e)
                        })?;
                    match found {
                        Some(_) => format!("ClusterRoleBinding {name}"),
                        None => continue,
                    }
                }
            };
            // Whatever its labels and subjects say: the grant's row records
            // this name, so it is Tollgate's, and a grantee who can edit
            // bindings in the namespace could relabel it, or bind it to
            // another identity or group they hold, to hide it from a lookup
            // by marks or by user. It still gives access, so it still
            // counts until it is gone.
            still_bound.push(what);
        }
        Ok(ReadBack::from_findings(readback::bindings_left(
            &still_bound,
        )))
    }

    async fn missing(
        &self,
        cluster: &ClusterPolicy,
        user: &str,
        grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.kube.client(cluster).await?;
        let existing = self.owned(&client, cluster, user).await?;
        Ok(grants
            .iter()
            .filter(|g| {
                let name = binding_name(g.grant_id);
                let keys: Vec<BindingKey> = if g.spec.namespaces.is_empty() {
                    vec![BindingKey {
                        namespace: None,
                        name,
                    }]
                } else {
                    g.spec
                        .namespaces
                        .iter()
                        .map(|ns| BindingKey {
                            namespace: Some(ns.clone()),
                            name: name.clone(),
                        })
                        .collect()
                };
                g.spec.cluster_role.is_some() && keys.iter().any(|k| !existing.contains_key(k))
            })
            .map(|g| g.grant_id.to_string())
            .collect())
    }
}
