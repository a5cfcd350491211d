//! Spec 9.9 end to end with the real binary, MiniStack and a Slack
//! stand-in that enforces per-method rate limits: a storm of first-time
//! requesters while `users.info` is rate-limited is acknowledged at once,
//! nobody is told to try again and every card is posted; `/access
//! clusters` spammed under `usergroups.users.list`'s Tier 2 leaves a group
//! approver able to approve and a group member able to break glass.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::ministack::MiniStack;
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
/// Slack's own answer time: an acknowledgement later than this is lost.
const SLACK_ACK: Duration = Duration::from_secs(3);
/// The acknowledgement of a command whose work waits on Slack.
const WORKING: &str = "Working on it";

const CONFIG: &str = r#"
[server]
listen = "{listen}"

[store]
path = "{data}"

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[defaults]
min_duration = "1s"
max_duration = "1h"
default_duration = "1m"
approval_timeout = "10m"
reconcile_interval = "30s"

[[clusters]]
name = "prod-cluster"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0APPROVALS"
approvers = ["S0ONCALL"]
default_role = "view"

[clusters.break_glass]
allowed = ["S0ONCALL"]
max_duration = "1m"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
requesters = ["S0DEVS", "S0ONCALL"]
"#;

struct World {
    _ms: MiniStack,
    slack: SlackStandIn,
    tollgate: Tollgate,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new(users: &[&str]) -> World {
        support::install_crypto_provider();
        let ms = MiniStack::start();
        ms.create_cluster(CLUSTER).await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        for u in users {
            slack.add_user(u, &format!("{}@example.com", u.to_lowercase()), "UTC", 0);
        }
        slack.add_channel(CHANNEL, true);
        let dir = tempfile::tempdir().unwrap();
        let tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
        World {
            _ms: ms,
            slack,
            tollgate,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    /// The HTTP answer to a slash command (its text) and how long it took;
    /// `reply` names the command's response_url.
    async fn slash(&self, user: &str, text: &str, reply: &str) -> (String, Duration) {
        slash_at(
            &self.http,
            &self.tollgate.base,
            user,
            text,
            &self.slack.response_url(reply),
        )
        .await
    }

    /// What reached the response_url `reply`, oldest first.
    fn replies(&self, reply: &str) -> Vec<String> {
        self.slack
            .calls_to(&format!("response:{reply}"))
            .iter()
            .map(|c| c.params["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The outcome of a command: its HTTP answer, or, when that said
    /// "working on it", what followed through its response_url.
    async fn outcome(&self, answer: &str, reply: &str) -> String {
        if !answer.starts_with(WORKING) {
            return answer.to_string();
        }
        wait_until(
            &format!("the answer to {reply} through its response_url"),
            Duration::from_secs(60),
            || async { !self.replies(reply).is_empty() },
        )
        .await;
        self.replies(reply).remove(0)
    }

    async fn audit(&self) -> Vec<Value> {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "export", "--config"])
            .arg(&self.tollgate.config_path)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn wait_event(&self, id: &str, event: &str) {
        wait_until(
            &format!("{event} of {id}"),
            Duration::from_secs(30),
            || async {
                self.audit()
                    .await
                    .iter()
                    .any(|e| e["event"] == event && e["request_id"] == id)
            },
        )
        .await;
    }
}

async fn slash_at(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    text: &str,
    response_url: &str,
) -> (String, Duration) {
    let body = slash_body(user, text, response_url);
    let started = Instant::now();
    let resp = post_signed(
        http,
        &format!("{base}/slack/commands"),
        SIGNING_SECRET,
        body,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 200);
    let json: Value = resp.json().await.unwrap();
    (json["text"].as_str().unwrap_or_default().to_string(), took)
}

/// 24 people Tollgate has never seen ask at once while `users.info` allows
/// 8 calls and then 2 a second (Tier 4's shape, time compressed so the test
/// stays short): every command is acknowledged within Slack's 3 seconds,
/// those whose profile must wait are told "working on it" and get their
/// receipt through the response_url, nobody is told to try again, and
/// every request's card is posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_first_time_requesters_under_users_info_limits_is_served() {
    let users: Vec<String> = (0..24).map(|i| format!("U0STORM{i:02}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let w = World::new(&refs).await;
    w.slack.add_usergroup("S0DEVS", &refs);
    w.slack.add_usergroup("S0ONCALL", &[]);
    w.slack.limit_method("users.info", 120.0, 8);
    w.slack.limit_channels(5.0, 3);

    let asked: Vec<_> = users
        .iter()
        .map(|u| {
            let (http, base) = (w.http.clone(), w.tollgate.base.clone());
            let reply = w.slack.response_url(&format!("storm-{u}"));
            let user = u.clone();
            tokio::spawn(async move {
                slash_at(
                    &http,
                    &base,
                    &user,
                    "eks prod-cluster 1m view storm",
                    &reply,
                )
                .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut working = 0;
    for (user, task) in users.iter().zip(asked) {
        let (answer, took) = task.await.unwrap();
        assert!(
            took < SLACK_ACK,
            "{user} acknowledged after {took:?}: {answer}"
        );
        if answer.starts_with(WORKING) {
            working += 1;
        }
        let outcome = w.outcome(&answer, &format!("storm-{user}")).await;
        assert!(
            !outcome.to_lowercase().contains("try again"),
            "{user} was told to try again: {outcome}"
        );
        assert!(outcome.contains("sent to"), "{user}: {outcome}");
        ids.push(request_id(&outcome));
    }
    assert!(
        w.slack.rate_limited_calls("users.info") > 0,
        "the storm met Slack's limit"
    );
    assert!(working > 0, "some profiles had to wait");
    wait_until("every card posted", Duration::from_secs(60), || async {
        let posted = w.slack.calls_to("chat.postMessage");
        ids.iter().all(|id| {
            posted.iter().any(|c| {
                c.status == 200
                    && c.params["channel"] == CHANNEL
                    && c.params.to_string().contains(id.as_str())
            })
        })
    })
    .await;
    // One users.info answer per person: the cache and single-flight, not
    // a call per retry.
    let answered = w
        .slack
        .calls_to("users.info")
        .iter()
        .filter(|c| c.status == 200)
        .count();
    assert_eq!(answered, users.len());
}

/// One member runs `/access clusters` 15 times while `usergroups.users.list`
/// allows 3 calls and then Tier 2's 20 a minute: the groups are asked once
/// for all of them, then a group approver's click (asked afresh, through a
/// 429) approves and the grant is made, and a group member's break-glass
/// is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_approver_and_break_glass_work_after_clusters_spam_under_tier_2() {
    let w = World::new(&["U0DEV", "U0ONC"]).await;
    w.slack.add_usergroup("S0DEVS", &["U0DEV"]);
    w.slack.add_usergroup("S0ONCALL", &["U0ONC"]);
    w.slack
        .limit_method("usergroups.users.list", support::slack::TIER_2, 3);

    for i in 0..15 {
        let reply = format!("clusters-{i}");
        let (answer, took) = w.slash("U0DEV", "clusters", &reply).await;
        assert!(took < SLACK_ACK, "clusters answered after {took:?}");
        let outcome = w.outcome(&answer, &reply).await;
        assert!(outcome.contains(CLUSTER), "{outcome}");
    }
    let listed = w.slack.calls_to("usergroups.users.list").len();
    assert!(
        listed <= 2,
        "15 commands made {listed} group lookups: remembered, not asked each time"
    );

    let (answer, _) = w
        .slash("U0DEV", "eks prod-cluster 1m view deploy", "request")
        .await;
    let id = request_id(&w.outcome(&answer, "request").await);
    let ts = w.slack.card_ts(CHANNEL, &id, Duration::from_secs(15)).await;
    // The click's fresh membership lookup meets a 429 first.
    w.slack.rate_limit("usergroups.users.list", 2, 1);
    let body = action_body(
        "U0ONC",
        "approve",
        &id,
        CHANNEL,
        &ts,
        &w.slack.response_url("click"),
    );
    let status = post_signed(
        &w.http,
        &format!("{}/slack/interactions", w.tollgate.base),
        SIGNING_SECRET,
        body,
    )
    .await
    .status();
    assert_eq!(status.as_u16(), 200);
    w.wait_event(&id, "granted").await;
    assert!(
        w.replies("click").iter().all(|t| !t.contains("approver")),
        "the group approver was refused: {:?}",
        w.replies("click")
    );

    let (answer, took) = w
        .slash(
            "U0ONC",
            "eks prod-cluster 1m --break-glass INC-7 database down",
            "glass",
        )
        .await;
    assert!(took < SLACK_ACK);
    let outcome = w.outcome(&answer, "glass").await;
    assert!(outcome.contains("Break-glass"), "{outcome}");
    w.wait_event(&request_id(&outcome), "granted").await;
}
