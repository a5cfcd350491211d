//! Slack: the Web API behind a narrow trait, request verification, Block Kit
//! builders and the HTTP routes Slack calls.

use async_trait::async_trait;

use crate::domain::request::CardRef;

pub mod blocks;
pub mod client;
pub mod modal;
pub mod routes;
pub mod verify;

/// What Tollgate needs to know of a Slack user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlackUser {
    pub id: String,
    pub email: Option<String>,
    pub deleted: bool,
    pub is_bot: bool,
    /// A multi- or single-channel guest (`is_restricted` /
    /// `is_ultra_restricted`).
    pub is_guest: bool,
    pub tz: Option<String>,
    pub tz_offset_secs: i32,
}

/// A message: fallback text (notifications, screen readers) and Block Kit
/// blocks as JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub text: String,
    pub blocks: Vec<serde_json::Value>,
}

impl Message {
    pub fn plain(text: impl Into<String>) -> Self {
        Message {
            text: text.into(),
            blocks: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    /// Slack answered `ok: false` with this error code.
    #[error("Slack {method} refused: {code}")]
    Api { method: &'static str, code: String },
    #[error("Slack {method} failed: {message}")]
    Transport {
        method: &'static str,
        message: String,
    },
    /// HTTP 429: Slack's rate limit for this method; ask again after
    /// `retry_after` (its `Retry-After`). Only the directory methods
    /// (`users.info`, `usergroups.users.list`) report it: their caller
    /// decides what to serve meanwhile (`domain::directory`).
    #[error("Slack {method} rate-limited: retry after {} s", .retry_after.as_secs())]
    RateLimited {
        method: &'static str,
        retry_after: std::time::Duration,
    },
    /// Tollgate built something Slack would refuse; sending it again cannot help.
    #[error("cannot send to Slack: {0}")]
    Invalid(String),
}

impl SlackError {
    /// The kind, for the `error` label of `tollgate_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SlackError::Api { .. } => "slack_refused",
            SlackError::Transport { .. } => "slack_unreachable",
            SlackError::RateLimited { .. } => "slack_ratelimited",
            SlackError::Invalid(_) => "slack_invalid",
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            SlackError::Api { code, .. } => Some(code),
            SlackError::RateLimited { .. } => Some("ratelimited"),
            SlackError::Transport { .. } | SlackError::Invalid(_) => None,
        }
    }

    /// Worth sending again later: Slack unreachable, answering 5xx, or
    /// saying it is having trouble.
    pub fn is_transient(&self) -> bool {
        match self {
            SlackError::Transport { .. } | SlackError::RateLimited { .. } => true,
            SlackError::Api { code, .. } => matches!(
                code.as_str(),
                "internal_error"
                    | "fatal_error"
                    | "service_unavailable"
                    | "request_timeout"
                    | "ratelimited"
            ),
            SlackError::Invalid(_) => false,
        }
    }
}

/// What `auth.test` says about the bot token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BotIdentity {
    pub user_id: String,
    /// The workspace the token belongs to: the only one whose requests
    /// Tollgate accepts.
    pub team_id: String,
}

#[async_trait]
pub trait SlackApi: Send + Sync + 'static {
    /// `users.info`. A 429 is returned at once (`SlackError::RateLimited`),
    /// not waited out: `service::directory` decides what serves meanwhile.
    async fn user(&self, id: &str) -> Result<SlackUser, SlackError>;
    /// `usergroups.users.list`; a 429 is returned at once, as for `user`.
    async fn group_members(&self, group: &str) -> Result<Vec<String>, SlackError>;
    /// Posts to a channel; returns the message's `ts`.
    async fn post(&self, channel: &str, msg: &Message) -> Result<String, SlackError>;
    async fn update(&self, channel: &str, ts: &str, msg: &Message) -> Result<(), SlackError>;
    /// Opens (or reuses) the DM with a user and posts there; returns where
    /// the message landed so it can be updated later.
    async fn dm(&self, user: &str, msg: &Message) -> Result<CardRef, SlackError>;
    /// `views.open`: shows a modal in answer to an interaction's trigger id.
    async fn open_view(&self, trigger_id: &str, view: &serde_json::Value)
        -> Result<(), SlackError>;
    /// Posts an ephemeral follow-up through an interaction's `response_url`.
    async fn respond(&self, response_url: &str, msg: &Message) -> Result<(), SlackError>;
    /// `auth.test`: who the bot token belongs to.
    async fn auth_test(&self) -> Result<BotIdentity, SlackError>;
    /// `conversations.info`: whether the bot is a member of the channel.
    async fn is_member(&self, channel: &str) -> Result<bool, SlackError>;
}
