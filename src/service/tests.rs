//! Workflow tests with the adapters replaced by fakes and time moved by
//! hand: failure paths that MiniStack cannot be made to produce on cue.

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::macros::datetime;
use time::OffsetDateTime;

use super::*;
use crate::access::{AccessError, InForce};
use crate::domain::policy::{tests::cluster, ClusterPolicy};
use crate::domain::request::{CardRef, State};
use crate::service::error::ServiceError;
use crate::slack::{SlackError, SlackUser};
use crate::store::SledStore;

struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap();
        *t += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// A grant id and the expiry a converge was given for it.
type GivenExpiry = (String, Option<OffsetDateTime>);

/// Records each converge's grant ids per principal; fails while
/// `failures` is above zero.
#[derive(Default)]
struct FakeAccess {
    failures: Mutex<u32>,
    converged: Mutex<Vec<Vec<String>>>,
    converged_principals: Mutex<Vec<String>>,
    owned: Mutex<Vec<crate::access::Owned>>,
    /// What the listings after the next one show: access that changed
    /// between a listing and the step that acts on it.
    relist: Mutex<Option<Vec<crate::access::Owned>>>,
    /// What each listing was asked to read: `None` for everything, else
    /// the principals.
    looks: Mutex<Vec<Option<Vec<String>>>>,
    /// Converges that never answer (a cluster that accepts the connection
    /// and hangs), counted down like `failures`.
    hangs: Mutex<u32>,
    /// Read-backs after a revoke that still show the access (an API that
    /// answered the delete but kept the object), counted down.
    lies: Mutex<u32>,
    /// How long each converge and each read-back takes (a slow cluster).
    slow: Mutex<Option<Duration>>,
    /// Each read-back: the revoked grant and the grants in force it was
    /// judged against.
    read_backs: Mutex<Vec<(String, Vec<String>)>>,
    /// Each converge's grants with the expiry the cloud side was given
    /// (backstop schedules, annotations).
    expiries: Mutex<Vec<Vec<GivenExpiry>>>,
    /// Each step in order: `converge`, `remove <id>`, `verify <id>`.
    steps: Mutex<Vec<String>>,
}

#[async_trait]
impl AccessEngine for FakeAccess {
    async fn owned(
        &self,
        _: &ClusterPolicy,
        look: crate::access::Look<'_>,
    ) -> Result<Vec<crate::access::Owned>, AccessError> {
        self.looks.lock().unwrap().push(match look {
            crate::access::Look::Everything => None,
            crate::access::Look::Principals(set) => Some(set.iter().cloned().collect()),
        });
        let listed: Vec<crate::access::Owned> = self
            .owned
            .lock()
            .unwrap()
            .iter()
            .filter(|o| look.includes(&o.principal))
            .cloned()
            .collect();
        if let Some(next) = self.relist.lock().unwrap().take() {
            *self.owned.lock().unwrap() = next;
        }
        Ok(listed)
    }

    async fn converge(
        &self,
        _: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        _: &str,
    ) -> Result<crate::access::Converged, AccessError> {
        self.converged_principals
            .lock()
            .unwrap()
            .push(principal.to_string());
        self.steps.lock().unwrap().push("converge".into());
        let hang = {
            let mut hangs = self.hangs.lock().unwrap();
            let hang = *hangs > 0;
            *hangs = hangs.saturating_sub(1);
            hang
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let slow = *self.slow.lock().unwrap();
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let mut failures = self.failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(AccessError::Connect {
                cluster: "prod".into(),
                message: "AWS is down".into(),
            });
        }
        self.converged
            .lock()
            .unwrap()
            .push(grants.iter().map(|g| g.grant_id.to_string()).collect());
        self.expiries.lock().unwrap().push(
            grants
                .iter()
                .map(|g| (g.grant_id.to_string(), g.expires_at))
                .collect(),
        );
        if grants.is_empty() {
            self.owned
                .lock()
                .unwrap()
                .retain(|o| o.principal != principal);
        }
        Ok(crate::access::Converged::default())
    }

    async fn verify_removed(
        &self,
        _: &ClusterPolicy,
        _: &str,
        revoked_id: &str,
        _: &crate::domain::request::AccessSpec,
        grants: &[InForce<'_>],
    ) -> Result<crate::domain::readback::ReadBack, AccessError> {
        self.steps
            .lock()
            .unwrap()
            .push(format!("verify {revoked_id}"));
        self.read_backs.lock().unwrap().push((
            revoked_id.to_string(),
            grants.iter().map(|g| g.grant_id.to_string()).collect(),
        ));
        let slow = *self.slow.lock().unwrap();
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let mut lies = self.lies.lock().unwrap();
        if *lies > 0 {
            *lies -= 1;
            return Ok(crate::domain::readback::ReadBack::StillThere(vec![
                format!(
                    "binding tollgate-{} still exists",
                    revoked_id.to_lowercase()
                ),
            ]));
        }
        Ok(crate::domain::readback::ReadBack::Removed)
    }

    async fn remove_recorded(
        &self,
        _: &ClusterPolicy,
        _: &str,
        revoked_id: &str,
    ) -> Result<(), AccessError> {
        self.steps
            .lock()
            .unwrap()
            .push(format!("remove {revoked_id}"));
        Ok(())
    }

    /// A grant's access is in place while its principal has an object.
    async fn missing(
        &self,
        _: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        let present = self
            .owned
            .lock()
            .unwrap()
            .iter()
            .any(|o| o.principal == principal);
        Ok(if present {
            Vec::new()
        } else {
            grants.iter().map(|g| g.grant_id.to_string()).collect()
        })
    }
}

fn entry(principal: &str, grant: &str) -> crate::access::Owned {
    crate::access::Owned {
        principal: principal.into(),
        grant_id: Some(grant.into()),
        object: "access entry".into(),
        instance: Some("tollgate".into()),
        intent: Some(crate::domain::request::Intent::AccessEntry {
            principal: principal.into(),
        }),
        holds: None,
    }
}

#[derive(Default)]
struct FakeSlack {
    posts: Mutex<Vec<(String, String)>>,
    dms: Mutex<Vec<(String, String)>>,
    /// What was answered on a response_url: (url, text).
    responses: Mutex<Vec<(String, String)>>,
    /// User group → members (`usergroups.users.list`).
    groups: Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Calls to `users.info` and `usergroups.users.list`.
    lookups: Mutex<Vec<String>>,
    /// While set, both directory methods answer 429 (Retry-After 30 s).
    limited: std::sync::atomic::AtomicBool,
}

impl FakeSlack {
    fn lookup(&self, method: &'static str, id: &str) -> Result<(), SlackError> {
        self.lookups.lock().unwrap().push(format!("{method} {id}"));
        if self.limited.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SlackError::RateLimited {
                method,
                retry_after: Duration::from_secs(30),
            });
        }
        Ok(())
    }

    fn lookups_of(&self, what: &str) -> usize {
        self.lookups
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == what)
            .count()
    }

    fn set_group(&self, id: &str, members: &[&str]) {
        self.groups
            .lock()
            .unwrap()
            .insert(id.into(), members.iter().map(|m| m.to_string()).collect());
    }
}

