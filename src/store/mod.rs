//! Durable state. Every state change is one atomic write: the request row,
//! its due-index entry and its audit events together, guarded by
//! compare-and-swap on the version the caller read.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::audit::AuditEvent;
use crate::domain::grant::Baselines;
use crate::domain::request::{Request, RequestId};

pub mod sled_store;

pub use sled_store::SledStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else wrote the row since it was read: re-read and decide again.
    #[error("request {0} changed concurrently")]
    Conflict(String),
    #[error("request {0} already exists")]
    Exists(String),
    #[error("request {0} not found")]
    NotFound(String),
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("store holds unreadable data under {key}: {message}")]
    Corrupt { key: String, message: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create(&self, req: &Request, audit: Vec<AuditEvent>) -> Result<(), StoreError>;
    /// Writes `next` only if the stored row still has `prev.version`; returns
    /// the row as written (version bumped).
    async fn update(
        &self,
        prev: &Request,
        next: Request,
        audit: Vec<AuditEvent>,
    ) -> Result<Request, StoreError>;
    /// Audit events that belong to no request's state change (the
    /// reconciler's findings).
    async fn append_audit(&self, audit: Vec<AuditEvent>) -> Result<(), StoreError>;
    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError>;
    async fn list(&self) -> Result<Vec<Request>, StoreError>;
    /// The earliest instant at which some request needs the scheduler.
    async fn next_due(&self) -> Result<Option<OffsetDateTime>, StoreError>;
    /// Requests whose next action is due at or before `now`, earliest first.
    async fn due(&self, now: OffsetDateTime) -> Result<Vec<RequestId>, StoreError>;
    async fn audit_since(
        &self,
        since: Option<OffsetDateTime>,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// What existed before Tollgate first touched each access policy of a
    /// principal on a cluster.
    async fn baselines(&self, cluster: &str, principal: &str) -> Result<Baselines, StoreError>;
    async fn record_baselines(
        &self,
        cluster: &str,
        principal: &str,
        baselines: &Baselines,
    ) -> Result<(), StoreError>;
    async fn forget_baselines(
        &self,
        cluster: &str,
        principal: &str,
        policies: &[String],
    ) -> Result<(), StoreError>;
    async fn flush(&self) -> Result<(), StoreError>;

    /// Requests not yet in a terminal state: the ones that may still hold
    /// or get access. Backends with an index of them override this; the
    /// default filters `list`.
    async fn live(&self) -> Result<Vec<Request>, StoreError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect())
    }

    /// The live requests of one principal on one cluster: what a grant or a
    /// revoke converges against, so it must not cost a scan of the store.
    async fn live_for(&self, cluster: &str, principal: &str) -> Result<Vec<Request>, StoreError> {
        Ok(self
            .live()
            .await?
            .into_iter()
            .filter(|r| r.access.cluster == cluster && r.access.principal == principal)
            .collect())
    }
}
