//! Standing-access discovery: `tollgate discover` as a process against
//! MiniStack and the Kubernetes stand-in, next to a running server and
//! without one, and the `tollgate_standing_access` gauge it must agree with.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::kube::KubeStandIn;
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, request_id, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";
const ADMIN: &str = "arn:aws:iam::000000000000:role/platform-admin";
const DEV: &str = "arn:aws:iam::000000000000:role/payments-dev";
const NODE: &str = "arn:aws:iam::000000000000:role/eks-node";
const FORGED: &str = "arn:aws:iam::000000000000:role/mallory";
const ROOT: &str = "arn:aws:iam::000000000000:root";
const POLICY: &str = "arn:aws:eks::aws:cluster-access-policy/";

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
approval_timeout = "10m"
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

/// Creates an access entry behind Tollgate's back, with `policies` as
/// (policy name, namespaces) — no namespaces means cluster scope.
async fn seed_entry(
    ms: &MiniStack,
    cluster: &str,
    principal: &str,
    kind: &str,
    tags: Value,
    policies: &[(&str, &[&str])],
) {
    let (status, answer) = ms
        .eks_json(
            "POST",
            &format!("/clusters/{cluster}/access-entries"),
            Some(json!({"principalArn": principal, "type": kind, "tags": tags})),
        )
        .await;
    assert_eq!(status, 200, "CreateAccessEntry {principal}: {answer}");
    for (policy, namespaces) in policies {
        let scope = if namespaces.is_empty() {
            json!({"type": "cluster"})
        } else {
            json!({"type": "namespace", "namespaces": namespaces})
        };
        let (status, answer) = ms
            .eks_json(
                "POST",
                &format!(
                    "/clusters/{cluster}/access-entries/{}/access-policies",
                    encode_arn(principal)
                ),
                Some(json!({"policyArn": format!("{POLICY}{policy}"), "accessScope": scope})),
            )
            .await;
        assert_eq!(status, 200, "AssociateAccessPolicy {policy}: {answer}");
    }
}

/// `tollgate discover <args> --config <config>` as an operator runs it:
/// (exit code, stdout, stderr).
async fn discover(ms: &MiniStack, config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("discover")
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(ms.aws_env());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn find<'a>(lines: &'a [Value], principal: &str) -> Option<&'a Value> {
    lines.iter().find(|l| l["principal"] == principal)
}

