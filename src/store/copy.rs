//! `tollgate store copy`: everything one store holds, into another. Rows keep
//! their versions and audit events their positions, so the target serves the
//! same requests and exports the same log. Running it again copies only what
//! changed in between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::{AuditPosition, Store, StoreError};
use crate::domain::grant::Baselines;
use crate::domain::request::Request;

/// Counts per kind: in the source, written now, already in the target.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Counts {
    pub source: usize,
    pub copied: usize,
    pub present: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub requests: Counts,
    pub audit_events: Counts,
    pub baselines: Counts,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, c) in [
            ("requests", self.requests),
            ("audit events", self.audit_events),
            ("baselines", self.baselines),
        ] {
            writeln!(
                f,
                "{name}: {} in source, {} copied, {} already in target",
                c.source, c.copied, c.present
            )?;
        }
        write!(f, "verified: the target holds everything the source does")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target already moved on from what the source holds; copying
    /// would roll it back.
    #[error("target holds request {id} at version {target_version}, not older than the source's {source_version} and different; refusing to overwrite it")]
    TargetNewer {
        id: String,
        target_version: u64,
        source_version: u64,
    },
    #[error("verification failed: {0}")]
    Mismatch(String),
}

type BaselineRows = BTreeMap<(String, String, String), Option<crate::domain::grant::Scope>>;

async fn baseline_rows(store: &dyn Store) -> Result<BaselineRows, StoreError> {
    let mut rows = BTreeMap::new();
    for (cluster, principal, baselines) in store.all_baselines().await? {
        for (policy, scope) in baselines {
            rows.insert((cluster.clone(), principal.clone(), policy), scope);
        }
    }
    Ok(rows)
}

pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<CopyReport, CopyError> {
    let mut report = CopyReport::default();

    let source_requests = from.list().await?;
    let target_requests: HashMap<_, Request> = to
        .list()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    report.requests.source = source_requests.len();
    for req in &source_requests {
        match target_requests.get(&req.id) {
            Some(t) if t == req => report.requests.present += 1,
            Some(t) if t.version >= req.version => {
                return Err(CopyError::TargetNewer {
                    id: req.id.to_string(),
                    target_version: t.version,
                    source_version: req.version,
                })
            }
            _ => {
                to.import_request(req).await?;
                report.requests.copied += 1;
            }
        }
    }

    let source_audit = from.audit_entries().await?;
    let target_positions: HashSet<AuditPosition> = to
        .audit_entries()
        .await?
        .into_iter()
        .map(|e| e.position)
        .collect();
    report.audit_events.source = source_audit.len();
    let missing: Vec<_> = source_audit
        .iter()
        .filter(|e| !target_positions.contains(&e.position))
        .cloned()
        .collect();
    report.audit_events.present = source_audit.len() - missing.len();
    report.audit_events.copied = missing.len();
    to.import_audit(missing).await?;

    let source_baselines = baseline_rows(from).await?;
    let target_baselines = baseline_rows(to).await?;
    report.baselines.source = source_baselines.len();
    let mut changed: BTreeMap<(String, String), Baselines> = BTreeMap::new();
    for ((cluster, principal, policy), scope) in &source_baselines {
        let key = (cluster.clone(), principal.clone(), policy.clone());
        if target_baselines.get(&key) == Some(scope) {
            report.baselines.present += 1;
        } else {
            changed
                .entry((cluster.clone(), principal.clone()))
                .or_default()
                .insert(policy.clone(), scope.clone());
            report.baselines.copied += 1;
        }
    }
    for ((cluster, principal), baselines) in &changed {
        to.record_baselines(cluster, principal, baselines).await?;
    }
    to.flush().await?;

    verify(from, to, &source_requests, &source_baselines).await?;
    Ok(report)
}

/// Reads the target back: every source row, event (at its position) and
/// baseline must be there and equal.
async fn verify(
    from: &dyn Store,
    to: &dyn Store,
    source_requests: &[Request],
    source_baselines: &BaselineRows,
) -> Result<(), CopyError> {
    let target: HashMap<_, Request> = to
        .list()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let missing_rows = source_requests
        .iter()
        .filter(|r| target.get(&r.id) != Some(r))
        .count();
    if missing_rows > 0 {
        return Err(CopyError::Mismatch(format!(
            "{missing_rows} of {} requests differ in the target",
            source_requests.len()
        )));
    }
    let target_audit: HashMap<_, _> = to
        .audit_entries()
        .await?
        .into_iter()
        .map(|e| (e.position, e.event))
        .collect();
    let source_audit = from.audit_entries().await?;
    let missing_events = source_audit
        .iter()
        .filter(|e| target_audit.get(&e.position) != Some(&e.event))
        .count();
    if missing_events > 0 {
        return Err(CopyError::Mismatch(format!(
            "{missing_events} of {} audit events differ in the target",
            source_audit.len()
        )));
    }
    let target_baselines = baseline_rows(to).await?;
    let missing_baselines = source_baselines
        .iter()
        .filter(|(k, v)| target_baselines.get(*k) != Some(*v))
        .count();
    if missing_baselines > 0 {
        return Err(CopyError::Mismatch(format!(
            "{missing_baselines} of {} baselines differ in the target",
            source_baselines.len()
        )));
    }
    Ok(())
}
