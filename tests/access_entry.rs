//! The `access-entry` strategy against MiniStack's EKS API: every test
//! converges through `AccessEntryStrategy` and then reads the cluster back
//! over the EKS REST API, so what is asserted is what EKS holds.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use serde_json::{json, Value};
use tempfile::TempDir;

use support::ministack::{encode_arn, MiniStack};
use tollgate::access::access_entry::AccessEntryStrategy;
use tollgate::access::{AccessEngine, AccessError, AwsClients, Converged, InForce, Look};
use tollgate::domain::grant::intents_for;
use tollgate::domain::policy::{ClusterPolicy, Strategy};
use tollgate::domain::readback::ReadBack;
use tollgate::domain::request::{AccessSpec, Asked, Request, RequestId, Requester};
use tollgate::store::{SledStore, Store};

const EDIT: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy";
const VIEW: &str = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy";
const ALICE: &str = "arn:aws:iam::000000000000:role/alice";

/// A type (`cluster` or `namespace`) and its namespaces, as EKS lists them.
type Assoc = (String, Vec<String>);

/// One MiniStack with one cluster, and the strategy under test with its own
/// store.
struct Harness {
    ms: MiniStack,
    cluster: ClusterPolicy,
    engine: AccessEntryStrategy,
    store: Arc<SledStore>,
    _store_dir: TempDir,
}

/// A row for grant `id`, with what granting it will create recorded, as
/// the grant step writes it before any create call.
fn recorded_row(id: &str, spec: &AccessSpec) -> Request {
    let mut row = Request::pending(
        Asked {
            id: RequestId::parse(id).expect("a request id"),
            requester: Requester {
                user_id: "U0ALICE".into(),
                email: "alice@example.com".into(),
                tz: None,
                tz_offset_secs: 0,
            },
            access: spec.clone(),
            reason: String::new(),
            duration: Duration::from_secs(3600),
            approval_timeout: Duration::from_secs(600),
            required_approvals: 1,
            response_url: None,
        },
        time::OffsetDateTime::now_utc(),
    );
    row.intents = intents_for(Strategy::AccessEntry, id, spec);
    row
}

/// One installation of the strategy: its own store and `[server] instance`.
fn installation(
    sdk: aws_config::SdkConfig,
    instance: &str,
) -> (AccessEntryStrategy, Arc<SledStore>, TempDir) {
    let store_dir = tempfile::tempdir().expect("temp dir for the store");
    let store = Arc::new(SledStore::open(store_dir.path()).expect("opening the sled store"));
    let engine = AccessEntryStrategy::new(Arc::new(AwsClients::new(sdk)), store.clone())
        .with_instance(instance);
    (engine, store, store_dir)
}

impl Harness {
    async fn new() -> Harness {
        let h = Harness::without_cluster("dev").await;
        h.ms.create_cluster("dev").await;
        h
    }

    /// The strategy pointed at a cluster named `name` that is not created.
    async fn without_cluster(name: &str) -> Harness {
        let ms = MiniStack::start();
        let sdk = sdk_for(&ms).await;
        let (engine, store, store_dir) = installation(sdk, "tollgate");
        Harness {
            ms,
            cluster: cluster_policy(name),
            engine,
            store,
            _store_dir: store_dir,
        }
    }

    /// Records grant `id` in the store as the grant step does before its
    /// first create call (once).
    async fn record(&self, id: &str, spec: &AccessSpec) {
        let rid = RequestId::parse(id).expect("a request id");
        if self.store.get(&rid).await.unwrap().is_none() {
            self.store
                .create(&recorded_row(id, spec), Vec::new())
                .await
                .unwrap();
        }
    }

    /// Converges ALICE to the given (grant id, spec) pairs; the first grant,
    /// or "none", is credited as creator.
    async fn converge(&self, grants: &[(&str, &AccessSpec)]) -> Result<Converged, AccessError> {
        let in_force: Vec<InForce> = grants
            .iter()
            .map(|(id, spec)| InForce {
                grant_id: id,
                spec,
                expires_at: None,
            })
            .collect();
        for (id, spec) in grants {
            self.record(id, spec).await;
        }
        let creator = grants.first().map_or("none", |(id, _)| id);
        self.engine
            .converge(&self.cluster, ALICE, &in_force, creator)
            .await
    }

    async fn converge_ok(&self, grants: &[(&str, &AccessSpec)]) -> Converged {
        match self.converge(grants).await {
            Ok(done) => done,
            Err(e) => panic!("converge failed: {e}\nMiniStack log:\n{}", self.ms.log()),
        }
    }

