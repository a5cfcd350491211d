//! The backstop's adapter (spec 10.1): writes the EventBridge Scheduler
//! one-time schedules `domain::backstop::plan` decides, behind a small
//! trait so the access-entry converge can be tested without Scheduler.
//!
//! Every schedule carries this installation's mark in its description;
//! one with another mark is never updated or deleted.

use async_trait::async_trait;
use aws_sdk_scheduler::error::ProvideErrorMetadata;
use aws_sdk_scheduler::types::{
    ActionAfterCompletion, FlexibleTimeWindow, FlexibleTimeWindowMode, RetryPolicy, ScheduleState,
    Target,
};
use std::sync::Arc;

use super::aws::{aws_error, AwsClients};
use super::AccessError;
use crate::domain::backstop::{
    description, parse_at, Backstop, BackstopPlan, Planned, Undo, RETRY_ATTEMPTS, RETRY_MAX_AGE,
};
use crate::domain::policy::ClusterPolicy;

/// A schedule as Scheduler holds it: what Tollgate compares before writing.
/// Every field Tollgate sets is here, so a schedule changed outside
/// Tollgate in any of them (disabled, moved to another time zone, given a
/// flexible window, kept after completion, retries cut) is rewritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub description: Option<String>,
    pub expression: Option<String>,
    /// `ScheduleExpressionTimezone`; absent means UTC.
    pub timezone: Option<String>,
    /// `ENABLED` / `DISABLED`.
    pub state: Option<String>,
    /// `ActionAfterCompletion`: `DELETE` / `NONE`.
    pub after_completion: Option<String>,
    /// `FlexibleTimeWindow.Mode`: `OFF` / `FLEXIBLE`.
    pub window_mode: Option<String>,
    pub target_arn: String,
    pub role_arn: String,
    pub input: Option<String>,
    /// The target's `RetryPolicy`: (maximum event age in seconds, maximum
    /// retry attempts).
    pub retry: Option<(i32, i32)>,
}

/// What Tollgate writes for every schedule besides time, target and input.
pub const STATE: &str = "ENABLED";
pub const TIMEZONE: &str = "UTC";
pub const AFTER_COMPLETION: &str = "DELETE";
pub const WINDOW_MODE: &str = "OFF";

/// What one schedule should be.
pub struct Wanted<'a> {
    pub group: &'a str,
    pub role_arn: &'a str,
    pub description: &'a str,
    pub planned: &'a Planned,
}

#[async_trait]
pub trait Schedules: Send + Sync + 'static {
    async fn get(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        name: &str,
    ) -> Result<Option<Existing>, AccessError>;
    /// False when a schedule of that name exists already.
    async fn create(
        &self,
        cluster: &ClusterPolicy,
        wanted: &Wanted<'_>,
    ) -> Result<bool, AccessError>;
    async fn update(&self, cluster: &ClusterPolicy, wanted: &Wanted<'_>)
        -> Result<(), AccessError>;
    /// A schedule already gone is success.
    async fn delete(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        name: &str,
    ) -> Result<(), AccessError>;
    /// Whether the schedule group exists, for `tollgate check`.
    async fn group_exists(&self, cluster: &ClusterPolicy, group: &str)
        -> Result<bool, AccessError>;
    /// Creates a disabled schedule that passes `role_arn`, then deletes it:
    /// CreateSchedule is where iam:PassRole on the role is enforced.
    async fn probe_role(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        role_arn: &str,
        name: &str,
    ) -> Result<(), AccessError>;
}

/// EventBridge Scheduler through the AWS SDK.
pub struct AwsSchedules {
    clients: Arc<AwsClients>,
}

impl AwsSchedules {
    pub fn new(clients: Arc<AwsClients>) -> Self {
        AwsSchedules { clients }
    }
}

fn target(cluster: &ClusterPolicy, wanted: &Wanted<'_>) -> Result<Target, AccessError> {
    Target::builder()
        .arn(&wanted.planned.target_arn)
        .role_arn(wanted.role_arn)
        .input(&wanted.planned.input)
        .retry_policy(retry())
        .build()
        .map_err(|e| aws_error(cluster, "CreateSchedule", &e))
}

