//! The DynamoDB backend, for several replicas sharing one store. Every state
//! change is one `TransactWriteItems` — request row, due-index entries and
//! audit events — with a condition on the row's version, so it gives the same
//! compare-and-swap guarantee as one sled transaction. The layout is in
//! `items`.

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use time::OffsetDateTime;

mod error;
mod items;
mod ops;
mod table;

pub use table::{init, verify, InitOutcome};

use error::Refusal;
use items::*;
use ops::Guard;

use super::{epoch_ms, AuditEntry, InboxEntry, Store, StoreError};
use crate::domain::audit::AuditEvent;
use crate::domain::grant::Baselines;
use crate::domain::inbox::Interaction;
use crate::domain::request::{Request, RequestId};

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// A store on `table` with the AWS default chain (region, credentials,
    /// `AWS_ENDPOINT_URL`).
    pub async fn connect(table: &str) -> Self {
        let config = crate::aws_sdk::load_base_config().await;
        DynamoStore::new(Client::new(&config), table)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The one item a request row is stored as. A request in a terminal
    /// state has no due or live items, so ended history can be bulk-loaded
    /// with `BatchWriteItem` of these alone (the benchmarks seed 100 000
    /// ended requests this way); every other write goes through the
    /// store's transactions.
    pub fn row_item(
        req: &Request,
    ) -> Result<
        std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
        StoreError,
    > {
        request_item(req)
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn create(&self, req: &Request, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let mut items = vec![self.put_row(req, None)?];
        if let Some(t) = req.next_due() {
            items.push(self.put(due_item(t, &req.id))?);
        }
        items.extend(self.live_writes(None, req)?);
        items.extend(self.audit_puts(audit, req.created_at).await?);
        self.transact(items, Guard::Create(&req.id)).await
    }

    async fn update(
        &self,
        prev: &Request,
        mut next: Request,
        audit: Vec<AuditEvent>,
    ) -> Result<Request, StoreError> {
        next.version = prev.version + 1;
        let mut items = vec![self.put_row(&next, Some(prev.version))?];
        let old_due = prev.next_due().map(|t| due_sk(t, &prev.id));
        let new_due = next.next_due();
        // One transaction may not touch an item twice: an unchanged due
        // entry is left alone.
        if old_due != new_due.map(|t| due_sk(t, &prev.id)) {
            if let Some(sk) = old_due {
                items.push(self.delete(key(DUE, sk))?);
            }
            if let Some(t) = new_due {
                items.push(self.put(due_item(t, &prev.id))?);
            }
        }
        items.extend(self.live_writes(Some(prev), &next)?);
        items.extend(self.audit_puts(audit, OffsetDateTime::now_utc()).await?);
        self.transact(items, Guard::Update(&prev.id)).await?;
        Ok(next)
    }

    async fn append_audit(&self, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let items = self.audit_puts(audit, OffsetDateTime::now_utc()).await?;
        self.transact_chunks(items).await.map_err(|r| match r {
            Refusal::Other(e) => e,
            _ => StoreError::Unavailable(format!(
                "DynamoDB TransactWriteItems on table {}: audit write refused, try again",
                self.table
            )),
        })
    }

    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(REQUEST, id.as_str())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", e))?;
        out.item().map(request_of).transpose()
    }

    async fn list(&self) -> Result<Vec<Request>, StoreError> {
        self.query(REQUEST, None, None)
            .await?
            .iter()
            .map(request_of)
            .collect()
    }

    async fn next_due(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        self.query(DUE, None, Some(1))
            .await?
            .first()
            .map(time_of_sk)
            .transpose()
    }

    async fn due(&self, now: OffsetDateTime) -> Result<Vec<RequestId>, StoreError> {
        let end = ms_key(epoch_ms(now) + 1);
        self.query(DUE, Some(("#sk < :end", vec![(":end", s(end))])), None)
            .await?
            .iter()
            .map(due_id_of)
            .collect()
    }

    async fn audit_since(
        &self,
        since: Option<OffsetDateTime>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let start = ms_key(since.map(epoch_ms).unwrap_or(0));
        self.query(
            AUDIT,
            Some(("#sk >= :start", vec![(":start", s(start))])),
            None,
        )
        .await?
        .iter()
        .map(|item| audit_of(item).map(|entry| entry.event))
        .collect()
    }

    async fn baselines(&self, cluster: &str, principal: &str) -> Result<Baselines, StoreError> {
        let prefix = principal_prefix(cluster, principal);
        self.query(
            BASELINE,
            Some(("begins_with(#sk, :prefix)", vec![(":prefix", s(prefix))])),
            None,
        )
        .await?
        .iter()
        .map(|item| baseline_of(item).map(|row| (row.policy, row.scope)))
        .collect()
    }

    async fn record_baselines(
        &self,
        cluster: &str,
        principal: &str,
        baselines: &Baselines,
    ) -> Result<(), StoreError> {
        let items = baselines
            .iter()
            .map(|(policy, scope)| self.put(baseline_item(cluster, principal, policy, scope)?))
            .collect::<Result<Vec<_>, _>>()?;
        self.baseline_writes(items).await
    }

    async fn forget_baselines(
        &self,
        cluster: &str,
        principal: &str,
        policies: &[String],
    ) -> Result<(), StoreError> {
        let items = policies
            .iter()
            .map(|policy| self.delete(key(BASELINE, baseline_sk(cluster, principal, policy))))
            .collect::<Result<Vec<_>, _>>()?;
        self.baseline_writes(items).await
    }

    /// Every write is durable when DynamoDB answers it.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Replicas share the table: grants and revokes are claimed per row and
    /// background jobs take leases.
    fn is_shared(&self) -> bool {
        true
    }

    /// A conditional put: the lease item is written only if nobody holds
    /// it, the holder is us (a renewal), or the holder's term has passed.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut item = key(LEASE, name);
        item.insert(HOLDER.into(), s(holder));
        item.insert(UNTIL_MS.into(), n(epoch_ms(until)));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk) OR #holder = :me OR #until < :now")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#holder", HOLDER)
            .expression_attribute_names("#until", UNTIL_MS)
            .expression_attribute_values(":me", s(holder))
            .expression_attribute_values(":now", n(epoch_ms(now)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("PutItem (lease)", e)),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(LEASE, name)))
            .condition_expression("#holder = :me")
            .expression_attribute_names("#holder", HOLDER)
            .expression_attribute_values(":me", s(holder))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Someone else holds it now (ours had lapsed): nothing to give back.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("DeleteItem (lease)", e)),
        }
    }

    /// One consistent read of a tiny item: the table answers or it does not.
    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(META, AUDIT_SEQ)))
            .consistent_read(true)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.err("GetItem (ping)", e))
    }

    async fn record_interaction(&self, item: &Interaction) -> Result<bool, StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(interaction_item(item)?))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("PutItem (inbox)", e)),
        }
    }

    async fn interactions(&self) -> Result<Vec<InboxEntry>, StoreError> {
        let entries = self
            .query(INBOX, None, None)
            .await?
            .iter()
            .map(|item| match interaction_of(item) {
                Ok(click) => InboxEntry::Click(click),
                Err(e) => InboxEntry::Unreadable {
                    key: item
                        .get(SK)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default(),
                    message: e.to_string(),
                },
            })
            .collect();
        Ok(InboxEntry::sorted(entries))
    }

    async fn finish_interaction(&self, key_text: &str) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(INBOX, key_text)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.err("DeleteItem (inbox)", e))
    }

    async fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.query(AUDIT, None, None)
            .await?
            .iter()
            .map(audit_of)
            .collect()
    }

    async fn import_audit(&self, entries: Vec<AuditEntry>) -> Result<(), StoreError> {
        let Some(max_seq) = entries.iter().map(|e| e.position.seq).max() else {
            return Ok(());
        };
        let items = entries
            .iter()
            .map(audit_item)
            .collect::<Result<Vec<_>, _>>()?;
        self.batch_write(items).await?;
        // Sequence numbers handed out later must not land on an imported
        // position, so the counter moves past them.
        let raised = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(META, AUDIT_SEQ)))
            .update_expression("SET #s = :max")
            .condition_expression("attribute_not_exists(#s) OR #s < :max")
            .expression_attribute_names("#s", "seq")
            .expression_attribute_values(":max", n(max_seq))
            .send()
            .await;
        match raised {
            Ok(_) => Ok(()),
            Err(e)
                if aws_sdk_dynamodb::error::ProvideErrorMetadata::code(&e)
                    == Some("ConditionalCheckFailedException") =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("UpdateItem (audit sequence)", e)),
        }
    }

    async fn import_request(&self, req: &Request) -> Result<(), StoreError> {
        let old = self.get(&req.id).await?;
        let mut items = vec![self.put_row(req, old.as_ref().map(|o| o.version))?];
        let old_due = old
            .as_ref()
            .and_then(Request::next_due)
            .map(|t| due_sk(t, &req.id));
        let new_due = req.next_due();
        if old_due != new_due.map(|t| due_sk(t, &req.id)) {
            if let Some(sk) = old_due {
                items.push(self.delete(key(DUE, sk))?);
            }
            if let Some(t) = new_due {
                items.push(self.put(due_item(t, &req.id))?);
            }
        }
        items.extend(self.live_writes(old.as_ref(), req)?);
        self.transact(items, Guard::Import(&req.id)).await
    }

    /// Deletes in transactions of at most 100 items; each row's delete is
    /// conditional on its stored state being terminal, so a row that is not
    /// ended is never removed (its transaction is refused whole).
    async fn remove_ended(
        &self,
        ids: &[RequestId],
        audit: &[crate::store::AuditPosition],
    ) -> Result<(), StoreError> {
        use aws_sdk_dynamodb::types::{Delete, TransactWriteItem};
        let ended: Vec<&str> = crate::domain::request::State::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.label())
            .collect();
        let placeholders: Vec<String> = (0..ended.len()).map(|i| format!(":e{i}")).collect();
        let mut items = Vec::new();
        for id in ids {
            let mut delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(REQUEST, id.as_str())))
                .condition_expression(format!(
                    "attribute_not_exists(#pk) OR #state IN ({})",
                    placeholders.join(", ")
                ))
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#state", "state");
            for (p, label) in placeholders.iter().zip(&ended) {
                delete = delete.expression_attribute_values(p, s(*label));
            }
            let delete = delete
                .build()
                .map_err(|e| StoreError::Backend(error::describe(&e)))?;
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        for position in audit {
            items.push(self.delete(key(AUDIT, audit_sk(*position)))?);
        }
        self.transact_chunks(items).await.map_err(|r| match r {
            Refusal::Other(e) => e,
            Refusal::Condition => StoreError::Backend(
                "a request selected for pruning is not ended; nothing of it was removed".into(),
            ),
            Refusal::Contended => StoreError::Unavailable(format!(
                "DynamoDB TransactWriteItems on table {}: prune refused, run it again",
                self.table
            )),
        })
    }

    /// One Query of the `LIVE` partition: its items carry the rows, so the
    /// cost is the live requests' whatever the history holds.
    async fn live(&self) -> Result<Vec<Request>, StoreError> {
        self.query(LIVE, None, None)
            .await?
            .iter()
            .map(request_of)
            .collect()
    }

    async fn live_for(&self, cluster: &str, principal: &str) -> Result<Vec<Request>, StoreError> {
        let prefix = principal_prefix(cluster, principal);
        self.query(
            LIVE,
            Some(("begins_with(#sk, :prefix)", vec![(":prefix", s(prefix))])),
            None,
        )
        .await?
        .iter()
        .map(request_of)
        .collect()
    }

    async fn all_baselines(&self) -> Result<Vec<(String, String, Baselines)>, StoreError> {
        let mut out: Vec<(String, String, Baselines)> = Vec::new();
        for item in self.query(BASELINE, None, None).await? {
            let row = baseline_of(&item)?;
            // Sort keys start with cluster then principal: one group is
            // contiguous.
            match out.last_mut() {
                Some((c, p, b)) if *c == row.cluster && *p == row.principal => {
                    b.insert(row.policy, row.scope);
                }
                _ => out.push((
                    row.cluster,
                    row.principal,
                    Baselines::from([(row.policy, row.scope)]),
                )),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod manifest_tests;
