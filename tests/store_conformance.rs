//! One suite for the `Store` contract, run against every backend: sled in a
//! temp dir and DynamoDB in MiniStack (table made by `store init`'s code).
//! Each case gets a fresh store; a case that fails names its backend.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use time::macros::datetime;
use time::OffsetDateTime;

use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use tollgate::domain::audit::AuditEvent;
use tollgate::domain::grant::{Baselines, Scope};
use tollgate::domain::lifecycle;
use tollgate::domain::readback::Verified;
use tollgate::domain::request::{
    transition, AccessSpec, Asked, Event, Request, RequestId, Requester, RevokeIntent,
    RevokeReason, State,
};
use tollgate::store::{
    dynamodb, AuditEntry, AuditPosition, DynamoStore, SledStore, Store, StoreError,
};

use support::ministack::MiniStack;

const T0: OffsetDateTime = datetime!(2026-11-23 12:00 UTC);

fn secs(n: i64) -> time::Duration {
    time::Duration::seconds(n)
}

fn id(n: usize) -> RequestId {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let body: String = (0..5)
        .rev()
        .map(|i| ALPHABET[(n >> (5 * i)) & 31] as char)
        .collect();
    RequestId::parse(&body).unwrap()
}

/// Request `n`, brought to `state` at T0 through the service's own steps
/// (`domain::lifecycle`), so it carries exactly the fields a stored row in
/// that state has.
fn request(n: usize, state: State) -> Request {
    let pending = Request::pending(
        Asked {
            id: id(n),
            requester: Requester {
                user_id: format!("U{n}"),
                email: format!("u{n}@example.com"),
                tz: None,
                tz_offset_secs: 0,
            },
            access: AccessSpec {
                cluster: "prod".into(),
                role: "view".into(),
                principal: format!("arn:aws:iam::1:role/u{n}"),
                policy_arn: Some(
                    "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy".into(),
                ),
                namespaces: vec![],
                cluster_role: None,
                groups: vec![],
                k8s_user: None,
                strategy: None,
            },
            reason: format!("reason {n}"),
            duration: Duration::from_secs(3600),
            approval_timeout: Duration::from_secs(1800),
            required_approvals: 1,
            response_url: None,
        },
        T0,
    );
    let approved = || lifecycle::approve(&pending, "U0", T0).unwrap().row;
    let active = || {
        let made = lifecycle::GrantMade {
            activated_at: T0,
            reminder_before: None,
            grant_ms: 0,
        };
        lifecycle::granted(&approved(), &made, T0).unwrap().row
    };
    let no_delay = |_| Duration::ZERO;
    let row = match state {
        State::Pending => Ok(pending.clone()),
        State::Approved => Ok(approved()),
        State::Active => Ok(active()),
        State::Revoked => lifecycle::revoked(&active(), Verified::At(T0), T0).map(|e| e.row),
        State::Denied => lifecycle::deny(&pending, "U0", T0).map(|e| e.row),
        State::Cancelled => lifecycle::cancel(&pending, "U0", json!({}), T0).map(|e| e.row),
        State::Expired => lifecycle::expire(&pending, pending.approval_deadline).map(|e| e.row),
        State::Failed => {
            lifecycle::grant_failed(&approved(), "failed", None, T0, no_delay).map(|e| e.row)
        }
        State::RevokeFailed => (0..lifecycle::REVOKE_FAILED_AFTER).try_fold(active(), |row, _| {
            lifecycle::revoke_failed(&row, "failing", T0, no_delay).map(|e| e.row)
        }),
        State::Applied => lifecycle::extension_applied(&approved(), None, T0).map(|e| e.row),
    };
    let row = row.unwrap_or_else(|e| panic!("{state:?}: {e}"));
    assert_eq!(row.state, state);
    row
}

/// `drive` applies any event the state table allows, not only the ones the
/// service sends, so it fills the fields the new state carries itself:
/// its due time is then the one the state implies.
fn shape_for(req: &mut Request, now: OffsetDateTime) {
    match req.state {
        State::Approved => req.approved_at = Some(now),
        State::Active | State::RevokeFailed => {
            req.activated_at.get_or_insert(now);
            req.expires_at.get_or_insert(now + secs(3600));
        }
        s if s.is_terminal() => req.ended_at = Some(now),
        _ => {}
    }
}

