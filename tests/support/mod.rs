//! Test doubles shared by the integration tests: MiniStack for AWS, a Slack
//! Web API stand-in, and Slack-style request signing.
//!
//! Every file in `tests/` is its own crate and uses a different subset of
//! this module, so unused items are expected.
#![allow(dead_code)]

pub mod aws_proxy;
pub mod backstop_player;
pub mod kube;
pub mod kube_rbac;
pub mod loopback;
pub mod lying_eks;
pub mod ministack;
pub mod sign;
pub mod slack;
pub mod tollgate;

/// rustls 0.23 refuses to build TLS configs until a process-wide crypto
/// provider is chosen; tollgate depends on rustls with only `ring`.
pub fn install_crypto_provider() {
    // Err means another test in this process installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