    /// The read-back after revoking grant `id` (`revoked`), with `rest`
    /// still in force.
    async fn verify(
        &self,
        id: &str,
        revoked: &AccessSpec,
        rest: &[(&str, &AccessSpec)],
    ) -> ReadBack {
        let in_force: Vec<InForce> = rest
            .iter()
            .map(|(id, spec)| InForce {
                grant_id: id,
                spec,
                expires_at: None,
            })
            .collect();
        self.engine
            .verify_removed(&self.cluster, ALICE, id, revoked, &in_force)
            .await
            .unwrap_or_else(|e| panic!("read-back failed: {e}"))
    }

    fn entry_path(&self) -> String {
        format!("/clusters/dev/access-entries/{}", encode_arn(ALICE))
    }

    /// ALICE's access entry as DescribeAccessEntry returns it, if any.
    async fn entry(&self) -> Option<Value> {
        let (status, body) = self.ms.eks_json("GET", &self.entry_path(), None).await;
        match status {
            200 => Some(body["accessEntry"].clone()),
            404 => None,
            _ => panic!("DescribeAccessEntry answered {status}: {body}"),
        }
    }

    /// ALICE's associations by policy ARN; empty when there is no entry.
    async fn associations(&self) -> BTreeMap<String, Assoc> {
        let path = format!("{}/access-policies", self.entry_path());
        let (status, body) = self.ms.eks_json("GET", &path, None).await;
        if status == 404 {
            return BTreeMap::new();
        }
        assert_eq!(status, 200, "ListAssociatedAccessPolicies: {body}");
        let list = body["associatedAccessPolicies"]
            .as_array()
            .unwrap_or_else(|| panic!("no associatedAccessPolicies in {body}"));
        list.iter()
            .map(|a| {
                let scope = &a["accessScope"];
                let namespaces = scope["namespaces"]
                    .as_array()
                    .map(|ns| ns.iter().map(|n| n.as_str().unwrap().to_string()))
                    .into_iter()
                    .flatten()
                    .collect();
                (
                    a["policyArn"].as_str().unwrap().to_string(),
                    (scope["type"].as_str().unwrap().to_string(), namespaces),
                )
            })
            .collect()
    }

    /// Someone other than Tollgate creates ALICE's entry, without tags.
    async fn create_entry_behind_tollgate(&self) {
        let (status, body) = self
            .ms
            .eks_json(
                "POST",
                "/clusters/dev/access-entries",
                Some(json!({"principalArn": ALICE, "type": "STANDARD"})),
            )
            .await;
        assert_eq!(status, 200, "CreateAccessEntry: {body}");
    }

    /// Someone other than Tollgate associates `policy`; no namespaces means
    /// cluster scope.
    async fn associate_behind_tollgate(&self, policy: &str, ns: &[&str]) {
        let scope = if ns.is_empty() {
            json!({"type": "cluster"})
        } else {
            json!({"type": "namespace", "namespaces": ns})
        };
        let path = format!("{}/access-policies", self.entry_path());
        let (status, body) = self
            .ms
            .eks_json(
                "POST",
                &path,
                Some(json!({"policyArn": policy, "accessScope": scope})),
            )
            .await;
        assert_eq!(status, 200, "AssociateAccessPolicy: {body}");
    }
}

/// The SDK pointed at `ms`.
async fn sdk_for(ms: &MiniStack) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&ms.endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(http)
        .load()
        .await
}

fn cluster_policy(name: &str) -> ClusterPolicy {
    ClusterPolicy {
        name: name.to_string(),
        region: "us-east-1".to_string(),
        account_id: "000000000000".to_string(),
        assume_role_arn: None,
        strategy: Strategy::AccessEntry,
        endpoint: None,
        ca_file: None,
        approval_channel: "#access".to_string(),
        dm_approvers: false,
        default_role: None,
        roles: BTreeMap::new(),
        break_glass: None,
        reconcile_interval: Duration::from_secs(300),
        backstop: None,
    }
}

fn spec(policy: &str, ns: &[&str]) -> AccessSpec {
    AccessSpec {
        cluster: "dev".to_string(),
        role: "r".to_string(),
        principal: ALICE.to_string(),
        policy_arn: Some(policy.to_string()),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        cluster_role: None,
        groups: vec![],
        k8s_user: None,
        strategy: None,
    }
}

fn cluster_scope() -> Assoc {
    ("cluster".to_string(), vec![])
}

fn namespaces(ns: &[&str]) -> Assoc {
    (
        "namespace".to_string(),
        ns.iter().map(|s| s.to_string()).collect(),
    )
}

fn only(policy: &str, assoc: Assoc) -> BTreeMap<String, Assoc> {
    BTreeMap::from([(policy.to_string(), assoc)])
}