#[async_trait]
impl SlackApi for FakeSlack {
    async fn user(&self, id: &str) -> Result<SlackUser, SlackError> {
        self.lookup("users.info", id)?;
        Ok(SlackUser {
            id: id.into(),
            email: Some(format!("{}@example.com", id.to_lowercase())),
            deleted: false,
            is_bot: false,
            is_guest: false,
            tz: None,
            tz_offset_secs: 0,
        })
    }
    async fn group_members(&self, id: &str) -> Result<Vec<String>, SlackError> {
        self.lookup("usergroups.users.list", id)?;
        Ok(self
            .groups
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default())
    }
    async fn post(&self, channel: &str, msg: &Message) -> Result<String, SlackError> {
        let mut posts = self.posts.lock().unwrap();
        posts.push((channel.into(), msg.text.clone()));
        Ok(format!("{}.0001", posts.len()))
    }
    async fn update(&self, _: &str, _: &str, _: &Message) -> Result<(), SlackError> {
        Ok(())
    }
    async fn dm(&self, user: &str, msg: &Message) -> Result<CardRef, SlackError> {
        let mut dms = self.dms.lock().unwrap();
        dms.push((user.into(), msg.text.clone()));
        Ok(CardRef {
            channel: format!("D{user}"),
            ts: format!("{}.0001", dms.len()),
        })
    }
    async fn open_view(&self, _: &str, _: &serde_json::Value) -> Result<(), SlackError> {
        Ok(())
    }
    async fn respond(&self, url: &str, msg: &Message) -> Result<(), SlackError> {
        self.responses
            .lock()
            .unwrap()
            .push((url.into(), msg.text.clone()));
        Ok(())
    }
    async fn auth_test(&self) -> Result<crate::slack::BotIdentity, SlackError> {
        Ok(crate::slack::BotIdentity {
            user_id: "U0BOT".into(),
            team_id: "T0TEST".into(),
        })
    }
    async fn is_member(&self, _: &str) -> Result<bool, SlackError> {
        Ok(true)
    }
}

struct Rig {
    service: Arc<Service>,
    /// The backend under the service's store: a write here skips the row
    /// integrity wrapper, as a write from outside Tollgate would.
    raw: Arc<dyn Store>,
    access: Arc<FakeAccess>,
    slack: Arc<FakeSlack>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with(|_| {})
}

/// A rig whose config `edit` has changed first.
fn rig_with(edit: impl FnOnce(&mut Config)) -> Rig {
    rig_tuned(edit, Tunables::default())
}

/// A rig with its config edited and its own step timing.
fn rig_tuned(edit: impl FnOnce(&mut Config), tunables: Tunables) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        path: "test.toml".into(),
        server: crate::config::ServerSection::default(),
        store: crate::config::StoreSection::default(),
        slack: crate::config::SlackSection {
            api_url: None,
            security_channel: Some("C0SECURITY".into()),
            ..Default::default()
        },
        identity: crate::domain::policy::IdentityPolicy {
            principal_template: Some("arn:aws:iam::{account_id}:role/{email_local}".into()),
            principals: Default::default(),
            allowed_email_domains: vec!["example.com".into()],
            allow_guests: false,
        },
        max_pending_per_user: 5,
        clusters: vec![cluster()],
        dry_run: false,
    };
    edit(&mut config);
    let raw: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let store = crate::store::SealedStore::wrap(raw.clone(), tunables.integrity.as_ref());
    let access = Arc::new(FakeAccess::default());
    let slack = Arc::new(FakeSlack::default());
    let clock = Arc::new(ManualClock(Mutex::new(datetime!(2026-11-23 12:00 UTC))));
    let service = Service::new(
        Arc::new(config),
        store,
        access.clone(),
        slack.clone(),
        clock.clone(),
        Arc::new(crate::metrics::Metrics::new()),
        tunables,
    );
    Rig {
        service,
        raw,
        access,
        slack,
        clock,
        _dir: dir,
    }
}

impl Rig {
    async fn approved(&self, text: &str, approver: &str) -> RequestId {
        let receipt = self
            .service
            .handle_command(SlashCommand {
                trigger_id: None,
                user_id: "U0REQ".into(),
                text: text.into(),
                response_url: None,
            })
            .await;
        let at = receipt.find("R-").unwrap_or_else(|| panic!("{receipt}"));
        let id = RequestId::parse(&receipt[at..at + 7]).unwrap();
        self.service
            .decide(Decision {
                request_id: id.to_string(),
                user_id: approver.into(),
                approve: true,
                response_url: None,
            })
            .await;
        id
    }

    async fn state(&self, id: &RequestId) -> Request {
        self.service.store.get(id).await.unwrap().unwrap()
    }

    /// Waits for spawned notification tasks (they only touch fakes) until
    /// `cond` holds, with a deadline.
    async fn wait_for(&self, what: &str, cond: impl Fn(&Rig) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    async fn audit_names(&self) -> Vec<String> {
        let events = self.service.store.audit_since(None).await.unwrap();
        events.into_iter().map(|e| e.event).collect()
    }
}

/// Issue 21: a revoke removes what the row recorded by name (a
/// session-rbac binding whose subjects were swapped is found no other
/// way) after its converge and before the read-back judges it.
#[tokio::test]
async fn a_revoke_removes_what_its_row_recorded_before_reading_back() {
    let r = rig();
    let id = r.approved("eks prod 10m view one", "U0APP").await;
    r.access.steps.lock().unwrap().clear();
    r.clock.advance(Duration::from_secs(11 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
    assert_eq!(
        *r.access.steps.lock().unwrap(),
        vec![
            "converge".to_string(),
            format!("remove {id}"),
            format!("verify {id}")
        ]
    );
}

#[tokio::test]
async fn overlapping_grants_revoke_only_the_one_ending() {
    let r = rig();
    let first = r.approved("eks prod 10m view one", "U0APP").await;
    r.clock.advance(Duration::from_secs(60));
    let second = r.approved("eks prod 20m view two", "U0APP").await;
    assert_eq!(r.state(&first).await.state, State::Active);
    assert_eq!(r.state(&second).await.state, State::Active);
    assert_eq!(
        r.access.converged.lock().unwrap().last().unwrap(),
        &vec![first.to_string(), second.to_string()]
    );

    r.clock.advance(Duration::from_secs(10 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&first).await.state, State::Revoked);
    assert_eq!(r.state(&second).await.state, State::Active);
    assert_eq!(
        r.access.converged.lock().unwrap().last().unwrap(),
        &vec![second.to_string()],
        "revoking the first converged to the second, not to nothing"
    );
    assert_eq!(
        r.access.read_backs.lock().unwrap().last().unwrap(),
        &(first.to_string(), vec![second.to_string()]),
        "the read-back judges the first against the second still in force"
    );
}

#[tokio::test]
async fn failing_revoke_backs_off_escalates_alerts_then_completes() {
    let r = rig();
    let id = r.approved("eks prod 5m view", "U0APP").await;
    *r.access.failures.lock().unwrap() = 5;
    r.clock.advance(Duration::from_secs(5 * 60));
    for attempt in 1..=5u32 {
        r.service.run_due().await.unwrap();
        let row = r.state(&id).await;
        assert_eq!(row.attempts, attempt);
        let expected = if attempt >= 5 {
            State::RevokeFailed
        } else {
            State::Active
        };
        assert_eq!(row.state, expected, "after attempt {attempt}");
        // Nothing runs again before the backoff is over.
        r.service.run_due().await.unwrap();
        assert_eq!(r.state(&id).await.attempts, attempt);
        r.clock.advance(Duration::from_secs(300));
    }
    r.wait_for("alert", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, _)| c == "C0SECURITY")
    })
    .await;
    let alerts: Vec<_> = r
        .slack
        .posts
        .lock()
        .unwrap()
        .iter()
        .filter(|(c, _)| c == "C0SECURITY")
        .cloned()
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].1.contains(id.as_str()) && alerts[0].1.contains("AWS is down"));

    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
    r.wait_for("all-clear", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, t)| c == "C0SECURITY" && t.contains("All clear"))
    })
    .await;
    let names = r.audit_names().await;
    assert_eq!(names.iter().filter(|n| *n == "revoke_failed").count(), 1);
    assert_eq!(names.last().map(String::as_str), Some("revoked"));
}

