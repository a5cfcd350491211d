//! The table layout: one table, string keys `pk` and `sk`, one fixed
//! partition per kind of item so every read is a Query (never a Scan) and
//! sort-key order is the order the store must return.
//!
//! | pk         | sk                                   | attributes |
//! |------------|--------------------------------------|------------|
//! | `REQUEST`  | request id                           | `doc` (JSON), `version` (N), `state` |
//! | `DUE`      | due ms (20 digits) `#` request id     | `id` |
//! | `AUDIT`    | write ms (20 digits) `#` seq (20 digits) | `doc` (JSON) |
//! | `BASELINE` | JSON `[cluster, principal, policy]`  | `cluster`, `principal`, `policy`, `scope` (JSON) |
//! | `LIVE`     | JSON `[cluster, principal, id]`      | `doc` (JSON, the row's copy), `version` (N) |
//! | `META`     | `audit-seq`                          | `seq` (N): last audit sequence handed out |
//! | `META`     | `live-index`                         | `version` (N): the live index is complete |
//! | `INBOX`    | click key (hex)                      | `doc` (JSON): a Slack click recorded, not yet processed |

use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;
use time::OffsetDateTime;

use crate::domain::audit::AuditEvent;
use crate::domain::grant::Scope;
use crate::domain::inbox::Interaction;
use crate::domain::request::{Request, RequestId};
use crate::store::{epoch_ms, from_epoch_ms, AuditEntry, AuditPosition, StoreError};

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) const PK: &str = "pk";
pub(super) const SK: &str = "sk";
pub(super) const REQUEST: &str = "REQUEST";
pub(super) const DUE: &str = "DUE";
pub(super) const AUDIT: &str = "AUDIT";
pub(super) const BASELINE: &str = "BASELINE";
pub(super) const META: &str = "META";
pub(super) const AUDIT_SEQ: &str = "audit-seq";
/// Requests not yet in a terminal state, one item each, written in the same
/// transaction as the row: what grants, revokes, listings and the reconciler
/// read, so their cost follows live access, not the history.
pub(super) const LIVE: &str = "LIVE";
/// Present once every live row has its `LIVE` item (a table made before the
/// index existed gets them from `store init`).
pub(super) const LIVE_INDEX: &str = "live-index";
pub(super) const LIVE_INDEX_VERSION: u64 = 1;
/// Leases of background jobs (`sk` = the job's name), held by one replica.
pub(super) const LEASE: &str = "LEASE";
/// Slack clicks recorded before their 200 and not yet processed.
pub(super) const INBOX: &str = "INBOX";
pub(super) const HOLDER: &str = "holder";
pub(super) const UNTIL_MS: &str = "until_ms";
pub(super) const VERSION: &str = "version";

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn key(pk: &str, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_string(), s(pk)), (SK.to_string(), s(sk))])
}

/// Fixed width, so string order is numeric order.
pub(super) fn ms_key(ms: u64) -> String {
    format!("{ms:020}")
}

pub(super) fn due_sk(t: OffsetDateTime, id: &RequestId) -> String {
    format!("{}#{}", ms_key(epoch_ms(t)), id.as_str())
}

pub(super) fn audit_sk(position: AuditPosition) -> String {
    format!("{}#{:020}", ms_key(position.at_ms), position.seq)
}

/// A JSON array prefix is unambiguous whatever the names contain: every
/// string is quoted and escaped.
pub(super) fn principal_prefix(cluster: &str, principal: &str) -> String {
    let mut prefix = serde_json::json!([cluster, principal]).to_string();
    prefix.pop();
    prefix.push(',');
    prefix
}

pub(super) fn live_sk(req: &Request) -> String {
    serde_json::json!([req.access.cluster, req.access.principal, req.id.as_str()]).to_string()
}

/// The live item of a row, or `None` for a terminal row (which has none).
pub(super) fn live_item(req: &Request) -> Result<Option<Item>, StoreError> {
    if req.state.is_terminal() {
        return Ok(None);
    }
    let mut item = key(LIVE, live_sk(req));
    item.insert("doc".into(), s(encode(req)?));
    item.insert(VERSION.into(), n(req.version));
    Ok(Some(item))
}

pub(super) fn baseline_sk(cluster: &str, principal: &str, policy: &str) -> String {
    serde_json::json!([cluster, principal, policy]).to_string()
}

fn corrupt(item: &Item, message: impl Into<String>) -> StoreError {
    let pk = text(item, PK).unwrap_or("?");
    let sk = text(item, SK).unwrap_or("?");
    StoreError::Corrupt {
        key: format!("{pk}/{sk}"),
        message: message.into(),
    }
}

