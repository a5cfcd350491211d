//! The reconciler: compares what carries Tollgate's marks in each cluster
//! with the grants in force, removes what no grant needs (orphans left by a
//! crash between a cloud call and the store write, or by hand), and reports
//! grants whose access vanished outside Tollgate instead of recreating it.

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Change, Service};
use crate::access::aws_auth::strip_role_path;
use crate::access::{InForce, Owned};
use crate::domain::audit::{AuditEvent, ACTOR_TOLLGATE};
use crate::domain::policy::{ClusterPolicy, Strategy};
use crate::domain::request::{Request, RequestId, State};

/// What one reconcile pass of a cluster found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub removed: Vec<String>,
    pub drifted: Vec<String>,
}

/// How a strategy names a principal in what it owns.
fn principal_key(strategy: Strategy, principal: &str) -> String {
    match strategy {
        // The authenticator ignores an ARN's path and case.
        Strategy::AwsAuth => strip_role_path(principal).to_ascii_lowercase(),
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

/// Whether a grant's access can be seen among the owned objects.
fn present(strategy: Strategy, grant: &Request, owned: &[&Owned]) -> bool {
    match strategy {
        Strategy::SessionRbac => owned
            .iter()
            .any(|o| o.grant_id.as_deref() == Some(grant.id.as_str())),
        Strategy::AccessEntry | Strategy::AwsAuth => !owned.is_empty(),
    }
}

impl Service {
    pub async fn reconcile_cluster(
        self: &Arc<Self>,
        cluster: &ClusterPolicy,
    ) -> Result<ReconcileReport, String> {
        let strategy = cluster.strategy;
        let owned = self
            .access
            .owned(cluster)
            .await
            .map_err(|e| e.to_string())?;
        let now = self.clock.now();
        let requests: Vec<Request> = self
            .store
            .live()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.access.cluster == cluster.name)
            .collect();
        let mut owned_by: BTreeMap<String, Vec<&Owned>> = BTreeMap::new();
        for o in &owned {
            owned_by
                .entry(principal_key(strategy, &o.principal))
                .or_default()
                .push(o);
        }
        let mut principals: BTreeSet<String> = owned_by.keys().cloned().collect();
        let mut request_principal: BTreeMap<String, String> = BTreeMap::new();
        for r in requests
            .iter()
            .filter(|r| super::lifecycle::in_force(r, now))
        {
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

        let mut report = ReconcileReport::default();
        for key in principals.difference(&busy) {
            let principal = request_principal
                .get(key)
                .cloned()
                .unwrap_or_else(|| key.clone());
            let Some(_guard) = self.principal(&cluster.name, &principal).await else {
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
                    })
                    .collect(),
                Err(e) => return Err(e.to_string()),
            };
            if fresh.iter().any(|r| r.state == State::Approved) {
                continue;
            }
            let grants: Vec<&Request> = fresh
                .iter()
                .filter(|r| super::lifecycle::in_force(r, now))
                .collect();
            let mut mine: Vec<&Owned> = owned_by.get(key).cloned().unwrap_or_default();
            // The listing was taken before this principal's lock; a grant or
            // revoke may have finished since. Before acting on (or reporting)
            // a difference, look again.
            let relisted;
            let differs = mine.iter().any(|o| !needed(strategy, o, &grants))
                || grants.iter().any(|g| !present(strategy, g, &mine));
            if differs {
                relisted = self
                    .access
                    .owned(cluster)
                    .await
                    .map_err(|e| e.to_string())?;
                mine = relisted
                    .iter()
                    .filter(|o| principal_key(strategy, &o.principal) == *key)
                    .collect();
            }
            let orphans: Vec<&Owned> = mine
                .iter()
                .copied()
                .filter(|o| !needed(strategy, o, &grants))
                .collect();
            let drifted: Vec<&Request> = grants
                .iter()
                .copied()
                .filter(|g| !present(strategy, g, &mine))
                .collect();
            for g in &drifted {
                self.report_drift(g).await;
                report.drifted.push(g.id.to_string());
            }
            if orphans.is_empty() {
                continue;
            }
            // Converge to the grants still present: orphans go, and access
            // that vanished is not recreated behind anyone's back.
            let keep: Vec<InForce<'_>> = grants
                .iter()
                .filter(|g| !drifted.iter().any(|d| d.id == g.id))
                .map(|g| InForce {
                    grant_id: g.id.as_str(),
                    spec: &g.access,
                    expires_at: g.expires_at,
                })
                .collect();
            let creator = keep.first().map(|g| g.grant_id).unwrap_or("reconciler");
            self.access
                .converge(cluster, &principal, &keep, creator)
                .await
                .map_err(|e| e.to_string())?;
            for o in orphans {
                let unknown = match &o.grant_id {
                    Some(g) => match RequestId::parse(g) {
                        Some(id) => self
                            .store
                            .get(&id)
                            .await
                            .map_err(|e| e.to_string())?
                            .is_none(),
                        None => true,
                    },
                    None => false,
                };
                if unknown {
                    self.access
                        .remove_orphan(cluster, o)
                        .await
                        .map_err(|e| e.to_string())?;
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
