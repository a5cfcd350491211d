//! AWS SDK clients per cluster: one base config from the default chain
//! (env, profile, IRSA; `AWS_ENDPOINT_URL` honoured), and per cluster its
//! region and, when set, an assumed role.

use aws_config::{Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use std::collections::HashMap;
use tokio::sync::Mutex;

use crate::domain::policy::ClusterPolicy;

pub struct AwsClients {
    base: SdkConfig,
    eks: Mutex<HashMap<String, aws_sdk_eks::Client>>,
    scheduler: Mutex<HashMap<String, aws_sdk_scheduler::Client>>,
}

/// Kept here for callers of the access adapters; the loader is shared with
/// the DynamoDB store.
pub use crate::aws_sdk::load_base_config;

impl AwsClients {
    pub fn new(base: SdkConfig) -> Self {
        AwsClients {
            base,
            eks: Mutex::new(HashMap::new()),
            scheduler: Mutex::new(HashMap::new()),
        }
    }

    /// The SDK config for acting on a cluster: its region, and its
    /// `assume_role_arn` when set (credentials refreshed by the provider).
    pub async fn cluster_config(&self, cluster: &ClusterPolicy) -> SdkConfig {
        let region = Region::new(cluster.region.clone());
        let mut builder = self.base.to_builder().region(region.clone());
        if let Some(role) = &cluster.assume_role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role.clone())
                .session_name("tollgate")
                .region(region)
                .configure(&self.base)
                .build()
                .await;
            builder = builder.credentials_provider(SharedCredentialsProvider::new(provider));
        }
        builder.build()
    }

    pub async fn eks(&self, cluster: &ClusterPolicy) -> aws_sdk_eks::Client {
        let mut cache = self.eks.lock().await;
        if let Some(client) = cache.get(&cluster.name) {
            return client.clone();
        }
        let client = aws_sdk_eks::Client::new(&self.cluster_config(cluster).await);
        cache.insert(cluster.name.clone(), client.clone());
        client
    }

    /// EventBridge Scheduler in the cluster's account and region, where its
    /// backstop schedules live (Scheduler passes only same-account roles).
    pub async fn scheduler(&self, cluster: &ClusterPolicy) -> aws_sdk_scheduler::Client {
        let mut cache = self.scheduler.lock().await;
        if let Some(client) = cache.get(&cluster.name) {
            return client.clone();
        }
        let client = aws_sdk_scheduler::Client::new(&self.cluster_config(cluster).await);
        cache.insert(cluster.name.clone(), client.clone());
        client
    }

    pub async fn sts(&self, cluster: Option<&ClusterPolicy>) -> aws_sdk_sts::Client {
        match cluster {
            Some(c) => aws_sdk_sts::Client::new(&self.cluster_config(c).await),
            None => aws_sdk_sts::Client::new(&self.base),
        }
    }
}

/// The error text of an SDK call with its whole cause chain; never includes
/// credentials.
/// An AWS call on `cluster` that failed, with the SDK's description.
pub fn aws_error<E: std::error::Error>(
    cluster: &crate::domain::policy::ClusterPolicy,
    operation: &'static str,
    e: &E,
) -> super::AccessError {
    super::AccessError::Aws {
        cluster: cluster.name.clone(),
        operation,
        message: describe_error(e),
    }
}

pub fn describe_error<E: std::error::Error>(e: &E) -> String {
    aws_sdk_eks::error::DisplayErrorContext(e).to_string()
}
