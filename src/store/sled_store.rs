//! The embedded default backend. One sled transaction spans the request row,
//! the due index and the audit log, so they can never disagree.

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use time::OffsetDateTime;

use super::{epoch_ms, AuditEntry, AuditPosition, InboxEntry, Store, StoreError};
use crate::domain::audit::AuditEvent;
use crate::domain::grant::{Baselines, Scope};
use crate::domain::inbox::Interaction;
use crate::domain::request::{Request, RequestId};

pub struct SledStore {
    db: sled::Db,
    requests: sled::Tree,
    due: sled::Tree,
    audit: sled::Tree,
    baselines: sled::Tree,
    /// Index of the requests not yet terminal, keyed cluster, principal,
    /// id: a grant or revoke reads the other grants of its principal with
    /// one prefix scan instead of decoding every row ever written.
    live: sled::Tree,
    /// Slack clicks recorded before their 200 and not yet processed, by
    /// click key.
    inbox: sled::Tree,
    flushes: FlushGate,
}

/// Group commit. sled 0.34 deadlocks when many threads flush at once (its
/// flushes wait on each other inside the log), and each flush is an fsync:
/// so one flush runs at a time, and a writer whose write an already
/// finished flush covered does not flush again.
#[derive(Default)]
struct FlushGate {
    /// Tickets taken by writers after their write was applied.
    written: AtomicU64,
    /// Every ticket up to this one is durable.
    durable: AtomicU64,
    running: tokio::sync::Mutex<()>,
}

/// sled's page cache defaults to 1 GiB; Tollgate's working set (live rows,
/// the due index, the tail of the audit log) is a few MiB, and the rest of
/// the history is read only by `audit export` and the admin listing.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Set once the live index has been built from the rows, so stores written
/// before the index existed get it on their first open.
const LIVE_INDEX_MARKER: &[u8] = b"index:live:v1";

/// The store is the approval authority (spec 9.8), and holds Slack
/// response URLs of recorded clicks: a directory Tollgate creates is
/// owner-only (0700); an existing one it owns loses every permission for
/// others (its group bits stay: a Kubernetes volume's come from the pod's
/// `fsGroup`); one anybody may write to is refused.
fn private_store_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let cannot =
        |e: std::io::Error| StoreError::Backend(format!("cannot create {}: {e}", path.display()));
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(cannot)?;
    }
    let meta = std::fs::metadata(path).map_err(cannot)?;
    let mode = meta.mode();
    if mode & 0o002 != 0 {
        return Err(StoreError::Backend(format!(
            "{} is writable by every user (mode {:o}); the store decides who gets access, so make it owner-only: chmod 700 {}",
            path.display(),
            mode & 0o7777,
            path.display()
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if mode & 0o007 != 0 {
        if meta.uid() == me {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7770))
                .map_err(cannot)?;
        } else {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o7777), "the store directory is readable by other users and not this user's to change");
        }
    }
    Ok(())
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Milliseconds since the epoch, big-endian, so byte order is time order.
fn time_key(t: OffsetDateTime) -> [u8; 8] {
    epoch_ms(t).to_be_bytes()
}

fn audit_key(position: AuditPosition) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&position.at_ms.to_be_bytes());
    key[8..].copy_from_slice(&position.seq.to_be_bytes());
    key
}

