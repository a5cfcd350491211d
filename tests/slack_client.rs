//! The Slack Web API client against the Slack stand-in: messages to
//! different channels are not queued behind each other, and a 429 is
//! waited out for as long as Slack's `Retry-After` says, except on the
//! directory methods, which report it to their caller.

mod support;

use std::time::{Duration, Instant};
use support::slack::SlackStandIn;
use support::tollgate::BOT_TOKEN;
use tollgate::slack::client::SlackWebApi;
use tollgate::slack::{Message, SlackApi};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_to_different_channels_go_out_side_by_side() {
    support::install_crypto_provider();
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    let channels: Vec<String> = (0..10).map(|i| format!("C0CHAN{i}")).collect();
    for c in &channels {
        slack.add_channel(c, true);
    }
    let api = SlackWebApi::new(&slack.api_url(), BOT_TOKEN).unwrap();
    let card = Message::plain("a card");
    let posts = channels.iter().map(|c| api.post(c, &card));
    for result in futures::future::join_all(posts).await {
        result.unwrap();
    }
    let calls = slack.calls_to("chat.postMessage");
    assert_eq!(calls.len(), 10);
    assert!(calls.iter().all(|c| c.status == 200));
    // A client holding the workspace to one message a second would spread
    // these over nine seconds.
    let first = calls.iter().map(|c| c.at).min().unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    assert!(
        last.duration_since(first) < Duration::from_secs(3),
        "posts to ten channels were spread over {:?}",
        last.duration_since(first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_waited_out_for_its_retry_after() {
    support::install_crypto_provider();
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_channel("C0APPROVALS", true);
    slack.rate_limit("chat.postMessage", 2, 1);
    let api = SlackWebApi::new(&slack.api_url(), BOT_TOKEN).unwrap();
    let started = Instant::now();
    api.post("C0APPROVALS", &Message::plain("a card"))
        .await
        .unwrap();
    let calls = slack.calls_to("chat.postMessage");
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![429, 200]);
    assert!(
        calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(1900),
        "the second try waited for Retry-After: 2"
    );
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

/// The directory methods report a 429 at once with Slack's `Retry-After`
/// (spec 9.9): the caller serves a remembered answer meanwhile or waits
/// itself, one call per id, instead of each call sleeping in the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_users_info_is_reported_with_its_retry_after() {
    support::install_crypto_provider();
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user("U0REQ", "alice@example.com", "UTC", 0);
    slack.rate_limit("users.info", 7, 1);
    slack.rate_limit("usergroups.users.list", 3, 1);
    let api = SlackWebApi::new(&slack.api_url(), BOT_TOKEN).unwrap();
    match api.user("U0REQ").await {
        Err(tollgate::slack::SlackError::RateLimited {
            method,
            retry_after,
        }) => {
            assert_eq!(method, "users.info");
            assert_eq!(retry_after, Duration::from_secs(7));
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    assert!(matches!(
        api.group_members("S0ONCALL").await,
        Err(tollgate::slack::SlackError::RateLimited { retry_after, .. })
            if retry_after == Duration::from_secs(3)
    ));
    assert_eq!(slack.calls_to("users.info").len(), 1, "not retried");
    let user = api.user("U0REQ").await.unwrap();
    assert_eq!(user.email.as_deref(), Some("alice@example.com"));
}
