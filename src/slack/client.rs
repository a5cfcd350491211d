//! The Web API through slack-morphism, with Slack's `Retry-After` honoured
//! and a base URL that tests and staging can point at a stand-in.

use async_trait::async_trait;
use hyper_util::client::legacy::connect::HttpConnector;
use slack_morphism::errors::{SlackClientError, SlackClientSystemError};
use slack_morphism::prelude::*;
use std::collections::HashMap;
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

/// Retries after a 429 wait for Slack's `Retry-After`; past this many the
/// error surfaces and the caller's own retry policy takes over.
const MAX_RATE_LIMIT_RETRIES: usize = 8;

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
        // Slack's published tier limits are enforced by Slack itself (as 429s,
        // which are retried); throttling locally as well only adds latency.
        let rate = SlackApiRateControlConfig::new()
            .with_tiers_limits(HashMap::new())
            .with_max_retries(MAX_RATE_LIMIT_RETRIES)
            .with_max_delay_timeout(Duration::from_secs(45));
        let connector = SlackClientHyperConnector::with_connector(https)
            .with_slack_api_url(&url)
            .with_rate_control(rate);
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
        let res = within(
            session.users_info(&SlackApiUsersInfoRequest::new(SlackUserId::new(
                id.to_string(),
            ))),
        )
        .await
        .map_err(|e| self.fail("users.info", e))?;
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
        let res = within(
            session.usergroups_users_list(&SlackApiUserGroupsUsersListRequest::new(
                SlackUserGroupId::new(group.to_string()),
            )),
        )
        .await
        .map_err(|e| self.fail("usergroups.users.list", e))?;
        Ok(res.users.into_iter().map(|u| u.to_string()).collect())
    }

    async fn post(&self, channel: &str, msg: &Message) -> Result<String, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = within(
            session.chat_post_message(&SlackApiChatPostMessageRequest::new(
                SlackChannelId::new(channel.to_string()),
                content(msg)?,
            )),
        )
        .await
        .map_err(|e| self.fail("chat.postMessage", e))?;
        Ok(res.ts.to_string())
    }

    async fn update(&self, channel: &str, ts: &str, msg: &Message) -> Result<(), SlackError> {
        let session = self.client.open_session(&self.token);
        within(session.chat_update(&SlackApiChatUpdateRequest::new(
            SlackChannelId::new(channel.to_string()),
            content(msg)?,
            SlackTs::new(ts.to_string()),
        )))
        .await
        .map_err(|e| self.fail("chat.update", e))?;
        Ok(())
    }

    async fn dm(&self, user: &str, msg: &Message) -> Result<CardRef, SlackError> {
        let session = self.client.open_session(&self.token);
        let opened = within(
            session.conversations_open(
                &SlackApiConversationsOpenRequest::new()
                    .with_users(vec![SlackUserId::new(user.to_string())]),
            ),
        )
        .await
        .map_err(|e| self.fail("conversations.open", e))?;
        let posted = within(
            session.chat_post_message(&SlackApiChatPostMessageRequest::new(
                opened.channel.id.clone(),
                content(msg)?,
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
        within(session.views_open(&SlackApiViewsOpenRequest::new(
            SlackTriggerId::new(trigger_id.to_string()),
            view,
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
        within(
            self.client
                .respond_to_event(&SlackResponseUrl::new(url), &req),
        )
        .await
        .map_err(|e| self.fail("response_url", e))?;
        Ok(())
    }

    async fn auth_test(&self) -> Result<super::BotIdentity, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = within(session.auth_test())
            .await
            .map_err(|e| self.fail("auth.test", e))?;
        Ok(super::BotIdentity {
            user_id: res.user_id.to_string(),
            team_id: res.team_id.to_string(),
        })
    }

    async fn is_member(&self, channel: &str) -> Result<bool, SlackError> {
        let session = self.client.open_session(&self.token);
        let res = within(
            session.conversations_info(&SlackApiConversationsInfoRequest::new(
                SlackChannelId::new(channel.to_string()),
            )),
        )
        .await
        .map_err(|e| self.fail("conversations.info", e))?;
        Ok(res.channel.flags.is_member.unwrap_or(false))
    }
}
