//! The grant engine's adapters. Each strategy converges one (cluster,
//! principal) to what a set of grants needs, touching only what Tollgate owns.

use async_trait::async_trait;
use std::sync::Arc;

use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::request::AccessSpec;

pub mod access_entry;
pub mod aws;

pub use aws::AwsClients;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the {strategy} strategy is not available in this version of Tollgate")]
    StrategyNotBuilt { strategy: &'static str },
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

impl AccessError {
    /// A short, stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AccessError::StrategyNotBuilt { .. } => "strategy_not_built",
            AccessError::Connect { .. } => "connect",
            AccessError::Aws { operation, .. } => operation,
            AccessError::Store(_) => "store",
        }
    }
}

/// One grant that should be in force, with the id of the request it came from.
#[derive(Clone, Debug)]
pub struct InForce<'a> {
    pub grant_id: &'a str,
    pub spec: &'a AccessSpec,
}

#[async_trait]
pub trait AccessEngine: Send + Sync + 'static {
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

/// Dispatches to the strategy each cluster is configured with.
pub struct Engine {
    access_entry: access_entry::AccessEntryStrategy,
}

impl Engine {
    pub fn new(clients: Arc<AwsClients>, store: Arc<dyn crate::store::Store>) -> Self {
        Engine {
            access_entry: access_entry::AccessEntryStrategy::new(clients, store),
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
        match cluster.strategy {
            Strategy::AccessEntry => {
                self.access_entry
                    .converge(cluster, principal, grants, creator)
                    .await
            }
            other => Err(AccessError::StrategyNotBuilt {
                strategy: other.name(),
            }),
        }
    }
}
