//! The grant engine's adapters. Each strategy converges one (cluster,
//! principal) to what a set of grants needs, touching only what Tollgate owns.

use async_trait::async_trait;
use std::sync::Arc;

use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::readback::ReadBack;
use crate::domain::request::{AccessSpec, Intent};

pub mod access_entry;
pub mod aws;
pub mod aws_auth;
pub mod backstop;
pub mod eks_token;
pub mod kube;
pub mod permissions;
pub mod session_rbac;
pub mod standing;

pub use aws::AwsClients;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot reach cluster {cluster}: {message}")]
    Connect { cluster: String, message: String },
    #[error("{operation} on {cluster} failed: {message}")]
    Aws {
        cluster: String,
        operation: &'static str,
        message: String,
    },
    #[error("store error during grant: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The principal's access on `cluster` is marked by another Tollgate
    /// installation: nothing is granted over it (spec 9.6).
    #[error("{object} of {principal} on {cluster} belongs to another Tollgate installation, `{instance}`; nothing was granted (two installations never share a principal's access)")]
    OtherInstallation {
        cluster: String,
        principal: String,
        object: String,
        instance: String,
    },
    /// A grant in force names a namespace that is no Kubernetes name (a
    /// row written straight into the store: `*`, `kube-*`). Refused before
    /// any call: EKS access scopes would take it as a wildcard.
    #[error(
        "grant {grant} names an invalid namespace on {cluster}: {message}; nothing was changed"
    )]
    InvalidNamespace {
        cluster: String,
        grant: String,
        message: String,
    },
}

/// What a converge reports besides having converged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Converged {
    /// Standing access a baseline recorded that someone removed while a
    /// grant was in force: not re-created, the baseline forgotten (spec
    /// 9.6). The caller audits `baseline_gone` and tells the security
    /// channel.
    pub baselines_gone: Vec<crate::domain::grant::GoneBaseline>,
}

/// One grant that should be in force, with the id of the request it came from.
#[derive(Clone, Debug)]
pub struct InForce<'a> {
    pub grant_id: &'a str,
    pub spec: &'a AccessSpec,
    /// When the grant ends; Kubernetes objects carry it as an annotation.
    pub expires_at: Option<time::OffsetDateTime>,
}

impl<'a> InForce<'a> {
    /// A request's grant, as its row has it.
    pub fn of(row: &'a crate::domain::request::Request) -> Self {
        InForce {
            grant_id: row.id.as_str(),
            spec: &row.access,
            expires_at: row.expires_at,
        }
    }
}

/// Something in a cluster that carries Tollgate's marks (spec 8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// The IAM principal or Kubernetes user it gives access to.
    pub principal: String,
    /// The grant named on it, where the strategy records one.
    pub grant_id: Option<String>,
    /// What it is, for logs and audit (`access entry`, `RoleBinding a/x`, …).
    pub object: String,
    /// The installation it is marked with; `None` for objects made before
    /// installations were marked. Objects of another installation are
    /// never listed.
    pub instance: Option<String>,
    /// What its creator would have recorded before making it: compared
    /// with the store's rows to tell Tollgate's objects from forgeries.
    pub intent: Option<Intent>,
    /// What the object holds as it was read, where the strategy reads it:
    /// the reconciler reports what is more than the store recorded
    /// Tollgate making (spec 9.2).
    pub holds: Option<Holds>,
}

/// What a marked object holds, as discovery reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holds {
    Entry(crate::domain::standing::RawEntry),
    Binding(crate::domain::standing::RawBinding),
}

/// How much of a cluster a listing reads.
#[derive(Clone, Copy, Debug)]
pub enum Look<'a> {
    /// Every object's marks: how `foreign` objects are found. The
    /// reconciler does this on its first pass and then at most hourly.
    Everything,
    /// Only what these principals hold: the objects the store knows of.
    /// A strategy whose listing is one call anyway may return more.
    Principals(&'a std::collections::BTreeSet<String>),
}

impl Look<'_> {
    pub fn includes(&self, principal: &str) -> bool {
        match self {
            Look::Everything => true,
            Look::Principals(set) => set.contains(principal),
        }
    }
}