fn audit_position(key: &[u8]) -> Result<AuditPosition, StoreError> {
    let part = |range: std::ops::Range<usize>| {
        key.get(range)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    match (part(0..8), part(8..16), key.len()) {
        (Some(at_ms), Some(seq), 16) => Ok(AuditPosition { at_ms, seq }),
        _ => Err(StoreError::Corrupt {
            key: format!("{key:02x?}"),
            message: "audit key is not 8 bytes of time and 8 of sequence".into(),
        }),
    }
}

fn due_key(t: OffsetDateTime, id: &RequestId) -> Vec<u8> {
    let mut k = time_key(t).to_vec();
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

fn time_of_key(key: &[u8]) -> Option<OffsetDateTime> {
    let ms = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok()
}

fn live_prefix(cluster: &str, principal: &str) -> Vec<u8> {
    format!("{cluster}\u{0}{principal}\u{0}").into_bytes()
}

fn live_key(req: &Request) -> Vec<u8> {
    let mut k = live_prefix(&req.access.cluster, &req.access.principal);
    k.extend_from_slice(req.id.as_str().as_bytes());
    k
}

fn baseline_prefix(cluster: &str, principal: &str) -> Vec<u8> {
    format!("{cluster}\u{0}{principal}\u{0}").into_bytes()
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(backend)
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn write_audit(tx: &TransactionalTree, events: &[Vec<u8>], at: OffsetDateTime) -> TxResult<()> {
    for event in events {
        let mut key = time_key(at).to_vec();
        key.extend_from_slice(&tx.generate_id()?.to_be_bytes());
        tx.insert(key, event.as_slice())?;
    }
    Ok(())
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(inner) => inner,
        TransactionError::Storage(s) => backend(s),
    }
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        private_store_dir(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            // Every write is flushed by the writer (group commit below); a
            // background flusher would only add concurrent flushes.
            .flush_every_ms(None)
            .open()
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let store = SledStore {
            requests: db.open_tree("requests").map_err(backend)?,
            due: db.open_tree("due").map_err(backend)?,
            audit: db.open_tree("audit").map_err(backend)?,
            baselines: db.open_tree("baselines").map_err(backend)?,
            live: db.open_tree("live").map_err(backend)?,
            inbox: db.open_tree("inbox").map_err(backend)?,
            flushes: FlushGate::default(),
            db,
        };
        store.build_live_index()?;
        Ok(store)
    }

    /// One pass over the rows, only for a store that predates the index;
    /// a crash half-way leaves no marker, and the next open starts over.
    fn build_live_index(&self) -> Result<(), StoreError> {
        if self.db.get(LIVE_INDEX_MARKER).map_err(backend)?.is_some() {
            return Ok(());
        }
        self.live.clear().map_err(backend)?;
        let mut batch = sled::Batch::default();
        for item in self.requests.iter() {
            let (k, v) = item.map_err(backend)?;
            let req: Request = decode(&k, &v)?;
            if !req.state.is_terminal() {
                batch.insert(live_key(&req), req.id.as_str().as_bytes());
            }
        }
        self.live.apply_batch(batch).map_err(backend)?;
        self.db.insert(LIVE_INDEX_MARKER, &[]).map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Rows named by live-index entries under `prefix`; a row that turned
    /// terminal between the two reads is left out.
    fn live_rows(&self, prefix: &[u8]) -> Result<Vec<Request>, StoreError> {
        let mut out = Vec::new();
        for item in self.live.scan_prefix(prefix) {
            let (_, id) = item.map_err(backend)?;
            if let Some(bytes) = self.requests.get(&id).map_err(backend)? {
                let req: Request = decode(&id, &bytes)?;
                if !req.state.is_terminal() {
                    out.push(req);
                }
            }
        }
        Ok(out)
    }

    /// Returns once everything this caller wrote before the call is on
    /// disk.
    async fn durable(&self) -> Result<(), StoreError> {
        let ticket = self.flushes.written.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = self.flushes.running.lock().await;
        if self.flushes.durable.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket taken so far belongs to a write already applied, so
        // this flush covers them all.
        let covered = self.flushes.written.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(backend)?;
        self.flushes.durable.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    fn encode_audit(audit: &[AuditEvent]) -> Result<Vec<Vec<u8>>, StoreError> {
        audit.iter().map(encode).collect()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn create(&self, req: &Request, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let row = encode(req)?;
        let events = Self::encode_audit(&audit)?;
        let at = audit.first().map(|e| e.ts).unwrap_or(req.created_at);
        let id = req.id.clone();
        let due = req.next_due();
        let live = (!req.state.is_terminal()).then(|| live_key(req));
        (&self.requests, &self.due, &self.audit, &self.live)
            .transaction(|(requests, due_tree, audit_tree, live_tree)| {
                if requests.get(id.as_str())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::Exists(
                        id.to_string(),
                    )));
                }
                requests.insert(id.as_str(), row.as_slice())?;
                if let Some(t) = due {
                    due_tree.insert(due_key(t, &id), id.as_str())?;
                }
                if let Some(k) = &live {
                    live_tree.insert(k.as_slice(), id.as_str())?;
                }
                write_audit(audit_tree, &events, at)
            })
            .map_err(tx_error)?;
        self.durable().await?;
        Ok(())
    }

    async fn update(
        &self,
        prev: &Request,
        mut next: Request,
        audit: Vec<AuditEvent>,
    ) -> Result<Request, StoreError> {
        next.version = prev.version + 1;
        let row = encode(&next)?;
        let events = Self::encode_audit(&audit)?;
        let at = audit
            .first()
            .map(|e| e.ts)
            .unwrap_or_else(OffsetDateTime::now_utc);
        let id = prev.id.clone();
        let old_due = prev.next_due();
        let new_due = next.next_due();
        let expected_version = prev.version;
        let old_live = (!prev.state.is_terminal()).then(|| live_key(prev));
        let new_live = (!next.state.is_terminal()).then(|| live_key(&next));
        (&self.requests, &self.due, &self.audit, &self.live)
            .transaction(|(requests, due_tree, audit_tree, live_tree)| {
                let current = requests.get(id.as_str())?.ok_or_else(|| {
                    ConflictableTransactionError::Abort(StoreError::NotFound(id.to_string()))
                })?;
                let current: Request = decode(id.as_str().as_bytes(), &current)
                    .map_err(ConflictableTransactionError::Abort)?;
                if current.version != expected_version {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                        id.to_string(),
                    )));
                }
                requests.insert(id.as_str(), row.as_slice())?;
                if let Some(t) = old_due {
                    due_tree.remove(due_key(t, &id))?;
                }
                if let Some(t) = new_due {
                    due_tree.insert(due_key(t, &id), id.as_str())?;
                }
                if let Some(k) = &old_live {
                    live_tree.remove(k.as_slice())?;
                }
                if let Some(k) = &new_live {
                    live_tree.insert(k.as_slice(), id.as_str())?;
                }
                write_audit(audit_tree, &events, at)
            })
            .map_err(tx_error)?;
        self.durable().await?;
        Ok(next)
    }

    async fn append_audit(&self, audit: Vec<AuditEvent>) -> Result<(), StoreError> {
        let events = Self::encode_audit(&audit)?;
        let at = audit
            .first()
            .map(|e| e.ts)
            .unwrap_or_else(OffsetDateTime::now_utc);
        self.audit
            .transaction(|tree| write_audit(tree, &events, at))
            .map_err(tx_error)?;
        self.durable().await?;
        Ok(())
    }

    async fn get(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        match self.requests.get(id.as_str()).map_err(backend)? {
            Some(bytes) => Ok(Some(decode(id.as_str().as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn list(&self) -> Result<Vec<Request>, StoreError> {
        self.requests
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    async fn next_due(&self) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(self
            .due
            .first()
            .map_err(backend)?
            .and_then(|(k, _)| time_of_key(&k)))
    }

    async fn due(&self, now: OffsetDateTime) -> Result<Vec<RequestId>, StoreError> {
        let end = time_key(now + time::Duration::milliseconds(1));
        let mut ids = Vec::new();
        for item in self.due.range(..end.as_slice()) {
            let (k, v) = item.map_err(backend)?;
            let text = String::from_utf8_lossy(&v).into_owned();
            let id = RequestId::parse(&text).ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                message: format!("bad request id {text:?} in due index"),
            })?;
            ids.push(id);
        }
        Ok(ids)
    }

    async fn audit_since(
        &self,
        since: Option<OffsetDateTime>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let start = since.map(time_key).unwrap_or([0; 8]);
        let audit = self.audit.clone();
        // A whole log is read and decoded in one go (tens of thousands of
        // events with a year of history): on a blocking thread, so the
        // runtime's workers go on driving revokes meanwhile (issue 29).
        tokio::task::spawn_blocking(move || {
            audit
                .range(start.as_slice()..)
                .map(|item| {
                    let (k, v) = item.map_err(backend)?;
                    decode(&k, &v)
                })
                .collect()
        })
        .await
        .map_err(backend)?
    }

    async fn baselines(&self, cluster: &str, principal: &str) -> Result<Baselines, StoreError> {
        let prefix = baseline_prefix(cluster, principal);
        let mut out = Baselines::new();
        for item in self.baselines.scan_prefix(&prefix) {
            let (k, v) = item.map_err(backend)?;
            let policy = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let scope: Option<Scope> = decode(&k, &v)?;
            out.insert(policy, scope);
        }
        Ok(out)
    }

    async fn record_baselines(
        &self,
        cluster: &str,
        principal: &str,
        baselines: &Baselines,
    ) -> Result<(), StoreError> {
        let prefix = baseline_prefix(cluster, principal);
        let mut batch = sled::Batch::default();
        for (policy, scope) in baselines {
            let mut key = prefix.clone();
            key.extend_from_slice(policy.as_bytes());
            batch.insert(key, encode(scope)?);
        }
        self.baselines.apply_batch(batch).map_err(backend)?;
        self.durable().await?;
        Ok(())
    }

    async fn forget_baselines(
        &self,
        cluster: &str,
        principal: &str,
        policies: &[String],
    ) -> Result<(), StoreError> {
        let prefix = baseline_prefix(cluster, principal);
        let mut batch = sled::Batch::default();
        for policy in policies {
            let mut key = prefix.clone();
            key.extend_from_slice(policy.as_bytes());
            batch.remove(key);
        }
        self.baselines.apply_batch(batch).map_err(backend)?;
        self.durable().await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.durable().await?;
        Ok(())
    }

    async fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                Ok(AuditEntry {
                    position: audit_position(&k)?,
                    event: decode(&k, &v)?,
                })
            })
            .collect()
    }

    async fn import_audit(&self, entries: Vec<AuditEntry>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for entry in &entries {
            batch.insert(&audit_key(entry.position), encode(&entry.event)?);
        }
        self.audit.apply_batch(batch).map_err(backend)?;
        self.durable().await
    }

    async fn import_request(&self, req: &Request) -> Result<(), StoreError> {
        let row = encode(req)?;
        let id = req.id.clone();
        let due = req.next_due();
        let live = (!req.state.is_terminal()).then(|| live_key(req));
        (&self.requests, &self.due, &self.live)
            .transaction(|(requests, due_tree, live_tree)| {
                if let Some(old) = requests.get(id.as_str())? {
                    let old: Request = decode(id.as_str().as_bytes(), &old)
                        .map_err(ConflictableTransactionError::Abort)?;
                    if let Some(t) = old.next_due() {
                        due_tree.remove(due_key(t, &id))?;
                    }
                    live_tree.remove(live_key(&old))?;
                }
                requests.insert(id.as_str(), row.as_slice())?;
                if let Some(t) = due {
                    due_tree.insert(due_key(t, &id), id.as_str())?;
                }
                if let Some(k) = &live {
                    live_tree.insert(k.as_slice(), id.as_str())?;
                }
                Ok(())
            })
            .map_err(tx_error)?;
        self.durable().await
    }

    async fn all_baselines(&self) -> Result<Vec<(String, String, Baselines)>, StoreError> {
        let mut out: Vec<(String, String, Baselines)> = Vec::new();
        for item in self.baselines.iter() {
            let (k, v) = item.map_err(backend)?;
            let text = String::from_utf8_lossy(&k).into_owned();
            let mut parts = text.splitn(3, '\u{0}');
            let (Some(cluster), Some(principal), Some(policy)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(StoreError::Corrupt {
                    key: text.clone(),
                    message: "baseline key is not cluster, principal and policy".into(),
                });
            };
            let scope: Option<Scope> = decode(&k, &v)?;
            // Keys sort by cluster then principal, so one group is contiguous.
            match out.last_mut() {
                Some((c, p, b)) if c == cluster && p == principal => {
                    b.insert(policy.to_string(), scope);
                }
                _ => out.push((
                    cluster.to_string(),
                    principal.to_string(),
                    Baselines::from([(policy.to_string(), scope)]),
                )),
            }
        }
        Ok(out)
    }

    async fn live(&self) -> Result<Vec<Request>, StoreError> {
        self.live_rows(&[])
    }

    async fn live_for(&self, cluster: &str, principal: &str) -> Result<Vec<Request>, StoreError> {
        self.live_rows(&live_prefix(cluster, principal))
    }

    async fn remove_ended(
        &self,
        ids: &[RequestId],
        audit: &[AuditPosition],
    ) -> Result<(), StoreError> {
        (&self.requests, &self.audit)
            .transaction(|(requests, audit_tree)| {
                for id in ids {
                    if let Some(bytes) = requests.get(id.as_str())? {
                        let row: Request = decode(id.as_str().as_bytes(), &bytes)
                            .map_err(ConflictableTransactionError::Abort)?;
                        if !row.state.is_terminal() {
                            return Err(ConflictableTransactionError::Abort(StoreError::Backend(
                                format!(
                                    "{id} is {}, not ended; nothing was removed",
                                    row.state.label()
                                ),
                            )));
                        }
                        requests.remove(id.as_str())?;
                    }
                }
                for position in audit {
                    audit_tree.remove(&audit_key(*position))?;
                }
                Ok(())
            })
            .map_err(tx_error)?;
        self.durable().await
    }

    /// sled locks its directory: one process owns the store.
    fn is_shared(&self) -> bool {
        false
    }

    /// The one process that can open the directory is the only possible
    /// holder, so every lease is its own. This holds only because sled
    /// refuses a second opener; a shared backend must decide in the store.
    async fn try_lease(
        &self,
        _name: &str,
        _holder: &str,
        _until: OffsetDateTime,
        _now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn record_interaction(&self, item: &Interaction) -> Result<bool, StoreError> {
        let doc = encode(item)?;
        let fresh = self
            .inbox
            .compare_and_swap(item.key.as_bytes(), None as Option<&[u8]>, Some(doc))
            .map_err(backend)?
            .is_ok();
        // Durable before the caller answers 200, either way: a click seen
        // again may be the one whose own flush has not finished yet.
        self.durable().await?;
        Ok(fresh)
    }

    async fn interactions(&self) -> Result<Vec<InboxEntry>, StoreError> {
        let mut out = Vec::new();
        for entry in self.inbox.iter() {
            let (k, v) = entry.map_err(backend)?;
            out.push(match decode::<Interaction>(&k, &v) {
                Ok(click) => InboxEntry::Click(click),
                Err(e) => InboxEntry::Unreadable {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    message: e.to_string(),
                },
            });
        }
        Ok(InboxEntry::sorted(out))
    }

    /// Flushed like every write: a removal lost in a crash would only
    /// process the click again (which decides nothing twice), but would
    /// tell its clicker so once more.
    async fn finish_interaction(&self, key: &str) -> Result<(), StoreError> {
        self.inbox.remove(key.as_bytes()).map_err(backend)?;
        self.durable().await
    }

    /// A read of the smallest tree: the embedded store answers or its files
    /// are gone.
    async fn ping(&self) -> Result<(), StoreError> {
        self.live.first().map(|_| ()).map_err(backend)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::request::{AccessSpec, Asked, Requester, State};
    use serde_json::json;
    use std::time::Duration;
    use time::macros::datetime;

    pub(crate) fn request(id: &str, now: OffsetDateTime) -> Request {
        Request::pending(
            Asked {
                id: RequestId::parse(id).unwrap(),
                requester: Requester {
                    user_id: "U1".into(),
                    email: "a@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: AccessSpec {
                    cluster: "c".into(),
                    role: "view".into(),
                    principal: "arn:aws:iam::1:role/a".into(),
                    policy_arn: None,
                    namespaces: vec![],
                    cluster_role: None,
                    groups: vec![],
                    k8s_user: None,
                    strategy: None,
                },
                reason: String::new(),
                duration: Duration::from_secs(60),
                approval_timeout: Duration::from_secs(600),
                required_approvals: 1,
                response_url: None,
            },
            now,
        )
    }

    fn event(req: &Request, name: &str, at: OffsetDateTime) -> AuditEvent {
        AuditEvent::for_request(req, name, "U1", at, json!({}))
    }

    #[tokio::test]
    async fn an_unreadable_click_is_returned_as_such_and_the_others_read() {
        use crate::domain::inbox::{Click, Interaction};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let now = OffsetDateTime::now_utc();
        let click = Interaction::new(Click::Approve, "R-ABCDE", "U0APP", Some("1"), "", None, now);
        store.record_interaction(&click).await.unwrap();
        store.inbox.insert(b"garbage", b"{not json").unwrap();
        let read = store.interactions().await.unwrap();
        assert!(
            matches!(&read[..], [InboxEntry::Unreadable { key, .. }, InboxEntry::Click(c)] if key == "garbage" && *c == click),
            "{read:?}"
        );
        store.finish_interaction("garbage").await.unwrap();
        assert_eq!(store.interactions().await.unwrap().len(), 1);
    }

    #[test]
    fn the_store_directory_is_created_owner_only_and_a_world_writable_one_refused() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state").join("tollgate-data");
        drop(SledStore::open(&dir).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);

        // Others lose what an existing directory gave them.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(SledStore::open(&dir).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let Err(e) = SledStore::open(&dir) else {
            panic!("a world-writable store directory was opened")
        };
        assert!(e.to_string().contains("chmod 700"), "{e}");
    }

    #[tokio::test]
    async fn update_is_compare_and_swap_on_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let now = datetime!(2026-11-23 12:00 UTC);
        let req = request("R-AAAAA", now);
        store
            .create(&req, vec![event(&req, "requested", now)])
            .await
            .unwrap();
        assert!(matches!(
            store.create(&req, vec![]).await,
            Err(StoreError::Exists(_))
        ));

        let mut approved = req.clone();
        approved.state = State::Approved;
        approved.approved_at = Some(now);
        let written = store
            .update(&req, approved.clone(), vec![event(&req, "approved", now)])
            .await
            .unwrap();
        assert_eq!(written.version, 1);

        // A second writer that read version 0 loses and writes nothing.
        let mut denied = req.clone();
        denied.state = State::Denied;
        let lost = store
            .update(&req, denied, vec![event(&req, "denied", now)])
            .await;
        assert!(matches!(lost, Err(StoreError::Conflict(_))), "{lost:?}");
        let stored = store.get(&req.id).await.unwrap().unwrap();
        assert_eq!(stored.state, State::Approved);
        let names: Vec<String> = store
            .audit_since(None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            names,
            vec!["requested", "approved"],
            "the losing write left no audit event"
        );
    }

    #[tokio::test]
    async fn due_index_follows_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let now = datetime!(2026-11-23 12:00 UTC);
        let req = request("R-BBBBB", now);
        store.create(&req, vec![]).await.unwrap();
        assert_eq!(
            store.next_due().await.unwrap(),
            Some(now + Duration::from_secs(600))
        );
        assert!(store.due(now).await.unwrap().is_empty());

        let mut active = req.clone();
        active.state = State::Active;
        active.expires_at = Some(now + Duration::from_secs(60));
        let active = store.update(&req, active, vec![]).await.unwrap();
        assert_eq!(store.next_due().await.unwrap(), active.expires_at);
        assert_eq!(
            store.due(now + Duration::from_secs(60)).await.unwrap(),
            vec![req.id.clone()]
        );

        let mut revoked = active.clone();
        revoked.state = State::Revoked;
        store.update(&active, revoked, vec![]).await.unwrap();
        assert_eq!(
            store.next_due().await.unwrap(),
            None,
            "terminal rows leave the index"
        );
    }

    #[tokio::test]
    async fn live_index_follows_the_row_and_is_built_for_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-11-23 12:00 UTC);
        let ids = |rows: Vec<Request>| -> Vec<String> {
            let mut ids: Vec<String> = rows.into_iter().map(|r| r.id.to_string()).collect();
            ids.sort();
            ids
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            let a = request("R-AAAAA", now);
            let mut b = request("R-BBBBB", now);
            b.access.principal = "arn:aws:iam::1:role/b".into();
            store.create(&a, vec![]).await.unwrap();
            store.create(&b, vec![]).await.unwrap();
            let c = request("R-CCCCC", now);
            store.create(&c, vec![]).await.unwrap();
            assert_eq!(
                ids(store.live_for("c", "arn:aws:iam::1:role/a").await.unwrap()),
                vec!["R-AAAAA", "R-CCCCC"]
            );
            let mut denied = c.clone();
            denied.state = State::Denied;
            store.update(&c, denied, vec![]).await.unwrap();
            assert_eq!(
                ids(store.live_for("c", "arn:aws:iam::1:role/a").await.unwrap()),
                vec!["R-AAAAA"],
                "a terminal row leaves the index"
            );
            assert_eq!(ids(store.live().await.unwrap()), vec!["R-AAAAA", "R-BBBBB"]);
            assert!(store
                .live_for("other", "arn:aws:iam::1:role/a")
                .await
                .unwrap()
                .is_empty());
            // As a store written before the index existed.
            store.live.clear().unwrap();
            store.db.remove(LIVE_INDEX_MARKER).unwrap();
            store.db.flush().unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path()) {
                Ok(store) => break store,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert_eq!(
            ids(store.live().await.unwrap()),
            vec!["R-AAAAA", "R-BBBBB"],
            "the index is rebuilt from the rows on open"
        );
    }

    #[tokio::test]
    async fn state_survives_reopen_and_baselines_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let now = datetime!(2026-11-23 12:00 UTC);
        {
            let store = SledStore::open(dir.path()).unwrap();
            let req = request("R-CCCCC", now);
            store
                .create(&req, vec![event(&req, "requested", now)])
                .await
                .unwrap();
            let b = Baselines::from([
                ("p1".to_string(), None),
                ("p2".to_string(), Some(Scope::from_namespaces(["x"]))),
            ]);
            store.record_baselines("c", "arn", &b).await.unwrap();
            store
                .forget_baselines("c", "arn", &["p1".to_string()])
                .await
                .unwrap();
        }
        // sled releases its file lock from a background thread after the
        // handle is dropped; a reopen in the same process waits for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path()) {
                Ok(store) => break store,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert!(store
            .get(&RequestId::parse("R-CCCCC").unwrap())
            .await
            .unwrap()
            .is_some());
        let b = store.baselines("c", "arn").await.unwrap();
        assert_eq!(
            b,
            Baselines::from([("p2".to_string(), Some(Scope::from_namespaces(["x"])))])
        );
        assert!(store.baselines("c", "other").await.unwrap().is_empty());
        assert_eq!(store.audit_since(Some(now)).await.unwrap().len(), 1);
        assert!(store
            .audit_since(Some(now + Duration::from_secs(1)))
            .await
            .unwrap()
            .is_empty());
    }
}
