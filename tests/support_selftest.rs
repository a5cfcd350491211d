//! Checks the test doubles in `tests/support` against the real things they
//! stand in for, so a failing integration test points at tollgate, not at
//! its harness.

mod support;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

use support::ministack::{encode_arn, MiniStack};
use support::sign;
use support::slack::{SlackStandIn, UserSpec};

const BOT_TOKEN: &str = "xoxb-test-token";

#[tokio::test]
async fn ministack_serves_eks_access_entries() {
    let started = Instant::now();
    let stack = MiniStack::start();
    eprintln!("MiniStack answered after {:?}", started.elapsed());

    let env = stack.aws_env();
    assert!(env.contains(&("AWS_ENDPOINT_URL".to_string(), stack.endpoint.clone())));
    assert_eq!(stack.endpoint, format!("http://127.0.0.1:{}", stack.port));

    stack.create_cluster("dev").await;

    let (status, listed) = stack.eks_json("GET", "/clusters", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["clusters"], json!(["dev"]));

    let principal = "arn:aws:iam::000000000000:role/team/alice";
    let (status, created) = stack
        .eks_json(
            "POST",
            "/clusters/dev/access-entries",
            Some(json!({"principalArn": principal, "type": "STANDARD"})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["accessEntry"]["principalArn"], principal);

    let (status, entries) = stack
        .eks_json("GET", "/clusters/dev/access-entries", None)
        .await;
    assert_eq!(status, 200, "{entries}");
    let entries = entries["accessEntries"].as_array().expect("accessEntries");
    assert!(entries.contains(&json!(principal)), "{entries:?}");

    let policies_path = format!(
        "/clusters/dev/access-entries/{}/access-policies",
        encode_arn(principal)
    );
    let policy = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
    let (status, associated) = stack
        .eks_json(
            "POST",
            &policies_path,
            Some(json!({"policyArn": policy, "accessScope": {"type": "cluster"}})),
        )
        .await;
    assert_eq!(status, 200, "{associated}");

    let (status, policies) = stack.eks_json("GET", &policies_path, None).await;
    assert_eq!(status, 200, "{policies}");
    assert_eq!(
        policies["associatedAccessPolicies"][0]["policyArn"], policy,
        "{policies}"
    );

    let (status, missing) = stack
        .eks_json(
            "GET",
            &format!(
                "/clusters/dev/access-entries/{}",
                encode_arn("arn:aws:iam::000000000000:role/nobody")
            ),
            None,
        )
        .await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["__type"], "ResourceNotFoundException");

    let port = stack.port;
    drop(stack);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "MiniStack still listening after drop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ministacks_started_together_keep_separate_state() {
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(MiniStack::start),
        tokio::task::spawn_blocking(MiniStack::start)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port, b.port);
    a.create_cluster("only-in-a").await;
    let (_, listed) = b.eks_json("GET", "/clusters", None).await;
    assert_eq!(listed["clusters"], json!([]));
}

#[test]
fn encode_arn_escapes_path_separators() {
    assert_eq!(
        encode_arn("arn:aws:iam::1:role/a/b"),
        "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%2Fb"
    );
}

