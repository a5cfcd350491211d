//! Spec 9.8, the store is the approval authority, attacked through the
//! store itself: rows written straight into the DynamoDB table with the
//! AWS SDK (as anyone with `dynamodb:PutItem` could), a crash that would
//! otherwise restart a grant's clock, and a store switched between
//! `serve --dry-run` and live. The real `tollgate` binary runs against
//! MiniStack and the Slack stand-in.

mod support;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const CHANNEL: &str = "C0APPROVALS";
const SECURITY: &str = "C0SECURITY";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";
const TABLE: &str = "tollgate";

const CONFIG: &str = r#"
[server]
listen = "{listen}"

[store]
backend = "dynamodb"
table = "tollgate"
path = "{data}"

[slack]
security_channel = "C0SECURITY"

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[defaults]
min_duration = "1s"
max_duration = "1h"
max_total_duration = "2h"
reconcile_interval = "1s"

[[clusters]]
name = "prod-cluster"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

/// The row integrity key of the integrity tests (spec 9.8); 32 bytes.
const STORE_KEY: &str = "k3y-for-tests-only-0123456789abcdef";

/// `CONFIG` with row integrity on.
fn integrity_config() -> String {
    CONFIG.replace(
        "table = \"tollgate\"\n",
        "table = \"tollgate\"\nintegrity_key_env = \"TOLLGATE_STORE_KEY\"\n",
    )
}

struct World {
    ms: MiniStack,
    slack: SlackStandIn,
    tollgate: Tollgate,
    db: aws_sdk_dynamodb::Client,
    http: reqwest::Client,
    /// What the CLI commands the tests run need besides AWS (the key).
    cli_env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(args: &[&str], env: &[(&str, &str)]) -> World {
        World::start_with(CONFIG, args, env).await
    }

    async fn start_with(config: &str, args: &[&str], env: &[(&str, &str)]) -> World {
        support::install_crypto_provider();
        let ms = MiniStack::start();
        ms.create_cluster("prod-cluster").await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
        slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
        slack.add_channel(CHANNEL, true);
        slack.add_channel(SECURITY, true);
        let dir = tempfile::tempdir().unwrap();
        init_table(&ms, dir.path());
        let tollgate =
            Tollgate::start_with_env(dir.path(), config, &slack.api_url(), &ms, args, env).await;
        let db = dynamo(&ms).await;
        World {
            ms,
            slack,
            tollgate,
            db,
            http: reqwest::Client::new(),
            cli_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        }
    }

    async fn request(&self, text: &str) -> String {
        let body = slash_body(REQUESTER, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", self.tollgate.base);
        let json: Value = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .json()
            .await
            .unwrap();
        request_id(json["text"].as_str().unwrap())
    }

    async fn approve(&self, id: &str) {
        self.approve_via(&self.tollgate, id).await
    }

    async fn approve_via(&self, via: &Tollgate, id: &str) {
        let ts = self
            .slack
            .card_ts(CHANNEL, id, Duration::from_secs(10))
            .await;
        let body = action_body(
            APPROVER,
            "approve",
            id,
            CHANNEL,
            &ts,
            &self.slack.response_url("click"),
        );
        let url = format!("{}/slack/interactions", via.base);
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status();
        assert_eq!(status.as_u16(), 200);
    }

    async fn entry_exists(&self) -> bool {
        let path = format!(
            "/clusters/prod-cluster/access-entries/{}",
            encode_arn(ALICE)
        );
        self.ms.eks_json("GET", &path, None).await.0 == 200
    }

    async fn has_access(&self) -> bool {
        let path = format!(
            "/clusters/prod-cluster/access-entries/{}/access-policies",
            encode_arn(ALICE)
        );
        let (status, body) = self.ms.eks_json("GET", &path, None).await;
        status == 200
            && body["associatedAccessPolicies"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    }

    /// The audit log, read straight from the table by the CLI.
    fn audit(&self) -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "export", "--config"])
            .arg(&self.tollgate.config_path)
            .envs(self.ms.aws_env())
            .envs(self.cli_env.iter().cloned())
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

