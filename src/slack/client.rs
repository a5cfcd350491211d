//! The Web API through slack-morphism, with Slack's `Retry-After` honoured
//! and a base URL that tests and staging can point at a stand-in.

use async_trait::async_trait;
use hyper_util::client::legacy::connect::HttpConnector;
use slack_morphism::errors::{SlackClientError, SlackClientSystemError};
use slack_morphism::prelude::*;
use std::sync::Arc;
use std::time::Duration;

use super::{Message, SlackApi, SlackError, SlackUser};
use crate::domain::request::CardRef;
use crate::metrics::Metrics;

type Connector = SlackClientHyperConnector<hyper_rustls::HttpsConnector<HttpConnector>>;

pub struct SlackWebApi {
    client: Arc<SlackClient<Connector>>,
    token: SlackApiToken,
    metrics: Option<Arc<Metrics>>,
}

/// Every Web API call (rate-limit waits included) ends within this: a
/// Slack that accepts the connection and never answers must not hold a
/// grant, a revoke or the scheduler.
pub const CALL_DEADLINE: Duration = Duration::from_secs(60);

async fn within<T>(
    call: impl std::future::Future<Output = Result<T, SlackClientError>>,
) -> Result<T, SlackClientError> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(SlackClientError::SystemError(
                SlackClientSystemError::new()
                    .with_message(format!("no answer within {} s", CALL_DEADLINE.as_secs())),
            ))
        })
}

/// After a 429 this many times the error surfaces and the caller's own
/// retry policy takes over.
const MAX_RATE_LIMIT_RETRIES: usize = 8;
/// A 429 without `Retry-After` waits this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest `Retry-After` believed: a larger one (a misbehaving proxy,
/// a typo) would overflow the times it is added to.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

fn retry_after(said: Option<Duration>) -> Duration {
    said.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_RETRY_AFTER)
}

/// One Web API call, made again after each 429 once Slack's `Retry-After`
/// has passed, all within `CALL_DEADLINE`. Slack limits messages per
/// channel; waiting only when it says so lets cards in different channels
/// and DMs to different people go out side by side (the library's own
/// rate control would hold every `chat.postMessage` of the workspace to
/// one a second).
macro_rules! call {
    ($request:expr $(,)?) => {
        within(async {
            let mut limited = 0;
            loop {
                match $request.await {
                    Err(SlackClientError::RateLimitError(e))
                        if limited < MAX_RATE_LIMIT_RETRIES =>
                    {
                        limited += 1;
                        tokio::time::sleep(retry_after(e.retry_after)).await;
                    }
                    other => break other,
                }
            }
        })
    };
}

/// How a `call_once!` call failed.
enum Failed {
    Limited(SlackError),
    Client(SlackClientError),
}

/// One call, no wait on a 429: the directory methods report Slack's
/// `Retry-After` to `service::directory`, which serves the last good
/// answer meanwhile or waits itself, one call per id (spec 9.9).
macro_rules! call_once {
    ($request:expr, $method:expr $(,)?) => {
        within($request).await.map_err(|e| match e {
            SlackClientError::RateLimitError(e) => Failed::Limited(SlackError::RateLimited {
                method: $method,
                retry_after: retry_after(e.retry_after),
            }),
            other => Failed::Client(other),
        })
    };
}

impl SlackWebApi {
    pub fn new(api_url: &str, bot_token: &str) -> Result<Self, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let mut url = api_url.to_string();
        if !url.ends_with('/') {
            url.push('/');
        }
        // No local rate control: Slack enforces its limits with 429s, which
        // `call!` waits out; throttling here as well only adds latency.
        let connector = SlackClientHyperConnector::with_connector(https).with_slack_api_url(&url);
        Ok(SlackWebApi {
            client: Arc::new(SlackClient::new(connector)),
            token: SlackApiToken::new(SlackApiTokenValue::new(bot_token.to_string())),
            metrics: None,
        })
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a failed call by method, then passes the error on.
    fn fail(&self, method: &'static str, e: SlackClientError) -> SlackError {
        if let Some(m) = &self.metrics {
            m.slack_error(method);
        }
        map_err(method, e)
    }

    /// As `fail`, for a `call_once!` result: a 429 is counted and passed on
    /// as `RateLimited`.
    fn fail_or_limited(&self, method: &'static str, e: Failed) -> SlackError {
        match e {
            Failed::Limited(limited) => {
                if let Some(m) = &self.metrics {
                    m.slack_error(method);
                }
                limited
            }
            Failed::Client(other) => self.fail(method, other),
        }
    }
}

fn map_err(method: &'static str, e: SlackClientError) -> SlackError {
    match e {
        SlackClientError::ApiError(api) => SlackError::Api {
            method,
            code: api.code,
        },
        other => SlackError::Transport {
            method,
            message: other.to_string(),
        },
    }
}