/// Set explicitly rather than left to Scheduler's default: the call is
/// retried (with Scheduler's exponential backoff) for as long as Scheduler
/// allows, since a backstop that gives up early leaves access in place.
fn retry() -> RetryPolicy {
    RetryPolicy::builder()
        .maximum_event_age_in_seconds(RETRY_MAX_AGE)
        .maximum_retry_attempts(RETRY_ATTEMPTS)
        .build()
}

fn off(cluster: &ClusterPolicy) -> Result<FlexibleTimeWindow, AccessError> {
    FlexibleTimeWindow::builder()
        .mode(FlexibleTimeWindowMode::Off)
        .build()
        .map_err(|e| aws_error(cluster, "CreateSchedule", &e))
}

#[async_trait]
impl Schedules for AwsSchedules {
    async fn get(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        name: &str,
    ) -> Result<Option<Existing>, AccessError> {
        let client = self.clients.scheduler(cluster).await;
        match client
            .get_schedule()
            .group_name(group)
            .name(name)
            .send()
            .await
        {
            Ok(out) => Ok(Some(Existing {
                description: out.description().map(str::to_string),
                expression: out.schedule_expression().map(str::to_string),
                timezone: out.schedule_expression_timezone().map(str::to_string),
                state: out.state().map(|s| s.as_str().to_string()),
                after_completion: out
                    .action_after_completion()
                    .map(|a| a.as_str().to_string()),
                window_mode: out
                    .flexible_time_window()
                    .map(|w| w.mode().as_str().to_string()),
                retry: out.target().and_then(|t| t.retry_policy()).map(|r| {
                    (
                        r.maximum_event_age_in_seconds().unwrap_or(-1),
                        r.maximum_retry_attempts().unwrap_or(-1),
                    )
                }),
                target_arn: out
                    .target()
                    .map(|t| t.arn().to_string())
                    .unwrap_or_default(),
                role_arn: out
                    .target()
                    .map(|t| t.role_arn().to_string())
                    .unwrap_or_default(),
                input: out.target().and_then(|t| t.input()).map(str::to_string),
            })),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
            Err(e) => Err(aws_error(cluster, "GetSchedule", &e)),
        }
    }

    async fn create(
        &self,
        cluster: &ClusterPolicy,
        wanted: &Wanted<'_>,
    ) -> Result<bool, AccessError> {
        let client = self.clients.scheduler(cluster).await;
        match client
            .create_schedule()
            .group_name(wanted.group)
            .name(&wanted.planned.name)
            .description(wanted.description)
            .schedule_expression(wanted.planned.expression())
            .schedule_expression_timezone("UTC")
            .flexible_time_window(off(cluster)?)
            .action_after_completion(ActionAfterCompletion::Delete)
            .state(ScheduleState::Enabled)
            .target(target(cluster, wanted)?)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConflictException") => Ok(false),
            Err(e) => Err(aws_error(cluster, "CreateSchedule", &e)),
        }
    }

    async fn update(
        &self,
        cluster: &ClusterPolicy,
        wanted: &Wanted<'_>,
    ) -> Result<(), AccessError> {
        let client = self.clients.scheduler(cluster).await;
        // UpdateSchedule replaces the whole schedule: every field again.
        client
            .update_schedule()
            .group_name(wanted.group)
            .name(&wanted.planned.name)
            .description(wanted.description)
            .schedule_expression(wanted.planned.expression())
            .schedule_expression_timezone("UTC")
            .flexible_time_window(off(cluster)?)
            .action_after_completion(ActionAfterCompletion::Delete)
            .state(ScheduleState::Enabled)
            .target(target(cluster, wanted)?)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_error(cluster, "UpdateSchedule", &e))
    }

    async fn delete(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        name: &str,
    ) -> Result<(), AccessError> {
        let client = self.clients.scheduler(cluster).await;
        match client
            .delete_schedule()
            .group_name(group)
            .name(name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(aws_error(cluster, "DeleteSchedule", &e)),
        }
    }

    async fn group_exists(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
    ) -> Result<bool, AccessError> {
        let client = self.clients.scheduler(cluster).await;
        match client.get_schedule_group().name(group).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
            Err(e) => Err(aws_error(cluster, "GetScheduleGroup", &e)),
        }
    }

    async fn probe_role(
        &self,
        cluster: &ClusterPolicy,
        group: &str,
        role_arn: &str,
        name: &str,
    ) -> Result<(), AccessError> {
        let client = self.clients.scheduler(cluster).await;
        // Disabled and a year out: it never runs, even if the delete below
        // fails; its input names a principal that cannot exist.
        let at = crate::domain::backstop::at_expression(
            time::OffsetDateTime::now_utc() + time::Duration::days(365),
        );
        let input = Undo::DeleteEntry.input(
            &cluster.name,
            &format!(
                "arn:aws:iam::{}:role/tollgate-check-probe",
                cluster.account_id
            ),
            "",
        );
        let target = Target::builder()
            .arn(Undo::DeleteEntry.target_arn())
            .role_arn(role_arn)
            .input(input.to_string())
            .build()
            .map_err(|e| aws_error(cluster, "CreateSchedule", &e))?;
        client
            .create_schedule()
            .group_name(group)
            .name(name)
            .description("tollgate check probe")
            .schedule_expression(at)
            .schedule_expression_timezone("UTC")
            .flexible_time_window(off(cluster)?)
            .action_after_completion(ActionAfterCompletion::Delete)
            .state(ScheduleState::Disabled)
            .target(target)
            .send()
            .await
            .map_err(|e| aws_error(cluster, "CreateSchedule", &e))?;
        self.delete(cluster, group, name).await
    }
}