#[tokio::test]
async fn grant_is_idempotent_and_revoke_removes_what_tollgate_created() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &[]);

    h.converge_ok(&[("R-00001", &edit)]).await;
    let entry = h.entry().await.expect("entry created by the grant");
    assert_eq!(
        entry["tags"],
        json!({"managed-by": "tollgate", "tollgate-grant": "R-00001", "tollgate-instance": "tollgate"}),
        "{entry}"
    );
    assert_eq!(h.associations().await, only(EDIT, cluster_scope()));

    // Same grants again: the very same entry (its ARN carries a fresh uuid
    // on every create) with the same association.
    h.converge_ok(&[("R-00001", &edit)]).await;
    let again = h.entry().await.expect("entry kept by a repeated converge");
    assert_eq!(again["accessEntryArn"], entry["accessEntryArn"]);
    assert_eq!(again["tags"], entry["tags"]);
    assert_eq!(h.associations().await, only(EDIT, cluster_scope()));

    h.converge_ok(&[]).await;
    assert_eq!(
        h.entry().await,
        None,
        "entry Tollgate created outlived revoke"
    );
    assert!(h.associations().await.is_empty());

    h.converge_ok(&[]).await;
    assert_eq!(h.entry().await, None);
}

#[tokio::test]
async fn namespaced_grant_is_associated_with_exactly_those_namespaces() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &["payments", "web"]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(
        h.associations().await,
        only(EDIT, namespaces(&["payments", "web"]))
    );
}

#[tokio::test]
async fn preexisting_entry_and_other_policies_are_left_alone() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(VIEW, &[]).await;
    let before = h.entry().await.unwrap();

    let edit = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(
        h.associations().await,
        BTreeMap::from([
            (VIEW.to_string(), cluster_scope()),
            (EDIT.to_string(), namespaces(&["a"])),
        ])
    );

    h.converge_ok(&[]).await;
    let after = h.entry().await.expect("pre-existing entry deleted");
    assert_eq!(after["accessEntryArn"], before["accessEntryArn"]);
    assert_eq!(
        after["tags"],
        json!({}),
        "Tollgate tagged an entry it did not create"
    );
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));
}

#[tokio::test]
async fn tollgate_entry_stays_while_someone_else_uses_it() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &[]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(h.entry().await.unwrap()["tags"]["managed-by"], "tollgate");

    h.associate_behind_tollgate(VIEW, &[]).await;
    h.converge_ok(&[]).await;
    assert!(
        h.entry().await.is_some(),
        "entry deleted with View still on it"
    );
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));
}

#[tokio::test]
async fn overlapping_namespaced_grants_are_unioned_and_shrink_as_they_end() {
    let h = Harness::new().await;
    let a = spec(EDIT, &["a"]);
    let b = spec(EDIT, &["b"]);

    h.converge_ok(&[("R-0000A", &a)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["a"])));

    h.converge_ok(&[("R-0000A", &a), ("R-0000B", &b)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["a", "b"])));

    h.converge_ok(&[("R-0000B", &b)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["b"])));

    h.converge_ok(&[]).await;
    assert!(h.associations().await.is_empty());
    assert_eq!(h.entry().await, None);
}

#[tokio::test]
async fn overlapping_cluster_grants_keep_the_policy_until_the_last_ends() {
    let h = Harness::new().await;
    let first = spec(VIEW, &[]);
    let second = spec(VIEW, &[]);

    h.converge_ok(&[("R-00001", &first), ("R-00002", &second)])
        .await;
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));

    let entry = h.entry().await.expect("entry");
    assert_eq!(entry["tags"]["tollgate-grant"], "R-00001");

    h.converge_ok(&[("R-00002", &second)]).await;
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));
    // The grant that created the entry has ended: the entry now names one
    // that still uses it, so it stays provably Tollgate's even once the
    // first grant's row is pruned.
    // Read through ListTagsForResource: MiniStack's DescribeAccessEntry
    // keeps showing the tags the entry was created with.
    let entry = h.entry().await.expect("entry kept");
    let arn = entry["accessEntryArn"].as_str().unwrap();
    let (status, tags) =
        h.ms.eks_json("GET", &format!("/tags/{}", encode_arn(arn)), None)
            .await;
    assert_eq!(status, 200, "{tags}");
    assert_eq!(tags["tags"]["tollgate-grant"], "R-00002", "{tags}");
    assert_eq!(tags["tags"]["managed-by"], "tollgate");

    h.converge_ok(&[]).await;
    assert!(h.associations().await.is_empty());
    assert_eq!(h.entry().await, None);
}

#[tokio::test]
async fn preexisting_namespaced_association_is_widened_then_restored() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;

    let edit = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["a", "x"])));

    h.converge_ok(&[]).await;
    assert!(h.entry().await.is_some(), "pre-existing entry deleted");
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["x"])));
}

#[tokio::test]
async fn preexisting_cluster_association_survives_a_namespaced_grant() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &[]).await;

    let edit = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(h.associations().await, only(EDIT, cluster_scope()));

    h.converge_ok(&[]).await;
    assert!(h.entry().await.is_some(), "pre-existing entry deleted");
    assert_eq!(h.associations().await, only(EDIT, cluster_scope()));
    // The converge saw the baseline in place and forgot it; the read-back
    // must still take the cluster-wide association for what it is.
    assert_eq!(h.verify("R-00001", &edit, &[]).await, ReadBack::Removed);
}

