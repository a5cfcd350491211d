//! End to end with the real binary: the namespaces Tollgate never grants
//! (spec 9.7). `--ns tollgate` (its own namespace: its Secret holds the
//! Slack signing secret, its ServiceAccount carries its IAM role) and
//! `--ns kube-system` are refused by command, by the request modal and by
//! break-glass, with nothing recorded and the break-glass refusal audited;
//! a row whose namespace is denied after it was asked for fails at grant
//! with nothing created; `sensitive_namespaces` are marked on the card.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, payload_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
const SECURITY: &str = "C0SECURITY";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";

const CONFIG: &str = r#"
[server]
listen = "{listen}"

[store]
path = "{data}"

[slack]
security_channel = "C0SECURITY"

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[defaults]
min_duration = "1s"
max_duration = "1h"
default_duration = "1m"
approval_timeout = "10m"
reconcile_interval = "1s"
sensitive_namespaces = ["*-prod"]

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

[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaced = true
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
        slack.add_channel(SECURITY, true);
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

    /// The ephemeral answer to a slash command.
    async fn slash(&self, text: &str) -> String {
        let body = slash_body(REQUESTER, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", self.tollgate.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, body).await;
        assert_eq!(resp.status().as_u16(), 200);
        let json: Value = resp.json().await.unwrap();
        json["text"].as_str().unwrap_or_default().to_string()
    }

    /// `/access` alone: the modal Slack was asked to open.
    async fn open_modal(&self) -> Value {
        let body = slash_body(REQUESTER, "", &self.slack.response_url("modal"));
        let url = format!("{}/slack/commands", self.tollgate.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, body).await;
        assert_eq!(resp.status().as_u16(), 200);
        let open = self
            .slack
            .wait_for_call("views.open", |_| true, Duration::from_secs(5))
            .await;
        match &open.params["view"] {
            Value::String(s) => serde_json::from_str(s).unwrap(),
            v => v.clone(),
        }
    }

    /// A signed `view_submission` of the request modal; Tollgate's answer.
    async fn submit_modal(&self, view: &Value, role: &str, namespaces: &str) -> Value {
        let mut values = serde_json::Map::new();
        for (block, value) in [
            ("cluster", CLUSTER),
            ("role", role),
            ("namespaces", namespaces),
            ("duration", "30m"),
            ("reason", "INC-MODAL"),
        ] {
            let entry = if matches!(block, "cluster" | "role") {
                serde_json::json!({"value": {"type": "static_select", "selected_option": {"value": value}}})
            } else {
                serde_json::json!({"value": {"type": "plain_text_input", "value": value}})
            };
            values.insert(block.to_string(), entry);
        }
        let payload = serde_json::json!({
            "type": "view_submission",
            "team": {"id": "T0TEST"},
            "user": {"id": REQUESTER},
            "trigger_id": "1.2.submit",
            "view": {
                "id": "V0TOLLGATE",
                "type": "modal",
                "callback_id": view["callback_id"],
                "private_metadata": view["private_metadata"],
                "state": {"values": values},
            },
        });
        let url = format!("{}/slack/interactions", self.tollgate.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, payload_body(&payload)).await;
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.unwrap_or_default();
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        }
    }

    async fn card(&self, id: &str) -> String {
        self.slack
            .card_ts(CHANNEL, id, Duration::from_secs(15))
            .await
    }

    async fn approve(&self, id: &str, ts: &str) {
        let body = action_body(
            APPROVER,
            "approve",
            id,
            CHANNEL,
            ts,
            &self.slack.response_url("click"),
        );
        let url = format!("{}/slack/interactions", self.tollgate.base);
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status()
            .as_u16();
        assert_eq!(status, 200);
    }

    /// Every audit event, oldest first, through `tollgate audit export`.
    async fn audit(&self) -> Vec<Value> {
        let config = self.tollgate.config_path.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(["audit", "export", "--config"])
                .arg(config)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    async fn entry_exists(&self) -> bool {
        let path = format!("/clusters/{CLUSTER}/access-entries/{}", encode_arn(ALICE));
        self.ms.eks_json("GET", &path, None).await.0 == 200
    }

    fn posts_to(&self, channel: &str) -> Vec<String> {
        self.slack
            .calls_to("chat.postMessage")
            .iter()
            .filter(|c| c.params["channel"] == channel)
            .map(|c| c.params.to_string())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_and_kube_system_are_refused_by_command_modal_and_break_glass() {
    let w = World::new().await;

    // By command: each names the rule, and no request id is handed out.
    for (text, rule) in [
        (
            "eks prod-cluster 30m edit --ns tollgate INC-1",
            "[server] namespace",
        ),
        (
            "eks prod-cluster 30m edit --ns payments,kube-system INC-1",
            "deny_namespaces",
        ),
        // A cluster-wide role narrowed with --ns is held to the same rules.
        (
            "eks prod-cluster 30m view --ns tollgate INC-1",
            "[server] namespace",
        ),
    ] {
        let answer = w.slash(text).await;
        assert!(
            answer.contains(rule)
                && answer.contains("Nothing was requested")
                && !answer.contains("R-"),
            "{text}: {answer}"
        );
    }

    // By the modal: refused under its namespaces field, the modal stays open.
    let view = w.open_modal().await;
    for (ns, rule) in [
        ("tollgate", "[server] namespace"),
        ("kube-system", "deny_namespaces"),
    ] {
        let answer = w.submit_modal(&view, "edit", ns).await;
        assert_eq!(answer["response_action"], "errors", "{ns}: {answer}");
        let shown = answer["errors"]["namespaces"].as_str().unwrap_or_default();
        assert!(shown.contains(rule), "{ns}: {answer}");
    }

    // By break-glass, from someone allowed to use it.
    for (ns, rule) in [
        ("tollgate", "[server] namespace"),
        ("kube-system", "deny_namespaces"),
    ] {
        let answer = w
            .slash(&format!(
                "eks prod-cluster 30s edit --ns {ns} --break-glass SEV1 db down"
            ))
            .await;
        assert!(
            answer.contains(rule) && !answer.starts_with("Break-glass R-"),
            "{ns}: {answer}"
        );
    }

    // Nothing recorded, nothing posted, nothing granted; each break-glass
    // refusal audited (naming the rule) and not announced.
    let events = w.audit().await;
    assert!(
        !events.iter().any(|e| e["event"] == "requested"),
        "a refused request records nothing: {events:?}"
    );
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "break_glass")
        .collect();
    assert_eq!(refused.len(), 2, "{events:?}");
    for (event, rule) in refused
        .iter()
        .zip(["[server] namespace", "deny_namespaces"])
    {
        assert_eq!(event["details"]["refused"], true, "{event}");
        assert!(
            event["details"]["why"]
                .as_str()
                .unwrap_or_default()
                .contains(rule),
            "{event}"
        );
        assert_eq!(event["actor"], REQUESTER);
    }
    assert!(w.posts_to(CHANNEL).is_empty(), "{:?}", w.posts_to(CHANNEL));
    assert!(
        w.posts_to(SECURITY).is_empty(),
        "{:?}",
        w.posts_to(SECURITY)
    );
    assert!(!w.entry_exists().await);

    // The same paths still work for an ordinary namespace, and the card
    // marks the one that matches sensitive_namespaces.
    let answer = w.submit_modal(&view, "edit", "web-prod, payments").await;
    assert_eq!(answer, Value::Null, "a valid form closes the modal");
    let receipt = |name: &'static str| {
        let w = &w;
        async move {
            w.slack
                .calls_to(&format!("response:{name}"))
                .iter()
                .filter_map(|c| c.params["text"].as_str().map(str::to_string))
                .find(|t| t.contains("for approval"))
        }
    };
    wait_until("modal receipt", Duration::from_secs(10), || async {
        receipt("modal").await.is_some()
    })
    .await;
    let id = request_id(&receipt("modal").await.unwrap());
    let ts = w.card(&id).await;
    let card = w.slack.message(CHANNEL, &ts).unwrap().to_string();
    assert!(
        card.contains("Sensitive namespace: web-prod (sensitive_namespaces)"),
        "{card}"
    );
    let plain = request_id(
        &w.slash("eks prod-cluster 30m edit --ns payments INC-2")
            .await,
    );
    let ts = w.card(&plain).await;
    let card = w.slack.message(CHANNEL, &ts).unwrap().to_string();
    assert!(!card.contains("Sensitive"), "{card}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_denied_after_the_request_fails_the_grant_with_nothing_created() {
    let mut w = World::new().await;
    let id = request_id(
        &w.slash("eks prod-cluster 30m edit --ns payments INC-3")
            .await,
    );
    let ts = w.card(&id).await;

    // The operator denies it while the request waits for approval.
    let config = std::fs::read_to_string(&w.tollgate.config_path).unwrap();
    let config = config.replace(
        "sensitive_namespaces = [\"*-prod\"]",
        "sensitive_namespaces = [\"*-prod\"]\ndeny_namespaces = [\"kube-*\", \"pay*\"]",
    );
    std::fs::write(&w.tollgate.config_path, config).unwrap();
    w.tollgate.restart().await;

    w.approve(&id, &ts).await;
    let decided = |e: &Value| {
        matches!(e["event"].as_str(), Some("granted" | "grant_failed"))
            && e["request_id"] == id.as_str()
    };
    wait_until(
        "granted or grant_failed",
        Duration::from_secs(15),
        || async { w.audit().await.iter().any(decided) },
    )
    .await;
    let events = w.audit().await;
    let failed = events.iter().find(|e| decided(e)).unwrap();
    assert_eq!(failed["event"], "grant_failed", "{failed}");
    let error = failed["details"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("deny_namespaces")
            && error.contains("\"pay*\"")
            && error.contains("nothing was granted"),
        "{failed}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "granted" && e["request_id"] == id.as_str()),
        "{events:?}"
    );
    assert!(!w.entry_exists().await, "nothing was created in EKS");
}
