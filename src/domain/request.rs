//! Requests, their ids and the one function that says which state changes are
//! legal (spec section 2).

use super::policy::Strategy;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use time::OffsetDateTime;

/// Crockford's base32 alphabet: no I, L, O or U, so an id read aloud or typed
/// from a screenshot is unambiguous.
const ID_ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ID_LEN: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn generate<R: Rng>(rng: &mut R) -> Self {
        let body: String = (0..ID_LEN)
            .map(|_| ID_ALPHABET[rng.gen_range(0..ID_ALPHABET.len())] as char)
            .collect();
        RequestId(format!("R-{body}"))
    }

    /// An id read off the first bytes of a digest: the same digest gives
    /// the same id in every build (no random generator in between, whose
    /// output may change with its version).
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        let bits = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]);
        let body: String = (0..ID_LEN)
            .map(|i| ID_ALPHABET[((bits >> (59 - 5 * i)) & 31) as usize] as char)
            .collect();
        RequestId(format!("R-{body}"))
    }

    /// Accepts what a person types: any case, with or without the `R-` prefix.
    pub fn parse(text: &str) -> Option<Self> {
        let upper = text.trim().to_ascii_uppercase();
        let body = upper.strip_prefix("R-").unwrap_or(&upper);
        if body.len() == ID_LEN && body.bytes().all(|b| ID_ALPHABET.contains(&b)) {
            Some(RequestId(format!("R-{body}")))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    Pending,
    Approved,
    Active,
    Revoked,
    Denied,
    Cancelled,
    Expired,
    Failed,
    RevokeFailed,
    /// An extension whose approval has moved its grant's expiry.
    Applied,
}

impl State {
    /// Every state, for exhaustive checks of the state machine.
    pub const ALL: [State; 10] = [
        State::Pending,
        State::Approved,
        State::Active,
        State::Revoked,
        State::Denied,
        State::Cancelled,
        State::Expired,
        State::Failed,
        State::RevokeFailed,
        State::Applied,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Revoked
                | State::Denied
                | State::Cancelled
                | State::Expired
                | State::Failed
                | State::Applied
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Active => "active",
            State::Revoked => "revoked",
            State::Denied => "denied",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
            State::Failed => "failed",
            State::RevokeFailed => "revoke_failed",
            State::Applied => "applied",
        }
    }
}

/// What happened to a request; `transition` decides whether it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    QuorumReached,
    Deny,
    Cancel,
    ApprovalTimeout,
    Granted,
    GrantFailed,
    Revoked,
    RevokeFailing,
    /// An approved extension moved its grant's expiry.
    ExtensionApplied,
}

