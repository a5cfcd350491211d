//! The command line as an operator meets it: `check` against real peers, and
//! configuration or environment mistakes stopping `serve` with a clear line.

mod support;

use serde_json::json;
use std::process::{Command, Output};
use support::kube_rbac::Rbac;
use support::ministack::MiniStack;
use support::slack::SlackStandIn;
use support::tollgate::{BOT_TOKEN, SIGNING_SECRET};

fn tollgate(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

/// What a deployed Tollgate gets: AWS pointed at MiniStack, Slack secrets,
/// and the Web API stand-in.
fn peer_env(ms: &MiniStack, slack: &SlackStandIn) -> Vec<(String, String)> {
    let mut env = ms.aws_env();
    env.push(("SLACK_BOT_TOKEN".into(), BOT_TOKEN.into()));
    env.push(("SLACK_SIGNING_SECRET".into(), SIGNING_SECRET.into()));
    env.push(("SLACK_API_URL".into(), slack.api_url()));
    env
}

/// `tollgate check --config <path>` with the given environment.
async fn check(path: &std::path::Path, env: Vec<(String, String)>) -> Output {
    let path = path.display().to_string();
    tokio::task::spawn_blocking(move || tollgate(&["check", "--config", &path], &env))
        .await
        .unwrap()
}

const CHECK_CONFIG: &str = r#"
[server]
namespace = "access-gate"

[defaults]
sensitive_namespaces = ["*-prod"]

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[[clusters]]
name = "api-cluster"
region = "us-east-1"
account_id = "000000000000"
assume_role_arn = "arn:aws:iam::000000000000:role/tollgate"
approval_channel = "C0JOINED"
approvers = ["U0APP"]
default_role = "view"
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaces = ["team-*"]

[[clusters]]
name = "cm-cluster"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0OUTSIDE"
approvers = ["U0APP"]
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_peer_and_fails_on_config_map_clusters() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    ms.create_cluster("api-cluster").await;
    let (status, body) = ms
        .eks_json(
            "POST",
            "/clusters",
            Some(json!({"name": "cm-cluster", "roleArn": "arn:aws:iam::000000000000:role/eks-role",
                        "resourcesVpcConfig": {}, "accessConfig": {"authenticationMode": "CONFIG_MAP"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_channel("C0JOINED", true);
    slack.add_channel("C0OUTSIDE", false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, CHECK_CONFIG).unwrap();

    let out = check(&path, peer_env(&ms, &slack)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
            .to_string()
    };
    assert!(line("auth.test").starts_with("ok"), "{stdout}");
    assert!(line("C0JOINED").starts_with("ok"), "{stdout}");
    assert!(line("C0OUTSIDE").starts_with("FAIL"), "{stdout}");
    assert!(
        line("sts get-caller-identity").starts_with("ok"),
        "{stdout}"
    );
    assert!(
        line("cluster api-cluster").starts_with("ok"),
        "assumed role used: {stdout}"
    );
    let cm = line("cluster cm-cluster");
    assert!(
        cm.starts_with("FAIL") && cm.contains("CONFIG_MAP"),
        "{stdout}"
    );
    assert!(!stdout.contains(BOT_TOKEN) && !stdout.contains(SIGNING_SECRET));

    // Spec 9.7: the namespace rules, per cluster and role.
    assert!(
        line("note namespace access-gate").contains("never granted on any cluster"),
        "{stdout}"
    );
    let view = line("note cluster api-cluster role view:");
    assert!(
        view.contains("cluster-wide without --ns")
            && view.contains(
                "except access-gate and denied kube-system, kube-public, kube-node-lease"
            )
            && view.contains("sensitive *-prod"),
        "{stdout}"
    );
    let edit = line("note cluster api-cluster role edit:");
    assert!(
        edit.contains("only namespaces team-*") && edit.contains("never access-gate"),
        "{stdout}"
    );
}

#[test]
fn config_errors_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let text = CHECK_CONFIG.replace(
        "default_role = \"view\"",
        "default_role = \"view\"\nmax_duraton = \"2h\"",
    );
    std::fs::write(&path, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("max_duraton"))
        .unwrap()
        + 1;
    let out = tollgate(&["serve", "--config", &path.display().to_string()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("max_duraton") && stderr.contains(&format!("line {line}")),
        "{stderr}"
    );

    let out = tollgate(&["serve", "--config", "/nonexistent/tollgate.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tollgate.toml"));
}

#[test]
fn missing_secret_is_named_and_no_secret_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, CHECK_CONFIG).unwrap();
    let env = vec![(
        "SLACK_SIGNING_SECRET".to_string(),
        SIGNING_SECRET.to_string(),
    )];
    let out = tollgate(&["serve", "--config", &path.display().to_string()], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("SLACK_BOT_TOKEN is not set"), "{stderr}");
    assert!(!stderr.contains(SIGNING_SECRET), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reaches_kubernetes_clusters_and_warns_about_other_aws_auth_managers() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let kube = support::kube::KubeStandIn::start().await;
    kube.seed_configmap(
        "kube-system",
        json!({"metadata": {"name": "aws-auth", "namespace": "kube-system",
                            "labels": {"app.kubernetes.io/managed-by": "Helm"},
                            "annotations": {"meta.helm.sh/release-name": "cluster-bootstrap"}},
               "data": {"mapRoles": "[]"}}),
    );
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_channel("C0JOINED", true);
    let dir = tempfile::tempdir().unwrap();
    let ca = kube.write_ca(dir.path());
    let config = format!(
        r#"
[[clusters]]
name = "rbac-cluster"
region = "us-east-1"
account_id = "000000000000"
strategy = "session-rbac"
endpoint = "{endpoint}"
ca_file = "{ca}"
approval_channel = "C0JOINED"
[clusters.roles.debug]
cluster_role = "edit"

[[clusters]]
name = "auth-cluster"
region = "us-east-1"
account_id = "000000000000"
strategy = "aws-auth"
endpoint = "{endpoint}"
ca_file = "{ca}"
approval_channel = "C0JOINED"
[clusters.roles.debug]
groups = ["tollgate-debug"]
"#,
        endpoint = kube.endpoint(),
        ca = ca.display()
    );
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    let out = check(&path, peer_env(&ms, &slack)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok   cluster auth-cluster reachable"),
        "{stdout}"
    );
    // One SelfSubjectAccessReview line per permission the strategy uses,
    // answered from the shipped RBAC manifests.
    let may = |cluster: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("ok   cluster {cluster}: may ")))
            .count()
    };
    assert_eq!(may("rbac-cluster"), 11, "{stdout}");
    assert_eq!(may("auth-cluster"), 2, "{stdout}");
    for line in [
        "ok   cluster rbac-cluster: may update rolebindings.rbac.authorization.k8s.io in all namespaces",
        "ok   cluster rbac-cluster: may bind clusterroles.rbac.authorization.k8s.io \"edit\"",
        "ok   cluster auth-cluster: may update configmaps \"aws-auth\" in namespace kube-system",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line}\n{stdout}");
    }
    let warn = stdout
        .lines()
        .find(|l| l.starts_with("warn"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        warn.contains("auth-cluster") && warn.contains("app.kubernetes.io/managed-by=Helm"),
        "{warn}"
    );

    // A cluster whose RBAC lacks a verb Tollgate uses fails that line and
    // the whole check.
    let mut narrowed = Rbac::shipped();
    for rule in &mut narrowed.cluster {
        rule.verbs.retain(|v| v != "update");
    }
    kube.set_rbac(Some(narrowed));
    let out = check(&path, peer_env(&ms, &slack)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let refused: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(
        refused,
        [
            "FAIL cluster rbac-cluster: may not update rolebindings.rbac.authorization.k8s.io in all namespaces (apply manifests/rbac-session-rbac.yaml)",
            "FAIL cluster rbac-cluster: may not update clusterrolebindings.rbac.authorization.k8s.io (apply manifests/rbac-session-rbac.yaml)",
        ],
        "{stdout}"
    );

    // An unreachable Kubernetes API fails its line and the whole check.
    drop(kube);
    let out = check(&path, peer_env(&ms, &slack)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL cluster rbac-cluster")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_one_short_line_per_failure_and_the_whole_error_when_asked() {
    // Nothing answers: Slack, STS and every cluster fail, each with the
    // HTTP clients' and AWS SDK's error chains behind it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, CHECK_CONFIG).unwrap();
    let refused = "http://127.0.0.1:9";
    let env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", refused),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("SLACK_BOT_TOKEN", BOT_TOKEN),
        ("SLACK_SIGNING_SECRET", SIGNING_SECRET),
        ("SLACK_API_URL", "http://127.0.0.1:9/api"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let run = |verbose: bool| {
        let (path, env) = (path.display().to_string(), env.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["check", "--config", path.as_str()];
            if verbose {
                args.push("--verbose");
            }
            tollgate(&args, &env)
        })
    };
    let out = run(false).await.unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    // Slack (auth.test and two channels), STS, and each cluster.
    assert!(failed.len() >= 5, "{text}");
    for l in &failed {
        assert!(l.chars().count() <= 310, "one short line: {l}");
        assert!(
            !l.contains("Some(") && !l.contains("DispatchFailure("),
            "{l}"
        );
        assert!(l.contains("Connection refused"), "the cause is named: {l}");
    }
    let lines = text.lines().count();
    let clusters = 2;
    assert!(
        lines <= 8 + 4 * clusters,
        "a few lines per finding, {lines} in all:\n{text}"
    );

    let out = run(true).await.unwrap();
    let verbose = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        verbose.contains("DispatchFailure("),
        "--verbose keeps the whole error:\n{verbose}"
    );
}