async fn api(
    http: &reqwest::Client,
    standin: &SlackStandIn,
    method: &str,
    body: Value,
) -> (u16, HeaderMap, Value) {
    let response = http
        .post(format!("{}{method}", standin.api_url()))
        .bearer_auth(BOT_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("calling the stand-in");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("reading the answer");
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn slack_standin_answers_like_slack() {
    let standin = SlackStandIn::start(BOT_TOKEN).await;
    standin.add_user("U1", "alice@example.com", "Europe/Berlin", 3600);
    let http = reqwest::Client::new();

    // Read methods arrive as GET with a query string.
    let answer: Value = http
        .get(format!("{}users.info?user=U1", standin.api_url()))
        .bearer_auth(BOT_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["user"]["profile"]["email"], "alice@example.com");
    assert_eq!(answer["user"]["tz_offset"], 3600);
    serde_json::from_value::<SlackApiUsersInfoResponse>(answer).expect("SlackUser shape");
    assert_eq!(standin.calls_to("users.info")[0].params["user"], "U1");

    let (_, _, answer) = api(&http, &standin, "users.info", json!({"user": "U404"})).await;
    assert_eq!(answer, json!({"ok": false, "error": "user_not_found"}));

    // Wrong token: HTTP 200 with invalid_auth, still recorded.
    let answer: Value = http
        .post(format!("{}auth.test", standin.api_url()))
        .bearer_auth("xoxb-wrong")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"ok": false, "error": "invalid_auth"}));
    let call = standin.calls_to("auth.test").pop().expect("recorded");
    assert_eq!(call.token.as_deref(), Some("xoxb-wrong"));
    assert_eq!(call.response["error"], "invalid_auth");

    // Posting, then updating, a card.
    let blocks = json!([{"type": "section", "text": {"type": "mrkdwn", "text": "pending"}}]);
    let (_, _, posted) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C1", "text": "pending", "blocks": blocks}),
    )
    .await;
    assert_eq!(posted["ok"], true, "{posted}");
    assert_eq!(posted["channel"], "C1");
    let ts = posted["ts"].as_str().expect("ts").to_string();
    assert_eq!(posted["message"]["ts"], ts.as_str());
    assert_eq!(standin.message("C1", &ts).unwrap()["blocks"], blocks);

    let (_, _, second) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C1", "text": "another"}),
    )
    .await;
    assert!(second["ts"].as_str().unwrap() > ts.as_str(), "ts must grow");

    let (_, _, updated) = api(
        &http,
        &standin,
        "chat.update",
        json!({"channel": "C1", "ts": ts, "text": "approved"}),
    )
    .await;
    assert_eq!(updated["ok"], true, "{updated}");
    assert_eq!(updated["text"], "approved");
    let card = standin.message("C1", &ts).unwrap();
    assert_eq!(card["text"], "approved");
    assert_eq!(card["blocks"], blocks, "blocks survive a text-only update");

    let (_, _, missing) = api(
        &http,
        &standin,
        "chat.update",
        json!({"channel": "C1", "ts": "1.000000", "text": "x"}),
    )
    .await;
    assert_eq!(missing["error"], "message_not_found");

    // Form-encoded posts work too, with blocks as a JSON string.
    let answer: Value = http
        .post(format!("{}chat.postMessage", standin.api_url()))
        .bearer_auth(BOT_TOKEN)
        .form(&[("channel", "U1"), ("blocks", r#"[{"type":"divider"}]"#)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["channel"], "DU1", "posts to a user land in the DM");
    let dm = standin
        .message("DU1", answer["ts"].as_str().unwrap())
        .unwrap();
    assert_eq!(dm["blocks"], json!([{"type": "divider"}]));

    // Rate limit: 429 with Retry-After, then normal service.
    standin.rate_limit("chat.postMessage", 7, 1);
    let (status, headers, answer) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C1", "text": "x"}),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(answer, json!({"ok": false, "error": "ratelimited"}));
    let (status, _, answer) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C1", "text": "x"}),
    )
    .await;
    assert_eq!((status, answer["ok"].clone()), (200, json!(true)));

    standin.server_error("*", 1);
    let (status, _, _) = api(&http, &standin, "auth.test", json!({})).await;
    assert_eq!(status, 500);

    standin.fail_method("auth.test", "account_inactive", 1);
    let (_, _, answer) = api(&http, &standin, "auth.test", json!({})).await;
    assert_eq!(answer["error"], "account_inactive");
    let (_, _, answer) = api(&http, &standin, "auth.test", json!({})).await;
    assert_eq!(answer["user_id"], "U0BOT");

    standin.fail_channel("C9", "not_in_channel");
    let (_, _, answer) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C9", "text": "x"}),
    )
    .await;
    assert_eq!(answer["error"], "not_in_channel");
    standin.clear_fail_channel("C9");
    let (_, _, answer) = api(
        &http,
        &standin,
        "chat.postMessage",
        json!({"channel": "C9", "text": "x"}),
    )
    .await;
    assert_eq!(answer["ok"], true);

    let (_, _, answer) = api(&http, &standin, "admin.users.remove", json!({})).await;
    assert_eq!(answer["error"], "unknown_method");

    // response_url posts are recorded and awaited like API calls.
    let response_url = standin.response_url("cmd1");
    let posting = http
        .post(&response_url)
        .json(&json!({"response_type": "ephemeral", "text": "queued"}))
        .send();
    let (posted, call) = tokio::join!(
        posting,
        standin.wait_for_call(
            "response:cmd1",
            |call| call.params["text"] == "queued",
            Duration::from_secs(5),
        )
    );
    assert_eq!(posted.unwrap().text().await.unwrap(), "ok");
    assert_eq!(call.params["response_type"], "ephemeral");
}

