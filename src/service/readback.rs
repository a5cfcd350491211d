//! Verified revocation (spec 10.2): after a revoke converges, the cluster
//! is read back through the strategy the grant was made with, over the
//! same grants in force the converge used. A read-back that still shows
//! the revoked access fails the attempt exactly like a failed converge.

use std::time::{Duration, Instant};
use time::OffsetDateTime;

use super::error::ServiceError;
use super::Service;
use crate::access::InForce;
use crate::domain::readback::{ReadBack, Verified};
use crate::domain::request::Request;

/// Where a revoke's time went between its claim and its record, logged
/// with its `revoked` line (`scripts/bench` figure 7 reads it back), so a
/// slow revoke shows which step grew without a profiler.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RevokeTimes {
    /// Reading the principal's other grants in force.
    pub in_force: Duration,
    /// The converge that removes the access.
    pub converge: Duration,
    /// Removing by name what the row recorded creating.
    pub remove: Duration,
    /// Reading the cluster back.
    pub read_back: Duration,
}

impl Service {
    /// Converges `req`'s access away and reads the cluster back (spec
    /// 10.2); an error (the converge failed, the access is still there, or
    /// the cluster could not be read) is a failed attempt of the revoke.
    /// Both run over one read of the grants in force, so the read-back
    /// judges exactly what the converge aimed at, and under one converge
    /// limit, so the step keeps the room it needs to record its outcome
    /// inside the drive timeout.
    pub(super) async fn remove_and_read_back(
        &self,
        req: &Request,
        now: OffsetDateTime,
        times: &mut RevokeTimes,
    ) -> Result<Verified, ServiceError> {
        let limit = self.tunables.converge_limit;
        let step = async {
            let mut from = Instant::now();
            let mut lap = || {
                let took = from.elapsed();
                from = Instant::now();
                took
            };
            let others = self
                .others_in_force(req, now)
                .await
                .map_err(ServiceError::InForceUnreadable)?;
            times.in_force = lap();
            self.converge_with(req, &others, None).await?;
            times.converge = lap();
            self.remove_recorded(req).await?;
            times.remove = lap();
            let verified = self.read_back(req, &others).await;
            times.read_back = lap();
            verified
        };
        self.converge_limited(&req.access.cluster, &req.access.principal, step)
            .await
            .unwrap_or(Err(ServiceError::CutOff(limit)))
    }

    /// What the revoked grant's row recorded creating, removed by name
    /// through the strategy it was made with (spec 9.2: Tollgate's by its
    /// store, whatever marks or subjects it carries now).
    async fn remove_recorded(&self, req: &Request) -> Result<(), ServiceError> {
        let configured = self
            .config
            .cluster(&req.access.cluster)
            .ok_or_else(|| ServiceError::ClusterGone(req.access.cluster.clone()))?;
        let mut cluster = configured.clone();
        cluster.strategy = req.access.strategy_or(configured.strategy);
        self.access
            .remove_recorded(&cluster, &req.access.principal, req.id.as_str())
            .await
            .map_err(ServiceError::from)
    }

    async fn read_back(&self, req: &Request, others: &[Request]) -> Result<Verified, ServiceError> {
        let configured = self
            .config
            .cluster(&req.access.cluster)
            .ok_or_else(|| ServiceError::ClusterGone(req.access.cluster.clone()))?;
        // The strategy the grant was made with, as the converge used.
        let strategy = req.access.strategy_or(configured.strategy);
        let mut cluster = configured.clone();
        cluster.strategy = strategy;
        let grants: Vec<InForce<'_>> = others
            .iter()
            .filter(|r| r.access.strategy_or(configured.strategy) == strategy)
            .map(InForce::of)
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
            .await?;
        match seen {
            ReadBack::Removed => Ok(Verified::At(self.clock.now())),
            ReadBack::NotChecked => Ok(Verified::NotChecked),
            ReadBack::StillThere(findings) => Err(ServiceError::StillThere(findings.join("; "))),
        }
    }
}
