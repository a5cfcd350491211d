//! The `access-entry` strategy: EKS access entries and access-policy
//! associations, converged from the set of grants in force.

use async_trait::async_trait;
use aws_sdk_eks::error::ProvideErrorMetadata;
use aws_sdk_eks::types::{AccessScope, AccessScopeType};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::aws::{aws_error, AwsClients};
use super::backstop::{AwsSchedules, Backstops, Schedules};
use super::{store_knows, AccessEngine, AccessError, Converged, Holds, InForce, Look, Owned};
use crate::config::DEFAULT_INSTANCE;
use crate::domain::backstop;
use crate::domain::grant::{
    desired_policies, entry_mark, left_in_place, narrows, plan_associations, scope_covers,
    EntryMark, Scope,
};
use crate::domain::policy::ClusterPolicy;
use crate::domain::readback::{self, ReadBack};
use crate::domain::request::{AccessSpec, Intent};
use crate::domain::standing::{Association, RawEntry};
use crate::store::{AccessRecords, Store};

pub const TAG_MANAGED_BY: &str = "managed-by";
pub const TAG_MANAGED_BY_VALUE: &str = "tollgate";
pub const TAG_GRANT: &str = "tollgate-grant";
pub const TAG_INSTANCE: &str = "tollgate-instance";
/// The only entry type Tollgate creates; node, Fargate and Windows entries
/// are never removed, whatever their tags say.
pub const STANDARD: &str = "STANDARD";

pub struct AccessEntryStrategy {
    clients: Arc<AwsClients>,
    store: Arc<dyn AccessRecords>,
    instance: String,
    backstops: Backstops,
}

struct Entry {
    arn: Option<String>,
    tags: HashMap<String, String>,
    kubernetes_groups: Vec<String>,
    kind: Option<String>,
    username: Option<String>,
}

impl Entry {
    /// Whose marks it carries: none, this installation's, or another's.
    fn mark(&self, instance: &str) -> EntryMark {
        entry_mark(
            self.tags.get(TAG_MANAGED_BY).map(String::as_str),
            self.tags.get(TAG_INSTANCE).map(String::as_str),
            instance,
        )
    }

    /// Carries Tollgate's marks for this installation (or, made before
    /// installations were marked, for none). A mark is only a finding aid.
    fn marked_for(&self, instance: &str) -> bool {
        self.tags.get(TAG_MANAGED_BY).map(String::as_str) == Some(TAG_MANAGED_BY_VALUE)
            && self.tags.get(TAG_INSTANCE).is_none_or(|i| i == instance)
    }

    /// What a backstop `DeleteAccessEntry` target needs before the store is
    /// asked: the backstop role may delete only entries tagged with this
    /// installation's name (its policy's `aws:ResourceTag` condition), so an
    /// entry made before installations were marked, which `marked_for`
    /// still accepts, would make that delete fail at AccessDenied and leave
    /// the last association in place. Such an entry is disassociated.
    fn backstop_may_delete(&self, instance: &str, principal: &str) -> bool {
        self.marked_for(instance)
            && self.tags.get(TAG_INSTANCE).map(String::as_str) == Some(instance)
            && self.plain(principal)
    }

    /// Nothing on the entry was set by anyone but Tollgate: a standard
    /// entry with no Kubernetes groups and the user name EKS chose.
    fn plain(&self, principal: &str) -> bool {
        let username_ok = match self.username.as_deref() {
            None | Some("") => true,
            Some(u) => {
                Some(u) == crate::domain::standing::eks_default_username(principal).as_deref()
                    || u == principal
            }
        };
        self.kind.as_deref().is_none_or(|k| k == STANDARD)
            && self.kubernetes_groups.is_empty()
            && username_ok
    }
}

fn is_code<E: ProvideErrorMetadata>(e: &E, code: &str) -> bool {
    e.code() == Some(code)
}

