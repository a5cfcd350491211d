//! `tollgate serve` and `tollgate check`: wiring the adapters together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

use crate::access::kube::KubeClients;
use crate::access::permissions;
use crate::access::standing::ClusterReader;
use crate::access::{access_entry, aws, aws_auth, AccessEngine, AwsClients, DryRun, Engine};
use crate::admin::{self, AdminRequest, AdminResponse};
use crate::clock::SystemClock;
use crate::config::{Backend, Config};
use crate::domain::policy::Strategy;
use crate::metrics::Metrics;
use crate::scheduler;
use crate::service::Service;
use crate::slack::client::SlackWebApi;
use crate::slack::routes::{metrics_router, router, AppState};
use crate::slack::verify::Verifier;
use crate::slack::SlackApi;
use crate::store::Store;
use crate::tunables::Tunables;

/// How long shutdown waits for grants and revokes under way.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Secrets come from the environment only; the error names the variable,
/// never a value.
fn secret(name: &str) -> anyhow::Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => anyhow::bail!("environment variable {name} is not set"),
    }
}

/// The configured store; with a row integrity key, wrapped so every row
/// and audit event written carries its MAC (`store::SealedStore`).
async fn open_store(config: &Config, tunables: &Tunables) -> anyhow::Result<Arc<dyn Store>> {
    let store = crate::store::open(config).await?;
    Ok(crate::store::SealedStore::wrap(
        store,
        tunables.integrity.as_ref(),
    ))
}

