//! Tollgate's benchmark suite: ack latency, store throughput, scale,
//! expiry storm, and grant/revoke against MiniStack, each beside a baseline
//! measured in the same run.
//!
//! `scripts/bench` (`cargo bench --bench bench`) runs the full counts and
//! prints the table. Run by `cargo test` (no `--bench` argument) or with
//! `--smoke`, the same code paths run with tiny counts and every figure
//! asserts what must hold (every request answered, every grant revoked), so
//! the suite cannot rot unnoticed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_eks::types::{AccessScope, AccessScopeType};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use time::OffsetDateTime;

use support::aws_proxy::{AwsProxy, Counts as AwsCounts};
use support::ministack::MiniStack;
use support::sign::{action_body, post_signed, slash_body};
use support::slack::SlackStandIn;
use support::tollgate::{BOT_TOKEN, SIGNING_SECRET};
use tollgate::domain::audit::AuditEvent;
use tollgate::domain::lifecycle;
use tollgate::domain::readback::Verified;
use tollgate::domain::request::{AccessSpec, Asked, Request, RequestId, Requester};
use tollgate::store::{SledStore, Store};

const CLUSTER: &str = "bench-cluster";
const CHANNEL: &str = "C0APPROVALS";
const APPROVER: &str = "U0APP";
const STORM_USER: &str = "U0STORM";
const VIEW_POLICY: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";

const CONFIG: &str = r#"
[server]
listen = "{listen}"
metrics_listen = "{metrics}"

[store]
path = "{data}"

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[defaults]
min_duration = "1s"
max_duration = "8h"
default_duration = "1h"
approval_timeout = "1h"
# Every user leaves each acknowledged request pending.
max_pending_per_user = 100000

[[clusters]]
name = "bench-cluster"
region = "us-east-1"
account_id = "000000000000"
assume_role_arn = "arn:aws:iam::000000000000:role/tollgate"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

/// Messages Slack lets through at once in one channel before its one a
/// second applies (Slack documents "short bursts" without a number).
const SLACK_BURST: u32 = 3;

/// How many of everything; the smoke counts only prove the paths work.
struct Counts {
    smoke: bool,
    ack_concurrent: usize,
    ack_rounds: usize,
    store_single: usize,
    store_per_writer: usize,
    scale_grants: usize,
    scale_active: usize,
    storm: usize,
    isolated: usize,
    e2e_grants: usize,
    revoke_grants: usize,
    revoke_duration_secs: u64,
    /// Figures 7 and 9: ended requests in the store.
    history: usize,
    /// Figure 7: grant + revoke cycles per condition.
    cycles: usize,
    /// Figure 7, end to end: ended requests in the store of the real
    /// binary, and revokes timed per backend and condition.
    revoke_history: usize,
    revoke_cycles: usize,
    /// How long each of those grants lasts.
    revoke_life: Duration,
    /// Figure 9: `/metrics` scrapes per condition.
    scrapes: usize,
    /// Figure 8: access entries in the cluster, how many carry Tollgate's
    /// marks, how many of those are live grants.
    reconcile_entries: usize,
    reconcile_marked: usize,
    reconcile_active: usize,
    /// Figure 10: requests, and the approval channels they go to.
    cards: usize,
    card_channels: usize,
    /// Figure 12: stalled connections, valid commands among them, and the
    /// listener's `max_connections` (the default in the full run).
    flood: usize,
    flood_valid: usize,
    flood_cap: usize,
    /// Figure 11: first-time requesters, the seconds they arrive within,
    /// the `users.info` bucket (Slack's Tier 4: 100; refilled at Tier 4's
    /// 100 a minute either way) and the factor the channel's one message a
    /// second is sped up by (1 = Slack's own).
    incident: usize,
    incident_spread: Duration,
    incident_bucket: u32,
    incident_speedup: f64,
    /// Figure 13: `/access clusters` commands, the time they are spread
    /// over, the `usergroups.users.list` bucket (Tier 2: 20) and speed-up.
    spam: usize,
    spam_spread: Duration,
    spam_bucket: u32,
    spam_speedup: f64,
}

impl Counts {
    fn full() -> Counts {
        Counts {
            smoke: false,
            ack_concurrent: 200,
            ack_rounds: 5,
            store_single: 2_000,
            store_per_writer: 250,
            scale_grants: 101_000,
            scale_active: 1_000,
            storm: 10_000,
            isolated: 20,
            e2e_grants: 20,
            revoke_grants: 50,
            revoke_duration_secs: 20,
            history: 100_000,
            cycles: 100,
            revoke_history: 10_000,
            revoke_cycles: 6,
            revoke_life: Duration::from_secs(2),
            scrapes: 200,
            reconcile_entries: 500,
            reconcile_marked: 100,
            reconcile_active: 20,
            cards: 200,
            card_channels: 10,
            flood: 3_000,
            flood_valid: 50,
            flood_cap: 512,
            incident: 150,
            incident_spread: Duration::from_secs(5),
            incident_bucket: 100,
            incident_speedup: 1.0,
            spam: 30,
            spam_spread: Duration::from_secs(30),
            spam_bucket: 20,
            spam_speedup: 1.0,
        }
    }

    fn smoke() -> Counts {
        Counts {
            smoke: true,
            ack_concurrent: 20,
            ack_rounds: 1,
            store_single: 20,
            store_per_writer: 2,
            scale_grants: 500,
            scale_active: 20,
            storm: 200,
            isolated: 3,
            e2e_grants: 2,
            revoke_grants: 3,
            revoke_duration_secs: 4,
            history: 300,
            cycles: 5,
            revoke_history: 300,
            revoke_cycles: 1,
            revoke_life: Duration::from_secs(1),
            scrapes: 10,
            reconcile_entries: 30,
            reconcile_marked: 10,
            reconcile_active: 3,
            cards: 20,
            card_channels: 4,
            flood: 200,
            flood_valid: 5,
            flood_cap: 64,
            // A tenth of the people, a tenth of the bucket (so a third of
            // them still wait for users.info, at Slack's own refill); the
            // channel four times Slack's so the cards take seconds.
            incident: 15,
            incident_spread: Duration::from_secs(1),
            incident_bucket: 10,
            incident_speedup: 4.0,
            // A third of the commands in a fifteenth of the time: the bucket
            // a third, the refill five times Slack's, so each command still
            // meets about the same number of tokens as in the full run.
            spam: 10,
            spam_spread: Duration::from_secs(2),
            spam_bucket: 7,
            spam_speedup: 5.0,
        }
    }
}

/// One line of the printed table.
struct Row {
    figure: &'static str,
    measure: String,
    tollgate: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(figure: &'static str, measure: impl Into<String>, tollgate: impl Into<String>) -> Row {
        Row {
            figure,
            measure: measure.into(),
            tollgate: tollgate.into(),
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        }
    }
    fn baseline(mut self, b: impl Into<String>) -> Row {
        self.baseline = b.into();
        self
    }
    fn ratio(mut self, r: f64) -> Row {
        self.ratio = format!("{r:.2}");
        self
    }
    fn target(mut self, t: impl Into<String>, met: bool) -> Row {
        self.target = t.into();
        self.met = Some(met);
        self
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|e| panic!("histogram: {e}"))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn fmt_ms(us: u64) -> String {
    format!("{:.2} ms", ms(us))
}

/// p50 / p99 / max of a histogram in microseconds.
fn pcts(h: &Histogram<u64>) -> (u64, u64, u64) {
    (
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.99),
        h.max(),
    )
}

fn fmt_pcts(h: &Histogram<u64>) -> String {
    let (p50, p99, max) = pcts(h);
    format!("{:.2} / {:.2} / {:.2} ms", ms(p50), ms(p99), ms(max))
}

// ---------------------------------------------------------------------------
// Building requests the way the service stores them.

/// Distinct request ids from a counter, in the id alphabet.
fn id_for(n: usize) -> RequestId {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut body = String::new();
    let mut v = n;
    for _ in 0..5 {
        body.insert(0, ALPHABET[v % 32] as char);
        v /= 32;
    }
    RequestId::parse(&body).unwrap_or_else(|| panic!("id {n}"))
}

fn pending(n: usize, principal: &str, now: OffsetDateTime) -> Request {
    let mut r = Request::pending(
        Asked {
            id: id_for(n),
            requester: Requester {
                user_id: STORM_USER.into(),
                email: "storm@example.com".into(),
                tz: Some("UTC".into()),
                tz_offset_secs: 0,
            },
            access: AccessSpec {
                cluster: CLUSTER.into(),
                role: "view".into(),
                principal: principal.into(),
                policy_arn: Some(VIEW_POLICY.into()),
                namespaces: vec![],
                cluster_role: None,
                groups: vec![],
                k8s_user: None,
                strategy: None,
            },
            reason: "benchmark".into(),
            duration: Duration::from_secs(3600),
            approval_timeout: Duration::from_secs(3600),
            required_approvals: 1,
            response_url: None,
        },
        now,
    );
    // Every benchmarked server runs `serve --dry-run`, which acts only on
    // (and starts only on a store of) rows of its own mode.
    r.dry_run = true;
    r
}

// Each step is the service's own (`domain::lifecycle`), so a stored row
// looks exactly like one the server wrote.
fn approved(r: &Request, now: OffsetDateTime) -> Request {
    lifecycle::approve(r, APPROVER, now)
        .unwrap_or_else(|e| panic!("approve: {e}"))
        .row
}

fn active(r: &Request, now: OffsetDateTime, expires_at: OffsetDateTime) -> Request {
    let made = lifecycle::GrantMade {
        activated_at: expires_at - r.duration,
        reminder_before: None,
        grant_ms: 0,
    };
    lifecycle::granted(r, &made, now)
        .unwrap_or_else(|e| panic!("grant: {e}"))
        .row
}

fn revoked(r: &Request, now: OffsetDateTime) -> Request {
    lifecycle::revoked(r, Verified::At(now), now)
        .unwrap_or_else(|e| panic!("revoke: {e}"))
        .row
}

fn event(r: &Request, name: &str, now: OffsetDateTime) -> Vec<AuditEvent> {
    vec![AuditEvent::for_request(r, name, "tollgate", now, json!({}))]
}

