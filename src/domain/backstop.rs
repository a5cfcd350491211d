//! The backstop (spec 10.1): for every association Tollgate makes on an
//! `access-entry` cluster, one EventBridge Scheduler one-time schedule whose
//! universal target undoes it with a single EKS call, so the access ends
//! `grace` after its expiry even if Tollgate never runs again.
//!
//! Everything here is pure: which schedules a principal's converge must
//! leave behind (name, time, target, input) and which it must remove. The
//! adapter in `access::backstop` only writes what this decides.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;
use time::OffsetDateTime;

use super::grant::{Baselines, Scope};

/// `[clusters.backstop]`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backstop {
    /// The role EventBridge Scheduler assumes to make the EKS call.
    pub role_arn: String,
    /// How long after the latest expiry that needs an association its
    /// schedule fires: Tollgate's own revoke normally comes first.
    pub grace: Duration,
    /// The schedule group every schedule of this cluster is created in.
    pub group: String,
}

pub const DEFAULT_GRACE: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_GROUP: &str = "tollgate";
/// EventBridge Scheduler's limit on schedule (and group) names.
pub const MAX_NAME: usize = 64;
/// Hex digits of the SHA-256 that make a schedule name unique: 64 bits, so
/// two associations of one installation never share a name in practice.
const HASH_HEX: usize = 16;
pub const TARGET_PREFIX: &str = "arn:aws:scheduler:::aws-sdk:eks:";
/// The target's `RetryPolicy`: Scheduler's maxima (24 hours, 185 retries
/// with exponential backoff), written explicitly so the schedule says what
/// it does. A failed call is then retried until a day after the schedule's
/// time; after that it is dropped (no dead-letter queue is configured).
pub const RETRY_MAX_AGE: i32 = 86_400;
pub const RETRY_ATTEMPTS: i32 = 185;

/// What a schedule's one EKS call does when it fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Undo {
    /// `DeleteAccessEntry`: the entry is Tollgate's and this is the last
    /// association on it to end.
    DeleteEntry,
    /// `DisassociateAccessPolicy`: the association did not exist before.
    Disassociate,
    /// `AssociateAccessPolicy` with the scope recorded as the baseline: the
    /// principal had this policy before Tollgate and keeps it.
    Restore(Scope),
}

impl Undo {
    /// The EKS API action, as the universal target ARN spells it.
    pub fn action(&self) -> &'static str {
        match self {
            Undo::DeleteEntry => "deleteAccessEntry",
            Undo::Disassociate => "disassociateAccessPolicy",
            Undo::Restore(_) => "associateAccessPolicy",
        }
    }

    pub fn target_arn(&self) -> String {
        format!("{TARGET_PREFIX}{}", self.action())
    }

    /// The EKS request the target sends. A universal target's `Input` is
    /// the request parameters of the service API named by the AWS SDK's
    /// member names, which are PascalCase (`ClusterName`, not the REST
    /// wire name `clusterName`); path parameters are members like any
    /// other, so this one document is the whole request. Enum values stay
    /// as the API spells them (`cluster`, `namespace`).
    pub fn input(&self, cluster: &str, principal: &str, policy: &str) -> Value {
        match self {
            Undo::DeleteEntry => json!({"ClusterName": cluster, "PrincipalArn": principal}),
            Undo::Disassociate => json!({
                "ClusterName": cluster,
                "PrincipalArn": principal,
                "PolicyArn": policy,
            }),
            Undo::Restore(scope) => json!({
                "ClusterName": cluster,
                "PrincipalArn": principal,
                "PolicyArn": policy,
                "AccessScope": scope_json(scope),
            }),
        }
    }
}

/// An EKS `AccessScope` as a universal target's `Input` writes it (SDK
/// member names, API enum values).
pub fn scope_json(scope: &Scope) -> Value {
    match scope {
        Scope::Cluster => json!({"Type": "cluster"}),
        Scope::Namespaces(ns) => json!({"Type": "namespace", "Namespaces": ns}),
    }
}