    fn event(&self, event: &str, id: &str) -> Option<Value> {
        self.audit()
            .into_iter()
            .find(|e| e["event"] == event && e["request_id"] == id)
    }

    fn told_security(&self, needle: &str) -> bool {
        self.slack
            .calls_to("chat.postMessage")
            .iter()
            .any(|c| c.params["channel"] == SECURITY && c.params.to_string().contains(needle))
    }

    /// The row as stored (`doc` of its REQUEST item).
    async fn row(&self, id: &str) -> Value {
        let item = self
            .db
            .get_item()
            .table_name(TABLE)
            .key("pk", s("REQUEST"))
            .key("sk", s(id))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_else(|| panic!("no row {id}"));
        serde_json::from_str(item["doc"].as_s().unwrap()).unwrap()
    }

    /// What an attacker with write access to the table does: the row, its
    /// live-index copy and its due-index entry, in the layout of
    /// `src/store/dynamodb/items.rs`.
    async fn write_row(&self, doc: &Value, due: Option<OffsetDateTime>) {
        let id = doc["id"].as_str().unwrap();
        let text = doc.to_string();
        let version = doc["version"].as_u64().unwrap().to_string();
        let live_sk = json!([doc["access"]["cluster"], doc["access"]["principal"], id]).to_string();
        let items: Vec<HashMap<String, AttributeValue>> = vec![
            HashMap::from([
                ("pk".into(), s("REQUEST")),
                ("sk".into(), s(id)),
                ("doc".into(), s(&text)),
                ("version".into(), AttributeValue::N(version.clone())),
                ("state".into(), s(doc["state"].as_str().unwrap())),
            ]),
            HashMap::from([
                ("pk".into(), s("LIVE")),
                ("sk".into(), s(&live_sk)),
                ("doc".into(), s(&text)),
                ("version".into(), AttributeValue::N(version)),
            ]),
        ];
        for item in items {
            self.db
                .put_item()
                .table_name(TABLE)
                .set_item(Some(item))
                .send()
                .await
                .unwrap();
        }
        // Whatever due entries the row had go, so only the forged one says
        // when the scheduler looks at it.
        let old = self
            .db
            .query()
            .table_name(TABLE)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s("DUE"))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        for item in old.items() {
            if item
                .get("id")
                .and_then(|v| v.as_s().ok())
                .map(String::as_str)
                == Some(id)
            {
                self.db
                    .delete_item()
                    .table_name(TABLE)
                    .key("pk", s("DUE"))
                    .key("sk", item["sk"].clone())
                    .send()
                    .await
                    .unwrap();
            }
        }
        if let Some(at) = due {
            let ms = (at.unix_timestamp_nanos() / 1_000_000) as u64;
            self.db
                .put_item()
                .table_name(TABLE)
                .item("pk", s("DUE"))
                .item("sk", s(format!("{ms:020}#{id}")))
                .item("id", s(id))
                .send()
                .await
                .unwrap();
        }
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn parse_time(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(
        v.as_str().unwrap_or_else(|| panic!("not a time: {v}")),
        &Rfc3339,
    )
    .unwrap()
}

fn init_table(ms: &MiniStack, dir: &std::path::Path) {
    let path = dir.join("init.toml");
    let text = CONFIG
        .replace("{listen}", "127.0.0.1:0")
        .replace("{data}", &dir.join("data").display().to_string());
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["store", "init", "--config"])
        .arg(&path)
        .envs(ms.aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn dynamo(ms: &MiniStack) -> aws_sdk_dynamodb::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&ms.endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(http)
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&sdk)
}