/// A read-back that still shows the access fails the attempt like a failed
/// converge; the revoke is recorded (verified) only once the access is
/// seen gone.
#[tokio::test]
async fn a_revoke_the_read_back_contradicts_is_retried_alerted_then_verified() {
    let r = rig();
    let id = r.approved("eks prod 5m view", "U0APP").await;
    *r.access.lies.lock().unwrap() = 5;
    r.clock.advance(Duration::from_secs(5 * 60));
    for attempt in 1..=5u32 {
        r.service.run_due().await.unwrap();
        let row = r.state(&id).await;
        assert_eq!(row.attempts, attempt);
        assert_eq!(row.verified_at, None);
        r.clock.advance(Duration::from_secs(300));
    }
    assert_eq!(r.state(&id).await.state, State::RevokeFailed);
    assert_eq!(r.service.metrics().revoke_failures.get(), 5);
    r.wait_for("alert", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, t)| c == "C0SECURITY" && t.contains("still shows the access"))
    })
    .await;
    let names = r.audit_names().await;
    assert!(!names.contains(&"revoked".to_string()), "{names:?}");

    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Revoked);
    let verified_at = row.verified_at.expect("verified");
    let events = r.service.store.audit_since(None).await.unwrap();
    let revoked = events.iter().find(|e| e.event == "revoked").unwrap();
    assert_eq!(revoked.details["verified"], true);
    assert_eq!(
        revoked.details["verified_at"],
        crate::domain::lifecycle::rfc3339(Some(verified_at)).unwrap()
    );
    assert_eq!(revoked.details["attempts"], 6);
}

/// A request approved by `U0APP`, then revoked early before any grant step
/// ran; `intents` says whether a crashed first try may have made something.
async fn revoked_before_grant(r: &Rig, intents: bool) -> RequestId {
    let receipt = r
        .service
        .handle_command(SlashCommand {
            trigger_id: None,
            user_id: "U0REQ".into(),
            text: "eks prod 5m view".into(),
            response_url: None,
        })
        .await;
    let at = receipt.find("R-").unwrap_or_else(|| panic!("{receipt}"));
    let id = RequestId::parse(&receipt[at..at + 7]).unwrap();
    let pending = r.state(&id).await;
    let mut next = pending.clone();
    next.state = State::Approved;
    next.approved_at = Some(r.clock.now());
    next.revoke = Some(crate::domain::request::RevokeIntent {
        reason: crate::domain::request::RevokeReason::Early,
        by: "U0REQ".into(),
        note: None,
        at: r.clock.now(),
    });
    if intents {
        next.intents = crate::domain::grant::intents_for(
            crate::domain::policy::Strategy::AccessEntry,
            id.as_str(),
            &next.access,
        );
    }
    r.service
        .store
        .update(&pending, next, Vec::new())
        .await
        .unwrap();
    id
}

/// Nothing was ever created for a request revoked before its grant (no
/// intents recorded): there is nothing of it to read back, and access the
/// principal holds anyway is not taken for a failed revoke.
#[tokio::test]
async fn a_revoke_before_anything_was_created_is_not_judged_on_others_access() {
    let r = rig();
    let id = revoked_before_grant(&r, false).await;
    *r.access.lies.lock().unwrap() = 1;
    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Revoked);
    assert_eq!(row.attempts, 0);
    assert_eq!(*r.access.lies.lock().unwrap(), 1, "nothing was read back");
    let events = r.service.store.audit_since(None).await.unwrap();
    let revoked = events.iter().find(|e| e.event == "revoked").unwrap();
    assert_eq!(revoked.details["before_grant"], true);
    assert_eq!(revoked.details["verified"], true);
}

/// A revoke before the grant whose read-back keeps showing the access is
/// a failing revoke like any other: counted, audited and alerted at the
/// threshold, and retried until it goes through.
#[tokio::test]
async fn a_failing_revoke_before_the_grant_is_escalated() {
    let r = rig();
    let id = revoked_before_grant(&r, true).await;
    *r.access.lies.lock().unwrap() = 5;
    for attempt in 1..=5u32 {
        r.service.run_due().await.unwrap();
        let row = r.state(&id).await;
        assert_eq!(row.state, State::Approved, "not recorded while it shows");
        assert_eq!(row.attempts, attempt);
        r.clock.advance(Duration::from_secs(300));
    }
    assert_eq!(r.service.metrics().revoke_failures.get(), 5);
    let names = r.audit_names().await;
    assert_eq!(
        names.iter().filter(|n| *n == "revoke_failed").count(),
        1,
        "{names:?}"
    );
    r.wait_for("alert", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, t)| c == "C0SECURITY" && t.contains(id.as_str()))
    })
    .await;
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
}

/// The converge and the read-back of one revoke share one time limit: a
/// cluster slow enough that the two together overrun it fails the attempt.
#[tokio::test]
async fn converge_and_read_back_share_one_time_limit() {
    let tunables = Tunables {
        converge_limit: Duration::from_millis(600),
        ..Tunables::default()
    };
    let r = rig_tuned(|_| {}, tunables);
    let id = r.approved("eks prod 5m view", "U0APP").await;
    *r.access.slow.lock().unwrap() = Some(Duration::from_millis(400));
    r.clock.advance(Duration::from_secs(5 * 60));
    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Active, "recorded although overrun");
    assert_eq!(row.attempts, 1);
    *r.access.slow.lock().unwrap() = None;
    r.clock.advance(Duration::from_secs(300));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
}

/// A request revoked after approval but before its grant was made ends as
/// `revoked` too; when a first try may have made something (intents
/// recorded), its cleanup is read back like any revoke.
#[tokio::test]
async fn a_revoke_before_the_grant_is_read_back_as_well() {
    let r = rig();
    let id = revoked_before_grant(&r, true).await;
    *r.access.lies.lock().unwrap() = 1;

    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Approved, "not recorded while it shows");
    assert_eq!(row.attempts, 1);
    r.clock.advance(Duration::from_secs(60));
    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Revoked);
    assert!(row.verified_at.is_some());
    let events = r.service.store.audit_since(None).await.unwrap();
    let revoked = events.iter().find(|e| e.event == "revoked").unwrap();
    assert_eq!(revoked.details["before_grant"], true);
    assert_eq!(revoked.details["verified"], true);
}

