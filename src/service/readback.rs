//! Verified revocation (spec 10.2): after a revoke converges, the cluster
//! is read back through the strategy the grant was made with, over the
//! same grants in force the converge used. A read-back that still shows
//! the revoked access fails the attempt exactly like a failed converge.

use time::OffsetDateTime;

use super::lifecycle::in_force;
use super::Service;
use crate::access::InForce;
use crate::domain::readback::ReadBack;
use crate::domain::request::Request;

/// What the revoke step records about its read-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verified {
    /// Seen gone at this instant.
    At(OffsetDateTime),
    /// Not read back (`serve --dry-run`): recorded as `verified: false`.
    NotChecked,
}

impl Verified {
    /// The audit details a `revoked` event gains.
    pub(crate) fn annotate(self, details: &mut serde_json::Value) {
        match self {
            Verified::At(t) => {
                details["verified"] = serde_json::json!(true);
                details["verified_at"] = serde_json::json!(super::lifecycle::rfc3339(Some(t)));
            }
            Verified::NotChecked => details["verified"] = serde_json::json!(false),
        }
    }

    pub(crate) fn at(self) -> Option<OffsetDateTime> {
        match self {
            Verified::At(t) => Some(t),
            Verified::NotChecked => None,
        }
    }
}

impl Service {
    /// Reads `req`'s cluster back after its revoke converged; an error
    /// (the access is still there, or the cluster could not be read) is a
    /// failed attempt of the revoke. The converge (started at `began`) and
    /// the read-back share one converge limit, so the step keeps the room
    /// it needs to record its outcome inside the drive timeout.
    pub(super) async fn read_back(
        &self,
        req: &Request,
        now: OffsetDateTime,
        began: std::time::Instant,
    ) -> Result<Verified, String> {
        let limit = self.converge_limit();
        let left = limit.saturating_sub(began.elapsed());
        tokio::time::timeout(left, self.read_back_once(req, now))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "converge and read-back cut off after {:.1} s without an answer from the cluster",
                    limit.as_secs_f64()
                ))
            })
    }

    async fn read_back_once(&self, req: &Request, now: OffsetDateTime) -> Result<Verified, String> {
        let configured = self.config.cluster(&req.access.cluster).ok_or_else(|| {
            format!(
                "cluster {} is no longer in the configuration",
                req.access.cluster
            )
        })?;
        // The strategy the grant was made with, as the converge used.
        let strategy = req.access.strategy_or(configured.strategy);
        let mut cluster = configured.clone();
        cluster.strategy = strategy;
        let others: Vec<Request> = self
            .store
            .live_for(&req.access.cluster, &req.access.principal)
            .await
            .map_err(|e| format!("cannot read the grants in force: {e}"))?
            .into_iter()
            .filter(|r| r.id != req.id && in_force(r, now))
            .filter(|r| r.access.strategy_or(configured.strategy) == strategy)
            .collect();
        let grants: Vec<InForce<'_>> = others
            .iter()
            .map(|g| InForce {
                grant_id: g.id.as_str(),
                spec: &g.access,
                expires_at: g.expires_at,
            })
            .collect();
        let seen = self
            .access
            .verify_removed(
                &cluster,
                &req.access.principal,
                req.id.as_str(),
                &req.access,
                &grants,
            )
            .await
            .map_err(|e| format!("read-back after the revoke failed: {e}"))?;
        match seen {
            ReadBack::Removed => Ok(Verified::At(self.clock.now())),
            ReadBack::NotChecked => Ok(Verified::NotChecked),
            ReadBack::StillThere(findings) => Err(format!(
                "read-back after the revoke still shows the access: {}",
                findings.join("; ")
            )),
        }
    }
}