pub async fn serve(config: Config, tunables: Tunables) -> anyhow::Result<()> {
    let bot_token = secret("SLACK_BOT_TOKEN")?;
    let signing_secret = secret("SLACK_SIGNING_SECRET")?;
    let config = Arc::new(config);
    let store = open_store(&config, &tunables).await?;
    // Spec 9.8: with a row integrity key, live rows written before it was
    // turned on carry no MAC; rather than take them on trust (or revoke
    // them all), start-up names them and the command that signs them.
    if let Some(key) = &tunables.integrity {
        let live = store.live().await?;
        let unsigned = crate::domain::integrity::unsigned(&live);
        if !unsigned.is_empty() && !crate::domain::integrity::sealed(key, &store.list().await?) {
            anyhow::bail!(crate::domain::integrity::unsealed_refusal(
                &config.path,
                &unsigned
            ));
        }
    }
    // Spec 9.8: one mode's rows are never the other's to act on; a store
    // holding live rows of the other mode is refused before anything runs.
    // Only rows that verify count: a row written into the store from
    // outside (failing its MAC) must not keep every replica from
    // starting; the running server ends it as tampered.
    let live: Vec<_> = store
        .live()
        .await?
        .into_iter()
        .filter(|r| crate::domain::integrity::intact(tunables.integrity.as_ref(), r))
        .collect();
    if let Some(why) = crate::domain::row_check::mode_mismatch(config.dry_run, &live) {
        anyhow::bail!(why);
    }
    let metrics = Arc::new(Metrics::new());
    let slack: Arc<dyn SlackApi> = Arc::new(
        SlackWebApi::new(&tunables.slack_api_url, &bot_token)
            .map_err(anyhow::Error::msg)?
            .with_metrics(metrics.clone()),
    );
    // Requests from other workspaces are refused, so the bot's own must be
    // known: asked before the port opens, and if Slack cannot be reached
    // yet, asked again in the background while every Slack request is
    // refused and /readyz says not ready. A token Slack rejects stops
    // start-up with the reason.
    let team_id = Arc::new(std::sync::OnceLock::new());
    let mut wait = std::time::Duration::ZERO;
    match bot_workspace(slack.as_ref(), Some(WORKSPACE_PATIENCE), &mut wait).await? {
        Some(team) => {
            let _ = team_id.set(team);
        }
        None => {
            let (slack, team_id) = (slack.clone(), team_id.clone());
            tokio::spawn(async move {
                // Without a deadline it returns only with an answer.
                match bot_workspace(slack.as_ref(), None, &mut wait).await {
                    Ok(Some(team)) => {
                        let _ = team_id.set(team);
                    }
                    Ok(None) => tracing::error!("auth.test stopped asking without an answer"),
                    Err(e) => {
                        tracing::error!(error = %e, "Slack refused the bot token; no Slack request will be served");
                    }
                }
            });
        }
    }
    let clock = Arc::new(SystemClock);
    let clients = Arc::new(AwsClients::new(crate::aws_sdk::load_base_config().await));
    let kube = Arc::new(KubeClients::new(clients.clone(), clock.clone()));
    let reader = Arc::new(ClusterReader::new(clients.clone(), kube.clone()));
    for c in &config.clusters {
        let warning = c.backstop.as_ref().and_then(|b| {
            crate::domain::backstop::grace_warning(&c.name, b.grace, c.reconcile_interval)
        });
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
    }
    let engine: Arc<dyn AccessEngine> = if config.dry_run {
        tracing::warn!("dry run: AWS and Kubernetes writes are logged and audited, never made");
        Arc::new(DryRun)
    } else {
        Arc::new(Engine::new(
            clients,
            kube,
            store.clone(),
            &config.server.instance,
        ))
    };
    let service = Service::new(
        config.clone(),
        store.clone(),
        engine,
        slack,
        clock,
        metrics,
        tunables,
    );
    service.set_standing_reader(reader);

    // Overdue revokes and half-finished grants are driven before the port
    // opens, so a restart never serves with stale access in place.
    // `recover` also posts the cards of requests whose post died with the
    // previous process.
    let recovered = service.recover().await?;
    // Clicks the previous process answered 200 and never acted on. The
    // inbox never stops a start: revokes matter more than a click.
    let grace = service.startup_click_grace(scheduler::INBOX_GRACE);
    let clicks = match service.replay_clicks(grace).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the click inbox at start; the sweep retries");
            0
        }
    };
    tracing::info!(due = recovered, clicks, "start-up recovery done");

    let (stop_tx, stop_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));
    // Ready means recovery is done (it ran above) and the scheduler runs:
    // if the scheduler ever stops, so does readiness.
    let scheduler_task = {
        let (service, stop, ready) = (service.clone(), stop_rx.clone(), ready.clone());
        tokio::spawn(async move {
            scheduler::run(service, stop).await;
            ready.store(false, Ordering::SeqCst);
        })
    };
    let reconciler_task = tokio::spawn(scheduler::reconcile(service.clone(), stop_rx.clone()));
    let inbox_task = tokio::spawn(scheduler::inbox_sweep(service.clone(), stop_rx.clone()));
    let admin_path = admin::socket_path(&config.store.path);
    let admin_task = {
        let (service, path) = (service.clone(), admin_path.clone());
        tokio::spawn(async move {
            if let Err(e) = admin::serve(service, path.clone(), stop_rx).await {
                tracing::error!(path = %path.display(), error = %e, "admin socket unavailable; the CLI cannot reach this server");
            }
        })
    };
    let state = AppState {
        service: service.clone(),
        verifier: Verifier::new(&signing_secret),
        ready: ready.clone(),
        team_id,
        app_id: config.slack.app_id.clone(),
    };
    let bind = |addr: String, key: &'static str| async move {
        tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (server.{key}): {e}"))
    };
    let listener = bind(config.server.listen.clone(), "listen").await?;
    let metrics_listener = match &config.server.metrics_listen {
        Some(addr) => Some(bind(addr.clone(), "metrics_listen").await?),
        None => None,
    };
    let (down_tx, down_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|down| *down).await;
    };
    let metrics_task = metrics_listener.map(|l| {
        tracing::info!(metrics_listen = ?l.local_addr().ok(), "serving metrics");
        let app = metrics_router(state.clone());
        // Prometheus needs one connection; a few leave room for a second
        // scraper and a person with curl.
        let limits = crate::http::Limits {
            max_connections: METRICS_CONNECTIONS,
            metrics: service.metrics().clone(),
            counted: false,
        };
        tokio::spawn(crate::http::serve(l, app, stopped(down_rx.clone()), limits))
    });
    tracing::info!(listen = %listener.local_addr()?, "serving");
    let app = router(state);
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = down_tx.send(true);
    });
    let limits = crate::http::Limits {
        max_connections: config.server.max_connections,
        metrics: service.metrics().clone(),
        counted: true,
    };
    crate::http::serve(listener, app, stopped(down_rx), limits).await?;
    signal.abort();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    ready.store(false, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    if !service.drain(SHUTDOWN_GRACE).await {
        tracing::warn!(
            "grants or revokes still running at shutdown; start-up recovery will finish them"
        );
    }
    let _ = scheduler_task.await;
    let _ = reconciler_task.await;
    let _ = inbox_task.await;
    let _ = admin_task.await;
    store.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Connections the metrics listener holds at once.
const METRICS_CONNECTIONS: usize = 16;

/// How long start-up keeps asking `auth.test` for the bot's workspace
/// before the port opens anyway (not ready, refusing Slack requests) and
/// the asking goes on in the background.
const WORKSPACE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest wait between two `auth.test` attempts while Slack is
/// unreachable.
const WORKSPACE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The wait after a failed attempt: doubling from one second up to the
/// maximum, so an outage is logged a few times at first and then once a
/// minute, not every two seconds.
fn next_wait(wait: std::time::Duration) -> std::time::Duration {
    (wait * 2)
        .max(std::time::Duration::from_secs(1))
        .min(WORKSPACE_BACKOFF_MAX)
}

/// The bot token's workspace; `None` when Slack could not be reached within
/// `patience` (never, without one). A definite refusal (a revoked or wrong
/// token) is an error. `wait` carries the backoff from one call to the next.
async fn bot_workspace(
    slack: &dyn SlackApi,
    patience: Option<std::time::Duration>,
    wait: &mut std::time::Duration,
) -> anyhow::Result<Option<String>> {
    let deadline = patience.map(|p| tokio::time::Instant::now() + p);
    loop {
        match slack.auth_test().await {
            Ok(bot) if !bot.team_id.is_empty() => {
                tracing::info!(team_id = %bot.team_id, bot_user = %bot.user_id, "serving this Slack workspace only");
                return Ok(Some(bot.team_id));
            }
            Ok(_) => {
                anyhow::bail!("slack auth.test named no workspace (team_id) for the bot token")
            }
            Err(e) if e.is_transient() => {
                let now = tokio::time::Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    tracing::warn!(error = %e, "Slack unreachable; serving no Slack request until auth.test answers");
                    return Ok(None);
                }
                *wait = next_wait(*wait);
                tracing::warn!(error = %e, retry_in = ?*wait, "slack auth.test failed");
                let pause = match deadline {
                    Some(d) => (*wait).min(d - now),
                    None => *wait,
                };
                tokio::time::sleep(pause).await;
            }
            Err(e) => anyhow::bail!("slack auth.test (the bot token's workspace): {e}"),
        }
    }
}