impl Event {
    /// Every event, for exhaustive checks of the state machine.
    pub const ALL: [Event; 9] = [
        Event::QuorumReached,
        Event::Deny,
        Event::Cancel,
        Event::ApprovalTimeout,
        Event::Granted,
        Event::GrantFailed,
        Event::Revoked,
        Event::RevokeFailing,
        Event::ExtensionApplied,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {} request cannot take the event {event:?}", from.label())]
pub struct IllegalTransition {
    pub from: State,
    pub event: Event,
}

/// The state machine of spec section 2, in one place.
pub fn transition(from: State, event: Event) -> Result<State, IllegalTransition> {
    use Event as E;
    use State as S;
    let to = match (from, event) {
        (S::Pending, E::QuorumReached) => S::Approved,
        (S::Pending, E::Deny) => S::Denied,
        (S::Pending, E::Cancel) => S::Cancelled,
        (S::Pending, E::ApprovalTimeout) => S::Expired,
        (S::Approved, E::Granted) => S::Active,
        (S::Approved, E::GrantFailed) => S::Failed,
        (S::Approved, E::ExtensionApplied) => S::Applied,
        // An approved request revoked before its grant was made ends here:
        // the grant engine converges it away, or it was never made.
        (S::Approved, E::Revoked) => S::Revoked,
        (S::Active, E::Revoked) => S::Revoked,
        (S::Active, E::RevokeFailing) => S::RevokeFailed,
        (S::RevokeFailed, E::Revoked) => S::Revoked,
        (S::RevokeFailed, E::RevokeFailing) => S::RevokeFailed,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    Expiry,
    Early,
    Admin,
    /// The requester's Slack account was deactivated (or made a guest).
    Offboarded,
    /// The row was edited past what the configuration lets a grant be
    /// (spec 9.8): its expiry moved beyond `max_total_duration`.
    InvalidRow,
}

impl RevokeReason {
    pub fn label(self) -> &'static str {
        match self {
            RevokeReason::Expiry => "expiry",
            RevokeReason::Early => "early",
            RevokeReason::Admin => "admin",
            RevokeReason::Offboarded => "offboarded",
            RevokeReason::InvalidRow => "invalid_row",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeIntent {
    pub reason: RevokeReason,
    pub by: String,
    /// Free text the revoker gave (`--reason`).
    #[serde(default)]
    pub note: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub user: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardRef {
    pub channel: String,
    pub ts: String,
}

/// Who asked and how to reach and address them; captured at request time so
/// later messages need no Slack lookups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub user_id: String,
    pub email: String,
    pub tz: Option<String>,
    pub tz_offset_secs: i32,
}

/// The access a request asks for, resolved from config at request time so a
/// later config edit cannot change what an approver already agreed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessSpec {
    pub cluster: String,
    pub role: String,
    pub principal: String,
    /// Full EKS access policy ARN (access-entry strategy).
    pub policy_arn: Option<String>,
    /// Empty means cluster-wide.
    pub namespaces: Vec<String>,
    /// session-rbac: the ClusterRole to bind.
    #[serde(default)]
    pub cluster_role: Option<String>,
    /// aws-auth: the Kubernetes groups of the mapping.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The Kubernetes user name the grant is for (`tollgate:<email>`).
    #[serde(default)]
    pub k8s_user: Option<String>,
    /// The cluster's strategy when the request was made. Revoke uses it
    /// whatever the configuration says later; rows written before it was
    /// stored have none and are read by `strategy_or`.
    #[serde(default)]
    pub strategy: Option<Strategy>,
}

impl AccessSpec {
    /// The strategy this grant was (or will be) made with. A row without a
    /// stored strategy is told apart by the fields only one strategy fills;
    /// `current` (the cluster's configured one) decides the rest.
    pub fn strategy_or(&self, current: Strategy) -> Strategy {
        if let Some(s) = self.strategy {
            return s;
        }
        if self.policy_arn.is_some() {
            Strategy::AccessEntry
        } else if self.cluster_role.is_some() {
            Strategy::SessionRbac
        } else if !self.groups.is_empty() {
            Strategy::AwsAuth
        } else {
            current
        }
    }
}

/// Something a grant is about to create, recorded on its row before the
/// create call: what lets the reconciler tell Tollgate's objects from
/// objects that merely carry its marks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Intent {
    AccessEntry {
        principal: String,
    },
    Association {
        principal: String,
        policy: String,
    },
    Binding {
        #[serde(default)]
        namespace: Option<String>,
        name: String,
    },
    AwsAuthItem {
        arn: String,
        username: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: RequestId,
    pub state: State,
    /// Bumped on every store write; the compare-and-swap guard.
    pub version: u64,
    pub requester: Requester,
    pub access: AccessSpec,
    pub reason: String,
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub approval_deadline: OffsetDateTime,
    pub required_approvals: u32,
    pub approvals: Vec<Vote>,
    pub decided_by: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub approved_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub revoke: Option<RevokeIntent>,
    /// Failed tries of the current step (grant cleanup or revoke); reset
    /// when the step succeeds.
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub retry_at: Option<OffsetDateTime>,
    pub failure: Option<String>,
    pub card: Option<CardRef>,
    pub response_url: Option<String>,
    /// The reconciler found this grant's access gone and said so once.
    #[serde(default)]
    pub drift_reported: bool,
    /// An extension names the grant whose expiry it moves; it never grants
    /// anything itself.
    #[serde(default)]
    pub extends: Option<RequestId>,
    /// Extensions already applied to this grant, so re-driving one after a
    /// crash never moves the expiry twice.
    #[serde(default)]
    pub extended_by: Vec<RequestId>,
    /// When the requester is reminded that access ends soon; cleared once
    /// sent, set again when an extension moves the expiry.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub remind_at: Option<OffsetDateTime>,
    /// Copies of the card sent to approvers as DMs (`dm_approvers`); every
    /// copy is updated with the card.
    #[serde(default)]
    pub card_copies: Vec<CardRef>,
    /// With several replicas on one store: the replica driving this row's
    /// grant or revoke, until when. Nobody else drives it meanwhile; a
    /// replica that dies holding it is replaced once it lapses.
    #[serde(default)]
    pub claim: Option<Claim>,
    /// What this grant's converges may create, written before the first
    /// create call. Empty on rows from before intents were recorded.
    #[serde(default)]
    pub intents: Vec<Intent>,
    /// When a read-back of the cluster after the revoke saw the access
    /// gone (spec 10.2); absent when it was not read back (dry run, or a
    /// row revoked before this was recorded).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub verified_at: Option<OffsetDateTime>,
    /// When the grant was first attempted, recorded before its first
    /// converge (spec 9.8): the grant's clock starts then, and a re-drive
    /// after a crash reuses it, so the expiry (and the backstop) never
    /// moves on.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub first_attempt_at: Option<OffsetDateTime>,
    /// Made by `serve --dry-run` (spec 9.8). A live server never acts on
    /// such a row, nor a dry-run server on a live one; rows from before
    /// this was recorded read as live.
    #[serde(default)]
    pub dry_run: bool,
    /// With `[store] integrity_key_env`: the HMAC of this row's content
    /// (`domain::integrity`), set by the store wrapper on every write.
    /// Absent on rows written without a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What a new request asks for, before any decision.
#[derive(Clone, Debug)]
pub struct Asked {
    pub id: RequestId,
    pub requester: Requester,
    pub access: AccessSpec,
    pub reason: String,
    pub duration: Duration,
    pub approval_timeout: Duration,
    pub required_approvals: u32,
    pub response_url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub owner: String,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

/// When to remind the requester of an expiry `length` after access (re)starts:
/// a grant no longer than `before` gets no reminder (spec 8.7).
pub fn reminder_time(
    expires_at: OffsetDateTime,
    length: Duration,
    before: Duration,
) -> Option<OffsetDateTime> {
    (length > before).then(|| expires_at - before)
}

impl Request {
    /// The instant the scheduler must next act on this request, derived from
    /// its state so the store's due index can never disagree with the row.
    pub fn next_due(&self) -> Option<OffsetDateTime> {
        let reminder = self.reminder_due();
        let due = match (self.step_due(), reminder) {
            (Some(step), Some(remind)) => Some(step.min(remind)),
            (step, remind) => step.or(remind),
        };
        // A claimed row is next looked at when the claim lapses: if its
        // holder finished, the row has moved on; if it died, another takes over.
        match (due, &self.claim) {
            (Some(due), Some(claim)) => Some(due.max(claim.until)),
            (due, _) => due,
        }
    }

    /// Whether `owner` may drive this row at `now`: nobody else holds a
    /// live claim on it.
    pub fn claimable_by(&self, owner: &str, now: OffsetDateTime) -> bool {
        self.claim
            .as_ref()
            .is_none_or(|c| c.owner == owner || c.until <= now)
    }

    /// When the reminder DM is due: before expiry, for an Active grant that
    /// nobody is revoking.
    pub fn reminder_due(&self) -> Option<OffsetDateTime> {
        match (self.state, self.remind_at, self.expires_at) {
            (State::Active, Some(at), Some(exp)) if self.revoke.is_none() && at < exp => Some(at),
            _ => None,
        }
    }

    /// When the next state-changing step (grant, revoke, expiry) is due;
    /// the reminder aside.
    pub fn step_due(&self) -> Option<OffsetDateTime> {
        match self.state {
            State::Pending => Some(self.approval_deadline),
            State::Approved => self.retry_at.or(self.approved_at).or(Some(self.created_at)),
            State::Active | State::RevokeFailed => {
                if let Some(retry) = self.retry_at {
                    return Some(retry);
                }
                match (&self.revoke, self.expires_at) {
                    (Some(intent), Some(exp)) => Some(intent.at.min(exp)),
                    (Some(intent), None) => Some(intent.at),
                    (None, exp) => exp,
                }
            }
            _ => None,
        }
    }

    /// A new request waiting for approval: what was asked, and nothing of a
    /// lifecycle yet. The one place every field gets its starting value.
    pub fn pending(asked: Asked, now: OffsetDateTime) -> Request {
        Request {
            id: asked.id,
            state: State::Pending,
            version: 0,
            requester: asked.requester,
            access: asked.access,
            reason: asked.reason,
            duration: asked.duration,
            created_at: now,
            approval_deadline: now + asked.approval_timeout,
            required_approvals: asked.required_approvals,
            approvals: Vec::new(),
            decided_by: None,
            approved_at: None,
            activated_at: None,
            expires_at: None,
            ended_at: None,
            revoke: None,
            attempts: 0,
            retry_at: None,
            failure: None,
            card: None,
            response_url: asked.response_url,
            drift_reported: false,
            extends: None,
            extended_by: Vec::new(),
            remind_at: None,
            card_copies: Vec::new(),
            claim: None,
            intents: Vec::new(),
            verified_at: None,
            first_attempt_at: None,
            dry_run: false,
            mac: None,
        }
    }

    /// A new Pending request to extend `grant` by `by`: the same access for
    /// the same person, decided afresh; nothing of the grant's own progress
    /// (votes, cards, expiry) carries over.
    pub fn extension_of(
        grant: &Request,
        id: RequestId,
        by: Duration,
        now: OffsetDateTime,
        approval_timeout: Duration,
        required_approvals: u32,
        response_url: Option<String>,
    ) -> Request {
        let mut ext = Request::pending(
            Asked {
                id,
                requester: grant.requester.clone(),
                access: grant.access.clone(),
                reason: grant.reason.clone(),
                duration: by,
                approval_timeout,
                required_approvals,
                response_url,
            },
            now,
        );
        ext.extends = Some(grant.id.clone());
        ext.dry_run = grant.dry_run;
        ext
    }

    /// Applies a state event, enforcing the state machine.
    pub fn apply(&mut self, event: Event) -> Result<(), IllegalTransition> {
        self.state = transition(self.state, event)?;
        Ok(())
    }

    /// An approved request that must not be granted any more: its grant
    /// failed, or it was revoked before it was made. What is left is to
    /// converge its access away.
    pub fn grant_abandoned(&self) -> bool {
        self.state == State::Approved && (self.failure.is_some() || self.revoke.is_some())
    }

    /// The expiry of a grant started at `started`: fixed from the first
    /// attempt on, whatever time a re-drive runs at.
    pub fn planned_expiry(&self, now: OffsetDateTime) -> OffsetDateTime {
        self.first_attempt_at.unwrap_or(now) + self.duration
    }

    pub fn has_vote_from(&self, user: &str) -> bool {
        self.approvals.iter().any(|v| v.user == user)
    }
}

/// Durations are stored as whole seconds: readable in a store dump and
/// stable across serde versions.
mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_transitions_are_exactly_the_spec() {
        let legal: Vec<(State, Event, State)> = vec![
            (State::Pending, Event::QuorumReached, State::Approved),
            (State::Pending, Event::Deny, State::Denied),
            (State::Pending, Event::Cancel, State::Cancelled),
            (State::Pending, Event::ApprovalTimeout, State::Expired),
            (State::Approved, Event::Granted, State::Active),
            (State::Approved, Event::GrantFailed, State::Failed),
            (State::Approved, Event::ExtensionApplied, State::Applied),
            (State::Approved, Event::Revoked, State::Revoked),
            (State::Active, Event::Revoked, State::Revoked),
            (State::Active, Event::RevokeFailing, State::RevokeFailed),
            (State::RevokeFailed, Event::Revoked, State::Revoked),
            (
                State::RevokeFailed,
                Event::RevokeFailing,
                State::RevokeFailed,
            ),
        ];
        for from in State::ALL {
            for event in Event::ALL {
                let expected = legal
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from:?} + {event:?}"),
                    (Err(err), None) => {
                        assert_eq!(err, IllegalTransition { from, event });
                    }
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn short_grants_get_no_reminder() {
        let exp = time::macros::datetime!(2026-11-23 12:00 UTC);
        let ten = Duration::from_secs(600);
        assert_eq!(reminder_time(exp, ten, ten), None);
        assert_eq!(
            reminder_time(exp, Duration::from_secs(3600), ten),
            Some(time::macros::datetime!(2026-11-23 11:50 UTC))
        );
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for from in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in Event::ALL {
                assert!(transition(from, event).is_err(), "{from:?} + {event:?}");
            }
        }
    }

    #[test]
    fn ids_are_short_unambiguous_and_round_trip() {
        let mut rng = rand::thread_rng();
        for _ in 0..1000 {
            let id = RequestId::generate(&mut rng);
            assert_eq!(id.as_str().len(), 7);
            assert!(id.as_str().starts_with("R-"));
            assert!(!id.as_str()[2..].contains(['I', 'L', 'O', 'U']));
            assert_eq!(RequestId::parse(id.as_str()), Some(id.clone()));
            assert_eq!(RequestId::parse(&id.as_str().to_lowercase()), Some(id));
        }
        assert_eq!(
            RequestId::parse("7f3k2").map(|i| i.to_string()),
            Some("R-7F3K2".into())
        );
        for bad in ["", "R-", "R-7F3K", "R-7F3K2X", "R-7F3KI", "../x", "R-7F 3K"] {
            assert_eq!(RequestId::parse(bad), None, "{bad}");
        }
    }
}
