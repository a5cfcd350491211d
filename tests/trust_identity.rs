//! End to end with the real binary: access goes to the requester's own
//! principal or nowhere (spec 9.1), offboarded requesters lose it, the
//! limits of 9.3 hold, break-glass works where a reason is required, and a
//! card whose post died with the process is posted at restart.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::{SlackStandIn, UserSpec};
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";

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
reconcile_interval = "1s"

[[clusters]]
name = "prod-cluster"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"

[clusters.break_glass]
allowed = ["U0REQ"]
max_duration = "1m"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"

[clusters.roles.capped]
access_policy = "AmazonEKSViewPolicy"
max_duration = "1m"
max_total_duration = "90s"

[clusters.roles.auto]
access_policy = "AmazonEKSViewPolicy"
auto_approve = ["U0REQ"]
max_duration = "1m"
max_total_duration = "90s"

[clusters.roles.admin]
access_policy = "AmazonEKSClusterAdminPolicy"
require_reason = true
"#;

struct World {
    ms: MiniStack,
    slack: SlackStandIn,
    tollgate: Tollgate,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        support::install_crypto_provider();
        let ms = MiniStack::start();
        ms.create_cluster(CLUSTER).await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
        slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
        slack.add_channel(CHANNEL, true);
        let dir = tempfile::tempdir().unwrap();
        let tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
        World {
            ms,
            slack,
            tollgate,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn add_user(&self, id: &str, email: &str, is_guest: bool) {
        self.slack.add_user_full(UserSpec {
            id: id.into(),
            email: email.into(),
            deleted: false,
            is_bot: false,
            is_guest,
            tz: "UTC".into(),
            tz_offset: 0,
        });
    }

    /// The ephemeral answer to a slash command.
    async fn slash(&self, user: &str, text: &str) -> String {
        let body = slash_body(user, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", self.tollgate.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, body).await;
        assert_eq!(resp.status().as_u16(), 200);
        let json: Value = resp.json().await.unwrap();
        json["text"].as_str().unwrap_or_default().to_string()
    }

    async fn request(&self, text: &str) -> String {
        request_id(&self.slash(REQUESTER, text).await)
    }

    async fn card(&self, id: &str) -> String {
        self.slack
            .card_ts(CHANNEL, id, Duration::from_secs(15))
            .await
    }

    async fn click(&self, user: &str, id: &str, ts: &str, response: &str) {
        let body = action_body(
            user,
            "approve",
            id,
            CHANNEL,
            ts,
            &self.slack.response_url(response),
        );
        let url = format!("{}/slack/interactions", self.tollgate.base);
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status();
        assert_eq!(status.as_u16(), 200);
    }

    fn responses_to(&self, name: &str) -> Vec<String> {
        self.slack
            .calls_to(&format!("response:{name}"))
            .iter()
            .map(|c| c.params["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn entry_exists(&self, principal: &str) -> bool {
        let path = format!(
            "/clusters/{CLUSTER}/access-entries/{}",
            encode_arn(principal)
        );
        self.ms.eks_json("GET", &path, None).await.0 == 200
    }

    /// Every access entry's principal on the cluster.
    async fn entries(&self) -> Vec<String> {
        let (status, json) = self
            .ms
            .eks_json("GET", &format!("/clusters/{CLUSTER}/access-entries"), None)
            .await;
        assert_eq!(status, 200, "{json}");
        json["accessEntries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    async fn audit(&self) -> Vec<Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "export", "--config"])
            .arg(&self.tollgate.config_path)
            .output()
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

    async fn granted(&self, id: &str) {
        let id = id.to_string();
        wait_until("granted", Duration::from_secs(15), || async {
            self.audit()
                .await
                .iter()
                .any(|e| e["event"] == "granted" && e["request_id"] == id.as_str())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identities_are_refused_and_nothing_is_recorded() {
    let w = World::new().await;
    let before = w.entries().await;
    w.add_user("U0SLASH", "ops/admin@example.com", false);
    w.add_user("U0OTHER", "alice@contractor.io", false);
    w.add_user("U0GUEST", "guest@example.com", true);
    w.add_user("U0STAR", "*@example.com", false);
    w.add_user("U0LOOK", "\u{0430}lice@example.com", false);
    for (user, expected) in [
        ("U0SLASH", "holds characters"),
        ("U0OTHER", "domain `contractor.io`"),
        ("U0GUEST", "guest"),
        ("U0STAR", "holds characters"),
        ("U0LOOK", "holds characters"),
    ] {
        let answer = w.slash(user, "eks prod-cluster 30s view INC-1").await;
        assert!(answer.contains(expected), "{user}: {answer}");
        assert!(!answer.contains("R-"), "{user} got a request id: {answer}");
        // Break-glass is no way around it either.
        let answer = w
            .slash(user, "eks prod-cluster 30s view --break-glass SEV1")
            .await;
        assert!(!answer.contains("Break-glass R-"), "{user}: {answer}");
    }
    // Nothing recorded, nothing posted, nothing created.
    let events = w.audit().await;
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "requested" || e["event"] == "granted"),
        "{events:?}"
    );
    assert!(w.slack.calls_to("chat.postMessage").is_empty());
    assert_eq!(w.entries().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_changed_after_the_request_fails_the_grant_and_creates_nothing() {
    let w = World::new().await;
    let id = w.request("eks prod-cluster 30s view INC-2").await;
    let ts = w.card(&id).await;
    let card = w.slack.message(CHANNEL, &ts).unwrap().to_string();
    assert!(card.contains(ALICE), "the card names the principal: {card}");

    // The Slack profile now says someone else; the request was approved
    // for alice's role, so nothing may be granted to either.
    w.slack
        .edit_user(REQUESTER, |u| u.email = "mallory@example.com".into());
    w.click(APPROVER, &id, &ts, "click").await;
    let id2 = id.clone();
    wait_until("grant_failed", Duration::from_secs(15), || async {
        w.audit().await.iter().any(|e| {
            e["event"] == "grant_failed"
                && e["request_id"] == id2.as_str()
                && e["details"]["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("principal changed")
        })
    })
    .await;
    assert!(!w.entry_exists(ALICE).await);
    assert!(
        !w.entry_exists("arn:aws:iam::000000000000:role/mallory")
            .await
    );
    let events = w.audit().await;
    assert!(
        !events.iter().any(|e| e["event"] == "granted"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivated_requester_cannot_be_approved_and_loses_active_access() {
    let w = World::new().await;
    let active = w.request("eks prod-cluster 10m view INC-3").await;
    let ts = w.card(&active).await;
    w.click(APPROVER, &active, &ts, "first").await;
    w.granted(&active).await;
    assert!(w.entry_exists(ALICE).await);
    let pending = w.request("eks prod-cluster 10m view INC-4").await;
    let pending_ts = w.card(&pending).await;

    w.slack.edit_user(REQUESTER, |u| u.deleted = true);
    w.click(APPROVER, &pending, &pending_ts, "refused").await;
    wait_until(
        "the clicker is told why",
        Duration::from_secs(10),
        || async {
            w.responses_to("refused")
                .iter()
                .any(|t| t.contains("cannot be approved") && t.contains("deactivated"))
        },
    )
    .await;

    // reconcile_interval is 1s: the grant goes within a few passes.
    wait_until(
        "offboarded grant revoked",
        Duration::from_secs(10),
        || async { !w.entry_exists(ALICE).await },
    )
    .await;
    // The access goes first; the write recording it follows the read-back.
    wait_until(
        "offboarded revoke recorded",
        Duration::from_secs(10),
        || async {
            w.audit()
                .await
                .iter()
                .any(|e| e["event"] == "revoked" && e["request_id"] == active.as_str())
        },
    )
    .await;
    let events = w.audit().await;
    let revoked: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "revoked" && e["request_id"] == active.as_str())
        .collect();
    assert_eq!(revoked.len(), 1, "{events:?}");
    assert_eq!(revoked[0]["details"]["reason"], "offboarded");
    assert_eq!(revoked[0]["details"]["verified"], true, "{events:?}");
    assert!(
        !events.iter().any(|e| e["request_id"] == pending.as_str()
            && (e["event"] == "approval" || e["event"] == "approved")),
        "the click on the pending request did not count: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_stop_at_max_total_duration_approved_or_auto_approved() {
    let mut w = World::new().await;
    // Extensions past max_total_duration (90s from activation) are refused
    // with the time left, approved or auto-approved alike.
    let capped = w.request("eks prod-cluster 1m capped INC-5").await;
    let ts = w.card(&capped).await;
    w.click(APPROVER, &capped, &ts, "capped").await;
    w.granted(&capped).await;
    let answer = w.slash(REQUESTER, &format!("extend {capped} 1m")).await;
    assert!(
        answer.contains("at most 1m 30s") && answer.contains("by 30s at most"),
        "{answer}"
    );
    let auto = w.request("eks prod-cluster 1m auto INC-6").await;
    w.granted(&auto).await;
    let answer = w.slash(REQUESTER, &format!("extend {auto} 1m")).await;
    assert!(answer.contains("by 30s at most"), "{answer}");
    let answer = w.slash(REQUESTER, &format!("extend {auto} 20s")).await;
    assert!(answer.contains("auto-approved"), "{answer}");
    // Once that extension is applied (and no longer open), 10s are left.
    let last = std::sync::Mutex::new(String::new());
    wait_until(
        "a further extension is judged",
        Duration::from_secs(15),
        || async {
            let answer = w.slash(REQUESTER, &format!("extend {auto} 20s")).await;
            let judged = !answer.contains("already has an extension waiting");
            *last.lock().unwrap() = answer;
            judged
        },
    )
    .await;
    let answer = last.lock().unwrap().clone();
    assert!(answer.contains("by 10s at most"), "{answer}");

    // Guests never extend, and `requesters` is asked again: being allowed
    // once is no standing right to more time.
    w.slack.edit_user(REQUESTER, |u| u.is_guest = true);
    let answer = w.slash(REQUESTER, &format!("extend {capped} 5s")).await;
    assert!(answer.contains("guest"), "{answer}");
    w.slack.edit_user(REQUESTER, |u| u.is_guest = false);
    let path = w.tollgate.config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "max_total_duration = \"90s\"\n",
        "max_total_duration = \"90s\"\nrequesters = [\"U0APP\"]\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    w.tollgate.restart().await;
    let answer = w.slash(REQUESTER, &format!("extend {capped} 5s")).await;
    assert!(answer.contains("may no longer request"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_on_a_role_that_requires_a_reason_grants() {
    let w = World::new().await;
    let answer = w
        .slash(
            REQUESTER,
            "eks prod-cluster 30s admin --break-glass SEV1 INC-999",
        )
        .await;
    assert!(answer.starts_with("Break-glass R-"), "{answer}");
    let bg = answer[12..19].to_string();
    w.granted(&bg).await;
    assert!(w.entry_exists(ALICE).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sixth_pending_request_is_refused_naming_the_five() {
    let w = World::new().await;
    let mut pending = Vec::new();
    for n in 0..5 {
        pending.push(
            w.request(&format!("eks prod-cluster 1m view INC-P{n}"))
                .await,
        );
    }
    let requested =
        |events: Vec<Value>| events.iter().filter(|e| e["event"] == "requested").count();
    let before = requested(w.audit().await);
    let answer = w.slash(REQUESTER, "eks prod-cluster 1m view INC-P5").await;
    assert!(answer.contains("5 pending requests"), "{answer}");
    for id in &pending {
        assert!(answer.contains(id.as_str()), "{id} not named: {answer}");
    }
    assert_eq!(before, requested(w.audit().await), "nothing recorded");
    // Break-glass puts nothing in front of approvers: it still works.
    let answer = w
        .slash(
            REQUESTER,
            "eks prod-cluster 30s admin --break-glass SEV2 INC-1",
        )
        .await;
    assert!(answer.starts_with("Break-glass R-"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_whose_post_died_with_the_process_is_posted_at_restart() {
    let mut w = World::new().await;
    // Slack keeps failing the post, so the card is still owed when the
    // process is killed, after the command was acknowledged.
    w.slack.fail_channel(CHANNEL, "internal_error");
    let id = w.request("eks prod-cluster 1m view INC-7").await;
    wait_until("a post was tried", Duration::from_secs(10), || async {
        !w.slack.calls_to("chat.postMessage").is_empty()
    })
    .await;
    w.tollgate.kill9();
    w.slack.clear_fail_channel(CHANNEL);
    w.slack.clear_calls();
    w.tollgate.start_again().await;
    let ts = w.card(&id).await;
    assert!(!ts.is_empty());
    // And it works: approving it grants.
    w.click(APPROVER, &id, &ts, "after").await;
    w.granted(&id).await;
    assert!(w.entry_exists(ALICE).await);
}
