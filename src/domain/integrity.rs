//! Row integrity (spec 9.8, `[store] integrity_key_env`): an HMAC-SHA256
//! over the canonical content of each request row and each audit event, so
//! a row written into the store by anyone but Tollgate (DynamoDB
//! `PutItem`, an edited sled file) is told from one Tollgate wrote.
//!
//! Canonical form: a context line (`tollgate-row-v1\n` or
//! `tollgate-audit-v1\n`, so a row's MAC is never an audit event's), then
//! the value's JSON with its `mac` field cleared, serialized through
//! `serde_json::Value` so object keys come out sorted whatever maps the
//! value holds. A row's content includes its `id` and `version`: a MAC
//! cannot be moved to another row, nor an older version (with its own
//! valid MAC) replayed over a newer one without failing the version guard
//! every write uses. The version written is the one the store writes
//! (`prev.version + 1` on update, the row's own on create).
//!
//! Pure: the key is passed in; reading it from the environment is `main`'s.

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::sync::Arc;

use super::audit::AuditEvent;
use super::inbox::Interaction;
use super::request::Request;

type HmacSha256 = Hmac<Sha256>;

const ROW_CONTEXT: &[u8] = b"tollgate-row-v1\n";
const CLICK_CONTEXT: &[u8] = b"tollgate-click-v1\n";
const AUDIT_CONTEXT: &[u8] = b"tollgate-audit-v1\n";

/// The shortest key accepted: HMAC-SHA256's block is 64 bytes and its
/// output 32; a shorter key is a guessable one.
pub const MIN_KEY_BYTES: usize = 32;

/// The integrity key. Its `Debug` never shows the bytes, so a key inside
/// a logged struct is never logged.
#[derive(Clone)]
pub struct RowKey {
    bytes: Arc<[u8]>,
    /// The HMAC keyed once; each MAC starts from a clone.
    keyed: HmacSha256,
}

impl PartialEq for RowKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for RowKey {}

impl std::fmt::Debug for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowKey(<redacted>)")
    }
}

impl RowKey {
    /// `None` when shorter than `MIN_KEY_BYTES` (HMAC itself takes any
    /// length).
    pub fn new(bytes: &[u8]) -> Option<RowKey> {
        if bytes.len() < MIN_KEY_BYTES {
            return None;
        }
        let keyed = HmacSha256::new_from_slice(bytes).ok()?;
        Some(RowKey {
            bytes: Arc::from(bytes),
            keyed,
        })
    }

    fn mac(&self, context: &[u8], content: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(context);
        mac.update(content);
        mac
    }

    /// `None` only if the value cannot be serialized (never for rows and
    /// events): the row is then written without a MAC and fails closed.
    fn sign(&self, context: &[u8], content: Option<Vec<u8>>) -> Option<String> {
        let content = content?;
        Some(hex::encode(
            self.mac(context, &content).finalize().into_bytes(),
        ))
    }

    fn verify(&self, context: &[u8], content: Option<Vec<u8>>, mac: Option<&str>) -> bool {
        let (Some(content), Some(bytes)) = (content, mac.and_then(|m| hex::decode(m).ok())) else {
            return false;
        };
        // Constant time: a forger learns nothing from how long a wrong
        // MAC took to refuse.
        self.mac(context, &content).verify_slice(&bytes).is_ok()
    }

    /// The MAC of `row` as it stands (its `mac` field ignored).
    pub fn row_mac(&self, row: &Request) -> Option<String> {
        self.sign(ROW_CONTEXT, canonical_row(row))
    }

    /// `row` with its MAC set, for writing.
    pub fn seal_row(&self, mut row: Request) -> Request {
        row.mac = self.row_mac(&row);
        row
    }

    /// Whether `row` carries the MAC of its own content.
    pub fn row_intact(&self, row: &Request) -> bool {
        self.verify(ROW_CONTEXT, canonical_row(row), row.mac.as_deref())
    }

    pub fn seal_audit(&self, mut event: AuditEvent) -> AuditEvent {
        event.mac = self.sign(AUDIT_CONTEXT, canonical_audit(&event));
        event
    }

    pub fn audit_intact(&self, event: &AuditEvent) -> bool {
        self.verify(AUDIT_CONTEXT, canonical_audit(event), event.mac.as_deref())
    }

    /// A recorded Slack click with its MAC set: a click in the inbox turns
    /// into a real vote, so one written into the store by hand must not
    /// count where a forged row would not.
    pub fn seal_click(&self, mut click: Interaction) -> Interaction {
        click.mac = None;
        click.mac = self.sign(CLICK_CONTEXT, canonical(&click));
        click
    }

    pub fn click_intact(&self, click: &Interaction) -> bool {
        let mut bare = click.clone();
        bare.mac = None;
        self.verify(CLICK_CONTEXT, canonical(&bare), click.mac.as_deref())
    }
}

/// What a row's MAC covers: every field but the MAC itself.
pub fn canonical_row(row: &Request) -> Option<Vec<u8>> {
    let mut row = row.clone();
    row.mac = None;
    canonical(&row)
}

pub fn canonical_audit(event: &AuditEvent) -> Option<Vec<u8>> {
    let mut event = event.clone();
    event.mac = None;
    canonical(&event)
}

fn canonical<T: Serialize>(value: &T) -> Option<Vec<u8>> {
    let value = serde_json::to_value(value).ok()?;
    serde_json::to_vec(&value).ok()
}

