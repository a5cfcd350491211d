//! The workflows: submit, decide, grant, revoke, expire. The only place that
//! combines the domain, the store, the grant engine and Slack.

use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Notify;

use crate::access::AccessEngine;
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::audit::AuditEvent;
use crate::domain::lifecycle::{Effects, Refused};
use crate::domain::request::{CardRef, Request, RequestId};
use crate::locks::KeyedLocks;
use crate::metrics::Metrics;
use crate::slack::{blocks, Message, SlackApi, SlackError};
use crate::store::{Store, StoreError};
use crate::tunables::Tunables;

mod admin;
mod claims;
mod commands;
mod decide;
pub mod directory;
mod error;
mod extend;
mod identity;
mod inbox;
mod lifecycle;
mod modal;
mod readback;
mod reconcile;
mod row_authority;
pub mod standing;

pub use commands::SlashCommand;
pub use decide::Decision;
pub use error::{GrantRefusal, Refusal, ServiceError};
pub use reconcile::ReconcileReport;

pub struct Service {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    access: Arc<dyn AccessEngine>,
    slack: Arc<dyn SlackApi>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Wakes the scheduler when a write may have moved the earliest due
    /// instant earlier (`scheduler::needs_wake`); creates always wake it.
    wake: Arc<Notify>,
    locks: KeyedLocks,
    /// One permit per grant or revoke under way; shutdown takes them all.
    work: tokio::sync::Semaphore,
    /// This process's name in claims and leases on a shared store.
    replica: String,
    /// Standing-access discovery: its reader and when it last ran.
    standing: standing::StandingState,
    /// Per cluster, the marked objects the last reconcile pass found that
    /// the store did not create: each is audited when first seen.
    foreign:
        std::sync::Mutex<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>>,
    /// Step timing (retry base, claim term, converge limit), from `main`.
    tunables: Tunables,
    /// Per cluster, when the reconciler last read every object's marks.
    full_scans: std::sync::Mutex<std::collections::BTreeMap<String, time::OffsetDateTime>>,
    /// Keys of the recorded Slack clicks a task of this process is
    /// processing, so the inbox sweep does not start them a second time.
    clicks_in_flight: std::sync::Mutex<HashSet<String>>,
    /// `[slack] commands_per_minute`, per user.
    command_rate: std::sync::Mutex<crate::domain::rate::PerMinute>,
    /// Principals whose last converge was cut off mid-call, until when no
    /// converge may read them (`claims::Fences`).
    fences: Arc<claims::Fences>,
    /// Notices (card updates, DMs, alerts) run a few at a time, behind
    /// the grants and revokes they report: a storm of expiries revokes
    /// first and tells people after, at Slack's pace (spec 9.9).
    notice_lanes: Arc<tokio::sync::Semaphore>,
    /// Signalled when the last grant or revoke under way finishes.
    work_idle: Notify,
    /// Slack profiles and user-group members, per id (spec 9.9).
    directory: directory::Directory,
}

const WORK_PERMITS: u32 = 1 << 20;
/// Notices sent at once; the rest wait their turn in order. A few, so a
/// storm's thousands of DMs do not take the cores from its revokes (each
/// also waits until no grant or revoke is under way); more than one or
/// two, so a notice waiting out a Slack `Retry-After` does not hold up
/// everyone else's.
const NOTICE_LANES: usize = 8;
/// How long a notice gives way to grants and revokes under way before it
/// goes out anyway: under steady load, notices are late, never lost.
const NOTICE_MAX_DEFER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a message waits out a Slack outage before it is given up (and
/// logged); the first retry comes quickly, later ones at most this far apart.
const SLACK_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);
const SLACK_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const SLACK_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) use crate::domain::lifecycle::Notice;

/// A grant or revoke under way (a permit of `Service::work`); the last
/// one to finish lets the notices waiting behind it go.
pub(crate) struct Working<'a> {
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
    service: &'a Service,
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        // Returned first, so a woken notice sees it back.
        drop(self.permit.take());
        if !self.service.working() {
            self.service.work_idle.notify_waiters();
        }
    }
}

/// Who ends a request early.
pub enum Revoker {
    Cli {
        os_user: String,
        note: Option<String>,
    },
    Slack {
        user: String,
    },
}

/// What a read-modify-write decides after looking at the current row.
pub(crate) enum Change<T> {
    Write(Box<Request>, Vec<AuditEvent>, T),
    Keep(T),
}

