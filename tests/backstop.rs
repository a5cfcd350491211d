//! The backstop (spec 10.1) end to end: the real `tollgate` binary writes
//! EventBridge Scheduler schedules in MiniStack as it grants, extends and
//! revokes; a Scheduler player (`support::backstop_player`) runs what those
//! schedules would run, so the access ends with Tollgate killed for good.

mod support;

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::backstop_player::{Player, Schedule};
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};
use time::OffsetDateTime;
use tollgate::access::access_entry::AccessEntryStrategy;
use tollgate::access::backstop::{Schedules, Wanted};
use tollgate::access::AccessError;
use tollgate::domain::backstop::schedule_name;
use tollgate::domain::policy::ClusterPolicy;

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const BOB_USER: &str = "U0BOB";
const CAROL_USER: &str = "U0CAROL";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";
const BOB: &str = "arn:aws:iam::000000000000:role/bob";
const CAROL: &str = "arn:aws:iam::000000000000:role/carol";
const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
const EDIT: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy";
const ROLE: &str = "arn:aws:iam::000000000000:role/tollgate-backstop";
const GROUP: &str = "tollgate";
const GRACE: Duration = Duration::from_secs(2);

const CONFIG: &str = r#"
[server]
listen = "{listen}"

[store]
path = "{data}"

[slack]
app_id = "A0TOLLGATE"

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