pub(super) fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn required<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    text(item, name).ok_or_else(|| corrupt(item, format!("no string attribute `{name}`")))
}

fn json<T: serde::de::DeserializeOwned>(item: &Item, name: &str) -> Result<T, StoreError> {
    serde_json::from_str(required(item, name)?).map_err(|e| corrupt(item, format!("`{name}`: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(e.to_string()))
}

pub(super) fn request_item(req: &Request) -> Result<Item, StoreError> {
    let mut item = key(REQUEST, req.id.as_str());
    item.insert("doc".into(), s(encode(req)?));
    item.insert(VERSION.into(), n(req.version));
    // Only for a person reading the table; the row is `doc`.
    item.insert("state".into(), s(req.state.label()));
    Ok(item)
}

pub(super) fn request_of(item: &Item) -> Result<Request, StoreError> {
    json(item, "doc")
}

pub(super) fn interaction_item(item: &Interaction) -> Result<Item, StoreError> {
    let mut out = key(INBOX, item.key.as_str());
    out.insert("doc".into(), s(encode(item)?));
    Ok(out)
}

pub(super) fn interaction_of(item: &Item) -> Result<Interaction, StoreError> {
    json(item, "doc")
}

pub(super) fn due_item(t: OffsetDateTime, id: &RequestId) -> Item {
    let mut item = key(DUE, due_sk(t, id));
    item.insert("id".into(), s(id.as_str()));
    item
}

pub(super) fn due_id_of(item: &Item) -> Result<RequestId, StoreError> {
    let id = required(item, "id")?;
    RequestId::parse(id).ok_or_else(|| corrupt(item, format!("bad request id {id:?} in due index")))
}

/// The instant encoded in a due or audit sort key.
pub(super) fn time_of_sk(item: &Item) -> Result<OffsetDateTime, StoreError> {
    let sk = required(item, SK)?;
    sk.split('#')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .and_then(from_epoch_ms)
        .ok_or_else(|| corrupt(item, "sort key does not start with a time"))
}

pub(super) fn audit_item(entry: &AuditEntry) -> Result<Item, StoreError> {
    let mut item = key(AUDIT, audit_sk(entry.position));
    item.insert("doc".into(), s(encode(&entry.event)?));
    Ok(item)
}

pub(super) fn audit_of(item: &Item) -> Result<AuditEntry, StoreError> {
    let sk = required(item, SK)?;
    let position = sk
        .split_once('#')
        .and_then(|(ms, seq)| Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?)))
        .map(|(at_ms, seq)| AuditPosition { at_ms, seq })
        .ok_or_else(|| corrupt(item, "audit sort key is not time#sequence"))?;
    let event: AuditEvent = json(item, "doc")?;
    Ok(AuditEntry { position, event })
}

pub(super) fn baseline_item(
    cluster: &str,
    principal: &str,
    policy: &str,
    scope: &Option<Scope>,
) -> Result<Item, StoreError> {
    let mut item = key(BASELINE, baseline_sk(cluster, principal, policy));
    item.insert("cluster".into(), s(cluster));
    item.insert("principal".into(), s(principal));
    item.insert("policy".into(), s(policy));
    item.insert("scope".into(), s(encode(scope)?));
    Ok(item)
}

pub(super) struct BaselineRow {
    pub cluster: String,
    pub principal: String,
    pub policy: String,
    pub scope: Option<Scope>,
}

pub(super) fn baseline_of(item: &Item) -> Result<BaselineRow, StoreError> {
    Ok(BaselineRow {
        cluster: required(item, "cluster")?.to_string(),
        principal: required(item, "principal")?.to_string(),
        policy: required(item, "policy")?.to_string(),
        scope: json(item, "scope")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn sort_keys_order_like_the_sled_keys() {
        let id = RequestId::parse("R-AAAAA").unwrap();
        let early = due_sk(datetime!(2026-11-23 12:00 UTC), &id);
        let late = due_sk(datetime!(2026-11-23 12:00:00.001 UTC), &id);
        assert!(early < late);
        let a = audit_sk(AuditPosition { at_ms: 5, seq: 99 });
        let b = audit_sk(AuditPosition { at_ms: 5, seq: 100 });
        let c = audit_sk(AuditPosition { at_ms: 6, seq: 1 });
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn principal_prefix_cannot_match_another_principal() {
        let prefix = principal_prefix("c", "arn:a");
        assert!(baseline_sk("c", "arn:a", "p").starts_with(&prefix));
        assert!(!baseline_sk("c", "arn:a\",\"x", "p").starts_with(&prefix));
        assert!(!baseline_sk("c", "arn:ab", "p").starts_with(&prefix));
    }
}