/// Builds the client the way tollgate does, but allowing plain HTTP so it
/// can reach the stand-in.
fn slack_client(api_url: &str) -> SlackClient<SlackClientHyperConnector<SlackHttpsConnector>> {
    support::install_crypto_provider();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    SlackClient::new(
        SlackClientHyperConnector::with_connector(connector).with_slack_api_url(api_url),
    )
}

type SlackHttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

#[tokio::test]
async fn slack_morphism_client_understands_the_standin() {
    let standin = SlackStandIn::start(BOT_TOKEN).await;
    standin.add_user_full(UserSpec {
        id: "U1".into(),
        email: "alice@example.com".into(),
        deleted: false,
        is_bot: false,
        is_guest: false,
        tz: "America/New_York".into(),
        tz_offset: -18000,
    });
    standin.add_usergroup("S1", &["U1", "U2"]);
    standin.add_channel("C1", true);

    let client = slack_client(&standin.api_url());
    let token = SlackApiToken::new(BOT_TOKEN.into());
    let session = client.open_session(&token);

    let auth = session.auth_test().await.expect("auth.test");
    assert_eq!(auth.user_id, "U0BOT".into());

    let user = session
        .users_info(&SlackApiUsersInfoRequest::new("U1".into()))
        .await
        .expect("users.info")
        .user;
    assert_eq!(
        user.profile.and_then(|p| p.email),
        Some(EmailAddress("alice@example.com".into()))
    );
    assert_eq!(user.tz_offset, Some(-18000));

    let missing = session
        .users_info(&SlackApiUsersInfoRequest::new("U404".into()))
        .await
        .expect_err("unknown user");
    assert!(
        matches!(&missing, SlackClientError::ApiError(e) if e.code == "user_not_found"),
        "{missing:?}"
    );

    let members = session
        .usergroups_users_list(&SlackApiUserGroupsUsersListRequest::new("S1".into()))
        .await
        .expect("usergroups.users.list");
    assert_eq!(members.users, vec!["U1".into(), "U2".into()]);

    let channel = session
        .conversations_info(&SlackApiConversationsInfoRequest::new("C1".into()))
        .await
        .expect("conversations.info")
        .channel;
    assert_eq!(channel.flags.is_member, Some(true));

    let dm = session
        .conversations_open(&SlackApiConversationsOpenRequest::new().with_users(vec!["U1".into()]))
        .await
        .expect("conversations.open");
    assert_eq!(dm.channel.id, "DU1".into());

    let blocks: Vec<SlackBlock> = slack_blocks![some_into(
        SlackSectionBlock::new().with_text(md!("access requested"))
    )];
    let posted = session
        .chat_post_message(&SlackApiChatPostMessageRequest::new(
            "C1".into(),
            SlackMessageContent::new()
                .with_text("access requested".into())
                .with_blocks(blocks.clone()),
        ))
        .await
        .expect("chat.postMessage");
    assert_eq!(posted.channel, "C1".into());

    let updated = session
        .chat_update(&SlackApiChatUpdateRequest::new(
            "C1".into(),
            SlackMessageContent::new().with_text("access granted".into()),
            posted.ts.clone(),
        ))
        .await
        .expect("chat.update");
    assert_eq!(
        updated.message.content.text.as_deref(),
        Some("access granted")
    );
    let card = standin.message("C1", posted.ts.value()).expect("stored");
    assert_eq!(card["text"], "access granted");
    let stored_blocks: Vec<SlackBlock> =
        serde_json::from_value(card["blocks"].clone()).expect("blocks");
    assert_eq!(stored_blocks, blocks);

    session
        .chat_post_ephemeral(&SlackApiChatPostEphemeralRequest::new(
            "C1".into(),
            "U1".into(),
            SlackMessageContent::new().with_text("only you".into()),
        ))
        .await
        .expect("chat.postEphemeral");

    standin.rate_limit("chat.postMessage", 3, 1);
    let limited = session
        .chat_post_message(&SlackApiChatPostMessageRequest::new(
            "C1".into(),
            SlackMessageContent::new().with_text("again".into()),
        ))
        .await
        .expect_err("rate limited");
    assert!(
        matches!(&limited, SlackClientError::RateLimitError(e)
            if e.retry_after == Some(Duration::from_secs(3))),
        "{limited:?}"
    );

    // Read methods travel as GET with a query string, writes as JSON POSTs.
    let verbs: Vec<(String, String)> = standin
        .calls()
        .into_iter()
        .map(|call| (call.method, call.http_method))
        .collect();
    for (method, verb) in [
        ("auth.test", "GET"),
        ("users.info", "GET"),
        ("usergroups.users.list", "GET"),
        ("conversations.info", "GET"),
        ("conversations.open", "POST"),
        ("chat.postMessage", "POST"),
        ("chat.update", "POST"),
        ("chat.postEphemeral", "POST"),
    ] {
        assert!(
            verbs.contains(&(method.to_string(), verb.to_string())),
            "{method} not sent as {verb}: {verbs:?}"
        );
    }
}

