//! The grant engine's adapters. Each strategy converges one (cluster,
//! principal) to what a set of grants needs, touching only what Tollgate owns.

use async_trait::async_trait;
use std::sync::Arc;

use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::request::AccessSpec;

pub mod access_entry;
pub mod aws;
pub mod aws_auth;
pub mod eks_token;
pub mod kube;
pub mod permissions;
pub mod session_rbac;

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
}

/// One grant that should be in force, with the id of the request it came from.
#[derive(Clone, Debug)]
pub struct InForce<'a> {
    pub grant_id: &'a str,
    pub spec: &'a AccessSpec,
    /// When the grant ends; Kubernetes objects carry it as an annotation.
    pub expires_at: Option<time::OffsetDateTime>,
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
}

#[async_trait]
pub trait AccessEngine: Send + Sync + 'static {
    /// Everything in the cluster that carries Tollgate's marks, for the
    /// reconciler to compare with the grants in force.
    async fn owned(&self, cluster: &ClusterPolicy) -> Result<Vec<Owned>, AccessError>;

    /// Removes an owned object whose grant the store has never heard of,
    /// after `converge` has taken away what it knew to be Tollgate's. Only
    /// the access-entry strategy has anything left to do then: an entry it
    /// tagged, with associations it has no record of.
    async fn remove_orphan(
        &self,
        _cluster: &ClusterPolicy,
        _object: &Owned,
    ) -> Result<(), AccessError> {
        Ok(())
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
    ) -> Result<(), AccessError>;
}

/// `serve --dry-run`: every write is logged instead of made, and nothing
/// is reported as owned, so the reconciler has nothing to remove.
pub struct DryRun;

#[async_trait]
impl AccessEngine for DryRun {
    async fn owned(&self, _cluster: &ClusterPolicy) -> Result<Vec<Owned>, AccessError> {
        Ok(Vec::new())
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        _creator: &str,
    ) -> Result<(), AccessError> {
        let ids: Vec<&str> = grants.iter().map(|g| g.grant_id).collect();
        tracing::info!(
            dry_run = true,
            cluster = %cluster.name,
            strategy = cluster.strategy.name(),
            %principal,
            grants_in_force = ?ids,
            "dry run: would converge access to these grants"
        );
        Ok(())
    }
}

/// Dispatches to the strategy each cluster is configured with.
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
    ) -> Self {
        Engine {
            access_entry: access_entry::AccessEntryStrategy::new(clients, store),
            session_rbac: session_rbac::SessionRbacStrategy::new(kube.clone()),
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
    ) -> Result<(), AccessError> {
        self.strategy(cluster)
            .converge(cluster, principal, grants, creator)
            .await
    }

    async fn owned(&self, cluster: &ClusterPolicy) -> Result<Vec<Owned>, AccessError> {
        self.strategy(cluster).owned(cluster).await
    }

    async fn remove_orphan(
        &self,
        cluster: &ClusterPolicy,
        object: &Owned,
    ) -> Result<(), AccessError> {
        self.strategy(cluster).remove_orphan(cluster, object).await
    }
}
