//! The AWS SDK configuration every adapter starts from (the grant engine's
//! EKS and STS clients, the DynamoDB store): one HTTPS client on the ring
//! TLS provider and the same timeouts everywhere.

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::time::Duration;

/// The SDK's default HTTPS client would bring aws-lc-rs next to the ring
/// provider the rest of the binary uses; both at once make rustls refuse to
/// pick one at run time.
pub async fn load_base_config() -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    // Without operation timeouts a hung connection would hold a revoke (and
    // every revoke queued behind it) indefinitely.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(30))
        .build();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .load()
        .await
}