/// A revoke whose cluster never answers is cut off by its time limit, and
/// that counts like any failure: attempts, backoff, RevokeFailed and the
/// alert at the threshold.
#[tokio::test]
async fn a_revoke_cut_off_by_its_time_limit_is_a_failed_attempt() {
    let tunables = Tunables {
        converge_limit: Duration::from_millis(100),
        ..Tunables::default()
    };
    let r = rig_tuned(|_| {}, tunables);
    let id = r.approved("eks prod 5m view", "U0APP").await;
    *r.access.hangs.lock().unwrap() = 5;
    r.clock.advance(Duration::from_secs(5 * 60));
    for attempt in 1..=5u32 {
        r.service.run_due().await.unwrap();
        let row = r.state(&id).await;
        assert_eq!(row.attempts, attempt, "the cut-off step was counted");
        assert!(row.retry_at.is_some(), "and backs off");
        r.clock.advance(Duration::from_secs(300));
    }
    assert_eq!(r.state(&id).await.state, State::RevokeFailed);
    assert_eq!(r.service.metrics().revoke_failures.get(), 5);
    let timeouts = crate::metrics::FailureLabel {
        step: "revoke".into(),
        error: "timeout".into(),
    };
    assert_eq!(
        r.service.metrics().failures.get_or_create(&timeouts).get(),
        5,
        "counted by kind: a converge cut off"
    );
    r.wait_for("alert", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, t)| c == "C0SECURITY" && t.contains(id.as_str()) && t.contains("cut off"))
    })
    .await;
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
}

#[tokio::test]
async fn failed_grant_stays_live_until_its_cleanup_succeeds() {
    let r = rig();
    // The grant fails and so does the cleanup after it.
    *r.access.failures.lock().unwrap() = 2;
    let id = r.approved("eks prod 5m view", "U0APP").await;
    let row = r.state(&id).await;
    assert_eq!(
        row.state,
        State::Approved,
        "not Failed while access may remain"
    );
    assert!(row
        .failure
        .as_deref()
        .unwrap_or_default()
        .contains("AWS is down"));
    assert!(r.audit_names().await.contains(&"grant_failed".to_string()));
    let unreachable = crate::metrics::FailureLabel {
        step: "grant".into(),
        error: "cluster_unreachable".into(),
    };
    assert_eq!(
        r.service
            .metrics()
            .failures
            .get_or_create(&unreachable)
            .get(),
        1,
        "the failed grant is counted once, by kind"
    );

    r.clock.advance(Duration::from_secs(10));
    r.service.run_due().await.unwrap();
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Failed);
    assert_eq!(
        r.access.converged.lock().unwrap().last().unwrap(),
        &Vec::<String>::new()
    );
    r.wait_for("failure DM", |r| {
        r.slack
            .dms
            .lock()
            .unwrap()
            .iter()
            .any(|(u, t)| u == "U0REQ" && t.contains("could not grant"))
    })
    .await;
}

/// Spec 9.6: a grant cut off by its converge limit may have a call in
/// flight. Its cleanup does not read at once (it could judge before the
/// call lands and forget a baseline the call then contradicts): the
/// principal is fenced for a lease term and the cleanup is a later pass's.
#[tokio::test]
async fn a_grant_cut_off_mid_call_leaves_its_cleanup_until_the_fence_ends() {
    let tunables = Tunables {
        retry_base: Duration::from_millis(100),
        converge_limit: Duration::from_millis(100),
        ..Tunables::new(
            Duration::from_millis(100),
            Duration::from_secs(3),
            String::new(),
        )
    };
    let r = rig_tuned(|_| {}, tunables);
    *r.access.hangs.lock().unwrap() = 1;
    let id = r.approved("eks prod 5m view", "U0APP").await;
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Approved, "not Failed: a call may land");
    assert!(
        row.failure
            .as_deref()
            .unwrap_or_default()
            .contains("cut off"),
        "{row:?}"
    );
    assert_eq!(
        r.access.converged_principals.lock().unwrap().len(),
        1,
        "the cut-off grant's cleanup read the cluster at once"
    );
    // A pass inside the fence waits it out, then cleans up.
    r.clock.advance(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    r.service.run_due().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the cleanup did not wait for the fence: {:?}",
        started.elapsed()
    );
    assert_eq!(r.state(&id).await.state, State::Failed);
    assert_eq!(
        r.access.converged.lock().unwrap().last().unwrap(),
        &Vec::<String>::new()
    );
}