/// One schedule a converge must leave in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub policy: String,
    /// Whole seconds, UTC (what `at(...)` can say), never before
    /// expiry + grace.
    pub at: OffsetDateTime,
    pub undo: Undo,
    pub target_arn: String,
    /// `Input`, serialised.
    pub input: String,
}

impl Planned {
    pub fn expression(&self) -> String {
        at_expression(self.at)
    }
}

/// What a converge does to the backstop: schedules to create or move, and
/// names to delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackstopPlan {
    pub keep: Vec<Planned>,
    pub remove: Vec<String>,
}

/// `tollgate-<instance>-<cluster>-<hash>`, at most 64 characters of
/// `[0-9A-Za-z._-]`. The hash (first 16 hex digits of SHA-256 over
/// instance, cluster, principal and policy, newline-separated) is what
/// identifies the association; the readable part before it is shortened
/// when instance and cluster are long, and characters Scheduler does not
/// allow in names become `-`. Hashing the instance and cluster too keeps
/// two installations apart even where their readable parts coincide
/// (instance `a-b` + cluster `c` vs instance `a` + cluster `b-c`).
pub fn schedule_name(instance: &str, cluster: &str, principal: &str, policy: &str) -> String {
    let digest = Sha256::digest(format!("{instance}\n{cluster}\n{principal}\n{policy}"));
    let hash = &hex::encode(digest)[..HASH_HEX];
    let readable: String = format!("tollgate-{instance}-{cluster}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME - HASH_HEX - 1)
        .collect();
    format!("{readable}-{hash}")
}

/// The mark written as every schedule's description: Tollgate updates and
/// deletes only schedules carrying its own installation's mark.
pub fn description(instance: &str) -> String {
    format!("managed-by=tollgate tollgate-instance={instance}")
}

/// `at(yyyy-mm-ddThh:mm:ss)`, read in UTC (the schedule's time zone).
pub fn at_expression(at: OffsetDateTime) -> String {
    let t = at.to_offset(time::UtcOffset::UTC);
    format!(
        "at({:04}-{:02}-{:02}T{:02}:{:02}:{:02})",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The instant of an `at(...)` expression in UTC; `None` for anything else.
pub fn parse_at(expression: &str) -> Option<OffsetDateTime> {
    let inner = expression.strip_prefix("at(")?.strip_suffix(')')?;
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(inner, &format)
        .ok()
        .map(|t| t.assume_utc())
}

/// Rounded up to the whole second: a schedule never fires before
/// expiry + grace.
fn ceil_second(t: OffsetDateTime) -> OffsetDateTime {
    let whole = t.replace_nanosecond(0).unwrap_or(t);
    if whole < t {
        whole + time::Duration::SECOND
    } else {
        whole
    }
}

/// The start-up warning for a cluster whose `grace` is shorter than its
/// `reconcile_interval`. The reconciler's pass is what repairs a schedule
/// deleted, disabled or changed outside Tollgate; with a shorter grace a
/// schedule broken just after a converge can reach its time before the
/// next pass puts it right, and a grant Tollgate ends late (say it is
/// down for a minute) races its own backstop. Allowed (tests and short
/// trials want a small grace), but said at start.
pub fn grace_warning(
    cluster: &str,
    grace: Duration,
    reconcile_interval: Duration,
) -> Option<String> {
    (grace < reconcile_interval).then(|| {
        format!(
            "cluster {cluster}: backstop grace {}s is shorter than reconcile_interval {}s: a schedule changed or deleted outside Tollgate may fire before the reconciler repairs it",
            grace.as_secs(),
            reconcile_interval.as_secs()
        )
    })
}

/// Whose access a backstop plan is for.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub instance: &'a str,
    pub cluster: &'a str,
    pub principal: &'a str,
}

/// The backstop for one (cluster, principal), from what the converge step
/// decided:
///
/// * `needs`: per access policy the grants in force need, their expiries
///   (the latest one plus `grace` is the schedule's time);
/// * `current`: what the principal's entry holds before this converge;
/// * `baselines`: what each policy Tollgate touches had before it (stored
///   and newly recorded), as `plan_associations` uses them;
/// * `entry_ours`: the entry is one this installation's store created, with
///   nothing on it set by anyone else.
///
/// An association whose policy had a baseline is restored to that scope,
/// never deleted. When Tollgate's entry will hold nothing but Tollgate's
/// associations, the one that ends last deletes the entry (the others,
/// firing first, disassociate). Policies with a baseline or a Tollgate
/// association that no grant needs any more lose their schedule.
pub fn plan(
    backstop: &Backstop,
    who: &Subject<'_>,
    needs: &BTreeMap<String, Vec<OffsetDateTime>>,
    current: &BTreeMap<String, Scope>,
    baselines: &Baselines,
    entry_ours: bool,
) -> BackstopPlan {
    let Subject {
        instance,
        cluster,
        principal,
    } = *who;
    let grace = time::Duration::try_from(backstop.grace).unwrap_or(time::Duration::ZERO);
    let times: BTreeMap<&String, OffsetDateTime> = needs
        .iter()
        .filter_map(|(policy, expiries)| {
            expiries
                .iter()
                .max()
                .map(|e| (policy, ceil_second(*e + grace)))
        })
        .collect();
    // After every schedule has fired, does anything stay on the entry? A
    // baseline restored, or an association Tollgate never touched.
    let something_stays = times
        .keys()
        .any(|p| matches!(baselines.get(*p), Some(Some(_))))
        || current
            .keys()
            .any(|p| !times.contains_key(p) && !matches!(baselines.get(p), Some(None)));
    let last = times
        .iter()
        .filter(|(p, _)| !matches!(baselines.get(**p), Some(Some(_))))
        .max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
        .map(|(p, _)| (*p).clone());
    // A cluster-scoped baseline is never widened (nothing is wider), so
    // restoring it would change nothing: it gets no schedule, and the
    // backstop role never needs to associate anything cluster-wide.
    let cluster_baseline = |p: &String| matches!(baselines.get(p), Some(Some(Scope::Cluster)));
    let keep = times
        .iter()
        .filter(|(policy, _)| !cluster_baseline(policy))
        .map(|(policy, at)| {
            let undo = match baselines.get(*policy) {
                Some(Some(scope)) => Undo::Restore(scope.clone()),
                _ if entry_ours && !something_stays && last.as_ref() == Some(*policy) => {
                    Undo::DeleteEntry
                }
                _ => Undo::Disassociate,
            };
            Planned {
                name: schedule_name(instance, cluster, principal, policy),
                policy: (*policy).clone(),
                at: *at,
                target_arn: undo.target_arn(),
                input: undo.input(cluster, principal, policy).to_string(),
                undo,
            }
        })
        .collect();
    // Only policies no grant needs: one whose grants carry no expiry (never
    // the case for an Active grant) keeps whatever schedule it has.
    let remove = baselines
        .keys()
        .filter(|p| !needs.contains_key(*p) || cluster_baseline(p))
        .map(|p| schedule_name(instance, cluster, principal, p))
        .collect();
    BackstopPlan { keep, remove }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const ALICE: &str = "arn:aws:iam::111122223333:role/alice";
    const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
    const EDIT: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy";

    const ALICE_PROD: Subject<'static> = Subject {
        instance: "tollgate",
        cluster: "prod",
        principal: ALICE,
    };

    fn backstop() -> Backstop {
        Backstop {
            role_arn: "arn:aws:iam::111122223333:role/tollgate-backstop".into(),
            grace: Duration::from_secs(900),
            group: "tollgate".into(),
        }
    }

    fn needs(items: &[(&str, &[OffsetDateTime])]) -> BTreeMap<String, Vec<OffsetDateTime>> {
        items
            .iter()
            .map(|(p, e)| (p.to_string(), e.to_vec()))
            .collect()
    }

    #[test]
    fn names_are_short_allowed_and_distinct() {
        let a = schedule_name("tollgate", "prod", ALICE, VIEW);
        assert!(a.starts_with("tollgate-tollgate-prod-"), "{a}");
        assert_eq!(a, schedule_name("tollgate", "prod", ALICE, VIEW), "stable");
        assert_ne!(a, schedule_name("tollgate", "prod", ALICE, EDIT));
        assert_ne!(a, schedule_name("other", "prod", ALICE, VIEW));
        // Same readable part, different installation and cluster.
        assert_ne!(
            schedule_name("a-b", "c", ALICE, VIEW),
            schedule_name("a", "b-c", ALICE, VIEW)
        );
        let long = schedule_name(&"i".repeat(63), &"c".repeat(100), ALICE, VIEW);
        assert_eq!(long.len(), MAX_NAME, "{long}");
        let odd = schedule_name("x", "we!rd cluster", ALICE, VIEW);
        assert!(
            odd.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{odd}"
        );
    }

    #[test]
    fn a_grace_shorter_than_the_reconcile_interval_is_warned_about() {
        let w = grace_warning("prod", Duration::from_secs(60), Duration::from_secs(300));
        assert!(w
            .as_deref()
            .is_some_and(|w| w.contains("prod") && w.contains("60s") && w.contains("300s")));
        assert_eq!(
            grace_warning("prod", Duration::from_secs(900), Duration::from_secs(300)),
            None
        );
        assert_eq!(
            grace_warning("prod", Duration::from_secs(300), Duration::from_secs(300)),
            None
        );
    }

    #[test]
    fn at_expression_is_utc_whole_seconds_and_round_trips() {
        let t = datetime!(2026-11-26 08:05:09 +01:00);
        assert_eq!(at_expression(t), "at(2026-11-26T07:05:09)");
        assert_eq!(parse_at("at(2026-11-26T07:05:09)"), Some(t));
        assert_eq!(parse_at("rate(5 minutes)"), None);
        assert_eq!(
            ceil_second(datetime!(2026-11-26 07:05:09.2 UTC)),
            datetime!(2026-11-26 07:05:10 UTC)
        );
    }

    #[test]
    fn latest_expiry_plus_grace_and_one_schedule_per_association() {
        let early = datetime!(2026-11-26 07:00:00 UTC);
        let late = datetime!(2026-11-26 09:00:00.5 UTC);
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &needs(&[(VIEW, &[early, late])]),
            &BTreeMap::new(),
            &BTreeMap::from([(VIEW.to_string(), None)]),
            true,
        );
        assert_eq!(p.keep.len(), 1);
        assert_eq!(p.keep[0].at, datetime!(2026-11-26 09:15:01 UTC));
        assert_eq!(p.keep[0].expression(), "at(2026-11-26T09:15:01)");
        assert!(p.remove.is_empty());
    }

    #[test]
    fn only_tollgates_plain_entry_is_deleted_and_by_the_last_schedule() {
        let t1 = datetime!(2026-11-26 07:00:00 UTC);
        let t2 = datetime!(2026-11-26 08:00:00 UTC);
        let two = needs(&[(VIEW, &[t1]), (EDIT, &[t2])]);
        let fresh = BTreeMap::from([(VIEW.to_string(), None), (EDIT.to_string(), None)]);
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &two,
            &BTreeMap::new(),
            &fresh,
            true,
        );
        let undo = |p: &BackstopPlan, policy: &str| {
            p.keep
                .iter()
                .find(|k| k.policy == policy)
                .map(|k| k.undo.clone())
                .unwrap()
        };
        assert_eq!(undo(&p, VIEW), Undo::Disassociate);
        assert_eq!(undo(&p, EDIT), Undo::DeleteEntry);
        let input: Value =
            serde_json::from_str(&p.keep.iter().find(|k| k.policy == EDIT).unwrap().input).unwrap();
        assert_eq!(input, json!({"ClusterName": "prod", "PrincipalArn": ALICE}));
        assert_eq!(
            p.keep.iter().find(|k| k.policy == EDIT).unwrap().target_arn,
            "arn:aws:scheduler:::aws-sdk:eks:deleteAccessEntry"
        );

        // Not Tollgate's entry: never deleted.
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &two,
            &BTreeMap::new(),
            &fresh,
            false,
        );
        assert!(p.keep.iter().all(|k| k.undo == Undo::Disassociate));

        // An association Tollgate did not make stays on the entry: no delete.
        let foreign = BTreeMap::from([(
            "arn:aws:eks::aws:cluster-access-policy/AmazonEKSAdminPolicy".to_string(),
            Scope::Cluster,
        )]);
        let p = plan(&backstop(), &ALICE_PROD, &two, &foreign, &fresh, true);
        assert!(p.keep.iter().all(|k| k.undo == Undo::Disassociate));
    }

    #[test]
    fn a_baseline_is_restored_never_deleted() {
        let t = datetime!(2026-11-26 07:00:00 UTC);
        let base = Scope::from_namespaces(["team-a"]);
        let baselines = BTreeMap::from([(EDIT.to_string(), Some(base.clone()))]);
        let current = BTreeMap::from([(EDIT.to_string(), base.clone())]);
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &needs(&[(EDIT, &[t])]),
            &current,
            &baselines,
            true,
        );
        assert_eq!(p.keep[0].undo, Undo::Restore(base));
        assert_eq!(
            p.keep[0].target_arn,
            "arn:aws:scheduler:::aws-sdk:eks:associateAccessPolicy"
        );
        let input: Value = serde_json::from_str(&p.keep[0].input).unwrap();
        assert_eq!(
            input,
            json!({
                "ClusterName": "prod",
                "PrincipalArn": ALICE,
                "PolicyArn": EDIT,
                "AccessScope": {"Type": "namespace", "Namespaces": ["team-a"]},
            })
        );
    }

    #[test]
    fn a_cluster_wide_baseline_needs_no_restore() {
        let t = datetime!(2026-11-26 07:00:00 UTC);
        let baselines = BTreeMap::from([(EDIT.to_string(), Some(Scope::Cluster))]);
        let current = BTreeMap::from([(EDIT.to_string(), Scope::Cluster)]);
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &needs(&[(EDIT, &[t])]),
            &current,
            &baselines,
            true,
        );
        assert!(p.keep.is_empty(), "{p:?}");
        assert_eq!(
            p.remove,
            vec![schedule_name("tollgate", "prod", ALICE, EDIT)]
        );
    }

    #[test]
    fn policies_no_grant_needs_lose_their_schedule() {
        let t = datetime!(2026-11-26 07:00:00 UTC);
        let baselines = BTreeMap::from([(VIEW.to_string(), None), (EDIT.to_string(), None)]);
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &needs(&[(VIEW, &[t])]),
            &BTreeMap::new(),
            &baselines,
            true,
        );
        assert_eq!(p.keep.len(), 1);
        assert_eq!(
            p.remove,
            vec![schedule_name("tollgate", "prod", ALICE, EDIT)]
        );
        // Needed, but no expiry known: not scheduled, and not unscheduled.
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &needs(&[(VIEW, &[])]),
            &BTreeMap::new(),
            &baselines,
            true,
        );
        assert!(p.keep.is_empty());
        assert_eq!(
            p.remove,
            vec![schedule_name("tollgate", "prod", ALICE, EDIT)]
        );
        // The last grant gone: nothing kept, every touched policy removed.
        let p = plan(
            &backstop(),
            &ALICE_PROD,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &baselines,
            true,
        );
        assert!(p.keep.is_empty());
        assert_eq!(p.remove.len(), 2);
    }
}
