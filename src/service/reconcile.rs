//! The reconciler: compares what carries this installation's marks in
//! each cluster with the grants in force, removes what the store says
//! Tollgate created and no grant needs (orphans left by a crash between a
//! cloud call and the store write), reports marked objects the store did
//! not create (`foreign`) and leaves them alone, and reports grants whose
//! access vanished outside Tollgate (`drift`) instead of recreating it.

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::error::ServiceError;
use super::{failpoint, Change, Service};
use crate::access::{store_knows, Holds, InForce, Look, Owned};
use crate::domain::audit::{AuditEvent, ACTOR_TOLLGATE};
use crate::domain::identity::role_arn_key;
use crate::domain::lifecycle::in_force;
use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::request::{Request, RequestId, State};
use crate::domain::standing::{
    binding_differs, binding_record, describe_beyond, entry_beyond, GrantRecord,
};
use time::OffsetDateTime;

/// What one reconcile pass of a cluster found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub removed: Vec<String>,
    pub drifted: Vec<String>,
    /// Marked objects the store did not create, left alone.
    pub foreign: Vec<String>,
}

/// How often a reconcile pass reads every object's marks rather than only
/// what the store knows of (spec 11).
pub const FULL_SCAN_EVERY: time::Duration = time::Duration::hours(1);

/// How a strategy names a principal in what it owns.
fn principal_key(strategy: Strategy, principal: &str) -> String {
    match strategy {
        // The authenticator ignores an ARN's path and case.
        Strategy::AwsAuth => role_arn_key(principal),
        Strategy::AccessEntry | Strategy::SessionRbac => principal.to_string(),
    }
}

/// Whether an owned object is still needed by one of `grants`.
fn needed(strategy: Strategy, object: &Owned, grants: &[&Request]) -> bool {
    match strategy {
        // Bindings are per grant.
        Strategy::SessionRbac => object
            .grant_id
            .as_deref()
            .is_some_and(|id| grants.iter().any(|g| g.id.as_str() == id)),
        // One entry or item per principal serves all its grants.
        Strategy::AccessEntry | Strategy::AwsAuth => !grants.is_empty(),
    }
}

/// A foreign finding: a marked object the store did not create (`None`),
/// or one it did that holds more than it recorded making (what, in words).
type Finding = (Owned, Option<String>);

/// How a foreign finding is remembered between passes: a change in what
/// an object holds beyond Tollgate's is a new finding.
fn foreign_key((o, beyond): &Finding) -> String {
    format!(
        "{}|{}|{}|{}",
        o.object,
        o.principal,
        o.grant_id.as_deref().unwrap_or_default(),
        beyond.as_deref().unwrap_or_default()
    )
}

impl Service {
    /// Whether the store says this installation created `object`: its grant
    /// id names a row of this cluster that recorded it (or, for a row from
    /// before intents were recorded, that it matches). aws-auth items name
    /// no grant; they are judged against `live`, the cluster's live rows
    /// the caller has already read.
    async fn store_created(
        &self,
        cluster: &ClusterPolicy,
        object: &Owned,
        live: &[Request],
    ) -> Result<bool, ServiceError> {
        let Some(intent) = &object.intent else {
            return Ok(false);
        };
        if object.grant_id.is_none() && cluster.strategy == Strategy::AwsAuth {
            // An item names no grant: it is Tollgate's when a live request
            // of this cluster records it (a crash between the ConfigMap
            // write and the row's leaves that row live). A `tollgate:` item
            // no live row accounts for — hand-made, or another
            // installation's — is reported and left alone.
            return Ok(live
                .iter()
                .filter(|r| r.access.cluster == cluster.name)
                .any(|r| crate::domain::grant::row_records(r, intent)));
        }
        store_knows(
            &self.store,
            &cluster.name,
            object.grant_id.as_deref(),
            intent,
        )
        .await
        .map_err(ServiceError::from)
    }

    /// Whether this pass over `cluster` reads every object's marks: the
    /// first after start, then once `FULL_SCAN_EVERY` has passed.
    fn full_scan_due(&self, cluster: &str, now: OffsetDateTime) -> bool {
        let Ok(done) = self.full_scans.lock() else {
            return true;
        };
        done.get(cluster)
            .is_none_or(|last| now - *last >= FULL_SCAN_EVERY || now < *last)
    }

