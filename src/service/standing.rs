//! Standing access (spec section 12) inside the server: the
//! `tollgate_standing_access` gauge, refreshed at start and then at most
//! hourly, and the optional weekly digest to the security channel. Both come
//! from one read of each cluster per refresh. The same reading and
//! classification serve `tollgate discover` (`crate::discover`).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use time::{Duration, OffsetDateTime};

use super::error::ServiceError;
use super::Service;
use crate::access::standing::{StandingReader, Unreadable};
use crate::config::Digest;
use crate::domain::policy::ClusterPolicy;
use crate::domain::request::RequestId;
use crate::domain::standing::{
    boundary_crossed, classify, digest_text, summary, ClusterReading, ClusterStanding, GrantRecord,
};
use crate::metrics::StandingLabel;
use crate::slack::Message;

/// The gauge is refreshed at most this often: a refresh reads every object
/// of every cluster, which is what the reconciler's ordinary passes avoid.
pub const REFRESH_EVERY: Duration = Duration::hours(1);
/// Store lease that keeps replicas sharing a store from each posting the
/// same week's digest.
const DIGEST_LEASE: &str = "standing-digest";

#[derive(Default)]
pub(crate) struct StandingState {
    reader: OnceLock<Arc<dyn StandingReader>>,
    inner: tokio::sync::Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last_refresh: Option<OffsetDateTime>,
    /// When the previous tick ran: a digest boundary between it and now
    /// has been crossed by this process.
    last_tick: Option<OffsetDateTime>,
}

/// Reads each cluster once.
pub async fn read_clusters(
    reader: &dyn StandingReader,
    clusters: &[ClusterPolicy],
) -> Vec<(String, Result<ClusterReading, Unreadable>)> {
    let reads = clusters.iter().map(|c| async move {
        let result = reader.read(c).await;
        (c.name.clone(), result)
    });
    futures::future::join_all(reads).await
}

/// The grant ids Tollgate's marks name across `readings`: what the store is
/// asked about.
pub fn marked_ids(readings: &[(String, Result<ClusterReading, Unreadable>)]) -> Vec<String> {
    let ids: BTreeSet<String> = readings
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|r| r.marks().map(str::to_string))
        .collect();
    ids.into_iter().collect()
}

pub fn classify_all(
    readings: Vec<(String, Result<ClusterReading, Unreadable>)>,
    records: &[GrantRecord],
) -> Vec<ClusterStanding> {
    readings
        .into_iter()
        .map(|(cluster, reading)| ClusterStanding {
            // The domain keeps the reason as the operator reads it.
            result: reading
                .map(|r| classify(&cluster, &r, records))
                .map_err(|Unreadable(why)| why),
            cluster,
        })
        .collect()
}

impl Service {
    /// Discovery in the server needs the cluster reader; set once at start.
    pub fn set_standing_reader(&self, reader: Arc<dyn StandingReader>) {
        let _ = self.standing.reader.set(reader);
    }

    /// What the store knows of the requests `ids` name, and of every live
    /// request (aws-auth items carry a username, not a grant id). Reads
    /// one row per id plus the live index, never the history.
    pub async fn standing_records(&self, ids: &[String]) -> Result<Vec<GrantRecord>, ServiceError> {
        let mut out: Vec<GrantRecord> = Vec::new();
        let mut add = |r: &crate::domain::request::Request| {
            if !out.iter().any(|o| o.id == r.id.as_str()) {
                out.push(GrantRecord::of(r));
            }
        };
        for r in self.store.live().await? {
            add(&r);
        }
        for id in ids {
            // A mark that is not even a request id names nothing Tollgate made.
            let Some(id) = RequestId::parse(id) else {
                continue;
            };
            if let Some(r) = self.store.get(&id).await? {
                add(&r);
            }
        }
        Ok(out)
    }

    /// Reads every cluster once and decides what is standing access.
    pub async fn standing_access(
        &self,
        reader: &dyn StandingReader,
    ) -> Result<Vec<ClusterStanding>, ServiceError> {
        let readings = read_clusters(reader, &self.config.clusters).await;
        let records = self.standing_records(&marked_ids(&readings)).await?;
        Ok(classify_all(readings, &records))
    }

    /// The reconcile loop's hook: a tick in its own task, so reading every
    /// cluster (slow when one is unreachable) never holds up reconciling.
    /// Overlapping ticks are harmless: the first marks the refresh as done
    /// before it reads.
    pub fn spawn_standing_tick(self: &Arc<Self>) {
        let service = self.clone();
        tokio::spawn(async move { service.standing_tick().await });
    }

    /// Called on every pass of the reconcile loop: refreshes the gauge when
    /// it has never been set or is an hour old, and posts the weekly digest
    /// when a Monday 09:00 UTC has passed since the previous pass — from the
    /// same read. A process that was not running at the boundary skips that
    /// week rather than posting on every restart.
    pub async fn standing_tick(self: &Arc<Self>) {
        let Some(reader) = self.standing.reader.get().cloned() else {
            return;
        };
        let now = self.clock.now();
        let mut inner = self.standing.inner.lock().await;
        let crossed = match (self.config.slack.standing_access_digest, inner.last_tick) {
            (Digest::Weekly, Some(previous)) => boundary_crossed(previous, now),
            _ => None,
        };
        inner.last_tick = Some(now);
        let stale = inner.last_refresh.is_none_or(|t| now - t >= REFRESH_EVERY);
        if !stale && crossed.is_none() {
            return;
        }
        inner.last_refresh = Some(now);
        drop(inner);
        let clusters = match self.standing_access(reader.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "standing access not refreshed: store unavailable");
                return;
            }
        };
        for c in &clusters {
            match &c.result {
                Ok(grants) => {
                    for (level, n) in summary(grants) {
                        self.metrics
                            .standing_access
                            .get_or_create(&StandingLabel {
                                cluster: c.cluster.clone(),
                                level: level.label().to_string(),
                            })
                            .set(n as i64);
                    }
                }
                // The gauge keeps its last reading rather than dropping to
                // zero, which would look like success.
                Err(e) => {
                    tracing::warn!(cluster = %c.cluster, error = %e, "standing access: cluster cannot be read")
                }
            }
        }
        if let Some(boundary) = crossed {
            self.post_digest(&clusters, boundary).await;
        }
    }

    async fn post_digest(self: &Arc<Self>, clusters: &[ClusterStanding], boundary: OffsetDateTime) {
        let Some(channel) = self.config.slack.security_channel.clone() else {
            return;
        };
        let now = self.clock.now();
        // Held until just before the next boundary: the first replica past
        // this one posts, the others find it taken.
        match self
            .store
            .try_lease(
                DIGEST_LEASE,
                &self.replica,
                boundary + Duration::weeks(1) - Duration::seconds(1),
                now,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "standing access digest skipped: lease unavailable");
                return;
            }
        }
        let msg = Message::plain(digest_text(clusters, boundary));
        // Slack's retries must not hold up the reconcile loop.
        let service = self.clone();
        tokio::spawn(async move {
            if let Err(e) = service
                .send("standing access digest", || {
                    service.slack.post(&channel, &msg)
                })
                .await
            {
                tracing::error!(error = %e, "standing access digest not delivered");
            }
        });
    }
}

#[cfg(test)]
mod tests;
