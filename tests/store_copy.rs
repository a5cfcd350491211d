//! `tollgate store init`, `check` and `store copy` as an operator runs them:
//! a sled store with a few hundred requests moves to DynamoDB (MiniStack),
//! which then serves the same rows and exports the same audit log.

mod support;

use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::macros::datetime;
use time::OffsetDateTime;

use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use tollgate::domain::audit::AuditEvent;
use tollgate::domain::grant::{Baselines, Scope};
use tollgate::domain::request::{
    AccessSpec, Asked, Request, RequestId, Requester, RevokeIntent, RevokeReason, State,
};
use tollgate::store::{DynamoStore, SledStore, Store};

use support::ministack::MiniStack;

const T0: OffsetDateTime = datetime!(2026-11-23 12:00 UTC);
const REQUESTS: usize = 300;

const CONFIG: &str = r#"
[store]
STORE

[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[[clusters]]
name = "prod"
region = "us-east-1"
account_id = "000000000000"
approval_channel = "C0APPROVALS"
approvers = ["U0APP"]
default_role = "view"
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

fn write_config(path: &Path, store: &str) {
    std::fs::write(path, CONFIG.replace("STORE", store)).unwrap();
}

fn tollgate(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

async fn run(args: &[&str], env: &[(String, String)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env = env.to_vec();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tollgate(&args, &env)
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn request(n: usize) -> Request {
    let id = RequestId::parse(&format!("{:05}", n)).unwrap();
    let states = [
        State::Pending,
        State::Approved,
        State::Active,
        State::Revoked,
        State::Denied,
        State::RevokeFailed,
    ];
    let state = states[n % states.len()];
    let at = T0 + time::Duration::seconds(n as i64);
    let active = matches!(state, State::Active | State::RevokeFailed | State::Revoked);
    let mut req = Request::pending(
        Asked {
            id,
            requester: Requester {
                user_id: format!("U{n}"),
                email: format!("u{n}@example.com"),
                tz: Some("Europe/Paris".into()),
                tz_offset_secs: 3600,
            },
            access: AccessSpec {
                cluster: "prod".into(),
                role: "view".into(),
                principal: format!("arn:aws:iam::000000000000:role/u{n}"),
                policy_arn: Some(
                    "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy".into(),
                ),
                namespaces: if n.is_multiple_of(3) {
                    vec!["team-a".into()]
                } else {
                    vec![]
                },
                cluster_role: None,
                groups: vec![],
                k8s_user: None,
                strategy: None,
            },
            reason: format!("ticket {n}"),
            duration: Duration::from_secs(3600),
            approval_timeout: Duration::from_secs(30 * 60),
            required_approvals: 1,
            response_url: None,
        },
        at,
    );
    req.state = state;
    req.version = (n % 4) as u64;
    req.approved_at = (state != State::Pending).then_some(at);
    req.activated_at = active.then_some(at);
    req.expires_at = active.then_some(at + time::Duration::hours(1));
    req.ended_at = (state == State::Revoked || state == State::Denied).then_some(at);
    req.revoke = (n % 10 == 2).then(|| RevokeIntent {
        reason: RevokeReason::Early,
        by: "U0ADMIN".into(),
        note: Some("done".into()),
        at,
    });
    req
}

async fn fill(store: &dyn Store) {
    for n in 0..REQUESTS {
        let r = request(n);
        let at = r.created_at;
        let mut events = vec![AuditEvent::for_request(
            &r,
            "requested",
            &r.requester.user_id,
            at,
            json!({"n": n}),
        )];
        if n.is_multiple_of(2) {
            events.push(AuditEvent::for_request(
                &r,
                "approved",
                "U0APP",
                at,
                json!({}),
            ));
        }
        store.create(&r, events).await.unwrap();
        // Every fifth write shares its instant with the one before.
        if n.is_multiple_of(5) {
            store
                .append_audit(vec![AuditEvent::for_request(
                    &r,
                    "drift",
                    "tollgate",
                    at,
                    json!({}),
                )])
                .await
                .unwrap();
        }
        if n.is_multiple_of(7) {
            let b = Baselines::from([
                (
                    "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy".to_string(),
                    None,
                ),
                (
                    "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy".to_string(),
                    Some(Scope::from_namespaces(["x"])),
                ),
            ]);
            store
                .record_baselines("prod", &r.access.principal, &b)
                .await
                .unwrap();
        }
    }
}

async fn dynamo(ms: &MiniStack, table: &str) -> DynamoStore {
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
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table)
}

/// Another process holding the sled directory (its lock is released a
/// moment after the handle drops) makes the copy fail; retried until a
/// deadline rather than slept on.
async fn copy(from: &str, to: &str, env: &[(String, String)]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(
            &["store", "copy", "--from-config", from, "--to-config", to],
            env,
        )
        .await;
        let locked = String::from_utf8_lossy(&out.stderr).contains("cannot open");
        if out.status.success() || !locked || Instant::now() >= deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_sled_to_dynamodb_and_is_idempotent() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let env = ms.aws_env();
    let dir = tempfile::tempdir().unwrap();
    let sled_dir = dir.path().join("sled");
    let sled_cfg = dir.path().join("sled.toml");
    let dyn_cfg = dir.path().join("dynamodb.toml");
    write_config(
        &sled_cfg,
        &format!("path = {:?}", sled_dir.display().to_string()),
    );
    write_config(
        &dyn_cfg,
        &format!(
            "backend = \"dynamodb\"\ntable = \"tollgate\"\npath = {:?}",
            dir.path().join("dyn-socket").display().to_string()
        ),
    );
    let (sled_cfg, dyn_cfg) = (
        sled_cfg.display().to_string(),
        dyn_cfg.display().to_string(),
    );

    {
        let sled = SledStore::open(&sled_dir).unwrap();
        fill(&sled).await;
        sled.flush().await.unwrap();
    }

    // Before init: check names the missing table and the fix.
    let out = run(&["check", "--config", &dyn_cfg], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let store_line = stdout
        .lines()
        .find(|l| l.contains("store:"))
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(
        store_line.starts_with("FAIL")
            && store_line.contains("does not exist")
            && store_line.contains("store init"),
        "{}",
        text(&out)
    );

    let out = run(&["store", "init", "--config", &dyn_cfg], &env).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("created"),
        "{}",
        text(&out)
    );
    let out = run(&["store", "init", "--config", &dyn_cfg], &env).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("already exists"),
        "{}",
        text(&out)
    );
    let out = run(&["check", "--config", &dyn_cfg], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let store_line = stdout
        .lines()
        .find(|l| l.contains("store:"))
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(store_line.starts_with("ok"), "{}", text(&out));

    let started = Instant::now();
    let out = copy(&sled_cfg, &dyn_cfg, &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("first copy in {:?}:\n{report}", started.elapsed());
    assert!(
        report.contains(&format!(
            "requests: {REQUESTS} in source, {REQUESTS} copied, 0 already"
        )),
        "{report}"
    );
    assert!(report.contains("verified"), "{report}");

    let out = copy(&sled_cfg, &dyn_cfg, &env).await;
    assert!(out.status.success(), "{}", text(&out));
    let again = String::from_utf8_lossy(&out.stdout).into_owned();
    for kind in ["requests", "audit events", "baselines"] {
        let line = again
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("{again}"));
        assert!(
            line.contains(" 0 copied"),
            "second run copied something: {again}"
        );
    }

    // The exports, through the CLI, are byte for byte the same.
    let sled_export = run(&["audit", "export", "--config", &sled_cfg], &env).await;
    let dyn_export = run(&["audit", "export", "--config", &dyn_cfg], &env).await;
    assert!(sled_export.status.success(), "{}", text(&sled_export));
    assert!(dyn_export.status.success(), "{}", text(&dyn_export));
    let lines = String::from_utf8_lossy(&sled_export.stdout).lines().count();
    assert!(lines >= REQUESTS, "export has {lines} lines");
    assert_eq!(
        String::from_utf8_lossy(&sled_export.stdout),
        String::from_utf8_lossy(&dyn_export.stdout)
    );

    // And the DynamoDB store serves the same state.
    let target: Arc<dyn Store> = Arc::new(dynamo(&ms, "tollgate").await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let source = loop {
        match SledStore::open(&sled_dir) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => panic!("reopening sled: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut a = source.list().await.unwrap();
    let mut b = target.list().await.unwrap();
    a.sort_by(|x, y| x.id.cmp(&y.id));
    b.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(a.len(), REQUESTS);
    assert_eq!(a, b);
    let far = T0 + time::Duration::days(365);
    assert_eq!(
        source.due(far).await.unwrap(),
        target.due(far).await.unwrap()
    );
    assert_eq!(
        source.next_due().await.unwrap(),
        target.next_due().await.unwrap()
    );
    assert_eq!(
        source.all_baselines().await.unwrap(),
        target.all_baselines().await.unwrap()
    );
    assert_eq!(
        source.audit_since(None).await.unwrap(),
        target.audit_since(None).await.unwrap()
    );
    // Writes carry on from the copied versions.
    let r = target.get(&request(2).id).await.unwrap().unwrap();
    let mut next = r.clone();
    next.reason = "after the move".into();
    assert_eq!(
        target.update(&r, next, vec![]).await.unwrap().version,
        r.version + 1
    );
}

/// `serve` on the DynamoDB backend: refuses to start without the table,
/// then, once `store init` made it, becomes ready and answers the admin CLI
/// from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_the_dynamodb_table() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let slack = support::slack::SlackStandIn::start(support::tollgate::BOT_TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG
        .replace(
            "STORE",
            "backend = \"dynamodb\"\ntable = \"tollgate\"\npath = \"{data}\"",
        )
        .replace(
            "[identity]",
            "[server]\nlisten = \"{listen}\"\n\n[identity]",
        );
    std::fs::create_dir_all(dir.path().join("data")).unwrap();

    // Without the table, start-up stops with the fix in the message.
    let cfg_path = dir.path().join("precheck.toml");
    std::fs::write(
        &cfg_path,
        config
            .replace("{listen}", "127.0.0.1:0")
            .replace("{data}", &dir.path().join("data").display().to_string()),
    )
    .unwrap();
    let mut env = ms.aws_env();
    env.push(("SLACK_BOT_TOKEN".into(), "xoxb-x".into()));
    env.push(("SLACK_SIGNING_SECRET".into(), "s".into()));
    let cfg = cfg_path.display().to_string();
    let out = run(&["serve", "--config", &cfg], &env).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store init"),
        "{}",
        text(&out)
    );
    let out = run(&["store", "init", "--config", &cfg], &env).await;
    assert!(out.status.success(), "{}", text(&out));

    let tollgate =
        support::tollgate::Tollgate::start(dir.path(), &config, &slack.api_url(), &ms).await;
    let client = reqwest::Client::new();
    support::tollgate::wait_until("/readyz", Duration::from_secs(20), || {
        let (client, url) = (client.clone(), format!("{}/readyz", tollgate.base));
        async move {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;

    // A grant placed in the table is what the running server lists.
    let store = dynamo(&ms, "tollgate").await;
    let mut active = request(2);
    active.state = State::Active;
    active.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::hours(1));
    active.revoke = None;
    store.create(&active, vec![]).await.unwrap();
    let config_path = tollgate.config_path.display().to_string();
    let out = run(
        &["grants", "list", "--config", &config_path, "--json"],
        &env,
    )
    .await;
    assert!(out.status.success(), "{}\n{}", text(&out), tollgate.log());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(active.id.as_str()), "{listed}");
}

/// `store prune` on one backend: the events of the requests that ended
/// before the cutoff come out on stdout first, then exactly those rows and
/// events are gone; live and later rows stay; a second run removes nothing.
async fn prune_through_the_cli(
    open: &dyn Fn() -> Arc<dyn Store>,
    config: &str,
    env: &[(String, String)],
) {
    let cutoff = T0 + time::Duration::seconds(150);
    let cutoff_text = "2026-11-23T12:02:30Z";
    let store = open();
    let before_rows = store.list().await.unwrap();
    let before_events = store.audit_entries().await.unwrap();
    let live_before: Vec<RequestId> = store
        .live()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let gone: std::collections::BTreeSet<String> = before_rows
        .iter()
        .filter(|r| r.state.is_terminal() && r.ended_at.is_some_and(|t| t < cutoff))
        .map(|r| r.id.to_string())
        .collect();
    assert!(
        gone.len() > 20,
        "the fixture has ended rows before the cutoff"
    );
    let gone_events: Vec<AuditEvent> = before_events
        .iter()
        .filter(|e| gone.contains(&e.event.request_id))
        .map(|e| e.event.clone())
        .collect();

    drop(store);
    let out = run(
        &[
            "store",
            "prune",
            "--config",
            config,
            "--before",
            cutoff_text,
        ],
        env,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let printed: Vec<AuditEvent> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed, gone_events, "every removed event, in log order");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "removed {} requests that ended before {cutoff_text} and their {} audit events",
            gone.len(),
            gone_events.len()
        )),
        "{}",
        text(&out)
    );

    let store = open();
    let rows = store.list().await.unwrap();
    assert_eq!(rows.len(), before_rows.len() - gone.len());
    assert!(rows.iter().all(|r| !gone.contains(&r.id.to_string())));
    let events = store.audit_entries().await.unwrap();
    assert_eq!(events.len(), before_events.len() - gone_events.len());
    let live_after: Vec<RequestId> = store
        .live()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(live_after, live_before, "live requests are never pruned");

    drop(store);
    let again = run(
        &[
            "store",
            "prune",
            "--config",
            config,
            "--before",
            cutoff_text,
        ],
        env,
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(again.stdout.is_empty(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("removed 0 requests"),
        "{}",
        text(&again)
    );

    let bad = run(
        &[
            "store",
            "prune",
            "--config",
            config,
            "--before",
            "last year",
        ],
        env,
    )
    .await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"),
        "{}",
        text(&bad)
    );
    assert_eq!(open().list().await.unwrap().len(), rows.len());
}

/// The sled directory once the CLI that held it has let go (its lock is
/// released a moment after the process exits).
fn open_sled(dir: &Path) -> Arc<dyn Store> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match SledStore::open(dir) {
            Ok(store) => return Arc::new(store),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("sled store stays locked: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_prune_removes_only_ended_requests_before_the_cutoff() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let env = ms.aws_env();
    let dir = tempfile::tempdir().unwrap();

    // sled: the CLI opens the directory itself, so the test's handle is
    // reopened around each run.
    let sled_dir = dir.path().join("sled");
    let sled_cfg = dir.path().join("sled.toml");
    write_config(
        &sled_cfg,
        &format!("path = {:?}", sled_dir.display().to_string()),
    );
    {
        let sled = SledStore::open(&sled_dir).unwrap();
        fill(&sled).await;
        sled.flush().await.unwrap();
    }
    prune_through_the_cli(
        &|| open_sled(&sled_dir),
        &sled_cfg.display().to_string(),
        &env,
    )
    .await;

    let dyn_cfg = dir.path().join("dynamodb.toml");
    write_config(
        &dyn_cfg,
        &format!(
            "backend = \"dynamodb\"\ntable = \"pruned\"\npath = {:?}",
            dir.path().join("dyn-socket").display().to_string()
        ),
    );
    let dyn_cfg = dyn_cfg.display().to_string();
    let init = run(&["store", "init", "--config", &dyn_cfg], &env).await;
    assert!(init.status.success(), "{}", text(&init));
    let table = dynamo(&ms, "pruned").await;
    fill(&table).await;
    prune_through_the_cli(&|| Arc::new(table.clone()), &dyn_cfg, &env).await;
}