/// An `Approved` row nobody approved, for ten years, written with the AWS
/// SDK straight into the table with its due and live items: the scheduler
/// picks it up, and must refuse it before any cloud call.
/// An `Approved` row as a writer with the table's credentials would put it
/// in: no approval recorded, nothing signed.
fn forged_approved_row(id: &str, now: OffsetDateTime, duration_secs: u64) -> Value {
    json!({
        "id": id,
        "state": "Approved",
        "version": 1,
        "requester": {"user_id": REQUESTER, "email": "alice@example.com", "tz": null, "tz_offset_secs": 0},
        "access": {
            "cluster": "prod-cluster",
            "role": "view",
            "principal": ALICE,
            "policy_arn": "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy",
            "namespaces": [],
            "k8s_user": "tollgate:alice@example.com",
            "strategy": "access-entry"
        },
        "reason": "INC-FORGED",
        "duration": duration_secs,
        "created_at": rfc3339(now),
        "approval_deadline": rfc3339(now + time::Duration::hours(1)),
        "required_approvals": 1,
        "approvals": [],
        "decided_by": APPROVER,
        "approved_at": rfc3339(now),
        "activated_at": null,
        "expires_at": null,
        "ended_at": null,
        "revoke": null,
        "attempts": 0,
        "retry_at": null,
        "failure": null,
        "card": null,
        "response_url": null
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_approved_row_written_into_dynamodb_is_never_granted() {
    let w = World::start(&[], &[]).await;
    let now = OffsetDateTime::now_utc();
    let id = "R-F0RGE";
    let forged = forged_approved_row(id, now, 10 * 365 * 24 * 3600);
    w.write_row(&forged, Some(now)).await;

    wait_until(
        "the scheduler drives the forged row",
        Duration::from_secs(20),
        || async { w.event("grant_failed", id).is_some() || w.event("granted", id).is_some() },
    )
    .await;
    assert!(!w.entry_exists().await, "no access entry was created");
    assert!(w.event("granted", id).is_none(), "nothing was granted");
    let failed = w.event("grant_failed", id).unwrap();
    assert_eq!(failed["details"]["reason"], "invalid_row", "{failed}");
    let error = failed["details"]["error"].as_str().unwrap();
    assert!(error.contains("max_total_duration"), "{error}");
    assert_eq!(w.row(id).await["state"], "Failed");
    assert!(!w.has_access().await, "no association was made");
    wait_until(
        "the security channel is told",
        Duration::from_secs(10),
        || async { w.told_security(id) },
    )
    .await;
    let metrics = w
        .http
        .get(format!("{}/metrics", w.tollgate.metrics_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tollgate_failures_total") && l.contains("invalid_row")),
        "counted in tollgate_failures_total:\n{metrics}"
    );

    // A forged row of an allowed length but with nobody's approval, and one
    // whose only vote is the requester's own: refused the same way.
    for (id, votes) in [
        ("R-F0RG2", json!([])),
        ("R-F0RG3", json!([{"user": REQUESTER, "at": rfc3339(now)}])),
    ] {
        let mut row = forged.clone();
        row["id"] = json!(id);
        row["duration"] = json!(600);
        row["approvals"] = votes;
        w.write_row(&row, Some(now)).await;
        wait_until("refused", Duration::from_secs(20), || async {
            w.event("grant_failed", id).is_some()
        })
        .await;
        let failed = w.event("grant_failed", id).unwrap();
        assert_eq!(failed["details"]["reason"], "invalid_row", "{failed}");
    }
    assert!(!w.entry_exists().await, "still nothing granted");
}

/// Grants `text` the ordinary way, moves its expiry to `activated_at +
/// moved_by` with a direct write (row, live copy and due entry), and waits
/// for the access to go and the revoke to be recorded; the grant's id.
async fn moved_expiry_is_revoked(w: &World, text: &str, moved_by: time::Duration) -> String {
    let id = w.request(text).await;
    w.approve(&id).await;
    wait_until("granted", Duration::from_secs(15), || w.has_access()).await;
    wait_until("grant recorded", Duration::from_secs(10), || async {
        w.row(&id).await["state"] == "Active"
    })
    .await;
    let mut row = w.row(&id).await;
    let moved = parse_time(&row["activated_at"]) + moved_by;
    row["expires_at"] = json!(rfc3339(moved));
    row["remind_at"] = Value::Null;
    w.write_row(&row, Some(moved)).await;
    wait_until(
        "the moved grant is revoked",
        Duration::from_secs(20),
        || async { !w.has_access().await },
    )
    .await;
    wait_until("revoke recorded", Duration::from_secs(10), || async {
        w.event("revoked", &id).is_some()
    })
    .await;
    id
}

/// A grant made the ordinary way, then its expiry moved ten years out by a
/// direct write (row, live copy and due entry). Decision (spec 9.8): no
/// write of Tollgate's puts an expiry past `activated_at +
/// max_total_duration`, so such a row is invalid and its access is revoked
/// at the next reconcile pass (reason `invalid_row`, security channel told).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_moved_far_out_in_dynamodb_is_revoked() {
    let w = World::start(&[], &[]).await;
    let id = moved_expiry_is_revoked(
        &w,
        "eks prod-cluster 1h view INC-MOVE",
        time::Duration::days(3650),
    )
    .await;
    let revoked = w.event("revoked", &id).unwrap();
    assert_eq!(revoked["details"]["reason"], "invalid_row", "{revoked}");
    assert_eq!(revoked["details"]["verified"], true, "{revoked}");
    assert!(
        w.told_security(&id),
        "the security channel is told of the edited row"
    );
}

/// A crash between the converge and the `granted` write: the re-drive
/// after restart records the expiry the first attempt fixed, not one
/// counted from the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "arms TOLLGATE_FAILPOINT: run with --features failpoints"
)]
async fn a_crash_after_the_converge_never_moves_the_expiry() {
    let mut w = World::start(
        &[],
        &[
            ("TOLLGATE_FAILPOINT", "after-grant-converge"),
            ("TOLLGATE_CLAIM_TTL", "2s"),
        ],
    )
    .await;
    let id = w.request("eks prod-cluster 1h view INC-CLOCK").await;
    w.approve(&id).await;
    let status = w.tollgate.wait_exit(Duration::from_secs(15)).await;
    assert!(!status.success(), "the failpoint aborts");
    assert!(w.has_access().await, "the cloud call was made");
    let row = w.row(&id).await;
    assert_eq!(row["state"], "Approved");
    let first = parse_time(&row["first_attempt_at"]);

    // Down for a while, as a crashed pod is; then the re-drive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.tollgate.set_env("TOLLGATE_FAILPOINT", None);
    let restarted = OffsetDateTime::now_utc();
    w.tollgate.start_again().await;
    wait_until(
        "granted after the restart",
        Duration::from_secs(15),
        || async { w.event("granted", &id).is_some() },
    )
    .await;
    let granted = w.event("granted", &id).unwrap();
    let expires = parse_time(&granted["details"]["expires_at"]);
    assert_eq!(expires, first + time::Duration::hours(1), "{granted}");
    assert!(
        expires < restarted + time::Duration::hours(1),
        "the clock did not restart at the re-drive: {expires} vs restart {restarted}"
    );
    let row = w.row(&id).await;
    assert_eq!(parse_time(&row["expires_at"]), expires);
    assert_eq!(parse_time(&row["activated_at"]), first);
}

/// Live → dry-run: a dry-run server on a store with a live grant in force
/// would record it revoked and leave its access. It refuses to start,
/// naming the grant and what ends it, and touches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_server_refuses_a_store_with_live_grants() {
    let mut w = World::start(&[], &[]).await;
    let id = w.request("eks prod-cluster 1h view INC-LIVE").await;
    w.approve(&id).await;
    wait_until("granted", Duration::from_secs(15), || w.has_access()).await;
    wait_until("grant recorded", Duration::from_secs(10), || async {
        w.row(&id).await["state"] == "Active"
    })
    .await;
    w.tollgate.terminate(Duration::from_secs(40)).await;

    w.tollgate.set_args(&["--dry-run"]);
    let log = w.tollgate.start_refused(Duration::from_secs(30)).await;
    assert!(log.contains(&id), "names the grant:\n{log}");
    assert!(
        log.contains("tollgate grants revoke") && log.contains("start `tollgate serve` on"),
        "says what ends it:\n{log}"
    );
    assert_eq!(w.row(&id).await["state"], "Active", "the row is untouched");
    assert!(w.has_access().await, "and so is the access");

    // Back in live mode the grant goes on as before.
    w.tollgate.set_args(&[]);
    w.tollgate.start_again().await;
    assert_eq!(w.row(&id).await["state"], "Active");
}