impl Change<Option<Notice>> {
    /// Writes what a lifecycle event decided (`domain::lifecycle`); an event
    /// that no longer applies to the row (another pass, replica or click
    /// got there first) writes nothing.
    pub(crate) fn event(id: &RequestId, decided: Result<Effects, Refused>) -> Self {
        match decided {
            Ok(e) => Change::Write(Box::new(e.row), e.audit, e.notice),
            Err(Refused::Illegal(illegal)) => {
                tracing::warn!(request_id = %id, error = %illegal, "event does not apply to the row as it is; nothing written");
                Change::Keep(None)
            }
            Err(refused) => {
                tracing::debug!(request_id = %id, %refused, "event no longer applies");
                Change::Keep(None)
            }
        }
    }
}

/// Events that record a change of access say so when none was made.
fn mark_dry_run(audit: &mut [AuditEvent]) {
    for e in audit {
        if matches!(
            e.event.as_str(),
            "granted" | "revoked" | "grant_failed" | "revoke_failed"
        ) {
            e.details["dry_run"] = serde_json::Value::Bool(true);
        }
    }
}

/// Crash tests arm one of these with `TOLLGATE_FAILPOINT=<name>`: the
/// process aborts right there, between a cloud call and the store write
/// that records it, exactly as a kill -9 would. Only in builds with the
/// `failpoints` feature (the test suite's); a release build ignores the
/// variable, so nobody who can set a pod's environment can make it abort.
#[cfg(not(feature = "failpoints"))]
pub(crate) fn failpoint(_name: &str) {}

#[cfg(feature = "failpoints")]
pub(crate) fn failpoint(name: &str) {
    let Ok(armed) = std::env::var("TOLLGATE_FAILPOINT") else {
        return;
    };
    if armed == name {
        tracing::error!(failpoint = name, "failpoint armed: aborting");
        std::process::abort();
    }
    // `stop:<name>` freezes the process there (SIGSTOP to itself) until it
    // is sent SIGCONT: a long pause at the worst moment, on demand. Only the
    // first time: a periodic pass that reaches the point again once resumed
    // runs on, as the replica that woke up would.
    static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if armed.strip_prefix("stop:") == Some(name)
        && !STOPPED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        tracing::error!(failpoint = name, "failpoint armed: stopping");
        let _ = std::process::Command::new("kill")
            .arg("-STOP")
            .arg(std::process::id().to_string())
            .status();
    }
}

/// A failpoint reached just after an HTTP answer was handed over: it
/// waits until the answer has surely gone out, so a crash test kills the
/// process after the client has its 200. Nothing in a release build.
#[cfg(not(feature = "failpoints"))]
pub(crate) async fn failpoint_after_answer(_name: &str) {}

#[cfg(feature = "failpoints")]
pub(crate) async fn failpoint_after_answer(name: &str) {
    if std::env::var("TOLLGATE_FAILPOINT").is_ok_and(|armed| armed == name) {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        failpoint(name);
    }
}

/// Host name (the pod's, under Kubernetes) plus a random suffix: a
/// restarted process never mistakes an old claim for its own.
fn replica_name() -> String {
    use rand::Rng;
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tollgate".into());
    format!("{host}-{:08x}", rand::thread_rng().gen::<u32>())
}