/// A failed grant's cleanup is never read back: its converge forgets the
/// baselines it restored once a fresh read shows them in place, so none is
/// left on record to put standing access back later; one whose restore did
/// not take effect stays, and the next converge makes it again.
#[tokio::test]
async fn a_cleanup_forgets_the_baselines_it_restored() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &on_a)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["a", "x"])));
    h.converge_ok(&[]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["x"])));
    assert!(
        h.store.baselines("dev", ALICE).await.unwrap().is_empty(),
        "a baseline seen restored stayed on record"
    );
    // An admin then removes the standing association: a later grant's
    // end must not put it back.
    let path = format!("{}/access-policies/{}", h.entry_path(), encode_arn(EDIT));
    let (status, body) = h.ms.eks_json("DELETE", &path, None).await;
    assert_eq!(status, 200, "DisassociateAccessPolicy: {body}");
    let view = spec(VIEW, &[]);
    h.converge_ok(&[("R-00002", &view)]).await;
    h.converge_ok(&[]).await;
    assert!(
        !h.associations().await.contains_key(EDIT),
        "standing access an admin removed was put back"
    );
}

/// Every way a baseline can be forgotten before (or by) the read-back: the
/// revoke must still verify, never report the pre-Tollgate association as
/// the revoked grant's access.
#[tokio::test]
async fn a_revoke_over_a_baseline_verifies_once_the_baseline_is_forgotten() {
    // A namespaced baseline with a grant on the same namespace.
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_x = spec(EDIT, &["x"]);
    h.converge_ok(&[("R-00001", &on_x)]).await;
    h.converge_ok(&[]).await;
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert_eq!(h.verify("R-00001", &on_x, &[]).await, ReadBack::Removed);
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["x"])));

    // A cluster-wide grant over a namespaced baseline, its first read-back
    // lost: the retry's converge finds the restore in place and forgets it.
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let wide = spec(EDIT, &[]);
    h.converge_ok(&[("R-00002", &wide)]).await;
    h.converge_ok(&[]).await;
    h.converge_ok(&[]).await;
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert_eq!(h.verify("R-00002", &wide, &[]).await, ReadBack::Removed);

    // A crash after the read-back forgot the restored baseline: the revoke
    // step runs again, converge and read-back both.
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00003", &on_a)]).await;
    h.converge_ok(&[]).await;
    assert_eq!(h.verify("R-00003", &on_a, &[]).await, ReadBack::Removed);
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    h.converge_ok(&[]).await;
    assert_eq!(h.verify("R-00003", &on_a, &[]).await, ReadBack::Removed);
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["x"])));
}

#[tokio::test]
async fn missing_cluster_is_an_error_for_grant_and_revoke_alike() {
    let h = Harness::without_cluster("no-such-cluster").await;
    let edit = spec(EDIT, &[]);
    for grants in [vec![("R-00001", &edit)], vec![]] {
        let err = h
            .converge(&grants)
            .await
            .expect_err("converging on a cluster that does not exist succeeded");
        // A revoke that "succeeds" on a renamed or wrong-region cluster would
        // record access as gone while it is still in place.
        let message = err.to_string();
        assert!(
            message.starts_with("DescribeCluster on no-such-cluster failed: "),
            "{message}"
        );
        assert!(message.contains("ResourceNotFoundException"), "{message}");
        assert!(
            matches!(&err, AccessError::Aws { cluster, operation: "DescribeCluster", .. }
                if cluster == "no-such-cluster"),
            "{err:?}"
        );
    }
    let (_, listed) = h.ms.eks_json("GET", "/clusters", None).await;
    assert_eq!(
        listed["clusters"],
        json!([]),
        "a cluster appeared: {listed}"
    );
}