    fn full_scan_done(&self, cluster: &str, now: OffsetDateTime) {
        if let Ok(mut done) = self.full_scans.lock() {
            done.insert(cluster.to_string(), now);
        }
    }

    /// Splits a listing into what the store created and what it did not.
    async fn sort_owned(
        &self,
        cluster: &ClusterPolicy,
        owned: Vec<Owned>,
        live: &[Request],
    ) -> Result<(Vec<Owned>, Vec<Owned>), ServiceError> {
        let mut known = Vec::new();
        let mut foreign = Vec::new();
        for o in owned {
            if self.store_created(cluster, &o, live).await? {
                known.push(o);
            } else {
                foreign.push(o);
            }
        }
        Ok((known, foreign))
    }

    /// What an object the store created holds beyond what it recorded
    /// making in it (spec 9.2), in words: judged against the grants `live`
    /// (read after the listing, so a grant being made is among them) and
    /// the row its mark names.
    async fn beyond(
        &self,
        cluster: &ClusterPolicy,
        o: &Owned,
        live: &[Request],
    ) -> Result<Option<String>, ServiceError> {
        let Some(holds) = &o.holds else {
            return Ok(None);
        };
        let mut records: Vec<GrantRecord> = live
            .iter()
            .filter(|r| r.access.cluster == cluster.name)
            .map(GrantRecord::of)
            .collect();
        let named = match holds {
            Holds::Entry(_) => o.grant_id.as_deref().and_then(RequestId::parse),
            Holds::Binding(b) => crate::domain::grant::binding_grant(&b.name),
        };
        if let Some(id) = named {
            if !records.iter().any(|r| r.id == id.as_str()) {
                if let Some(row) = self.store.get(&id).await? {
                    records.push(GrantRecord::of(&row));
                }
            }
        }
        Ok(match holds {
            Holds::Entry(e) => {
                entry_beyond(&records, &cluster.name, e).map(|b| describe_beyond(&b))
            }
            Holds::Binding(b) => {
                binding_record(&records, &cluster.name, b).and_then(|r| binding_differs(r, b))
            }
        })
    }

    /// Audits each foreign finding the first time it is made, and sets the
    /// gauge to what the latest passes found across clusters. A full scan
    /// replaces the cluster's findings (`replace`); a single finding made
    /// between scans is added to them.
    async fn report_foreign(&self, cluster: &ClusterPolicy, foreign: &[Finding], replace: bool) {
        let now = self.clock.now();
        let keys: BTreeSet<String> = foreign.iter().map(foreign_key).collect();
        let (new, total) = {
            let Ok(mut seen) = self.foreign.lock() else {
                return;
            };
            let before = if replace {
                seen.insert(cluster.name.clone(), keys).unwrap_or_default()
            } else {
                let set = seen.entry(cluster.name.clone()).or_default();
                let before = set.clone();
                set.extend(keys);
                before
            };
            let new: Vec<&Finding> = foreign
                .iter()
                .filter(|f| !before.contains(&foreign_key(f)))
                .collect();
            let total: usize = seen.values().map(BTreeSet::len).sum();
            (new, total)
        };
        self.metrics.foreign_objects.set(total as i64);
        if new.is_empty() {
            return;
        }
        let events: Vec<AuditEvent> = new
            .iter()
            .map(|(o, beyond)| {
                let detail = match beyond {
                    None => {
                        tracing::warn!(cluster = %cluster.name, principal = %o.principal, object = %o.object, grant = ?o.grant_id, "object carries Tollgate's marks but its store did not create it; left alone");
                        "marked as Tollgate's, not created by this installation's store; left alone".to_string()
                    }
                    Some(what) => {
                        tracing::warn!(cluster = %cluster.name, principal = %o.principal, object = %o.object, grant = ?o.grant_id, beyond = %what, "object Tollgate created holds what its store did not record Tollgate making; that is left alone and counts as standing access");
                        format!("created by this installation's store, but holds what it did not make ({what}); left alone")
                    }
                };
                AuditEvent {
                    ts: now,
                    event: "foreign".into(),
                    request_id: o.grant_id.clone().unwrap_or_default(),
                    actor: ACTOR_TOLLGATE.into(),
                    cluster: cluster.name.clone(),
                    principal: o.principal.clone(),
                    details: json!({
                        "object": o.object,
                        "grant": o.grant_id,
                        "instance": o.instance,
                        "beyond": beyond,
                        "detail": detail,
                    }),
                    mac: None,
                }
            })
            .collect();
        if let Err(e) = self.store.append_audit(events).await {
            tracing::error!(error = %e, "foreign audit event not written");
        }
    }