/// `tollgate_standing_access{cluster=…,level=…}` from a /metrics body.
fn gauge(metrics: &str, cluster: &str, level: &str) -> Option<u64> {
    let prefix = format!("tollgate_standing_access{{cluster=\"{cluster}\",level=\"{level}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_lists_standing_entries_not_tollgates_and_the_gauge_agrees() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster(CLUSTER).await;
    seed_entry(
        &ms,
        CLUSTER,
        ADMIN,
        "STANDARD",
        json!({}),
        &[("AmazonEKSClusterAdminPolicy", &[])],
    )
    .await;
    seed_entry(
        &ms,
        CLUSTER,
        DEV,
        "STANDARD",
        json!({}),
        &[("AmazonEKSEditPolicy", &["payments"])],
    )
    .await;
    seed_entry(&ms, CLUSTER, NODE, "EC2_LINUX", json!({}), &[]).await;
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let dir = tempfile::tempdir().unwrap();
    let tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
    let http = reqwest::Client::new();

    // A grant through Tollgate: its entry is Tollgate's, never standing.
    let body = slash_body(
        REQUESTER,
        "eks prod-cluster 30m view INC-1",
        &slack.response_url("cmd"),
    );
    let resp = post_signed(
        &http,
        &format!("{}/slack/commands", tollgate.base),
        SIGNING_SECRET,
        body,
    )
    .await;
    let receipt: Value = resp.json().await.unwrap();
    let id = request_id(receipt["text"].as_str().unwrap_or_default());
    let ts = slack.card_ts(CHANNEL, &id, Duration::from_secs(10)).await;
    let click = action_body(
        APPROVER,
        "approve",
        &id,
        CHANNEL,
        &ts,
        &slack.response_url("click"),
    );
    post_signed(
        &http,
        &format!("{}/slack/interactions", tollgate.base),
        SIGNING_SECRET,
        click,
    )
    .await;
    wait_until("alice's entry", Duration::from_secs(15), || async {
        let path = format!("/clusters/{CLUSTER}/access-entries/{}", encode_arn(ALICE));
        ms.eks_json("GET", &path, None).await.0 == 200
    })
    .await;

    // With the server running: the store is asked through its admin socket.
    let (code, out, err) = discover(&ms, &tollgate.config_path, &["--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}\n{}", tollgate.log());
    let lines = json_lines(&out);
    let admin = find(&lines, ADMIN).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(admin["level"], "cluster-admin");
    assert_eq!(admin["type"], "STANDARD");
    assert_eq!(admin["source"], "access-entry");
    assert_eq!(admin["cluster"], CLUSTER);
    assert_eq!(
        admin["policies"][0]["policy"],
        format!("{POLICY}AmazonEKSClusterAdminPolicy")
    );
    assert_eq!(admin["policies"][0]["scope"], "cluster");
    let dev = find(&lines, DEV).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(dev["level"], "edit");
    assert_eq!(dev["policies"][0]["scope"], "namespace");
    assert_eq!(dev["policies"][0]["namespaces"], json!(["payments"]));
    let node = find(&lines, NODE).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(node["type"], "EC2_LINUX");
    assert_eq!(node["level"], "custom");
    assert!(
        find(&lines, ALICE).is_none(),
        "Tollgate's own grant listed:\n{out}"
    );
    // The cluster creator's entry MiniStack (like EKS) makes is standing too.
    let root = find(&lines, ROOT).map(|l| l["level"].clone());
    let summary = lines.last().unwrap();
    assert_eq!(summary["cluster"], CLUSTER);
    let expected_admins = 1 + u64::from(root == Some(json!("cluster-admin")));
    assert_eq!(
        summary["summary"]["cluster-admin"], expected_admins,
        "{out}"
    );
    assert_eq!(summary["summary"]["edit"], 1);
    assert_eq!(summary["total"], lines.len() - 1);

    // The text form: the same grants, by level, then the summary.
    let (code, text, err) = discover(&ms, &tollgate.config_path, &["--cluster", CLUSTER]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = text.lines().skip(1).take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), lines.len() - 1, "{text}");
    assert!(rows[0].starts_with("cluster-admin"), "{text}");
    let dev_row = rows.iter().find(|r| r.contains(DEV)).unwrap();
    assert!(
        dev_row.starts_with("edit") && dev_row.contains("AmazonEKSEditPolicy(namespace: payments)"),
        "{text}"
    );
    assert!(!text.contains(ALICE), "{text}");
    assert!(
        text.contains(&format!(
            "{CLUSTER}: {} standing (cluster-admin {expected_admins}, ",
            rows.len()
        )),
        "{text}"
    );

    // The gauge, refreshed by the reconcile loop at start, says the same.
    let metrics_url = format!("{}/metrics", tollgate.metrics_base);
    let fetch = || async {
        http.get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    wait_until("standing access gauge", Duration::from_secs(15), || async {
        gauge(&fetch().await, CLUSTER, "custom").is_some()
    })
    .await;
    let metrics = fetch().await;
    for level in ["cluster-admin", "admin", "edit", "view", "custom"] {
        assert_eq!(
            gauge(&metrics, CLUSTER, level),
            summary["summary"][level].as_u64(),
            "{level}: {metrics}"
        );
    }

    let (code, _, err) = discover(&ms, &tollgate.config_path, &["--cluster", "nope"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("no cluster `nope`") && err.contains(CLUSTER),
        "{err}"
    );
}

/// The Kubernetes side: aws-auth items and bindings.
fn seed_kubernetes(kube: &KubeStandIn) {
    kube.seed_configmap(
        "kube-system",
        json!({"metadata": {"name": "aws-auth", "namespace": "kube-system"},
               "data": {"mapRoles": "- rolearn: arn:aws:iam::000000000000:role/eks-node\n  username: system:node:{{EC2PrivateDNSName}}\n  groups:\n    - system:bootstrappers\n    - system:nodes\n- rolearn: arn:aws:iam::000000000000:role/Admin\n  username: admin\n  groups:\n    - system:masters\n- rolearn: arn:aws:iam::000000000000:role/bob\n  username: tollgate:bob@example.com\n  groups:\n    - tollgate-debug\n"}}),
    );
    let crb = |name: &str, role: &str, kind: &str, subject: &str, labels: Value| {
        json!({"metadata": {"name": name, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}]})
    };
    kube.seed_clusterrolebinding(crb(
        "cluster-admin",
        "cluster-admin",
        "Group",
        "system:masters",
        json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
    ));
    kube.seed_clusterrolebinding(crb(
        "system:node-proxier",
        "system:node-proxier",
        "User",
        "system:kube-proxy",
        json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
    ));
    kube.seed_clusterrolebinding(crb(
        "platform-admins",
        "cluster-admin",
        "Group",
        "platform",
        json!({}),
    ));
    kube.seed_clusterrolebinding(crb("carol-view", "view", "User", "carol", json!({})));
    kube.seed_clusterrolebinding(crb(
        "tollgate-r-kb001",
        "edit",
        "User",
        "tollgate:dana@example.com",
        json!({"app.kubernetes.io/managed-by": "tollgate", "tollgate.dev/grant": "R-KB001"}),
    ));
    kube.seed_rolebinding(
        "payments",
        json!({"metadata": {"name": "erin-edit", "namespace": "payments"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "erin"}]}),
    );
}

fn policy(
    name: &str,
    strategy: tollgate::domain::policy::Strategy,
    kube: &KubeStandIn,
    ca: &Path,
) -> tollgate::domain::policy::ClusterPolicy {
    let toml = format!(
        r#"
[[clusters]]
name = "{name}"
region = "us-east-1"
account_id = "000000000000"
strategy = "{strategy}"
endpoint = "{endpoint}"
ca_file = "{ca}"
approval_channel = "C0"
[clusters.roles.debug]
cluster_role = "edit"
"#,
        strategy = strategy.name(),
        endpoint = kube.endpoint(),
        ca = ca.display()
    );
    tollgate::config::Config::parse(&toml, "t.toml")
        .unwrap_or_else(|e| panic!("{e}"))
        .clusters
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_bindings_and_aws_auth_are_listed_but_not_tollgates_or_the_platforms() {
    use tollgate::access::standing::ClusterReader;
    use tollgate::domain::standing::GrantRecord;
    use tollgate::service::standing::{classify_all, read_clusters};

    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster("dev").await;
    let kube = KubeStandIn::start().await;
    kube.use_real_clock();
    seed_kubernetes(&kube);
    let dir = tempfile::tempdir().unwrap();
    let ca = kube.write_ca(dir.path());
    let env: std::collections::HashMap<String, String> = ms.aws_env().into_iter().collect();
    let sdk = tollgate::access::aws::load_base_config()
        .await
        .to_builder()
        .endpoint_url(&env["AWS_ENDPOINT_URL"])
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("test", "test", None, None, "test"),
            ),
        )
        .build();
    let clients = Arc::new(tollgate::access::AwsClients::new(sdk));
    let kube_clients = Arc::new(tollgate::access::kube::KubeClients::new(
        clients.clone(),
        Arc::new(tollgate::clock::SystemClock),
    ));
    let reader = ClusterReader::new(clients, kube_clients);
    let cluster = policy(
        "dev",
        tollgate::domain::policy::Strategy::SessionRbac,
        &kube,
        &ca,
    );
    // What the store says: dana's binding and bob's aws-auth item are
    // Tollgate's grants.
    let record = |id: &str, principal: &str, user: &str, role: Option<&str>| {
        let access = tollgate::domain::request::AccessSpec {
            cluster: "dev".into(),
            role: "debug".into(),
            principal: principal.into(),
            policy_arn: None,
            namespaces: Vec::new(),
            cluster_role: role.map(str::to_string),
            groups: Vec::new(),
            k8s_user: Some(user.into()),
            strategy: None,
        };
        GrantRecord {
            id: id.into(),
            cluster: "dev".into(),
            principal: principal.into(),
            k8s_user: Some(user.into()),
            intents: tollgate::domain::grant::intents_for(cluster.strategy, id, &access),
            activated: true,
            holds_access: true,
            access: Some(access),
        }
    };
    let records = [
        record(
            "R-KB001",
            "tollgate:dana@example.com",
            "tollgate:dana@example.com",
            Some("edit"),
        ),
        record(
            "R-KB002",
            "arn:aws:iam::000000000000:role/bob",
            "tollgate:bob@example.com",
            None,
        ),
    ];
    let readings = read_clusters(&reader, std::slice::from_ref(&cluster)).await;
    let standing = classify_all(readings, &records);
    let grants = standing[0]
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, &str, &str)> = grants
        .iter()
        .filter(|g| g.source != "access-entry")
        .map(|g| (g.level.label(), g.source, g.principal.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("cluster-admin", "ClusterRoleBinding", "platform"),
            (
                "cluster-admin",
                "aws-auth",
                "arn:aws:iam::000000000000:role/Admin"
            ),
            ("edit", "RoleBinding", "erin"),
            ("view", "ClusterRoleBinding", "carol"),
        ]
    );
    let erin = grants.iter().find(|g| g.principal == "erin").unwrap();
    assert_eq!(erin.namespace.as_deref(), Some("payments"));
    assert_eq!(erin.cluster_role.as_deref(), Some("edit"));
    let admin = grants.iter().find(|g| g.source == "aws-auth").unwrap();
    assert_eq!(
        (admin.kind.as_str(), admin.username.as_deref()),
        ("mapRoles", Some("admin"))
    );

    // Without the store's word, the marks alone hide nothing.
    let readings = read_clusters(&reader, std::slice::from_ref(&cluster)).await;
    let standing = classify_all(readings, &[]);
    let all = standing[0].result.as_ref().unwrap();
    assert!(all
        .iter()
        .any(|g| g.principal == "tollgate:dana@example.com"));
    assert!(all
        .iter()
        .any(|g| g.username.as_deref() == Some("tollgate:bob@example.com")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_reported_and_the_others_listed() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster(CLUSTER).await;
    ms.create_cluster("dev").await;
    seed_entry(
        &ms,
        CLUSTER,
        ADMIN,
        "STANDARD",
        json!({}),
        &[("AmazonEKSClusterAdminPolicy", &[])],
    )
    .await;
    // Tollgate's tags on an entry its store never made: the tags are no
    // proof, so the entry is standing access like any other.
    seed_entry(
        &ms,
        CLUSTER,
        FORGED,
        "STANDARD",
        json!({"managed-by": "tollgate", "tollgate-grant": "R-FAKE1"}),
        &[("AmazonEKSClusterAdminPolicy", &[])],
    )
    .await;

    let kube = KubeStandIn::start().await;
    kube.use_real_clock();
    seed_kubernetes(&kube);
    let dir = tempfile::tempdir().unwrap();
    let ca = kube.write_ca(dir.path());
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        r#"{CONFIG}
[[clusters]]
name = "dev"
region = "us-east-1"
account_id = "000000000000"
strategy = "session-rbac"
endpoint = "{endpoint}"
ca_file = "{ca}"
approval_channel = "C0APPROVALS"
[clusters.roles.debug]
cluster_role = "edit"

[[clusters]]
name = "gone"
region = "us-east-1"
account_id = "000000000000"
strategy = "aws-auth"
endpoint = "https://{closed}"
ca_file = "{ca}"
approval_channel = "C0APPROVALS"
[clusters.roles.debug]
groups = ["tollgate-debug"]
"#,
        endpoint = kube.endpoint(),
        ca = ca.display(),
    )
    .replace("{listen}", "127.0.0.1:0")
    .replace("{data}", &dir.path().join("data").display().to_string());
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).unwrap();

    // No server runs: the store is opened directly.
    let (code, out, err) = discover(&ms, &path, &[]).await;
    assert_eq!(code, 3, "partial:\n{out}\n{err}");
    assert!(out.contains(ADMIN) && out.contains("carol"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{CLUSTER}: ")) && l.contains("standing")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("dev: ") && l.contains("standing")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("gone: cannot be read")),
        "{out}"
    );
    assert!(err.contains("cluster gone cannot be read"), "{err}");

    let (code, out, _) = discover(&ms, &path, &["--json"]).await;
    assert_eq!(code, 3);
    let lines = json_lines(&out);
    let gone = lines.iter().find(|l| l["cluster"] == "gone").unwrap();
    assert!(gone["error"].is_string(), "{gone}");
    assert!(lines
        .iter()
        .any(|l| l["cluster"] == "dev" && l["principal"] == "carol"));
    assert_eq!(
        find(&lines, FORGED).map(|l| &l["level"]),
        Some(&json!("cluster-admin")),
        "a forged tag hides nothing:\n{out}"
    );

    let (code, _, _) = discover(&ms, &path, &["--cluster", "gone"]).await;
    assert_eq!(code, 1, "nothing readable");
}

