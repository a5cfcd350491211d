//! Verified revocation (spec 10.2): after a revoke converges, the cluster
//! is read back through the strategy the grant was made with, over the
//! same grants in force the converge used. A read-back that still shows
//! the revoked access fails the attempt exactly like a failed converge.

use time::OffsetDateTime;

use super::error::ServiceError;
use super::Service;
use crate::access::InForce;
use crate::domain::lifecycle::in_force;
use crate::domain::readback::{ReadBack, Verified};
use crate::domain::request::Request;

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
    ) -> Result<Verified, ServiceError> {
        let limit = self.tunables.converge_limit;
        let left = limit.saturating_sub(began.elapsed());
        tokio::time::timeout(left, self.read_back_once(req, now))
            .await
            .unwrap_or(Err(ServiceError::CutOff(limit)))
    }

    async fn read_back_once(
        &self,
        req: &Request,
        now: OffsetDateTime,
    ) -> Result<Verified, ServiceError> {
        let configured = self
            .config
            .cluster(&req.access.cluster)
            .ok_or_else(|| ServiceError::ClusterGone(req.access.cluster.clone()))?;
        // The strategy the grant was made with, as the converge used.
        let strategy = req.access.strategy_or(configured.strategy);
        let mut cluster = configured.clone();
        cluster.strategy = strategy;
        let others: Vec<Request> = self
            .store
            .live_for(&req.access.cluster, &req.access.principal)
            .await
            .map_err(ServiceError::InForceUnreadable)?
            .into_iter()
            .filter(|r| r.id != req.id && in_force(r, now))
            .filter(|r| r.access.strategy_or(configured.strategy) == strategy)
            .collect();
        let grants: Vec<InForce<'_>> = others.iter().map(InForce::of).collect();
        let seen = self
            .access
            .verify_removed(
                &cluster,
                &req.access.principal,
                req.id.as_str(),
                &req.access,
                &grants,
            )
            .await?;
        match seen {
            ReadBack::Removed => Ok(Verified::At(self.clock.now())),
            ReadBack::NotChecked => Ok(Verified::NotChecked),
            ReadBack::StillThere(findings) => Err(ServiceError::StillThere(findings.join("; "))),
        }
    }
}