/// Whether a row may be acted on under `key`: with no key configured,
/// every row is (integrity is off); with one, only a row carrying the MAC
/// of its own content.
pub fn intact(key: Option<&RowKey>, row: &Request) -> bool {
    key.is_none_or(|k| k.row_intact(row))
}

/// Live rows carrying no MAC at all: written before a key was configured
/// (or by someone without it).
pub fn unsigned(live: &[Request]) -> Vec<&Request> {
    live.iter().filter(|r| r.mac.is_none()).collect()
}

/// Whether any row carries a valid MAC under `key`: the store has been
/// written with it (or sealed), so a row without one is a forgery, not a
/// row from before the key.
pub fn sealed(key: &RowKey, rows: &[Request]) -> bool {
    rows.iter().any(|r| key.row_intact(r))
}

/// Start-up refusal for a store turned to integrity with live rows that
/// were never signed.
pub fn unsealed_refusal(config_path: &str, unsigned: &[&Request]) -> String {
    let ids: Vec<&str> = unsigned.iter().map(|r| r.id.as_str()).collect();
    format!(
        "{config_path}: [store] integrity_key_env is set but {} live request row(s) carry no integrity MAC \
         ({}); they were written before the key was configured. Review them (`tollgate grants list`), \
         then sign them once with `tollgate store seal --config {config_path}`",
        ids.len(),
        ids.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::request::State;
    use serde_json::json;

    fn key(byte: u8) -> RowKey {
        RowKey::new(&[byte; 32]).unwrap()
    }

    fn row() -> Request {
        crate::domain::lifecycle::tests::pending(1)
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(RowKey::new(&[7; 31]).is_none());
        assert!(RowKey::new(&[7; 32]).is_some());
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let k = RowKey::new(b"0123456789abcdef0123456789abcdefSECRET").unwrap();
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("0123"),
            "{shown}"
        );
    }

    #[test]
    fn a_sealed_row_verifies_and_survives_a_store_round_trip() {
        let k = key(1);
        let sealed = k.seal_row(row());
        assert!(k.row_intact(&sealed));
        // What a backend stores is the JSON document; reading it back must
        // give the same canonical content.
        let read: Request = serde_json::from_str(&serde_json::to_string(&sealed).unwrap()).unwrap();
        assert!(k.row_intact(&read));
    }

    #[test]
    fn a_missing_or_wrong_mac_fails() {
        let k = key(1);
        assert!(!k.row_intact(&row()), "no MAC");
        let mut forged = row();
        forged.mac = Some("00".repeat(32));
        assert!(!k.row_intact(&forged), "made-up MAC");
        forged.mac = Some("not hex".into());
        assert!(!k.row_intact(&forged));
        // Signed under another key.
        assert!(!k.row_intact(&key(2).seal_row(row())));
    }

    #[test]
    fn any_edit_of_a_sealed_row_fails() {
        let k = key(1);
        let sealed = k.seal_row(row());
        let edits: [fn(&mut Request); 5] = [
            |r| r.state = State::Approved,
            |r| r.duration += std::time::Duration::from_secs(1),
            |r| r.access.role = "admin".into(),
            |r| r.required_approvals = 0,
            |r| r.dry_run = !r.dry_run,
        ];
        for edit in edits {
            let mut edited = sealed.clone();
            edit(&mut edited);
            assert!(!k.row_intact(&edited), "{edited:?}");
        }
    }

    #[test]
    fn a_mac_is_bound_to_the_row_id_and_version() {
        let k = key(1);
        let sealed = k.seal_row(row());
        // Moved to another row.
        let mut other = row();
        other.id = crate::domain::request::RequestId::parse("R-ZZZZZ").unwrap();
        other.mac = sealed.mac.clone();
        assert!(!k.row_intact(&other));
        // An old version's MAC on a newer version.
        let mut newer = sealed.clone();
        newer.version += 1;
        assert!(!k.row_intact(&newer));
    }

    #[test]
    fn audit_events_are_sealed_and_checked_apart_from_rows() {
        let k = key(1);
        let event = AuditEvent::for_request(
            &row(),
            "granted",
            "tollgate",
            time::macros::datetime!(2026-01-01 00:00 UTC),
            json!({"b": 1, "a": [1, 2]}),
        );
        let sealed = k.seal_audit(event.clone());
        assert!(k.audit_intact(&sealed));
        assert!(!k.audit_intact(&event), "no MAC");
        let mut edited = sealed.clone();
        edited.details["b"] = json!(2);
        assert!(!k.audit_intact(&edited));
        // A row's MAC is not an event's, whatever the bytes.
        assert_ne!(sealed.mac, k.row_mac(&row()));
    }

    #[test]
    fn a_store_is_sealed_once_any_row_verifies() {
        let k = key(1);
        let old = row();
        assert!(!sealed(&k, std::slice::from_ref(&old)));
        assert_eq!(unsigned(std::slice::from_ref(&old)).len(), 1);
        let rows = vec![old.clone(), k.seal_row(row())];
        assert!(sealed(&k, &rows));
        assert_eq!(unsigned(&rows).len(), 1);
        // A row sealed under another key does not make this store sealed.
        assert!(!sealed(&k, &[key(2).seal_row(row())]));
        let text = unsealed_refusal("t.toml", &[&old]);
        assert!(
            text.contains("R-7F3K2") && text.contains("tollgate store seal --config t.toml"),
            "{text}"
        );
    }

    #[test]
    fn with_no_key_every_row_is_acted_on() {
        assert!(intact(None, &row()));
        assert!(!intact(Some(&key(1)), &row()));
        assert!(intact(Some(&key(1)), &key(1).seal_row(row())));
    }
}
