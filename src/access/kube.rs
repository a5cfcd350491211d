//! Kubernetes clients per cluster, authenticated with Tollgate's own EKS
//! token and rebuilt well before the token's 15 minutes run out.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::aws::{describe_error, AwsClients};
use super::eks_token;
use super::AccessError;
use crate::clock::Clock;
use crate::domain::policy::ClusterPolicy;

/// A client is replaced after this long, leaving five minutes of token
/// validity for requests already under way.
pub const REFRESH_AFTER: Duration =
    Duration::from_secs(eks_token::TOKEN_LIFETIME.as_secs() - 5 * 60);

struct Cached {
    client: kube::Client,
    built_at: OffsetDateTime,
}

pub struct KubeClients {
    aws: Arc<AwsClients>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<String, Cached>>,
    /// Clusters whose API server answered 401: their cached client is
    /// rebuilt (with a fresh token) on the next call instead of failing
    /// until the periodic rebuild. A plain lock, so error paths can mark a
    /// cluster without awaiting.
    evicted: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn connect_error(cluster: &ClusterPolicy, message: impl Into<String>) -> AccessError {
    AccessError::Connect {
        cluster: cluster.name.clone(),
        message: message.into(),
    }
}

/// Certificates of a PEM bundle as DER, which is what kube's TLS setup takes.
pub fn pem_to_der(pem: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        if line.starts_with("-----BEGIN CERTIFICATE") {
            body = Some(String::new());
        } else if line.starts_with("-----END CERTIFICATE") {
            if let Some(b64) = body.take() {
                if let Ok(der) = STANDARD.decode(b64) {
                    out.push(der);
                }
            }
        } else if let Some(b) = body.as_mut() {
            b.push_str(line);
        }
    }
    out
}

impl KubeClients {
    pub fn new(aws: Arc<AwsClients>, clock: Arc<dyn Clock>) -> Self {
        KubeClients {
            aws,
            clock,
            cache: Mutex::new(HashMap::new()),
            evicted: Default::default(),
        }
    }

    /// Called with every error a cluster's API server returns: a 401 means
    /// the token was refused (rotated credentials, a clock jump), so the
    /// client holding it is dropped.
    pub fn note_error(&self, cluster: &ClusterPolicy, e: &kube::Error) {
        if matches!(e, kube::Error::Api(status) if status.code == 401) {
            tracing::warn!(cluster = %cluster.name, "API server refused Tollgate's token; rebuilding the client");
            if let Ok(mut evicted) = self.evicted.lock() {
                evicted.insert(cluster.name.clone());
            }
        }
    }

    pub async fn client(&self, cluster: &ClusterPolicy) -> Result<kube::Client, AccessError> {
        let now = self.clock.now();
        let mut cache = self.cache.lock().await;
        let evicted = self
            .evicted
            .lock()
            .map(|mut e| e.remove(&cluster.name))
            .unwrap_or(false);
        if let Some(c) = cache.get(&cluster.name).filter(|_| !evicted) {
            if now - c.built_at < REFRESH_AFTER {
                return Ok(c.client.clone());
            }
        }
        let client = self.build(cluster, now).await?;
        cache.insert(
            cluster.name.clone(),
            Cached {
                client: client.clone(),
                built_at: now,
            },
        );
        Ok(client)
    }

    /// Endpoint and CA: from config when given (private or self-managed
    /// endpoints), otherwise from DescribeCluster.
    async fn endpoint(
        &self,
        cluster: &ClusterPolicy,
    ) -> Result<(String, Vec<Vec<u8>>), AccessError> {
        let ca_from_file = |path: &str| -> Result<Vec<Vec<u8>>, AccessError> {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| connect_error(cluster, format!("cannot read ca_file {path}: {e}")))?;
            let der = pem_to_der(&pem);
            if der.is_empty() {
                return Err(connect_error(
                    cluster,
                    format!("ca_file {path} holds no PEM certificate"),
                ));
            }
            Ok(der)
        };
        if let Some(endpoint) = &cluster.endpoint {
            let ca = match &cluster.ca_file {
                Some(path) => ca_from_file(path)?,
                None => Vec::new(),
            };
            return Ok((endpoint.clone(), ca));
        }
        let eks = self.aws.eks(cluster).await;
        let out = eks
            .describe_cluster()
            .name(&cluster.name)
            .send()
            .await
            .map_err(|e| {
                connect_error(cluster, format!("DescribeCluster: {}", describe_error(&e)))
            })?;
        let info = out
            .cluster()
            .ok_or_else(|| connect_error(cluster, "DescribeCluster returned no cluster"))?;
        let endpoint = info
            .endpoint()
            .ok_or_else(|| connect_error(cluster, "DescribeCluster returned no endpoint"))?
            .to_string();
        let ca = match &cluster.ca_file {
            Some(path) => ca_from_file(path)?,
            None => {
                let data = info
                    .certificate_authority()
                    .and_then(|c| c.data())
                    .unwrap_or_default();
                let pem = STANDARD
                    .decode(data)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                pem_to_der(&pem)
            }
        };
        Ok((endpoint, ca))
    }

    async fn build(
        &self,
        cluster: &ClusterPolicy,
        now: OffsetDateTime,
    ) -> Result<kube::Client, AccessError> {
        let (endpoint, ca) = self.endpoint(cluster).await?;
        let sdk = self.aws.cluster_config(cluster).await;
        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| connect_error(cluster, "no AWS credentials configured"))?;
        use aws_credential_types::provider::ProvideCredentials;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(|e| connect_error(cluster, format!("AWS credentials: {e}")))?;
        let token = eks_token::token(&credentials, &cluster.region, &cluster.name, now.into())
            .map_err(|e| connect_error(cluster, e))?;
        let uri = endpoint
            .parse()
            .map_err(|e| connect_error(cluster, format!("endpoint {endpoint}: {e}")))?;
        let mut config = kube::Config::new(uri);
        if !ca.is_empty() {
            config.root_cert = Some(ca);
        }
        config.auth_info.token = Some(SecretString::from(token));
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(15));
        config.write_timeout = Some(Duration::from_secs(15));
        kube::Client::try_from(config)
            .map_err(|e| connect_error(cluster, format!("Kubernetes client: {e}")))
    }
}