/// Dry-run → live: a live server would turn a casually approved dry-run
/// grant into real access. It refuses to start, naming the dry-run
/// request, and nothing is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_server_refuses_a_store_with_dry_run_grants() {
    let mut w = World::start(&["--dry-run"], &[]).await;
    let id = w.request("eks prod-cluster 1h view INC-TRIAL").await;
    w.approve(&id).await;
    wait_until(
        "dry-run grant recorded",
        Duration::from_secs(15),
        || async { w.row(&id).await["state"] == "Active" },
    )
    .await;
    assert_eq!(w.row(&id).await["dry_run"], true);
    assert!(!w.entry_exists().await, "a dry run makes nothing");
    w.tollgate.terminate(Duration::from_secs(40)).await;

    w.tollgate.set_args(&[]);
    let log = w.tollgate.start_refused(Duration::from_secs(30)).await;
    assert!(log.contains(&id), "names the dry-run request:\n{log}");
    assert!(
        log.contains("tollgate grants revoke") && log.contains("tollgate serve --dry-run"),
        "says what ends it:\n{log}"
    );
    assert!(!w.entry_exists().await, "nothing was granted");
    assert_eq!(w.row(&id).await["state"], "Active");
}

/// A live and a dry-run replica on one table (both started on an empty
/// store): each request is driven only by the mode that made it, and a
/// click reaching the other mode's replica is answered so and not counted
/// (security review M6): a trial server, with its own configuration, never
/// decides a live request. Without the isolation the live replica, reached
/// by the click, would count a vote on the dry-run request, and the
/// dry-run one would approve a live request under its own rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_dry_run_replicas_never_act_on_each_others_rows() {
    let w = World::start(&[], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let trial = Tollgate::start_with_env(
        dir.path(),
        CONFIG,
        &w.slack.api_url(),
        &w.ms,
        &["--dry-run"],
        &[],
    )
    .await;
    // How many clicks were answered with `text`.
    let answered = |text: &str| {
        w.slack
            .calls_to("response:click")
            .iter()
            .filter(|c| c.params["text"].as_str().unwrap_or_default().contains(text))
            .count()
    };

    // Asked of the dry-run replica; the click reaches the live one first.
    let body = slash_body(
        REQUESTER,
        "eks prod-cluster 1h view INC-TRY",
        &w.slack.response_url("try"),
    );
    let json: Value = post_signed(
        &w.http,
        &format!("{}/slack/commands", trial.base),
        SIGNING_SECRET,
        body,
    )
    .await
    .json()
    .await
    .unwrap();
    let id = request_id(json["text"].as_str().unwrap());
    w.approve_via(&w.tollgate, &id).await;
    wait_until(
        "the live replica answers the click",
        Duration::from_secs(15),
        || async { answered("belongs to a dry-run server") == 1 },
    )
    .await;
    let row = w.row(&id).await;
    assert_eq!(row["state"], "Pending", "{row}");
    assert!(
        row["approvals"].as_array().is_none_or(|a| a.is_empty()),
        "the other mode's click was counted: {row}"
    );
    // Through its own replica it is decided, and driven as a dry run.
    w.approve_via(&trial, &id).await;
    wait_until(
        "the dry-run grant is recorded",
        Duration::from_secs(15),
        || async { w.row(&id).await["state"] == "Active" },
    )
    .await;
    assert_eq!(w.row(&id).await["dry_run"], true);
    assert!(!w.entry_exists().await, "the live replica granted nothing");
    let granted = w.event("granted", &id).unwrap();
    assert_eq!(granted["details"]["dry_run"], true, "{granted}");

    // Asked of the live replica: a click on the dry-run one changes
    // nothing; through the live one it is granted for real.
    let id = w.request("eks prod-cluster 1h view INC-REAL").await;
    w.approve_via(&trial, &id).await;
    wait_until(
        "the dry-run replica answers the click",
        Duration::from_secs(15),
        || async { answered("belongs to a live server") == 1 },
    )
    .await;
    assert_eq!(w.row(&id).await["state"], "Pending");
    assert!(
        !w.has_access().await,
        "granted off a dry-run server's click"
    );
    w.approve_via(&w.tollgate, &id).await;
    wait_until("the live grant is made", Duration::from_secs(15), || {
        w.has_access()
    })
    .await;
    wait_until("and recorded", Duration::from_secs(10), || async {
        w.row(&id).await["state"] == "Active"
    })
    .await;
    let granted = w.event("granted", &id).unwrap();
    assert!(granted["details"].get("dry_run").is_none(), "{granted}");
}

