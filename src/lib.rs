//! Tollgate: just-in-time, time-boxed access to Amazon EKS, approved in Slack.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::await_holding_lock
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod access;
pub mod admin;
pub mod aws_sdk;
pub mod clock;
pub mod config;
pub mod discover;
pub mod domain;
pub mod http;
pub mod locks;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod slack;
pub mod store;
pub mod telemetry;
pub mod tunables;