fn event(req: &Request, name: &str, at: OffsetDateTime) -> AuditEvent {
    AuditEvent::for_request(req, name, "U0", at, json!({"n": name}))
}

async fn names(store: &dyn Store, since: Option<OffsetDateTime>) -> Vec<String> {
    store
        .audit_since(since)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// Reads the row, applies `event` through the state machine and writes it
/// back, as the service does.
async fn drive(
    store: &dyn Store,
    id: &RequestId,
    event: Event,
    now: OffsetDateTime,
) -> Result<Request, String> {
    let prev = store.get(id).await.unwrap().unwrap();
    let to = transition(prev.state, event).map_err(|e| e.to_string())?;
    let mut next = prev.clone();
    next.state = to;
    shape_for(&mut next, now);
    let audit = vec![event_named(&prev, &format!("{event:?}"), now)];
    store
        .update(&prev, next, audit)
        .await
        .map_err(|e| e.to_string())
}

fn event_named(req: &Request, name: &str, at: OffsetDateTime) -> AuditEvent {
    event(req, name, at)
}

// ---------------------------------------------------------------- cases

async fn create_get_list(store: Arc<dyn Store>) {
    let reqs: Vec<Request> = [State::Pending, State::Active, State::Denied]
        .into_iter()
        .enumerate()
        .map(|(i, s)| request(i + 1, s))
        .collect();
    for r in &reqs {
        store
            .create(r, vec![event(r, "requested", T0)])
            .await
            .unwrap();
    }
    for r in &reqs {
        assert_eq!(store.get(&r.id).await.unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.get(&id(999)).await.unwrap(), None);
    let mut listed = store.list().await.unwrap();
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(listed, reqs);
}

async fn duplicate_create_is_exists_and_writes_nothing(store: Arc<dyn Store>) {
    let r = request(1, State::Pending);
    store
        .create(&r, vec![event(&r, "requested", T0)])
        .await
        .unwrap();
    let mut other = r.clone();
    other.reason = "second".into();
    other.approval_deadline = T0 + secs(5);
    let again = store
        .create(&other, vec![event(&other, "requested-again", T0)])
        .await;
    assert!(matches!(again, Err(StoreError::Exists(_))), "{again:?}");
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(names(store.as_ref(), None).await, vec!["requested"]);
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(r.approval_deadline),
        "the losing create left no due entry"
    );
}

async fn every_transition_through_update(store: Arc<dyn Store>) {
    let mut n = 0;
    for from in State::ALL {
        for ev in Event::ALL {
            n += 1;
            let r = request(n, from);
            store.create(&r, vec![]).await.unwrap();
            let result = drive(store.as_ref(), &r.id, ev, T0 + secs(60)).await;
            let stored = store.get(&r.id).await.unwrap().unwrap();
            match transition(from, ev) {
                Ok(to) => {
                    let written = result.unwrap_or_else(|e| panic!("{from:?} + {ev:?}: {e}"));
                    assert_eq!(written.version, 1, "{from:?} + {ev:?}");
                    assert_eq!(stored, written, "{from:?} + {ev:?}");
                    assert_eq!(stored.state, to);
                }
                Err(_) => {
                    assert!(result.is_err(), "{from:?} + {ev:?} was accepted");
                    assert_eq!(stored, r, "{from:?} + {ev:?} changed the row");
                }
            }
        }
    }
    let legal = State::ALL
        .iter()
        .flat_map(|s| Event::ALL.iter().map(move |e| (*s, *e)))
        .filter(|(s, e)| transition(*s, *e).is_ok())
        .count();
    assert_eq!(
        store.audit_since(None).await.unwrap().len(),
        legal,
        "one audit event per legal transition, none for illegal ones"
    );

    // A whole life, with the due index following each step.
    let r = request(500, State::Pending);
    store.create(&r, vec![]).await.unwrap();
    let steps = [
        (Event::QuorumReached, State::Approved),
        (Event::Granted, State::Active),
        (Event::RevokeFailing, State::RevokeFailed),
        (Event::RevokeFailing, State::RevokeFailed),
        (Event::Revoked, State::Revoked),
    ];
    for (version, (ev, want)) in steps.into_iter().enumerate() {
        let written = drive(store.as_ref(), &r.id, ev, T0).await.unwrap();
        assert_eq!((written.state, written.version), (want, version as u64 + 1));
        let far = T0 + secs(365 * 86400);
        let due = store.due(far).await.unwrap();
        assert_eq!(
            due.contains(&r.id),
            written.next_due().is_some(),
            "due index after {ev:?}"
        );
    }
}

async fn stale_version_conflicts_and_missing_row_is_not_found(store: Arc<dyn Store>) {
    let r = request(1, State::Pending);
    store.create(&r, vec![]).await.unwrap();
    let approved = lifecycle::approve(&r, "U0", T0).unwrap().row;
    let v1 = store
        .update(&r, approved.clone(), vec![event(&r, "approved", T0)])
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    let denied = lifecycle::deny(&r, "U0", T0).unwrap().row;
    let stale = store
        .update(&r, denied, vec![event(&r, "denied", T0)])
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(
        store.get(&r.id).await.unwrap().unwrap().state,
        State::Approved
    );
    assert_eq!(
        names(store.as_ref(), None).await,
        vec!["approved"],
        "a failed compare-and-swap writes no audit event"
    );
    assert_eq!(
        store.next_due().await.unwrap(),
        approved.next_due(),
        "nor moves the due entry"
    );

    let ghost = request(2, State::Pending);
    let missing = store.update(&ghost, ghost.clone(), vec![]).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn cas_race_has_one_winner(store: Arc<dyn Store>) {
    let r = request(1, State::Pending);
    store.create(&r, vec![]).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (store, prev) = (store.clone(), r.clone());
            tokio::spawn(async move {
                let next = lifecycle::approve(&prev, &format!("U{i}"), T0).unwrap().row;
                let audit = vec![event(&prev, &format!("approved-by-{i}"), T0)];
                store.update(&prev, next, audit).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(w) => winners.push((i, w)),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("task {i}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins");
    let (i, won) = &winners[0];
    let stored = store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(&stored, won);
    assert_eq!(stored.version, 1);
    assert_eq!(stored.decided_by, Some(format!("U{i}")));
    assert_eq!(
        names(store.as_ref(), None).await,
        vec![format!("approved-by-{i}")]
    );
}

async fn due_items_in_time_order(store: Arc<dyn Store>) {
    assert_eq!(store.next_due().await.unwrap(), None);
    // Inserted out of order; two share an instant.
    let offsets = [300, 60, 900, 60, 10, 5000];
    for (n, off) in offsets.iter().enumerate() {
        let mut r = request(n + 1, State::Pending);
        r.approval_deadline = T0 + secs(*off);
        store.create(&r, vec![]).await.unwrap();
    }
    let terminal = request(50, State::Denied);
    store.create(&terminal, vec![]).await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + secs(10)));
    assert_eq!(store.due(T0).await.unwrap(), Vec::<RequestId>::new());
    // Due at exactly `now` counts; a millisecond later does not.
    assert_eq!(store.due(T0 + secs(10)).await.unwrap(), vec![id(5)]);
    assert_eq!(
        store
            .due(T0 + secs(10) - time::Duration::milliseconds(1))
            .await
            .unwrap(),
        Vec::<RequestId>::new()
    );
    assert_eq!(
        store.due(T0 + secs(900)).await.unwrap(),
        vec![id(5), id(2), id(4), id(1), id(3)],
        "earliest first, ties by id"
    );

    // Moving a row moves its entry: #5 becomes active until T0+2000s.
    let prev = store.get(&id(5)).await.unwrap().unwrap();
    let made = lifecycle::GrantMade {
        activated_at: T0 + secs(2000) - prev.duration,
        reminder_before: None,
        grant_ms: 0,
    };
    let approved = lifecycle::approve(&prev, "U0", T0).unwrap().row;
    let active = lifecycle::granted(&approved, &made, T0).unwrap().row;
    let active = store.update(&prev, active, vec![]).await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + secs(60)));
    assert_eq!(
        store.due(T0 + secs(2000)).await.unwrap(),
        vec![id(2), id(4), id(1), id(3), id(5)]
    );
    // An early revoke pulls it forward; a revoke ends it.
    let intent = RevokeIntent {
        reason: RevokeReason::Early,
        by: "U1".into(),
        note: None,
        at: T0 + secs(1),
    };
    let early = lifecycle::revoke_requested(&active, intent).unwrap().row;
    let early = store.update(&active, early, vec![]).await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + secs(1)));
    let revoked = lifecycle::revoked(&early, Verified::At(T0 + secs(1)), T0 + secs(1))
        .unwrap()
        .row;
    store.update(&early, revoked, vec![]).await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + secs(60)));
    assert!(!store.due(T0 + secs(9999)).await.unwrap().contains(&id(5)));
}