/// Security review H2: a converge cut off not by its own limit but by the
/// step's outer time limit (the whole step future dropped mid-call) may
/// have a call in flight just the same. It fences the principal too: the
/// next converge waits until a late call could no longer land.
#[tokio::test]
async fn a_step_cut_off_by_its_outer_limit_mid_converge_fences_the_principal() {
    let tunables = Tunables {
        retry_base: Duration::from_millis(100),
        // Longer than the step (two thirds of the 3 s claim): only the
        // outer limit can cut this converge off.
        converge_limit: Duration::from_secs(30),
        ..Tunables::new(
            Duration::from_millis(100),
            Duration::from_secs(3),
            String::new(),
        )
    };
    assert!(tunables.step_limit() < tunables.converge_limit);
    let r = rig_tuned(|_| {}, tunables);
    *r.access.hangs.lock().unwrap() = 1;
    let id = r.approved("eks prod 5m view", "U0APP").await;
    assert_eq!(r.state(&id).await.state, State::Approved);
    assert_eq!(r.access.converged_principals.lock().unwrap().len(), 1);
    // The next pass, inside the fence's term, waits it out first.
    r.clock.advance(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    r.service.run_due().await.unwrap();
    assert_eq!(
        r.access.converged_principals.lock().unwrap().len(),
        2,
        "the row was driven again"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the next converge did not wait for a fence: {:?}",
        started.elapsed()
    );
}

/// The reconciler's cleanup converges under the same time limit as every
/// other converge, and a cut-off one fences the principal too.
#[tokio::test]
async fn a_reconcile_cleanup_is_cut_off_by_the_converge_limit() {
    let tunables = Tunables {
        converge_limit: Duration::from_millis(100),
        ..Tunables::new(
            Duration::from_millis(100),
            Duration::from_secs(3),
            String::new(),
        )
    };
    let r = rig_tuned(|_| {}, tunables);
    let cluster = r.service.config.clusters[0].clone();
    let old = r.approved("eks prod 10m view", "U0APP").await;
    let alice = r.state(&old).await.access.principal;
    r.clock.advance(Duration::from_secs(10 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&old).await.state, State::Revoked);
    *r.access.owned.lock().unwrap() = vec![entry(&alice, old.as_str())];
    *r.access.hangs.lock().unwrap() = 1;
    let cut = tokio::time::timeout(
        Duration::from_secs(5),
        r.service.reconcile_cluster(&cluster),
    )
    .await
    .expect("the reconciler's cleanup ran with no time limit");
    assert!(matches!(cut, Err(ServiceError::CutOff(_))), "{cut:?}");
    // Right after, the principal is fenced: the next converge of it waits
    // the term out before it reads (the fake clock is moved to just
    // before its end).
    r.clock.advance(Duration::from_millis(2500));
    let started = std::time::Instant::now();
    let guard = r.service.principal(&cluster.name, &alice).await;
    assert!(guard.is_some());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not fenced: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn recovery_revokes_overdue_grants_whatever_their_retry_time() {
    let r = rig();
    let id = r.approved("eks prod 5m view", "U0APP").await;
    *r.access.failures.lock().unwrap() = 1;
    r.clock.advance(Duration::from_secs(5 * 60));
    r.service.run_due().await.unwrap();
    assert!(r.state(&id).await.retry_at.is_some());
    // A restart right away: the overdue grant is revoked before serving.
    r.service.recover().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
}

#[tokio::test]
async fn late_clicks_do_not_count() {
    let r = rig();
    let receipt = r
        .service
        .handle_command(SlashCommand {
            trigger_id: None,
            user_id: "U0REQ".into(),
            text: "eks prod 5m view".into(),
            response_url: None,
        })
        .await;
    let at = receipt.find("R-").unwrap();
    let id = RequestId::parse(&receipt[at..at + 7]).unwrap();
    r.clock.advance(Duration::from_secs(31 * 60));
    r.service
        .decide(Decision {
            request_id: id.to_string(),
            user_id: "U0APP".into(),
            approve: true,
            response_url: None,
        })
        .await;
    assert_eq!(r.state(&id).await.state, State::Pending);
    assert!(r.state(&id).await.approvals.is_empty());
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Expired);
}

#[tokio::test]
async fn reconciler_looks_again_before_calling_a_just_revoked_entry_an_orphan() {
    let r = rig();
    let id = r.approved("eks prod 10m view", "U0APP").await;
    let alice = r.state(&id).await.access.principal;
    r.clock.advance(Duration::from_secs(10 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
    // The cluster was listed while the revoke was still under way; by the
    // time the reconciler holds Alice's lock, the entry is gone.
    *r.access.owned.lock().unwrap() = vec![entry(&alice, id.as_str())];
    *r.access.relist.lock().unwrap() = Some(Vec::new());
    let cluster = r.service.config.clusters[0].clone();
    let report = r.service.reconcile_cluster(&cluster).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(!r.audit_names().await.contains(&"reconciled".to_string()));
}

#[tokio::test]
async fn reconciler_removes_what_its_store_created_and_leaves_forged_marks() {
    let r = rig();
    let cluster = r.service.config.clusters[0].clone();
    let old = r.approved("eks prod 10m view", "U0APP").await;
    let alice = r.state(&old).await.access.principal;
    assert!(
        r.state(&old)
            .await
            .intents
            .contains(&crate::domain::request::Intent::AccessEntry {
                principal: alice.clone()
            }),
        "the entry was recorded before it was created"
    );
    r.clock.advance(Duration::from_secs(10 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&old).await.state, State::Revoked);
    // Alice's entry is left from a crash; an admin's entry carries
    // Tollgate's marks with a grant id the store never issued.
    let admin = "arn:aws:iam::111122223333:role/platform-admin";
    *r.access.owned.lock().unwrap() = vec![entry(&alice, old.as_str()), entry(admin, "R-GH0ST")];
    r.access.converged_principals.lock().unwrap().clear();
    let report = r.service.reconcile_cluster(&cluster).await.unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.foreign.len(), 1, "{report:?}");
    assert_eq!(
        r.access.converged_principals.lock().unwrap().clone(),
        vec![alice.clone()],
        "the forged entry's principal is never touched"
    );
    for _ in 0..2 {
        let report = r.service.reconcile_cluster(&cluster).await.unwrap();
        assert!(report.removed.is_empty(), "{report:?}");
    }
    assert_eq!(
        r.access.converged_principals.lock().unwrap().clone(),
        vec![alice.clone()]
    );
    let names = r.audit_names().await;
    assert_eq!(names.iter().filter(|n| *n == "reconciled").count(), 1);
    assert_eq!(
        names.iter().filter(|n| *n == "foreign").count(),
        1,
        "{names:?}"
    );
    assert_eq!(r.service.metrics().foreign_objects.get(), 1);
}

#[tokio::test]
async fn reconciler_reads_every_mark_only_on_the_first_pass_and_then_hourly() {
    let r = rig();
    let cluster = r.service.config.clusters[0].clone();
    let id = r.approved("eks prod 4h view", "U0APP").await;
    let alice = r.state(&id).await.access.principal;
    let admin = "arn:aws:iam::111122223333:role/platform-admin";
    *r.access.owned.lock().unwrap() = vec![entry(&alice, id.as_str()), entry(admin, "R-GH0ST")];
    let looks = |r: &Rig| std::mem::take(&mut *r.access.looks.lock().unwrap());

    let first = r.service.reconcile_cluster(&cluster).await.unwrap();
    assert_eq!(first.foreign.len(), 1, "{first:?}");
    assert_eq!(looks(&r), vec![None], "the first pass reads every mark");
    for _ in 0..3 {
        r.clock.advance(Duration::from_secs(5 * 60));
        let report = r.service.reconcile_cluster(&cluster).await.unwrap();
        assert_eq!(report, super::reconcile::ReconcileReport::default());
    }
    assert_eq!(
        looks(&r),
        vec![Some(vec![]); 3],
        "ordinary passes read only what the store knows of, and not an entry a grant in force needs"
    );

    r.clock.advance(Duration::from_secs(45 * 60));
    r.service.reconcile_cluster(&cluster).await.unwrap();
    assert_eq!(looks(&r), vec![None], "an hour on, every mark again");
    // Past its expiry and not yet revoked, alice's grant is no longer in
    // force: her entry may be left over, so an ordinary pass reads it.
    r.clock.advance(Duration::from_secs(4 * 3600));
    r.service.reconcile_cluster(&cluster).await.unwrap();
    looks(&r);
    r.clock.advance(Duration::from_secs(5 * 60));
    r.service.reconcile_cluster(&cluster).await.unwrap();
    assert_eq!(looks(&r), vec![Some(vec![alice.clone()])]);
    let names = r.audit_names().await;
    assert_eq!(
        names.iter().filter(|n| *n == "foreign").count(),
        1,
        "the forged entry is reported once: {names:?}"
    );
}

/// aws-auth items name no grant; a `tollgate:` item that no live request of
/// the store records (hand-made, or another installation's) is reported
/// and never converged away.
#[tokio::test]
async fn aws_auth_items_no_live_request_records_are_left_alone() {
    let r = rig_with(|c| c.clusters[0].strategy = crate::domain::policy::Strategy::AwsAuth);
    let cluster = r.service.config.clusters[0].clone();
    let id = r.approved("eks prod 30m view", "U0APP").await;
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Active);
    let item = |arn: &str, user: &str| crate::access::Owned {
        principal: arn.into(),
        grant_id: None,
        object: format!("aws-auth item {arn}"),
        instance: None,
        intent: Some(crate::domain::request::Intent::AwsAuthItem {
            arn: arn.to_ascii_lowercase(),
            username: user.into(),
        }),
        holds: None,
    };
    let alice = crate::domain::grant::aws_auth_arn(&row.access.principal);
    let admin = "arn:aws:iam::111122223333:role/platform-admin";
    *r.access.owned.lock().unwrap() = vec![
        item(&alice, row.access.k8s_user.as_deref().unwrap()),
        item(admin, "tollgate:mallory@example.com"),
    ];
    r.access.converged_principals.lock().unwrap().clear();
    for _ in 0..2 {
        let report = r.service.reconcile_cluster(&cluster).await.unwrap();
        assert!(report.removed.is_empty(), "{report:?}");
    }
    assert!(
        r.access.converged_principals.lock().unwrap().is_empty(),
        "neither item is converged: alice's is needed, the other is not Tollgate's"
    );
    let names = r.audit_names().await;
    assert_eq!(
        names.iter().filter(|n| *n == "foreign").count(),
        1,
        "{names:?}"
    );
}

#[tokio::test]
async fn reconciler_reports_drift_once_and_never_for_access_in_place() {
    let r = rig();
    let cluster = r.service.config.clusters[0].clone();
    let id = r.approved("eks prod 30m view", "U0APP").await;
    let alice = r.state(&id).await.access.principal;
    *r.access.owned.lock().unwrap() = vec![entry(&alice, id.as_str())];
    let report = r.service.reconcile_cluster(&cluster).await.unwrap();
    assert_eq!(report, super::reconcile::ReconcileReport::default());

    // Alice's access vanishes outside Tollgate: reported once, not recreated.
    *r.access.owned.lock().unwrap() = vec![];
    r.access.converged_principals.lock().unwrap().clear();
    for _ in 0..3 {
        let report = r.service.reconcile_cluster(&cluster).await.unwrap();
        assert!(report.removed.is_empty());
    }
    assert!(
        r.access.converged_principals.lock().unwrap().is_empty(),
        "nothing recreated"
    );
    let drift = r
        .audit_names()
        .await
        .iter()
        .filter(|n| *n == "drift")
        .count();
    assert_eq!(drift, 1);
    assert!(r.state(&id).await.drift_reported);
    assert_eq!(r.service.metrics().drift.get(), 1);
}

impl Rig {
    async fn say(&self, user: &str, text: &str) -> String {
        self.service
            .handle_command(SlashCommand {
                trigger_id: None,
                user_id: user.into(),
                text: text.into(),
                response_url: None,
            })
            .await
    }

    async fn approve(&self, id: &RequestId) {
        self.service
            .decide(Decision {
                request_id: id.to_string(),
                user_id: "U0APP".into(),
                approve: true,
                response_url: None,
            })
            .await;
    }

    /// Writes `id`'s row as `edit` leaves it, straight into the store, as
    /// someone with write access to the table would.
    async fn edit_row(&self, id: &RequestId, edit: impl FnOnce(&mut Request)) {
        let row = self.state(id).await;
        let mut edited = row.clone();
        edit(&mut edited);
        edited.version += 1;
        self.service
            .store()
            .update(&row, edited, Vec::new())
            .await
            .unwrap();
    }

    fn id_in(text: &str, skip: usize) -> RequestId {
        let at = text
            .match_indices("R-")
            .nth(skip)
            .unwrap_or_else(|| panic!("{text}"))
            .0;
        RequestId::parse(&text[at..at + 7]).unwrap()
    }

    fn reminders(&self) -> usize {
        self.slack
            .dms
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.contains("ends in about"))
            .count()
    }
}