// ------------------------------------------------ row integrity (spec 9.8)

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// With `[store] integrity_key_env`, a forged `Approved` row that passes
/// every check against the configuration (a duration in range, the vote
/// of a real approver of the role) is still never granted: it carries no
/// MAC under the key. It is audited `tampered` and fails; the security
/// channel is told. A request made the ordinary way on the same server is
/// granted as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_store_key_a_forged_row_with_real_approvals_is_never_granted() {
    let key = [("TOLLGATE_STORE_KEY", STORE_KEY)];
    let w = World::start_with(&integrity_config(), &[], &key).await;
    let now = OffsetDateTime::now_utc();
    let id = "R-F0RG4";
    let mut forged = forged_approved_row(id, now, 600);
    forged["approvals"] = json!([{"user": APPROVER, "at": rfc3339(now)}]);
    // A made-up MAC is no better than none.
    forged["mac"] = json!("00".repeat(32));
    w.write_row(&forged, Some(now)).await;

    wait_until(
        "the scheduler reads the forged row",
        Duration::from_secs(20),
        || async { w.event("tampered", id).is_some() || w.event("granted", id).is_some() },
    )
    .await;
    assert!(w.event("granted", id).is_none(), "nothing was granted");
    assert!(!w.entry_exists().await, "no access entry was created");
    let tampered = w.event("tampered", id).unwrap();
    assert_eq!(tampered["details"]["state"], "approved", "{tampered}");
    let failed = w.event("grant_failed", id).expect("the row fails");
    assert_eq!(failed["details"]["reason"], "invalid_row", "{failed}");
    assert_eq!(w.row(id).await["state"], "Failed");
    wait_until(
        "the security channel is told",
        Duration::from_secs(10),
        || async { w.told_security(id) },
    )
    .await;
    let count = w
        .audit()
        .iter()
        .filter(|e| e["event"] == "tampered" && e["request_id"] == id)
        .count();
    assert_eq!(count, 1, "audited once for the tampered version");

    // Tollgate's own rows carry a MAC and are granted as usual.
    let real = w.request("eks prod-cluster 10m view INC-REAL").await;
    w.approve(&real).await;
    wait_until("granted", Duration::from_secs(15), || w.has_access()).await;
    wait_until("recorded", Duration::from_secs(10), || async {
        w.row(&real).await["state"] == "Active"
    })
    .await;
    let row = w.row(&real).await;
    assert_eq!(row["mac"].as_str().map(str::len), Some(64), "{row}");
    assert!(w.event("tampered", &real).is_none());
    // Audit events carry theirs too.
    let granted = w.event("granted", &real).unwrap();
    assert_eq!(granted["mac"].as_str().map(str::len), Some(64), "{granted}");
}

