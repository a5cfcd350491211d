//! Row integrity on writes (spec 9.8, `[store] integrity_key_env`): a
//! `Store` around another that puts the HMAC of each request row and each
//! audit event into it right before it is written. The backends stay
//! unaware of the key; every writer (the service's CAS writes, creates,
//! admin commands) goes through this one place, so none can forget to
//! sign. Recorded Slack clicks are sealed too, and the one read judged
//! here is the inbox's (see `interactions`). Other reads are passed
//! through unjudged: whether a row may be acted on
//! is the service's decision (`Service::acts_on`), which also has to
//! answer for it (audit `tampered`, revoke).
//!
//! `import_request` / `import_audit` (`store copy`) keep rows and events
//! verbatim, MAC included: the canonical form names no store, so a copy
//! verifies under the same key.

use async_trait::async_trait;
use std::sync::Arc;
use time::OffsetDateTime;

use super::{AuditEntry, AuditPosition, InboxEntry, Store, StoreError};
use crate::domain::audit::AuditEvent;
use crate::domain::grant::Baselines;
use crate::domain::inbox::Interaction;
use crate::domain::integrity::RowKey;
use crate::domain::request::{Request, RequestId};

pub struct SealedStore {
    inner: Arc<dyn Store>,
    key: RowKey,
}

impl SealedStore {
    /// `store` itself when no key is configured.
    pub fn wrap(store: Arc<dyn Store>, key: Option<&RowKey>) -> Arc<dyn Store> {
        match key {
            Some(key) => Arc::new(SealedStore {
                inner: store,
                key: key.clone(),
            }),
            None => store,
        }
    }

    fn seal_audit(&self, audit: Vec<AuditEvent>) -> Vec<AuditEvent> {
        audit.into_iter().map(|e| self.key.seal_audit(e)).collect()
    }
}