/// Sends through Slack, retrying while Slack is down or answering 5xx:
/// an outage delays messages, it does not drop them. Callers are always
/// off the grant and revoke path, so waiting here holds up nothing.
async fn send_with<T, F, Fut>(metrics: &Metrics, what: &str, mut call: F) -> Result<T, SlackError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SlackError>>,
{
    let started = std::time::Instant::now();
    let mut delay = SLACK_RETRY_FIRST;
    loop {
        match call().await {
            Err(e) if e.is_transient() && started.elapsed() + delay < SLACK_RETRY_WINDOW => {
                tracing::warn!(what, error = %e, retry_in = ?delay, "Slack unavailable; will send again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(SLACK_RETRY_CAP);
            }
            Err(e) => {
                // Given up: counted once per message, not per try.
                metrics.failed("slack", e.metric_label());
                return Err(e);
            }
            ok => return ok,
        }
    }
}

/// CAS retries before giving up; each retry means another writer won, so
/// more than a handful means something is badly wrong.
const MAX_CAS_RETRIES: usize = 50;

impl Service {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        access: Arc<dyn AccessEngine>,
        slack: Arc<dyn SlackApi>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        tunables: Tunables,
    ) -> Arc<Self> {
        let command_rate = crate::domain::rate::PerMinute::new(config.slack.commands_per_minute);
        Arc::new(Service {
            config,
            store,
            access,
            slack,
            clock,
            metrics,
            wake: Arc::new(Notify::new()),
            locks: KeyedLocks::default(),
            work: tokio::sync::Semaphore::new(WORK_PERMITS as usize),
            replica: replica_name(),
            standing: Default::default(),
            foreign: Default::default(),
            full_scans: Default::default(),
            clicks_in_flight: Default::default(),
            command_rate: std::sync::Mutex::new(command_rate),
            fences: Default::default(),
            notice_lanes: Arc::new(tokio::sync::Semaphore::new(NOTICE_LANES)),
            work_idle: Notify::new(),
            directory: Default::default(),
            tunables,
        })
    }

    pub fn tunables(&self) -> &Tunables {
        &self.tunables
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Graceful shutdown: waits (up to `limit`) for the grants and revokes
    /// under way to finish and be recorded, and lets no new one start.
    /// Whatever did not start is picked up by the next start-up.
    pub async fn drain(&self, limit: std::time::Duration) -> bool {
        let finished = matches!(
            tokio::time::timeout(limit, self.work.acquire_many(WORK_PERMITS)).await,
            Ok(Ok(_))
        );
        self.work.close();
        finished
    }

    /// A permit to change access, or `None` once shutting down.
    pub(crate) async fn begin_work(&self) -> Option<Working<'_>> {
        let permit = self.work.acquire().await.ok()?;
        Some(Working {
            permit: Some(permit),
            service: self,
        })
    }

    /// Whether a grant or revoke is under way.
    fn working(&self) -> bool {
        self.work.available_permits() < WORK_PERMITS as usize
    }

    /// Waits until no grant or revoke is under way, or `NOTICE_MAX_DEFER`.
    async fn after_work(&self) {
        let deadline = tokio::time::Instant::now() + NOTICE_MAX_DEFER;
        loop {
            // Armed before the check, so an end signalled in between wakes it.
            let idle = self.work_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if !self.working() {
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return;
            }
        }
    }

    pub fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Read, decide, write-if-unchanged; on a lost race read again and let
    /// `decide` look at the new row.
    pub(crate) async fn modify<T, F>(&self, id: &RequestId, mut decide: F) -> Result<T, StoreError>
    where
        F: FnMut(&Request) -> Change<T>,
    {
        for _ in 0..MAX_CAS_RETRIES {
            let current = self
                .store
                .get(id)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            // Spec 9.8: a row failing its integrity MAC decides nothing;
            // `Service::quarantine` ends it.
            if !self.intact(&current) {
                return Err(StoreError::Tampered(id.to_string()));
            }
            match decide(&current) {
                Change::Keep(out) => return Ok(out),
                Change::Write(next, mut audit, out) => {
                    if self.config.dry_run {
                        mark_dry_run(&mut audit);
                    }
                    let entered = (next.state != current.state).then_some(next.state);
                    let wake = crate::scheduler::needs_wake(current.next_due(), next.next_due());
                    match self.store.update(&current, *next, audit).await {
                        Ok(_) => {
                            if let Some(state) = entered {
                                self.metrics.entered(state.label());
                            }
                            if wake {
                                self.wake.notify_one();
                            }
                            return Ok(out);
                        }
                        Err(StoreError::Conflict(_)) => continue,
                        Err(e) => {
                            self.metrics.failed("store", e.metric_label());
                            return Err(e);
                        }
                    }
                }
            }
        }
        self.metrics.failed("store", "store_conflict");
        Err(StoreError::Conflict(id.to_string()))
    }

    /// A store read or write a step needed and did not get: logged and
    /// counted; the row stays due, so the next pass tries again.
    pub(crate) fn store_failed(&self, id: &RequestId, e: &StoreError, what: &'static str) {
        self.metrics.failed("store", e.metric_label());
        tracing::error!(request_id = %id, error = %e, "{what}");
    }

    /// A Slack profile as `need` requires it (spec 9.9): remembered for a
    /// command, asked fresh for an approval or a grant.
    pub(crate) async fn profile(
        &self,
        id: &str,
        need: crate::domain::directory::Need,
    ) -> Result<crate::slack::SlackUser, SlackError> {
        self.directory
            .users
            .get(id, need, &*self.clock, || self.slack.user(id))
            .await
    }

    /// `Need::FreshSince` now: only an answer Slack gives from here on.
    pub(crate) fn asked_now(&self) -> crate::domain::directory::Need {
        crate::domain::directory::Need::FreshSince(self.clock.now())
    }

    /// Members of the user groups (`S…`) in a list of approvers or
    /// requesters, as `need` requires them (remembered for a command,
    /// asked fresh for an approval or a grant). A group Slack cannot list
    /// contributes nobody.
    async fn group_members(
        &self,
        ids: &[String],
        need: crate::domain::directory::Need,
    ) -> HashSet<String> {
        let mut members = HashSet::new();
        for id in ids.iter().filter(|id| id.starts_with('S')) {
            let listed = self
                .directory
                .groups
                .get(id, need, &*self.clock, || self.slack.group_members(id))
                .await;
            match listed {
                Ok(users) => members.extend(users),
                Err(e) => tracing::warn!(group = %id, error = %e, "cannot list user group"),
            }
        }
        members
    }

    /// Sends through Slack, retrying while Slack is down or answering 5xx:
    /// an outage delays messages, it does not drop them. Callers are always
    /// off the grant and revoke path, so waiting here holds up nothing.
    pub(crate) async fn send<T, F, Fut>(&self, what: &str, call: F) -> Result<T, SlackError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SlackError>>,
    {
        send_with(&self.metrics, what, call).await
    }

    /// Standing access a baseline recorded was gone when Tollgate would
    /// have put it back (spec 9.6): one `baseline_gone` audit event per
    /// policy, written now, and the security channel told in its own task
    /// (Slack is never on the path of a grant or revoke). `grant` is the
    /// request whose converge found it.
    pub(crate) async fn report_baselines_gone(
        &self,
        cluster: &str,
        principal: &str,
        grant: &str,
        gone: &[crate::domain::grant::GoneBaseline],
    ) {
        if gone.is_empty() {
            return;
        }
        let now = self.clock.now();
        let events: Vec<AuditEvent> = gone
            .iter()
            .map(|g| AuditEvent {
                ts: now,
                event: "baseline_gone".into(),
                request_id: grant.to_string(),
                actor: crate::domain::audit::ACTOR_TOLLGATE.into(),
                cluster: cluster.to_string(),
                principal: principal.to_string(),
                details: serde_json::json!({
                    "policy": g.policy,
                    "scope": g.scope.describe(),
                    "detail": "standing access recorded before the grant was removed during it; not re-created, baseline forgotten",
                }),
                mac: None,
            })
            .collect();
        if let Err(e) = self.store.append_audit(events).await {
            tracing::error!(cluster, principal, error = %e, "baseline_gone audit event not written");
        }
        let Some(channel) = self.config.slack.security_channel.clone() else {
            tracing::error!(
                cluster,
                principal,
                "no slack.security_channel to tell of a vanished baseline"
            );
            return;
        };
        for g in gone {
            let msg = blocks::baseline_gone_alert(cluster, principal, &g.policy, &g.scope, grant);
            let (slack, metrics, channel) =
                (self.slack.clone(), self.metrics.clone(), channel.clone());
            tokio::spawn(async move {
                if let Err(e) = send_with(&metrics, "alert", || slack.post(&channel, &msg)).await {
                    tracing::error!(error = %e, "baseline_gone alert not delivered");
                }
            });
        }
    }

    /// Slack being slow or down delays messages, never state changes.
    async fn dm(&self, user: &str, msg: Message) {
        self.dm_at(user, msg).await;
    }

    /// A DM that may be updated later: where it landed.
    async fn dm_at(&self, user: &str, msg: Message) -> Option<CardRef> {
        match self
            .send("direct message", || self.slack.dm(user, &msg))
            .await
        {
            Ok(at) => Some(at),
            Err(e) => {
                tracing::warn!(%user, error = %e, "direct message not delivered");
                None
            }
        }
    }

    /// Delivers a command's answer that missed Slack's three seconds.
    pub async fn follow_up(&self, response_url: Option<&str>, text: String) {
        self.respond(response_url, text).await
    }

    async fn respond(&self, response_url: Option<&str>, text: String) {
        let Some(url) = response_url else { return };
        let msg = Message::plain(text);
        if let Err(e) = self
            .send("response_url message", || self.slack.respond(url, &msg))
            .await
        {
            tracing::warn!(error = %e, "response_url message not delivered");
        }
    }

    /// Tells people what happened to a request, off the caller's path: a
    /// slow or failing Slack must never hold up a grant or a revoke.
    pub(crate) fn announce(self: &Arc<Self>, id: &RequestId, notice: Notice) {
        let service = Arc::clone(self);
        let id = id.clone();
        tokio::spawn(async move {
            // A security-channel alert is neither queued behind DMs nor
            // held up by a card update waiting out Slack's `Retry-After`;
            // everything else waits for the grants and revokes under way.
            let alerting = matches!(
                notice,
                Notice::RevokeFailing { .. } | Notice::InvalidRow { .. } | Notice::RevokeRecovered
            );
            let _lane = if alerting {
                None
            } else {
                let lane = match service.notice_lanes.clone().acquire_owned().await {
                    Ok(lane) => lane,
                    Err(_) => return,
                };
                service.after_work().await;
                Some(lane)
            };
            let Ok(Some(req)) = service.store.get(&id).await else {
                return;
            };
            let now = service.clock.now();
            match &notice {
                Notice::RevokeFailing { error } => {
                    service
                        .alert(&id, blocks::revoke_failing_alert(&req, error))
                        .await
                }
                Notice::InvalidRow { why } => {
                    service
                        .alert(&id, blocks::invalid_row_alert(&req, why))
                        .await
                }
                Notice::RevokeRecovered => {
                    service
                        .alert(&id, blocks::revoke_recovered_alert(&req, now))
                        .await
                }
                _ => {}
            }
            service.refresh_card(&req).await;
            let user = req.requester.user_id.clone();
            match notice {
                Notice::CardOnly => {}
                Notice::Granted => {
                    if let Some(cluster) = service.config.cluster(&req.access.cluster) {
                        service.dm(&user, blocks::granted_dm(&req, cluster)).await
                    }
                }
                Notice::GrantFailed => service.dm(&user, blocks::failed_dm(&req)).await,
                Notice::Denied => service.dm(&user, blocks::denied_dm(&req)).await,
                Notice::Expired => service.dm(&user, blocks::expired_dm(&req)).await,
                Notice::Revoked => service.dm(&user, blocks::revoked_dm(&req, now)).await,
                Notice::RevokeFailing { .. } => {}
                Notice::Extended => {
                    let grant = match &req.extends {
                        Some(g) => service.store.get(g).await.ok().flatten(),
                        None => None,
                    };
                    if let Some(grant) = grant {
                        service.dm(&user, blocks::extended_dm(&req, &grant)).await
                    }
                }
                Notice::InvalidRow { .. } => {
                    if req.state == crate::domain::request::State::Failed {
                        service.dm(&user, blocks::failed_dm(&req)).await
                    }
                }
                Notice::RevokeRecovered => service.dm(&user, blocks::revoked_dm(&req, now)).await,
            }
        });
    }

    async fn alert(&self, id: &RequestId, msg: Message) {
        let Some(channel) = self.config.slack.security_channel.clone() else {
            tracing::error!(request_id = %id, text = %msg.text, "no slack.security_channel to alert");
            return;
        };
        if let Err(e) = self.send("alert", || self.slack.post(&channel, &msg)).await {
            tracing::error!(request_id = %id, error = %e, "alert not delivered");
        }
    }

    /// The request's namespaces its role's `sensitive_namespaces` match,
    /// under the configuration as it is now (spec 9.7).
    fn sensitive_namespaces(&self, req: &Request) -> Vec<String> {
        self.config
            .cluster(&req.access.cluster)
            .and_then(|c| c.roles.get(&req.access.role))
            .map(|r| r.namespace_rules.sensitive_of(&req.access.namespaces))
            .unwrap_or_default()
    }

    /// Every copy of the card (the approval channel's and approvers' DMs)
    /// shows the same state. Each attempt renders the row as it is then, so
    /// retries through a Slack outage never put an older state back.
    async fn refresh_card(&self, req: &Request) {
        for card in req.card.iter().chain(&req.card_copies) {
            let sent = self
                .send("card update", || async {
                    let latest = match self.store.get(&req.id).await {
                        Ok(Some(row)) => row,
                        _ => req.clone(),
                    };
                    let msg = blocks::card(
                        &latest,
                        self.clock.now(),
                        &self.sensitive_namespaces(&latest),
                    );
                    self.slack.update(&card.channel, &card.ts, &msg).await
                })
                .await;
            if let Err(e) = sent {
                tracing::warn!(request_id = %req.id, error = %e, "approval card not updated");
            }
        }
    }
}

#[cfg(test)]
mod tests;