/// With a key, an Active grant's expiry moved within `max_total_duration`
/// (so the configuration check alone has nothing to object to) makes the
/// row fail its MAC: the grant is revoked at the next reconcile pass,
/// audited `tampered`, and the security channel told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_store_key_an_expiry_moved_within_the_cap_is_revoked_as_tampered() {
    let key = [("TOLLGATE_STORE_KEY", STORE_KEY)];
    let w = World::start_with(&integrity_config(), &[], &key).await;
    // 90 minutes: past the 10 asked for, within the 2 h cap.
    let id = moved_expiry_is_revoked(
        &w,
        "eks prod-cluster 10m view INC-MOVE",
        time::Duration::minutes(90),
    )
    .await;
    let tampered = w.event("tampered", &id).expect("audited tampered");
    assert_eq!(tampered["details"]["state"], "active", "{tampered}");
    let revoked = w.event("revoked", &id).unwrap();
    assert_eq!(revoked["details"]["reason"], "invalid_row", "{revoked}");
    assert_eq!(revoked["details"]["verified"], true, "{revoked}");
    wait_until(
        "the security channel is told",
        Duration::from_secs(10),
        || async { w.told_security(&id) },
    )
    .await;
    let metrics = w
        .http
        .get(format!("{}/metrics", w.tollgate.metrics_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&metrics, "tollgate_tampered_rows").is_some(),
        "the gauge is exported:\n{metrics}"
    );
}

