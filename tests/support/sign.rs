//! Builds and signs requests the way Slack sends them to an app, so tests
//! exercise the real signature check instead of bypassing it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::slack::{BOT_ID, BOT_USER_ID, TEAM_ID};

pub const TEAM_DOMAIN: &str = "tollgate-test";
pub const API_APP_ID: &str = "A0TOLLGATE";
/// The legacy verification token Slack still includes in payloads; apps
/// must not rely on it, so any value does.
pub const VERIFICATION_TOKEN: &str = "verification-token-test";
pub const COMMAND_CHANNEL_ID: &str = "C0COMMANDS";
pub const COMMAND_CHANNEL_NAME: &str = "access-requests";

/// Slack's `X-Slack-Signature` for a request body sent at `ts`.
pub fn signature(secret: &str, ts: &str, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs a form body signed with `secret` and stamped with the current time,
/// as Slack delivers slash commands and interactions.
pub async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: String,
) -> reqwest::Response {
    let ts = unix_now().to_string();
    client
        .post(url)
        .header("X-Slack-Request-Timestamp", &ts)
        .header("X-Slack-Signature", signature(secret, &ts, &body))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// The request id (`R-XXXXX`) a receipt names.
pub fn request_id(receipt: &str) -> String {
    let at = receipt
        .find("R-")
        .unwrap_or_else(|| panic!("no request id in receipt: {receipt}"));
    receipt[at..at + 7].to_string()
}

/// Form body of a `/access` slash command typed by `user_id`.
pub fn slash_body(user_id: &str, text: &str, response_url: &str) -> String {
    let user_name = user_name(user_id);
    let trigger_id = trigger_id();
    serde_urlencoded::to_string([
        ("token", VERIFICATION_TOKEN),
        ("team_id", TEAM_ID),
        ("team_domain", TEAM_DOMAIN),
        ("channel_id", COMMAND_CHANNEL_ID),
        ("channel_name", COMMAND_CHANNEL_NAME),
        ("user_id", user_id),
        ("user_name", user_name.as_str()),
        ("command", "/access"),
        ("text", text),
        ("api_app_id", API_APP_ID),
        ("is_enterprise_install", "false"),
        ("response_url", response_url),
        ("trigger_id", trigger_id.as_str()),
    ])
    .expect("form-encoding a slash command")
}

/// Form body of a button click (`block_actions`) on the bot's message
/// `message_ts` in `channel`.
pub fn action_body(
    user_id: &str,
    action_id: &str,
    value: &str,
    channel: &str,
    message_ts: &str,
    response_url: &str,
) -> String {
    payload_body(&action_payload(
        user_id,
        action_id,
        value,
        channel,
        message_ts,
        response_url,
    ))
}

/// The `block_actions` payload behind [`action_body`], for tests that need
/// to adjust it (for instance to embed the message's real blocks) before
/// encoding it with [`payload_body`].
pub fn action_payload(
    user_id: &str,
    action_id: &str,
    value: &str,
    channel: &str,
    message_ts: &str,
    response_url: &str,
) -> Value {
    let user_name = user_name(user_id);
    let action_ts = action_ts();
    json!({
        "type": "block_actions",
        "user": {
            "id": user_id,
            "username": user_name,
            "name": user_name,
            "team_id": TEAM_ID,
        },
        "api_app_id": API_APP_ID,
        "token": VERIFICATION_TOKEN,
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": false,
        },
        "trigger_id": trigger_id(),
        "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
        "enterprise": null,
        "is_enterprise_install": false,
        "channel": {"id": channel, "name": channel.to_lowercase()},
        "message": {
            "type": "message",
            "subtype": "bot_message",
            "text": "",
            "ts": message_ts,
            "user": BOT_USER_ID,
            "bot_id": BOT_ID,
            "team": TEAM_ID,
        },
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [{
            "action_id": action_id,
            "block_id": format!("{action_id}-block"),
            "value": value,
            "type": "button",
            "text": {"type": "plain_text", "text": action_id, "emoji": true},
            "action_ts": action_ts,
        }],
    })
}

/// Wraps an interaction payload the way Slack posts it: one form field,
/// `payload`, holding the JSON.
pub fn payload_body(payload: &Value) -> String {
    serde_urlencoded::to_string([("payload", payload.to_string())])
        .expect("form-encoding an interaction payload")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn user_name(user_id: &str) -> String {
    user_id.to_lowercase()
}

/// Slack's trigger ids are unique per interaction; uniqueness is all an app
/// can observe.
fn trigger_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{n}.{}.{:032x}",
        unix_now(),
        u128::from(n) * 0x9e37_79b9_7f4a_7c15
    )
}

fn action_ts() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    format!("{}.{:06}", now.as_secs(), now.subsec_micros())
}