/// `tollgate <args> --config <config>` with MiniStack's credentials:
/// (success, stdout, stderr).
async fn cli(ms: &MiniStack, config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .envs(ms.aws_env());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 21: a mark naming a request of this store hides nothing that
/// request did not make. alice's entry is tagged with her own denied
/// request, bob's with his own grant that has ended; each holds a
/// hand-made AmazonEKSClusterAdminPolicy association. Both are listed by
/// `tollgate discover` at cluster-admin, counted in the
/// `tollgate_standing_access` gauge, and reported `foreign` by the
/// reconciler (audit and `tollgate_foreign_objects`); neither is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_entry_naming_a_denied_or_ended_request_is_standing_and_foreign() {
    const BOB_USER: &str = "U0BOB";
    const BOB: &str = "arn:aws:iam::000000000000:role/bob";
    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster(CLUSTER).await;
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(REQUESTER, "alice@example.com", "UTC", 0);
    slack.add_user(BOB_USER, "bob@example.com", "UTC", 0);
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let dir = tempfile::tempdir().unwrap();
    let mut tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
    let http = reqwest::Client::new();
    let decide = |user: &'static str, text: &'static str, action: &'static str| {
        let (http, slack, base) = (&http, &slack, tollgate.base.clone());
        async move {
            let body = slash_body(user, text, &slack.response_url("cmd"));
            let resp = post_signed(
                http,
                &format!("{base}/slack/commands"),
                SIGNING_SECRET,
                body,
            )
            .await;
            let receipt: Value = resp.json().await.unwrap();
            let id = request_id(receipt["text"].as_str().unwrap_or_default());
            let ts = slack.card_ts(CHANNEL, &id, Duration::from_secs(10)).await;
            let click = action_body(
                APPROVER,
                action,
                &id,
                CHANNEL,
                &ts,
                &slack.response_url("click"),
            );
            post_signed(
                http,
                &format!("{base}/slack/interactions"),
                SIGNING_SECRET,
                click,
            )
            .await;
            id
        }
    };
    let audit = |config: std::path::PathBuf| {
        let ms = &ms;
        async move {
            let (ok, out, err) = cli(ms, &config, &["audit", "export"]).await;
            assert!(ok, "{err}");
            out.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let config = tollgate.config_path.clone();
    let denied = decide(REQUESTER, "eks prod-cluster 30m view INC-1", "deny").await;
    let ended = decide(BOB_USER, "eks prod-cluster 2s view INC-2", "approve").await;
    wait_until("denied and revoked", Duration::from_secs(30), || async {
        let events = audit(config.clone()).await;
        let has = |event: &str, id: &str| {
            events
                .iter()
                .any(|e| e["event"] == event && e["request_id"] == id)
        };
        has("denied", &denied) && has("revoked", &ended)
    })
    .await;

    // Made behind Tollgate's back while it is down, so the first pass of
    // the next start (which reads every object's marks) finds them.
    tollgate.kill9();
    let marks = |id: &str| json!({"managed-by": "tollgate", "tollgate-grant": id, "tollgate-instance": "tollgate"});
    let admin = [("AmazonEKSClusterAdminPolicy", &[][..])];
    seed_entry(&ms, CLUSTER, ALICE, "STANDARD", marks(&denied), &admin).await;
    seed_entry(&ms, CLUSTER, BOB, "STANDARD", marks(&ended), &admin).await;
    tollgate.start_again().await;

    let (code, out, err) = discover(&ms, &tollgate.config_path, &["--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let lines = json_lines(&out);
    for principal in [ALICE, BOB] {
        let line = find(&lines, principal).unwrap_or_else(|| panic!("{principal} hidden:\n{out}"));
        assert_eq!(line["level"], "cluster-admin", "{line}");
        assert_eq!(
            line["policies"][0]["policy"],
            format!("{POLICY}AmazonEKSClusterAdminPolicy")
        );
    }
    let metrics_url = format!("{}/metrics", tollgate.metrics_base);
    let fetch = || async {
        http.get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let foreign_gauge = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_foreign_objects "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    wait_until("foreign reported", Duration::from_secs(30), || async {
        let events = audit(config.clone()).await;
        [ALICE, BOB].iter().all(|p| {
            events
                .iter()
                .any(|e| e["event"] == "foreign" && e["principal"] == *p)
        }) && gauge(&fetch().await, CLUSTER, "cluster-admin").is_some()
    })
    .await;
    let events = audit(config.clone()).await;
    for (principal, id) in [(ALICE, &denied), (BOB, &ended)] {
        let found: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "foreign" && e["principal"] == principal)
            .collect();
        assert_eq!(found.len(), 1, "{principal}: {found:?}");
        assert_eq!(found[0]["request_id"], **id);
    }
    let bob_foreign = events
        .iter()
        .find(|e| e["event"] == "foreign" && e["principal"] == BOB)
        .unwrap();
    assert!(
        bob_foreign["details"]["beyond"]
            .as_str()
            .is_some_and(|b| b.contains("AmazonEKSClusterAdminPolicy")),
        "{bob_foreign}"
    );
    assert_eq!(foreign_gauge(&fetch().await), Some(2));
    assert!(
        !events.iter().any(|e| e["event"] == "reconciled"),
        "nothing of the standing access removed"
    );

    let summary = lines.last().unwrap();
    let admins = summary["summary"]["cluster-admin"].as_u64().unwrap();
    assert!(admins >= 2, "{out}");
    assert_eq!(
        gauge(&fetch().await, CLUSTER, "cluster-admin"),
        Some(admins)
    );
}