#[tokio::test]
async fn the_reminder_comes_once_before_expiry_and_changes_nothing_else() {
    let r = rig();
    let id = r.approved("eks prod 30m view", "U0APP").await;
    r.clock.advance(Duration::from_secs(19 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.reminders(), 0, "not before reminder_before");
    r.clock.advance(Duration::from_secs(60));
    r.service.run_due().await.unwrap();
    r.service.run_due().await.unwrap();
    r.wait_for("reminder DM", |r| r.reminders() == 1).await;
    let row = r.state(&id).await;
    assert_eq!(row.state, State::Active);
    assert_eq!(row.remind_at, None);
    r.clock.advance(Duration::from_secs(10 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&id).await.state, State::Revoked);
    assert_eq!(r.reminders(), 1);
}

#[tokio::test]
async fn no_reminder_for_a_grant_no_longer_than_reminder_before() {
    let r = rig();
    let id = r.approved("eks prod 10m view", "U0APP").await;
    assert_eq!(r.state(&id).await.remind_at, None);
}

#[tokio::test]
async fn an_approved_extension_moves_the_expiry_once() {
    let r = rig();
    let grant = r.approved("eks prod 30m view", "U0APP").await;
    let before = r.state(&grant).await.expires_at.unwrap();
    let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    let ext = Rig::id_in(&receipt, 0);
    assert_ne!(ext, grant, "{receipt}");
    assert_eq!(r.state(&ext).await.state, State::Pending);
    r.approve(&ext).await;

    let moved = r.state(&grant).await;
    assert_eq!(moved.state, State::Active);
    assert_eq!(moved.expires_at, Some(before + Duration::from_secs(3600)));
    assert_eq!(moved.extended_by, vec![ext.clone()]);
    let applied = r.state(&ext).await;
    assert_eq!(applied.state, State::Applied);
    // Driving the same extension again (a crash before its own write) does
    // not move the expiry a second time.
    let mut again = applied.clone();
    again.state = State::Approved;
    r.service.apply_extension(&again).await;
    assert_eq!(r.state(&grant).await.expires_at, moved.expires_at);
    assert_eq!(
        r.audit_names()
            .await
            .iter()
            .filter(|e| *e == "extended")
            .count(),
        1
    );
    // Past the old expiry the grant stays; at the new one it goes.
    r.clock.advance(Duration::from_secs(31 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&grant).await.state, State::Active);
    r.clock.advance(Duration::from_secs(3600));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&grant).await.state, State::Revoked);
}

#[tokio::test]
async fn an_extension_of_an_ended_grant_fails_and_others_may_not_extend() {
    let r = rig();
    let grant = r.approved("eks prod 20m view", "U0APP").await;
    let refused = r.say("U0APP", &format!("extend {grant} 1h")).await;
    assert!(refused.contains("Only the requester"), "{refused}");
    let refused = r.say("U0REQ", &format!("extend {grant} 9h")).await;
    assert!(refused.contains("out of range"), "{refused}");
    let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    let ext = Rig::id_in(&receipt, 0);
    let twice = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    assert!(
        twice.contains("already has an extension waiting"),
        "{twice}"
    );
    r.clock.advance(Duration::from_secs(20 * 60));
    r.service.run_due().await.unwrap();
    assert_eq!(r.state(&grant).await.state, State::Revoked);
    r.approve(&ext).await;
    let failed = r.state(&ext).await;
    assert_eq!(failed.state, State::Failed);
    assert!(failed.failure.unwrap().contains("already ended"));
    let again = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    assert!(again.contains("not active"), "{again}");
}