fn to_aws_scope(scope: &Scope) -> AccessScope {
    match scope {
        Scope::Cluster => AccessScope::builder()
            .r#type(AccessScopeType::Cluster)
            .build(),
        Scope::Namespaces(ns) => AccessScope::builder()
            .r#type(AccessScopeType::Namespace)
            .set_namespaces(Some(ns.iter().cloned().collect()))
            .build(),
    }
}

/// An association as discovery reads it.
fn to_association(policy: String, scope: &Scope) -> Association {
    match scope {
        Scope::Cluster => Association {
            policy,
            scope: "cluster".into(),
            namespaces: Vec::new(),
        },
        Scope::Namespaces(ns) => Association {
            policy,
            scope: "namespace".into(),
            namespaces: ns.iter().cloned().collect(),
        },
    }
}

fn from_aws_scope(scope: Option<&AccessScope>) -> Scope {
    match scope {
        Some(s) if s.r#type() == Some(&AccessScopeType::Namespace) => {
            Scope::from_namespaces(s.namespaces().iter().cloned())
        }
        _ => Scope::Cluster,
    }
}

impl AccessEntryStrategy {
    pub fn new(clients: Arc<AwsClients>, store: Arc<dyn Store>) -> Self {
        let store: Arc<dyn AccessRecords> = Arc::new(store);
        let schedules = Arc::new(AwsSchedules::new(clients.clone()));
        AccessEntryStrategy {
            clients,
            store,
            instance: DEFAULT_INSTANCE.into(),
            backstops: Backstops::new(schedules, DEFAULT_INSTANCE),
        }
    }

