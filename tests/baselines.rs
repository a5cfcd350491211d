//! Baselines end to end (spec 9.6), through the real binary against
//! MiniStack.
//!
//! Two installations of Tollgate (`[server] instance` "blue" and "green",
//! each with its own store) on one EKS cluster in MiniStack, both granting
//! the same principal (spec 9.6). Associations carry no marks, so if one
//! installation granted over the other's entry it would take the other's
//! association for standing access (a baseline) and put it back at its own
//! end: access that outlives every grant. Each installation refuses to
//! grant over an entry the other marked, naming it, and when everything
//! ends nothing is left — in both orders.

mod support;

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use support::lying_eks::LyingEks;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const SECURITY: &str = "C0SECURITY";
const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";

const CONFIG: &str = r#"
[server]
listen = "{listen}"
instance = "{instance}"

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

struct Installations {
    ms: MiniStack,
    slack: SlackStandIn,
    blue: Tollgate,
    green: Tollgate,
    http: reqwest::Client,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Installations {
    async fn start() -> Installations {
        support::install_crypto_provider();
        let ms = MiniStack::start();
        ms.create_cluster("prod-cluster").await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
        slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
        slack.add_channel(CHANNEL, true);
        slack.add_channel(SECURITY, true);
        let (db, dg) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let blue = Tollgate::start(
            db.path(),
            &CONFIG.replace("{instance}", "blue"),
            &slack.api_url(),
            &ms,
        )
        .await;
        let green = Tollgate::start(
            dg.path(),
            &CONFIG.replace("{instance}", "green"),
            &slack.api_url(),
            &ms,
        )
        .await;
        Installations {
            ms,
            slack,
            blue,
            green,
            http: reqwest::Client::new(),
            _dirs: (db, dg),
        }
    }

    /// A request through `via`, approved there; its id.
    async fn granted_request(&self, via: &Tollgate, text: &str) -> String {
        let body = slash_body(REQUESTER, text, &self.slack.response_url("cmd"));
        let url = format!("{}/slack/commands", via.base);
        let json: Value = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .json()
            .await
            .unwrap();
        let id = request_id(json["text"].as_str().unwrap());
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
        let url = format!("{}/slack/interactions", via.base);
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status();
        assert_eq!(status, 200);
        id
    }

    /// Alice's associations as EKS lists them: policy ARN → scope type.
    async fn associations(&self) -> Vec<(String, Value)> {
        let path = format!(
            "/clusters/prod-cluster/access-entries/{}/access-policies",
            encode_arn(ALICE)
        );
        let (status, body) = self.ms.eks_json("GET", &path, None).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "{body}");
        body["associatedAccessPolicies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["policyArn"].as_str().unwrap().to_string(),
                    a["accessScope"].clone(),
                )
            })
            .collect()
    }

    async fn entry_exists(&self) -> bool {
        let path = format!(
            "/clusters/prod-cluster/access-entries/{}",
            encode_arn(ALICE)
        );
        self.ms.eks_json("GET", &path, None).await.0 == 200
    }

    /// Reconcile passes `t` has made on the cluster, from `/metrics`.
    async fn passes(&self, t: &Tollgate) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", t.metrics_base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with("tollgate_reconcile_passes_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }
}

const ALICE: &str = "arn:aws:iam::000000000000:role/alice";

