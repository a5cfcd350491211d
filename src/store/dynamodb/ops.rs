//! The requests DynamoStore makes: conditional transactions, paginated
//! queries, batched imports, and the audit sequence.

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, ReturnValue, TransactWriteItem};
use rand::Rng;
use std::time::Duration;
use time::OffsetDateTime;

use super::error::{classify, describe, refusal, Refusal};
use super::items::*;
use super::DynamoStore;
use crate::domain::audit::AuditEvent;
use crate::domain::request::{Request, RequestId};
use crate::store::{epoch_ms, AuditEntry, AuditPosition, Store, StoreError};

/// A transaction that met another in flight on the same item wrote nothing;
/// trying again settles it (the version condition still decides who wins).
const CONTENDED_ATTEMPTS: u32 = 8;
/// DynamoDB's limit on items in one `TransactWriteItems`.
pub(super) const MAX_TRANSACT_ITEMS: usize = 100;
/// DynamoDB's limit on items in one `BatchWriteItem`.
const MAX_BATCH_ITEMS: usize = 25;

/// What a transaction was for, to name the right error when it is refused.
pub(super) enum Guard<'a> {
    Create(&'a RequestId),
    Update(&'a RequestId),
    Import(&'a RequestId),
}

impl DynamoStore {
    pub(super) fn err<E, R>(
        &self,
        op: &str,
        e: aws_sdk_dynamodb::error::SdkError<E, R>,
    ) -> StoreError
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

    pub(super) fn put(&self, item: Item) -> Result<TransactWriteItem, StoreError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::Backend(describe(&e)))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The request row, written only if the stored row has `expected`
    /// version (`None`: only if there is no row).
    pub(super) fn put_row(
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

    pub(super) fn delete(&self, key: Item) -> Result<TransactWriteItem, StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .build()
            .map_err(|e| StoreError::Backend(describe(&e)))?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// The `LIVE` item writes that move a row from `prev` (none: a new
    /// row) to `next`: put while it is live, delete once it is terminal. A
    /// transaction may not touch an item twice, so a key that did not move
    /// is only put.
    pub(super) fn live_writes(
        &self,
        prev: Option<&Request>,
        next: &Request,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let old = prev.filter(|p| !p.state.is_terminal()).map(live_sk);
        let mut writes = Vec::new();
        match live_item(next)? {
            Some(item) => {
                if let Some(moved) = old.filter(|k| *k != live_sk(next)) {
                    writes.push(self.delete(key(LIVE, moved))?);
                }
                writes.push(self.put(item)?);
            }
            None => {
                if let Some(k) = old {
                    writes.push(self.delete(key(LIVE, k))?);
                }
            }
        }
        Ok(writes)
    }

    /// Reserves `count` audit sequence numbers, unique across replicas.
    pub(super) async fn next_seqs(&self, count: usize) -> Result<Vec<u64>, StoreError> {
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
    pub(super) async fn audit_puts(
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

    pub(super) async fn transact(
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

    /// Writes `items` in transactions of at most `MAX_TRANSACT_ITEMS`, for
    /// writes that are not one state change (audit appends, prune); the
    /// first refused transaction stops it and says why.
    pub(super) async fn transact_chunks(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<(), Refusal> {
        for chunk in items.chunks(MAX_TRANSACT_ITEMS) {
            if let Err(e) = self
                .client
                .transact_write_items()
                .set_transact_items(Some(chunk.to_vec()))
                .send()
                .await
            {
                return Err(refusal(&self.table, e));
            }
        }
        Ok(())
    }

    pub(super) async fn condition_failed(&self, guard: Guard<'_>) -> StoreError {
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
    pub(super) async fn query(
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

    pub(super) async fn batch_write(&self, items: Vec<Item>) -> Result<(), StoreError> {
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

    pub(super) async fn baseline_writes(
        &self,
        items: Vec<TransactWriteItem>,
    ) -> Result<(), StoreError> {
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
