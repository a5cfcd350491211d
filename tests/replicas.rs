//! Two `tollgate serve` processes sharing one DynamoDB table in MiniStack:
//! clicks spread over both grant once, a replica that dies mid-grant or
//! before an expiry is replaced by the other, and a replica frozen past its
//! claims wakes up without acting on what it saw before.

mod support;

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use support::backstop_player::Player;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const APPROVERS: [&str; 4] = ["U0APP", "U0AP2", "U0AP3", "U0AP4"];
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";
/// Short claims so failover fits in a test: a replica that dies holding one
/// is replaced this long after it took it.
const CLAIM_TTL: &str = "3s";
const CLAIM_SECS: u64 = 3;

const CONFIG: &str = r#"
[server]
listen = "{listen}"

[store]
backend = "dynamodb"
table = "tollgate"
path = "{data}"

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[defaults]
min_duration = "1s"
max_duration = "1h"
reconcile_interval = "1s"

[[clusters]]
name = "prod-cluster"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0APPROVALS"
approvers = ["U0APP", "U0AP2", "U0AP3", "U0AP4"]
default_role = "view"
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

struct Pair {
    ms: MiniStack,
    slack: SlackStandIn,
    a: Tollgate,
    b: Tollgate,
    http: reqwest::Client,
    dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Pair {
    async fn start(a_env: &[(&str, &str)]) -> Pair {
        support::install_crypto_provider();
        Pair::start_on(MiniStack::start(), CONFIG, a_env).await
    }

    /// Two replicas of `config` on `ms`, A with `a_env` besides.
    async fn start_on(ms: MiniStack, config: &str, a_env: &[(&str, &str)]) -> Pair {
        ms.create_cluster("prod-cluster").await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
        for a in APPROVERS {
            slack.add_user(a, &format!("{}@example.com", a.to_lowercase()), "UTC", 0);
        }
        slack.add_channel(CHANNEL, true);
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_table(&ms, config, da.path());
        let mut env_a = vec![("TOLLGATE_CLAIM_TTL", CLAIM_TTL)];
        env_a.extend_from_slice(a_env);
        let env_b = [("TOLLGATE_CLAIM_TTL", CLAIM_TTL)];
        let a =
            Tollgate::start_with_env(da.path(), config, &slack.api_url(), &ms, &[], &env_a).await;
        let b =
            Tollgate::start_with_env(db.path(), config, &slack.api_url(), &ms, &[], &env_b).await;
        Pair {
            ms,
            slack,
            a,
            b,
            http: reqwest::Client::new(),
            dirs: (da, db),
        }
    }

    async fn request(&self, via: &Tollgate, text: &str) -> String {
        let body = slash_body(REQUESTER, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", via.base);
        let json: Value = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .json()
            .await
            .unwrap();
        request_id(json["text"].as_str().unwrap())
    }

    async fn card(&self, id: &str) -> String {
        self.slack
            .card_ts(CHANNEL, id, Duration::from_secs(10))
            .await
    }

    async fn click(&self, via: &Tollgate, user: &str, id: &str, ts: &str) -> u16 {
        let body = action_body(
            user,
            "approve",
            id,
            CHANNEL,
            ts,
            &self.slack.response_url(&format!("click-{user}")),
        );
        let url = format!("{}/slack/interactions", via.base);
        post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status()
            .as_u16()
    }

    /// Alice's associated policy ARNs (none when she has no entry).
    async fn policies(&self) -> Vec<String> {
        let path = format!(
            "/clusters/prod-cluster/access-entries/{}/access-policies",
            encode_arn(ALICE)
        );
        let (status, body) = self.ms.eks_json("GET", &path, None).await;
        if status != 200 {
            return Vec::new();
        }
        body["associatedAccessPolicies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["policyArn"].as_str().map(str::to_string))
            .collect()
    }

    async fn has_access(&self) -> bool {
        !self.policies().await.is_empty()
    }

    /// Whether Alice's entry holds `policy` (any scope).
    async fn holds(&self, policy: &str) -> bool {
        self.policies()
            .await
            .iter()
            .any(|arn| arn.ends_with(policy))
    }

    /// The audit log as the CLI exports it, read straight from the table.
    fn audit(&self) -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "export", "--config"])
            .arg(self.b_config())
            .envs(self.ms.aws_env())
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

    fn b_config(&self) -> std::path::PathBuf {
        self.dirs.1.path().join("tollgate.toml")
    }

    fn count(&self, event: &str, id: &str) -> usize {
        self.audit()
            .iter()
            .filter(|e| e["event"] == event && e["request_id"] == id)
            .count()
    }
}

fn init_table(ms: &MiniStack, config: &str, dir: &std::path::Path) {
    let path = dir.join("init.toml");
    let text = config
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

/// The revoke's lateness (expiry → recorded), from the audit log.
fn lateness(p: &Pair, id: &str) -> f64 {
    let revoked = p
        .audit()
        .into_iter()
        .find(|e| e["event"] == "revoked" && e["request_id"] == id)
        .unwrap();
    assert_eq!(revoked["details"]["verified"], true, "{revoked}");
    revoked["details"]["lateness_seconds"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "arms TOLLGATE_FAILPOINT: run with --features failpoints"
)]
async fn clicks_on_both_replicas_grant_once_and_a_dead_replica_is_replaced() {
    // A dies the moment it has claimed a revoke, before any cloud call.
    let mut p = Pair::start(&[("TOLLGATE_FAILPOINT", "after-revoke-claim")]).await;

    // Every approver clicks at once, alternating replicas: one grant.
    let id = p.request(&p.a, "eks prod-cluster 6s view INC-R1").await;
    let ts = p.card(&id).await;
    let clicks = APPROVERS.iter().enumerate().map(|(i, user)| {
        let via = if i % 2 == 0 { &p.a } else { &p.b };
        p.click(via, user, &id, &ts)
    });
    for status in futures::future::join_all(clicks).await {
        assert_eq!(status, 200);
    }
    wait_until("granted", Duration::from_secs(15), || p.has_access()).await;
    wait_until("grant recorded", Duration::from_secs(10), || async {
        p.count("granted", &id) == 1
    })
    .await;
    assert_eq!(p.count("approved", &id), 1, "quorum reached once");

    // At expiry only A is awake: it claims the revoke and dies holding the
    // claim. B, back, must wait the claim out and then revoke.
    p.b.pause();
    p.a.wait_exit(Duration::from_secs(15)).await;
    p.b.resume();
    assert!(p.has_access().await, "A died before touching the access");
    wait_until(
        "revoked by the survivor",
        Duration::from_secs(CLAIM_SECS + 5),
        || async { !p.has_access().await },
    )
    .await;
    wait_until("revoke recorded", Duration::from_secs(5), || async {
        p.count("revoked", &id) == 1
    })
    .await;
    let late = lateness(&p, &id);
    eprintln!("revoke lateness with the claim holder killed: {late:.3}s (claim {CLAIM_TTL})");
    assert!(
        late >= CLAIM_SECS as f64 - 0.5 && late < CLAIM_SECS as f64 + 5.0,
        "taken over once the claim lapsed: {late}"
    );

    // A replica that dies between making a grant and recording it: the
    // survivor takes the row over once the claim lapses.
    p.a.set_env("TOLLGATE_FAILPOINT", Some("after-grant-converge"));
    p.a.start_again().await;
    let id = p.request(&p.b, "eks prod-cluster 1h view INC-R2").await;
    let ts = p.card(&id).await;
    p.click(&p.a, APPROVERS[0], &id, &ts).await;
    p.a.wait_exit(Duration::from_secs(15)).await;
    let died = Instant::now();
    assert!(p.has_access().await, "the grant was made before the crash");
    wait_until(
        "the survivor records the grant",
        Duration::from_secs(CLAIM_SECS + 5),
        || async { p.count("granted", &id) == 1 },
    )
    .await;
    let failover = died.elapsed();
    eprintln!("grant taken over {failover:?} after the crash");
    wait_until("granted DM", Duration::from_secs(5), || async {
        p.slack
            .calls_to("chat.postMessage")
            .iter()
            .any(|c| c.params["channel"] == "DU0REQ" && c.params.to_string().contains(&id))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "arms TOLLGATE_FAILPOINT: run with --features failpoints"
)]
async fn a_replica_frozen_past_its_claims_does_not_act_on_stale_state() {
    // A freezes itself the moment it has claimed a revoke.
    let p = Pair::start(&[("TOLLGATE_FAILPOINT", "stop:after-revoke-claim")]).await;
    let first = p.request(&p.a, "eks prod-cluster 4s view INC-P1").await;
    let ts = p.card(&first).await;
    p.click(&p.a, APPROVERS[0], &first, &ts).await;
    wait_until("granted", Duration::from_secs(15), || p.has_access()).await;

    // Only A is awake at expiry, so A takes the revoke and freezes there.
    p.b.pause();
    wait_until(
        "A frozen holding the claim",
        Duration::from_secs(15),
        || async { p.a.log().contains("failpoint armed: stopping") },
    )
    .await;
    p.b.resume();
    wait_until(
        "B revokes once the claim lapses",
        Duration::from_secs(CLAIM_SECS + 20),
        || async { !p.has_access().await },
    )
    .await;
    wait_until("B recorded it", Duration::from_secs(5), || async {
        p.count("revoked", &first) == 1
    })
    .await;
    // A second grant for the same person, made while A is frozen.
    let second = p.request(&p.b, "eks prod-cluster 1h view INC-P2").await;
    let ts = p.card(&second).await;
    p.click(&p.b, APPROVERS[1], &second, &ts).await;
    wait_until("second grant", Duration::from_secs(15), || p.has_access()).await;

    // A wakes up in the middle of its old revoke: it must neither touch the
    // access (the second grant needs it) nor record anything.
    p.a.resume();
    wait_until(
        "A gave the stale step up",
        Duration::from_secs(20),
        || async {
            p.a.log()
                .contains("lease nearly lapsed before the cloud call")
        },
    )
    .await;
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(3) {
        assert!(p.has_access().await, "the live grant survived A's wake-up");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(p.count("revoked", &first), 1);
    assert_eq!(p.count("revoked", &second), 0);
    assert_eq!(p.count("granted", &second), 1);
    assert!(
        p.http
            .get(format!("{}/readyz", p.a.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()),
        "A is healthy again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_dynamodb_answers_unavailable_goes_unready_and_resumes() {
    let mut p = Pair::start(&[]).await;
    let ready = |base: String| {
        let http = p.http.clone();
        async move {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(ready(p.a.base.clone()).await, 200);

    p.ms.stop();
    let body = slash_body(
        REQUESTER,
        "eks prod-cluster 1h view INC-DOWN",
        &p.slack.response_url("down"),
    );
    let url = format!("{}/slack/commands", p.a.base);
    let resp = post_signed(&p.http, &url, SIGNING_SECRET, body).await;
    assert_eq!(resp.status().as_u16(), 200, "Slack always gets an answer");
    let json: Value = resp.json().await.unwrap();
    let text = json["text"].as_str().unwrap_or_default().to_string();
    if !text.contains("temporarily unavailable") {
        // Past Slack's three seconds the answer follows through response_url.
        wait_until("unavailable answer", Duration::from_secs(20), || async {
            p.slack
                .calls_to("response:down")
                .iter()
                .any(|c| c.params.to_string().contains("temporarily unavailable"))
        })
        .await;
    }
    // A click that cannot be recorded is never answered 200: Slack then
    // shows the clicker that it failed, instead of losing it quietly.
    let click = p
        .click(&p.a, APPROVERS[0], "R-ABCDE", "1700000000.000100")
        .await;
    assert!(
        click >= 500,
        "a click the store did not keep is not acknowledged: {click}"
    );
    wait_until(
        "not ready without the store",
        Duration::from_secs(10),
        || async { ready(p.a.base.clone()).await == 503 },
    )
    .await;
    assert!(
        p.a.is_running() && p.b.is_running(),
        "replicas keep running"
    );

    // DynamoDB is back (empty, as a restored table would be re-created):
    // the same processes become ready and take requests again.
    p.ms.resume();
    init_table(&p.ms, CONFIG, p.dirs.0.path());
    wait_until("ready again", Duration::from_secs(15), || async {
        ready(p.a.base.clone()).await == 200 && ready(p.b.base.clone()).await == 200
    })
    .await;
    let id = p.request(&p.b, "eks prod-cluster 1h view INC-BACK").await;
    assert!(id.starts_with("R-"));
}

/// The cluster of `CONFIG` with a backstop and a namespaced role, so that
/// a second grant brings an association and a schedule of its own.
fn backstop_config() -> String {
    CONFIG.replace(
        "[clusters.roles.view]",
        r#"[clusters.backstop]
scheduler_role_arn = "arn:aws:iam::000000000000:role/tollgate-backstop"
grace = "2s"
group = "tollgate"

[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaced = true

[clusters.roles.view]"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "arms TOLLGATE_FAILPOINT: run with --features failpoints"
)]
async fn a_reconcile_pass_paused_after_its_read_leaves_a_grant_made_meanwhile_alone() {
    // Spec 9.6: the reconciler works on a principal under the same lease
    // as a grant or revoke, and a pass that outlived its lease acts on
    // nothing it read. A reads Alice's one grant and freezes there; B
    // revokes that grant and grants her another meanwhile; A wakes up
    // holding a read in which the first grant is in force and the second
    // does not exist.
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let player = Player::new(&ms, "tollgate").await;
    player.create_group().await;
    let p = Pair::start_on(
        ms,
        &backstop_config(),
        &[("TOLLGATE_FAILPOINT", "stop:reconcile-principal-read")],
    )
    .await;

    let first = p.request(&p.b, "eks prod-cluster 5s view INC-RACE1").await;
    let ts = p.card(&first).await;
    p.click(&p.b, APPROVERS[0], &first, &ts).await;
    wait_until("first grant", Duration::from_secs(15), || async {
        p.count("granted", &first) == 1
    })
    .await;
    wait_until(
        "A's reconcile frozen after reading Alice's grant",
        Duration::from_secs(15),
        || async { p.a.log().contains("failpoint armed: stopping") },
    )
    .await;

    // While A is frozen, B revokes the first grant at its expiry and grants
    // Alice edit in payments, each once the lease A took has lapsed.
    wait_until(
        "first revoke",
        Duration::from_secs(CLAIM_SECS + 15),
        || async { p.count("revoked", &first) == 1 },
    )
    .await;
    let second = p
        .request(&p.b, "eks prod-cluster 1h edit --ns payments INC-RACE2")
        .await;
    let ts = p.card(&second).await;
    p.click(&p.b, APPROVERS[1], &second, &ts).await;
    wait_until(
        "second grant",
        Duration::from_secs(CLAIM_SECS + 15),
        || async { p.count("granted", &second) == 1 },
    )
    .await;
    assert!(p.holds("AmazonEKSEditPolicy").await);
    assert!(!p.holds("AmazonEKSViewPolicy").await);
    let schedules = || async {
        let mut all: Vec<(String, String)> = player
            .schedules()
            .await
            .into_iter()
            .map(|s| (s.name, s.expression))
            .collect();
        all.sort();
        all
    };
    let planned = schedules().await;
    assert!(!planned.is_empty(), "the second grant has its backstop");

    p.a.resume();
    // A's stale pass, then its next passes reading afresh: watched as they
    // run.
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(4) {
        assert!(
            p.holds("AmazonEKSEditPolicy").await,
            "the second grant survived A's wake-up"
        );
        assert!(!p.holds("AmazonEKSViewPolicy").await, "nothing restored");
        assert_eq!(schedules().await, planned, "its backstop kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A revoked grant seen "in force" would be reported as removed behind
    // Tollgate's back.
    assert_eq!(p.count("drift", &first), 0, "no false drift alarm");
    assert_eq!(p.count("drift", &second), 0);
    assert_eq!(p.count("revoked", &second), 0);
    assert!(
        p.a.log().contains("lease nearly lapsed before the repair"),
        "A gave the stale pass up"
    );
}