fn cli(t: &Tollgate, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(&t.config_path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn audit(t: &Tollgate) -> Vec<Value> {
    let (ok, out, err) = cli(t, &["audit", "export"]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn event(t: &Tollgate, name: &str, id: &str) -> Option<Value> {
    audit(t)
        .into_iter()
        .find(|e| e["event"] == name && e["request_id"] == id)
}

/// `first` grants view; `second`, asked for view in `payments` while that
/// grant is active, refuses naming `first_name`; `first`'s grant is
/// revoked early; after that, and after both reconcilers have looked
/// again, Alice has no access left.
async fn second_installation_is_refused(
    w: &Installations,
    first: &Tollgate,
    first_name: &str,
    second: &Tollgate,
) {
    let a = w
        .granted_request(first, "eks prod-cluster 30m view INC-1")
        .await;
    wait_until(
        "first installation granted",
        Duration::from_secs(15),
        || async { event(first, "granted", &a).is_some() },
    )
    .await;

    let b = w
        .granted_request(second, "eks prod-cluster 30m view --ns payments INC-2")
        .await;
    wait_until("second grant failed", Duration::from_secs(15), || async {
        event(second, "grant_failed", &b).is_some()
    })
    .await;
    let failed = event(second, "grant_failed", &b).unwrap();
    assert_eq!(
        failed["details"]["reason"], "other_installation",
        "{failed}"
    );
    let error = failed["details"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("`{first_name}`")),
        "the refusal names the other installation: {error}"
    );
    assert!(event(second, "granted", &b).is_none());
    let assoc = w.associations().await;
    assert_eq!(assoc.len(), 1, "{assoc:?}");
    assert_eq!(assoc[0].1["type"], "cluster", "{assoc:?}");

    // The first grant is revoked early and removes its entry.
    let (ok, _, err) = cli(first, &["grants", "revoke", &a, "--reason", "done"]);
    assert!(ok, "{err}");
    wait_until("first grant revoked", Duration::from_secs(15), || async {
        event(first, "revoked", &a).is_some()
    })
    .await;
    // Both reconcilers pass over the cluster twice more: neither puts
    // anything back.
    let (pb, pg) = (w.passes(&w.blue).await, w.passes(&w.green).await);
    wait_until(
        "two more reconcile passes each",
        Duration::from_secs(15),
        || async { w.passes(&w.blue).await >= pb + 2 && w.passes(&w.green).await >= pg + 2 },
    )
    .await;
    assert!(
        !w.entry_exists().await,
        "access outlived every grant: {:?}",
        w.associations().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_never_share_a_principals_access() {
    let w = Installations::start().await;
    // Blue first, then green.
    second_installation_is_refused(&w, &w.blue, "blue", &w.green).await;
    // Green first, then blue.
    second_installation_is_refused(&w, &w.green, "green", &w.blue).await;
    for t in [&w.blue, &w.green] {
        assert!(
            audit(t).iter().all(|e| e["event"] != "baseline_gone"),
            "nothing of one installation was ever recorded by the other"
        );
    }
}

impl Installations {
    fn entry_path(&self) -> String {
        format!(
            "/clusters/prod-cluster/access-entries/{}",
            encode_arn(ALICE)
        )
    }

    /// An admin, not Tollgate, gives Alice standing view in namespace `x`.
    async fn standing_view_on_x(&self) {
        let (status, body) = self
            .ms
            .eks_json(
                "POST",
                "/clusters/prod-cluster/access-entries",
                Some(serde_json::json!({"principalArn": ALICE, "type": "STANDARD"})),
            )
            .await;
        assert_eq!(status, 200, "CreateAccessEntry: {body}");
        let (status, body) = self
            .ms
            .eks_json(
                "POST",
                &format!("{}/access-policies", self.entry_path()),
                Some(serde_json::json!({
                    "policyArn": VIEW,
                    "accessScope": {"type": "namespace", "namespaces": ["x"]}
                })),
            )
            .await;
        assert_eq!(status, 200, "AssociateAccessPolicy: {body}");
    }

    /// Security-channel posts naming `needle`.
    fn security_posts(&self, needle: &str) -> usize {
        self.slack
            .calls_to("chat.postMessage")
            .iter()
            .filter(|c| c.params["channel"] == SECURITY && c.params.to_string().contains(needle))
            .count()
    }
}

/// Standing access (view in `x`, made by an admin before any grant) is
/// removed during Tollgate's grant — first the association, then, on a
/// second grant, the whole entry. The revoke does not put it back nor
/// create an entry for it: `baseline_gone` is audited and the security
/// channel told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standing_access_removed_during_a_grant_is_reported_not_restored() {
    let w = Installations::start().await;
    let blue = &w.blue;

    for whole_entry in [false, true] {
        w.standing_view_on_x().await;
        let id = w
            .granted_request(blue, "eks prod-cluster 30m view INC-3")
            .await;
        wait_until("granted", Duration::from_secs(15), || async {
            event(blue, "granted", &id).is_some()
        })
        .await;
        let assoc = w.associations().await;
        assert_eq!(assoc.len(), 1, "{assoc:?}");
        assert_eq!(assoc[0].1["type"], "cluster", "the union with the baseline");

        let removal = if whole_entry {
            w.entry_path()
        } else {
            format!("{}/access-policies/{}", w.entry_path(), encode_arn(VIEW))
        };
        let (status, body) = w.ms.eks_json("DELETE", &removal, None).await;
        assert_eq!(status, 200, "{removal}: {body}");

        let (ok, _, err) = cli(blue, &["grants", "revoke", &id, "--reason", "done"]);
        assert!(ok, "{err}");
        wait_until("revoked", Duration::from_secs(15), || async {
            event(blue, "revoked", &id).is_some()
        })
        .await;
        assert_eq!(
            event(blue, "revoked", &id).unwrap()["details"]["verified"],
            true
        );
        let gone = event(blue, "baseline_gone", &id)
            .unwrap_or_else(|| panic!("no baseline_gone for {id}: {:?}", audit(blue)));
        assert_eq!(gone["details"]["policy"], VIEW, "{gone}");
        assert_eq!(gone["details"]["scope"], "namespaces x", "{gone}");
        wait_until("security channel told", Duration::from_secs(10), || async {
            w.security_posts(&id) > 0
        })
        .await;

        // Reconcile passes later, nothing has come back.
        let before = w.passes(blue).await;
        wait_until(
            "two more reconcile passes",
            Duration::from_secs(15),
            || async { w.passes(blue).await >= before + 2 },
        )
        .await;
        assert_eq!(
            w.associations().await,
            Vec::new(),
            "standing access removed during the grant was put back"
        );
        assert_eq!(
            w.entry_exists().await,
            !whole_entry,
            "an entry was created only to restore a baseline, or the pre-existing one deleted"
        );
        if !whole_entry {
            let (status, body) = w.ms.eks_json("DELETE", &w.entry_path(), None).await;
            assert_eq!(status, 200, "{body}");
        }
    }
}

/// Spec 9.6: a baseline is forgotten only on a read taken after
/// Tollgate's own last write. The grant's AssociateAccessPolicy is held by
/// the EKS proxy past the converge limit: the step is cut off with the
/// call in flight, and the call lands later. Were the failed grant's
/// cleanup to read at once, it would see nothing, forget the "none"
/// baseline, and the late association on the pre-existing entry would be
/// nobody's — permanent. The principal is fenced for a lease term instead,
/// the cleanup reads after the call has landed, and removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_association_landing_after_the_cut_off_is_still_removed() {
    let mut w = Installations::start().await;
    let proxy = LyingEks::start(&w.ms.endpoint).await;
    // Claims of 3 s: a step limit of 2 s, a converge limit of 0.8 s.
    w.blue.set_env("TOLLGATE_CLAIM_TTL", Some("3s"));
    w.blue.set_env("TOLLGATE_RETRY_BASE", Some("100ms"));
    w.blue.set_env("AWS_ENDPOINT_URL", Some(&proxy.endpoint));
    w.blue.restart().await;
    // An entry made outside Tollgate, holding nothing: the failed grant's
    // cleanup never deletes it, so a late association would stay on it.
    let (status, body) =
        w.ms.eks_json(
            "POST",
            "/clusters/prod-cluster/access-entries",
            Some(serde_json::json!({"principalArn": ALICE, "type": "STANDARD"})),
        )
        .await;
    assert_eq!(status, 200, "CreateAccessEntry: {body}");
    proxy.hold_associations(Duration::from_secs(2));

    let blue = &w.blue;
    let id = w
        .granted_request(blue, "eks prod-cluster 30m view INC-4")
        .await;
    wait_until("grant cut off", Duration::from_secs(15), || async {
        event(blue, "grant_failed", &id).is_some()
    })
    .await;
    let failed = event(blue, "grant_failed", &id).unwrap();
    assert!(
        failed["details"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cut off")),
        "{failed}"
    );
    wait_until(
        "the held association lands",
        Duration::from_secs(10),
        || async { proxy.associations_landed() >= 1 },
    )
    .await;
    wait_until(
        "the late association removed by the cleanup",
        Duration::from_secs(20),
        || async { w.associations().await.is_empty() },
    )
    .await;
    wait_until(
        "the request ends failed",
        Duration::from_secs(15),
        || async {
            let (ok, out, _) = cli(blue, &["grants", "list", "--json"]);
            ok && !out.contains(&id)
        },
    )
    .await;
    let before = w.passes(blue).await;
    wait_until(
        "two more reconcile passes",
        Duration::from_secs(15),
        || async { w.passes(blue).await >= before + 2 },
    )
    .await;
    assert_eq!(
        w.associations().await,
        Vec::new(),
        "access outlived the failed grant"
    );
    assert!(w.entry_exists().await, "the pre-existing entry stays");
}