#[async_trait]
impl Store for SealedStore {
    async fn create(&self, req: &Request, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let sealed = self.key.seal_row(req.clone());
        self.inner.create(&sealed, self.seal_audit(audit)).await
    }
    async fn update(
        &self,
        prev: &Request,
        mut next: Request,
        audit: Vec<AuditEvent>,
    ) -> Result<Request, StoreError> {
        // The MAC covers the version the backend writes (the `Store`
        // contract: `prev.version + 1`), so an older version's MAC never
        // fits this one.
        next.version = prev.version + 1;
        let next = self.key.seal_row(next);
        self.inner.update(prev, next, self.seal_audit(audit)).await
    }
    async fn append_audit(&self, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        self.inner.append_audit(self.seal_audit(audit)).await
    }
    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self) -> Result<Vec<Request>, StoreError> {
        self.inner.list().await
    }
    async fn next_due(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        self.inner.next_due().await
    }
    async fn due(&self, now: OffsetDateTime) -> Result<Vec<RequestId>, StoreError> {
        self.inner.due(now).await
    }
    async fn audit_since(
        &self,
        since: Option<OffsetDateTime>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.audit_since(since).await
    }
    async fn baselines(&self, cluster: &str, principal: &str) -> Result<Baselines, StoreError> {
        self.inner.baselines(cluster, principal).await
    }
    async fn record_baselines(
        &self,
        cluster: &str,
        principal: &str,
        baselines: &Baselines,
    ) -> Result<(), StoreError> {
        self.inner
            .record_baselines(cluster, principal, baselines)
            .await
    }
    async fn forget_baselines(
        &self,
        cluster: &str,
        principal: &str,
        policies: &[String],
    ) -> Result<(), StoreError> {
        self.inner
            .forget_baselines(cluster, principal, policies)
            .await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_entries().await
    }
    async fn import_audit(&self, entries: Vec<AuditEntry>) -> Result<(), StoreError> {
        self.inner.import_audit(entries).await
    }
    async fn import_request(&self, req: &Request) -> Result<(), StoreError> {
        self.inner.import_request(req).await
    }
    async fn remove_ended(
        &self,
        ids: &[RequestId],
        audit: &[AuditPosition],
    ) -> Result<(), StoreError> {
        self.inner.remove_ended(ids, audit).await
    }
    async fn all_baselines(&self) -> Result<Vec<(String, String, Baselines)>, StoreError> {
        self.inner.all_baselines().await
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.inner.try_lease(name, holder, until, now).await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.inner.release_lease(name, holder).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn record_interaction(&self, item: &Interaction) -> Result<bool, StoreError> {
        let sealed = self.key.seal_click(item.clone());
        self.inner.record_interaction(&sealed).await
    }
    /// A click is the one read this wrapper judges: the inbox turns an
    /// entry into a vote with no row to check, so an entry that does not
    /// carry its MAC is returned unreadable (removed and counted, never
    /// processed).
    async fn interactions(&self) -> Result<Vec<InboxEntry>, StoreError> {
        let entries = self.inner.interactions().await?;
        Ok(entries
            .into_iter()
            .map(|entry| match entry {
                InboxEntry::Click(click) if !self.key.click_intact(&click) => {
                    InboxEntry::Unreadable {
                        key: click.key,
                        message: "the click does not carry its MAC (tampered)".into(),
                    }
                }
                other => other,
            })
            .collect())
    }
    async fn finish_interaction(&self, key: &str) -> Result<(), StoreError> {
        self.inner.finish_interaction(key).await
    }
    async fn live(&self) -> Result<Vec<Request>, StoreError> {
        self.inner.live().await
    }
    async fn live_for(&self, cluster: &str, principal: &str) -> Result<Vec<Request>, StoreError> {
        self.inner.live_for(cluster, principal).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::State;

    #[tokio::test]
    async fn rows_and_events_are_written_sealed_at_the_version_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let key = RowKey::new(&[9; 32]).unwrap();
        let raw: Arc<dyn Store> = Arc::new(super::super::SledStore::open(tmp.path()).unwrap());
        let store = SealedStore::wrap(raw.clone(), Some(&key));
        let row = crate::store::sled_store::tests::request(
            "R-7F3K2",
            time::macros::datetime!(2026-11-23 12:00 UTC),
        );
        let event = AuditEvent::for_request(
            &row,
            "requested",
            "U1",
            row.created_at,
            serde_json::json!({}),
        );
        store.create(&row, vec![event]).await.unwrap();
        let stored = raw.get(&row.id).await.unwrap().unwrap();
        assert!(key.row_intact(&stored));
        let mut next = stored.clone();
        next.state = State::Cancelled;
        let written = store.update(&stored, next, vec![]).await.unwrap();
        let stored = raw.get(&row.id).await.unwrap().unwrap();
        assert_eq!(stored.version, written.version);
        assert!(
            key.row_intact(&stored),
            "the MAC covers the version written"
        );
        let events = raw.audit_since(None).await.unwrap();
        assert!(events.iter().all(|e| key.audit_intact(e)), "{events:?}");
        // Without a key the store is itself: nothing sealed.
        let plain = SealedStore::wrap(raw.clone(), None);
        assert!(Arc::ptr_eq(&plain, &raw));
    }

    /// A click written into the inbox by anyone but Tollgate (no MAC, or
    /// one for other content) is read back unreadable, never as a vote.
    #[tokio::test]
    async fn a_click_in_the_inbox_counts_only_with_its_mac() {
        use crate::domain::inbox::{Click, Interaction};
        let tmp = tempfile::tempdir().unwrap();
        let key = RowKey::new(&[9; 32]).unwrap();
        let raw: Arc<dyn Store> = Arc::new(super::super::SledStore::open(tmp.path()).unwrap());
        let store = SealedStore::wrap(raw.clone(), Some(&key));
        let now = time::macros::datetime!(2026-11-23 12:00 UTC);
        let click = |ts: &str| {
            Interaction::new(Click::Approve, "R-7F3K2", "U0APP", Some(ts), "", None, now)
        };
        store.record_interaction(&click("1")).await.unwrap();
        raw.record_interaction(&click("2")).await.unwrap();
        let mut moved = key.seal_click(click("3"));
        moved.user_id = "U0OTHER".into();
        raw.record_interaction(&moved).await.unwrap();
        let read = store.interactions().await.unwrap();
        let clicks: Vec<&Interaction> = read
            .iter()
            .filter_map(|e| match e {
                InboxEntry::Click(c) => Some(c),
                InboxEntry::Unreadable { .. } => None,
            })
            .collect();
        assert_eq!(clicks.len(), 1, "{read:?}");
        assert_eq!(clicks[0].key, click("1").key);
        assert_eq!(read.len(), 3, "the forged two are reported, not dropped");
    }
}