#[tokio::test]
async fn tollgate_entry_stays_while_someone_maps_groups_onto_it() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &[]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    let (status, body) =
        h.ms.eks_json(
            "POST",
            &h.entry_path(),
            Some(json!({"kubernetesGroups": ["devs"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    h.converge_ok(&[]).await;
    let entry = h
        .entry()
        .await
        .expect("entry deleted with a group mapping on it");
    assert_eq!(entry["kubernetesGroups"], json!(["devs"]));
    assert!(h.associations().await.is_empty());
}

#[tokio::test]
async fn owned_lists_only_what_carries_tollgate_tags() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-AAAAA", &edit)]).await;
    let someone = "arn:aws:iam::000000000000:role/someone-else";
    let (status, body) =
        h.ms.eks_json(
            "POST",
            "/clusters/dev/access-entries",
            Some(json!({"principalArn": someone, "type": "STANDARD"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let owned = h.engine.owned(&h.cluster, Look::Everything).await.unwrap();
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!(owned[0].principal, ALICE);
    assert_eq!(owned[0].grant_id.as_deref(), Some("R-AAAAA"));
}

#[tokio::test]
async fn a_narrow_listing_reads_only_the_principals_asked_for() {
    let h = Harness::new().await;
    h.converge_ok(&[("R-AAAAA", &spec(EDIT, &["a"]))]).await;
    let other = "arn:aws:iam::000000000000:role/other";
    put_entry(
        &h,
        other,
        json!({"tags": {"managed-by": "tollgate", "tollgate-grant": "R-BBBBB"}}),
    )
    .await;
    let everything = h.engine.owned(&h.cluster, Look::Everything).await.unwrap();
    let mut all: Vec<&str> = everything.iter().map(|o| o.principal.as_str()).collect();
    all.sort();
    assert_eq!(all, vec![ALICE, other]);
    let alice_only = std::collections::BTreeSet::from([ALICE.to_string()]);
    let narrow = h
        .engine
        .owned(&h.cluster, Look::Principals(&alice_only))
        .await
        .unwrap();
    let principals: Vec<&str> = narrow.iter().map(|o| o.principal.as_str()).collect();
    assert_eq!(principals, vec![ALICE]);
}

/// Creates an entry by hand with whatever `extra` says (type, tags, groups).
async fn put_entry(h: &Harness, principal: &str, extra: Value) {
    let mut body = json!({"principalArn": principal, "type": "STANDARD"});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let (status, json) =
        h.ms.eks_json("POST", "/clusters/dev/access-entries", Some(body))
            .await;
    assert_eq!(status, 200, "{json}");
}

async fn exists(h: &Harness, principal: &str) -> bool {
    let path = format!("/clusters/dev/access-entries/{}", encode_arn(principal));
    h.ms.eks_json("GET", &path, None).await.0 == 200
}

#[tokio::test]
async fn only_plain_entries_the_store_created_are_ever_deleted() {
    let h = Harness::new().await;
    let marks = |grant: &str| json!({"managed-by": "tollgate", "tollgate-grant": grant, "tollgate-instance": "tollgate"});
    let node = "arn:aws:iam::000000000000:role/eks-node";
    let masters = "arn:aws:iam::000000000000:role/masters";
    let admins = "arn:aws:iam::000000000000:role/admins";
    let ghost = "arn:aws:iam::000000000000:role/ghost";
    // Even with the store knowing the grant each tag names (the strongest
    // forgery: a real grant id of that principal), an entry of another
    // type, with groups, or with an association Tollgate did not make is
    // never deleted.
    for (principal, grant) in [(node, "R-00001"), (masters, "R-00002"), (admins, "R-00003")] {
        let mut s = spec(VIEW, &[]);
        s.principal = principal.to_string();
        h.record(grant, &s).await;
    }
    put_entry(
        &h,
        node,
        json!({"type": "EC2_LINUX", "tags": marks("R-00001")}),
    )
    .await;
    put_entry(
        &h,
        masters,
        json!({"kubernetesGroups": ["system:masters"], "tags": marks("R-00002")}),
    )
    .await;
    put_entry(&h, admins, json!({"tags": marks("R-00003")})).await;
    let path = format!(
        "/clusters/dev/access-entries/{}/access-policies",
        encode_arn(admins)
    );
    let admin_policy = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy";
    let (status, body) =
        h.ms.eks_json(
            "POST",
            &path,
            Some(json!({"policyArn": admin_policy, "accessScope": {"type": "cluster"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // And a plain entry whose tag names a grant the store never issued.
    put_entry(&h, ghost, json!({"tags": marks("R-GH0ST")})).await;

    for principal in [node, masters, admins, ghost] {
        for _ in 0..2 {
            h.engine
                .converge(&h.cluster, principal, &[], "none")
                .await
                .unwrap();
        }
        assert!(exists(&h, principal).await, "{principal} was deleted");
    }
    let (_, body) = h.ms.eks_json("GET", &path, None).await;
    assert_eq!(
        body["associatedAccessPolicies"][0]["policyArn"], admin_policy,
        "an association Tollgate did not make is never disassociated"
    );
}

#[tokio::test]
async fn another_installations_entries_are_not_listed() {
    let h = Harness::new().await;
    let blue = "arn:aws:iam::000000000000:role/blue";
    let legacy = "arn:aws:iam::000000000000:role/legacy";
    put_entry(
        &h,
        blue,
        json!({"tags": {"managed-by": "tollgate", "tollgate-grant": "R-00001", "tollgate-instance": "blue"}}),
    )
    .await;
    put_entry(
        &h,
        legacy,
        json!({"tags": {"managed-by": "tollgate", "tollgate-grant": "R-00002"}}),
    )
    .await;
    let owned = h.engine.owned(&h.cluster, Look::Everything).await.unwrap();
    let principals: Vec<&str> = owned.iter().map(|o| o.principal.as_str()).collect();
    assert_eq!(principals, vec![legacy], "{owned:?}");
    assert_eq!(owned[0].instance, None);

    // What this installation creates carries its name.
    h.converge_ok(&[("R-00003", &spec(VIEW, &[]))]).await;
    let entry = h.entry().await.expect("ours");
    assert_eq!(entry["tags"]["tollgate-instance"], "tollgate");
}

#[tokio::test]
async fn missing_looks_at_what_each_grant_needs() {
    let h = Harness::new().await;
    // Alice's entry existed before Tollgate.
    put_entry(&h, ALICE, json!({})).await;
    let view = spec(VIEW, &[]);
    let edit_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &view), ("R-00002", &edit_a)])
        .await;
    let grants = [
        InForce {
            grant_id: "R-00001",
            spec: &view,
            expires_at: None,
        },
        InForce {
            grant_id: "R-00002",
            spec: &edit_a,
            expires_at: None,
        },
    ];
    let missing = h.engine.missing(&h.cluster, ALICE, &grants).await.unwrap();
    assert!(
        missing.is_empty(),
        "in place on a pre-existing entry: {missing:?}"
    );

    // The edit association removed by hand: only that grant is missing.
    let path = format!("{}/access-policies/{}", h.entry_path(), encode_arn(EDIT));
    let (status, body) = h.ms.eks_json("DELETE", &path, None).await;
    assert_eq!(status, 200, "{body}");
    let missing = h.engine.missing(&h.cluster, ALICE, &grants).await.unwrap();
    assert_eq!(missing, vec!["R-00002".to_string()]);

    // The entry deleted by hand: both.
    let (status, body) = h.ms.eks_json("DELETE", &h.entry_path(), None).await;
    assert_eq!(status, 200, "{body}");
    let missing = h.engine.missing(&h.cluster, ALICE, &grants).await.unwrap();
    assert_eq!(missing, vec!["R-00001".to_string(), "R-00002".to_string()]);
}

/// The read-back after a revoke (spec 10.2) judges only what the revoked
/// grant alone gave: namespaces another grant in force or the baseline
/// (what existed before Tollgate) still justify are not its access; a
/// namespace of its own put back is.
#[tokio::test]
async fn read_back_judges_only_what_the_revoked_grant_alone_gave() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let a = spec(EDIT, &["a", "x"]);
    let b = spec(EDIT, &["b"]);
    h.converge_ok(&[("R-0000A", &a), ("R-0000B", &b)]).await;
    assert_eq!(
        h.associations().await,
        only(EDIT, namespaces(&["a", "b", "x"]))
    );
    let (a, b) = (&a, &b);
    h.converge_ok(&[("R-0000B", b)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["b", "x"])));
    assert_eq!(
        h.verify("R-0000A", a, &[("R-0000B", b)]).await,
        ReadBack::Removed,
        "b is the other grant's, x the baseline's"
    );

    // What a DisassociateAccessPolicy that answered success but did
    // nothing leaves: the revoked grant's namespace still there.
    h.associate_behind_tollgate(EDIT, &["a", "b", "x"]).await;
    match h.verify("R-0000A", a, &[("R-0000B", b)]).await {
        ReadBack::StillThere(found) => assert_eq!(
            found,
            vec![format!("{EDIT} still associated for namespaces a")]
        ),
        other => panic!("{other:?}"),
    }
    // The baseline is still known, so the next converge puts it right.
    h.converge_ok(&[("R-0000B", b)]).await;
    assert_eq!(
        h.verify("R-0000A", a, &[("R-0000B", b)]).await,
        ReadBack::Removed
    );

    // The last grant ends: the baseline is restored, seen in place by a
    // fresh read, and only then forgotten.
    h.converge_ok(&[]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["x"])));
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert_eq!(h.verify("R-0000B", b, &[]).await, ReadBack::Removed);
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert!(h.entry().await.is_some(), "the entry was never Tollgate's");
}

/// Spec 9.6: standing access an admin removes while a grant is in force is
/// not put back when the grant ends. The baseline is forgotten and
/// reported (`baselines_gone`, which the service audits as
/// `baseline_gone` and tells the security channel).
#[tokio::test]
async fn standing_access_removed_during_a_grant_is_not_put_back() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &on_a)]).await;
    assert_eq!(h.associations().await, only(EDIT, namespaces(&["a", "x"])));

    // During the grant an admin removes the association (Tollgate's part
    // with it).
    let path = format!("{}/access-policies/{}", h.entry_path(), encode_arn(EDIT));
    let (status, body) = h.ms.eks_json("DELETE", &path, None).await;
    assert_eq!(status, 200, "DisassociateAccessPolicy: {body}");

    let done = h.converge_ok(&[]).await;
    assert_eq!(
        h.associations().await,
        BTreeMap::new(),
        "standing access removed during the grant was put back"
    );
    assert_eq!(done.baselines_gone.len(), 1, "{done:?}");
    assert_eq!(done.baselines_gone[0].policy, EDIT);
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert!(h.entry().await.is_some(), "the pre-existing entry stays");
    assert_eq!(h.verify("R-00001", &on_a, &[]).await, ReadBack::Removed);
    // Nothing comes back on a later pass either.
    let again = h.converge_ok(&[]).await;
    assert!(again.baselines_gone.is_empty());
    assert_eq!(h.associations().await, BTreeMap::new());
}

/// The same while the grant is still in force: the grant keeps its own
/// access, the baseline becomes "none", and its end removes only that.
#[tokio::test]
async fn standing_access_removed_mid_grant_is_forgotten_while_the_grant_goes_on() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &on_a)]).await;
    let path = format!("{}/access-policies/{}", h.entry_path(), encode_arn(EDIT));
    let (status, body) = h.ms.eks_json("DELETE", &path, None).await;
    assert_eq!(status, 200, "DisassociateAccessPolicy: {body}");

    // Another grant of the principal converges (an extension, an overlap).
    let view = spec(VIEW, &[]);
    let done = h
        .converge_ok(&[("R-00001", &on_a), ("R-00002", &view)])
        .await;
    assert_eq!(done.baselines_gone.len(), 1, "{done:?}");
    assert_eq!(
        h.associations().await.get(EDIT),
        Some(&namespaces(&["a"])),
        "only the grant's own namespace, not the vanished baseline's"
    );
    h.converge_ok(&[]).await;
    assert_eq!(h.associations().await, BTreeMap::new());
}

