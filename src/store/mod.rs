//! Durable state. Every state change is one atomic write: the request row,
//! its due-index entry and its audit events together, guarded by
//! compare-and-swap on the version the caller read.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use time::OffsetDateTime;

use crate::domain::audit::AuditEvent;
use crate::domain::grant::Baselines;
use crate::domain::inbox::Interaction;
use crate::domain::request::{Request, RequestId};

pub mod cli;
pub mod copy;
pub mod dynamodb;
mod open;
pub mod prune;
pub mod sealed;
pub mod sled_store;

pub use dynamodb::DynamoStore;
pub use open::open;
pub use sealed::SealedStore;
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
    /// The backend could not be reached or refused for load (network,
    /// timeout, throttling, a 5xx): nothing was decided, and the same call
    /// may succeed later.
    #[error("store backend unavailable: {0}")]
    Unavailable(String),
    #[error("store holds unreadable data under {key}: {message}")]
    Corrupt { key: String, message: String },
    /// The row's integrity MAC is missing or wrong (spec 9.8): it is not
    /// acted on as written (the service ends it as `tampered`).
    #[error("request {0} failed its integrity check; not acted on")]
    Tampered(String),
}

impl StoreError {
    /// The kind, for the `error` label of `tollgate_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Conflict(_) => "store_conflict",
            StoreError::Exists(_) => "store_exists",
            StoreError::NotFound(_) => "not_found",
            StoreError::Backend(_) => "store_backend",
            StoreError::Unavailable(_) => "store_unavailable",
            StoreError::Corrupt { .. } => "store_corrupt",
            StoreError::Tampered(_) => "tampered",
        }
    }

    /// Whether the failure is the backend being out of reach rather than
    /// anything about the data: callers report "temporarily unavailable"
    /// and try again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Where an audit event sits in the log: the time of the write that made it
/// (milliseconds since the epoch), then a sequence number unique within the
/// store. Both backends order the log by it, and `store copy` keeps it, so a
/// copied log reads back in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AuditPosition {
    pub at_ms: u64,
    pub seq: u64,
}

/// One entry of the click inbox as read back.
#[derive(Clone, Debug, PartialEq)]
pub enum InboxEntry {
    Click(Interaction),
    /// Written by another version, damaged, or not Tollgate's: removed and
    /// reported, never acted on.
    Unreadable {
        key: String,
        message: String,
    },
}

impl InboxEntry {
    /// Oldest first; unreadable entries before every click, so they are
    /// cleared first.
    fn order(&self) -> Option<OffsetDateTime> {
        match self {
            InboxEntry::Click(c) => Some(c.received_at),
            InboxEntry::Unreadable { .. } => None,
        }
    }

    pub(crate) fn sorted(mut entries: Vec<InboxEntry>) -> Vec<InboxEntry> {
        entries.sort_by_key(InboxEntry::order);
        entries
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub position: AuditPosition,
    pub event: AuditEvent,
}

/// Milliseconds since the epoch; instants before it (never written by
/// Tollgate) clamp to zero, as they always have in the sled key.
pub(crate) fn epoch_ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

pub(crate) fn from_epoch_ms(ms: u64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok()
}

/// The slice of the store an access strategy needs: a request's row (to
/// tell whether it recorded an object, spec 9.2) and the baselines of
/// what a principal held before Tollgate. Strategies hold this, not the
/// whole `Store`, so no adapter can move a request's lifecycle.
#[async_trait]
pub trait AccessRecords: Send + Sync {
    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError>;
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
}

/// Every store serves the slice through its `Arc<dyn Store>` (a trait
/// object cannot be unsized a second time, so the `Arc` is what implements
/// it).
#[async_trait]
impl AccessRecords for Arc<dyn Store> {
    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        self.as_ref().get(id).await
    }
    async fn baselines(&self, cluster: &str, principal: &str) -> Result<Baselines, StoreError> {
        self.as_ref().baselines(cluster, principal).await
    }
    async fn record_baselines(
        &self,
        cluster: &str,
        principal: &str,
        baselines: &Baselines,
    ) -> Result<(), StoreError> {
        self.as_ref()
            .record_baselines(cluster, principal, baselines)
            .await
    }
    async fn forget_baselines(
        &self,
        cluster: &str,
        principal: &str,
        policies: &[String],
    ) -> Result<(), StoreError> {
        self.as_ref()
            .forget_baselines(cluster, principal, policies)
            .await
    }
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

    /// Every audit event with its position, in log order (for `store copy`).
    async fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError>;
    /// Writes events at the given positions verbatim; an event already at a
    /// position is overwritten (with the same content on a re-run).
    async fn import_audit(&self, entries: Vec<AuditEntry>) -> Result<(), StoreError>;
    /// Writes a request row verbatim, version included, with its due-index
    /// entry, replacing any row with its id (for `store copy`).
    async fn import_request(&self, req: &Request) -> Result<(), StoreError>;
    /// Removes ended request rows and the audit events at `audit` (for
    /// `store prune`). A row that is not terminal is refused and nothing is
    /// removed; terminal rows have no due or live entries to remove.
    async fn remove_ended(
        &self,
        ids: &[RequestId],
        audit: &[AuditPosition],
    ) -> Result<(), StoreError>;
    /// Every recorded baseline as (cluster, principal, baselines).
    async fn all_baselines(&self) -> Result<Vec<(String, String, Baselines)>, StoreError>;
    // No method below has a default: a backend states whether it is shared,
    // how it grants a lease and how it reads live rows, so a new backend
    // cannot inherit a lease that always succeeds or a "live" read that
    // scans the whole history.

    /// Whether several processes share this store, so grants and revokes
    /// are claimed per row and background jobs take a lease. One process on
    /// an embedded store needs neither.
    fn is_shared(&self) -> bool;
    /// Takes or renews the named lease for `holder` until `until`, if nobody
    /// else holds it past `now`.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Gives a lease back before its term, if `holder` still has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records a Slack click before it is answered: Slack never delivers
    /// an acknowledged interaction again, so a 200 is only given for a
    /// click this has made durable. `Ok(false)`: that click (same key) is
    /// already recorded and not yet processed.
    async fn record_interaction(&self, item: &Interaction) -> Result<bool, StoreError>;
    /// Recorded clicks not yet processed, oldest first; an entry that
    /// cannot be read is returned as such (by key), never failing the rest.
    async fn interactions(&self) -> Result<Vec<InboxEntry>, StoreError>;
    /// A processed click leaves the inbox (nothing to do if it already has).
    async fn finish_interaction(&self, key: &str) -> Result<(), StoreError>;

    /// Requests not yet in a terminal state: the ones that may still hold
    /// or get access, read from an index kept in the same write as the
    /// row, never by filtering the history.
    async fn live(&self) -> Result<Vec<Request>, StoreError>;

    /// The live requests of one principal on one cluster: what a grant or a
    /// revoke converges against, so it must not cost a scan of the store.
    async fn live_for(&self, cluster: &str, principal: &str) -> Result<Vec<Request>, StoreError>;
}
