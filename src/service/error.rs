//! What can go wrong in a workflow, as types: a step that failed
//! (`ServiceError`), a grant refused before anything was made
//! (`GrantRefusal`), and a person's request refused (`Refusal`, whose text
//! is written for Slack in `slack::blocks::refusal_text`). Each has a
//! `metric_label()`, the `error` label of `tollgate_failures_total`.

use std::time::Duration;

use crate::access::AccessError;
use crate::slack::SlackError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Slack(#[from] SlackError),
    #[error("cluster {0} is no longer in the configuration")]
    ClusterGone(String),
    #[error("cannot read the grants in force: {0}")]
    InForceUnreadable(StoreError),
    /// A converge that outlived `Tunables::converge_limit`.
    #[error("cut off after {:.1} s without an answer from the cluster", .0.as_secs_f64())]
    CutOff(Duration),
    /// The read-back after a revoke still shows the access (spec 10.2).
    #[error("read-back after the revoke still shows the access: {0}")]
    StillThere(String),
    #[error(transparent)]
    GrantRefused(#[from] GrantRefusal),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl ServiceError {
    /// A short, stable kind for metrics; never a message (which may name a
    /// principal or carry an SDK's text).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ServiceError::Store(e) | ServiceError::InForceUnreadable(e) => e.metric_label(),
            ServiceError::Access(AccessError::Connect { .. }) => "cluster_unreachable",
            ServiceError::Access(AccessError::Aws { .. }) => "aws",
            ServiceError::Access(AccessError::Store(e)) => e.metric_label(),
            ServiceError::Access(AccessError::OtherInstallation { .. }) => "other_installation",
            ServiceError::Access(AccessError::InvalidNamespace { .. }) => "invalid_row",
            ServiceError::Slack(e) => e.metric_label(),
            ServiceError::ClusterGone(_) => "cluster_unconfigured",
            ServiceError::CutOff(_) => "timeout",
            ServiceError::StillThere(_) => "not_removed",
            ServiceError::GrantRefused(r) => r.metric_label(),
            ServiceError::Refused(r) => r.metric_label(),
        }
    }

    /// `details.reason` of the `grant_failed` event this failure writes,
    /// where the spec names one.
    pub fn audit_reason(&self) -> Option<&'static str> {
        match self {
            ServiceError::Access(AccessError::OtherInstallation { .. }) => {
                Some("other_installation")
            }
            _ => None,
        }
    }
}

/// Why a grant was refused at grant time, before any cloud call; recorded
/// on the row (`failure`), audited `grant_failed` and told to the
/// requester.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefusal {
    /// An approver approved a precise change; the role was edited since.
    #[error("{0}")]
    RoleChanged(String),
    /// Spec 9.7: the row names a namespace the configuration refuses now.
    #[error("{0}; nothing was granted")]
    NamespaceRefused(String),
    #[error("the cluster {0} is no longer configured; nothing was granted")]
    ClusterGone(String),
    #[error("the requester's Slack account no longer exists; nothing was granted")]
    AccountGone,
    #[error("Tollgate could not confirm the requester's identity with Slack ({0}); nothing was granted. Request again.")]
    Unconfirmed(SlackError),
    #[error("the requester's Slack account is now {0}; nothing was granted")]
    Offboarded(&'static str),
    #[error("the requester no longer maps to a principal ({0}); nothing was granted")]
    NoPrincipal(String),
    /// Spec 9.8: the stored row is not one Tollgate would have written
    /// under the configuration in force (forged or edited in the store).
    #[error("the stored request is not one Tollgate would grant ({0}); nothing was granted")]
    InvalidRow(String),
    /// A re-drive after a crash found the grant's whole time (fixed at its
    /// first attempt) gone by.
    #[error("the grant's time ran out before it could be recorded; nothing is left to grant")]
    EndedBeforeGranted,
    #[error("the requester's principal changed since the request (it was {was}, it is now {now}: their email or the identity mapping changed); nothing was granted. Request again so approvers see the new one.")]
    PrincipalChanged { was: String, now: String },
}

impl GrantRefusal {
    pub fn metric_label(&self) -> &'static str {
        match self {
            GrantRefusal::RoleChanged(_) => "role_changed",
            GrantRefusal::NamespaceRefused(_) => "namespace_refused",
            GrantRefusal::InvalidRow(_) => "invalid_row",
            GrantRefusal::EndedBeforeGranted => "timeout",
            GrantRefusal::ClusterGone(_) => "cluster_unconfigured",
            GrantRefusal::AccountGone | GrantRefusal::Offboarded(_) => "offboarded",
            GrantRefusal::Unconfirmed(_) => "identity_unconfirmed",
            GrantRefusal::NoPrincipal(_) | GrantRefusal::PrincipalChanged { .. } => {
                "identity_changed"
            }
        }
    }
}

/// A person's command or click refused: nothing was recorded. The words
/// are Slack's to choose (`slack::blocks::refusal_text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A policy or identity rule of the domain said no, in its own words.
    Policy(String),
    UnknownCluster {
        asked: String,
        known: Vec<String>,
    },
    NoBreakGlass {
        cluster: String,
    },
    RoleNotConfigured {
        role: String,
        cluster: String,
    },
    MayNotRequest {
        role: String,
        cluster: String,
        who: Vec<String>,
    },
    MayNotBreakGlass {
        cluster: String,
        who: Vec<String>,
    },
    ProfileUnavailable,
    DeactivatedOrBot,
    Guest,
    /// The store could not be read or written; `what` was not done.
    StoreUnavailable {
        what: &'static str,
    },
    TooManyPending {
        pending: Vec<String>,
        max: usize,
    },
    /// Slack could not say whether the requester may still get access.
    RequesterUnconfirmed,
    RequesterOffboarded {
        id: String,
        what: &'static str,
    },
    NotAnId(String),
    NoSuchRequest(String),
    AlreadyEnded {
        id: String,
        state: String,
    },
    Vanished(String),
}

impl Refusal {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::StoreUnavailable { .. } | Refusal::Vanished(_) => "store_unavailable",
            Refusal::ProfileUnavailable | Refusal::RequesterUnconfirmed => "slack_unreachable",
            _ => "refused",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::slack::blocks::refusal_text(self))
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_kinds_not_messages() {
        let e = ServiceError::Access(AccessError::Aws {
            cluster: "prod".into(),
            operation: "eks DeleteAccessEntry",
            message: "arn:aws:iam::111122223333:role/alice".into(),
        });
        assert_eq!(e.metric_label(), "aws");
        assert_eq!(
            ServiceError::CutOff(Duration::from_millis(1500)).to_string(),
            "cut off after 1.5 s without an answer from the cluster"
        );
        let e = ServiceError::InForceUnreadable(StoreError::Unavailable("x".into()));
        assert_eq!(e.metric_label(), "store_unavailable");
        assert_eq!(
            e.to_string(),
            "cannot read the grants in force: store backend unavailable: x"
        );
    }
}