/// Spec 9.6: the whole pre-existing entry deleted during the grant is not
/// re-created to restore a baseline.
#[tokio::test]
async fn a_deleted_entry_is_not_recreated_to_restore_a_baseline() {
    let h = Harness::new().await;
    h.create_entry_behind_tollgate().await;
    h.associate_behind_tollgate(EDIT, &["x"]).await;
    let on_a = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &on_a)]).await;

    let (status, body) = h.ms.eks_json("DELETE", &h.entry_path(), None).await;
    assert_eq!(status, 200, "DeleteAccessEntry: {body}");

    let done = h.converge_ok(&[]).await;
    assert!(
        h.entry().await.is_none(),
        "an entry was created to restore a baseline: {:?}",
        h.entry().await
    );
    assert_eq!(done.baselines_gone.len(), 1, "{done:?}");
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    assert_eq!(h.verify("R-00001", &on_a, &[]).await, ReadBack::Removed);
}

/// Spec 9.6: a baseline is recorded only from an entry no Tollgate marked.
/// What sits on this installation's own entry when its first grant finds
/// it (left by anyone) is not standing access: it goes with the grant.
#[tokio::test]
async fn nothing_on_a_marked_entry_becomes_a_baseline() {
    let h = Harness::new().await;
    let view = spec(VIEW, &[]);
    h.converge_ok(&[("R-00001", &view)]).await;
    // Someone adds EDIT to Tollgate's entry while VIEW is in force.
    h.associate_behind_tollgate(EDIT, &[]).await;
    let edit = spec(EDIT, &["a"]);
    h.converge_ok(&[("R-00001", &view), ("R-00002", &edit)])
        .await;
    assert_eq!(
        h.store.baselines("dev", ALICE).await.unwrap().get(EDIT),
        Some(&None),
        "an association found while a grant is in force was taken for standing access"
    );
    h.converge_ok(&[]).await;
    assert!(h.entry().await.is_none(), "{:?}", h.associations().await);

    // No grant in force and nothing on record, but the entry is
    // Tollgate's: what someone added to it is still not standing access.
    h.converge_ok(&[("R-00003", &view)]).await;
    h.associate_behind_tollgate(EDIT, &[]).await;
    h.converge_ok(&[]).await;
    assert_eq!(h.associations().await, only(EDIT, cluster_scope()));
    assert!(h.store.baselines("dev", ALICE).await.unwrap().is_empty());
    h.converge_ok(&[("R-00004", &edit)]).await;
    assert_eq!(
        h.store.baselines("dev", ALICE).await.unwrap().get(EDIT),
        Some(&None),
        "an association on a marked entry was taken for standing access"
    );
    h.converge_ok(&[]).await;
    assert!(h.entry().await.is_none(), "{:?}", h.associations().await);
}