#[async_trait]
pub trait AccessEngine: Send + Sync + 'static {
    /// What in the cluster carries Tollgate's marks, for the reconciler to
    /// compare with the grants in force: everything, or only what some
    /// principals hold, so a pass costs what Tollgate owns.
    async fn owned(
        &self,
        cluster: &ClusterPolicy,
        look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError>;

    /// The grants among `grants` whose access is not in place: what each
    /// one needs (its association with a covering scope, its bindings, its
    /// aws-auth item) is looked at, whoever made the object that holds it.
    async fn missing(
        &self,
        _cluster: &ClusterPolicy,
        _principal: &str,
        _grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        Ok(Vec::new())
    }

    /// Reads the cluster back after a converge that took grant
    /// `revoked_id` (`revoked`) out of `grants` (spec 10.2): whether any of
    /// its access is still there beyond what `grants` and the access that
    /// existed before Tollgate justify. An API that answered a delete with
    /// success but kept the object shows up here, and the revoke counts as
    /// failed. No default: a strategy that cannot say is a strategy whose
    /// revokes are never verified.
    async fn verify_removed(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        revoked_id: &str,
        revoked: &AccessSpec,
        grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError>;

    /// After a revoke's converge: removes what the revoked grant's row
    /// recorded creating, found by name rather than by marks, whatever it
    /// now carries (session-rbac: its bindings). Strategies whose converge
    /// already judges objects by the row have nothing to do.
    async fn remove_recorded(
        &self,
        _cluster: &ClusterPolicy,
        _principal: &str,
        _revoked_id: &str,
    ) -> Result<(), AccessError> {
        Ok(())
    }

    /// Brings the backstop schedules of `principal` up to date with
    /// `grants` without changing any access: the reconciler's repair for a
    /// schedule a converge could not move (spec 10.1). Strategies without
    /// an AWS-side backstop have nothing to do.
    ///
    /// A baseline whose standing access is gone is not restored by a
    /// schedule either: it is rewritten and reported as in `converge`.
    async fn backstop(
        &self,
        _cluster: &ClusterPolicy,
        _principal: &str,
        _grants: &[InForce<'_>],
    ) -> Result<Converged, AccessError> {
        Ok(Converged::default())
    }

    /// Makes the cluster give `principal` exactly what `grants` need, plus
    /// whatever it had before Tollgate. `creator` names the grant credited
    /// with any object this call has to create.
    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        creator: &str,
    ) -> Result<Converged, AccessError>;
}

/// `serve --dry-run`: every write is logged instead of made, and nothing
/// is reported as owned, so the reconciler has nothing to remove.
pub struct DryRun;

#[async_trait]
impl AccessEngine for DryRun {
    async fn owned(
        &self,
        _cluster: &ClusterPolicy,
        _look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError> {
        Ok(Vec::new())
    }

    /// Nothing was changed, so nothing is read back: the revoke is
    /// recorded with `verified: false`.
    async fn verify_removed(
        &self,
        _cluster: &ClusterPolicy,
        _principal: &str,
        _revoked_id: &str,
        _revoked: &AccessSpec,
        _grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError> {
        Ok(ReadBack::NotChecked)
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        _creator: &str,
    ) -> Result<Converged, AccessError> {
        let ids: Vec<&str> = grants.iter().map(|g| g.grant_id).collect();
        tracing::info!(
            dry_run = true,
            cluster = %cluster.name,
            strategy = cluster.strategy.name(),
            %principal,
            grants_in_force = ?ids,
            "dry run: would converge access to these grants"
        );
        Ok(Converged::default())
    }
}

/// Whether `store` says grant `grant_id` created `object` on `cluster`.
pub async fn store_knows(
    store: &dyn crate::store::AccessRecords,
    cluster: &str,
    grant_id: Option<&str>,
    object: &Intent,
) -> Result<bool, AccessError> {
    let Some(id) = grant_id.and_then(crate::domain::request::RequestId::parse) else {
        return Ok(false);
    };
    Ok(store.get(&id).await?.is_some_and(|row| {
        row.access.cluster == cluster && crate::domain::grant::row_records(&row, object)
    }))
}

/// The last line before any AWS or Kubernetes call: whatever the service
/// checked, no grant whose namespaces are not all namespace names reaches a
/// strategy (spec 9.7).
pub fn refuse_invalid_namespaces(
    cluster: &ClusterPolicy,
    grants: &[InForce<'_>],
) -> Result<(), AccessError> {
    for g in grants {
        if let Some(message) = crate::domain::grant::invalid_namespace(g.spec) {
            return Err(AccessError::InvalidNamespace {
                cluster: cluster.name.clone(),
                grant: g.grant_id.to_string(),
                message,
            });
        }
    }
    Ok(())
}

/// Dispatches to the strategy each `ClusterPolicy` it is given names: the
/// caller passes the cluster with the strategy a grant was made with.
pub struct Engine {
    access_entry: access_entry::AccessEntryStrategy,
    session_rbac: session_rbac::SessionRbacStrategy,
    aws_auth: aws_auth::AwsAuthStrategy,
}

impl Engine {
    pub fn new(
        clients: Arc<AwsClients>,
        kube: Arc<kube::KubeClients>,
        store: Arc<dyn crate::store::Store>,
        instance: &str,
    ) -> Self {
        Engine {
            access_entry: access_entry::AccessEntryStrategy::new(clients, store.clone())
                .with_instance(instance),
            session_rbac: session_rbac::SessionRbacStrategy::new(kube.clone(), store)
                .with_instance(instance),
            aws_auth: aws_auth::AwsAuthStrategy::new(kube),
        }
    }
}

impl Engine {
    fn strategy(&self, cluster: &ClusterPolicy) -> &dyn AccessEngine {
        match cluster.strategy {
            Strategy::AccessEntry => &self.access_entry,
            Strategy::SessionRbac => &self.session_rbac,
            Strategy::AwsAuth => &self.aws_auth,
        }
    }
}

#[async_trait]
impl AccessEngine for Engine {
    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        creator: &str,
    ) -> Result<Converged, AccessError> {
        // A grant naming a namespace that is no name (a row edited in the
        // store: EKS would take `*` as a wildcard) is left out, which can
        // only mean less access, and the converge still runs: one such row
        // must not keep the principal's other grants from being revoked.
        // The step then fails, naming it.
        let valid: Vec<InForce<'_>> = grants
            .iter()
            .filter(|g| crate::domain::grant::invalid_namespace(g.spec).is_none())
            .cloned()
            .collect();
        let converged = self
            .strategy(cluster)
            .converge(cluster, principal, &valid, creator)
            .await?;
        refuse_invalid_namespaces(cluster, grants)?;
        Ok(converged)
    }

    async fn owned(
        &self,
        cluster: &ClusterPolicy,
        look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError> {
        self.strategy(cluster).owned(cluster, look).await
    }

    async fn missing(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        self.strategy(cluster)
            .missing(cluster, principal, grants)
            .await
    }

    async fn verify_removed(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        revoked_id: &str,
        revoked: &AccessSpec,
        grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError> {
        self.strategy(cluster)
            .verify_removed(cluster, principal, revoked_id, revoked, grants)
            .await
    }

    async fn backstop(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Converged, AccessError> {
        self.strategy(cluster)
            .backstop(cluster, principal, grants)
            .await
    }

    async fn remove_recorded(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        revoked_id: &str,
    ) -> Result<(), AccessError> {
        self.strategy(cluster)
            .remove_recorded(cluster, principal, revoked_id)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review M1: the access layer itself refuses a grant whose
    /// namespaces are no names, before any strategy (any AWS or
    /// Kubernetes call) sees it.
    #[test]
    fn a_wildcard_namespace_never_reaches_a_strategy() {
        let cluster = crate::domain::policy::tests::cluster();
        let mut spec = AccessSpec {
            cluster: cluster.name.clone(),
            role: "edit".into(),
            principal: "arn:aws:iam::111122223333:role/alice".into(),
            policy_arn: Some("arn:aws:eks::aws:cluster-access-policy/edit".into()),
            namespaces: vec!["payments".into()],
            cluster_role: None,
            groups: vec![],
            k8s_user: None,
            strategy: None,
        };
        let grant = |spec: &AccessSpec| {
            let in_force = [InForce {
                grant_id: "R-00001",
                spec,
                expires_at: None,
            }];
            refuse_invalid_namespaces(&cluster, &in_force)
        };
        assert!(grant(&spec).is_ok());
        for bad in ["*", "kube-*"] {
            spec.namespaces = vec!["payments".into(), bad.into()];
            match grant(&spec) {
                Err(AccessError::InvalidNamespace { grant, .. }) => assert_eq!(grant, "R-00001"),
                other => panic!("{bad} reached a strategy: {other:?}"),
            }
        }
    }
}