    /// The installation name written on every entry (`[server] instance`).
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = instance.to_string();
        self.backstops = Backstops::new(self.backstops.schedules().clone(), instance);
        self
    }

    /// Where backstop schedules are written (EventBridge Scheduler unless
    /// a test says otherwise).
    pub fn with_schedules(mut self, schedules: Arc<dyn Schedules>) -> Self {
        self.backstops = Backstops::new(schedules, &self.instance);
        self
    }

    async fn describe_entry(
        &self,
        eks: &aws_sdk_eks::Client,
        cluster: &ClusterPolicy,
        principal: &str,
    ) -> Result<Option<Entry>, AccessError> {
        match eks
            .describe_access_entry()
            .cluster_name(&cluster.name)
            .principal_arn(principal)
            .send()
            .await
        {
            Ok(out) => {
                let entry = out.access_entry();
                Ok(Some(Entry {
                    arn: entry.and_then(|e| e.access_entry_arn()).map(str::to_string),
                    tags: entry.and_then(|e| e.tags()).cloned().unwrap_or_default(),
                    kubernetes_groups: entry
                        .map(|e| e.kubernetes_groups().to_vec())
                        .unwrap_or_default(),
                    kind: entry.and_then(|e| e.r#type()).map(str::to_string),
                    username: entry.and_then(|e| e.username()).map(str::to_string),
                }))
            }
            // EKS answers "not found" alike for a missing entry and a missing
            // cluster; only the first means "nothing granted". Taking a
            // renamed or wrong-region cluster for an empty one would record
            // a revoke that never happened.
            Err(e) if is_code(&e, "ResourceNotFoundException") => {
                eks.describe_cluster()
                    .name(&cluster.name)
                    .send()
                    .await
                    .map_err(|e| aws_error(cluster, "DescribeCluster", &e))?;
                Ok(None)
            }
            Err(e) => Err(aws_error(cluster, "DescribeAccessEntry", &e)),
        }
    }

    /// Creates the principal's entry, tagged as Tollgate's; false if one
    /// exists already (whoever made it).
    async fn create_entry(
        &self,
        eks: &aws_sdk_eks::Client,
        cluster: &ClusterPolicy,
        principal: &str,
        creator: &str,
    ) -> Result<bool, AccessError> {
        match eks
            .create_access_entry()
            .cluster_name(&cluster.name)
            .principal_arn(principal)
            .tags(TAG_MANAGED_BY, TAG_MANAGED_BY_VALUE)
            .tags(TAG_GRANT, creator)
            .tags(TAG_INSTANCE, &self.instance)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, "ResourceInUseException") => Ok(false),
            // Reported as the describe path reports it: a missing cluster
            // is a DescribeCluster error whichever call found out.
            Err(e) if is_code(&e, "ResourceNotFoundException") => {
                eks.describe_cluster()
                    .name(&cluster.name)
                    .send()
                    .await
                    .map_err(|e| aws_error(cluster, "DescribeCluster", &e))?;
                Err(aws_error(cluster, "CreateAccessEntry", &e))
            }
            Err(e) => Err(aws_error(cluster, "CreateAccessEntry", &e)),
        }
    }

    /// An entry Tollgate created names the grant that created it; once that
    /// grant has ended and others still use the entry, the tag is moved to
    /// one of them, so the entry stays provably Tollgate's even after the
    /// first grant's row is pruned from the store.
    async fn hand_over(
        &self,
        eks: &aws_sdk_eks::Client,
        cluster: &ClusterPolicy,
        principal: &str,
        entry: &mut Entry,
        grants: &[InForce<'_>],
        creator: &str,
    ) -> Result<(), AccessError> {
        let named = entry.tags.get(TAG_GRANT).cloned();
        let still_in_force = named
            .as_deref()
            .is_some_and(|n| grants.iter().any(|g| g.grant_id == n));
        if grants.is_empty()
            || still_in_force
            || !grants.iter().any(|g| g.grant_id == creator)
            || !entry.marked_for(&self.instance)
        {
            return Ok(());
        }
        let Some(arn) = entry.arn.clone() else {
            return Ok(());
        };
        let object = Intent::AccessEntry {
            principal: principal.to_string(),
        };
        if !store_knows(
            self.store.as_ref(),
            &cluster.name,
            named.as_deref(),
            &object,
        )
        .await?
        {
            return Ok(());
        }
        eks.tag_resource()
            .resource_arn(&arn)
            .tags(TAG_MANAGED_BY, TAG_MANAGED_BY_VALUE)
            .tags(TAG_GRANT, creator)
            .tags(TAG_INSTANCE, &self.instance)
            .send()
            .await
            .map_err(|e| aws_error(cluster, "TagResource", &e))?;
        entry.tags.insert(TAG_GRANT.into(), creator.into());
        entry
            .tags
            .insert(TAG_INSTANCE.into(), self.instance.clone());
        Ok(())
    }

    /// Whether this store says one of its grants created `e`, the entry of
    /// `principal` (the tag names the grant; its row recorded the entry).
    async fn store_created(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        e: &Entry,
    ) -> Result<bool, AccessError> {
        store_knows(
            self.store.as_ref(),
            &cluster.name,
            e.tags.get(TAG_GRANT).map(String::as_str),
            &Intent::AccessEntry {
                principal: principal.to_string(),
            },
        )
        .await
    }

    /// The backstop a converge leaves for `principal`: see
    /// `domain::backstop::plan`. `entry` is the principal's entry and
    /// whether this converge just created it.
    #[allow(clippy::too_many_arguments)] // one call site each: converge and the repair
    async fn backstop_plan(
        &self,
        cluster: &ClusterPolicy,
        b: &backstop::Backstop,
        principal: &str,
        grants: &[InForce<'_>],
        entry: Option<(&Entry, bool)>,
        current: &BTreeMap<String, Scope>,
        baselines: &crate::domain::grant::Baselines,
    ) -> Result<backstop::BackstopPlan, AccessError> {
        let entry_ours = match entry {
            Some((_, true)) => true,
            Some((e, false)) if e.backstop_may_delete(&self.instance, principal) => {
                self.store_created(cluster, principal, e).await?
            }
            _ => false,
        };
        let plan = backstop::plan(
            b,
            &backstop::Subject {
                instance: &self.instance,
                cluster: &cluster.name,
                principal,
            },
            &expiries_by_policy(grants),
            current,
            baselines,
            entry_ours,
        );
        tracing::debug!(cluster = %cluster.name, ?plan, "backstop plan");
        Ok(plan)
    }

    async fn associations(
        &self,
        eks: &aws_sdk_eks::Client,
        cluster: &ClusterPolicy,
        principal: &str,
    ) -> Result<BTreeMap<String, Scope>, AccessError> {
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let page = match eks
                .list_associated_access_policies()
                .cluster_name(&cluster.name)
                .principal_arn(principal)
                .set_next_token(token)
                .send()
                .await
            {
                Ok(page) => page,
                Err(e) if is_code(&e, "ResourceNotFoundException") => return Ok(out),
                Err(e) => return Err(aws_error(cluster, "ListAssociatedAccessPolicies", &e)),
            };
            for assoc in page.associated_access_policies() {
                if let Some(arn) = assoc.policy_arn() {
                    out.insert(arn.to_string(), from_aws_scope(assoc.access_scope()));
                }
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }
}

#[async_trait]
impl AccessEngine for AccessEntryStrategy {
    /// One ListAccessEntries (with its pages), then one DescribeAccessEntry
    /// per entry `look` includes: a pass over the principals the store knows
    /// costs that many reads, however many entries the cluster has.
    async fn owned(
        &self,
        cluster: &ClusterPolicy,
        look: Look<'_>,
    ) -> Result<Vec<Owned>, AccessError> {
        let eks = self.clients.eks(cluster).await;
        let mut principals = Vec::new();
        let mut token = None;
        loop {
            let page = eks
                .list_access_entries()
                .cluster_name(&cluster.name)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| aws_error(cluster, "ListAccessEntries", &e))?;
            principals.extend(page.access_entries().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for principal in principals.into_iter().filter(|p| look.includes(p)) {
            let Some(entry) = self.describe_entry(&eks, cluster, &principal).await? else {
                continue;
            };
            if entry.marked_for(&self.instance) {
                // What it holds, so the reconciler can tell what is more
                // than Tollgate made (one more read per marked entry).
                let policies = self
                    .associations(&eks, cluster, &principal)
                    .await?
                    .into_iter()
                    .map(|(policy, scope)| to_association(policy, &scope))
                    .collect();
                let holds = Holds::Entry(RawEntry {
                    principal: principal.clone(),
                    kind: entry.kind.clone().unwrap_or_else(|| STANDARD.into()),
                    username: entry.username.clone().filter(|u| !u.is_empty()),
                    groups: entry.kubernetes_groups.clone(),
                    policies,
                    grant_mark: entry.tags.get(TAG_GRANT).cloned(),
                });
                out.push(Owned {
                    holds: Some(holds),
                    grant_id: entry.tags.get(TAG_GRANT).cloned(),
                    instance: entry.tags.get(TAG_INSTANCE).cloned(),
                    intent: Some(Intent::AccessEntry {
                        principal: principal.clone(),
                    }),
                    principal,
                    object: "access entry".into(),
                });
            }
        }
        Ok(out)
    }

    async fn missing(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Vec<String>, AccessError> {
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        let eks = self.clients.eks(cluster).await;
        // Whoever made the entry: a grant on an entry that existed before
        // Tollgate is in place when its association is. One read when
        // nothing drifted (every pass, for every principal with a grant in
        // force); a missing entry reads as no associations.
        let current = self.associations(&eks, cluster, principal).await?;
        let missing: Vec<String> = grants
            .iter()
            .filter(|g| match &g.spec.policy_arn {
                Some(policy) => !current
                    .get(policy)
                    .is_some_and(|scope| scope_covers(scope, &g.spec.namespaces)),
                None => false,
            })
            .map(|g| g.grant_id.to_string())
            .collect();
        if !missing.is_empty() {
            // EKS says "not found" alike for a missing entry and a missing
            // cluster: a cluster renamed or in the wrong region is an
            // error, not drift (the describe checks the cluster when the
            // entry is not found).
            self.describe_entry(&eks, cluster, principal).await?;
        }
        Ok(missing)
    }

    /// DescribeAccessEntry, then ListAssociatedAccessPolicies: the revoked
    /// association must be gone down to what the grants in force and the
    /// recorded baseline still justify, and an entry Tollgate created that
    /// nothing needs must be gone too. Baselines seen restored here are
    /// forgotten; until then they stay, so a retry still knows them.
    async fn verify_removed(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        _revoked_id: &str,
        revoked: &AccessSpec,
        grants: &[InForce<'_>],
    ) -> Result<ReadBack, AccessError> {
        let eks = self.clients.eks(cluster).await;
        let entry = self.describe_entry(&eks, cluster, principal).await?;
        let current = match &entry {
            Some(_) => self.associations(&eks, cluster, principal).await?,
            None => BTreeMap::new(),
        };
        let desired = desired_policies(grants.iter().map(|g| g.spec));
        let baselines = self.store.baselines(&cluster.name, principal).await?;
        let mut findings = Vec::new();
        if let Some(policy) = &revoked.policy_arn {
            let justified = readback::justified_scope(policy, &desired, &baselines);
            findings.extend(readback::association_left(
                policy,
                &revoked.namespaces,
                current.get(policy),
                justified.as_ref(),
            ));
        }
        if let Some(e) = &entry {
            // What converge deletes, by the same rules: an entry the store
            // says Tollgate created, untouched by anyone else, holding no
            // association and owed none.
            let owed = plan_associations(&current, &desired, &baselines, &e.mark(&self.instance))
                .needs_entry;
            let should_be_gone = current.is_empty()
                && !owed
                && e.marked_for(&self.instance)
                && e.plain(principal)
                && self.store_created(cluster, principal, e).await?;
            findings.extend(readback::entry_left(true, should_be_gone));
        }
        let seen = ReadBack::from_findings(findings);
        if seen == ReadBack::Removed {
            let restored = readback::restored_baselines(&current, &desired, &baselines);
            if !restored.is_empty() {
                self.store
                    .forget_baselines(&cluster.name, principal, &restored)
                    .await?;
            }
        }
        Ok(seen)
    }

    /// Only schedules are written, and only for grants whose association
    /// a converge already made (a baseline is recorded for it): nothing
    /// here changes access. A baseline whose standing access someone
    /// removed meanwhile is rewritten first (spec 9.6), so no schedule
    /// restores it if Tollgate is gone by the time it fires.
    async fn backstop(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
    ) -> Result<Converged, AccessError> {
        let Some(b) = &cluster.backstop else {
            return Ok(Converged::default());
        };
        if grants.is_empty() {
            return Ok(Converged::default());
        }
        let eks = self.clients.eks(cluster).await;
        let entry = self.describe_entry(&eks, cluster, principal).await?;
        let current = match &entry {
            Some(_) => self.associations(&eks, cluster, principal).await?,
            None => BTreeMap::new(),
        };
        let mut baselines = self.store.baselines(&cluster.name, principal).await?;
        let gone = crate::domain::grant::vanished_baselines(&current, &baselines);
        if !gone.is_empty() {
            let desired = desired_policies(grants.iter().map(|g| g.spec));
            let (kept, forgot): (Vec<_>, Vec<_>) = gone
                .iter()
                .map(|g| g.policy.clone())
                .partition(|p| desired.contains_key(p));
            let none: crate::domain::grant::Baselines =
                kept.into_iter().map(|p| (p, None)).collect();
            if !none.is_empty() {
                self.store
                    .record_baselines(&cluster.name, principal, &none)
                    .await?;
            }
            if !forgot.is_empty() {
                self.store
                    .forget_baselines(&cluster.name, principal, &forgot)
                    .await?;
            }
            baselines = self.store.baselines(&cluster.name, principal).await?;
        }
        let Some(entry) = entry else {
            return Ok(Converged {
                baselines_gone: gone,
            });
        };
        let touched: Vec<InForce<'_>> = grants
            .iter()
            .filter(|g| {
                g.spec
                    .policy_arn
                    .as_ref()
                    .is_some_and(|p| baselines.contains_key(p))
            })
            .cloned()
            .collect();
        let plan = self
            .backstop_plan(
                cluster,
                b,
                principal,
                &touched,
                Some((&entry, false)),
                &current,
                &baselines,
            )
            .await?;
        self.backstops.put(cluster, b, &plan).await?;
        Ok(Converged {
            baselines_gone: gone,
        })
    }

    async fn converge(
        &self,
        cluster: &ClusterPolicy,
        principal: &str,
        grants: &[InForce<'_>],
        creator: &str,
    ) -> Result<Converged, AccessError> {
        let eks = self.clients.eks(cluster).await;
        let desired = desired_policies(grants.iter().map(|g| g.spec));
        // A grant usually finds no entry: creating it straight away saves
        // the describe calls that would only say so. An entry that exists
        // answers ResourceInUse, and is then read as before.
        let created = if grants.is_empty() {
            false
        } else {
            self.create_entry(&eks, cluster, principal, creator).await?
        };
        let mut entry = if created {
            Some(Entry {
                arn: None,
                tags: HashMap::from([
                    (TAG_MANAGED_BY.to_string(), TAG_MANAGED_BY_VALUE.to_string()),
                    (TAG_GRANT.to_string(), creator.to_string()),
                    (TAG_INSTANCE.to_string(), self.instance.clone()),
                ]),
                kubernetes_groups: Vec::new(),
                kind: Some(STANDARD.into()),
                username: None,
            })
        } else {
            self.describe_entry(&eks, cluster, principal).await?
        };
        let mark = match &entry {
            None => EntryMark::Absent,
            Some(_) if created => EntryMark::Ours,
            Some(e) => e.mark(&self.instance),
        };
        let current = match entry {
            Some(_) if !created => self.associations(&eks, cluster, principal).await?,
            _ => BTreeMap::new(),
        };
        let baselines = self.store.baselines(&cluster.name, principal).await?;
        let plan = plan_associations(&current, &desired, &baselines, &mark);
        tracing::debug!(cluster = %cluster.name, ?plan, "access-entry plan");
        // Refused before anything is recorded or changed: the entry came
        // back marked by another installation (CreateAccessEntry answered
        // ResourceInUse, so nothing was created either).
        if let Some(instance) = plan.other_installation {
            return Err(AccessError::OtherInstallation {
                cluster: cluster.name.clone(),
                principal: principal.to_string(),
                object: "the access entry".into(),
                instance,
            });
        }
        if let Some(e) = entry.as_mut().filter(|_| !created) {
            self.hand_over(&eks, cluster, principal, e, grants, creator)
                .await?;
        }
        for gone in &plan.gone {
            tracing::warn!(cluster = %cluster.name, %principal, policy = %gone.policy, scope = %gone.scope.describe(), "standing access recorded as a baseline was removed during the grant; not re-created");
        }

        if !plan.new_baselines.is_empty() {
            self.store
                .record_baselines(&cluster.name, principal, &plan.new_baselines)
                .await?;
        }
        // The backstop's schedules are written before the associations they
        // undo: a crash in between leaves a schedule whose call finds
        // nothing to undo (harmless), never an association with no
        // schedule, which is what the backstop exists to prevent.
        let mut schedules_failed = None;
        let backstop = match &cluster.backstop {
            Some(b) => {
                let mut all_baselines = baselines.clone();
                all_baselines.extend(plan.new_baselines.clone());
                let mut backstop_plan = self
                    .backstop_plan(
                        cluster,
                        b,
                        principal,
                        grants,
                        entry.as_ref().map(|e| (e, created)),
                        &current,
                        &all_baselines,
                    )
                    .await?;
                // A schedule is the last word on an association Tollgate
                // made: it is never deleted while the association it would
                // undo stays in place, whatever this plan chose not to
                // change. Only a removal, a restore, or a baseline seen
                // already restored lets it go.
                let left_in_place: Vec<String> =
                    left_in_place(&current, &desired, &all_baselines, &plan)
                        .iter()
                        .map(|p| {
                            backstop::schedule_name(&self.instance, &cluster.name, principal, p)
                        })
                        .collect();
                backstop_plan
                    .remove
                    .retain(|name| !left_in_place.contains(name));
                schedules_failed = self.backstops.put(cluster, b, &backstop_plan).await.err();
                Some((b, backstop_plan))
            }
            None => None,
        };
        if plan.needs_entry && entry.is_none() {
            self.create_entry(&eks, cluster, principal, creator).await?;
        }
        // Scheduler out of reach: nothing is granted or widened without its
        // schedule, but access is still narrowed and removed (a revoke never
        // waits on Scheduler), and the step then reports the failure so it
        // is retried until the schedules are right.
        for (policy, scope) in plan
            .associate
            .iter()
            .filter(|(p, s)| schedules_failed.is_none() || narrows(current.get(p), s))
        {
            eks.associate_access_policy()
                .cluster_name(&cluster.name)
                .principal_arn(principal)
                .policy_arn(policy)
                .access_scope(to_aws_scope(scope))
                .send()
                .await
                .map_err(|e| aws_error(cluster, "AssociateAccessPolicy", &e))?;
        }
        for policy in &plan.disassociate {
            match eks
                .disassociate_access_policy()
                .cluster_name(&cluster.name)
                .principal_arn(principal)
                .policy_arn(policy)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, "ResourceNotFoundException") => {}
                Err(e) => return Err(aws_error(cluster, "DisassociateAccessPolicy", &e)),
            }
        }
        if let Some(e) = schedules_failed {
            return Err(e);
        }
        // Before the baselines are forgotten: they are what names the
        // schedules to delete, so a crash here leaves them to the next pass.
        if let Some((b, backstop_plan)) = &backstop {
            self.backstops.remove(cluster, b, backstop_plan).await?;
        }
        if !plan.forget_baselines.is_empty() {
            self.store
                .forget_baselines(&cluster.name, principal, &plan.forget_baselines)
                .await?;
        }
        // A restore made just now is forgotten once a fresh read shows it
        // in place: a baseline left on record after its restore (a failed
        // grant's cleanup is never read back, an admin may change the
        // association later) would otherwise put back, or take away, access
        // that is no longer Tollgate's to touch. A restore that answered
        // success without taking effect reads as not in place and stays
        // recorded, so the next converge makes it again. Their schedules
        // went just above: every baseline no grant needs loses its schedule.
        let restoring: crate::domain::grant::Baselines = baselines
            .iter()
            .filter(|(p, _)| !desired.contains_key(*p) && !plan.forget_baselines.contains(*p))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect();
        if !restoring.is_empty() && (!plan.associate.is_empty() || !plan.disassociate.is_empty()) {
            let after = self.associations(&eks, cluster, principal).await?;
            let restored = readback::restored_baselines(&after, &desired, &restoring);
            if !restored.is_empty() {
                self.store
                    .forget_baselines(&cluster.name, principal, &restored)
                    .await?;
            }
        }
        // An entry goes only when Tollgate's store says this installation
        // created it (the tag names a grant whose row recorded the entry),
        // nothing at all is associated with it, and nothing on it was set
        // by anyone else. Tags alone prove nothing: anyone allowed to tag
        // can forge them.
        let deletable = match &entry {
            Some(e) if !plan.needs_entry && e.marked_for(&self.instance) && e.plain(principal) => {
                self.store_created(cluster, principal, e).await?
            }
            _ => false,
        };
        if deletable {
            let remaining = self.associations(&eks, cluster, principal).await?;
            if remaining.is_empty() {
                match eks
                    .delete_access_entry()
                    .cluster_name(&cluster.name)
                    .principal_arn(principal)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_code(&e, "ResourceNotFoundException") => {}
                    Err(e) => return Err(aws_error(cluster, "DeleteAccessEntry", &e)),
                }
            }
        }
        Ok(Converged {
            baselines_gone: plan.gone,
        })
    }
}

/// Per access policy, the expiries of the grants that need it.
fn expiries_by_policy(grants: &[InForce<'_>]) -> BTreeMap<String, Vec<time::OffsetDateTime>> {
    let mut out: BTreeMap<String, Vec<time::OffsetDateTime>> = BTreeMap::new();
    for g in grants {
        if let (Some(policy), Some(expires_at)) = (&g.spec.policy_arn, g.expires_at) {
            out.entry(policy.clone()).or_default().push(expires_at);
        }
    }
    out
}

/// The cluster's authentication mode, for `tollgate check`.
pub async fn authentication_mode(
    clients: &AwsClients,
    cluster: &ClusterPolicy,
) -> Result<Option<String>, AccessError> {
    let eks = clients.eks(cluster).await;
    let out = eks
        .describe_cluster()
        .name(&cluster.name)
        .send()
        .await
        .map_err(|e| aws_error(cluster, "DescribeCluster", &e))?;
    Ok(out
        .cluster()
        .and_then(|c| c.access_config())
        .and_then(|a| a.authentication_mode())
        .map(|m| m.as_str().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_narrowing_is_narrowing() {
        let ns = |n: &[&str]| Scope::from_namespaces(n.iter().copied());
        assert!(narrows(Some(&Scope::Cluster), &ns(&["a"])));
        assert!(narrows(Some(&ns(&["a", "b"])), &ns(&["a"])));
        assert!(!narrows(Some(&ns(&["a"])), &ns(&["a", "b"])));
        assert!(!narrows(Some(&ns(&["a"])), &Scope::Cluster));
        assert!(!narrows(None, &ns(&["a"])));
    }

    #[test]
    fn eks_default_username_is_recognised() {
        assert_eq!(
            crate::domain::standing::eks_default_username(
                "arn:aws:iam::111122223333:role/team/alice"
            )
            .as_deref(),
            Some("arn:aws:sts::111122223333:assumed-role/alice/{{SessionName}}")
        );
        assert_eq!(
            crate::domain::standing::eks_default_username("arn:aws:iam::111122223333:user/bob"),
            None
        );
        let entry = |username: Option<&str>, groups: &[&str], kind: &str| Entry {
            arn: None,
            tags: HashMap::new(),
            kubernetes_groups: groups.iter().map(|g| g.to_string()).collect(),
            kind: Some(kind.into()),
            username: username.map(str::to_string),
        };
        let alice = "arn:aws:iam::111122223333:role/alice";
        assert!(entry(None, &[], STANDARD).plain(alice));
        assert!(entry(
            Some("arn:aws:sts::111122223333:assumed-role/alice/{{SessionName}}"),
            &[],
            STANDARD
        )
        .plain(alice));
        assert!(!entry(Some("admin"), &[], STANDARD).plain(alice));
        assert!(!entry(None, &["system:masters"], STANDARD).plain(alice));
        assert!(!entry(None, &[], "EC2_LINUX").plain(alice));
    }

    #[test]
    fn the_backstop_deletes_only_entries_tagged_with_this_installation() {
        let alice = "arn:aws:iam::111122223333:role/alice";
        let entry = |tags: &[(&str, &str)]| Entry {
            arn: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kubernetes_groups: Vec::new(),
            kind: Some(STANDARD.into()),
            username: None,
        };
        let ours = entry(&[
            (TAG_MANAGED_BY, TAG_MANAGED_BY_VALUE),
            (TAG_INSTANCE, "tollgate"),
        ]);
        assert!(ours.backstop_may_delete("tollgate", alice));
        assert!(!ours.backstop_may_delete("other", alice));
        // Made before installations were marked: Tollgate's own converge
        // may still delete it, the backstop role may not.
        let legacy = entry(&[(TAG_MANAGED_BY, TAG_MANAGED_BY_VALUE)]);
        assert!(legacy.marked_for("tollgate"));
        assert!(!legacy.backstop_may_delete("tollgate", alice));
    }
}