/// Slack for commands run without a bot token: messages are skipped, and
/// said so in the log.
struct NoSlack;

#[async_trait::async_trait]
impl SlackApi for NoSlack {
    async fn user(&self, _: &str) -> Result<crate::slack::SlackUser, crate::slack::SlackError> {
        Err(no_slack("users.info"))
    }
    async fn group_members(&self, _: &str) -> Result<Vec<String>, crate::slack::SlackError> {
        Err(no_slack("usergroups.users.list"))
    }
    async fn post(
        &self,
        _: &str,
        _: &crate::slack::Message,
    ) -> Result<String, crate::slack::SlackError> {
        Err(no_slack("chat.postMessage"))
    }
    async fn update(
        &self,
        _: &str,
        _: &str,
        _: &crate::slack::Message,
    ) -> Result<(), crate::slack::SlackError> {
        Err(no_slack("chat.update"))
    }
    async fn dm(
        &self,
        _: &str,
        _: &crate::slack::Message,
    ) -> Result<crate::domain::request::CardRef, crate::slack::SlackError> {
        Err(no_slack("chat.postMessage"))
    }
    async fn open_view(
        &self,
        _: &str,
        _: &serde_json::Value,
    ) -> Result<(), crate::slack::SlackError> {
        Err(no_slack("views.open"))
    }
    async fn respond(
        &self,
        _: &str,
        _: &crate::slack::Message,
    ) -> Result<(), crate::slack::SlackError> {
        Err(no_slack("response_url"))
    }
    async fn auth_test(&self) -> Result<crate::slack::BotIdentity, crate::slack::SlackError> {
        Err(no_slack("auth.test"))
    }
    async fn is_member(&self, _: &str) -> Result<bool, crate::slack::SlackError> {
        Err(no_slack("conversations.info"))
    }
}