async fn audit_order_is_write_order(store: Arc<dyn Store>) {
    let r = request(1, State::Pending);
    // The log is keyed by each write's first event time, then write order.
    store
        .create(&r, vec![event(&r, "a", T0 + secs(10)), event(&r, "b", T0)])
        .await
        .unwrap();
    store
        .append_audit(vec![event(&r, "c", T0 + secs(10))])
        .await
        .unwrap();
    store
        .append_audit(vec![event(&r, "d", T0 + secs(5))])
        .await
        .unwrap();
    let approved = lifecycle::approve(&r, "U0", T0).unwrap().row;
    store
        .update(
            &r,
            approved,
            vec![event(&r, "e", T0 + secs(10)), event(&r, "f", T0 + secs(10))],
        )
        .await
        .unwrap();
    store
        .append_audit(vec![event(&r, "g", T0 + secs(20))])
        .await
        .unwrap();
    store.append_audit(vec![]).await.unwrap();
    assert_eq!(
        names(store.as_ref(), None).await,
        vec!["d", "a", "b", "c", "e", "f", "g"]
    );
    assert_eq!(
        names(store.as_ref(), Some(T0 + secs(10))).await,
        vec!["a", "b", "c", "e", "f", "g"]
    );
    assert_eq!(names(store.as_ref(), Some(T0 + secs(11))).await, vec!["g"]);
    assert!(store
        .audit_since(Some(T0 + secs(21)))
        .await
        .unwrap()
        .is_empty());
    let full = store.audit_since(None).await.unwrap();
    assert_eq!(
        full[0],
        event(&r, "d", T0 + secs(5)),
        "events read back whole"
    );
    let entries = store.audit_entries().await.unwrap();
    let positions: Vec<AuditPosition> = entries.iter().map(|e| e.position).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(positions, sorted, "entries in position order, all distinct");
    assert_eq!(
        entries.into_iter().map(|e| e.event).collect::<Vec<_>>(),
        full
    );
}

