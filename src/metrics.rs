//! Prometheus metrics (spec 8.6), in the text format of prometheus-client.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

/// A failed step (`grant`, `revoke`, `reconcile`, `slack`, `store`) and the
/// kind of failure (`ServiceError::metric_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub step: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StandingLabel {
    pub cluster: String,
    pub level: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<StateLabel, Counter>,
    pub grants_active: Gauge,
    pub overdue_grants: Gauge,
    pub grant_seconds: Histogram,
    pub revoke_lateness_seconds: Histogram,
    pub revoke_failures: Counter,
    /// Every failed step, by step and kind (spec 8.6).
    pub failures: Family<FailureLabel, Counter>,
    pub reconcile_removed: Counter,
    pub drift: Counter,
    pub foreign_objects: Gauge,
    /// Spec 9.8: live rows the last reconcile read found failing their
    /// integrity MAC (each is then ended as `tampered`).
    pub tampered_rows: Gauge,
    pub slack_api_errors: Family<MethodLabel, Counter>,
    pub http_rejected: Family<ReasonLabel, Counter>,
    pub scheduler_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub standing_access: Family<StandingLabel, Gauge>,
    /// Reconcile passes finished, per cluster: a stalled reconciler shows
    /// as a flat line.
    pub reconcile_passes: Family<ClusterLabel, Counter>,
    /// Slack clicks acknowledged by a process that did not live to act on
    /// them, taken up from the store afterwards.
    pub clicks_replayed: Counter,
    /// Connections open on the Slack listener (spec 9.9).
    pub http_inflight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<StateLabel, Counter>::default();
        registry.register(
            "requests",
            "Transitions into each request state",
            requests.clone(),
        );
        let grants_active = Gauge::default();
        registry.register(
            "grants_active",
            "Grants whose access is in place",
            grants_active.clone(),
        );
        let overdue_grants = Gauge::default();
        registry.register(
            "overdue_grants",
            "Grants past expiry whose access is still present",
            overdue_grants.clone(),
        );
        let grant_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "grant_seconds",
            "Seconds from approval to access in place",
            grant_seconds.clone(),
        );
        let revoke_lateness_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "revoke_lateness_seconds",
            "Seconds from a grant's expiry to its access being gone",
            revoke_lateness_seconds.clone(),
        );
        let revoke_failures = Counter::default();
        registry.register(
            "revoke_failures",
            "Failed revoke attempts",
            revoke_failures.clone(),
        );
        let failures = Family::<FailureLabel, Counter>::default();
        registry.register(
            "failures",
            "Failed grant, revoke, reconcile, Slack and store steps, by step and kind of error",
            failures.clone(),
        );
        let reconcile_removed = Counter::default();
        registry.register(
            "reconcile_removed",
            "Objects the reconciler removed",
            reconcile_removed.clone(),
        );
        let drift = Counter::default();
        registry.register(
            "reconcile_drift",
            "Active grants whose access vanished outside Tollgate",
            drift.clone(),
        );
        let foreign_objects = Gauge::default();
        registry.register(
            "foreign_objects",
            "Objects marked as Tollgate's whose grant its store did not create; left alone",
            foreign_objects.clone(),
        );
        let tampered_rows = Gauge::default();
        registry.register(
            "tampered_rows",
            "Live request rows the last reconcile read found failing their integrity MAC (spec 9.8)",
            tampered_rows.clone(),
        );
        let slack_api_errors = Family::<MethodLabel, Counter>::default();
        registry.register(
            "slack_api_errors",
            "Slack Web API calls that failed",
            slack_api_errors.clone(),
        );
        let http_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "http_rejected",
            "HTTP requests refused before parsing",
            http_rejected.clone(),
        );
        let scheduler_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "scheduler_lag_seconds",
            "How late the scheduler's last pass acted on its earliest due item",
            scheduler_lag_seconds.clone(),
        );
        let standing_access = Family::<StandingLabel, Gauge>::default();
        registry.register(
            "standing_access",
            "Ways into each cluster that do not go through Tollgate, by level (tollgate discover)",
            standing_access.clone(),
        );
        let reconcile_passes = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "reconcile_passes",
            "Reconcile passes finished, per cluster",
            reconcile_passes.clone(),
        );
        let clicks_replayed = Counter::default();
        registry.register(
            "clicks_replayed",
            "Slack clicks recorded and answered before a restart, processed after it",
            clicks_replayed.clone(),
        );
        let http_inflight = Gauge::default();
        registry.register(
            "http_inflight",
            "Connections open on the Slack listener, at most [server] max_connections",
            http_inflight.clone(),
        );
        Metrics {
            registry,
            requests,
            grants_active,
            overdue_grants,
            grant_seconds,
            revoke_lateness_seconds,
            revoke_failures,
            failures,
            reconcile_removed,
            drift,
            foreign_objects,
            tampered_rows,
            slack_api_errors,
            http_rejected,
            scheduler_lag_seconds,
            standing_access,
            reconcile_passes,
            clicks_replayed,
            http_inflight,
        }
    }

    pub fn entered(&self, state: &str) {
        self.requests
            .get_or_create(&StateLabel {
                state: state.to_string(),
            })
            .inc();
    }

    pub fn slack_error(&self, method: &str) {
        self.slack_api_errors
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .inc();
    }

    pub fn failed(&self, step: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabel {
                step: step.to_string(),
                error: error.to_string(),
            })
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.http_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
