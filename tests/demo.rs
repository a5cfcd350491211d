//! A narrated walkthrough for newcomers: the real `tollgate` binary against
//! MiniStack (AWS) and the Slack stand-in, playing one request, approval,
//! grant and automatic revoke, and printing what each step left in Slack and
//! in EKS. Ignored by `cargo test`; `scripts/demo` runs it with output shown.

mod support;

use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};
use support::ministack::{encode_arn, MiniStack};
use support::sign::{action_body, post_signed, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{wait_until, Tollgate, BOT_TOKEN, SIGNING_SECRET};

const CLUSTER: &str = "prod-cluster";
const CHANNEL: &str = "C0APPROVALS";
const REQUESTER: &str = "U0REQ";
const APPROVER: &str = "U0APP";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";
const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
const COMMAND: &str = "eks prod-cluster 8s view demo INC-1";
const GRANT_SECS: u64 = 8;

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
assume_role_arn = "arn:aws:iam::000000000000:role/tollgate"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"

[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaced = true
"#;

const STANDING_ADMIN: &str = "arn:aws:iam::000000000000:role/platform-admin";
const STANDING_DEV: &str = "arn:aws:iam::000000000000:role/payments-dev";
const STANDING_NODE: &str = "arn:aws:iam::000000000000:role/eks-node";

/// Access someone set up by hand, outside Tollgate, for step 11 to find.
async fn seed_standing_access(ms: &MiniStack) {
    let entries = [
        (
            STANDING_ADMIN,
            "STANDARD",
            Some(("AmazonEKSClusterAdminPolicy", None)),
        ),
        (
            STANDING_DEV,
            "STANDARD",
            Some(("AmazonEKSEditPolicy", Some("payments"))),
        ),
        (STANDING_NODE, "EC2_LINUX", None),
    ];
    for (principal, kind, policy) in entries {
        let path = format!("/clusters/{CLUSTER}/access-entries");
        let body = serde_json::json!({"principalArn": principal, "type": kind});
        let (status, json) = ms.eks_json("POST", &path, Some(body)).await;
        assert_eq!(status, 200, "CreateAccessEntry: {json}");
        if let Some((policy, namespace)) = policy {
            let scope = match namespace {
                Some(ns) => serde_json::json!({"type": "namespace", "namespaces": [ns]}),
                None => serde_json::json!({"type": "cluster"}),
            };
            let body = serde_json::json!({
                "policyArn": format!("arn:aws:eks::aws:cluster-access-policy/{policy}"),
                "accessScope": scope,
            });
            let path = format!("{path}/{}/access-policies", encode_arn(principal));
            let (status, json) = ms.eks_json("POST", &path, Some(body)).await;
            assert_eq!(status, 200, "AssociateAccessPolicy: {json}");
        }
    }
}

/// Prints `text` indented under a step, one line per line.
fn show(text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        println!("      │ {line}");
    }
}

fn step(n: u32, what: &str) {
    println!("\n {n:>2}. {what}");
}

/// The text of a message's section blocks, or its plain text.
fn message_text(message: &Value) -> String {
    // Every section's text, in order: user-influenced text sits in its own
    // plain_text section beside the formatted one.
    let sections: Vec<&str> = message["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "section")
        .filter_map(|b| b["text"]["text"].as_str())
        .collect();
    if sections.is_empty() {
        message["text"].as_str().unwrap_or_default().to_string()
    } else {
        sections.join("\n")
    }
}

/// The text of a message's first context block (the card's status line).
fn context_text(message: &Value) -> String {
    message["blocks"]
        .as_array()
        .and_then(|blocks| blocks.iter().find(|b| b["type"] == "context"))
        .and_then(|b| b["elements"][0]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The stored messages Tollgate posted to `channel` (a DM is `D{user}`)
/// whose content contains `needle`.
fn posted(slack: &SlackStandIn, channel: &str, needle: &str) -> Vec<Value> {
    slack
        .calls_to("chat.postMessage")
        .iter()
        .filter(|c| c.response["channel"] == channel)
        .filter_map(|c| slack.message(channel, c.response["ts"].as_str()?))
        .filter(|m| m.to_string().contains(needle))
        .collect()
}

async fn access_entry(ms: &MiniStack) -> Option<Value> {
    let path = format!("/clusters/{CLUSTER}/access-entries/{}", encode_arn(ALICE));
    let (status, json) = ms.eks_json("GET", &path, None).await;
    match status {
        200 => Some(json["accessEntry"].clone()),
        404 => None,
        _ => panic!("DescribeAccessEntry answered {status}: {json}"),
    }
}

async fn associations(ms: &MiniStack) -> Vec<Value> {
    let path = format!(
        "/clusters/{CLUSTER}/access-entries/{}/access-policies",
        encode_arn(ALICE)
    );
    let (status, json) = ms.eks_json("GET", &path, None).await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "ListAssociatedAccessPolicies: {json}");
    json["associatedAccessPolicies"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a narrated walkthrough; run it with scripts/demo"]
async fn demo() {
    let started = Instant::now();
    support::install_crypto_provider();
    println!("\n=== Tollgate demo: one request, approval, grant and automatic revoke ===");

    step(1, "Starting the stand-ins and the real tollgate binary");
    let ms = MiniStack::start();
    ms.create_cluster(CLUSTER).await;
    seed_standing_access(&ms).await;
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(REQUESTER, "alice@example.com", "Europe/Berlin", 3600);
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let dir = tempfile::tempdir().unwrap();
    let tollgate = Tollgate::start(dir.path(), CONFIG, &slack.api_url(), &ms).await;
    assert!(access_entry(&ms).await.is_none(), "alice has no access yet");
    println!(
        "     MiniStack (AWS emulator) at {}, EKS cluster {CLUSTER} ACTIVE",
        ms.endpoint
    );
    println!(
        "     Slack stand-in at {}; tollgate serve at {}",
        slack.api_url(),
        tollgate.base
    );
    println!("     EKS: no access entry for {ALICE}");
    println!("     EKS: access entries made by hand long ago: {STANDING_ADMIN} (cluster admin), {STANDING_DEV} (edit in payments), {STANDING_NODE} (nodes)");

    step(2, &format!("alice (U0REQ) types: /access {COMMAND}"));
    let http = reqwest::Client::new();
    let body = slash_body(REQUESTER, COMMAND, &slack.response_url("slash"));
    let url = format!("{}/slack/commands", tollgate.base);
    let response = post_signed(&http, &url, SIGNING_SECRET, body).await;
    assert_eq!(response.status().as_u16(), 200);
    let receipt: Value = response.json().await.unwrap();
    assert_eq!(receipt["response_type"], "ephemeral", "{receipt}");
    let receipt = receipt["text"].as_str().unwrap_or_default().to_string();
    let at = receipt
        .find("R-")
        .unwrap_or_else(|| panic!("no request id in receipt: {receipt}"));
    let id = receipt[at..at + 7].to_string();
    println!("     Ephemeral receipt only alice sees:");
    show(&receipt);

    step(3, &format!("Tollgate posts an approval card to {CHANNEL}"));
    let card_id = id.clone();
    let call = slack
        .wait_for_call(
            "chat.postMessage",
            move |c| c.params["channel"] == CHANNEL && c.params.to_string().contains(&card_id),
            Duration::from_secs(10),
        )
        .await;
    let ts = call.response["ts"].as_str().unwrap_or_default().to_string();
    let card = slack.message(CHANNEL, &ts).expect("card stored");
    let card_text = message_text(&card);
    assert!(
        card_text.contains("associate AmazonEKSViewPolicy, cluster-wide, to arn:aws:iam::000000000000:role/alice on prod-cluster for 8s from approval"),
        "{card_text}"
    );
    assert!(card.to_string().contains("\"action_id\":\"approve\""));
    show(&card_text);
    show(&format!("{}   [Approve] [Deny]", context_text(&card)));
    assert!(access_entry(&ms).await.is_none(), "nothing before approval");
    println!("     EKS: still no access entry for alice");

    step(4, "The approver (U0APP) clicks Approve");
    let body = action_body(
        APPROVER,
        "approve",
        &id,
        CHANNEL,
        &ts,
        &slack.response_url("click"),
    );
    let url = format!("{}/slack/interactions", tollgate.base);
    let status = post_signed(&http, &url, SIGNING_SECRET, body)
        .await
        .status()
        .as_u16();
    assert_eq!(status, 200);
    println!("     Signed block_actions payload delivered; Tollgate answered HTTP {status}");

    step(
        5,
        "Tollgate grants the access in EKS; read back from MiniStack:",
    );
    wait_until(
        "AmazonEKSViewPolicy associated",
        Duration::from_secs(10),
        || {
            let ms = &ms;
            async move {
                associations(ms)
                    .await
                    .iter()
                    .any(|a| a["policyArn"] == VIEW)
            }
        },
    )
    .await;
    let granted_at = Instant::now();
    let entry = access_entry(&ms)
        .await
        .unwrap_or_else(|| panic!("no access entry:\n{}", tollgate.log()));
    let tags = &entry["tags"];
    assert_eq!(tags["managed-by"], "tollgate", "{entry}");
    assert_eq!(tags["tollgate-grant"], id.as_str(), "{entry}");
    println!(
        "     access entry  {}  type {}",
        entry["principalArn"].as_str().unwrap_or_default(),
        entry["type"].as_str().unwrap_or_default()
    );
    println!("     tags          {tags}");
    let assoc = associations(&ms).await;
    assert_eq!(assoc.len(), 1, "{assoc:?}");
    assert_eq!(assoc[0]["accessScope"]["type"], "cluster");
    println!(
        "     policy        {}",
        assoc[0]["policyArn"].as_str().unwrap_or_default()
    );
    println!("     scope         {}", assoc[0]["accessScope"]);
    wait_until("card updated", Duration::from_secs(5), || async {
        let card = slack.message(CHANNEL, &ts).unwrap_or_default();
        context_text(&card).contains("Access active") && !card.to_string().contains("\"approve\"")
    })
    .await;
    let card = slack.message(CHANNEL, &ts).unwrap_or_default();
    println!("     Card updated in place, buttons gone:");
    show(&context_text(&card));

    step(6, "alice gets a DM with how to connect:");
    let dm_channel = format!("D{REQUESTER}");
    wait_until("granted DM", Duration::from_secs(5), || async {
        !posted(&slack, &dm_channel, "update-kubeconfig").is_empty()
    })
    .await;
    let dm = message_text(&posted(&slack, &dm_channel, "update-kubeconfig")[0]);
    assert!(
        dm.contains("Europe/Berlin"),
        "expiry in her time zone: {dm}"
    );
    show(&dm.replace("```", ""));

    step(
        7,
        &format!("Waiting for the {GRANT_SECS}s to run out (nobody does anything)"),
    );
    let expected = granted_at + Duration::from_secs(GRANT_SECS);
    let mut next_tick = Instant::now();
    print!("     entry still in EKS, seconds left:");
    wait_until(
        "the access entry to disappear",
        Duration::from_secs(GRANT_SECS + 15),
        || {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
                let left = expected.saturating_duration_since(now).as_secs_f64();
                print!(" {left:.0}");
                std::io::stdout().flush().unwrap();
            }
            let ms = &ms;
            async move { access_entry(ms).await.is_none() }
        },
    )
    .await;
    println!(" … gone");
    let lived = granted_at.elapsed();
    assert!(
        lived >= Duration::from_millis(GRANT_SECS * 1000 - 500),
        "revoked too early: {lived:?}"
    );

    step(8, "Access entry gone from EKS");
    assert!(associations(&ms).await.is_empty());
    println!(
        "     GET access entry for alice: 404 ({:.1}s after it appeared)",
        lived.as_secs_f64()
    );

    step(9, "alice is told:");
    wait_until("expiry DM", Duration::from_secs(5), || async {
        !posted(&slack, &dm_channel, "has expired").is_empty()
    })
    .await;
    show(&message_text(
        &posted(&slack, &dm_channel, "has expired")[0],
    ));

    step(
        10,
        "The audit trail (tollgate audit export, via the admin socket):",
    );
    let config = tollgate.config_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "export", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["request_id"] == id.as_str())
        .collect();
    for e in &events {
        let ts = e["ts"].as_str().unwrap_or_default();
        println!(
            "     {}  {:<10} {}",
            ts.get(..23).unwrap_or(ts).replace('T', " "),
            e["event"].as_str().unwrap_or_default(),
            e["actor"].as_str().unwrap_or_default()
        );
    }
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        vec!["requested", "approval", "approved", "granted", "revoked"],
        "{stdout}"
    );
    assert_eq!(events[4]["details"]["reason"], "expiry", "{stdout}");

    step(
        11,
        "Who can still reach prod-cluster without Tollgate? (tollgate discover)",
    );
    let config = tollgate.config_path.clone();
    let env = ms.aws_env();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["discover", "--config"])
            .arg(&config)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(STANDING_ADMIN) && !stdout.contains(ALICE),
        "{stdout}"
    );
    show(&stdout);
    let metrics = http
        .get(format!("{}/metrics", tollgate.metrics_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    println!("     The same counts on /metrics, for a dashboard to watch fall:");
    show(
        &metrics
            .lines()
            .filter(|l| l.starts_with("tollgate_standing_access{"))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    println!(
        "\n=== Done in {:.1}s: requested, approved, granted, revoked on time. ===\n",
        started.elapsed().as_secs_f64()
    );
}