fn content(msg: &Message) -> Result<SlackMessageContent, SlackError> {
    let blocks: Vec<SlackBlock> = msg
        .blocks
        .iter()
        .map(|b| serde_json::from_value(b.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| SlackError::Invalid(format!("invalid block: {e}")))?;
    let mut c = SlackMessageContent::new().with_text(msg.text.clone());
    if !blocks.is_empty() {
        c = c.with_blocks(blocks);
    }
    Ok(c)
}

#[async_trait]
impl SlackApi for SlackWebApi {
    async fn user(&self, id: &str) -> Result<SlackUser, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = call_once!(
            session.users_info(&SlackApiUsersInfoRequest::new(SlackUserId::new(
                id.to_string(),
            ))),
            "users.info",
        )
        .map_err(|e| self.fail_or_limited("users.info", e))?;
        let u = res.user;
        Ok(SlackUser {
            id: u.id.to_string(),
            email: u.profile.and_then(|p| p.email).map(|e| e.to_string()),
            deleted: u.deleted.unwrap_or(false),
            is_bot: u.flags.is_bot.unwrap_or(false),
            is_guest: u.flags.is_restricted.unwrap_or(false)
                || u.flags.is_ultra_restricted.unwrap_or(false),
            tz: u.tz,
            tz_offset_secs: u.tz_offset.unwrap_or(0),
        })
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = call_once!(
            session.usergroups_users_list(&SlackApiUserGroupsUsersListRequest::new(
                SlackUserGroupId::new(group.to_string()),
            )),
            "usergroups.users.list",
        )
        .map_err(|e| self.fail_or_limited("usergroups.users.list", e))?;
        Ok(res.users.into_iter().map(|u| u.to_string()).collect())
    }

    async fn post(&self, channel: &str, msg: &Message) -> Result<String, SlackError> {
        let session = self.client.open_session(&self.token);
        let body = content(msg)?;
        let res = call!(
            session.chat_post_message(&SlackApiChatPostMessageRequest::new(
                SlackChannelId::new(channel.to_string()),
                body.clone(),
            )),
        )
        .await
        .map_err(|e| self.fail("chat.postMessage", e))?;
        Ok(res.ts.to_string())
    }

    async fn update(&self, channel: &str, ts: &str, msg: &Message) -> Result<(), SlackError> {
        let session = self.client.open_session(&self.token);
        let body = content(msg)?;
        call!(session.chat_update(&SlackApiChatUpdateRequest::new(
            SlackChannelId::new(channel.to_string()),
            body.clone(),
            SlackTs::new(ts.to_string()),
        )))
        .await
        .map_err(|e| self.fail("chat.update", e))?;
        Ok(())
    }

    async fn dm(&self, user: &str, msg: &Message) -> Result<CardRef, SlackError> {
        let session = self.client.open_session(&self.token);
        let opened = call!(session.conversations_open(
            &SlackApiConversationsOpenRequest::new()
                .with_users(vec![SlackUserId::new(user.to_string())]),
        ),)
        .await
        .map_err(|e| self.fail("conversations.open", e))?;
        let body = content(msg)?;
        let posted = call!(
            session.chat_post_message(&SlackApiChatPostMessageRequest::new(
                opened.channel.id.clone(),
                body.clone(),
            )),
        )
        .await
        .map_err(|e| self.fail("chat.postMessage", e))?;
        Ok(CardRef {
            channel: opened.channel.id.to_string(),
            ts: posted.ts.to_string(),
        })
    }

    async fn open_view(
        &self,
        trigger_id: &str,
        view: &serde_json::Value,
    ) -> Result<(), SlackError> {
        let view: SlackView = serde_json::from_value(view.clone())
            .map_err(|e| SlackError::Invalid(format!("invalid view: {e}")))?;
        let session = self.client.open_session(&self.token);
        call!(session.views_open(&SlackApiViewsOpenRequest::new(
            SlackTriggerId::new(trigger_id.to_string()),
            view.clone(),
        )))
        .await
        .map_err(|e| self.fail("views.open", e))?;
        Ok(())
    }

    async fn respond(&self, response_url: &str, msg: &Message) -> Result<(), SlackError> {
        let url: url::Url = response_url
            .parse()
            .map_err(|e| SlackError::Invalid(format!("invalid response_url: {e}")))?;
        let req =
            SlackApiPostWebhookMessageRequest::new(content(msg)?).with_replace_original(false);
        call!(self
            .client
            .respond_to_event(&SlackResponseUrl::new(url.clone()), &req),)
        .await
        .map_err(|e| self.fail("response_url", e))?;
        Ok(())
    }

    async fn auth_test(&self) -> Result<super::BotIdentity, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = call!(session.auth_test())
            .await
            .map_err(|e| self.fail("auth.test", e))?;
        Ok(super::BotIdentity {
            user_id: res.user_id.to_string(),
            team_id: res.team_id.to_string(),
        })
    }

    async fn is_member(&self, channel: &str) -> Result<bool, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = call!(
            session.conversations_info(&SlackApiConversationsInfoRequest::new(
                SlackChannelId::new(channel.to_string()),
            )),
        )
        .await
        .map_err(|e| self.fail("conversations.info", e))?;
        Ok(res.channel.flags.is_member.unwrap_or(false))
    }
}