async fn baselines_record_and_forget(store: Arc<dyn Store>) {
    assert!(store.baselines("c", "arn:a").await.unwrap().is_empty());
    let b = Baselines::from([
        ("p1".to_string(), None),
        ("p2".to_string(), Some(Scope::from_namespaces(["x", "y"]))),
        ("p3".to_string(), Some(Scope::Cluster)),
    ]);
    store.record_baselines("c", "arn:a", &b).await.unwrap();
    store
        .record_baselines("c", "arn:ab", &Baselines::from([("p1".to_string(), None)]))
        .await
        .unwrap();
    store
        .record_baselines("d", "arn:a", &Baselines::from([("p9".to_string(), None)]))
        .await
        .unwrap();
    assert_eq!(store.baselines("c", "arn:a").await.unwrap(), b);
    store
        .forget_baselines("c", "arn:a", &["p1".to_string(), "absent".to_string()])
        .await
        .unwrap();
    // Recording again overwrites the scope.
    store
        .record_baselines(
            "c",
            "arn:a",
            &Baselines::from([("p3".to_string(), Some(Scope::from_namespaces(["z"])))]),
        )
        .await
        .unwrap();
    assert_eq!(
        store.baselines("c", "arn:a").await.unwrap(),
        Baselines::from([
            ("p2".to_string(), Some(Scope::from_namespaces(["x", "y"]))),
            ("p3".to_string(), Some(Scope::from_namespaces(["z"]))),
        ])
    );
    assert_eq!(
        store.baselines("c", "arn:ab").await.unwrap(),
        Baselines::from([("p1".to_string(), None)])
    );
    let all = store.all_baselines().await.unwrap();
    let groups: BTreeSet<(String, String, usize)> =
        all.into_iter().map(|(c, p, b)| (c, p, b.len())).collect();
    assert_eq!(
        groups,
        BTreeSet::from([
            ("c".into(), "arn:a".into(), 2),
            ("c".into(), "arn:ab".into(), 1),
            ("d".into(), "arn:a".into(), 1),
        ])
    );
}

