//! The backstop's adapter (spec 10.1): writes the EventBridge Scheduler
//! one-time schedules `domain::backstop::plan` decides, behind a small
//! trait so the access-entry converge can be tested without Scheduler.
//!
//! Every schedule carries this installation's mark in its description;
//! one with another mark is never updated or deleted.

use async_trait::async_trait;
use aws_sdk_scheduler::error::ProvideErrorMetadata;
use aws_sdk_scheduler::types::{
    ActionAfterCompletion, FlexibleTimeWindow, FlexibleTimeWindowMode, ScheduleState, Target,
};
use std::sync::Arc;

use super::aws::{describe_error, AwsClients};
use super::AccessError;
use crate::domain::backstop::{description, parse_at, Backstop, BackstopPlan, Planned};
use crate::domain::policy::ClusterPolicy;

/// A schedule as Scheduler holds it: what Tollgate compares before writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub description: Option<String>,
    pub expression: Option<String>,
    pub target_arn: String,
    pub role_arn: String,
    pub input: Option<String>,
}

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
}

fn aws_error<E: std::error::Error>(
    cluster: &ClusterPolicy,
    operation: &'static str,
    e: &E,
) -> AccessError {
    AccessError::Aws {
        cluster: cluster.name.clone(),
        operation,
        message: describe_error(e),
    }
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
        .build()
        .map_err(|e| aws_error(cluster, "CreateSchedule", &e))
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
                    // Created meanwhile (another replica's converge of an
                    // earlier state): replace it with this one.
                    if !self.schedules.create(cluster, &wanted).await? {
                        self.schedules.update(cluster, &wanted).await?;
                    }
                }
                Some(e) if e.description.as_deref() != Some(mark.as_str()) => {
                    self.foreign(cluster, &backstop.group, &planned.name);
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
                Some(e) if e.description.as_deref() != Some(mark.as_str()) => {
                    self.foreign(cluster, &backstop.group, name);
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

    fn foreign(&self, cluster: &ClusterPolicy, group: &str, name: &str) {
        tracing::warn!(
            cluster = %cluster.name,
            group,
            schedule = name,
            "a schedule with this name does not carry this installation's mark; left alone"
        );
    }
}

/// Whether the schedule already says exactly what is wanted (time compared
/// as an instant, input as JSON, so formatting differences do not count).
fn same(e: &Existing, w: &Wanted<'_>) -> bool {
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    e.expression.as_deref().and_then(parse_at) == Some(w.planned.at)
        && e.target_arn == w.planned.target_arn
        && e.role_arn == w.role_arn
        && e.input.as_deref().and_then(json) == json(&w.planned.input)
}