    pub async fn reconcile_cluster(
        self: &Arc<Self>,
        cluster: &ClusterPolicy,
    ) -> Result<ReconcileReport, ServiceError> {
        let strategy = cluster.strategy;
        let now = self.clock.now();
        let requests: Vec<Request> = self
            .store
            .live()
            .await?
            .into_iter()
            // Rows of the other mode (`serve --dry-run` or live) are not
            // this server's to judge by (spec 9.8).
            .filter(|r| r.access.cluster == cluster.name && self.acts_on(r))
            .collect();
        // An ordinary pass reads only what the principals with live requests
        // hold: a crash's orphan belongs to a row that is still live (the
        // row is written after the cloud call). Every object's marks, for
        // `foreign` ones and anything a failed cleanup left, are read on
        // the first pass and then at most every `FULL_SCAN_EVERY`.
        //
        // An access entry serves every grant of its principal, so while one
        // is in force the entry cannot be an orphan and reading its marks
        // would be wasted: the drift check below reads the principal's
        // associations anyway. Session bindings are per grant, and the
        // other strategies list in one call whatever they are asked.
        let serves_all = strategy == Strategy::AccessEntry;
        let has_grant_in_force: BTreeSet<&str> = requests
            .iter()
            .filter(|r| {
                r.access.strategy_or(strategy) == strategy
                    && crate::domain::lifecycle::in_force(r, now)
            })
            .map(|r| r.access.principal.as_str())
            .collect();
        let known: BTreeSet<String> = requests
            .iter()
            .filter(|r| !(serves_all && has_grant_in_force.contains(r.access.principal.as_str())))
            .map(|r| r.access.principal.clone())
            .collect();
        let full = self.full_scan_due(&cluster.name, now);
        let look = if full {
            Look::Everything
        } else {
            Look::Principals(&known)
        };
        let listed = self.access.owned(cluster, look).await?;
        let (owned, foreign) = self.sort_owned(cluster, listed, &requests).await?;
        let mut findings: Vec<Finding> = foreign.into_iter().map(|o| (o, None)).collect();
        if full {
            // What Tollgate's own objects hold is judged against the grants
            // read after the listing: one it shows being made is in them.
            let after: Vec<Request> = self.store.live().await?;
            for o in &owned {
                if let Some(what) = self.beyond(cluster, o, &after).await? {
                    findings.push((o.clone(), Some(what)));
                }
            }
            self.report_foreign(cluster, &findings, true).await;
            self.full_scan_done(&cluster.name, now);
        }
        // Grants made with another strategy (the cluster's changed since)
        // are not judged by this one's objects; their revoke uses the
        // strategy they were made with.
        let ours = |r: &Request| {
            r.access.cluster == cluster.name && r.access.strategy_or(strategy) == strategy
        };
        let mut owned_by: BTreeMap<String, Vec<&Owned>> = BTreeMap::new();
        for o in &owned {
            owned_by
                .entry(principal_key(strategy, &o.principal))
                .or_default()
                .push(o);
        }
        let mut principals: BTreeSet<String> = owned_by.keys().cloned().collect();
        let mut request_principal: BTreeMap<String, String> = BTreeMap::new();
        for r in requests.iter().filter(|r| ours(r) && in_force(r, now)) {
            let key = principal_key(strategy, &r.access.principal);
            request_principal.insert(key.clone(), r.access.principal.clone());
            principals.insert(key);
        }
        // A principal with a grant being made is left alone this pass: its
        // objects may exist before the row says Active.
        let busy: BTreeSet<String> = requests
            .iter()
            .filter(|r| r.state == State::Approved)
            .map(|r| principal_key(strategy, &r.access.principal))
            .collect();

        let mut report = ReconcileReport {
            foreign: findings
                .iter()
                .map(|(o, beyond)| match beyond {
                    None => format!("{} ({})", o.object, o.principal),
                    Some(what) => format!("{} ({}): {what}", o.object, o.principal),
                })
                .collect(),
            ..Default::default()
        };
        let mut cut_off = None;
        for key in principals.difference(&busy) {
            let principal = request_principal
                .get(key)
                .cloned()
                .unwrap_or_else(|| key.clone());
            let Some(guard) = self.principal(&cluster.name, &principal).await else {
                continue;
            };
            // Re-read under the lock: a grant or revoke may have finished.
            let now = self.clock.now();
            let fresh: Vec<Request> = match self.store.live().await {
                Ok(all) => all
                    .into_iter()
                    .filter(|r| {
                        r.access.cluster == cluster.name
                            && principal_key(strategy, &r.access.principal) == *key
                            && self.acts_on(r)
                    })
                    .collect(),
                Err(e) => return Err(e.into()),
            };
            if fresh.iter().any(|r| r.state == State::Approved) {
                continue;
            }
            failpoint("reconcile-principal-read");
            let grants: Vec<&Request> = fresh
                .iter()
                .filter(|r| ours(r) && in_force(r, now))
                .collect();
            // The backstop never follows an expiry written past the cap.
            let in_force: Vec<InForce<'_>> = grants
                .iter()
                .map(|g| InForce {
                    expires_at: crate::domain::row_check::capped_expiry(g, cluster, now),
                    ..InForce::of(g)
                })
                .collect();
            // Drift is judged on what each grant needs, read now under the
            // lock, whoever made the object that holds it.
            let missing = self.access.missing(cluster, &principal, &in_force).await?;
            // Everything below acts on `fresh`: drift alerts, the backstop's
            // schedules, the cleanup. A pass paused past most of its lease
            // since that read may be looking at a principal another
            // replica has revoked or granted since (spec 9.6); the next
            // pass reads again under a lease of its own.
            if !guard.fresh_enough(self.clock.now()) {
                tracing::warn!(cluster = %cluster.name, %principal, "lease nearly lapsed before the repair; leaving it to the next pass");
                continue;
            }
            let drifted: Vec<&Request> = grants
                .iter()
                .copied()
                .filter(|g| missing.iter().any(|m| m == g.id.as_str()))
                .collect();
            for g in &drifted {
                self.report_drift(g).await;
                report.drifted.push(g.id.to_string());
            }
            // A schedule a grant or extension could not move is put right
            // here, long before it would fire (spec 10.1).
            match self.access.backstop(cluster, &principal, &in_force).await {
                Ok(done) => {
                    let grant = in_force.first().map(|g| g.grant_id).unwrap_or_default();
                    self.report_baselines_gone(
                        &cluster.name,
                        &principal,
                        grant,
                        &done.baselines_gone,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(cluster = %cluster.name, %principal, error = %e, "backstop schedules not brought up to date")
                }
            }
            let mut mine: Vec<&Owned> = owned_by.get(key).cloned().unwrap_or_default();
            // The listing was taken before this principal's lock; a grant or
            // revoke may have finished since. Before acting on a
            // difference, look again.
            let relisted;
            let just_this = BTreeSet::from([principal.clone()]);
            if mine.iter().any(|o| !needed(strategy, o, &grants)) {
                let all = self
                    .access
                    .owned(cluster, Look::Principals(&just_this))
                    .await?;
                let mut again = Vec::new();
                for o in all {
                    if principal_key(strategy, &o.principal) == *key
                        && self.store_created(cluster, &o, &fresh).await?
                    {
                        again.push(o);
                    }
                }
                relisted = again;
                mine = relisted.iter().collect();
            }
            let orphans: Vec<&Owned> = mine
                .iter()
                .copied()
                .filter(|o| !needed(strategy, o, &grants))
                .collect();
            if orphans.is_empty() {
                continue;
            }
            // Converge to the grants still present: orphans go, and access
            // that vanished is not recreated behind anyone's back.
            let keep: Vec<InForce<'_>> = in_force
                .iter()
                .filter(|g| !missing.iter().any(|m| m == g.grant_id))
                .cloned()
                .collect();
            let creator = keep.first().map(|g| g.grant_id).unwrap_or("reconciler");
            // The same lease and the same time limit as every other
            // converge of this principal (spec 9.6): a pass that lingered
            // past most of its lease leaves the principal to the next one,
            // and a converge cut off mid-call fences it like any other.
            if !guard.fresh_enough(self.clock.now()) {
                tracing::warn!(cluster = %cluster.name, %principal, "lease nearly lapsed before the cleanup; leaving it to the next pass");
                continue;
            }
            let limit = self.tunables.converge_limit;
            let converged = match self
                .converge_limited(
                    &cluster.name,
                    &principal,
                    self.access.converge(cluster, &principal, &keep, creator),
                )
                .await
            {
                Some(result) => result?,
                None => {
                    // The other principals of the cluster still get their
                    // pass; the pass as a whole reports the cut-off. The
                    // principal is fenced already.
                    tracing::error!(cluster = %cluster.name, %principal, "reconcile cleanup cut off by the converge limit");
                    cut_off = Some(ServiceError::CutOff(limit));
                    continue;
                }
            };
            self.report_baselines_gone(
                &cluster.name,
                &principal,
                creator,
                &converged.baselines_gone,
            )
            .await;
            // The strategy leaves an object that holds something Tollgate
            // did not set (Kubernetes groups, another association); only
            // what is really gone is reported as removed.
            let after = self
                .access
                .owned(cluster, Look::Principals(&just_this))
                .await?;
            for o in orphans {
                if let Some(left) = after
                    .iter()
                    .find(|a| a.object == o.object && a.principal == o.principal)
                {
                    // What is left is not Tollgate's to remove, and it is
                    // access: reported as foreign now, not at the next
                    // full scan.
                    let fresh = self.store.live().await?;
                    let what = self.beyond(cluster, left, &fresh).await?;
                    tracing::warn!(cluster = %cluster.name, principal = %o.principal, object = %o.object, beyond = ?what, "no grant needs it, but it holds what Tollgate did not make; left in place");
                    if what.is_some() {
                        let finding = (left.clone(), what);
                        report.foreign.push(format!(
                            "{} ({}): {}",
                            left.object,
                            left.principal,
                            finding.1.as_deref().unwrap_or_default()
                        ));
                        self.report_foreign(cluster, &[finding], false).await;
                    }
                    continue;
                }
                tracing::warn!(cluster = %cluster.name, principal = %o.principal, object = %o.object, grant = ?o.grant_id, "removed access no grant needs");
                let event = AuditEvent {
                    ts: now,
                    event: "reconciled".into(),
                    request_id: o.grant_id.clone().unwrap_or_default(),
                    actor: ACTOR_TOLLGATE.into(),
                    cluster: cluster.name.clone(),
                    principal: o.principal.clone(),
                    details: json!({"removed": o.object}),
                    mac: None,
                };
                if let Err(e) = self.store.append_audit(vec![event]).await {
                    tracing::error!(error = %e, "reconcile audit event not written");
                }
                self.metrics.reconcile_removed.inc();
                report
                    .removed
                    .push(format!("{} ({})", o.object, o.principal));
            }
        }
        if let Some(error) = cut_off {
            return Err(error);
        }
        self.metrics
            .reconcile_passes
            .get_or_create(&crate::metrics::ClusterLabel {
                cluster: cluster.name.clone(),
            })
            .inc();
        Ok(report)
    }

    /// Reported once per grant: the audit log says when it was noticed.
    async fn report_drift(&self, grant: &Request) {
        let now = self.clock.now();
        let result = self
            .modify(&grant.id, |current| {
                if current.drift_reported || current.state != State::Active {
                    return Change::Keep(false);
                }
                let mut next = current.clone();
                next.drift_reported = true;
                let audit = AuditEvent::for_request(
                    &next,
                    "drift",
                    ACTOR_TOLLGATE,
                    now,
                    json!({"detail": "access vanished outside Tollgate; not recreated"}),
                );
                Change::Write(Box::new(next), vec![audit], true)
            })
            .await;
        if let Ok(true) = result {
            self.metrics.drift.inc();
            tracing::warn!(request_id = %grant.id, cluster = %grant.access.cluster, "access of an active grant vanished outside Tollgate");
        }
    }
}
