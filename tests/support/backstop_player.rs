//! Plays EventBridge Scheduler for the backstop tests. MiniStack stores
//! schedules but does not run universal targets
//! (`arn:aws:scheduler:::aws-sdk:eks:…`), so this does what Scheduler
//! would: for every one-time schedule of a group whose `at(...)` time has
//! passed, make the EKS call its target ARN names with its `Input` as the
//! request (through aws-sdk-eks against MiniStack), then delete the
//! schedule as `ActionAfterCompletion = DELETE` says. What a schedule would
//! do is what gets executed, so a wrong target or input fails the test.

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_sdk_eks::types::{AccessScope, AccessScopeType};
use serde_json::Value;
use std::collections::BTreeSet;
use time::OffsetDateTime;

use super::ministack::MiniStack;

/// One schedule as Scheduler holds it.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub name: String,
    pub expression: String,
    pub at: Option<OffsetDateTime>,
    pub timezone: Option<String>,
    pub target_arn: String,
    pub role_arn: String,
    pub input: Value,
    pub flexible_window_off: bool,
    pub delete_after_completion: bool,
    pub description: Option<String>,
    /// `ENABLED` / `DISABLED`: a disabled schedule never runs.
    pub state: Option<String>,
    /// The target's RetryPolicy: (maximum event age s, maximum attempts).
    pub retry: Option<(i32, i32)>,
}

/// What playing one schedule did.
#[derive(Debug)]
pub struct Played {
    pub name: String,
    pub action: String,
    /// The EKS call's error, if it failed (Scheduler would retry it).
    pub error: Option<String>,
}

pub struct Player {
    pub scheduler: aws_sdk_scheduler::Client,
    pub eks: aws_sdk_eks::Client,
    pub group: String,
}

impl Player {
    pub async fn new(ms: &MiniStack, group: &str) -> Player {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&ms.endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .load()
            .await;
        Player {
            scheduler: aws_sdk_scheduler::Client::new(&config),
            eks: aws_sdk_eks::Client::new(&config),
            group: group.to_string(),
        }
    }

    pub async fn create_group(&self) {
        self.scheduler
            .create_schedule_group()
            .name(&self.group)
            .send()
            .await
            .unwrap_or_else(|e| panic!("CreateScheduleGroup: {e:?}"));
    }