/// Spec 9.6: two installations (different `[server] instance`) on one
/// cluster never share a principal's access. The second grant fails
/// before anything is created, naming the other installation, in both
/// orders; when everything ends nothing is left.
#[tokio::test]
async fn another_installations_entry_is_never_granted_over() {
    let h = Harness::new().await;
    let (green, green_store, _green_dir) = installation(sdk_for(&h.ms).await, "green");
    let view = spec(VIEW, &[]);
    let payments = spec(VIEW, &["payments"]);
    let converge_green = |grants: Vec<(&'static str, AccessSpec)>| {
        let green = &green;
        let green_store = &green_store;
        let cluster = h.cluster.clone();
        async move {
            for (id, spec) in &grants {
                let rid = RequestId::parse(id).unwrap();
                if green_store.get(&rid).await.unwrap().is_none() {
                    green_store
                        .create(&recorded_row(id, spec), Vec::new())
                        .await
                        .unwrap();
                }
            }
            let in_force: Vec<InForce> = grants
                .iter()
                .map(|(id, spec)| InForce {
                    grant_id: id,
                    spec,
                    expires_at: None,
                })
                .collect();
            let creator = grants.first().map_or("none", |(id, _)| id);
            green.converge(&cluster, ALICE, &in_force, creator).await
        }
    };

    // Green first, then this installation.
    converge_green(vec![("R-0GRN1", view.clone())])
        .await
        .unwrap();
    match h.converge(&[("R-00001", &payments)]).await {
        Err(AccessError::OtherInstallation { instance, .. }) => assert_eq!(instance, "green"),
        other => panic!("granted over another installation's entry: {other:?}"),
    }
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));
    assert!(
        h.store.baselines("dev", ALICE).await.unwrap().is_empty(),
        "green's access recorded as a baseline"
    );
    assert_eq!(
        h.entry().await.unwrap()["tags"]["tollgate-instance"],
        "green"
    );
    // The refused grant's cleanup touches nothing of green's.
    h.converge_ok(&[]).await;
    assert_eq!(h.associations().await, only(VIEW, cluster_scope()));
    // Green's grant ends: nothing is left, and a later pass of this
    // installation puts nothing back.
    converge_green(vec![]).await.unwrap();
    h.converge_ok(&[]).await;
    assert!(h.entry().await.is_none(), "{:?}", h.associations().await);

    // This installation first, then green.
    h.converge_ok(&[("R-00002", &view)]).await;
    match converge_green(vec![("R-0GRN2", payments.clone())]).await {
        Err(AccessError::OtherInstallation { instance, .. }) => assert_eq!(instance, "tollgate"),
        other => panic!("green granted over this installation's entry: {other:?}"),
    }
    assert!(green_store
        .baselines("dev", ALICE)
        .await
        .unwrap()
        .is_empty());
    converge_green(vec![]).await.unwrap();
    h.converge_ok(&[]).await;
    converge_green(vec![]).await.unwrap();
    assert!(h.entry().await.is_none(), "{:?}", h.associations().await);
}