async fn open_store(path: &Path) -> SledStore {
    // sled drops its file lock from a background thread; a store another
    // handle just closed opens a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("opening the store at {}: {e}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------
// The real binary, started the way an operator starts it.

struct Server {
    child: Option<Child>,
    base: String,
    /// The metrics listener's `/metrics`.
    metrics_url: String,
    config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    started: Instant,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Environment for a dry run: credentials and region so the AWS SDK never
/// looks beyond loopback, though a dry run makes no AWS call.
fn offline_aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Server {
    fn spawn(
        dir: &Path,
        aws_env: Vec<(String, String)>,
        slack_api_url: &str,
        args: &[&str],
    ) -> Server {
        Server::spawn_with(dir, CONFIG, aws_env, slack_api_url, args)
    }

    /// `config` with `{listen}`, `{metrics}` and `{data}` filled in.
    fn spawn_with(
        dir: &Path,
        config: &str,
        aws_env: Vec<(String, String)>,
        slack_api_url: &str,
        args: &[&str],
    ) -> Server {
        let listen = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let config = config
            .replace("{listen}", &listen)
            .replace("{metrics}", &metrics)
            .replace("{data}", &dir.join("data").display().to_string());
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("config: {e}"));
        let mut env = aws_env;
        env.push(("SLACK_BOT_TOKEN".into(), BOT_TOKEN.into()));
        env.push(("SLACK_SIGNING_SECRET".into(), SIGNING_SECRET.into()));
        env.push(("SLACK_API_URL".into(), slack_api_url.into()));
        env.push(("LOG_FORMAT".into(), "json".into()));
        let log_path = dir.join("tollgate.log");
        let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("log: {e}"));
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting tollgate: {e}"));
        Server {
            child: Some(child),
            base: format!("http://{listen}"),
            metrics_url: format!("http://{metrics}/metrics"),
            config_path,
            log_path,
            env,
            started,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Time from spawn to the first `/readyz` 200, polled every 2 ms.
    async fn wait_ready(&mut self, within: Duration) -> Duration {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.base);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return self.started.elapsed();
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tollgate exited with {status}:\n{}", self.log());
            }
            assert!(
                self.started.elapsed() < within,
                "tollgate not ready within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .unwrap_or_else(|| panic!("tollgate is not running"))
    }

    /// A line of /proc/<pid>/status in KiB (VmRSS, VmHWM).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("/proc status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// `tollgate <args> --config <this server's config>` through its admin
    /// socket; stdout.
    async fn cli(&self, args: &[&str]) -> String {
        cli_at(&self.config_path, &self.env, args).await
    }

    async fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        self.cli(args)
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// SIGTERM and wait: the store is flushed and unlocked afterwards.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tollgate <args> --config <config>` with `env`; stdout.
async fn cli_at(config: &Path, env: &[(String, String)], args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("tollgate {args:?}: {e}"));
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` Slack users `<prefix>0000`, `<prefix>0001`, … with emails of the
/// allowed domain, known to the stand-in.
fn add_users(slack: &SlackStandIn, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let u = format!("{prefix}{i:04}");
            slack.add_user(&u, &format!("{}@example.com", u.to_lowercase()), "UTC", 0);
            u
        })
        .collect()
}

fn receipt_id(text: &str) -> Option<String> {
    let at = text.find("R-")?;
    text.get(at..at + 7).map(str::to_string)
}

fn parse_ts(v: &Value) -> OffsetDateTime {
    let text = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {text}: {e}"))
}

fn since(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    Duration::try_from(to - from).unwrap_or(Duration::ZERO)
}

fn wall_now() -> OffsetDateTime {
    OffsetDateTime::from(SystemTime::now())
}

// ---------------------------------------------------------------------------
// 1. Slash-command ack latency.

/// Makes every load request's body unique.
static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn load(
    client: &reqwest::Client,
    url: &str,
    users: &[String],
    response_url: &str,
    expect_receipt: bool,
) -> Vec<Duration> {
    let tasks: Vec<_> = users
        .iter()
        .map(|user| {
            let client = client.clone();
            let url = url.to_string();
            // Slack's bodies differ (trigger ids); a repeated body within
            // the replay window would be refused as a replay.
            let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let text = format!(
                "eks bench-cluster 1h view load test {}-{nonce}",
                std::process::id()
            );
            let body = slash_body(user, &text, response_url);
            tokio::spawn(async move {
                let started = Instant::now();
                let resp = post_signed(&client, &url, SIGNING_SECRET, body).await;
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                let took = started.elapsed();
                assert_eq!(status, 200, "{url}: {text}");
                if expect_receipt {
                    // "Working on it" is an acknowledgement too: the
                    // profile lookup took its budget, the receipt follows.
                    assert!(
                        (text.contains("R-") && text.contains("sent to")) || text.contains(WORKING),
                        "not a receipt: {text}"
                    );
                }
                took
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| panic!("request task: {e}")));
    }
    out
}

async fn bare_axum() -> String {
    let app = axum::Router::new().route(
        "/slack/commands",
        axum::routing::post(|| async { axum::http::StatusCode::OK }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/slack/commands")
}

/// The load generator runs in its own process (this binary, `__load …`),
/// away from the Slack stand-in this process serves, so neither's work is
/// measured as Tollgate's. `rounds` rounds of every user at once after one
/// unmeasured round that opens the connections, or (`rounds` 0) each user
/// once, one at a time. The latencies, in µs.
async fn load_child(
    url: &str,
    users: &[String],
    response_url: &str,
    expect_receipt: bool,
    rounds: usize,
) -> Vec<Duration> {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let out = tokio::process::Command::new(exe)
        .arg("__load")
        .arg(url)
        .arg(response_url)
        .arg(if expect_receipt { "receipt" } else { "any" })
        .arg(rounds.to_string())
        .arg(users.join(","))
        .output()
        .await
        .unwrap_or_else(|e| panic!("load generator: {e}"));
    assert!(
        out.status.success(),
        "load generator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Duration::from_micros(l.trim().parse().unwrap_or_else(|e| panic!("{e}: {l}"))))
        .collect()
}

/// `__load <url> <response_url> receipt|any <rounds> <user,user,…>`.
async fn load_main(args: &[String]) {
    let (url, response_url) = (&args[0], &args[1]);
    let expect_receipt = args[2] == "receipt";
    let rounds: usize = args[3].parse().unwrap_or(1);
    let users: Vec<String> = args[4].split(',').map(str::to_string).collect();
    let client = reqwest::Client::new();
    let mut measured = Vec::new();
    if rounds == 0 {
        for user in &users {
            let one = std::slice::from_ref(user);
            measured.extend(load(&client, url, one, response_url, expect_receipt).await);
        }
    } else {
        load(&client, url, &users, response_url, expect_receipt).await;
        for _ in 0..rounds {
            measured.extend(load(&client, url, &users, response_url, expect_receipt).await);
        }
    }
    for d in measured {
        println!("{}", d.as_micros());
    }
}

async fn fig1_ack(c: &Counts, rows: &mut Vec<Row>) {
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let users = add_users(&slack, "U0ACK", c.ack_concurrent);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut server = Server::spawn(
        dir.path(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let tollgate_url = format!("{}/slack/commands", server.base);
    let bare_url = bare_axum().await;
    let response_url = slack.response_url("ack");

    // Alternating per round, so both see the same machine.
    let (mut tg, mut bare) = (histogram(), histogram());
    for _ in 0..c.ack_rounds {
        for d in load_child(&tollgate_url, &users, &response_url, true, 1).await {
            record(&mut tg, d);
        }
        for d in load_child(&bare_url, &users, &response_url, false, 1).await {
            record(&mut bare, d);
        }
    }
    // The same requests one at a time: what an ack costs without queueing.
    let (mut tg_seq, mut bare_seq) = (histogram(), histogram());
    for d in load_child(&tollgate_url, &users, &response_url, true, 0).await {
        record(&mut tg_seq, d);
    }
    for d in load_child(&bare_url, &users, &response_url, false, 0).await {
        record(&mut bare_seq, d);
    }
    // Every ack stands for a Pending request in the store.
    let listed = server.json_lines(&["grants", "list", "--json"]).await;
    // Each round also sent its unmeasured opening round.
    let want = c.ack_concurrent * (2 * c.ack_rounds + 1);
    let pending = listed.iter().filter(|g| g["state"] == "pending").count();
    assert_eq!(
        pending, want,
        "every acknowledged command is a Pending request"
    );
    server.stop().await;

    let (_, p99, _) = pcts(&tg);
    let (_, bare_p99, _) = pcts(&bare);
    let ratio = p99 as f64 / bare_p99.max(1) as f64;
    rows.push(
        Row::new(
            "1",
            format!(
                "ack p50/p99/max, {} concurrent signed `/access eks` from as many users, {} rounds (load generator in its own process)",
                c.ack_concurrent, c.ack_rounds
            ),
            fmt_pcts(&tg),
        )
        .baseline(format!("bare axum 200: {}", fmt_pcts(&bare)))
        .ratio(ratio)
        .target("p99 ≤ 10 ms, ratio ≤ 5", ms(p99) <= 10.0 && ratio <= 5.0),
    );
    let (_, seq_p99, _) = pcts(&tg_seq);
    let (_, bare_seq_p99, _) = pcts(&bare_seq);
    rows.push(
        Row::new(
            "1",
            format!(
                "ack p50/p99/max, the same {} requests one at a time",
                c.ack_concurrent
            ),
            fmt_pcts(&tg_seq),
        )
        .baseline(format!("bare axum 200: {}", fmt_pcts(&bare_seq)))
        .ratio(seq_p99 as f64 / bare_seq_p99.max(1) as f64),
    );
}

// ---------------------------------------------------------------------------
// 2. Store transitions.

/// Drives grants `first..first+n` through create → approve → active →
/// revoked, each one durable transaction with its audit event.
async fn lifecycles(store: Arc<SledStore>, first: usize, n: usize) -> Histogram<u64> {
    let mut h = histogram();
    for i in first..first + n {
        let principal = format!("arn:aws:iam::000000000000:role/store-{i}");
        let now = wall_now();
        let r0 = pending(i, &principal, now);
        let t = Instant::now();
        store
            .create(&r0, event(&r0, "requested", now))
            .await
            .unwrap_or_else(|e| panic!("create: {e}"));
        record(&mut h, t.elapsed());
        let mut prev = r0;
        for step in 0..3 {
            let now = wall_now();
            let (next, name) = match step {
                0 => (approved(&prev, now), "approved"),
                1 => (
                    active(&prev, now, now + Duration::from_secs(3600)),
                    "granted",
                ),
                _ => (revoked(&prev, now), "revoked"),
            };
            let audit = event(&next, name, now);
            let t = Instant::now();
            prev = store
                .update(&prev, next, audit)
                .await
                .unwrap_or_else(|e| panic!("update: {e}"));
            record(&mut h, t.elapsed());
        }
    }
    h
}

async fn fig2_store(c: &Counts, rows: &mut Vec<Row>) -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store = Arc::new(open_store(dir.path()).await);

    let started = Instant::now();
    let single = lifecycles(store.clone(), 0, c.store_single).await;
    let single_rate = (4 * c.store_single) as f64 / started.elapsed().as_secs_f64();

    let writers = 16;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let first = c.store_single + w * c.store_per_writer;
            tokio::spawn(lifecycles(store, first, c.store_per_writer))
        })
        .collect();
    let mut concurrent = histogram();
    for t in tasks {
        let h = t.await.unwrap_or_else(|e| panic!("writer: {e}"));
        concurrent
            .add(&h)
            .unwrap_or_else(|e| panic!("histogram: {e}"));
    }
    let concurrent_rate =
        (4 * writers * c.store_per_writer) as f64 / started.elapsed().as_secs_f64();

    let total = c.store_single + writers * c.store_per_writer;
    assert!(
        store.live().await.unwrap_or_default().is_empty(),
        "every grant reached Revoked"
    );
    let audit = store.audit_since(None).await.unwrap_or_default();
    assert_eq!(audit.len(), 4 * total, "one audit event per transition");
    assert!(
        store.next_due().await.unwrap_or_default().is_none(),
        "nothing left due"
    );

    let (_, p99, _) = pcts(&single);
    rows.push(
        Row::new(
            "2",
            format!(
                "store, 1 writer: transitions/s, p99 ({} grants × 4)",
                c.store_single
            ),
            format!("{single_rate:.0}/s, p99 {}", fmt_ms(p99)),
        )
        .baseline("—"),
    );
    let (_, p99, _) = pcts(&concurrent);
    rows.push(
        Row::new(
            "2",
            format!(
                "store, {writers} writers: transitions/s, p99 ({} grants × 4)",
                writers * c.store_per_writer
            ),
            format!("{concurrent_rate:.0}/s, p99 {}", fmt_ms(p99)),
        )
        .baseline("—")
        .ratio(concurrent_rate / single_rate),
    );
    concurrent_rate
}

// ---------------------------------------------------------------------------
// Seeding a store happens in a child process (this binary, `__seed …`), so
// the store's file lock is surely released before the server opens it.

async fn seed_child(args: &[String]) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let status = tokio::process::Command::new(exe)
        .arg("__seed")
        .args(args)
        .status()
        .await
        .unwrap_or_else(|e| panic!("seeding: {e}"));
    assert!(status.success(), "seeding {args:?} failed");
}

/// `__seed scale <dir> <grants> <active>`: `grants` requests that went the
/// whole way (requested, approved, granted, revoked: four audit events
/// each), of which the last `active` are still Active for an hour.
///
/// `__seed storm <dir> <storm> <isolated> <at_unix_ms>`: `storm` Active
/// grants expiring spread over the second starting at `at`, then
/// `isolated` more expiring 250 ms apart from `at + 4 s`.
async fn seed_main(args: &[String]) {
    let kind = args[0].as_str();
    let store = Arc::new(open_store(Path::new(&args[1])).await);
    let now = wall_now();
    let rows: Vec<(Request, Vec<AuditEvent>)> = match kind {
        "scale" => {
            let (n, live): (usize, usize) =
                (args[2].parse().unwrap_or(0), args[3].parse().unwrap_or(0));
            (0..n)
                .map(|i| {
                    let principal = format!("arn:aws:iam::000000000000:role/user-{}", i % 5_000);
                    let r = pending(i, &principal, now);
                    let mut audit = event(&r, "requested", now);
                    let r = approved(&r, now);
                    audit.extend(event(&r, "approved", now));
                    let r = active(&r, now, now + Duration::from_secs(3600));
                    audit.extend(event(&r, "granted", now));
                    if i + live >= n {
                        return (r, audit);
                    }
                    let r = revoked(&r, now);
                    audit.extend(event(&r, "revoked", now));
                    (r, audit)
                })
                .collect()
        }
        "storm" => {
            let (storm, isolated): (usize, usize) =
                (args[2].parse().unwrap_or(0), args[3].parse().unwrap_or(0));
            let at_ms: i128 = args[4].parse().unwrap_or(0);
            let at = OffsetDateTime::from_unix_timestamp_nanos(at_ms * 1_000_000)
                .unwrap_or_else(|e| panic!("{e}"));
            (0..storm + isolated)
                .map(|i| {
                    let expires = if i < storm {
                        at + time::Duration::nanoseconds((i as i64 * 1_000_000_000) / storm as i64)
                    } else {
                        at + time::Duration::milliseconds(4_000 + 250 * (i - storm) as i64)
                    };
                    let principal = format!("arn:aws:iam::000000000000:role/storm-{i}");
                    let r = pending(i, &principal, now);
                    let r = active(&approved(&r, now), now, expires);
                    let audit = event(&r, "granted", now);
                    (r, audit)
                })
                .collect()
        }
        other => panic!("unknown seed {other}"),
    };
    // Concurrent writers share sled's flushes, as concurrent requests do.
    futures::stream::iter(rows)
        .for_each_concurrent(64, |(r, audit)| {
            let store = store.clone();
            async move {
                store
                    .create(&r, audit)
                    .await
                    .unwrap_or_else(|e| panic!("seed create: {e}"))
            }
        })
        .await;
    store.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
}

// ---------------------------------------------------------------------------
// 3. Start-up and memory with a large store.

async fn fig3_scale(c: &Counts, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let data = dir.path().join("data");
    let seeding = Instant::now();
    seed_child(&[
        "scale".into(),
        data.display().to_string(),
        c.scale_grants.to_string(),
        c.scale_active.to_string(),
    ])
    .await;
    let seeded_in = seeding.elapsed();
    let size: u64 = std::fs::read_dir(&data)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);

    let slack = SlackStandIn::start(BOT_TOKEN).await;
    let mut server = Server::spawn(
        dir.path(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    let ready = server.wait_ready(Duration::from_secs(120)).await;
    // Idle: no requests, the scheduler asleep until the next expiry.
    tokio::time::sleep(Duration::from_secs(if c.smoke { 1 } else { 5 })).await;
    let rss = server.status_kib("VmRSS");
    let hwm = server.status_kib("VmHWM");
    let listed = server.json_lines(&["grants", "list", "--json"]).await;
    assert_eq!(
        listed.len(),
        c.scale_active,
        "the active grants are all listed"
    );
    // 9. `/metrics` with the whole history in the store.
    let with_history = scrapes(&server, c).await;
    server.stop().await;
    drop(server);

    // 9. The same live requests with no history: the baseline.
    let small = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    seed_child(&[
        "scale".into(),
        small.path().join("data").display().to_string(),
        c.scale_active.to_string(),
        c.scale_active.to_string(),
    ])
    .await;
    let mut server = Server::spawn(
        small.path(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let without = scrapes(&server, c).await;
    server.stop().await;

    let what = format!(
        "{} grants ({} active, {} ended; 4 audit events each; {:.0} MiB on disk, seeded in {:.1} s)",
        c.scale_grants,
        c.scale_active,
        c.scale_grants - c.scale_active,
        size as f64 / (1024.0 * 1024.0),
        seeded_in.as_secs_f64()
    );
    rows.push(
        Row::new(
            "3",
            format!("start → /readyz 200, {what}"),
            format!("{:.0} ms", ready.as_secs_f64() * 1000.0),
        )
        .target("≤ 1 s", ready <= Duration::from_secs(1)),
    );
    let mib = rss as f64 / 1024.0;
    rows.push(
        Row::new(
            "3",
            "RSS when idle (VmRSS; peak VmHWM)",
            format!("{mib:.1} MiB (peak {:.1} MiB)", hwm as f64 / 1024.0),
        )
        .target("≤ 64 MiB", mib <= 64.0),
    );
    let (p50, _, _) = pcts(&with_history);
    let (base50, _, _) = pcts(&without);
    let ratio = p50 as f64 / base50.max(1) as f64;
    rows.push(
        Row::new(
            "9",
            format!(
                "`/metrics` scrape, {} sequential, {} active + {} ended requests, p50/p99/max",
                c.scrapes,
                c.scale_active,
                c.scale_grants - c.scale_active
            ),
            fmt_pcts(&with_history),
        )
        .baseline(format!(
            "{} active, 0 ended: {}",
            c.scale_active,
            fmt_pcts(&without)
        ))
        .ratio(ratio)
        .target("ratio (p50) ≤ 1.2", ratio <= 1.2),
    );
}

/// `c.scrapes` sequential GETs of the metrics listener's `/metrics`, after
/// one unmeasured; each answer must count the active grants.
async fn scrapes(server: &Server, c: &Counts) -> Histogram<u64> {
    let client = reqwest::Client::new();
    let want = format!("tollgate_grants_active {}", c.scale_active);
    let mut h = histogram();
    for i in 0..=c.scrapes {
        let started = Instant::now();
        let resp = client
            .get(&server.metrics_url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("/metrics: {e}"));
        assert!(
            resp.status().is_success(),
            "/metrics answered {}",
            resp.status()
        );
        let text = resp.text().await.unwrap_or_default();
        let took = started.elapsed();
        assert!(
            text.lines().any(|l| l.trim() == want),
            "/metrics does not say {want:?}:\n{text}"
        );
        if i > 0 {
            record(&mut h, took);
        }
    }
    h
}

// ---------------------------------------------------------------------------
// 4. Expiry storm with the no-op (dry-run) engine.

async fn fig4_storm(c: &Counts, rows: &mut Vec<Row>, store_rate: f64) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let data = dir.path().join("data");
    // Far enough ahead to seed and start before the first expiry.
    let lead = Duration::from_secs(4)
        + Duration::from_secs_f64(3.0 * (c.storm + c.isolated) as f64 / store_rate.max(1.0));
    let at = wall_now() + lead;
    let at_ms = at.unix_timestamp_nanos() / 1_000_000;
    let at = OffsetDateTime::from_unix_timestamp_nanos(at_ms * 1_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    seed_child(&[
        "storm".into(),
        data.display().to_string(),
        c.storm.to_string(),
        c.isolated.to_string(),
        at_ms.to_string(),
    ])
    .await;
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(STORM_USER, "storm@example.com", "UTC", 0);
    let mut server = Server::spawn(
        dir.path(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    assert!(
        wall_now() < at,
        "the server was not ready before the storm; raise the lead time"
    );
    let last = at + Duration::from_millis(4_000 + 250 * c.isolated as u64);
    let deadline = Instant::now() + since(wall_now(), last) + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if wall_now() > last
            && server
                .json_lines(&["grants", "list", "--json"])
                .await
                .is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "grants still live long after expiry"
        );
    }
    server.stop().await;

    let store = open_store(&data).await;
    let audit = store.audit_since(None).await.unwrap_or_default();
    let mut revoked: HashMap<String, (OffsetDateTime, f64)> = HashMap::new();
    for e in audit.iter().filter(|e| e.event == "revoked") {
        let lateness = e.details["lateness_seconds"].as_f64().unwrap_or(f64::NAN);
        revoked.insert(e.request_id.clone(), (e.ts, lateness));
    }
    let mut storm = histogram();
    let mut last_storm = at;
    for i in 0..c.storm {
        let (ts, lateness) = revoked
            .get(id_for(i).as_str())
            .copied()
            .unwrap_or_else(|| panic!("storm grant {} was not revoked", id_for(i)));
        record(&mut storm, Duration::from_secs_f64(lateness));
        last_storm = last_storm.max(ts);
    }
    let mut isolated = histogram();
    for i in c.storm..c.storm + c.isolated {
        let (_, lateness) = revoked
            .get(id_for(i).as_str())
            .copied()
            .unwrap_or_else(|| panic!("isolated grant {} was not revoked", id_for(i)));
        record(&mut isolated, Duration::from_secs_f64(lateness));
    }
    let all_in = since(at, last_storm);
    rows.push(
        Row::new(
            "4",
            format!(
                "expiry storm: {} grants expiring within one second → last Revoked",
                c.storm
            ),
            format!("{:.2} s after the first expiry", all_in.as_secs_f64()),
        )
        .target("≤ 2 s", all_in <= Duration::from_secs(2)),
    );
    let (_, p99, _) = pcts(&storm);
    rows.push(
        Row::new(
            "4",
            "storm lateness p50/p99/max (expiry → revoke call done)",
            fmt_pcts(&storm),
        )
        .target("—", p99 <= 2_000_000),
    );
    let (_, p99, _) = pcts(&isolated);
    rows.push(
        Row::new(
            "4",
            format!(
                "isolated expiries ({}, 250 ms apart) lateness p50/p99/max",
                c.isolated
            ),
            fmt_pcts(&isolated),
        )
        .target("p99 ≤ 50 ms", p99 <= 50_000),
    );
}

// ---------------------------------------------------------------------------
// 5 and 6. Against MiniStack.

struct Aws {
    eks: aws_sdk_eks::Client,
    sts: aws_sdk_sts::Client,
}

async fn aws_clients(endpoint: &str) -> Aws {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await;
    Aws {
        eks: aws_sdk_eks::Client::new(&config),
        sts: aws_sdk_sts::Client::new(&config),
    }
}

/// The calls a grant for a new principal comes down to, made directly with
/// the same SDK through the same proxy. Credentials are cached on both
/// sides (Tollgate assumes its role once, not per grant), so no STS call.
async fn bare_grant(aws: &Aws, principal: &str) -> Duration {
    let started = Instant::now();
    aws.eks
        .create_access_entry()
        .cluster_name(CLUSTER)
        .principal_arn(principal)
        .tags("managed-by", "tollgate")
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateAccessEntry: {e}"));
    aws.eks
        .associate_access_policy()
        .cluster_name(CLUSTER)
        .principal_arn(principal)
        .policy_arn(VIEW_POLICY)
        .access_scope(
            AccessScope::builder()
                .r#type(AccessScopeType::Cluster)
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("AssociateAccessPolicy: {e}"));
    started.elapsed()
}

async fn has_view(aws: &Aws, principal: &str) -> bool {
    match aws
        .eks
        .list_associated_access_policies()
        .cluster_name(CLUSTER)
        .principal_arn(principal)
        .send()
        .await
    {
        Ok(out) => out
            .associated_access_policies()
            .iter()
            .any(|a| a.policy_arn() == Some(VIEW_POLICY)),
        Err(_) => false,
    }
}

/// How long the proxy holds every AWS call in figure 5: closer to what
/// EKS and STS take from inside a region than MiniStack's millisecond.
const AWS_DELAY: Duration = Duration::from_millis(20);

struct E2e {
    ms: MiniStack,
    /// Tollgate's and the baseline's AWS calls pass here.
    proxy: AwsProxy,
    slack: SlackStandIn,
    server: Server,
    /// Through the proxy: the baseline's calls.
    aws: Aws,
    /// Straight to MiniStack: watching access without the proxy's delay.
    watch: Aws,
    http: reqwest::Client,
    /// Before anything of this world was written.
    started: OffsetDateTime,
    _dir: tempfile::TempDir,
}

impl E2e {
    async fn start(users: &[String], config: &str, delay: Duration) -> E2e {
        E2e::start_on(users, config, delay, None).await
    }

    /// As `start`, with the DynamoDB `table` made in MiniStack first when
    /// the config's store is that table.
    async fn start_on(users: &[String], config: &str, delay: Duration, table: Option<&str>) -> E2e {
        let started = wall_now();
        let ms = tokio::task::spawn_blocking(MiniStack::start)
            .await
            .unwrap_or_else(|e| panic!("MiniStack: {e}"));
        ms.create_cluster(CLUSTER).await;
        if let Some(table) = table {
            tollgate::store::dynamodb::init(&dynamo_client(&ms.endpoint).await, table)
                .await
                .unwrap_or_else(|e| panic!("store init: {e}"));
        }
        let proxy = AwsProxy::start(&ms.endpoint, delay).await;
        let slack = SlackStandIn::start(BOT_TOKEN).await;
        slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
        slack.add_channel(CHANNEL, true);
        for u in users {
            slack.add_user(u, &format!("{}@example.com", u.to_lowercase()), "UTC", 0);
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut server =
            Server::spawn_with(dir.path(), config, proxy.aws_env(), &slack.api_url(), &[]);
        server.wait_ready(Duration::from_secs(60)).await;
        let aws = aws_clients(&proxy.endpoint).await;
        let watch = aws_clients(&ms.endpoint).await;
        E2e {
            ms,
            proxy,
            slack,
            server,
            aws,
            watch,
            http: reqwest::Client::new(),
            started,
            _dir: dir,
        }
    }

    /// Requests as `user`; the request id and its card's ts.
    async fn request(&self, user: &str, duration: &str) -> (String, String) {
        let answer_to = format!("cmd-{user}-{}", wall_now().unix_timestamp_nanos());
        let body = slash_body(
            user,
            &format!("eks {CLUSTER} {duration} view benchmark"),
            &self.slack.response_url(&answer_to),
        );
        let url = format!("{}/slack/commands", self.server.base);
        let resp = post_signed(&self.http, &url, SIGNING_SECRET, body).await;
        let mut text = resp.text().await.unwrap_or_default();
        if receipt_id(&text).is_none() && text.contains("still working") {
            // Past the ack deadline (a loaded server) the receipt follows
            // at the command's response_url.
            text = self
                .slack
                .wait_for_call(
                    &format!("response:{answer_to}"),
                    |c| receipt_id(&c.params.to_string()).is_some(),
                    Duration::from_secs(30),
                )
                .await
                .params
                .to_string();
        }
        let id = receipt_id(&text).unwrap_or_else(|| panic!("no receipt: {text}"));
        let needle = id.clone();
        let card = self
            .slack
            .wait_for_call(
                "chat.postMessage",
                move |c| c.params["channel"] == CHANNEL && c.params.to_string().contains(&needle),
                Duration::from_secs(20),
            )
            .await;
        let ts = card.response["ts"].as_str().unwrap_or_default().to_string();
        (id, ts)
    }

    /// Clicks Approve; the wall-clock instant the click was sent.
    async fn approve(&self, id: &str, ts: &str) -> OffsetDateTime {
        let body = action_body(
            APPROVER,
            "approve",
            id,
            CHANNEL,
            ts,
            &self.slack.response_url("click"),
        );
        let url = format!("{}/slack/interactions", self.server.base);
        let sent = wall_now();
        let status = post_signed(&self.http, &url, SIGNING_SECRET, body)
            .await
            .status();
        assert_eq!(status.as_u16(), 200);
        sent
    }

    async fn wait_access(
        &self,
        principal: &str,
        present: bool,
        within: Duration,
    ) -> OffsetDateTime {
        let deadline = Instant::now() + within;
        loop {
            if has_view(&self.watch, principal).await == present {
                return wall_now();
            }
            assert!(
                Instant::now() < deadline,
                "access of {principal} not {} within {within:?}:\n{}",
                if present { "granted" } else { "revoked" },
                self.server.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for `id`'s `granted` event: the grant's last call is done.
    async fn wait_granted(&self, id: &str) {
        self.wait_event(id, "granted").await
    }

    /// Waits for the audit event `name` of request `id`, reading only the
    /// log since this world started: a waiter that read the whole log on
    /// every poll would load the server it measures in step with the
    /// history (issue 29).
    async fn wait_event(&self, id: &str, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let since = self
            .started
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{e}"));
        loop {
            let audit = self
                .server
                .json_lines(&["audit", "export", "--since", &since])
                .await;
            if audit
                .iter()
                .any(|e| e["event"] == name && e["request_id"] == id)
            {
                return;
            }
            assert!(Instant::now() < deadline, "{id} has no {name} event");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn audit(&self) -> Vec<Value> {
        self.server.json_lines(&["audit", "export"]).await
    }
}

fn principal_of(user: &str) -> String {
    format!("arn:aws:iam::000000000000:role/{}", user.to_lowercase())
}

async fn fig5_and_6(c: &Counts, rows: &mut Vec<Row>) {
    let grant_users: Vec<String> = (0..c.e2e_grants).map(|i| format!("U0GR{i:03}")).collect();
    let revoke_users: Vec<String> = (0..c.revoke_grants)
        .map(|i| format!("U0RV{i:03}"))
        .collect();
    let all: Vec<String> = grant_users.iter().chain(&revoke_users).cloned().collect();
    let w = E2e::start(&all, CONFIG, AWS_DELAY).await;

    // 5. Approve → access active, interleaved with the bare SDK sequence.
    let mut bare = histogram();
    let mut clicks: Vec<(String, OffsetDateTime)> = Vec::new();
    let mut per_grant: Vec<AwsCounts> = Vec::new();
    for (i, user) in grant_users.iter().enumerate() {
        record(
            &mut bare,
            bare_grant(&w.aws, &format!("arn:aws:iam::000000000000:role/bare-{i}")).await,
        );
        let before = w.proxy.counts();
        let (id, ts) = w.request(user, "1h").await;
        let sent = w.approve(&id, &ts).await;
        w.wait_access(&principal_of(user), true, Duration::from_secs(30))
            .await;
        w.wait_granted(&id).await;
        per_grant.push(w.proxy.counts().since(&before));
        clicks.push((id, sent));
    }

    // 6. Grants that expire while others are being made, watched by a
    // separate client.
    let duration = Duration::from_secs(c.revoke_duration_secs);
    let mut watchers = Vec::new();
    let mut revoke_ids = Vec::new();
    for user in &revoke_users {
        let (id, ts) = w
            .request(user, &format!("{}s", c.revoke_duration_secs))
            .await;
        w.approve(&id, &ts).await;
        let principal = principal_of(user);
        let seen = w
            .wait_access(&principal, true, Duration::from_secs(30))
            .await;
        revoke_ids.push(id);
        // The expiry is at most `duration` after access was seen.
        let watch_from = seen + duration - Duration::from_millis(300);
        let aws = Aws {
            eks: w.watch.eks.clone(),
            sts: w.watch.sts.clone(),
        };
        watchers.push(tokio::spawn(async move {
            tokio::time::sleep(since(wall_now(), watch_from)).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if !has_view(&aws, &principal).await {
                    return wall_now();
                }
                assert!(Instant::now() < deadline, "{principal} never revoked");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    let mut gone = Vec::new();
    for w in watchers {
        gone.push(w.await.unwrap_or_else(|e| panic!("watcher: {e}")));
    }
    // The store write follows the last cloud call of each revoke.
    for id in &revoke_ids {
        w.wait_event(id, "revoked").await;
    }

    // Access goes first; each revoke is recorded after its read-back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let audit = loop {
        let audit = w.audit().await;
        let recorded = revoke_ids.iter().all(|id| {
            audit
                .iter()
                .any(|e| e["event"] == "revoked" && e["request_id"] == id.as_str())
        });
        if recorded || Instant::now() >= deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let granted: HashMap<String, &Value> = audit
        .iter()
        .filter(|e| e["event"] == "granted")
        .map(|e| (e["request_id"].as_str().unwrap_or_default().to_string(), e))
        .collect();
    let mut e2e = histogram();
    for (id, sent) in &clicks {
        let g = granted
            .get(id)
            .unwrap_or_else(|| panic!("{id} has no granted event"));
        record(&mut e2e, since(*sent, parse_ts(&g["ts"])));
    }
    let mut lateness = histogram();
    for (id, gone_at) in revoke_ids.iter().zip(&gone) {
        let g = granted
            .get(id)
            .unwrap_or_else(|| panic!("{id} has no granted event"));
        let expires = parse_ts(&g["details"]["expires_at"]);
        record(&mut lateness, since(expires, *gone_at));
        assert!(
            audit
                .iter()
                .any(|e| e["event"] == "revoked" && e["request_id"] == id.as_str()),
            "{id} revoked in the audit log"
        );
    }
    drop(w);

    let (p50, _, _) = pcts(&e2e);
    let (bare50, _, _) = pcts(&bare);
    let ratio = p50 as f64 / bare50.max(1) as f64;
    // The calls most grants made (a reconcile pass may fall into a window).
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in &per_grant {
        *seen.entry(c.describe("")).or_default() += 1;
    }
    let calls = seen
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(calls, _)| calls)
        .unwrap_or_default();
    rows.push(
        Row::new(
            "5",
            format!(
                "Approve click → access active (granted), {} grants, every AWS call +{} ms at a loopback proxy; Tollgate's calls per grant: {calls}; p50/p99/max",
                c.e2e_grants,
                AWS_DELAY.as_millis()
            ),
            fmt_pcts(&e2e),
        )
        .baseline(format!(
            "the same calls (CreateAccessEntry+AssociateAccessPolicy), same SDK and proxy: {}",
            fmt_pcts(&bare)
        ))
        .ratio(ratio)
        .target("ratio (p50) ≤ 1.10", ratio <= 1.10),
    );
    let (_, p99, _) = pcts(&lateness);
    rows.push(
        Row::new(
            "6",
            format!(
                "revoke lateness, expiry → policy gone for a separate client, {} grants, p50/p99/max",
                c.revoke_grants
            ),
            fmt_pcts(&lateness),
        )
        .target("p99 ≤ 1 s", p99 <= 1_000_000),
    );
}

// ---------------------------------------------------------------------------
// 7. Grant + revoke with and without history, on both backends.

/// A row that went the whole way to Revoked, with its four audit events:
/// the history a year of requests leaves behind.
fn ended(n: usize, principal: &str, now: OffsetDateTime) -> (Request, Vec<AuditEvent>) {
    let r = pending(n, principal, now);
    let mut audit = event(&r, "requested", now);
    let r = approved(&r, now);
    audit.extend(event(&r, "approved", now));
    let r = active(&r, now, now + Duration::from_secs(3600));
    audit.extend(event(&r, "granted", now));
    let r = revoked(&r, now);
    audit.extend(event(&r, "revoked", now));
    (r, audit)
}

/// What one grant and its revoke cost the store: the reads and writes the
/// service makes for each step (the due query that finds it, the row, the
/// principal's live rows it converges against, the transition with its
/// audit event). Time of the whole cycle, and the DynamoDB items the revoke
/// read when `proxy` sees the store's calls.
async fn grant_revoke(
    store: &dyn Store,
    n: usize,
    proxy: Option<&AwsProxy>,
) -> (Duration, Option<u64>) {
    let principal = format!("arn:aws:iam::000000000000:role/cycle-{n}");
    let started = Instant::now();
    let now = wall_now();
    let r = pending(n, &principal, now);
    store
        .create(&r, event(&r, "requested", now))
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    let next = approved(&r, now);
    let r = store
        .update(&r, next.clone(), event(&next, "approved", now))
        .await
        .unwrap_or_else(|e| panic!("approve: {e}"));
    // The grant step.
    let _ = store.due(wall_now()).await;
    let r = store
        .get(&r.id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{} vanished", r.id));
    let others = store
        .live_for(CLUSTER, &principal)
        .await
        .unwrap_or_else(|e| panic!("live_for: {e}"));
    assert_eq!(others.len(), 1, "only the request being granted is live");
    let now = wall_now();
    let next = active(&r, now, now + Duration::from_secs(3600));
    let r = store
        .update(&r, next.clone(), event(&next, "granted", now))
        .await
        .unwrap_or_else(|e| panic!("grant: {e}"));
    // The revoke step.
    let before = proxy.map(AwsProxy::counts);
    let _ = store.due(wall_now()).await;
    let r = store
        .get(&r.id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{} vanished", r.id));
    let others = store
        .live_for(CLUSTER, &principal)
        .await
        .unwrap_or_else(|e| panic!("live_for: {e}"));
    assert_eq!(others.len(), 1, "only the request being revoked is live");
    let now = wall_now();
    let next = revoked(&r, now);
    store
        .update(&r, next.clone(), event(&next, "revoked", now))
        .await
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    let read = proxy
        .zip(before)
        .map(|(p, before)| p.counts().since(&before).items_read);
    (started.elapsed(), read)
}

/// `cycles` grant + revoke cycles from id `first`: p50 of their time, and
/// the items read per revoke (the largest seen), when counted.
async fn cycles(
    store: &dyn Store,
    first: usize,
    cycles: usize,
    proxy: Option<&AwsProxy>,
) -> (Histogram<u64>, Option<u64>) {
    let mut h = histogram();
    let mut most = None;
    for n in first..first + cycles {
        let (took, read) = grant_revoke(store, n, proxy).await;
        record(&mut h, took);
        most = most.max(read);
    }
    (h, most)
}

/// Ended requests written through the store API, concurrently, each with
/// its audit events, as the service would have left them.
/// Request `i` is `principal(i)`'s.
async fn seed_ended(
    store: &dyn Store,
    first: usize,
    n: usize,
    principal: &(dyn Fn(usize) -> String + Sync),
) {
    let now = wall_now();
    futures::stream::iter(first..first + n)
        .for_each_concurrent(64, |i| async move {
            let (r, audit) = ended(i, &principal(i), now);
            store
                .create(&r, audit)
                .await
                .unwrap_or_else(|e| panic!("seed create: {e}"))
        })
        .await;
}

/// Ended request rows batch-written into the DynamoDB table (an ended row
/// is one item; see `DynamoStore::row_item`). The audit events live in
/// their own partition, which no grant or revoke reads, and are left out.
async fn seed_ended_dynamo(client: &aws_sdk_dynamodb::Client, table: &str, first: usize, n: usize) {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    let now = wall_now();
    let batches: Vec<Vec<usize>> = (first..first + n)
        .collect::<Vec<_>>()
        .chunks(25)
        .map(<[usize]>::to_vec)
        .collect();
    futures::stream::iter(batches)
        .for_each_concurrent(8, |batch| async move {
            let mut writes: Vec<WriteRequest> = batch
                .iter()
                .map(|&i| {
                    let (r, _) = ended(
                        i,
                        &format!("arn:aws:iam::000000000000:role/user-{}", i % 5_000),
                        now,
                    );
                    let item = tollgate::store::DynamoStore::row_item(&r)
                        .unwrap_or_else(|e| panic!("row item: {e}"));
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(item))
                                .build()
                                .unwrap_or_else(|e| panic!("put request: {e}")),
                        )
                        .build()
                })
                .collect();
            // Unprocessed items are sent again until none are left.
            while !writes.is_empty() {
                let out = client
                    .batch_write_item()
                    .request_items(table, writes)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("BatchWriteItem: {e:?}"));
                writes = out
                    .unprocessed_items()
                    .and_then(|u| u.get(table))
                    .cloned()
                    .unwrap_or_default();
            }
        })
        .await;
}

/// What the emulator itself takes for reads that find nothing, with and
/// without the history in its table: DynamoDB reads a key or a key range
/// in the same time whatever else the table holds; an emulator need not.
async fn emulator_probe(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    n: usize,
) -> Histogram<u64> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut h = histogram();
    for i in 0..n {
        let started = Instant::now();
        let got = client
            .get_item()
            .table_name(table)
            .key("pk", AttributeValue::S("REQUEST".into()))
            .key("sk", AttributeValue::S(format!("absent-{i}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GetItem: {e:?}"));
        assert!(got.item().is_none());
        let found = client
            .query()
            .table_name(table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", AttributeValue::S("LIVE".into()))
            .expression_attribute_values(":prefix", AttributeValue::S(format!("[\"absent-{i}\",")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("Query: {e:?}"));
        assert_eq!(found.count(), 0);
        record(&mut h, started.elapsed());
    }
    h
}

async fn dynamo_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&config)
}

/// The two rows of one backend: cycle time and, on DynamoDB, items read.
fn fig7_rows(
    backend: &str,
    history: usize,
    empty: &Histogram<u64>,
    full: &Histogram<u64>,
    reads: Option<(u64, u64)>,
    c: &Counts,
    rows: &mut Vec<Row>,
) {
    let (p50_empty, _, _) = pcts(empty);
    let (p50_full, _, _) = pcts(full);
    let ratio = p50_full as f64 / p50_empty.max(1) as f64;
    rows.push(
        Row::new(
            "7",
            format!(
                "{backend}: grant + revoke in the store, {} cycles, with {history} ended requests, p50/p99/max",
                c.cycles
            ),
            fmt_pcts(full),
        )
        .baseline(format!("0 ended: {}", fmt_pcts(empty)))
        .ratio(ratio)
        .target("ratio (p50) ≤ 1.2", ratio <= 1.2),
    );
    if let Some((empty, full)) = reads {
        rows.push(
            Row::new(
                "7",
                format!("{backend}: items read per revoke (at the proxy: Query ScannedCount + GetItem), with {history} ended"),
                full.to_string(),
            )
            .baseline(format!("0 ended: {empty}"))
            .ratio(full as f64 / empty.max(1) as f64)
            .target("no more than with 0", full <= empty),
        );
    }
}

async fn fig7_history(c: &Counts, rows: &mut Vec<Row>) {
    // sled.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store = open_store(dir.path()).await;
    // Ids: the cycles first, the history after them.
    // One unmeasured batch first: a store (and an emulator) slows a little
    // as its first writes land, whatever the history; the baseline is the
    // batch right before the history is written.
    let history_from = 4 * c.cycles;
    cycles(&store, 2 * c.cycles, c.cycles, None).await;
    let (empty, _) = cycles(&store, 0, c.cycles, None).await;
    seed_ended(&store, history_from, c.history, &|i| {
        format!("arn:aws:iam::000000000000:role/user-{}", i % 5_000)
    })
    .await;
    let (full, _) = cycles(&store, c.cycles, c.cycles, None).await;
    assert_eq!(
        store.list().await.map(|l| l.len()).unwrap_or(0),
        c.history + 3 * c.cycles,
        "the history is in the store"
    );
    assert!(
        store.live().await.unwrap_or_default().is_empty(),
        "every cycle ended"
    );
    drop(store);
    fig7_rows("sled", c.history, &empty, &full, None, c, rows);

    // DynamoDB in MiniStack, its calls counted at a proxy that adds nothing.
    let ms = tokio::task::spawn_blocking(MiniStack::start)
        .await
        .unwrap_or_else(|e| panic!("MiniStack: {e}"));
    let proxy = AwsProxy::start(&ms.endpoint, Duration::ZERO).await;
    let direct = dynamo_client(&ms.endpoint).await;
    let table = "tollgate-bench";
    tollgate::store::dynamodb::init(&direct, table)
        .await
        .unwrap_or_else(|e| panic!("store init: {e}"));
    let store = tollgate::store::DynamoStore::new(dynamo_client(&proxy.endpoint).await, table);
    cycles(&store, 2 * c.cycles, c.cycles, Some(&proxy)).await;
    let (empty, reads_empty) = cycles(&store, 0, c.cycles, Some(&proxy)).await;
    let probe_empty = emulator_probe(&direct, table, c.cycles).await;
    let seeding = Instant::now();
    seed_ended_dynamo(&direct, table, history_from, c.history).await;
    eprintln!(
        "bench: 7 seeded {} ended DynamoDB rows in {:.1} s",
        c.history,
        seeding.elapsed().as_secs_f64()
    );
    let (full, reads_full) = cycles(&store, c.cycles, c.cycles, Some(&proxy)).await;
    let probe_full = emulator_probe(&direct, table, c.cycles).await;
    assert!(
        store.live().await.unwrap_or_default().is_empty(),
        "every cycle ended"
    );
    let reads = reads_empty.zip(reads_full);
    assert!(
        reads.is_some_and(|(e, f)| e > 0 && f <= e),
        "items read per revoke grew with history: {reads:?}"
    );
    fig7_rows(
        "DynamoDB (MiniStack)",
        c.history,
        &empty,
        &full,
        reads,
        c,
        rows,
    );
    let (p50_empty, _, _) = pcts(&probe_empty);
    let (p50_full, _, _) = pcts(&probe_full);
    let ratio = p50_full as f64 / p50_empty.max(1) as f64;
    rows.push(
        Row::new(
            "7",
            format!(
                "MiniStack alone: one GetItem + one Query of an empty LIVE prefix (no item read), straight from the SDK, with {} ended rows in the table, p50/p99/max",
                c.history
            ),
            fmt_pcts(&probe_full),
        )
        .baseline(format!("0 ended: {}", fmt_pcts(&probe_empty)))
        .ratio(ratio),
    );
}

// ---------------------------------------------------------------------------
// 7, end to end: expiry → revoke recorded through the real binary, with and
// without history in its store.

/// The steps the server logs with each `revoked` line, in order (see
/// `service::readback::RevokeTimes`).
const REVOKE_STEPS: [&str; 6] = [
    "claimed",
    "in_force",
    "converge",
    "remove",
    "read_back",
    "record",
];

/// The server's log line with `message` for request `id` (its JSON
/// `fields`), waited for: reading the log, unlike `audit export`, puts no
/// load on the server being measured.
async fn wait_logged(server: &Server, id: &str, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = server.log().lines().find_map(|l| {
            let line: Value = serde_json::from_str(l).ok()?;
            let fields = &line["fields"];
            (fields["message"] == message
                && fields["request_id"]
                    .as_str()
                    .is_some_and(|r| r.ends_with(id.trim_start_matches("R-"))))
            .then(|| fields.clone())
        });
        if let Some(fields) = found {
            return fields;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no {message:?} logged within 60 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the revokes of one condition took.
struct Revokes {
    /// Expiry → the `revoked` audit event's time.
    recorded: Histogram<u64>,
    /// Expiry → a separate client no longer sees the policy.
    gone: Histogram<u64>,
    /// Per `REVOKE_STEPS`, as the server logged it.
    steps: Vec<Histogram<u64>>,
    /// The AWS calls (DynamoDB included) most revokes made, from the
    /// grant recorded to the revoke logged: the revoke's own, and what
    /// else ran meanwhile.
    calls: String,
    /// Whole-log `audit export`s run alongside.
    exports: usize,
}

/// `revoke_cycles` grants of `revoke_life`, one after another, each left
/// to expire and be revoked by the scheduler; users `U0HS{tag}{i}`.
async fn expiring_grants(w: &E2e, tag: &str, c: &Counts) -> Revokes {
    let (n, life) = (c.revoke_cycles, c.revoke_life);
    let from = wall_now();
    let mut out = Revokes {
        recorded: histogram(),
        gone: histogram(),
        steps: REVOKE_STEPS.iter().map(|_| histogram()).collect(),
        calls: String::new(),
        exports: 0,
    };
    let mut calls: HashMap<String, usize> = HashMap::new();
    let mut seen = Vec::new();
    for i in 0..n {
        let user = format!("U0HS{tag}{i:02}");
        let principal = principal_of(&user);
        let (id, ts) = w.request(&user, &format!("{}s", life.as_secs())).await;
        w.approve(&id, &ts).await;
        wait_logged(&w.server, &id, "grant step recorded").await;
        let before = w.proxy.counts();
        // The expiry is under `life` from here; watch from a little before.
        tokio::time::sleep(life.saturating_sub(Duration::from_millis(400))).await;
        let gone = w
            .wait_access(&principal, false, Duration::from_secs(30))
            .await;
        let fields = wait_logged(&w.server, &id, "revoked").await;
        *calls
            .entry(w.proxy.counts().since(&before).describe(""))
            .or_default() += 1;
        for (h, step) in out.steps.iter_mut().zip(REVOKE_STEPS) {
            let ms = fields[format!("{step}_ms")]
                .as_f64()
                .unwrap_or_else(|| panic!("{id}: no {step}_ms in {fields}"));
            record(h, Duration::from_secs_f64(ms / 1e3));
        }
        seen.push((id, gone));
    }
    out.calls = calls
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(calls, _)| calls)
        .unwrap_or_default();
    // One read of the audit log, after the revokes, of this run's events.
    let from_text = from
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{e}"));
    let audit = w
        .server
        .json_lines(&["audit", "export", "--since", &from_text])
        .await;
    let event = |id: &str, name: &str| {
        audit
            .iter()
            .find(|e| e["event"] == name && e["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} has no {name} event"))
            .clone()
    };
    for (id, gone) in seen {
        let expires = parse_ts(&event(&id, "granted")["details"]["expires_at"]);
        let revoked = parse_ts(&event(&id, "revoked")["ts"]);
        record(&mut out.recorded, since(expires, revoked));
        record(&mut out.gone, since(expires, gone));
    }
    out
}

/// Expiry → `revoked` on one backend: `revoke_cycles` revokes on an empty
/// store, then, after the server is stopped, `revoke_history` ended
/// requests written through the store API and the server started again,
/// as many more.
async fn fig7_revokes(
    c: &Counts,
    backend: &str,
    table: Option<&str>,
) -> (Revokes, Revokes, Revokes) {
    let users: Vec<String> = ["E", "H", "X"]
        .iter()
        .flat_map(|tag| (0..c.revoke_cycles).map(move |i| format!("U0HS{tag}{i:02}")))
        .collect();
    let config = match table {
        Some(table) => CONFIG.replace(
            "[store]\n",
            &format!("[store]\nbackend = \"dynamodb\"\ntable = \"{table}\"\n"),
        ),
        None => CONFIG.to_string(),
    };
    let mut w = E2e::start_on(&users, &config, AWS_DELAY, table).await;
    let empty = expiring_grants(&w, "E", c).await;
    w.server.stop().await;
    let seeding = Instant::now();
    // Ids far above any the bench's other seeds use; the server's own are
    // random.
    let first = 5_000_000;
    // The history is the measured users' own, as a team that keeps asking
    // leaves it: anything read per principal meets all of it.
    let principal = |i: usize| principal_of(&users[i % users.len()]);
    match table {
        Some(table) => {
            let store =
                tollgate::store::DynamoStore::new(dynamo_client(&w.ms.endpoint).await, table);
            seed_ended(&store, first, c.revoke_history, &principal).await;
        }
        None => {
            let store = open_store(&w._dir.path().join("data")).await;
            seed_ended(&store, first, c.revoke_history, &principal).await;
            store.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
        }
    }
    eprintln!(
        "bench: 7 {backend}: seeded {} ended requests in {:.1} s",
        c.revoke_history,
        seeding.elapsed().as_secs_f64()
    );
    w.server = Server::spawn_with(
        w._dir.path(),
        &config,
        w.proxy.aws_env(),
        &w.slack.api_url(),
        &[],
    );
    w.server.wait_ready(Duration::from_secs(60)).await;
    let full = expiring_grants(&w, "H", c).await;
    // And while an operator's `audit export` of the whole log runs in a
    // loop: the load the issue's own measurement put on the server.
    let exporting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let exporter = {
        let (config, env) = (w.server.config_path.clone(), w.server.env.clone());
        let exporting = exporting.clone();
        tokio::spawn(async move {
            let mut exports = 0;
            while exporting.load(std::sync::atomic::Ordering::SeqCst) {
                cli_at(&config, &env, &["audit", "export"]).await;
                exports += 1;
            }
            exports
        })
    };
    let mut loaded = expiring_grants(&w, "X", c).await;
    exporting.store(false, std::sync::atomic::Ordering::SeqCst);
    loaded.exports = exporter.await.unwrap_or_else(|e| panic!("exporter: {e}"));
    (empty, full, loaded)
}

fn fig7_revoke_rows(
    backend: &str,
    empty: &Revokes,
    full: &Revokes,
    c: &Counts,
    rows: &mut Vec<Row>,
) {
    let history = c.revoke_history;
    let (e50, _, _) = pcts(&empty.recorded);
    let (f50, _, _) = pcts(&full.recorded);
    let ratio = f50 as f64 / e50.max(1) as f64;
    rows.push(
        Row::new(
            "7",
            format!(
                "{backend}, real binary: grant expiry → `revoked` audit event, {} revokes, with {history} ended requests, p50/p99/max",
                c.revoke_cycles
            ),
            fmt_pcts(&full.recorded),
        )
        .baseline(format!("0 ended: {}", fmt_pcts(&empty.recorded)))
        .ratio(ratio)
        .target("ratio (p50) ≤ 1.2", ratio <= 1.2),
    );
    let (e50, _, _) = pcts(&empty.gone);
    let (f50, _, _) = pcts(&full.gone);
    rows.push(
        Row::new(
            "7",
            format!("{backend}, real binary: grant expiry → policy gone for a separate client, with {history} ended, p50/p99/max"),
            fmt_pcts(&full.gone),
        )
        .baseline(format!("0 ended: {}", fmt_pcts(&empty.gone)))
        .ratio(f50 as f64 / e50.max(1) as f64),
    );
    let breakdown = |r: &Revokes| {
        REVOKE_STEPS
            .iter()
            .zip(&r.steps)
            .map(|(step, h)| format!("{step} {}", fmt_ms(pcts(h).0)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let total = |r: &Revokes| r.steps.iter().map(|h| pcts(h).0).sum::<u64>();
    rows.push(
        Row::new(
            "7",
            format!("{backend}, real binary: where a revoke's time goes, from the server's log (p50 per step), with {history} ended; AWS calls from grant to revoke: {}", full.calls),
            breakdown(full),
        )
        .baseline(format!("0 ended: {}; calls: {}", breakdown(empty), empty.calls))
        .ratio(total(full) as f64 / total(empty).max(1) as f64),
    );
}

async fn fig7_end_to_end(c: &Counts, rows: &mut Vec<Row>) {
    for (backend, table) in [
        ("sled", None),
        ("DynamoDB (MiniStack)", Some("tollgate-bench")),
    ] {
        let (empty, full, loaded) = fig7_revokes(c, backend, table).await;
        fig7_revoke_rows(backend, &empty, &full, c, rows);
        let (e50, _, _) = pcts(&empty.recorded);
        let (l50, _, _) = pcts(&loaded.recorded);
        rows.push(
            Row::new(
                "7",
                format!(
                    "{backend}, real binary: grant expiry → `revoked`, with {} ended and a whole-log `audit export` in a loop alongside ({} exports); where the time went: {}",
                    c.revoke_history,
                    loaded.exports,
                    REVOKE_STEPS
                        .iter()
                        .zip(&loaded.steps)
                        .map(|(step, h)| format!("{step} {}", fmt_ms(pcts(h).0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                fmt_pcts(&loaded.recorded),
            )
            .baseline(format!("0 ended, no export: {}", fmt_pcts(&empty.recorded)))
            .ratio(l50 as f64 / e50.max(1) as f64),
        );
    }
}

// ---------------------------------------------------------------------------
// 8. A reconcile pass over a crowded cluster.

/// `tollgate_reconcile_passes_total` for the bench cluster.
async fn reconcile_passes(server: &Server, client: &reqwest::Client) -> u64 {
    let Ok(resp) = client.get(&server.metrics_url).send().await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| {
            l.starts_with("tollgate_reconcile_passes_total{")
                && l.contains(&format!("cluster=\"{CLUSTER}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Waits until the pass count moves past `after`; the new count.
async fn next_pass(server: &Server, client: &reqwest::Client, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = reconcile_passes(server, client).await;
        if now > after {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no reconcile pass after {after} within 60 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn fig8_reconcile(c: &Counts, rows: &mut Vec<Row>) {
    let users: Vec<String> = (0..c.reconcile_active)
        .map(|i| format!("U0RC{i:03}"))
        .collect();
    let config = CONFIG.replace(
        "approval_timeout = \"1h\"",
        "approval_timeout = \"1h\"\nreconcile_interval = \"2s\"",
    );
    let w = E2e::start(&users, &config, Duration::ZERO).await;
    // The Tollgate entries the store does not know (another installation's,
    // or marks copied by hand) and everyone else's, made behind Tollgate's
    // back. A new cluster already has one entry (the account root).
    let foreign_marked = c.reconcile_marked - c.reconcile_active;
    let others = c.reconcile_entries - c.reconcile_marked - 1;
    for i in 0..foreign_marked + others {
        let principal = format!("arn:aws:iam::000000000000:role/standing-{i}");
        let mut body = json!({"principalArn": principal, "type": "STANDARD"});
        if i < foreign_marked {
            body["tags"] = json!({
                "managed-by": "tollgate",
                "tollgate-grant": format!("R-{}", id_for(900_000 + i).as_str()),
                "tollgate-instance": "tollgate",
            });
        }
        let path = format!("/clusters/{CLUSTER}/access-entries");
        let (status, answer) = w.ms.eks_json("POST", &path, Some(body)).await;
        assert_eq!(status, 200, "CreateAccessEntry: {answer}");
    }
    // The live grants: one entry each, made by Tollgate.
    for user in &users {
        let (id, ts) = w.request(user, "1h").await;
        w.approve(&id, &ts).await;
        w.wait_granted(&id).await;
    }
    // Counted page by page through the proxy, which pages them as EKS
    // does (100 a page; MiniStack alone answers the first 100 only).
    let mut entries = 0;
    let mut token = None;
    loop {
        let page = w
            .aws
            .eks
            .list_access_entries()
            .cluster_name(CLUSTER)
            .set_next_token(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListAccessEntries: {e}"));
        entries += page.access_entries().len();
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(entries, c.reconcile_entries, "the cluster's entries");

    // A whole pass, not the first: from the end of one to the end of the
    // next.
    let client = reqwest::Client::new();
    let k = reconcile_passes(&w.server, &client).await;
    let k = next_pass(&w.server, &client, k).await;
    let before = w.proxy.counts();
    let k2 = next_pass(&w.server, &client, k).await;
    let pass = w.proxy.counts().since(&before);
    assert_eq!(k2, k + 1, "one pass measured");
    let audit = w.audit().await;
    assert!(
        !audit.iter().any(|e| e["event"] == "reconciled"),
        "the reconciler removed nothing"
    );
    drop(w);

    let pages = pass
        .calls
        .get("eks:ListAccessEntries")
        .copied()
        .unwrap_or(0);
    let calls = pass.of("eks:") + pass.of("sts:");
    let bound = pages + c.reconcile_active as u64;
    rows.push(
        Row::new(
            "8",
            format!(
                "AWS calls of one reconcile pass (not the first) over a cluster of {} access entries ({} marked as Tollgate's, {} of them live grants in the store): {}",
                c.reconcile_entries,
                c.reconcile_marked,
                c.reconcile_active,
                pass.describe("")
            ),
            calls.to_string(),
        )
        .baseline(format!("{pages} list pages + {} entries the store knows = {bound}", c.reconcile_active))
        .ratio(calls as f64 / bound.max(1) as f64)
        .target("≤ list pages + entries the store knows", calls <= bound),
    );
}

// ---------------------------------------------------------------------------
// 10. Cards of an incident: many requests over several approval channels.

/// The bench configuration with `channels` clusters, `bench-0`…, each with
/// its own approval channel `C0CARDS0`….
fn channels_config(channels: usize) -> String {
    let head = CONFIG
        .split("[[clusters]]")
        .next()
        .unwrap_or_else(|| panic!("CONFIG has clusters"));
    let mut config = head.to_string();
    for k in 0..channels {
        config.push_str(&format!(
            r#"
[[clusters]]
name = "bench-{k}"
region = "us-east-1"
account_id = "000000000000"
assume_role_arn = "arn:aws:iam::000000000000:role/tollgate"
approval_channel = "C0CARDS{k}"
approvers = ["U0APP"]
default_role = "view"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#
        ));
    }
    config
}

/// Waits (at most `within`) for `count` cards posted to the channels
/// `channel` accepts, and asserts there is one per request; when the last
/// was posted (`None` for no card at all).
async fn last_card(
    slack: &SlackStandIn,
    server: &Server,
    count: usize,
    within: Duration,
    channel: impl Fn(&str) -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let cards: Vec<Instant> = slack
            .calls_to("chat.postMessage")
            .iter()
            .filter(|call| {
                call.status == 200 && call.params["channel"].as_str().is_some_and(&channel)
            })
            .map(|call| call.at)
            .collect();
        if cards.len() >= count {
            assert_eq!(cards.len(), count, "one card per request");
            return cards.into_iter().max();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} cards posted after {within:?}:\n{}",
            cards.len(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fig10_cards(c: &Counts, rows: &mut Vec<Row>) {
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    // Slack: about one message a second per channel, short bursts allowed.
    slack.limit_channels(1.0, SLACK_BURST);
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    for k in 0..c.card_channels {
        slack.add_channel(&format!("C0CARDS{k}"), true);
    }
    let users = add_users(&slack, "U0CARD", c.cards);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut server = Server::spawn_with(
        dir.path(),
        &channels_config(c.card_channels),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/slack/commands", server.base);
    let response_url = slack.response_url("cards");

    // Every request at once, spread evenly over the channels.
    let started = Instant::now();
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let client = client.clone();
            let url = url.clone();
            let body = slash_body(
                user,
                &format!("eks bench-{} 1h view incident", i % c.card_channels),
                &response_url,
            );
            tokio::spawn(async move {
                let resp = post_signed(&client, &url, SIGNING_SECRET, body).await;
                let text = resp.text().await.unwrap_or_default();
                assert!(
                    text.contains("R-") || text.contains(WORKING),
                    "not a receipt: {text}"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("request task: {e}"));
    }
    let last = last_card(
        &slack,
        &server,
        c.cards,
        Duration::from_secs(180),
        |channel| channel.starts_with("C0CARDS"),
    )
    .await
    .unwrap_or(started);
    let limited = slack
        .calls()
        .iter()
        .filter(|call| call.method == "chat.postMessage" && call.status == 429)
        .count();
    server.stop().await;

    let took = last.duration_since(started);
    // What Slack's limit allows at best: each channel's burst at once, then
    // one a second.
    let per_channel = c.cards.div_ceil(c.card_channels);
    let floor = per_channel.saturating_sub(SLACK_BURST as usize) as f64;
    rows.push(
        Row::new(
            "10",
            format!(
                "{} requests at once over {} approval channels, Slack stand-in allowing 1 message/s per channel after a burst of {SLACK_BURST} (429 + Retry-After beyond; {limited} answered 429): first command sent → last card posted",
                c.cards, c.card_channels
            ),
            format!("{:.2} s", took.as_secs_f64()),
        )
        .baseline(format!("Slack's limit at best: {floor:.0} s"))
        .ratio(took.as_secs_f64() / floor.max(1.0))
        .target("≤ 30 s", took <= Duration::from_secs(30)),
    );
}

// ---------------------------------------------------------------------------
// 11. Incident storm: first-time requesters while users.info is limited.

/// The acknowledgement of a command whose work waits on Slack; the outcome
/// follows through its response_url.
const WORKING: &str = "Working on it";

/// A command's outcome: its HTTP answer, or what followed through the
/// response_url `reply` when that answer said "working on it".
async fn outcome(slack: &SlackStandIn, answer: &str, reply: &str, within: Duration) -> String {
    if !answer.starts_with(WORKING) {
        return answer.to_string();
    }
    let method = format!("response:{reply}");
    let call = slack.wait_for_call(&method, |_| true, within).await;
    call.params["text"].as_str().unwrap_or_default().to_string()
}

/// Sends `text` as `user` at `at`; the HTTP answer's text and how long
/// the answer took.
async fn command_at(
    client: reqwest::Client,
    url: String,
    user: String,
    text: String,
    response_url: String,
    at: tokio::time::Instant,
) -> (String, Duration) {
    tokio::time::sleep_until(at).await;
    let body = slash_body(&user, &text, &response_url);
    let started = Instant::now();
    let resp = post_signed(&client, &url, SIGNING_SECRET, body).await;
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 200, "{user}");
    let json: Value = resp.json().await.unwrap_or_default();
    (json["text"].as_str().unwrap_or_default().to_string(), took)
}

fn told_to_try_again(text: &str) -> bool {
    text.to_lowercase().contains("try again")
}

async fn fig11_incident(c: &Counts, rows: &mut Vec<Row>) {
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    // Slack's Tier 4 for users.info (a bucket of 100, 100 a minute) and one
    // message a second per channel after a short burst.
    slack.limit_method("users.info", support::slack::TIER_4, c.incident_bucket);
    slack.limit_channels(c.incident_speedup, SLACK_BURST);
    slack.add_user(APPROVER, "approver@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let users = add_users(&slack, "U0INC", c.incident);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut server = Server::spawn(
        dir.path(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/slack/commands", server.base);

    // Evenly spread over the first seconds of the incident.
    let gap = c.incident_spread / c.incident as u32;
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            tokio::spawn(command_at(
                client.clone(),
                url.clone(),
                user.clone(),
                "eks bench-cluster 1h view incident".into(),
                slack.response_url(&format!("inc-{user}")),
                start + gap * i as u32,
            ))
        })
        .collect();
    let mut acks = histogram();
    let (mut working, mut try_again, mut ids) = (0, 0, Vec::new());
    for (user, task) in users.iter().zip(tasks) {
        let (answer, took) = task.await.unwrap_or_else(|e| panic!("request task: {e}"));
        record(&mut acks, took);
        working += usize::from(answer.starts_with(WORKING));
        let text = outcome(
            &slack,
            &answer,
            &format!("inc-{user}"),
            Duration::from_secs(300),
        )
        .await;
        try_again += usize::from(told_to_try_again(&answer) || told_to_try_again(&text));
        assert!(text.contains("sent to"), "{user} got no receipt: {text}");
        ids.push(receipt_id(&text).unwrap_or_default());
    }
    let last = last_card(
        &slack,
        &server,
        c.incident,
        Duration::from_secs(600),
        |channel| channel == CHANNEL,
    )
    .await
    .unwrap_or(started);
    let posted = slack.calls_to("chat.postMessage");
    let missing = ids
        .iter()
        .filter(|id| {
            !posted
                .iter()
                .any(|call| call.status == 200 && call.params.to_string().contains(id.as_str()))
        })
        .count();
    assert_eq!(missing, 0, "every request's card is posted");
    let limited = slack.rate_limited_calls("users.info");
    server.stop().await;

    let (_, _, max) = pcts(&acks);
    assert!(limited > 0, "the storm met users.info's limit");
    assert_eq!(try_again, 0, "nobody is told to try again");
    rows.push(
        Row::new(
            "11",
            format!(
                "incident storm: {} first-time requesters within {} s, Slack stand-in users.info {} a minute from a bucket of {} (429 + Retry-After beyond: {limited} answered 429); ack p50/p99/max; {working} answered \"working on it\" and sent their receipt through response_url; told to try again: {try_again}",
                c.incident,
                c.incident_spread.as_secs(),
                support::slack::TIER_4 as u64,
                c.incident_bucket,
            ),
            fmt_pcts(&acks),
        )
        .baseline("Slack's answer window: 3000 ms")
        .ratio(ms(max) / 3000.0)
        .target("max ≤ 3 s, none told to try again", ms(max) <= 3000.0 && try_again == 0),
    );
    let took = last.duration_since(started);
    // One channel: the burst at once, then one message a second (sped up
    // in smoke); never sooner than the last request arrives.
    let floor = ((c.incident.saturating_sub(SLACK_BURST as usize)) as f64 / c.incident_speedup)
        .max(c.incident_spread.as_secs_f64());
    rows.push(
        Row::new(
            "11",
            format!(
                "the same storm: first command sent → last of {} cards posted in one approval channel ({} message/s after a burst of {SLACK_BURST})",
                c.incident, c.incident_speedup
            ),
            format!("{:.2} s", took.as_secs_f64()),
        )
        .baseline(format!("Slack's per-channel limit at best: {floor:.0} s"))
        .ratio(took.as_secs_f64() / floor.max(1.0))
        .target("every card posted", missing == 0),
    );
}

// ---------------------------------------------------------------------------
// 13. `/access clusters` spam under usergroups.users.list's Tier 2.

/// Figure 13's cluster: approvers, requesters and break-glass all named
/// by user group. `commands_per_minute` is raised past the spam: the
/// default 20 would refuse a third of it before any group lookup, and the
/// figure is about what reaches Slack.
fn groups_config() -> String {
    let config = CONFIG
        .replace(r#"approvers = ["U0APP"]"#, r#"approvers = ["S0ONCALL"]"#)
        .replace(
            "default_role = \"view\"\n",
            "default_role = \"view\"\n\n[clusters.break_glass]\nallowed = [\"S0ONCALL\"]\nmax_duration = \"1h\"\n",
        )
        .replace(
            "access_policy = \"AmazonEKSViewPolicy\"\n",
            "access_policy = \"AmazonEKSViewPolicy\"\nrequesters = [\"S0DEVS\", \"S0ONCALL\"]\n",
        );
    format!("{config}\n[slack]\ncommands_per_minute = 100\n")
}

/// Waits for request `id`'s audit event `name`; when it was seen.
async fn audit_seen(server: &Server, id: &str, name: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let audit = server.json_lines(&["audit", "export"]).await;
        if audit
            .iter()
            .any(|e| e["event"] == name && e["request_id"] == id)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{id} has no {name} event within {within:?}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fig13_groups(c: &Counts, rows: &mut Vec<Row>) {
    let per_minute = support::slack::TIER_2 * c.spam_speedup;
    let groups = |slack: &SlackStandIn| {
        slack.add_usergroup("S0DEVS", &["U0DEV"]);
        slack.add_usergroup("S0ONCALL", &["U0ONC"]);
        slack.limit_method("usergroups.users.list", per_minute, c.spam_bucket);
    };
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    groups(&slack);
    slack.add_user("U0DEV", "dev@example.com", "UTC", 0);
    slack.add_user("U0ONC", "oncall@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    // Baseline: the lookups the same commands cost with nothing remembered
    // (one per requester group per command, as before the directory),
    // against a stand-in of its own with the same limits, at the same times.
    let uncached = SlackStandIn::start(BOT_TOKEN).await;
    groups(&uncached);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut server = Server::spawn_with(
        dir.path(),
        &groups_config(),
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/slack/commands", server.base);

    let gap = c.spam_spread / c.spam as u32;
    let start = tokio::time::Instant::now();
    let baseline = {
        let (client, api) = (client.clone(), uncached.api_url());
        let n = c.spam;
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep_until(start + gap * i as u32).await;
                for group in ["S0DEVS", "S0ONCALL"] {
                    let _ = client
                        .post(format!("{api}usergroups.users.list"))
                        .bearer_auth(BOT_TOKEN)
                        .form(&[("usergroup", group)])
                        .send()
                        .await;
                }
            }
        })
    };
    let tasks: Vec<_> = (0..c.spam)
        .map(|i| {
            tokio::spawn(command_at(
                client.clone(),
                url.clone(),
                "U0DEV".into(),
                "clusters".into(),
                slack.response_url(&format!("clusters-{i}")),
                start + gap * i as u32,
            ))
        })
        .collect();
    let mut acks = histogram();
    let mut offered = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (answer, took) = task.await.unwrap_or_else(|e| panic!("command task: {e}"));
        record(&mut acks, took);
        let text = outcome(
            &slack,
            &answer,
            &format!("clusters-{i}"),
            Duration::from_secs(120),
        )
        .await;
        offered += usize::from(text.contains(CLUSTER));
    }
    baseline
        .await
        .unwrap_or_else(|e| panic!("baseline task: {e}"));
    let lookups = slack.calls_to("usergroups.users.list").len();
    let base_calls = uncached.calls_to("usergroups.users.list").len();
    let base_limited = uncached.rate_limited_calls("usergroups.users.list");

    // Right after the spam: a member requests, a group approver approves.
    let (answer, _) = command_at(
        client.clone(),
        url.clone(),
        "U0DEV".into(),
        "eks bench-cluster 1h view deploy".into(),
        slack.response_url("request"),
        tokio::time::Instant::now(),
    )
    .await;
    let receipt = outcome(&slack, &answer, "request", Duration::from_secs(120)).await;
    let id = receipt_id(&receipt).unwrap_or_else(|| panic!("no receipt: {receipt}"));
    let ts = slack.card_ts(CHANNEL, &id, Duration::from_secs(60)).await;
    let body = action_body(
        "U0ONC",
        "approve",
        &id,
        CHANNEL,
        &ts,
        &slack.response_url("click"),
    );
    let clicked = Instant::now();
    let status = post_signed(
        &client,
        &format!("{}/slack/interactions", server.base),
        SIGNING_SECRET,
        body,
    )
    .await
    .status();
    assert_eq!(status.as_u16(), 200);
    let approved = audit_seen(&server, &id, "granted", Duration::from_secs(120))
        .await
        .duration_since(clicked);
    let refused: Vec<String> = slack
        .calls_to("response:click")
        .iter()
        .map(|call| call.params["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        refused.is_empty(),
        "the group approver was refused: {refused:?}"
    );

    // And a group member breaks glass.
    let sent = Instant::now();
    let (answer, _) = command_at(
        client.clone(),
        url.clone(),
        "U0ONC".into(),
        "eks bench-cluster 30m --break-glass INC-13 storm".into(),
        slack.response_url("glass"),
        tokio::time::Instant::now(),
    )
    .await;
    let receipt = outcome(&slack, &answer, "glass", Duration::from_secs(120)).await;
    assert!(receipt.contains("Break-glass"), "{receipt}");
    let glass_id = receipt_id(&receipt).unwrap_or_else(|| panic!("no receipt: {receipt}"));
    let glass = audit_seen(&server, &glass_id, "granted", Duration::from_secs(120))
        .await
        .duration_since(sent);
    let limited = slack.rate_limited_calls("usergroups.users.list");
    server.stop().await;

    assert_eq!(
        offered, c.spam,
        "every `/access clusters` offers the cluster"
    );
    let (_, _, max) = pcts(&acks);
    rows.push(
        Row::new(
            "13",
            format!(
                "`/access clusters` {} times in {} s by one member (2 requester groups), Slack stand-in usergroups.users.list {} a minute from a bucket of {}: Tollgate's group lookups ({limited} answered 429); commands offering the cluster {offered}/{}; ack max {}",
                c.spam,
                c.spam_spread.as_secs(),
                per_minute as u64,
                c.spam_bucket,
                c.spam,
                fmt_ms(max),
            ),
            lookups.to_string(),
        )
        .baseline(format!(
            "one lookup per group per command, same limits: {base_calls} calls, {base_limited} answered 429"
        ))
        .ratio(lookups as f64 / base_calls.max(1) as f64)
        .target(
            "every command offers the cluster",
            offered == c.spam,
        ),
    );
    rows.push(
        Row::new(
            "13",
            "right after: group approver's Approve click → granted; group member's break-glass command → granted (dry run)",
            format!(
                "{} / {} ms",
                approved.as_millis(),
                glass.as_millis()
            ),
        )
        .target("both granted", true),
    );
}

// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 12. A flood of stalled connections beside valid commands and an expiry.

/// Opens `n` connections that each send a request head declaring a 60 KiB
/// body and 1 KiB of it, then stall; they are held until dropped. Any the
/// server refuses or closes are simply no longer held.
async fn stalled_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST /slack/commands HTTP/1.1\r\nhost: tollgate\r\n\
         content-type: application/x-www-form-urlencoded\r\ncontent-length: 61440\r\n\
         x-slack-request-timestamp: {}\r\nx-slack-signature: v0={}\r\n\r\n{}",
        wall_now().unix_timestamp(),
        "0".repeat(64),
        "a".repeat(1024)
    );
    futures::stream::iter(0..n)
        .map(|_| {
            let (addr, head) = (addr.to_string(), head.clone());
            async move {
                let mut tcp = tokio::net::TcpStream::connect(&addr).await.ok()?;
                tcp.write_all(head.as_bytes()).await.ok()?;
                Some(tcp)
            }
        })
        .buffer_unordered(128)
        .filter_map(|c| async move { c })
        .collect()
        .await
}

/// Each user's `/access eks` spread over `spread`: (time to the receipt,
/// or `None` when it was not answered with one).
async fn spread_commands(
    url: &str,
    users: &[String],
    response_url: &str,
    spread: Duration,
) -> Vec<Option<Duration>> {
    let gap = spread / users.len().max(1) as u32;
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_else(|e| panic!("client: {e}"));
            let url = url.to_string();
            let body = slash_body(user, "eks bench-cluster 1h view flood test", response_url);
            tokio::spawn(async move {
                tokio::time::sleep(gap * i as u32).await;
                let started = Instant::now();
                let resp = post_signed(&client, &url, SIGNING_SECRET, body).await;
                let ok = resp.status().is_success();
                let text = resp.text().await.unwrap_or_default();
                (ok && text.contains("R-")).then(|| started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(None));
    }
    out
}

async fn fig12_flood(c: &Counts, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let data = dir.path().join("data");
    // One grant, expiring 12 s from now: inside the flood below.
    let at_ms = (wall_now() + Duration::from_secs(8)).unix_timestamp_nanos() / 1_000_000;
    seed_child(&[
        "storm".into(),
        data.display().to_string(),
        "0".into(),
        "1".into(),
        at_ms.to_string(),
    ])
    .await;
    let expiry = OffsetDateTime::from_unix_timestamp_nanos((at_ms + 4_000) * 1_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    let slack = SlackStandIn::start(BOT_TOKEN).await;
    slack.add_user(STORM_USER, "storm@example.com", "UTC", 0);
    slack.add_channel(CHANNEL, true);
    let users = add_users(&slack, "U0FLD", 2 * c.flood_valid);
    let config = CONFIG.replacen(
        "listen = \"{listen}\"\n",
        &format!(
            "listen = \"{{listen}}\"\nmax_connections = {}\n",
            c.flood_cap
        ),
        1,
    );
    let mut server = Server::spawn_with(
        dir.path(),
        &config,
        offline_aws_env(),
        &slack.api_url(),
        &["--dry-run"],
    );
    server.wait_ready(Duration::from_secs(60)).await;
    let url = format!("{}/slack/commands", server.base);
    let response_url = slack.response_url("flood");
    let spread = Duration::from_secs(2);
    let (quiet_users, flood_users) = users.split_at(c.flood_valid);

    // Baseline: the same commands with nothing else going on.
    let quiet = spread_commands(&url, quiet_users, &response_url, spread).await;
    let rss_before = server.status_kib("VmRSS");
    assert!(
        wall_now() + Duration::from_secs(4) < expiry,
        "start-up took too long: the expiry must fall inside the flood"
    );

    // The flood, then the valid commands arriving while it is held.
    let addr = server.base.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    let held = stalled_connections(&addr, c.flood).await;
    let open_took = opened.elapsed();
    let opened_count = held.len();
    let flooded = spread_commands(&url, flood_users, &response_url, spread).await;
    let wait_past = expiry + Duration::from_secs(3);
    while wall_now() < wait_past {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_kib = server.status_kib("VmHWM");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .json_lines(&["grants", "list", "--json"])
        .await
        .iter()
        .all(|g| g["state"] == "pending")
    {
        assert!(Instant::now() < deadline, "the grant was never revoked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
    let store = open_store(&data).await;
    let lateness = store
        .audit_since(None)
        .await
        .unwrap_or_default()
        .iter()
        .find(|e| e.event == "revoked")
        .and_then(|e| e.details["lateness_seconds"].as_f64())
        .unwrap_or_else(|| panic!("no revoked event"));

    let histo = |answers: &[Option<Duration>]| {
        let mut h = histogram();
        for d in answers.iter().flatten() {
            record(&mut h, *d);
        }
        h
    };
    let (q, f) = (histo(&quiet), histo(&flooded));
    let answered = flooded.iter().flatten().count();
    let within = flooded
        .iter()
        .flatten()
        .filter(|d| **d <= Duration::from_secs(3))
        .count();
    assert_eq!(
        quiet.iter().flatten().count(),
        quiet.len(),
        "every command is answered without a flood"
    );
    let (_, p99, _) = pcts(&f);
    let (_, quiet_p99, _) = pcts(&q);
    rows.push(
        Row::new(
            "12",
            format!(
                "flood: {} connections stall with 1 KiB of a declared 60 KiB body ({} opened in {:.1} s, max_connections {}); {} valid `/access eks` over 2 s among them → receipt, p50/p99/max",
                c.flood,
                opened_count,
                open_took.as_secs_f64(),
                c.flood_cap,
                c.flood_valid
            ),
            format!("{} ({answered}/{} answered)", fmt_pcts(&f), c.flood_valid),
        )
        .baseline(format!("the same without the flood: {}", fmt_pcts(&q)))
        .ratio(p99 as f64 / quiet_p99.max(1) as f64)
        .target("all within 3 s", within == c.flood_valid),
    );
    rows.push(
        Row::new(
            "12",
            "a grant expiring during the flood: expiry → revoked",
            format!("{:.0} ms", lateness * 1_000.0),
        )
        .target("≤ 2 s", lateness <= 2.0),
    );
    let peak_mib = peak_kib as f64 / 1024.0;
    rows.push(
        Row::new(
            "12",
            "peak RSS (VmHWM) of the server",
            format!("{peak_mib:.1} MiB"),
        )
        .baseline(format!(
            "RSS before the flood: {:.1} MiB",
            rss_before as f64 / 1024.0
        ))
        .ratio(peak_kib as f64 / rss_before.max(1) as f64)
        .target("≤ 128 MiB", peak_mib <= 128.0),
    );
    if c.smoke {
        assert_eq!(
            within, c.flood_valid,
            "valid commands answered during the flood"
        );
        assert!(lateness <= 2.0, "the revoke kept its time: {lateness}");
    }
}

fn print_table(rows: &[Row], smoke: bool, took: Duration) {
    println!();
    println!(
        "Tollgate benchmarks ({} run, {:.0} s)",
        if smoke { "smoke" } else { "full" },
        took.as_secs_f64()
    );
    println!();
    println!("| # | measure | Tollgate | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.figure, r.measure, r.tollgate, r.baseline, r.ratio, r.target, met
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    if args.first().map(String::as_str) == Some("__seed") {
        runtime.block_on(seed_main(&args[1..]));
        return;
    }
    if args.first().map(String::as_str) == Some("__load") {
        support::install_crypto_provider();
        runtime.block_on(load_main(&args[1..]));
        return;
    }
    support::install_crypto_provider();
    // `cargo bench` passes --bench; anything else (cargo test) is the smoke.
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--smoke");
    let counts = if full {
        Counts::full()
    } else {
        Counts::smoke()
    };
    // `--only 1,4` runs some figures (figure 4 measures the store first for
    // its lead time either way).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_string).collect());
    let runs = |figure: &str| only.as_ref().is_none_or(|o| o.iter().any(|f| f == figure));
    let started = Instant::now();
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        if runs("1") {
            eprintln!("bench: 1/10 ack latency");
            fig1_ack(&counts, &mut rows).await;
        }
        let mut rate = 0.0;
        if runs("2") || runs("4") {
            eprintln!("bench: 2/10 store");
            rate = fig2_store(&counts, &mut rows).await;
        }
        if runs("3") || runs("9") {
            eprintln!("bench: 3, 9/10 scale, /metrics");
            fig3_scale(&counts, &mut rows).await;
        }
        if runs("4") {
            eprintln!("bench: 4/10 expiry storm");
            fig4_storm(&counts, &mut rows, rate).await;
        }
        if runs("5") || runs("6") {
            eprintln!("bench: 5-6/10 MiniStack");
            fig5_and_6(&counts, &mut rows).await;
        }
        if runs("7") {
            eprintln!("bench: 7/10 grant + revoke with history");
            fig7_history(&counts, &mut rows).await;
            eprintln!("bench: 7/10 expiry → revoked with history, real binary");
            fig7_end_to_end(&counts, &mut rows).await;
        }
        if runs("8") {
            eprintln!("bench: 8/10 reconcile pass");
            fig8_reconcile(&counts, &mut rows).await;
        }
        if runs("10") {
            eprintln!("bench: 10/10 cards over several channels");
            fig10_cards(&counts, &mut rows).await;
        }
        if runs("11") {
            eprintln!("bench: 11 incident storm under users.info's Tier 4");
            fig11_incident(&counts, &mut rows).await;
        }
        if runs("12") {
            eprintln!("bench: 12 a flood of stalled connections");
            fig12_flood(&counts, &mut rows).await;
        }
        if runs("13") {
            eprintln!("bench: 13 `/access clusters` spam under Tier 2");
            fig13_groups(&counts, &mut rows).await;
        }
        rows
    });
    print_table(&rows, counts.smoke, started.elapsed());
}