    /// Every schedule of the group, read back one by one with GetSchedule.
    pub async fn schedules(&self) -> Vec<Schedule> {
        let mut names = BTreeSet::new();
        let mut token = None;
        loop {
            let page = self
                .scheduler
                .list_schedules()
                .group_name(&self.group)
                .set_next_token(token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("ListSchedules: {e:?}"));
            for s in page.schedules() {
                if let Some(n) = s.name() {
                    names.insert(n.to_string());
                }
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for name in names {
            let got = match self
                .scheduler
                .get_schedule()
                .group_name(&self.group)
                .name(&name)
                .send()
                .await
            {
                Ok(got) => got,
                // Deleted between the listing and the read.
                Err(e)
                    if aws_sdk_scheduler::error::ProvideErrorMetadata::code(&e)
                        == Some("ResourceNotFoundException") =>
                {
                    continue
                }
                Err(e) => panic!("GetSchedule {name}: {e:?}"),
            };
            let target = got.target().expect("a schedule has a target");
            let expression = got.schedule_expression().unwrap_or_default().to_string();
            out.push(Schedule {
                at: tollgate::domain::backstop::parse_at(&expression),
                expression,
                timezone: got.schedule_expression_timezone().map(str::to_string),
                target_arn: target.arn().to_string(),
                role_arn: target.role_arn().to_string(),
                input: target
                    .input()
                    .map(|i| serde_json::from_str(i).unwrap_or_else(|e| panic!("Input {i}: {e}")))
                    .unwrap_or(Value::Null),
                flexible_window_off: got
                    .flexible_time_window()
                    .is_some_and(|w| w.mode().as_str() == "OFF"),
                delete_after_completion: got
                    .action_after_completion()
                    .is_some_and(|a| a.as_str() == "DELETE"),
                description: got.description().map(str::to_string),
                state: got.state().map(|s| s.as_str().to_string()),
                retry: target.retry_policy().map(|r| {
                    (
                        r.maximum_event_age_in_seconds().unwrap_or(-1),
                        r.maximum_retry_attempts().unwrap_or(-1),
                    )
                }),
                name,
            });
        }
        out
    }

    /// Plays every schedule due at `now`, as Scheduler would at that time.
    pub async fn play_due(&self, now: OffsetDateTime) -> Vec<Played> {
        let mut played = Vec::new();
        for s in self.schedules().await {
            let Some(at) = s.at else {
                panic!("{} is not a one-time schedule: {}", s.name, s.expression);
            };
            assert_eq!(
                s.timezone.as_deref().unwrap_or("UTC"),
                "UTC",
                "{}: at() is read in the schedule's time zone",
                s.name
            );
            if at > now || s.state.as_deref() == Some("DISABLED") {
                continue;
            }
            let error = self.call(&s).await.err();
            if s.delete_after_completion {
                self.scheduler
                    .delete_schedule()
                    .group_name(&self.group)
                    .name(&s.name)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("DeleteSchedule {}: {e:?}", s.name));
            }
            played.push(Played {
                name: s.name.clone(),
                action: s.target_arn.clone(),
                error,
            });
        }
        played
    }

    /// The EKS call a universal target names, with its Input as the request.
    /// Scheduler's universal targets take the AWS SDK's member names
    /// (PascalCase: `ClusterName`, `AccessScope.Type`), with enum values as
    /// the API spells them (`cluster`, `namespace`). Input must hold
    /// exactly the request's members in that casing: a REST wire name
    /// (`clusterName`) or any unknown member fails the target's call, as
    /// the real service would refuse it, and the failure is reported like
    /// an EKS error.
    pub async fn call(&self, s: &Schedule) -> Result<(), String> {
        let action = s
            .target_arn
            .strip_prefix("arn:aws:scheduler:::aws-sdk:eks:")
            .unwrap_or_else(|| panic!("{}: not an EKS universal target", s.target_arn));
        let input = check_input(action, &s.input)?;
        let field = |k: &str| input[k].as_str().unwrap_or_default().to_string();
        let describe = |e: &dyn std::fmt::Debug| format!("{e:?}");
        match action {
            "deleteAccessEntry" => self
                .eks
                .delete_access_entry()
                .cluster_name(field("ClusterName"))
                .principal_arn(field("PrincipalArn"))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
            "disassociateAccessPolicy" => self
                .eks
                .disassociate_access_policy()
                .cluster_name(field("ClusterName"))
                .principal_arn(field("PrincipalArn"))
                .policy_arn(field("PolicyArn"))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e)),
            "associateAccessPolicy" => {
                let scope = &input["AccessScope"];
                let kind = match scope["Type"].as_str() {
                    Some("cluster") => AccessScopeType::Cluster,
                    _ => AccessScopeType::Namespace,
                };
                let namespaces = scope["Namespaces"].as_array().map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                });
                self.eks
                    .associate_access_policy()
                    .cluster_name(field("ClusterName"))
                    .principal_arn(field("PrincipalArn"))
                    .policy_arn(field("PolicyArn"))
                    .access_scope(
                        AccessScope::builder()
                            .r#type(kind)
                            .set_namespaces(namespaces)
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| describe(&e))
            }
            other => panic!("the backstop never targets eks:{other}"),
        }
    }
}

/// Checks a universal target's Input against the EKS request it names, as
/// Scheduler's call would: exactly the required members, in the SDK's
/// PascalCase, strings where strings go, and an `AccessScope` of `Type`
/// `cluster` or `namespace` with optional `Namespaces`.
pub fn check_input<'a>(
    action: &str,
    input: &'a Value,
) -> Result<&'a serde_json::Map<String, Value>, String> {
    let obj = input
        .as_object()
        .ok_or_else(|| format!("{action}: Input is not a JSON object: {input}"))?;
    let members: &[&str] = match action {
        "deleteAccessEntry" => &["ClusterName", "PrincipalArn"],
        "disassociateAccessPolicy" => &["ClusterName", "PrincipalArn", "PolicyArn"],
        "associateAccessPolicy" => &["ClusterName", "PrincipalArn", "PolicyArn", "AccessScope"],
        other => return Err(format!("eks:{other} is not a backstop target")),
    };
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    let wanted: BTreeSet<&str> = members.iter().copied().collect();
    if keys != wanted {
        return Err(format!(
            "ValidationException: {action}: Input members {keys:?}, the request takes {wanted:?}"
        ));
    }
    for k in members.iter().filter(|k| **k != "AccessScope") {
        if !obj[*k].is_string() {
            return Err(format!(
                "ValidationException: {action}: {k} is not a string"
            ));
        }
    }
    if let Some(scope) = obj.get("AccessScope") {
        let scope = scope
            .as_object()
            .ok_or_else(|| format!("ValidationException: AccessScope {scope}"))?;
        if let Some(k) = scope.keys().find(|k| *k != "Type" && *k != "Namespaces") {
            return Err(format!(
                "ValidationException: AccessScope has no member {k}"
            ));
        }
        match scope.get("Type").and_then(Value::as_str) {
            Some("cluster") | Some("namespace") => {}
            other => return Err(format!("ValidationException: AccessScope.Type {other:?}")),
        }
        if let Some(ns) = scope.get("Namespaces") {
            if !ns
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string))
            {
                return Err(format!("ValidationException: AccessScope.Namespaces {ns}"));
            }
        }
    }
    Ok(obj)
}