/// The inbox sweep takes up only clicks older than its grace, processes
/// each once however many sweeps race for it, and empties the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_sweep_takes_up_abandoned_clicks_once() {
    use crate::domain::inbox::{Click, Interaction};
    let r = rig();
    let receipt = r
        .service
        .handle_command(SlashCommand {
            trigger_id: None,
            user_id: "U0REQ".into(),
            text: "eks prod 5m view".into(),
            response_url: None,
        })
        .await;
    let at = receipt.find("R-").unwrap();
    let id = RequestId::parse(&receipt[at..at + 7]).unwrap();
    let now = r.service.clock.now();
    let click = Interaction::new(
        Click::Approve,
        id.as_str(),
        "U0APP",
        Some("1.1"),
        "",
        None,
        now,
    );
    let fresh = r.service.record_clicks(vec![click.clone()]).await.unwrap();
    assert_eq!(fresh.len(), 1);
    assert!(
        r.service
            .record_clicks(vec![click])
            .await
            .unwrap()
            .is_empty(),
        "the same click again is not processed twice"
    );

    // A click a dry-run server sharing the store recorded is its own.
    let mut other_mode = Interaction::new(
        Click::Deny,
        id.as_str(),
        "U0APP",
        Some("1.2"),
        "",
        None,
        now,
    );
    other_mode.dry_run = true;
    assert!(r
        .service
        .store
        .record_interaction(&other_mode)
        .await
        .unwrap());

    let grace = Duration::from_secs(30);
    assert_eq!(
        r.service.replay_clicks(grace).await.unwrap(),
        0,
        "a click younger than the grace belongs to the replica that took it"
    );
    r.clock.advance(grace);
    let (a, b) = tokio::join!(
        r.service.replay_clicks(grace),
        r.service.replay_clicks(grace)
    );
    assert!(a.unwrap() + b.unwrap() >= 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.service.store.interactions().await.unwrap().len() > 1 {
        assert!(std::time::Instant::now() < deadline, "inbox not emptied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let row = r.state(&id).await;
    assert_eq!(row.approvals.len(), 1, "one vote");
    assert_ne!(row.state, State::Pending, "the click decided the request");
    assert_eq!(
        r.service.store.interactions().await.unwrap(),
        vec![crate::store::InboxEntry::Click(other_mode)],
        "the other mode's click is left to its own server"
    );
}

/// Spec 9.7: an extension keeps the grant's own namespaces, so once one of
/// them is denied (the config changed and the server restarted) neither a
/// waiting extension nor a new one keeps the access longer.
#[tokio::test]
async fn an_extension_never_keeps_a_namespace_denied_since_the_grant() {
    let r = rig();
    let grant = r.approved("eks prod 30m edit --ns payments", "U0APP").await;
    let before = r.state(&grant).await.expires_at;
    assert!(before.is_some());
    let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    let ext = Rig::id_in(&receipt, 0);

    let mut config = (*r.service.config).clone();
    config.clusters[0]
        .roles
        .get_mut("edit")
        .unwrap()
        .namespace_rules
        .deny
        .push("pay*".into());
    let restarted = Service::new(
        Arc::new(config),
        r.service.store.clone(),
        r.access.clone(),
        r.slack.clone(),
        r.clock.clone(),
        Arc::new(crate::metrics::Metrics::new()),
        Tunables::default(),
    );
    restarted
        .decide(Decision {
            request_id: ext.to_string(),
            user_id: "U0APP".into(),
            approve: true,
            response_url: None,
        })
        .await;
    let failed = r.state(&ext).await;
    assert_eq!(failed.state, State::Failed);
    assert!(
        failed
            .failure
            .as_deref()
            .unwrap_or_default()
            .contains("\"pay*\""),
        "{failed:?}"
    );
    assert_eq!(r.state(&grant).await.expires_at, before, "expiry unmoved");

    let refused = restarted
        .handle_command(SlashCommand {
            trigger_id: None,
            user_id: "U0REQ".into(),
            text: format!("extend {grant} 1h"),
            response_url: None,
        })
        .await;
    assert!(
        refused.contains("cannot be extended") && refused.contains("deny_namespaces"),
        "{refused}"
    );
}

#[tokio::test]
async fn an_extension_of_a_grant_whose_role_changed_fails_clearly() {
    let r = rig();
    let grant = r.approved("eks prod 30m view", "U0APP").await;
    let before = r.state(&grant).await.expires_at;
    let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    let ext = Rig::id_in(&receipt, 0);
    // The grant's access as stored is no longer what its role gives (the
    // role was edited since, as far as this grant is concerned).
    r.edit_row(&grant, |edited| {
        edited.access.policy_arn =
            Some("arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy".into());
    })
    .await;
    r.approve(&ext).await;
    let failed = r.state(&ext).await;
    assert_eq!(failed.state, State::Failed);
    let why = failed.failure.unwrap();
    assert!(
        why.contains("cannot be extended") && why.contains("role changed"),
        "{why}"
    );
    assert_eq!(r.state(&grant).await.expires_at, before, "not moved");
}

#[tokio::test]
async fn a_moved_expiry_is_never_given_to_the_cloud_past_the_cap_and_is_revoked() {
    let r = rig();
    let grant = r.approved("eks prod 30m view", "U0APP").await;
    let row = r.state(&grant).await;
    let cap = row.activated_at.unwrap() + Duration::from_secs(12 * 3600);
    // Moved ten years out by a direct write to the store.
    let mut edited = row.clone();
    edited.expires_at = Some(row.activated_at.unwrap() + Duration::from_secs(3650 * 86400));
    r.service
        .store()
        .update(&row, edited, Vec::new())
        .await
        .unwrap();
    // A second grant of the same principal converges the union: the
    // edited grant goes to the cloud side with its expiry capped.
    let second = r.approved("eks prod 10m view", "U0APP").await;
    let given = r.access.expiries.lock().unwrap().last().cloned().unwrap();
    let first = given.iter().find(|(id, _)| id == grant.as_str()).unwrap();
    assert_eq!(first.1, Some(cap), "{given:?}");
    assert!(given.iter().any(|(id, _)| id == second.as_str()));

    // The reconcile pass revokes it (reason invalid_row) and tells security.
    let cluster = r.service.config().cluster("prod").unwrap().clone();
    assert_eq!(r.service.revoke_overlong(&cluster).await, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.state(&grant).await.state != State::Revoked {
        assert!(std::time::Instant::now() < deadline, "not revoked");
        r.service.run_due().await.unwrap();
        tokio::task::yield_now().await;
    }
    let ended = r.state(&grant).await;
    assert_eq!(ended.state, State::Revoked);
    assert_eq!(
        ended.revoke.map(|i| i.reason),
        Some(crate::domain::request::RevokeReason::InvalidRow)
    );
    assert_eq!(
        r.state(&second).await.state,
        State::Active,
        "the other stays"
    );
}

#[tokio::test]
async fn a_re_drive_after_the_grants_whole_time_makes_nothing() {
    let r = rig();
    let receipt = r.say("U0REQ", "eks prod 30m view").await;
    let id = Rig::id_in(&receipt, 0);
    // As if a first attempt crashed after recording its start, long ago.
    let row = r.state(&id).await;
    let mut started = row.clone();
    started.first_attempt_at = Some(r.clock.now() - Duration::from_secs(3600));
    r.service
        .store()
        .update(&row, started, Vec::new())
        .await
        .unwrap();
    r.approve(&id).await;
    let failed = r.state(&id).await;
    assert_eq!(failed.state, State::Failed);
    assert!(
        failed.failure.as_deref().unwrap().contains("time ran out"),
        "{:?}",
        failed.failure
    );
    assert_eq!(failed.expires_at, None);
    // Whatever the first attempt may have made was converged away: no
    // converge ever included the grant.
    assert!(r
        .access
        .converged
        .lock()
        .unwrap()
        .iter()
        .all(|g| !g.contains(&id.to_string())));
}

/// Security review M2: an extension row edited in the store to name other
/// access (another principal and requester, or a role with longer limits)
/// than the grant it extends is refused as an invalid row, and the grant's
/// expiry does not move. Each forgery would otherwise pass the row check
/// on its own terms: it is a properly approved row for what it names.
#[tokio::test]
async fn a_forged_extension_row_never_moves_another_grants_expiry() {
    type Forge = fn(&mut Request);
    let forgeries: [(&str, Forge); 3] = [
        ("names access other than", |ext| {
            ext.access.principal = "arn:aws:iam::111122223333:role/mallory".into();
        }),
        ("not asked by the requester", |ext| {
            ext.requester.user_id = "U0MALLORY".into();
        }),
        ("names access other than", |ext| {
            ext.access.role = "edit".into();
            ext.access.namespaces = vec!["payments".into()];
        }),
    ];
    for (said, forge) in forgeries {
        let r = rig();
        let grant = r.approved("eks prod 30m view", "U0APP").await;
        let before = r.state(&grant).await.expires_at;
        assert!(before.is_some());
        let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
        let ext = Rig::id_in(&receipt, 0);
        // The row as someone with write access to the table leaves it.
        r.edit_row(&ext, forge).await;
        r.approve(&ext).await;
        let failed = r.state(&ext).await;
        assert_eq!(failed.state, State::Failed, "{said}: {failed:?}");
        let why = failed.failure.unwrap_or_default();
        assert!(why.contains(said), "{why}");
        assert_eq!(r.state(&grant).await.expires_at, before, "{said}: moved");
    }
}

/// Security review M6: a click on a card of the other mode's server (a
/// dry-run request on a live server) is answered so and changes nothing.
#[tokio::test]
async fn a_click_on_another_modes_request_changes_nothing() {
    let r = rig();
    let receipt = r.say("U0REQ", "eks prod 30m view").await;
    let id = Rig::id_in(&receipt, 0);
    r.edit_row(&id, |dry| {
        dry.dry_run = true;
    })
    .await;
    r.service
        .decide(Decision {
            request_id: id.to_string(),
            user_id: "U0APP".into(),
            approve: true,
            response_url: Some("https://hooks.example/r1".into()),
        })
        .await;
    let after = r.state(&id).await;
    assert_eq!(after.state, State::Pending);
    assert!(after.approvals.is_empty(), "{after:?}");
    let answered = r.slack.responses.lock().unwrap().clone();
    assert!(
        answered
            .iter()
            .any(|(_, t)| t.contains("belongs to a dry-run server") && t.contains(id.as_str())),
        "{answered:?}"
    );
}

/// Security review M6: an extension is never applied to a grant of the
/// other mode (a live extension row naming a dry-run grant).
#[tokio::test]
async fn an_extension_never_moves_a_grant_of_the_other_mode() {
    let r = rig();
    let grant = r.approved("eks prod 30m view", "U0APP").await;
    let before = r.state(&grant).await.expires_at;
    let receipt = r.say("U0REQ", &format!("extend {grant} 1h")).await;
    let ext = Rig::id_in(&receipt, 0);
    r.edit_row(&grant, |dry| {
        dry.dry_run = true;
    })
    .await;
    r.approve(&ext).await;
    let failed = r.state(&ext).await;
    assert_eq!(failed.state, State::Failed, "{failed:?}");
    assert_eq!(r.state(&grant).await.expires_at, before, "moved");
}
/// Spec 9.8 with a row integrity key: a grant whose expiry was moved
/// within the cap by a write that skipped Tollgate (no valid MAC) counts
/// for no other converge, is ended at the reconcile pass (audited
/// `tampered` once, security channel told) and revoked; the other grant
/// stays.
#[tokio::test]
async fn with_a_store_key_an_edited_grant_is_not_in_force_and_is_revoked_as_tampered() {
    let tunables = Tunables {
        integrity: crate::domain::integrity::RowKey::new(&[5; 32]),
        ..Tunables::default()
    };
    let r = rig_tuned(|_| {}, tunables);
    let grant = r.approved("eks prod 30m view", "U0APP").await;
    let row = r.state(&grant).await;
    assert_eq!(row.state, State::Active);
    assert!(row.mac.is_some(), "Tollgate's writes are signed");
    let mut edited = row.clone();
    edited.expires_at = Some(row.expires_at.unwrap() + Duration::from_secs(3600));
    r.raw.update(&row, edited, Vec::new()).await.unwrap();

    let second = r.approved("eks prod 10m view", "U0APP").await;
    assert_eq!(r.state(&second).await.state, State::Active);
    let given = r.access.expiries.lock().unwrap().last().cloned().unwrap();
    assert!(
        !given.iter().any(|(id, _)| id == grant.as_str()),
        "the edited grant is not in force: {given:?}"
    );

    let cluster = r.service.config().cluster("prod").unwrap().clone();
    assert_eq!(r.service.quarantine_tampered(&cluster).await, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.state(&grant).await.state != State::Revoked {
        assert!(std::time::Instant::now() < deadline, "not revoked");
        r.service.run_due().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(
        r.service.quarantine_tampered(&cluster).await,
        0,
        "reported once"
    );
    let audit = r.service.store().audit_since(None).await.unwrap();
    let tampered: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "tampered" && e.request_id == grant.as_str())
        .collect();
    assert_eq!(tampered.len(), 1, "{audit:?}");
    r.wait_for("alert", |r| {
        r.slack
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(c, t)| c == "C0SECURITY" && t.contains(grant.as_str()))
    })
    .await;
    assert_eq!(
        r.state(&second).await.state,
        State::Active,
        "the other stays"
    );
}

/// Spec 9.9: commands read group memberships remembered for a minute, so a
/// member spamming `/access clusters` costs one `usergroups.users.list`;
/// an approval asks afresh, so a member removed from the approvers' group
/// a moment ago cannot approve on the remembered answer.
#[tokio::test]
async fn commands_share_one_group_lookup_and_an_approval_asks_afresh() {
    let r = rig_with(|c| {
        let view = c.clusters[0].roles.get_mut("view").unwrap();
        view.requesters = vec!["S0REQS".into()];
    });
    r.slack.set_group("S0REQS", &["U0REQ"]);
    r.slack.set_group("S0ONCALL", &["U0ONCALL"]);
    let cmd = |text: &str| SlashCommand {
        trigger_id: None,
        user_id: "U0REQ".into(),
        text: text.into(),
        response_url: None,
    };
    for _ in 0..10 {
        let text = r.service.handle_command(cmd("clusters")).await;
        assert!(text.contains("`view`"), "{text}");
    }
    assert_eq!(r.slack.lookups_of("usergroups.users.list S0REQS"), 1);
    let first = r.approved("eks prod 5m view", "U0ONCALL").await;
    assert_eq!(r.state(&first).await.state, State::Active);
    assert_eq!(
        r.slack.lookups_of("users.info U0REQ"),
        3,
        "request, approval, grant"
    );

    r.slack.set_group("S0ONCALL", &[]);
    r.clock.advance(Duration::from_secs(1));
    let second = r.approved("eks prod 5m view", "U0ONCALL").await;
    assert_eq!(r.state(&second).await.state, State::Pending);
    assert!(r.state(&second).await.approvals.is_empty());
}

/// Spec 9.9: while Slack answers 429, an answer at most ten minutes old
/// stands in, for a command and for the fresh checks of an approval and
/// a grant alike.
#[tokio::test]
async fn while_slack_rate_limits_a_young_answer_stands_in_at_approval_and_grant() {
    let r = rig();
    r.slack.set_group("S0ONCALL", &["U0ONCALL"]);
    let first = r.approved("eks prod 5m view", "U0ONCALL").await;
    assert_eq!(r.state(&first).await.state, State::Active);
    r.clock.advance(Duration::from_secs(5 * 60));
    r.slack
        .limited
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let asked = r.slack.lookups.lock().unwrap().len();
    let second = r.approved("eks prod 5m edit --ns web", "U0ONCALL").await;
    assert_eq!(r.state(&second).await.state, State::Active);
    // Slack was asked (and said 429) rather than skipped.
    assert!(r.slack.lookups.lock().unwrap().len() > asked);
}