[clusters.backstop]
scheduler_role_arn = "arn:aws:iam::000000000000:role/tollgate-backstop"
grace = "2s"
group = "tollgate"

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
    player: Player,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        support::install_crypto_provider();
        let ms = MiniStack::start();
        ms.create_cluster(CLUSTER).await;
        let player = Player::new(&ms, GROUP).await;
        player.create_group().await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
        slack.add_user(BOB_USER, "bob@example.com", "UTC", 0);
        slack.add_user(CAROL_USER, "carol@example.com", "UTC", 0);
        slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
        slack.add_channel(CHANNEL, true);
        let dir = tempfile::tempdir().unwrap();
        let tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
        World {
            ms,
            slack,
            tollgate,
            player,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn slash(&self, user: &str, text: &str) -> Value {
        let body = slash_body(user, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", self.tollgate.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, body).await;
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.unwrap_or(Value::Null)
    }

    /// Request ids in an answer, in order of appearance.
    fn ids(text: &str) -> Vec<String> {
        text.match_indices("R-")
            .map(|(i, _)| text[i..i + 7].to_string())
            .collect()
    }

    /// Submits a request (or an extension), has it approved, returns its id.
    async fn approved(&self, user: &str, text: &str, other_than: Option<&str>) -> String {
        let answer = self.slash(user, text).await;
        let receipt = answer["text"].as_str().unwrap_or_default().to_string();
        let id = World::ids(&receipt)
            .into_iter()
            .find(|i| Some(i.as_str()) != other_than)
            .unwrap_or_else(|| panic!("no request id in {receipt}"));
        let ts = self
            .slack
            .card_ts(CHANNEL, &id, Duration::from_secs(10))
            .await;
        let body = action_body(
            APPROVER,
            "approve",
            &id,
            CHANNEL,
            &ts,
            &self.slack.response_url("click"),
        );
        let url = format!("{}/slack/interactions", self.tollgate.base);
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status();
        assert_eq!(status.as_u16(), 200);
        id
    }

    async fn associations(&self, principal: &str) -> Vec<(String, Value)> {
        let path = format!(
            "/clusters/{CLUSTER}/access-entries/{}/access-policies",
            encode_arn(principal)
        );
        let (status, json) = self.ms.eks_json("GET", &path, None).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "{json}");
        let mut out: Vec<(String, Value)> = json["associatedAccessPolicies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                let mut scope = a["accessScope"].clone();
                // MiniStack may or may not echo an empty namespace list.
                if scope["namespaces"] == json!([]) {
                    scope.as_object_mut().map(|o| o.remove("namespaces"));
                }
                (
                    a["policyArn"].as_str().unwrap_or_default().to_string(),
                    scope,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn entry_exists(&self, principal: &str) -> bool {
        let path = format!(
            "/clusters/{CLUSTER}/access-entries/{}",
            encode_arn(principal)
        );
        self.ms.eks_json("GET", &path, None).await.0 == 200
    }

    /// Every access entry of the cluster with its associations.
    async fn cluster_state(&self) -> Vec<(String, Vec<(String, Value)>)> {
        let path = format!("/clusters/{CLUSTER}/access-entries");
        let (status, json) = self.ms.eks_json("GET", &path, None).await;
        assert_eq!(status, 200, "{json}");
        let mut principals: Vec<String> = json["accessEntries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        principals.sort();
        let mut out = Vec::new();
        for p in principals {
            let assoc = self.associations(&p).await;
            out.push((p, assoc));
        }
        out
    }

    /// An entry an administrator made, with one association.
    async fn entry_by_hand(&self, principal: &str, policy: &str, scope: Value) {
        let (status, json) = self
            .ms
            .eks_json(
                "POST",
                &format!("/clusters/{CLUSTER}/access-entries"),
                Some(json!({"principalArn": principal, "type": "STANDARD"})),
            )
            .await;
        assert_eq!(status, 200, "{json}");
        let path = format!(
            "/clusters/{CLUSTER}/access-entries/{}/access-policies",
            encode_arn(principal)
        );
        let body = json!({"policyArn": policy, "accessScope": scope});
        let (status, json) = self.ms.eks_json("POST", &path, Some(body)).await;
        assert_eq!(status, 200, "{json}");
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .arg("--config")
            .arg(&self.tollgate.config_path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The expiry of a live grant per `tollgate grants list --json`.
    fn expiry(&self, id: &str) -> Option<OffsetDateTime> {
        let (ok, out, err) = self.cli(&["grants", "list", "--json"]);
        assert!(ok, "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|g| g["id"] == id)
            .and_then(|g| g["expires_at"].as_str().map(str::to_string))
            .map(|t| {
                OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).unwrap()
            })
    }

    fn audit(&self) -> Vec<Value> {
        let (ok, out, err) = self.cli(&["audit", "export"]);
        assert!(ok, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn schedule(&self, principal: &str, policy: &str) -> Option<Schedule> {
        let name = schedule_name("tollgate", CLUSTER, principal, policy);
        self.player
            .schedules()
            .await
            .into_iter()
            .find(|s| s.name == name)
    }
}

/// expiry + grace, as the whole second `at(...)` can name (rounded up).
fn fires_at(expiry: OffsetDateTime) -> OffsetDateTime {
    let t = expiry + GRACE;
    let whole = t.replace_nanosecond(0).unwrap();
    if whole < t {
        whole + time::Duration::SECOND
    } else {
        whole
    }
}

/// Every Input the backstop writes is the EKS request in the casing
/// Scheduler's universal targets take (the SDK's PascalCase member names);
/// the REST wire casing the API reference shows is refused, as the real
/// target call would fail with it.
#[test]
fn schedule_inputs_use_the_sdk_member_names_scheduler_takes() {
    use support::backstop_player::check_input;
    use tollgate::domain::backstop::Undo;
    use tollgate::domain::grant::Scope;
    for undo in [
        Undo::DeleteEntry,
        Undo::Disassociate,
        Undo::Restore(Scope::Cluster),
        Undo::Restore(Scope::from_namespaces(["team-a", "team-b"])),
    ] {
        let input = undo.input(CLUSTER, ALICE, EDIT);
        check_input(undo.action(), &input).unwrap_or_else(|e| panic!("{}: {e}", undo.action()));
    }
    let wire = json!({"clusterName": CLUSTER, "principalArn": ALICE});
    assert!(check_input("deleteAccessEntry", &wire).is_err());
    let wire_scope = json!({
        "ClusterName": CLUSTER,
        "PrincipalArn": ALICE,
        "PolicyArn": EDIT,
        "AccessScope": {"type": "cluster"},
    });
    assert!(check_input("associateAccessPolicy", &wire_scope).is_err());
    let extra = json!({"ClusterName": CLUSTER, "PrincipalArn": ALICE, "PolicyArn": EDIT});
    assert!(check_input("deleteAccessEntry", &extra).is_err());
    let bad_enum = json!({
        "ClusterName": CLUSTER,
        "PrincipalArn": ALICE,
        "PolicyArn": EDIT,
        "AccessScope": {"Type": "CLUSTER"},
    });
    assert!(check_input("associateAccessPolicy", &bad_enum).is_err());
}

/// The schedule is one Scheduler runs once, at its time, then deletes.
fn assert_well_formed(s: &Schedule) {
    assert!(s.name.len() <= 64, "{}", s.name);
    assert!(s.expression.starts_with("at("), "{}", s.expression);
    assert_eq!(s.timezone.as_deref(), Some("UTC"));
    assert!(s.flexible_window_off, "{s:?}");
    assert!(s.delete_after_completion, "{s:?}");
    assert_eq!(s.role_arn, ROLE);
    assert_eq!(s.state.as_deref(), Some("ENABLED"));
    assert_eq!(s.retry, Some((86_400, 185)), "explicit RetryPolicy");
    assert_eq!(
        s.description.as_deref(),
        Some("managed-by=tollgate tollgate-instance=tollgate")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_follow_grant_extension_overlap_revoke_and_baselines() {
    let w = World::new().await;

    // A grant: one schedule at expiry + grace that deletes the entry
    // Tollgate created for it.
    let first = w
        .approved(REQUESTER, "eks prod-cluster 40s view INC-1", None)
        .await;
    wait_until("granted", Duration::from_secs(10), || async {
        w.schedule(ALICE, VIEW).await.is_some() && !w.associations(ALICE).await.is_empty()
    })
    .await;
    let s = w.schedule(ALICE, VIEW).await.unwrap();
    assert_well_formed(&s);
    let expiry = w.expiry(&first).expect("active with an expiry");
    assert_eq!(s.at, Some(fires_at(expiry)), "{s:?}");
    assert_eq!(
        s.target_arn,
        "arn:aws:scheduler:::aws-sdk:eks:deleteAccessEntry"
    );
    assert_eq!(
        s.input,
        json!({"ClusterName": CLUSTER, "PrincipalArn": ALICE})
    );
    assert_eq!(w.player.schedules().await.len(), 1);

    // A schedule lost outside Tollgate (deleted by hand) is put back by
    // the reconciler, unchanged.
    w.player
        .scheduler
        .delete_schedule()
        .group_name(GROUP)
        .name(&s.name)
        .send()
        .await
        .unwrap();
    wait_until(
        "the reconciler restored the schedule",
        Duration::from_secs(10),
        || async {
            w.schedule(ALICE, VIEW).await.is_some_and(|again| {
                again.at == s.at && again.target_arn == s.target_arn && again.input == s.input
            })
        },
    )
    .await;

    // A schedule disabled and moved to another time zone outside Tollgate
    // would fire never, or hours off: the reconciler rewrites it.
    w.player
        .scheduler
        .update_schedule()
        .group_name(GROUP)
        .name(&s.name)
        .description(s.description.clone().unwrap())
        .schedule_expression(&s.expression)
        .schedule_expression_timezone("Pacific/Kiritimati")
        .flexible_time_window(
            aws_sdk_scheduler::types::FlexibleTimeWindow::builder()
                .mode(aws_sdk_scheduler::types::FlexibleTimeWindowMode::Off)
                .build()
                .unwrap(),
        )
        .state(aws_sdk_scheduler::types::ScheduleState::Disabled)
        .target(
            aws_sdk_scheduler::types::Target::builder()
                .arn(&s.target_arn)
                .role_arn(&s.role_arn)
                .input(s.input.to_string())
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let tampered = w.schedule(ALICE, VIEW).await.unwrap();
    assert_eq!(tampered.state.as_deref(), Some("DISABLED"), "{tampered:?}");
    wait_until(
        "the reconciler re-enabled the schedule in UTC",
        Duration::from_secs(10),
        || async {
            w.schedule(ALICE, VIEW).await.is_some_and(|again| {
                again.state.as_deref() == Some("ENABLED")
                    && again.timezone.as_deref() == Some("UTC")
                    && again.at == s.at
            })
        },
    )
    .await;
    assert_well_formed(&w.schedule(ALICE, VIEW).await.unwrap());

    // An overlapping grant of the same policy ending later: still one
    // schedule, now at the later expiry.
    let second = w
        .approved(REQUESTER, "eks prod-cluster 55s view INC-2", None)
        .await;
    wait_until("second grant active", Duration::from_secs(10), || async {
        w.expiry(&second).is_some()
    })
    .await;
    let later = w.expiry(&second).unwrap();
    assert!(later > expiry);
    wait_until(
        "schedule moved to the later expiry",
        Duration::from_secs(10),
        || async { w.schedule(ALICE, VIEW).await.and_then(|s| s.at) == Some(fires_at(later)) },
    )
    .await;
    assert_eq!(w.player.schedules().await.len(), 1, "one per association");

    // An extension of the first grant past the second: the schedule moves.
    let ext = w
        .approved(REQUESTER, &format!("extend {first} 50s"), Some(&first))
        .await;
    assert_ne!(ext, first);
    wait_until("extension applied", Duration::from_secs(10), || async {
        w.expiry(&first).is_some_and(|e| e > later)
    })
    .await;
    let extended = w.expiry(&first).unwrap();
    wait_until(
        "schedule moved by the extension",
        Duration::from_secs(10),
        || async { w.schedule(ALICE, VIEW).await.and_then(|s| s.at) == Some(fires_at(extended)) },
    )
    .await;

    // Revoking the extended grant: back to the other grant's expiry.
    let answer = w.slash(REQUESTER, &format!("revoke {first}")).await;
    assert!(answer["text"].is_string(), "{answer}");
    wait_until(
        "schedule back at the remaining grant's expiry",
        Duration::from_secs(10),
        || async { w.schedule(ALICE, VIEW).await.and_then(|s| s.at) == Some(fires_at(later)) },
    )
    .await;
    assert!(
        w.entry_exists(ALICE).await,
        "the other grant still needs it"
    );

    // Revoking the last one: access and schedule both gone.
    w.slash(REQUESTER, &format!("revoke {second}")).await;
    wait_until(
        "access and schedule gone",
        Duration::from_secs(10),
        || async { !w.entry_exists(ALICE).await && w.player.schedules().await.is_empty() },
    )
    .await;

    // A grant on an entry with a baseline: the target restores the
    // baseline scope, never deletes the entry.
    w.entry_by_hand(
        BOB,
        EDIT,
        json!({"type": "namespace", "namespaces": ["team-a"]}),
    )
    .await;
    let bob = w
        .approved(
            BOB_USER,
            "eks prod-cluster 40s edit --ns payments INC-3",
            None,
        )
        .await;
    wait_until("bob granted", Duration::from_secs(10), || async {
        w.schedule(BOB, EDIT).await.is_some() && w.expiry(&bob).is_some()
    })
    .await;
    let s = w.schedule(BOB, EDIT).await.unwrap();
    assert_well_formed(&s);
    assert_eq!(s.at, Some(fires_at(w.expiry(&bob).unwrap())));
    assert_eq!(
        s.target_arn,
        "arn:aws:scheduler:::aws-sdk:eks:associateAccessPolicy"
    );
    assert_eq!(
        s.input,
        json!({
            "ClusterName": CLUSTER,
            "PrincipalArn": BOB,
            "PolicyArn": EDIT,
            "AccessScope": {"Type": "namespace", "Namespaces": ["team-a"]},
        })
    );
    w.slash(BOB_USER, &format!("revoke {bob}")).await;
    wait_until("bob's schedule gone", Duration::from_secs(10), || async {
        w.player.schedules().await.is_empty()
    })
    .await;
    assert_eq!(
        w.associations(BOB).await,
        vec![(
            EDIT.to_string(),
            json!({"type": "namespace", "namespaces": ["team-a"]})
        )],
        "the baseline stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_for_good_the_schedules_alone_end_the_access_and_only_it() {
    let mut w = World::new().await;
    // What is not Tollgate's: Carol's entry, and Bob's baseline association.
    w.entry_by_hand(CAROL, VIEW, json!({"type": "cluster"}))
        .await;
    w.entry_by_hand(
        BOB,
        EDIT,
        json!({"type": "namespace", "namespaces": ["team-a"]}),
    )
    .await;
    let before = w.cluster_state().await;

    let alice = w
        .approved(REQUESTER, "eks prod-cluster 4s view INC-4", None)
        .await;
    let bob = w
        .approved(
            BOB_USER,
            "eks prod-cluster 4s edit --ns payments INC-5",
            None,
        )
        .await;
    // Carol's grant on the entry an administrator made for her.
    let carol = w
        .approved(
            CAROL_USER,
            "eks prod-cluster 4s edit --ns payments INC-6",
            None,
        )
        .await;
    wait_until(
        "all three granted with their schedules",
        Duration::from_secs(10),
        || async {
            w.player.schedules().await.len() == 3
                && !w.associations(ALICE).await.is_empty()
                && w.associations(CAROL).await.len() == 2
                && w.associations(BOB)
                    .await
                    .iter()
                    .any(|(_, s)| s.to_string().contains("payments"))
        },
    )
    .await;
    let expiries = [
        w.expiry(&alice).unwrap(),
        w.expiry(&bob).unwrap(),
        w.expiry(&carol).unwrap(),
    ];
    // Each of the three ways to undo, through the real EKS call below.
    let target = |s: Option<Schedule>| s.map(|s| s.target_arn).unwrap_or_default();
    assert!(target(w.schedule(ALICE, VIEW).await).ends_with(":deleteAccessEntry"));
    assert!(target(w.schedule(BOB, EDIT).await).ends_with(":associateAccessPolicy"));
    assert!(target(w.schedule(CAROL, EDIT).await).ends_with(":disassociateAccessPolicy"));

    w.tollgate.kill9();
    let killed = Instant::now();
    let killed_utc = OffsetDateTime::now_utc();

    // Scheduler's part, played at the real time: each schedule runs once
    // its at() has passed.
    let played = std::sync::Mutex::new(Vec::new());
    wait_until(
        "the schedules removed the access",
        Duration::from_secs(30),
        || async {
            let now = w.player.play_due(OffsetDateTime::now_utc()).await;
            played.lock().unwrap().extend(now);
            !w.entry_exists(ALICE).await
                && !w
                    .associations(BOB)
                    .await
                    .iter()
                    .any(|(_, s)| s.to_string().contains("payments"))
                && w.associations(CAROL).await.len() == 1
        },
    )
    .await;
    let gone = killed.elapsed();
    let latest = *expiries.iter().max().unwrap();
    println!(
        "backstop: Tollgate killed -> access gone in {:.1} s (latest expiry {:.1} s after the kill, grace {} s)",
        gone.as_secs_f64(),
        (latest - killed_utc).as_seconds_f64(),
        GRACE.as_secs(),
    );
    let played = played.into_inner().unwrap();
    assert_eq!(played.len(), 3, "{played:?}");
    assert!(
        played.iter().all(|p| p.error.is_none()),
        "every call a schedule made succeeded: {played:?}"
    );
    assert!(
        gone < Duration::from_secs(20),
        "access gone {gone:?} after the kill"
    );
    assert!(
        w.player.schedules().await.is_empty(),
        "each deleted after running"
    );
    // Only the granted access went: Carol's own entry and association,
    // the account root and Bob's baseline are exactly as before.
    let after = w.cluster_state().await;
    let without_alice: Vec<_> = before.iter().filter(|(p, _)| p != ALICE).cloned().collect();
    assert_eq!(after, without_alice);

    // Tollgate back: nothing left to do but record the revokes.
    w.tollgate.restart().await;
    wait_until("all recorded revoked", Duration::from_secs(15), || async {
        let audit = w.audit();
        [&alice, &bob, &carol].iter().all(|id| {
            audit
                .iter()
                .any(|e| e["event"] == "revoked" && e["request_id"] == id.as_str())
        })
    })
    .await;
    assert!(w.expiry(&alice).is_none() && w.expiry(&bob).is_none() && w.expiry(&carol).is_none());
    assert!(
        w.player.schedules().await.is_empty(),
        "no schedule left behind"
    );
    assert_eq!(w.cluster_state().await, without_alice);
}

impl World {
    /// `tollgate check` with the server's environment; (success, stdout).
    fn check(&self, config: &std::path::Path) -> (bool, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("check")
            .arg("--config")
            .arg(config)
            .envs(self.ms.aws_env())
            .env("SLACK_BOT_TOKEN", BOT_TOKEN)
            .env("SLACK_SIGNING_SECRET", SIGNING_SECRET)
            .env("SLACK_API_URL", self.slack.api_url())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_group_the_role_and_clusters_without_a_backstop() {
    let w = World::new().await;
    let (ok, out) = w.check(&w.tollgate.config_path);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok   cluster prod-cluster: backstop schedule group tollgate exists"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok   cluster prod-cluster: backstop role {ROLE} can be passed"
        )),
        "{out}"
    );
    assert!(
        w.player.schedules().await.is_empty(),
        "the probe is deleted"
    );

    // A cluster of a Kubernetes strategy is said to have no backstop.
    let config = std::fs::read_to_string(&w.tollgate.config_path).unwrap();
    let with_legacy = format!(
        "{config}\n[[clusters]]\nname = \"legacy\"\nregion = \"us-east-1\"\naccount_id = \"000000000000\"\nstrategy = \"aws-auth\"\napproval_channel = \"C0APPROVALS\"\n[clusters.roles.view]\ngroups = [\"viewers\"]\n"
    );
    let path = w.tollgate.config_path.with_file_name("legacy.toml");
    std::fs::write(&path, with_legacy).unwrap();
    let (_, out) = w.check(&path);
    assert!(
        out.contains("note cluster legacy: no AWS-side backstop for the aws-auth strategy"),
        "{out}"
    );

    // The group gone: check fails and says how to make it.
    w.player
        .scheduler
        .delete_schedule_group()
        .name(GROUP)
        .send()
        .await
        .unwrap();
    let (ok, out) = w.check(&w.tollgate.config_path);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL cluster prod-cluster: backstop schedule group tollgate does not exist"),
        "{out}"
    );
}

/// Scheduler that can be taken out of reach, in front of MiniStack's.
struct Flaky {
    inner: tollgate::access::backstop::AwsSchedules,
    down: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn check(&self, c: &ClusterPolicy) -> Result<(), AccessError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AccessError::Aws {
                cluster: c.name.clone(),
                operation: "GetSchedule",
                message: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Schedules for Flaky {
    async fn get(
        &self,
        c: &ClusterPolicy,
        g: &str,
        n: &str,
    ) -> Result<Option<tollgate::access::backstop::Existing>, AccessError> {
        self.check(c)?;
        self.inner.get(c, g, n).await
    }
    async fn create(&self, c: &ClusterPolicy, w: &Wanted<'_>) -> Result<bool, AccessError> {
        self.check(c)?;
        self.inner.create(c, w).await
    }
    async fn update(&self, c: &ClusterPolicy, w: &Wanted<'_>) -> Result<(), AccessError> {
        self.check(c)?;
        self.inner.update(c, w).await
    }
    async fn delete(&self, c: &ClusterPolicy, g: &str, n: &str) -> Result<(), AccessError> {
        self.check(c)?;
        self.inner.delete(c, g, n).await
    }
    async fn group_exists(&self, c: &ClusterPolicy, g: &str) -> Result<bool, AccessError> {
        self.check(c)?;
        self.inner.group_exists(c, g).await
    }
    async fn probe_role(
        &self,
        c: &ClusterPolicy,
        g: &str,
        r: &str,
        n: &str,
    ) -> Result<(), AccessError> {
        self.check(c)?;
        self.inner.probe_role(c, g, r, n).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_out_of_reach_blocks_a_grant_never_a_revoke() {
    use tollgate::access::{AccessEngine, AwsClients, InForce};
    use tollgate::domain::request::{AccessSpec, Asked, Request, RequestId, Requester};
    use tollgate::store::{SledStore, Store};

    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster(CLUSTER).await;
    let player = Player::new(&ms, GROUP).await;
    player.create_group().await;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&ms.endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .load()
        .await;
    let clients = Arc::new(AwsClients::new(sdk));
    let flaky = Arc::new(Flaky {
        inner: tollgate::access::backstop::AwsSchedules::new(clients.clone()),
        down: std::sync::atomic::AtomicBool::new(true),
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let engine = AccessEntryStrategy::new(clients, store.clone()).with_schedules(flaky.clone());
    let mut cluster = tollgate::config::Config::parse(
        &CONFIG
            .replace("{listen}", "127.0.0.1:1")
            .replace("{data}", &dir.path().display().to_string()),
        "t.toml",
    )
    .unwrap()
    .clusters
    .remove(0);
    cluster.backstop.as_mut().unwrap().grace = GRACE;

    let spec = AccessSpec {
        cluster: CLUSTER.into(),
        role: "view".into(),
        principal: ALICE.into(),
        policy_arn: Some(VIEW.into()),
        namespaces: Vec::new(),
        cluster_role: None,
        groups: Vec::new(),
        k8s_user: None,
        strategy: None,
    };
    let edit = AccessSpec {
        policy_arn: Some(EDIT.into()),
        namespaces: vec!["payments".into()],
        ..spec.clone()
    };
    for (id, spec) in [("R-00001", &spec), ("R-00002", &edit)] {
        let mut row = Request::pending(
            Asked {
                id: RequestId::parse(id).unwrap(),
                requester: Requester {
                    user_id: REQUESTER.into(),
                    email: "alice@example.com".into(),
                    tz: None,
                    tz_offset_secs: 0,
                },
                access: spec.clone(),
                reason: String::new(),
                duration: Duration::from_secs(3600),
                approval_timeout: Duration::from_secs(600),
                required_approvals: 1,
                response_url: None,
            },
            OffsetDateTime::now_utc(),
        );
        row.intents = tollgate::domain::grant::intents_for(
            tollgate::domain::policy::Strategy::AccessEntry,
            id,
            spec,
        );
        store.create(&row, Vec::new()).await.unwrap();
    }
    let expires_at = Some(OffsetDateTime::now_utc() + time::Duration::hours(1));
    let view_grant = InForce {
        grant_id: "R-00001",
        spec: &spec,
        expires_at,
    };
    let edit_grant = InForce {
        grant_id: "R-00002",
        spec: &edit,
        expires_at,
    };
    let grant = [view_grant.clone(), edit_grant.clone()];
    let associations = || async {
        let path = format!(
            "/clusters/{CLUSTER}/access-entries/{}/access-policies",
            encode_arn(ALICE)
        );
        let (status, json) = ms.eks_json("GET", &path, None).await;
        match status {
            404 => 0,
            _ => json["associatedAccessPolicies"]
                .as_array()
                .map_or(0, Vec::len),
        }
    };
    let set = |down: bool| flaky.down.store(down, std::sync::atomic::Ordering::SeqCst);

    // No schedule, no association: the grant fails closed.
    assert!(engine
        .converge(&cluster, ALICE, &grant, "R-00001")
        .await
        .is_err());
    assert_eq!(associations().await, 0, "an association with no backstop");

    set(false);
    engine
        .converge(&cluster, ALICE, &grant, "R-00001")
        .await
        .unwrap();
    assert_eq!(associations().await, 2);
    assert_eq!(player.schedules().await.len(), 2);

    // Revoking one grant with Scheduler down: its access goes, the other
    // grant's stays, and the step reports it is not done (the schedules
    // are not right yet) so it is tried again.
    set(true);
    assert!(engine
        .converge(
            &cluster,
            ALICE,
            std::slice::from_ref(&edit_grant),
            "R-00002"
        )
        .await
        .is_err());
    assert_eq!(associations().await, 1, "a revoke waited on Scheduler");
    set(false);
    engine
        .converge(
            &cluster,
            ALICE,
            std::slice::from_ref(&edit_grant),
            "R-00002",
        )
        .await
        .unwrap();
    assert_eq!(associations().await, 1);
    let left = player.schedules().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].input["PrincipalArn"], ALICE);

    // The last revoke, likewise.
    set(true);
    assert!(engine
        .converge(&cluster, ALICE, &[], "R-00001")
        .await
        .is_err());
    assert_eq!(associations().await, 0, "a revoke waited on Scheduler");
    set(false);
    engine
        .converge(&cluster, ALICE, &[], "R-00001")
        .await
        .unwrap();
    assert!(player.schedules().await.is_empty());
    assert!(!alice_has_entry(&ms).await, "Tollgate's entry is deleted");

    // Security: someone able to write the group plants a schedule under
    // the name Tollgate would use for ALICE's view association (say one
    // that never fires, or re-grants later). The grant fails as with
    // Scheduler out of reach: nothing is associated without Tollgate's own
    // backstop, and the planted schedule is neither overwritten nor used.
    let name = schedule_name("tollgate", CLUSTER, ALICE, VIEW);
    let far = OffsetDateTime::now_utc() + time::Duration::days(30);
    player
        .scheduler
        .create_schedule()
        .group_name(GROUP)
        .name(&name)
        .description("planted")
        .schedule_expression(tollgate::domain::backstop::at_expression(far))
        .schedule_expression_timezone("UTC")
        .flexible_time_window(
            aws_sdk_scheduler::types::FlexibleTimeWindow::builder()
                .mode(aws_sdk_scheduler::types::FlexibleTimeWindowMode::Off)
                .build()
                .unwrap(),
        )
        .state(aws_sdk_scheduler::types::ScheduleState::Disabled)
        .target(
            aws_sdk_scheduler::types::Target::builder()
                .arn("arn:aws:scheduler:::aws-sdk:eks:deleteAccessEntry")
                .role_arn(ROLE)
                .input(json!({"ClusterName": CLUSTER, "PrincipalArn": BOB}).to_string())
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let refused = engine
        .converge(
            &cluster,
            ALICE,
            std::slice::from_ref(&view_grant),
            "R-00001",
        )
        .await;
    assert!(refused.is_err(), "granted without a backstop: {refused:?}");
    assert_eq!(associations().await, 0, "an association with no backstop");
    let planted = player.schedules().await;
    assert_eq!(planted.len(), 1);
    assert_eq!(planted[0].description.as_deref(), Some("planted"));
    assert_eq!(planted[0].input["PrincipalArn"], BOB, "not overwritten");
}

/// Whether ALICE still has an access entry.
async fn alice_has_entry(ms: &MiniStack) -> bool {
    let path = format!("/clusters/{CLUSTER}/access-entries/{}", encode_arn(ALICE));
    ms.eks_json("GET", &path, None).await.0 == 200
}

/// Spec 9.6 with the backstop: standing access removed during a grant
/// must not come back through the schedule either (it fires when Tollgate
/// is gone). The reconciler's schedule repair finds the baseline's
/// association gone, rewrites the baseline to "none" (audit
/// `baseline_gone`), and the schedule turns from a restore into a
/// disassociation; played, it leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_baseline_gets_no_restore_schedule() {
    let w = World::new().await;
    w.entry_by_hand(
        BOB,
        EDIT,
        json!({"type": "namespace", "namespaces": ["team-a"]}),
    )
    .await;
    let bob = w
        .approved(
            BOB_USER,
            "eks prod-cluster 1h edit --ns payments INC-7",
            None,
        )
        .await;
    wait_until("bob granted", Duration::from_secs(10), || async {
        w.schedule(BOB, EDIT).await.is_some() && w.expiry(&bob).is_some()
    })
    .await;
    assert_eq!(
        w.schedule(BOB, EDIT).await.unwrap().target_arn,
        "arn:aws:scheduler:::aws-sdk:eks:associateAccessPolicy"
    );
    // An admin removes Bob's association during the grant.
    let path = format!(
        "/clusters/{CLUSTER}/access-entries/{}/access-policies/{}",
        encode_arn(BOB),
        encode_arn(EDIT)
    );
    let (status, body) = w.ms.eks_json("DELETE", &path, None).await;
    assert_eq!(status, 200, "{body}");

    wait_until(
        "the schedule no longer restores the vanished baseline",
        Duration::from_secs(15),
        || async {
            w.schedule(BOB, EDIT).await.is_some_and(|s| {
                s.target_arn == "arn:aws:scheduler:::aws-sdk:eks:disassociateAccessPolicy"
            })
        },
    )
    .await;
    let gone: Vec<Value> = w
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "baseline_gone")
        .collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0]["details"]["policy"], EDIT);
    assert_eq!(gone[0]["request_id"], bob.as_str());
    // Tollgate gone for good: the schedule alone runs at its time. With
    // nothing associated its disassociation finds nothing (EKS answers
    // not found); a restore would have put the access back.
    let s = w.schedule(BOB, EDIT).await.unwrap();
    let _ = w.player.call(&s).await;
    assert_eq!(
        w.associations(BOB).await,
        Vec::new(),
        "the backstop put back standing access removed during the grant"
    );
}
