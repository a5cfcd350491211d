//! The interaction inbox: a Slack click is written to the store before it
//! is answered 200, because Slack never delivers an acknowledged
//! interaction again. What is recorded here is processed afterwards, and
//! again after a crash, so processing must decide once however often it
//! runs: Approve and Deny are one vote per user in the lifecycle, and an
//! Extend click files its extension under an id derived from the click.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::request::RequestId;

/// The buttons whose clicks change something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Click {
    Approve,
    Deny,
    Extend,
}

impl Click {
    /// The `action_id` of the button, as Slack sends it.
    pub fn from_action_id(action_id: &str) -> Option<Self> {
        match action_id {
            "approve" => Some(Click::Approve),
            "deny" => Some(Click::Deny),
            "extend" => Some(Click::Extend),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Click::Approve => "approve",
            Click::Deny => "deny",
            Click::Extend => "extend",
        }
    }
}

/// One recorded click.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Names the click: the same delivery recorded twice is one entry.
    pub key: String,
    pub click: Click,
    /// The button's value (a request id as Slack echoes it; not trusted
    /// to parse).
    pub value: String,
    pub user_id: String,
    pub response_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// Recorded by a `serve --dry-run` server: only a server of the same
    /// mode processes it (the two may share a store; spec 9.8).
    #[serde(default)]
    pub dry_run: bool,
    /// With `[store] integrity_key_env`, the HMAC of the rest (spec 9.8):
    /// a click that does not carry it is never processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// How many ids an Extend click tries before it gives up: with 100 000
/// rows stored, eight in a row taken by other requests is vanishingly rare.
const EXTENSION_ID_CANDIDATES: u32 = 8;

/// Longest button value, user id or `action_ts` kept; Slack's are far
/// shorter, and a recorded entry must stay small whatever a payload says.
const FIELD_MAX: usize = 256;
/// Slack's response URLs are well under this.
const URL_MAX: usize = 2048;

fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

impl Interaction {
    /// `action_ts` is Slack's time of the click, the same in every delivery
    /// of it and different for the next click: with the action, the button
    /// and the user it names the click. Slack always sends it; a payload
    /// without one is keyed by `delivery` (the request's signature), which
    /// differs per delivery.
    pub fn new(
        click: Click,
        value: &str,
        user_id: &str,
        action_ts: Option<&str>,
        delivery: &str,
        response_url: Option<&str>,
        now: OffsetDateTime,
    ) -> Self {
        let value = bounded(value, FIELD_MAX);
        let user_id = bounded(user_id, FIELD_MAX);
        let stamp = bounded(action_ts.unwrap_or(delivery), FIELD_MAX);
        let key = {
            let named = serde_json::json!([click.label(), value, user_id, stamp]).to_string();
            hex::encode(Sha256::digest(named.as_bytes()))
        };
        Interaction {
            key,
            click,
            value,
            user_id,
            response_url: response_url
                .filter(|u| u.len() <= URL_MAX)
                .map(str::to_string),
            received_at: now,
            dry_run: false,
            mac: None,
        }
    }

    /// The ids an Extend click may file its extension under, in order:
    /// derived from the click, so processing it again (after a crash, on
    /// another replica, or in another build) finds the extension it
    /// already filed instead of filing a second. Ids are short, so one may
    /// already name an unrelated request: the next candidate is taken then.
    pub fn extension_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        (0..EXTENSION_ID_CANDIDATES).map(move |n| {
            let digest: [u8; 32] =
                Sha256::digest(format!("extension:{n}:{}", self.key).as_bytes()).into();
            RequestId::from_digest(&digest)
        })
    }

    /// Whether a sweep should process this entry: the replica that recorded
    /// it normally finishes within `grace`; one left longer was dropped by
    /// a process that died. Processing twice is harmless, only slower.
    pub fn abandoned(&self, now: OffsetDateTime, grace: std::time::Duration) -> bool {
        self.received_at + grace <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-07 10:00 UTC);

    fn click(action_ts: Option<&str>, delivery: &str) -> Interaction {
        Interaction::new(
            Click::Approve,
            "R-ABCDE",
            "U0APP",
            action_ts,
            delivery,
            Some("https://hooks.slack.com/actions/T/1/x"),
            NOW,
        )
    }

    #[test]
    fn one_click_delivered_twice_is_one_key_and_two_clicks_are_two() {
        assert_eq!(
            click(Some("1700000000.1"), "sig-a").key,
            click(Some("1700000000.1"), "sig-b").key,
            "the same click, delivered again with another signature"
        );
        assert_ne!(
            click(Some("1700000000.1"), "s").key,
            click(Some("1700000000.2"), "s").key
        );
        let deny = Interaction::new(
            Click::Deny,
            "R-ABCDE",
            "U0APP",
            Some("1700000000.1"),
            "s",
            None,
            NOW,
        );
        assert_ne!(deny.key, click(Some("1700000000.1"), "s").key);
        let other_user = Interaction::new(
            Click::Approve,
            "R-ABCDE",
            "U0OTHER",
            Some("1700000000.1"),
            "s",
            None,
            NOW,
        );
        assert_ne!(other_user.key, click(Some("1700000000.1"), "s").key);
        // Without action_ts each delivery is its own entry.
        assert_ne!(click(None, "sig-a").key, click(None, "sig-b").key);
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = Interaction::new(Click::Extend, "R-A\",\"U", "X", Some("1"), "", None, NOW);
        let b = Interaction::new(Click::Extend, "R-A", "U\",\"X", Some("1"), "", None, NOW);
        assert_ne!(a.key, b.key);
    }

    #[test]
    fn the_extension_ids_are_fixed_by_the_click() {
        let ids = |ts: &str| -> Vec<RequestId> {
            Interaction::new(Click::Extend, "R-ABCDE", "U0REQ", Some(ts), "", None, NOW)
                .extension_ids()
                .collect()
        };
        assert_eq!(ids("1.1"), ids("1.1"));
        assert_ne!(ids("1.1")[0], ids("1.2")[0]);
        let all = ids("1.1");
        assert_eq!(all.len(), EXTENSION_ID_CANDIDATES as usize);
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "each candidate is another id");
        // Pinned: every build derives the same ids for a recorded click (a
        // rolling deploy's new replica replays the old one's inbox).
        assert_eq!(all[0].as_str(), "R-3BXAZ");
        assert_eq!(RequestId::from_digest(&[0u8; 32]).as_str(), "R-00000");
        assert_eq!(RequestId::from_digest(&[0xff; 32]).as_str(), "R-ZZZZZ");
    }

    #[test]
    fn oversized_fields_are_bounded_and_long_urls_dropped() {
        let long = "x".repeat(10_000);
        let i = Interaction::new(
            Click::Approve,
            &long,
            &long,
            Some(&long),
            "",
            Some(&long),
            NOW,
        );
        assert_eq!(i.value.len(), FIELD_MAX);
        assert_eq!(i.user_id.len(), FIELD_MAX);
        assert_eq!(i.response_url, None);
    }

    #[test]
    fn an_entry_is_abandoned_only_after_the_grace() {
        let i = click(Some("1"), "");
        let grace = std::time::Duration::from_secs(30);
        assert!(!i.abandoned(NOW + time::Duration::seconds(29), grace));
        assert!(i.abandoned(NOW + time::Duration::seconds(30), grace));
    }

    #[test]
    fn round_trips_through_json() {
        let i = click(Some("1"), "");
        let back: Interaction = serde_json::from_str(&serde_json::to_string(&i).unwrap()).unwrap();
        assert_eq!(back, i);
    }
}