fn no_slack(method: &'static str) -> crate::slack::SlackError {
    // An answer, not an outage: nothing is retried without a token.
    crate::slack::SlackError::Api {
        method,
        code: "SLACK_BOT_TOKEN is not set for this command".into(),
    }
}

/// Runs an admin request on the running server through its socket, or,
/// when none runs, on the store directly.
pub async fn admin_command(
    config: Config,
    tunables: &Tunables,
    request: AdminRequest,
) -> anyhow::Result<AdminResponse> {
    let path = admin::socket_path(&config.store.path);
    if let Some(response) = admin::call(&path, &request).await? {
        return Ok(response);
    }
    let config = Arc::new(config);
    let store = open_store(&config, tunables).await.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n(no server answered on {}; is one running without its admin socket?)",
            path.display()
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let slack: Arc<dyn SlackApi> = match secret("SLACK_BOT_TOKEN") {
        Ok(token) => {
            Arc::new(SlackWebApi::new(&tunables.slack_api_url, &token).map_err(anyhow::Error::msg)?)
        }
        Err(_) => Arc::new(NoSlack),
    };
    let clock = Arc::new(SystemClock);
    let clients = Arc::new(AwsClients::new(crate::aws_sdk::load_base_config().await));
    let kube = Arc::new(KubeClients::new(clients.clone(), clock.clone()));
    let engine = Arc::new(Engine::new(
        clients,
        kube,
        store.clone(),
        &config.server.instance,
    ));
    let service = Service::new(
        config,
        store.clone(),
        engine,
        slack,
        clock,
        metrics,
        tunables.clone(),
    );
    let response = admin::handle(&service, request, &admin::current_user()).await;
    store.flush().await?;
    Ok(response)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Asks the cluster, one SelfSubjectAccessReview per permission the
/// strategy uses, whether Tollgate holds it: a missing verb shows here
/// rather than as a 403 on the first grant, extension or revoke.
async fn check_kube_permissions(
    kube: &KubeClients,
    cluster: &crate::domain::policy::ClusterPolicy,
) -> Result<Vec<(permissions::Permission, Result<bool, String>)>, String> {
    let client = kube.client(cluster).await.map_err(|e| e.to_string())?;
    let api: kube::Api<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview> =
        kube::Api::all(client);
    let mut out = Vec::new();
    for p in permissions::required(cluster) {
        let answer = api
            .create(&kube::api::PostParams::default(), &permissions::review(&p))
            .await
            .map(|r| r.status.is_some_and(|s| s.allowed))
            .map_err(|e| format!("SelfSubjectAccessReview: {e}"));
        out.push((p, answer));
    }
    Ok(out)
}

/// The reads the access-entry strategy makes, none of which changes
/// anything: the access entries of the cluster.
async fn check_access_entry_reads(
    clients: &AwsClients,
    cluster: &crate::domain::policy::ClusterPolicy,
) -> Result<usize, String> {
    let eks = clients.eks(cluster).await;
    eks.list_access_entries()
        .cluster_name(&cluster.name)
        .max_results(100)
        .send()
        .await
        .map(|out| out.access_entries().len())
        .map_err(|e| format!("eks ListAccessEntries: {}", aws::describe_error(&e)))
}

async fn check_aws_auth(
    kube: &KubeClients,
    cluster: &crate::domain::policy::ClusterPolicy,
) -> Result<Vec<String>, String> {
    let client = kube.client(cluster).await.map_err(|e| e.to_string())?;
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client, aws_auth::NAMESPACE);
    let cm = aws_auth::read(&api, cluster)
        .await
        .map_err(|e| e.to_string())?;
    Ok(aws_auth::foreign_managers(&cm))
}