/// The attack (security review H1): someone allowed to tag marks an entry
/// this installation granted on as another installation's. Tags are
/// forgeable (spec 8.7) and the store decides (9.2): the revoke still
/// takes the access away and reads it back gone, instead of forgetting
/// its baselines and leaving the association in place for good.
#[tokio::test]
async fn a_grant_on_an_entry_retagged_as_another_installations_is_still_revoked() {
    let h = Harness::new().await;
    let edit = spec(EDIT, &["payments"]);
    h.converge_ok(&[("R-00001", &edit)]).await;
    assert_eq!(
        h.associations().await,
        only(EDIT, namespaces(&["payments"]))
    );
    assert!(!h.store.baselines("dev", ALICE).await.unwrap().is_empty());

    // The retag. MiniStack's DescribeAccessEntry shows the tags an entry
    // was created with, not TagResource's, so the entry is made again
    // with the forged marks and the association put back: what the
    // converge reads is then exactly what EKS shows after TagResource.
    let forged =
        json!({"managed-by": "tollgate", "tollgate-grant": "R-00001", "tollgate-instance": "zzz"});
    let (status, body) = h.ms.eks_json("DELETE", &h.entry_path(), None).await;
    assert_eq!(status, 200, "DeleteAccessEntry: {body}");
    let (status, body) =
        h.ms.eks_json(
            "POST",
            "/clusters/dev/access-entries",
            Some(json!({"principalArn": ALICE, "type": "STANDARD", "tags": forged})),
        )
        .await;
    assert_eq!(status, 200, "CreateAccessEntry: {body}");
    h.associate_behind_tollgate(EDIT, &["payments"]).await;
    assert_eq!(h.entry().await.unwrap()["tags"]["tollgate-instance"], "zzz");

    // The revoke: nothing wanted.
    h.converge_ok(&[]).await;
    assert!(
        h.associations().await.is_empty(),
        "the revoke left the access of a retagged entry: {:?}",
        h.associations().await
    );
    assert_eq!(h.verify("R-00001", &edit, &[]).await, ReadBack::Removed);
}
