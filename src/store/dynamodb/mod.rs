//! The DynamoDB backend, for several replicas sharing one store. Every state
//! change is one `TransactWriteItems` — request row, due-index entries and
//! audit events — with a condition on the row's version, so it gives the same
//! compare-and-swap guarantee as one sled transaction. The layout is in
//! `items`.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, ReturnValue, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use rand::Rng;
use std::time::Duration;
use time::OffsetDateTime;

mod error;
mod items;
mod table;

pub use table::{init, verify, InitOutcome};

use error::{classify, describe, refusal, Refusal};
use items::*;

use super::{epoch_ms, AuditEntry, AuditPosition, Store, StoreError};
use crate::domain::audit::AuditEvent;
use crate::domain::grant::Baselines;
use crate::domain::request::{Request, RequestId};

/// A transaction that met another in flight on the same item wrote nothing;
/// trying again settles it (the version condition still decides who wins).
const CONTENDED_ATTEMPTS: u32 = 8;
/// DynamoDB's limit on items in one `TransactWriteItems`.
const MAX_TRANSACT_ITEMS: usize = 100;
/// DynamoDB's limit on items in one `BatchWriteItem`.
const MAX_BATCH_ITEMS: usize = 25;

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

/// What a transaction was for, to name the right error when it is refused.
enum Guard<'a> {
    Create(&'a RequestId),
    Update(&'a RequestId),
    Import(&'a RequestId),
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
        let config = crate::access::aws::load_base_config().await;
        DynamoStore::new(Client::new(&config), table)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn err<E, R>(&self, op: &str, e: aws_sdk_dynamodb::error::SdkError<E, R>) -> StoreError
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        classify(&self.table, op, e)
    }

    fn put(&self, item: Item) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::Backend(describe(&e)))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The request row, written only if the stored row has `expected`
    /// version (`None`: only if there is no row).
    fn put_row(
        &self,
        req: &Request,
        expected: Option<u64>,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(request_item(req)?));
        put = match expected {
            None => put.condition_expression("attribute_not_exists(#pk)"),
            Some(v) => put
                .condition_expression("#v = :v")
                .expression_attribute_names("#v", VERSION)
                .expression_attribute_values(":v", n(v)),
        };
        if expected.is_none() {
            put = put.expression_attribute_names("#pk", PK);
        }
        let put = put.build().map_err(|e| StoreError::Backend(describe(&e)))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    fn delete(&self, key: Item) -> Result<TransactWriteItem, StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .build()
            .map_err(|e| StoreError::Backend(describe(&e)))?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// Reserves `count` audit sequence numbers, unique across replicas.
    async fn next_seqs(&self, count: usize) -> Result<Vec<u64>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(META, AUDIT_SEQ)))
            .update_expression("ADD #s :n")
            .expression_attribute_names("#s", "seq")
            .expression_attribute_values(":n", n(count as u64))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| self.err("UpdateItem (audit sequence)", e))?;
        let last = out
            .attributes()
            .and_then(|a| a.get("seq"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("{META}/{AUDIT_SEQ}"),
                message: "audit sequence counter is not a number".into(),
            })?;
        let first = last + 1 - count as u64;
        Ok((first..=last).collect())
    }

    /// Audit items for one write: all at the time of its first event (as
    /// sled keys them), in the order given.
    async fn audit_puts(
        &self,
        audit: Vec<AuditEvent>,
        fallback: OffsetDateTime,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let at_ms = epoch_ms(audit.first().map(|e| e.ts).unwrap_or(fallback));
        let seqs = self.next_seqs(audit.len()).await?;
        seqs.into_iter()
            .zip(audit)
            .map(|(seq, event)| {
                self.put(audit_item(&AuditEntry {
                    position: AuditPosition { at_ms, seq },
                    event,
                })?)
            })
            .collect()
    }

    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        guard: Guard<'_>,
    ) -> Result<(), StoreError> {
        if items.len() > MAX_TRANSACT_ITEMS {
            return Err(StoreError::Backend(format!(
                "one write of {} items exceeds DynamoDB's limit of {MAX_TRANSACT_ITEMS} per transaction",
                items.len()
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The token makes the SDK's own retries of this attempt
            // idempotent: a commit whose answer was lost is not re-run into
            // a false conflict.
            let token: String = {
                let mut rng = rand::thread_rng();
                (0..32)
                    .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
                    .collect()
            };
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(token)
                .send()
                .await;
            let e = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            match refusal(&self.table, e) {
                Refusal::Condition => return Err(self.condition_failed(guard).await),
                Refusal::Contended if attempt < CONTENDED_ATTEMPTS => {
                    let jitter = rand::thread_rng().gen_range(0..20u64);
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt) + jitter))
                        .await;
                }
                Refusal::Contended => {
                    let id = match guard {
                        Guard::Create(id) | Guard::Update(id) | Guard::Import(id) => id,
                    };
                    return Err(StoreError::Conflict(id.to_string()));
                }
                Refusal::Other(e) => return Err(e),
            }
        }
    }

    async fn condition_failed(&self, guard: Guard<'_>) -> StoreError {
        match guard {
            Guard::Create(id) => StoreError::Exists(id.to_string()),
            Guard::Import(id) => StoreError::Conflict(id.to_string()),
            // Rows are never deleted, so a row missing now was missing then.
            Guard::Update(id) => match self.get(id).await {
                Ok(None) => StoreError::NotFound(id.to_string()),
                _ => StoreError::Conflict(id.to_string()),
            },
        }
    }

    /// Every item of one partition whose sort key satisfies `condition`, in
    /// sort-key order, across pages.
    async fn query(
        &self,
        pk: &str,
        condition: Option<(&str, Vec<(&str, AttributeValue)>)>,
        limit: Option<i32>,
    ) -> Result<Vec<Item>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(pk))
                .set_exclusive_start_key(start.take())
                .set_limit(limit);
            match &condition {
                Some((expr, values)) => {
                    q = q
                        .key_condition_expression(format!("#pk = :pk AND {expr}"))
                        .expression_attribute_names("#sk", SK);
                    for (name, value) in values {
                        q = q.expression_attribute_values(*name, value.clone());
                    }
                }
                None => q = q.key_condition_expression("#pk = :pk"),
            }
            let page = q.send().await.map_err(|e| self.err("Query", e))?;
            out.extend(page.items().iter().cloned());
            if limit.is_some_and(|l| out.len() >= l as usize) {
                return Ok(out);
            }
            match page.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn batch_write(&self, items: Vec<Item>) -> Result<(), StoreError> {
        use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
        for chunk in items.chunks(MAX_BATCH_ITEMS) {
            let mut pending = chunk
                .iter()
                .map(|item| {
                    PutRequest::builder()
                        .set_item(Some(item.clone()))
                        .build()
                        .map(|put| WriteRequest::builder().put_request(put).build())
                        .map_err(|e| StoreError::Backend(describe(&e)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut attempt = 0u32;
            while !pending.is_empty() {
                attempt += 1;
                if attempt > 10 {
                    return Err(StoreError::Unavailable(format!(
                        "DynamoDB BatchWriteItem on table {}: {} items still unprocessed after {} attempts",
                        self.table,
                        pending.len(),
                        attempt - 1
                    )));
                }
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| self.err("BatchWriteItem", e))?;
                pending = out
                    .unprocessed_items()
                    .and_then(|u| u.get(&self.table))
                    .cloned()
                    .unwrap_or_default();
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
            }
        }
        Ok(())
    }

    async fn baseline_writes(&self, items: Vec<TransactWriteItem>) -> Result<(), StoreError> {
        for chunk in items.chunks(MAX_TRANSACT_ITEMS) {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(chunk.to_vec()))
                .send()
                .await;
            if let Err(e) = result {
                return Err(match refusal(&self.table, e) {
                    Refusal::Other(e) => e,
                    _ => StoreError::Unavailable(format!(
                        "DynamoDB TransactWriteItems on table {}: baselines contended, try again",
                        self.table
                    )),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn create(&self, req: &Request, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let mut items = vec![self.put_row(req, None)?];
        if let Some(t) = req.next_due() {
            items.push(self.put(due_item(t, &req.id))?);
        }
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
        items.extend(self.audit_puts(audit, OffsetDateTime::now_utc()).await?);
        self.transact(items, Guard::Update(&prev.id)).await?;
        Ok(next)
    }

    async fn append_audit(&self, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let items = self.audit_puts(audit, OffsetDateTime::now_utc()).await?;
        for chunk in items.chunks(MAX_TRANSACT_ITEMS) {
            if let Err(e) = self
                .client
                .transact_write_items()
                .set_transact_items(Some(chunk.to_vec()))
                .send()
                .await
            {
                return Err(match refusal(&self.table, e) {
                    Refusal::Other(e) => e,
                    _ => StoreError::Unavailable(format!(
                        "DynamoDB TransactWriteItems on table {}: audit write refused, try again",
                        self.table
                    )),
                });
            }
        }
        Ok(())
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
        let prefix = baseline_prefix(cluster, principal);
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
        self.transact(items, Guard::Import(&req.id)).await
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