/// Spec 9.7 for `tollgate check`: the namespace never granted, then per
/// cluster and role what a request may reach, what is denied, and what the
/// card marks sensitive.
pub fn namespace_report(config: &Config) -> Vec<String> {
    let mut notes = vec![format!(
        "namespace {}: Tollgate's own ([server] namespace); never granted on any cluster, whatever a role says",
        config.server.namespace
    )];
    for c in &config.clusters {
        if c.strategy == Strategy::AwsAuth {
            notes.push(format!(
                "cluster {}: aws-auth groups are cluster-wide and --ns is refused: namespace rules do not apply",
                c.name
            ));
            continue;
        }
        for (name, role) in &c.roles {
            notes.push(format!(
                "cluster {} role {name}: {}",
                c.name,
                role.namespace_rules.summary(role.namespaced)
            ));
        }
    }
    notes
}

/// The longest failure line `tollgate check` prints without `--verbose`.
const CHECK_LINE_MAX: usize = 300;

pub async fn check(config: Config, tunables: &Tunables, verbose: bool) -> bool {
    let mut ok = true;
    // One line per finding: a failure's full error (AWS SDK and HTTP
    // client errors run to kilobytes of debug output) only when asked.
    let mut line = |passed: bool, what: String| {
        let what = if verbose || passed {
            what
        } else {
            crate::domain::text::brief_error(&what, CHECK_LINE_MAX)
        };
        println!("{} {what}", if passed { "ok  " } else { "FAIL" });
        ok &= passed;
    };
    line(
        true,
        format!(
            "config {} ({} clusters)",
            config.path,
            config.clusters.len()
        ),
    );

    match (secret("SLACK_BOT_TOKEN"), secret("SLACK_SIGNING_SECRET")) {
        (Ok(token), Ok(_)) => match SlackWebApi::new(&tunables.slack_api_url, &token) {
            Ok(slack) => {
                match slack.auth_test().await {
                    Ok(bot) => line(
                        true,
                        format!(
                            "slack auth.test (bot user {} in workspace {})",
                            bot.user_id, bot.team_id
                        ),
                    ),
                    Err(e) => line(false, format!("slack auth.test: {e}")),
                }
                for c in &config.clusters {
                    match slack.is_member(&c.approval_channel).await {
                        Ok(true) => line(true, format!("slack bot is in {} (approval channel of {})", c.approval_channel, c.name)),
                        Ok(false) => line(false, format!("slack bot is not a member of {} (approval channel of {}): invite it", c.approval_channel, c.name)),
                        Err(e) => line(false, format!("slack conversations.info {}: {e}", c.approval_channel)),
                    }
                }
            }
            Err(e) => line(false, format!("slack client: {e}")),
        },
        (Err(e), _) | (_, Err(e)) => line(false, format!("slack: {e}")),
    }

    let clients = Arc::new(AwsClients::new(crate::aws_sdk::load_base_config().await));
    match clients.sts(None).await.get_caller_identity().send().await {
        Ok(id) => line(
            true,
            format!("aws sts get-caller-identity ({})", id.arn().unwrap_or("?")),
        ),
        Err(e) => line(
            false,
            format!("aws sts get-caller-identity: {}", aws::describe_error(&e)),
        ),
    }
    // Spec 9.8: whether rows are checked is the operator's to see. A key
    // the config names but the environment lacks never gets here (`main`
    // refuses it, naming the variable).
    match (&tunables.integrity, config.store.integrity_key_env.as_deref()) {
        (Some(_), Some(name)) => line(
            true,
            format!("row integrity on (HMAC-SHA256 on every row and audit event, key from ${name})"),
        ),
        _ => println!(
            "note row integrity off ([store] integrity_key_env unset): a row written into the store by anyone else is checked only against the config (invalid_row)"
        ),
    }
    if config.store.backend == Backend::Dynamodb {
        let table = config.store.table.as_deref().unwrap_or_default();
        let client = aws_sdk_dynamodb::Client::new(&crate::aws_sdk::load_base_config().await);
        match crate::store::dynamodb::verify(&client, table).await {
            Ok(what) => line(true, format!("store: {what}")),
            Err(e) => line(false, format!("store: {e}")),
        }
    }
    let kube = KubeClients::new(clients.clone(), Arc::new(SystemClock));
    for c in &config.clusters {
        match c.strategy {
            Strategy::AccessEntry => match access_entry::authentication_mode(&clients, c).await {
                Ok(Some(mode)) if mode == "CONFIG_MAP" => line(false, format!(
                    "cluster {}: authentication mode CONFIG_MAP cannot use the access-entry strategy; switch the cluster to API_AND_CONFIG_MAP or use strategy = \"aws-auth\"",
                    c.name
                )),
                Ok(mode) => {
                    line(true, format!("cluster {} reachable (authentication mode {})", c.name, mode.as_deref().unwrap_or("unknown")));
                    match check_access_entry_reads(&clients, c).await {
                        Ok(n) => line(true, format!("cluster {}: eks ListAccessEntries ({n} entries)", c.name)),
                        Err(e) => line(false, format!("cluster {}: {e}", c.name)),
                    }
                }
                Err(e) => line(false, format!("cluster {}: {e}", c.name)),
            },
            Strategy::SessionRbac => {}
            Strategy::AwsAuth => match check_aws_auth(&kube, c).await {
                Ok(foreign) if foreign.is_empty() => line(true, format!("cluster {} reachable ({}/{} readable)", c.name, aws_auth::NAMESPACE, aws_auth::NAME)),
                Ok(foreign) => {
                    line(true, format!("cluster {} reachable ({}/{} readable)", c.name, aws_auth::NAMESPACE, aws_auth::NAME));
                    println!(
                        "warn cluster {}: aws-auth is also managed by another tool ({}); its next sync may remove Tollgate's items",
                        c.name,
                        foreign.join(", ")
                    );
                }
                Err(e) => line(false, format!("cluster {}: {e}", c.name)),
            },
        }
        match (&c.backstop, c.strategy) {
            (Some(b), Strategy::AccessEntry) => {
                let schedules = crate::access::backstop::AwsSchedules::new(clients.clone());
                for (passed, what) in
                    crate::access::backstop::check(&schedules, c, b, &config.server.instance).await
                {
                    line(passed, what);
                }
            }
            (None, Strategy::AccessEntry) => println!(
                "note cluster {}: no backstop configured: access ends only when Tollgate revokes it (add [clusters.backstop])",
                c.name
            ),
            (_, strategy) => println!(
                "note cluster {}: no AWS-side backstop for the {} strategy: access ends only when Tollgate revokes it",
                c.name,
                strategy.name()
            ),
        }
        if c.strategy == Strategy::AccessEntry {
            continue;
        }
        match check_kube_permissions(&kube, c).await {
            Ok(answers) => {
                for (p, answer) in answers {
                    match answer {
                        Ok(true) => line(true, format!("cluster {}: may {p}", c.name)),
                        Ok(false) => line(
                            false,
                            format!(
                                "cluster {}: may not {p} (apply manifests/rbac-{}.yaml)",
                                c.name,
                                c.strategy.name()
                            ),
                        ),
                        Err(e) => line(false, format!("cluster {}: {p}: {e}", c.name)),
                    }
                }
            }
            Err(e) => line(false, format!("cluster {}: {e}", c.name)),
        }
    }
    // Last: facts of the config, after what the peers answered.
    for note in namespace_report(&config) {
        println!("note {note}");
    }
    ok
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn auth_test_retries_back_off_to_once_a_minute() {
        let mut wait = std::time::Duration::ZERO;
        let waits: Vec<u64> = (0..9)
            .map(|_| {
                wait = next_wait(wait);
                wait.as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