/// Turning the key on for a store with live rows: the server refuses to
/// start, naming the unsigned rows and `tollgate store seal`; after the
/// seal the grant goes on, signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_the_key_on_needs_a_seal_of_the_live_rows() {
    let mut w = World::start(&[], &[]).await;
    let id = w.request("eks prod-cluster 1h view INC-OLD").await;
    w.approve(&id).await;
    wait_until("granted", Duration::from_secs(15), || w.has_access()).await;
    wait_until("grant recorded", Duration::from_secs(10), || async {
        w.row(&id).await["state"] == "Active"
    })
    .await;
    assert!(
        w.row(&id).await.get("mac").is_none(),
        "written without a key"
    );
    w.tollgate.terminate(Duration::from_secs(40)).await;

    // The same config, with the key turned on.
    let path = w.tollgate.config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "table = \"tollgate\"\n",
        "table = \"tollgate\"\nintegrity_key_env = \"TOLLGATE_STORE_KEY\"\n",
    );
    assert!(text.contains("integrity_key_env"));
    std::fs::write(&path, text).unwrap();
    w.cli_env
        .push(("TOLLGATE_STORE_KEY".into(), STORE_KEY.into()));
    // Named but missing, or too short: refused, naming the variable only.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(&path)
        .envs(w.ms.aws_env())
        .env("TOLLGATE_STORE_KEY", "short-key")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("TOLLGATE_STORE_KEY") && !err.contains("short-key"),
        "{err}"
    );

    w.tollgate.set_env("TOLLGATE_STORE_KEY", Some(STORE_KEY));
    let log = w.tollgate.start_refused(Duration::from_secs(30)).await;
    assert!(log.contains(&id), "names the row:\n{log}");
    assert!(
        log.contains("tollgate store seal"),
        "names the command:\n{log}"
    );
    assert!(!log.contains(STORE_KEY), "never the key:\n{log}");
    assert!(w.has_access().await, "nothing touched");

    let seal = |expect_ok: bool| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["store", "seal", "--config"])
            .arg(&path)
            .envs(w.ms.aws_env())
            .env("TOLLGATE_STORE_KEY", STORE_KEY)
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let sealed = seal(true);
    assert!(sealed.contains(&id), "{sealed}");
    // Once sealed, an unsigned row is a forgery, not an old row: a second
    // seal signs nothing.
    let again = seal(false);
    assert!(again.contains("already sealed"), "{again}");
    // `check` says row integrity is on (other checks may fail here: no
    // Slack credentials are given to it).
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(&path)
        .envs(w.ms.aws_env())
        .env("TOLLGATE_STORE_KEY", STORE_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok   row integrity on") && stdout.contains("$TOLLGATE_STORE_KEY"),
        "{stdout}"
    );
    assert!(!stdout.contains(STORE_KEY), "{stdout}");

    w.tollgate.start_again().await;
    let row = w.row(&id).await;
    assert_eq!(row["state"], "Active");
    assert_eq!(row["mac"].as_str().map(str::len), Some(64), "{row}");
    // Several reconcile passes (1 s apart) leave the sealed grant alone.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        assert!(w.has_access().await, "the sealed grant stands");
        assert!(w.event("tampered", &id).is_none(), "not tampered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(w.row(&id).await["state"], "Active");
}
