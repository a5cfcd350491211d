//! The interaction inbox: a Slack click is written to the store before it
//! is answered 200, because Slack never delivers an acknowledged
//! interaction again. What is recorded here is processed afterwards, and
//! again after a crash, so processing must decide once however often it
//! runs: Approve and Deny are one vote per user in the lifecycle, and an
//! Extend click files its extension under an id derived from the click.

use rand::SeedableRng;
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
}

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
        }
    }

    /// The id an Extend click files its extension under: derived from the
    /// click, so processing it again (after a crash, or on another replica)
    /// finds the extension it already filed instead of filing a second.
    pub fn extension_id(&self) -> RequestId {
        let seed: [u8; 32] = Sha256::digest(format!("extension:{}", self.key).as_bytes()).into();
        RequestId::generate(&mut rand::rngs::StdRng::from_seed(seed))
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
    fn the_extension_id_is_fixed_by_the_click() {
        let one = Interaction::new(
            Click::Extend,
            "R-ABCDE",
            "U0REQ",
            Some("1.1"),
            "",
            None,
            NOW,
        );
        let again = Interaction::new(
            Click::Extend,
            "R-ABCDE",
            "U0REQ",
            Some("1.1"),
            "",
            None,
            NOW,
        );
        let next = Interaction::new(
            Click::Extend,
            "R-ABCDE",
            "U0REQ",
            Some("1.2"),
            "",
            None,
            NOW,
        );
        assert_eq!(one.extension_id(), again.extension_id());
        assert_ne!(one.extension_id(), next.extension_id());
        assert!(RequestId::parse(one.extension_id().as_str()).is_some());
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