#[test]
fn signature_matches_slack_documented_example() {
    // From Slack's "Verifying requests from Slack" page; Python's hmac module
    // yields the same value for this body.
    let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    assert_eq!(
        sign::signature("8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body),
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    );
}

#[test]
fn slash_and_action_bodies_parse_as_slack_events() {
    let slash = sign::slash_body("U1", "dev 30m fixing prod", "http://x/response/a");
    let command: SlackCommandEvent = serde_urlencoded::from_str(&slash).expect("command event");
    assert_eq!(command.user_id, "U1".into());
    assert_eq!(command.command, "/access".into());
    assert_eq!(command.text.as_deref(), Some("dev 30m fixing prod"));
    assert_eq!(command.response_url.0.as_str(), "http://x/response/a");

    let action = sign::action_body(
        "U2",
        "approve",
        "req-1",
        "C1",
        "1763900000.000100",
        "http://x/response/b",
    );
    let form: Vec<(String, String)> = serde_urlencoded::from_str(&action).expect("form");
    assert_eq!(form.len(), 1);
    assert_eq!(form[0].0, "payload");
    let event: SlackInteractionEvent = serde_json::from_str(&form[0].1).expect("interaction");
    let SlackInteractionEvent::BlockActions(event) = event else {
        panic!("not block_actions: {event:?}");
    };
    assert_eq!(event.user.unwrap().id, "U2".into());
    let action = &event.actions.unwrap()[0];
    assert_eq!(action.action_id, "approve".into());
    assert_eq!(action.value.as_deref(), Some("req-1"));
    let SlackInteractionActionContainer::Message(container) = event.container else {
        panic!("not a message container");
    };
    assert_eq!(container.message_ts, "1763900000.000100".into());
    assert_eq!(container.channel_id, Some("C1".into()));
}

#[tokio::test]
async fn post_signed_passes_slack_morphism_verification() {
    const SECRET: &str = "signing-secret-test";
    let app = axum::Router::new().route(
        "/slack",
        axum::routing::post(|headers: HeaderMap, body: Bytes| async move {
            let verifier = SlackEventSignatureVerifier::new(&SECRET.into());
            let header = |name: &str| headers[name].to_str().unwrap().to_string();
            let body = String::from_utf8(body.to_vec()).unwrap();
            match verifier.verify(
                &header("x-slack-signature"),
                &body,
                &header("x-slack-request-timestamp"),
            ) {
                Ok(()) => StatusCode::OK,
                Err(_) => StatusCode::UNAUTHORIZED,
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slack", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::new();
    let body = sign::slash_body("U1", "dev", "http://x/response/a");
    let accepted = sign::post_signed(&http, &url, SECRET, body.clone()).await;
    assert_eq!(accepted.status(), 200);
    let rejected = sign::post_signed(&http, &url, "other-secret", body).await;
    assert_eq!(rejected.status(), 401);
}

#[tokio::test]
async fn aws_sdk_eks_works_against_ministack() {
    use aws_sdk_eks::types::{AccessScope, AccessScopeType};
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

    let stack = MiniStack::start();
    stack.create_cluster("dev").await;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_sdk_eks::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_eks::config::Region::new("us-east-1"))
        .endpoint_url(&stack.endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(http)
        .build();
    let eks = aws_sdk_eks::Client::from_conf(config);
    let principal = "arn:aws:iam::000000000000:role/team/alice";
    let policy = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";

    eks.create_access_entry()
        .cluster_name("dev")
        .principal_arn(principal)
        .send()
        .await
        .expect("CreateAccessEntry");
    eks.associate_access_policy()
        .cluster_name("dev")
        .principal_arn(principal)
        .policy_arn(policy)
        .access_scope(
            AccessScope::builder()
                .r#type(AccessScopeType::Cluster)
                .build(),
        )
        .send()
        .await
        .expect("AssociateAccessPolicy");
    let listed = eks
        .list_associated_access_policies()
        .cluster_name("dev")
        .principal_arn(principal)
        .send()
        .await
        .expect("ListAssociatedAccessPolicies");
    assert_eq!(listed.associated_access_policies().len(), 1);
    let described = eks
        .describe_access_entry()
        .cluster_name("dev")
        .principal_arn(principal)
        .send()
        .await
        .expect("DescribeAccessEntry");
    assert!(described.access_entry().is_some());
    eks.disassociate_access_policy()
        .cluster_name("dev")
        .principal_arn(principal)
        .policy_arn(policy)
        .send()
        .await
        .expect("DisassociateAccessPolicy");
    eks.delete_access_entry()
        .cluster_name("dev")
        .principal_arn(principal)
        .send()
        .await
        .expect("DeleteAccessEntry");
    let missing = eks
        .describe_access_entry()
        .cluster_name("dev")
        .principal_arn(principal)
        .send()
        .await
        .expect_err("entry deleted");
    assert!(
        missing
            .as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception()),
        "{missing:?}"
    );
}

/// Slack's message limit is per channel: a burst, then about one a second,
/// 429 with `Retry-After` beyond; another channel is not held back.
#[tokio::test]
async fn slack_standin_limits_messages_per_channel() {
    let standin = SlackStandIn::start(BOT_TOKEN).await;
    standin.add_channel("C1", true);
    standin.add_channel("C2", true);
    standin.limit_channels(1.0, 2);
    let http = reqwest::Client::new();
    let post = |channel: &'static str| {
        let (http, standin) = (&http, &standin);
        async move {
            let (status, headers, _) = api(
                http,
                standin,
                "chat.postMessage",
                json!({"channel": channel, "text": "x"}),
            )
            .await;
            (status, headers.get("retry-after").cloned())
        }
    };
    assert_eq!(post("C1").await.0, 200);
    assert_eq!(post("C1").await.0, 200, "a burst of two");
    let (status, retry_after) = post("C1").await;
    assert_eq!(status, 429, "beyond the burst");
    assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
    assert_eq!(post("C2").await.0, 200, "another channel has its own limit");
    // Once Retry-After has passed, the channel takes a message again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if post("C1").await.0 == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "C1 never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Slack's tiers are per method: a bucket of a minute's worth (Tier 4:
/// 100), then 429 with `Retry-After` in seconds and Slack's body; another
/// method keeps its own bucket, and a method no test limits never 429s.
#[tokio::test]
async fn slack_standin_limits_each_method_by_its_tier() {
    let standin = SlackStandIn::start(BOT_TOKEN).await;
    standin.add_user("U1", "alice@example.com", "UTC", 0);
    standin.add_usergroup("S1", &["U1"]);
    standin.slack_tiers(1.0, 3);
    let http = reqwest::Client::new();
    for i in 0..100 {
        let (status, _, _) = api(&http, &standin, "users.info", json!({"user": "U1"})).await;
        assert_eq!(status, 200, "call {i} is within Tier 4's 100");
    }
    let (status, headers, body) = api(&http, &standin, "users.info", json!({"user": "U1"})).await;
    assert_eq!(status, 429);
    assert_eq!(body, json!({"ok": false, "error": "ratelimited"}));
    // One token a 0.6 s at 100 a minute: Slack says wait a whole second.
    assert_eq!(
        headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_eq!(standin.rate_limited_calls("users.info"), 1);
    let (status, _, _) = api(
        &http,
        &standin,
        "usergroups.users.list",
        json!({"usergroup": "S1"}),
    )
    .await;
    assert_eq!(status, 200, "Tier 2 has its own bucket");
    for _ in 0..19 {
        api(
            &http,
            &standin,
            "usergroups.users.list",
            json!({"usergroup": "S1"}),
        )
        .await;
    }
    let (status, headers, _) = api(
        &http,
        &standin,
        "usergroups.users.list",
        json!({"usergroup": "S1"}),
    )
    .await;
    assert_eq!(status, 429, "the 21st Tier 2 call in a minute");
    assert_eq!(
        headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("3"),
        "20 a minute: a token every 3 s"
    );
    let fresh = SlackStandIn::start(BOT_TOKEN).await;
    fresh.add_user("U1", "alice@example.com", "UTC", 0);
    for _ in 0..150 {
        let (status, _, _) = api(&http, &fresh, "users.info", json!({"user": "U1"})).await;
        assert_eq!(status, 200, "no limits unless a test asks");
    }
}

/// The AWS proxy holds every call for its delay, names each operation as
/// AWS does, and counts the DynamoDB items an answer read.
#[tokio::test]
async fn aws_proxy_delays_names_and_counts_calls() {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    use support::aws_proxy::AwsProxy;

    let stack = MiniStack::start();
    stack.create_cluster("dev").await;
    let proxy = AwsProxy::start(&stack.endpoint, Duration::from_millis(50)).await;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(Provider::Rustls(CryptoMode::Ring))
                .build_https(),
        )
        .endpoint_url(&proxy.endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await;
    let eks = aws_sdk_eks::Client::new(&sdk);
    let started = Instant::now();
    let listed = eks
        .list_access_entries()
        .cluster_name("dev")
        .send()
        .await
        .expect("ListAccessEntries through the proxy");
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "held for the delay"
    );
    assert_eq!(listed.access_entries().len(), 1, "the account root's entry");

    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    tollgate::store::dynamodb::init(&dynamo, "proxied")
        .await
        .expect("store init through the proxy");
    let before = proxy.counts();
    for sk in ["a", "b", "c"] {
        dynamo
            .put_item()
            .table_name("proxied")
            .item("pk", aws_sdk_dynamodb::types::AttributeValue::S("P".into()))
            .item("sk", aws_sdk_dynamodb::types::AttributeValue::S(sk.into()))
            .send()
            .await
            .expect("PutItem");
    }
    dynamo
        .query()
        .table_name("proxied")
        .key_condition_expression("pk = :p")
        .expression_attribute_values(":p", aws_sdk_dynamodb::types::AttributeValue::S("P".into()))
        .send()
        .await
        .expect("Query");
    let counts = proxy.counts().since(&before);
    assert_eq!(counts.calls.get("dynamodb:PutItem"), Some(&3));
    assert_eq!(counts.calls.get("dynamodb:Query"), Some(&1));
    assert_eq!(counts.items_read, 3, "{counts:?}");
    assert_eq!(proxy.counts().calls.get("eks:ListAccessEntries"), Some(&1));

    // ListAccessEntries comes in pages of at most 100 with a nextToken, as
    // from EKS (MiniStack alone answers the first 100 and stops).
    for i in 0..120 {
        let body = json!({"principalArn": format!("arn:aws:iam::000000000000:role/p{i}")});
        let (status, answer) = stack
            .eks_json("POST", "/clusters/dev/access-entries", Some(body))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let first = eks
        .list_access_entries()
        .cluster_name("dev")
        .send()
        .await
        .expect("first page");
    assert_eq!(first.access_entries().len(), 100);
    let second = eks
        .list_access_entries()
        .cluster_name("dev")
        .set_next_token(first.next_token().map(str::to_string))
        .send()
        .await
        .expect("second page");
    assert_eq!(second.access_entries().len(), 21, "120 and the root's");
    assert_eq!(second.next_token(), None);
}