async fn imports_are_verbatim(store: Arc<dyn Store>) {
    let mut r = request(1, State::Active);
    r.version = 7;
    store.import_request(&r).await.unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(store.next_due().await.unwrap(), r.expires_at);
    // Importing a later version replaces the row and its due entry.
    let mut later = r.clone();
    later.version = 9;
    later.state = State::Revoked;
    later.ended_at = Some(T0);
    store.import_request(&later).await.unwrap();
    assert_eq!(store.get(&r.id).await.unwrap(), Some(later.clone()));
    assert_eq!(store.next_due().await.unwrap(), None);
    // Updates continue from the imported version.
    let mut next = later.clone();
    next.reason = "edited".into();
    assert_eq!(
        store.update(&later, next, vec![]).await.unwrap().version,
        10
    );

    let entries = vec![
        AuditEntry {
            position: AuditPosition {
                at_ms: 1_000,
                seq: 42,
            },
            event: event(&r, "old", T0),
        },
        AuditEntry {
            position: AuditPosition {
                at_ms: 1_000,
                seq: 7,
            },
            event: event(&r, "older", T0),
        },
    ];
    store.import_audit(entries.clone()).await.unwrap();
    store.import_audit(entries).await.unwrap();
    store
        .append_audit(vec![event(&r, "new", T0)])
        .await
        .unwrap();
    assert_eq!(
        names(store.as_ref(), None).await,
        vec!["older", "old", "new"],
        "imported positions kept, a re-import adds nothing"
    );
}

// ------------------------------------------------------------- harness

type Case = fn(Arc<dyn Store>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|s| Box::pin($name(s))) as Case)),*]
    };
}

/// Ended requests this case writes before its live ones: a year of history
/// on a busy installation, all for the same person as the live rows.
const HISTORY: usize = 10_000;