/// `tollgate check` for one backstop cluster: the group, then the role.
/// Lines of (passed, what was checked).
pub async fn check(
    schedules: &dyn Schedules,
    cluster: &ClusterPolicy,
    backstop: &Backstop,
    instance: &str,
) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let group = &backstop.group;
    match schedules.group_exists(cluster, group).await {
        Ok(true) => out.push((
            true,
            format!(
                "cluster {}: backstop schedule group {group} exists",
                cluster.name
            ),
        )),
        Ok(false) => {
            out.push((
                false,
                format!(
                    "cluster {}: backstop schedule group {group} does not exist in {} (create it: aws scheduler create-schedule-group --name {group})",
                    cluster.name, cluster.region
                ),
            ));
            return out;
        }
        Err(e) => {
            out.push((false, format!("cluster {}: backstop: {e}", cluster.name)));
            return out;
        }
    }
    let name = crate::domain::backstop::schedule_name(instance, &cluster.name, "check", "probe");
    match schedules
        .probe_role(cluster, group, &backstop.role_arn, &name)
        .await
    {
        Ok(()) => out.push((
            true,
            format!(
                "cluster {}: backstop role {} can be passed to EventBridge Scheduler (a disabled probe schedule was created with it and deleted; what the role may do in EKS is only exercised when a schedule fires)",
                cluster.name, backstop.role_arn
            ),
        )),
        Err(e) => out.push((
            false,
            format!(
                "cluster {}: backstop role {} could not be used for a schedule: {e}",
                cluster.name, backstop.role_arn
            ),
        )),
    }
    out
}

/// Writes a backstop plan for one principal.
pub struct Backstops {
    schedules: Arc<dyn Schedules>,
    instance: String,
}

impl Backstops {
    pub fn new(schedules: Arc<dyn Schedules>, instance: &str) -> Self {
        Backstops {
            schedules,
            instance: instance.to_string(),
        }
    }

    pub fn schedules(&self) -> &Arc<dyn Schedules> {
        &self.schedules
    }

    /// Creates or moves every schedule the plan keeps; an identical one is
    /// left alone, so a reconcile pass over unchanged grants writes nothing.
    ///
    /// A schedule under the planned name without this installation's mark
    /// is an error, as Scheduler out of reach is: the caller then grants
    /// and widens nothing, since the association would have no backstop
    /// (and the foreign schedule, whatever it does, is not Tollgate's to
    /// change).
    pub async fn put(
        &self,
        cluster: &ClusterPolicy,
        backstop: &Backstop,
        plan: &BackstopPlan,
    ) -> Result<(), AccessError> {
        let mark = description(&self.instance);
        for planned in &plan.keep {
            let wanted = Wanted {
                group: &backstop.group,
                role_arn: &backstop.role_arn,
                description: &mark,
                planned,
            };
            let existing = self
                .schedules
                .get(cluster, &backstop.group, &planned.name)
                .await?;
            match existing {
                None => {
                    if self.schedules.create(cluster, &wanted).await? {
                        continue;
                    }
                    // Created meanwhile: replaced only when it carries this
                    // installation's mark (another replica's converge of an
                    // earlier state), never when it is someone else's.
                    match self
                        .schedules
                        .get(cluster, &backstop.group, &planned.name)
                        .await?
                    {
                        Some(e) if e.description.as_deref() != Some(mark.as_str()) => {
                            return Err(self.foreign(cluster, &backstop.group, &planned.name));
                        }
                        Some(e) if same(&e, &wanted) => {}
                        _ => self.schedules.update(cluster, &wanted).await?,
                    }
                }
                Some(e) if e.description.as_deref() != Some(mark.as_str()) => {
                    return Err(self.foreign(cluster, &backstop.group, &planned.name));
                }
                Some(e) if same(&e, &wanted) => {}
                Some(_) => self.schedules.update(cluster, &wanted).await?,
            }
        }
        Ok(())
    }

    /// Deletes the schedules of associations no grant needs any more.
    pub async fn remove(
        &self,
        cluster: &ClusterPolicy,
        backstop: &Backstop,
        plan: &BackstopPlan,
    ) -> Result<(), AccessError> {
        let mark = description(&self.instance);
        for name in &plan.remove {
            match self.schedules.get(cluster, &backstop.group, name).await? {
                None => {}
                // Not Tollgate's to delete; nothing of Tollgate's depends
                // on it, so the removal goes on.
                Some(e) if e.description.as_deref() != Some(mark.as_str()) => {
                    let _ = self.foreign(cluster, &backstop.group, name);
                }
                Some(_) => {
                    self.schedules
                        .delete(cluster, &backstop.group, name)
                        .await?
                }
            }
        }
        Ok(())
    }

    fn foreign(&self, cluster: &ClusterPolicy, group: &str, name: &str) -> AccessError {
        tracing::warn!(
            cluster = %cluster.name,
            group,
            schedule = name,
            "a schedule with this name does not carry this installation's mark; left alone"
        );
        AccessError::Aws {
            cluster: cluster.name.clone(),
            operation: "CreateSchedule",
            message: format!(
                "schedule {name} in group {group} exists without this installation's mark; it is left alone and nothing is granted without a backstop"
            ),
        }
    }
}