/// Live reads follow live rows, whatever the history holds: with
/// `HISTORY` ended requests for the same principal stored, `live`,
/// `live_for` and `due` return exactly the live ones, and a row leaves the
/// live index in the write that ends it.
async fn live_reads_ignore_history(store: Arc<dyn Store>) {
    use futures::StreamExt;
    let alice = "arn:aws:iam::1:role/alice";
    let of_alice = |n: usize, state: State| {
        let mut r = request(n, state);
        r.access.principal = alice.into();
        r
    };
    let ended = [State::Revoked, State::Denied, State::Expired, State::Failed];
    futures::stream::iter(1..=HISTORY)
        .map(|n| {
            let store = store.clone();
            let row = of_alice(n, ended[n % ended.len()]);
            async move { store.import_request(&row).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let pending = of_alice(HISTORY + 1, State::Pending);
    let active = of_alice(HISTORY + 2, State::Active);
    let elsewhere = {
        let mut r = of_alice(HISTORY + 3, State::Active);
        r.access.cluster = "staging".into();
        r
    };
    let bob = request(HISTORY + 4, State::Approved);
    for r in [&pending, &active, &elsewhere, &bob] {
        store.create(r, vec![]).await.unwrap();
    }
    let ids =
        |rows: Vec<Request>| -> BTreeSet<RequestId> { rows.into_iter().map(|r| r.id).collect() };
    assert_eq!(
        ids(store.live_for("prod", alice).await.unwrap()),
        BTreeSet::from([pending.id.clone(), active.id.clone()])
    );
    assert_eq!(
        ids(store.live().await.unwrap()),
        BTreeSet::from([
            pending.id.clone(),
            active.id.clone(),
            elsewhere.id.clone(),
            bob.id.clone()
        ])
    );
    let due: BTreeSet<RequestId> = store
        .due(T0 + secs(100_000))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        due,
        ids(store.live().await.unwrap()),
        "only live rows are due"
    );

    // The live copy follows the row: a new version is what `live_for` reads,
    // and the write that ends the row removes it.
    let mut extended = active.clone();
    extended.expires_at = Some(T0 + secs(7200));
    let extended = store.update(&active, extended, vec![]).await.unwrap();
    let read = store.live_for("prod", alice).await.unwrap();
    let copy = read.iter().find(|r| r.id == active.id).unwrap();
    assert_eq!(copy, &extended);
    let revoked = lifecycle::revoked(&extended, Verified::At(T0 + secs(60)), T0 + secs(60))
        .unwrap()
        .row;
    store.update(&extended, revoked, vec![]).await.unwrap();
    assert_eq!(
        ids(store.live_for("prod", alice).await.unwrap()),
        BTreeSet::from([pending.id.clone()])
    );
    assert_eq!(store.list().await.unwrap().len(), HISTORY + 4);
}

/// A shared store hands a lease to one holder at a time until it lapses; an
/// unshared one has a single process, which always holds it.
async fn leases_have_one_holder(store: Arc<dyn Store>) {
    let ok = |r: Result<bool, StoreError>| r.unwrap();
    assert!(store.ping().await.is_ok());
    let until = T0 + secs(30);
    assert!(ok(store.try_lease("reconcile/a", "r1", until, T0).await));
    assert!(
        ok(store.try_lease("reconcile/b", "r2", until, T0).await),
        "leases are per name"
    );
    let second = ok(store
        .try_lease("reconcile/a", "r2", until, T0 + secs(1))
        .await);
    assert_eq!(second, !store.is_shared(), "a live lease has one holder");
    assert!(
        ok(store
            .try_lease("reconcile/a", "r1", until + secs(30), T0 + secs(2))
            .await),
        "renewal"
    );
    let early = ok(store
        .try_lease("reconcile/a", "r2", until, T0 + secs(40))
        .await);
    assert_eq!(early, !store.is_shared(), "the renewal extended the term");
    assert!(
        ok(store
            .try_lease("reconcile/a", "r2", T0 + secs(120), T0 + secs(61))
            .await),
        "a lapsed lease is taken over"
    );
}

/// The click inbox: a click is recorded once (the same click again is
/// `false`), read back oldest first with every field, and gone once
/// finished; finishing twice is harmless.
async fn clicks_are_recorded_once_and_finished(store: Arc<dyn Store>) {
    use tollgate::domain::inbox::{Click, Interaction};
    use tollgate::store::InboxEntry;
    let click = |ts: &str, at: OffsetDateTime| {
        Interaction::new(
            Click::Approve,
            "R-ABCDE",
            "U0APP",
            Some(ts),
            "sig",
            Some("https://hooks.slack.com/actions/T0/1/x"),
            at,
        )
    };
    let later = click("2.0", T0 + secs(5));
    let first = click("1.0", T0);
    assert!(store.record_interaction(&later).await.unwrap());
    assert!(store.record_interaction(&first).await.unwrap());
    assert!(
        !store.record_interaction(&first).await.unwrap(),
        "the same click delivered again is recorded once"
    );
    assert_eq!(
        store.interactions().await.unwrap(),
        vec![
            InboxEntry::Click(first.clone()),
            InboxEntry::Click(later.clone())
        ],
        "oldest first, every field kept"
    );
    store.finish_interaction(&first.key).await.unwrap();
    store.finish_interaction(&first.key).await.unwrap();
    assert_eq!(
        store.interactions().await.unwrap(),
        vec![InboxEntry::Click(later.clone())]
    );
    assert!(
        store.record_interaction(&first).await.unwrap(),
        "a finished key may be recorded again"
    );
}

fn all_cases() -> Vec<(&'static str, Case)> {
    cases![
        create_get_list,
        duplicate_create_is_exists_and_writes_nothing,
        every_transition_through_update,
        stale_version_conflicts_and_missing_row_is_not_found,
        cas_race_has_one_winner,
        due_items_in_time_order,
        audit_order_is_write_order,
        baselines_record_and_forget,
        imports_are_verbatim,
        leases_have_one_holder,
        live_reads_ignore_history,
        clicks_are_recorded_once_and_finished,
    ]
    .to_vec()
}

async fn run_case(backend: &str, name: &str, case: Case, store: Arc<dyn Store>) {
    let started = std::time::Instant::now();
    // A panic inside the spawned case is reported with its backend.
    let outcome = tokio::spawn(case(store)).await;
    if let Err(e) = outcome {
        panic!("{backend}: case {name} failed: {e}");
    }
    eprintln!("{backend}: {name} ok in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_conforms() {
    for (name, case) in all_cases() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        run_case("sled", name, case, store).await;
    }
}

pub async fn dynamo_client(ms: &MiniStack) -> aws_sdk_dynamodb::Client {
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
    aws_sdk_dynamodb::Client::new(&sdk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_conforms() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let client = dynamo_client(&ms).await;
    for (i, (name, case)) in all_cases().into_iter().enumerate() {
        // A table per case: each starts empty, as a fresh sled dir does.
        let table = format!("tollgate-{i}");
        let created = dynamodb::init(&client, &table).await;
        assert_eq!(
            created.as_ref().ok(),
            Some(&dynamodb::InitOutcome::Created),
            "{created:?}\n{}",
            ms.log()
        );
        let store: Arc<dyn Store> = Arc::new(DynamoStore::new(client.clone(), table));
        run_case("dynamodb", name, case, store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_init_is_idempotent_and_verify_names_what_is_wrong() {
    support::install_crypto_provider();
    let ms = MiniStack::start();
    let client = dynamo_client(&ms).await;
    let missing = dynamodb::verify(&client, "tollgate").await.unwrap_err();
    assert!(
        missing.to_string().contains("does not exist")
            && missing.to_string().contains("store init"),
        "{missing}"
    );
    assert_eq!(
        dynamodb::init(&client, "tollgate").await.unwrap(),
        dynamodb::InitOutcome::Created
    );
    assert_eq!(
        dynamodb::init(&client, "tollgate").await.unwrap(),
        dynamodb::InitOutcome::AlreadyThere
    );
    assert!(dynamodb::verify(&client, "tollgate").await.is_ok());

    // A table an older Tollgate made: rows but no live items and no marker.
    // Start-up refuses it and says what to do; `store init` builds the
    // index once, and then the live rows are read from it.
    let store = DynamoStore::new(client.clone(), "tollgate");
    let live = request(1, State::Active);
    let ended = request(2, State::Revoked);
    store.create(&live, vec![]).await.unwrap();
    store.create(&ended, vec![]).await.unwrap();
    let scan = client.scan().table_name("tollgate").send().await.unwrap();
    for item in scan.items() {
        let pk = item["pk"].as_s().unwrap();
        let sk = item["sk"].as_s().unwrap();
        if pk == "LIVE" || (pk == "META" && sk == "live-index") {
            client
                .delete_item()
                .table_name("tollgate")
                .key("pk", aws_sdk_dynamodb::types::AttributeValue::S(pk.clone()))
                .key("sk", aws_sdk_dynamodb::types::AttributeValue::S(sk.clone()))
                .send()
                .await
                .unwrap();
        }
    }
    assert!(store.live().await.unwrap().is_empty());
    let old = dynamodb::verify(&client, "tollgate").await.unwrap_err();
    assert!(
        old.to_string().contains("no live index") && old.to_string().contains("store init"),
        "{old}"
    );
    assert_eq!(
        dynamodb::init(&client, "tollgate").await.unwrap(),
        dynamodb::InitOutcome::Upgraded { live: 1 }
    );
    assert!(dynamodb::verify(&client, "tollgate").await.is_ok());
    let rows: Vec<RequestId> = store
        .live()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(rows, vec![live.id.clone()]);
    assert_eq!(
        dynamodb::init(&client, "tollgate").await.unwrap(),
        dynamodb::InitOutcome::AlreadyThere
    );

    // A table someone made with other keys is named as such.
    client
        .create_table()
        .table_name("foreign")
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let wrong = dynamodb::verify(&client, "foreign").await.unwrap_err();
    assert!(
        wrong.to_string().contains("[id HASH]") && wrong.to_string().contains("pk HASH"),
        "{wrong}"
    );
    assert!(dynamodb::init(&client, "foreign").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_is_unavailable_not_conflict() {
    support::install_crypto_provider();
    let mut ms = MiniStack::start();
    let client = dynamo_client(&ms).await;
    dynamodb::init(&client, "tollgate").await.unwrap();
    let store = DynamoStore::new(client, "tollgate");
    let r = request(1, State::Pending);
    store.create(&r, vec![]).await.unwrap();
    ms.stop();
    for result in [
        store.get(&r.id).await.map(|_| ()),
        store.update(&r, r.clone(), vec![]).await.map(|_| ()),
        store.due(T0).await.map(|_| ()),
    ] {
        let e = result.unwrap_err();
        assert!(e.is_unavailable(), "{e:?}");
    }
}

// ------------------------------------------- DynamoDB answers MiniStack won't give

/// A DynamoDB endpoint that answers each call with the next scripted
/// (status, body) for its operation, and counts calls.
struct Scripted {
    endpoint: String,
    calls: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn scripted(answers: Vec<(&'static str, u16, &'static str)>) -> Scripted {
    use axum::http::{HeaderMap, StatusCode};
    let script = Arc::new(std::sync::Mutex::new(answers));
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s, c) = (script.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |headers: HeaderMap| {
            let (script, calls) = (s.clone(), c.clone());
            async move {
                let op = headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split('.').nth(1))
                    .unwrap_or("?")
                    .to_string();
                calls.lock().unwrap().push(op.clone());
                let mut script = script.lock().unwrap();
                let answer = script
                    .iter()
                    .position(|(o, _, _)| *o == op)
                    .map(|i| script.remove(i));
                let (status, body) = match answer {
                    Some((_, status, body)) => (status, body),
                    None => (200, "{}"),
                };
                (
                    StatusCode::from_u16(status).unwrap(),
                    [("content-type", "application/x-amz-json-1.0")],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Scripted { endpoint, calls }
}

async fn scripted_store(endpoint: &str) -> DynamoStore {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        // The mapping is under test here, not the SDK's backoff.
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .http_client(http)
        .load()
        .await;
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), "tollgate")
}

const CONTENDED: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#TransactionCanceledException","message":"cancelled [None, TransactionConflict]","CancellationReasons":[{"Code":"None"},{"Code":"TransactionConflict","Message":"in flight"}]}"#;
const CONDITION: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#TransactionCanceledException","message":"cancelled [ConditionalCheckFailed, None]","CancellationReasons":[{"Code":"ConditionalCheckFailed"},{"Code":"None"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_transaction_conflicts_are_retried_then_reported_as_conflict() {
    support::install_crypto_provider();
    let r = request(1, State::Pending);
    let next = lifecycle::approve(&r, "U0", T0).unwrap().row;

    // Two in-flight collisions, then the write goes through.
    let fake = scripted(vec![
        ("TransactWriteItems", 400, CONTENDED),
        ("TransactWriteItems", 400, CONTENDED),
    ])
    .await;
    let store = scripted_store(&fake.endpoint).await;
    let written = store.update(&r, next.clone(), vec![]).await.unwrap();
    assert_eq!(written.version, 1);
    assert_eq!(fake.calls.lock().unwrap().len(), 3);

    // Contended every time: a Conflict (re-read and decide), not an outage.
    let fake = scripted(vec![("TransactWriteItems", 400, CONTENDED); 20]).await;
    let store = scripted_store(&fake.endpoint).await;
    let e = store.update(&r, next.clone(), vec![]).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    let attempts = fake.calls.lock().unwrap().len();
    assert!((2..20).contains(&attempts), "{attempts} attempts");

    // A failed condition is final at once; the row exists, so Conflict.
    let row = r#"{"Item":{"pk":{"S":"REQUEST"},"sk":{"S":"R-00001"},"version":{"N":"3"},"doc":{"S":"{}"}}}"#;
    let fake = scripted(vec![
        ("TransactWriteItems", 400, CONDITION),
        ("GetItem", 200, row),
    ])
    .await;
    let store = scripted_store(&fake.endpoint).await;
    let e = store.update(&r, next, vec![]).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    assert_eq!(
        fake.calls.lock().unwrap().clone(),
        vec!["TransactWriteItems", "GetItem"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_throttling_and_5xx_are_unavailable_other_refusals_are_not() {
    support::install_crypto_provider();
    let cases: [(u16, &str, bool); 5] = [
        (
            400,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"slow down"}"#,
            true,
        ),
        (
            400,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"slow down"}"#,
            true,
        ),
        (
            500,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"oops"}"#,
            true,
        ),
        (
            400,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ResourceNotFoundException","message":"no table"}"#,
            false,
        ),
        (
            400,
            r#"{"__type":"com.amazon.coral.service#AccessDeniedException","message":"denied"}"#,
            false,
        ),
    ];
    for (status, body, unavailable) in cases {
        let fake = scripted(vec![("GetItem", status, body)]).await;
        let store = scripted_store(&fake.endpoint).await;
        let e = store.get(&id(1)).await.unwrap_err();
        assert_eq!(e.is_unavailable(), unavailable, "{body}: {e:?}");
        assert!(!matches!(e, StoreError::Conflict(_)), "{e:?}");
        if body.contains("ResourceNotFound") {
            assert!(e.to_string().contains("store init"), "{e}");
        }
    }
}