/// Whether the schedule already says exactly what is wanted (time compared
/// as an instant, input as JSON, so formatting differences do not count).
fn same(e: &Existing, w: &Wanted<'_>) -> bool {
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    e.expression.as_deref().and_then(parse_at) == Some(w.planned.at)
        // at() is read in the schedule's time zone: only UTC is this time.
        && e.timezone.as_deref().unwrap_or(TIMEZONE) == TIMEZONE
        && e.state.as_deref() == Some(STATE)
        && e.after_completion.as_deref() == Some(AFTER_COMPLETION)
        && e.window_mode.as_deref() == Some(WINDOW_MODE)
        && e.retry == Some((RETRY_MAX_AGE, RETRY_ATTEMPTS))
        && e.target_arn == w.planned.target_arn
        && e.role_arn == w.role_arn
        && e.input.as_deref().and_then(json) == json(&w.planned.input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::backstop::{plan, schedule_name, Subject};
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;
    use time::macros::datetime;

    const ALICE: &str = "arn:aws:iam::111122223333:role/alice";
    const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";

    /// Schedules in memory, with every write recorded.
    #[derive(Default)]
    struct Fake {
        held: Mutex<BTreeMap<String, Existing>>,
        writes: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Schedules for Fake {
        async fn get(
            &self,
            _: &ClusterPolicy,
            _: &str,
            name: &str,
        ) -> Result<Option<Existing>, AccessError> {
            Ok(self.held.lock().unwrap().get(name).cloned())
        }
        async fn create(&self, c: &ClusterPolicy, w: &Wanted<'_>) -> Result<bool, AccessError> {
            if self.held.lock().unwrap().contains_key(&w.planned.name) {
                return Ok(false);
            }
            self.update(c, w).await.map(|()| true)
        }
        async fn update(&self, _: &ClusterPolicy, w: &Wanted<'_>) -> Result<(), AccessError> {
            self.writes
                .lock()
                .unwrap()
                .push(format!("put {}", w.planned.name));
            self.held.lock().unwrap().insert(
                w.planned.name.clone(),
                Existing {
                    description: Some(w.description.to_string()),
                    expression: Some(w.planned.expression()),
                    timezone: Some(TIMEZONE.into()),
                    state: Some(STATE.into()),
                    after_completion: Some(AFTER_COMPLETION.into()),
                    window_mode: Some(WINDOW_MODE.into()),
                    retry: Some((RETRY_MAX_AGE, RETRY_ATTEMPTS)),
                    target_arn: w.planned.target_arn.clone(),
                    role_arn: w.role_arn.to_string(),
                    input: Some(w.planned.input.clone()),
                },
            );
            Ok(())
        }
        async fn delete(&self, _: &ClusterPolicy, _: &str, name: &str) -> Result<(), AccessError> {
            self.writes.lock().unwrap().push(format!("delete {name}"));
            self.held.lock().unwrap().remove(name);
            Ok(())
        }
        async fn group_exists(&self, _: &ClusterPolicy, _: &str) -> Result<bool, AccessError> {
            Ok(true)
        }
        async fn probe_role(
            &self,
            _: &ClusterPolicy,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<(), AccessError> {
            Ok(())
        }
    }

    fn backstop() -> Backstop {
        Backstop {
            role_arn: "arn:aws:iam::111122223333:role/tollgate-backstop".into(),
            grace: Duration::from_secs(60),
            group: "tollgate".into(),
        }
    }

    fn plan_at(expiry: time::OffsetDateTime, instance: &str) -> BackstopPlan {
        plan(
            &backstop(),
            &Subject {
                instance,
                cluster: "prod",
                principal: ALICE,
            },
            &BTreeMap::from([(VIEW.to_string(), vec![expiry])]),
            &BTreeMap::new(),
            &BTreeMap::from([(VIEW.to_string(), None)]),
            true,
        )
    }

    #[tokio::test]
    async fn writes_only_changes_and_never_another_installations_schedule() {
        let fake = Arc::new(Fake::default());
        let backstops = Backstops::new(fake.clone(), "tollgate");
        let cluster = crate::domain::policy::tests::cluster();
        let first = plan_at(datetime!(2026-11-26 07:00:00 UTC), "tollgate");
        backstops.put(&cluster, &backstop(), &first).await.unwrap();
        backstops.put(&cluster, &backstop(), &first).await.unwrap();
        assert_eq!(
            fake.writes.lock().unwrap().len(),
            1,
            "unchanged: not rewritten"
        );
        let moved = plan_at(datetime!(2026-11-26 08:00:00 UTC), "tollgate");
        backstops.put(&cluster, &backstop(), &moved).await.unwrap();
        let name = schedule_name("tollgate", "prod", ALICE, VIEW);
        assert_eq!(
            fake.held.lock().unwrap()[&name].expression.as_deref(),
            Some("at(2026-11-26T08:01:00)")
        );

        // Another installation's schedule under the name this one would
        // use: neither moved nor deleted.
        let theirs = Backstops::new(fake.clone(), "other");
        let mut clash = plan_at(datetime!(2026-11-26 09:00:00 UTC), "other");
        clash.keep[0].name = name.clone();
        fake.writes.lock().unwrap().clear();
        let refused = theirs.put(&cluster, &backstop(), &clash).await;
        assert!(
            refused.is_err(),
            "a foreign schedule is a failed put: nothing may be granted without a backstop"
        );
        let gone = BackstopPlan {
            keep: Vec::new(),
            remove: vec![name.clone()],
        };
        theirs.remove(&cluster, &backstop(), &gone).await.unwrap();
        assert!(fake.writes.lock().unwrap().is_empty());
        // Its own: deleted, and deleting again is fine.
        backstops
            .remove(&cluster, &backstop(), &gone)
            .await
            .unwrap();
        backstops
            .remove(&cluster, &backstop(), &gone)
            .await
            .unwrap();
        assert!(fake.held.lock().unwrap().is_empty());
    }

    /// A schedule someone else created in the moment between Tollgate's
    /// read and its create (CreateSchedule answers Conflict) is not
    /// overwritten, and the put fails.
    #[tokio::test]
    async fn a_create_conflict_with_a_foreign_schedule_is_refused_not_overwritten() {
        struct Racing {
            inner: Fake,
            raced: Mutex<bool>,
        }
        #[async_trait]
        impl Schedules for Racing {
            async fn get(
                &self,
                c: &ClusterPolicy,
                g: &str,
                n: &str,
            ) -> Result<Option<Existing>, AccessError> {
                // The first read sees nothing; the intruder's schedule
                // appears right after it.
                let first = !std::mem::replace(&mut *self.raced.lock().unwrap(), true);
                if first {
                    return Ok(None);
                }
                self.inner.get(c, g, n).await
            }
            async fn create(&self, c: &ClusterPolicy, w: &Wanted<'_>) -> Result<bool, AccessError> {
                self.inner.create(c, w).await
            }
            async fn update(&self, c: &ClusterPolicy, w: &Wanted<'_>) -> Result<(), AccessError> {
                self.inner.update(c, w).await
            }
            async fn delete(&self, c: &ClusterPolicy, g: &str, n: &str) -> Result<(), AccessError> {
                self.inner.delete(c, g, n).await
            }
            async fn group_exists(&self, c: &ClusterPolicy, g: &str) -> Result<bool, AccessError> {
                self.inner.group_exists(c, g).await
            }
            async fn probe_role(
                &self,
                c: &ClusterPolicy,
                g: &str,
                r: &str,
                n: &str,
            ) -> Result<(), AccessError> {
                self.inner.probe_role(c, g, r, n).await
            }
        }
        let racing = Arc::new(Racing {
            inner: Fake::default(),
            raced: Mutex::new(false),
        });
        let cluster = crate::domain::policy::tests::cluster();
        let ours = plan_at(datetime!(2026-11-26 07:00:00 UTC), "tollgate");
        let mut intruder = ours.keep[0].clone();
        intruder.target_arn = Undo::Restore(crate::domain::grant::Scope::Cluster).target_arn();
        let b = backstop();
        racing
            .inner
            .update(
                &cluster,
                &Wanted {
                    group: &b.group,
                    role_arn: &b.role_arn,
                    description: "someone else",
                    planned: &intruder,
                },
            )
            .await
            .unwrap();
        racing.inner.writes.lock().unwrap().clear();
        let backstops = Backstops::new(racing.clone(), "tollgate");
        assert!(backstops.put(&cluster, &b, &ours).await.is_err());
        assert!(
            racing.inner.writes.lock().unwrap().is_empty(),
            "not overwritten"
        );
        let held = racing.inner.held.lock().unwrap();
        assert_eq!(
            held[&ours.keep[0].name].description.as_deref(),
            Some("someone else")
        );
    }

    /// Every field Tollgate sets is compared: a schedule disabled, moved to
    /// another time zone, given a flexible window, kept after completion or
    /// stripped of its retries is rewritten by the next converge.
    #[tokio::test]
    async fn a_schedule_changed_in_any_field_tollgate_sets_is_rewritten() {
        let fake = Arc::new(Fake::default());
        let backstops = Backstops::new(fake.clone(), "tollgate");
        let cluster = crate::domain::policy::tests::cluster();
        let p = plan_at(datetime!(2026-11-26 07:00:00 UTC), "tollgate");
        backstops.put(&cluster, &backstop(), &p).await.unwrap();
        let name = p.keep[0].name.clone();
        let right = fake.held.lock().unwrap()[&name].clone();
        type Tamper = fn(&mut Existing);
        let tamperings: Vec<(&str, Tamper)> = vec![
            ("disabled", |e| e.state = Some("DISABLED".into())),
            ("time zone", |e| {
                e.timezone = Some("Pacific/Kiritimati".into())
            }),
            ("kept after completion", |e| {
                e.after_completion = Some("NONE".into())
            }),
            ("flexible window", |e| {
                e.window_mode = Some("FLEXIBLE".into())
            }),
            ("no retries", |e| e.retry = Some((60, 0))),
            ("retry unset", |e| e.retry = None),
            ("role", |e| {
                e.role_arn = "arn:aws:iam::111122223333:role/other".into()
            }),
            ("target", |e| e.target_arn = Undo::Disassociate.target_arn()),
            ("input", |e| e.input = Some("{}".into())),
        ];
        for (what, tamper) in tamperings {
            tamper(fake.held.lock().unwrap().get_mut(&name).unwrap());
            fake.writes.lock().unwrap().clear();
            backstops.put(&cluster, &backstop(), &p).await.unwrap();
            assert_eq!(fake.writes.lock().unwrap().len(), 1, "{what}: rewritten");
            assert_eq!(fake.held.lock().unwrap()[&name], right, "{what}");
        }
    }
}
