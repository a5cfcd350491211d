//! session-rbac and aws-auth through real `kube` clients, over HTTPS, against
//! the Kubernetes API stand-in, with Tollgate's own EKS tokens.

mod support;

use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::kube::{Kind, KubeStandIn};
use support::kube_rbac::{Rbac, Rule};
use time::OffsetDateTime;

use tollgate::access::aws::AwsClients;
use tollgate::access::aws_auth::AwsAuthStrategy;
use tollgate::access::kube::KubeClients;
use tollgate::access::session_rbac::SessionRbacStrategy;
use tollgate::access::{AccessEngine, AccessError, InForce, Look};
use tollgate::clock::Clock;
use tollgate::domain::grant::intents_for;
use tollgate::domain::policy::{ClusterPolicy, Strategy};
use tollgate::domain::readback::ReadBack;
use tollgate::domain::request::{AccessSpec, Asked, Request, RequestId, Requester};
use tollgate::store::{SledStore, Store};

const USER: &str = "tollgate:alice@example.com";
const SSO_ROLE: &str = "arn:aws:iam::123456789012:role/aws-reserved/sso.amazonaws.com/eu-west-1/AWSReservedSSO_Dev_abc";
const SSO_ROLE_STRIPPED: &str = "arn:aws:iam::123456789012:role/AWSReservedSSO_Dev_abc";
const NODE_ROLES: &str = "- rolearn: arn:aws:iam::123456789012:role/eks-node\n  username: system:node:{{EC2PrivateDNSName}}\n  groups:\n    - system:bootstrappers\n    - system:nodes\n";

struct ManualClock(Mutex<OffsetDateTime>);

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

struct Rig {
    kube: KubeStandIn,
    clock: Arc<ManualClock>,
    cluster: ClusterPolicy,
    rbac: SessionRbacStrategy,
    aws_auth: AwsAuthStrategy,
    store: Arc<SledStore>,
    _dir: tempfile::TempDir,
}

/// A row for grant `id` with what granting it creates recorded, as the
/// grant step writes it before any create call.
fn recorded_row(id: &str, spec: &AccessSpec, strategy: Strategy) -> Request {
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
        OffsetDateTime::now_utc(),
    );
    row.intents = intents_for(strategy, id, spec);
    row
}

async fn rig(strategy: Strategy) -> Rig {
    support::install_crypto_provider();
    let kube = KubeStandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = kube.write_ca(dir.path());
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("AKIDTEST", "secret", None, None, "test"),
            ),
        )
        .build();
    let now = OffsetDateTime::from(kube.now());
    let clock = Arc::new(ManualClock(Mutex::new(now)));
    let clients = Arc::new(KubeClients::new(
        Arc::new(AwsClients::new(sdk)),
        clock.clone(),
    ));
    let cluster = ClusterPolicy {
        name: "dev".into(),
        region: "us-east-1".into(),
        account_id: "123456789012".into(),
        assume_role_arn: None,
        strategy,
        endpoint: Some(kube.endpoint()),
        ca_file: Some(ca.display().to_string()),
        approval_channel: "C0".into(),
        dm_approvers: false,
        default_role: None,
        roles: Default::default(),
        break_glass: None,
        reconcile_interval: Duration::from_secs(300),
        backstop: None,
    };
    let store = Arc::new(SledStore::open(&dir.path().join("store")).expect("sled store"));
    Rig {
        rbac: SessionRbacStrategy::new(clients.clone(), store.clone()),
        store,
        aws_auth: AwsAuthStrategy::new(clients),
        kube,
        clock,
        cluster,
        _dir: dir,
    }
}

fn rbac_spec(role: &str, ns: &[&str]) -> AccessSpec {
    AccessSpec {
        cluster: "dev".into(),
        role: "debug".into(),
        principal: USER.into(),
        policy_arn: None,
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        cluster_role: Some(role.into()),
        groups: vec![],
        k8s_user: Some(USER.into()),
        strategy: None,
    }
}

fn auth_spec(principal: &str, groups: &[&str]) -> AccessSpec {
    AccessSpec {
        cluster: "dev".into(),
        role: "debug".into(),
        principal: principal.into(),
        policy_arn: None,
        namespaces: vec![],
        cluster_role: None,
        groups: groups.iter().map(|s| s.to_string()).collect(),
        k8s_user: Some(USER.into()),
        strategy: None,
    }
}

impl Rig {
    fn advance(&self, d: Duration) {
        *self.clock.0.lock().unwrap() += d;
        self.kube.set_now(self.kube.now() + d);
    }

    async fn rbac(&self, grants: &[(&str, &AccessSpec)]) -> Result<(), AccessError> {
        let expires = *self.clock.0.lock().unwrap() + Duration::from_secs(3600);
        self.rbac_until(grants, expires).await
    }

    /// Every grant in force until `expires`: a later call with another
    /// instant is what an extension does.
    async fn rbac_until(
        &self,
        grants: &[(&str, &AccessSpec)],
        expires: OffsetDateTime,
    ) -> Result<(), AccessError> {
        let in_force: Vec<InForce> = grants
            .iter()
            .map(|(id, spec)| InForce {
                grant_id: id,
                spec,
                expires_at: Some(expires),
            })
            .collect();
        for (id, spec) in grants {
            self.record(id, spec, Strategy::SessionRbac).await;
        }
        self.rbac
            .converge(&self.cluster, USER, &in_force, "none")
            .await
            .map(|_| ())
    }

    async fn auth(
        &self,
        principal: &str,
        grants: &[(&str, &AccessSpec)],
    ) -> Result<(), AccessError> {
        let in_force: Vec<InForce> = grants
            .iter()
            .map(|(id, spec)| InForce {
                grant_id: id,
                spec,
                expires_at: None,
            })
            .collect();
        self.aws_auth
            .converge(&self.cluster, principal, &in_force, "none")
            .await
            .map(|_| ())
    }

    /// The read-back after revoking grant `id` (`spec`), with `grants`
    /// still in force.
    async fn verify_rbac(
        &self,
        id: &str,
        spec: &AccessSpec,
        grants: &[(&str, &AccessSpec)],
    ) -> Result<ReadBack, AccessError> {
        let in_force = in_force(grants);
        self.rbac
            .verify_removed(&self.cluster, USER, id, spec, &in_force)
            .await
    }

    async fn verify_auth(
        &self,
        principal: &str,
        id: &str,
        spec: &AccessSpec,
        grants: &[(&str, &AccessSpec)],
    ) -> Result<ReadBack, AccessError> {
        let in_force = in_force(grants);
        self.aws_auth
            .verify_removed(&self.cluster, principal, id, spec, &in_force)
            .await
    }

    /// Records grant `id` in the store (once), as the grant step does.
    async fn record(&self, id: &str, spec: &AccessSpec, strategy: Strategy) {
        let rid = RequestId::parse(id).expect("a request id");
        if self.store.get(&rid).await.unwrap().is_none() {
            self.store
                .create(&recorded_row(id, spec, strategy), Vec::new())
                .await
                .unwrap();
        }
    }

    fn map_roles(&self) -> Vec<Value> {
        let cm = self
            .kube
            .get_object(Kind::ConfigMap, "kube-system", "aws-auth")
            .expect("aws-auth");
        let text = cm["data"]["mapRoles"].as_str().unwrap_or("");
        serde_yaml::from_str::<Vec<Value>>(text).unwrap_or_default()
    }

    fn seed_aws_auth(&self) {
        self.kube.seed_configmap(
            "kube-system",
            json!({"metadata": {"name": "aws-auth", "namespace": "kube-system"}, "data": {"mapRoles": NODE_ROLES}}),
        );
    }
}

fn in_force<'a>(grants: &[(&'a str, &'a AccessSpec)]) -> Vec<InForce<'a>> {
    grants
        .iter()
        .map(|(id, spec)| InForce {
            grant_id: id,
            spec,
            expires_at: None,
        })
        .collect()
}

fn node_item() -> Value {
    serde_yaml::from_str::<Vec<Value>>(NODE_ROLES)
        .unwrap()
        .remove(0)
}

#[tokio::test]
async fn session_rbac_binds_per_namespace_idempotently_and_leaves_others_alone() {
    let r = rig(Strategy::SessionRbac).await;
    let team = json!({"metadata": {"name": "team-edit"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                      "subjects": [{"kind": "User", "name": USER}]});
    r.kube.seed_rolebinding("a", team.clone());
    let spec = rbac_spec("edit", &["a", "b"]);

    r.rbac(&[("R-7F3K2", &spec)]).await.unwrap();
    for ns in ["a", "b"] {
        let rb = r
            .kube
            .get_object(Kind::RoleBinding, ns, "tollgate-r-7f3k2")
            .expect("binding");
        assert_eq!(
            rb["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "tollgate"
        );
        assert_eq!(rb["metadata"]["labels"]["tollgate.dev/grant"], "R-7F3K2");
        assert!(rb["metadata"]["annotations"]["tollgate.dev/expires-at"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert_eq!(rb["roleRef"]["kind"], "ClusterRole");
        assert_eq!(rb["roleRef"]["name"], "edit");
        assert_eq!(rb["subjects"][0]["name"], USER);
        assert_eq!(rb["subjects"][0]["kind"], "User");
    }
    let writes = r.kube.writes().len();
    r.rbac(&[("R-7F3K2", &spec)]).await.unwrap();
    assert_eq!(
        r.kube.writes().len(),
        writes,
        "a second converge writes nothing"
    );
    // An extension moves the expiry: the annotation follows, in place.
    let later = *r.clock.0.lock().unwrap() + Duration::from_secs(3 * 3600);
    r.rbac_until(&[("R-7F3K2", &spec)], later).await.unwrap();
    let shown = later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for ns in ["a", "b"] {
        let rb = r
            .kube
            .get_object(Kind::RoleBinding, ns, "tollgate-r-7f3k2")
            .expect("binding kept");
        assert_eq!(
            rb["metadata"]["annotations"]["tollgate.dev/expires-at"],
            shown.as_str()
        );
    }
    assert_eq!(
        r.kube.writes().len(),
        writes + 2,
        "two replaces, nothing deleted"
    );

    r.rbac(&[]).await.unwrap();
    r.rbac(&[]).await.unwrap();
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-7f3k2")
        .is_none());
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "b", "tollgate-r-7f3k2")
        .is_none());
    let kept = r
        .kube
        .get_object(Kind::RoleBinding, "a", "team-edit")
        .expect("team binding kept");
    assert_eq!(kept["roleRef"], team["roleRef"]);
}

#[tokio::test]
async fn session_rbac_cluster_wide_and_overlapping_grants() {
    let r = rig(Strategy::SessionRbac).await;
    let wide = rbac_spec("view", &[]);
    let narrow = rbac_spec("edit", &["a"]);
    r.rbac(&[("R-AAAAA", &wide), ("R-BBBBB", &narrow)])
        .await
        .unwrap();
    assert!(r
        .kube
        .get_object(Kind::ClusterRoleBinding, "", "tollgate-r-aaaaa")
        .is_some());
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-bbbbb")
        .is_some());
    r.rbac(&[("R-BBBBB", &narrow)]).await.unwrap();
    assert!(r
        .kube
        .get_object(Kind::ClusterRoleBinding, "", "tollgate-r-aaaaa")
        .is_none());
    assert!(
        r.kube
            .get_object(Kind::RoleBinding, "a", "tollgate-r-bbbbb")
            .is_some(),
        "the other grant keeps its binding"
    );
}

#[tokio::test]
async fn session_rbac_refuses_a_name_clash_with_a_foreign_binding() {
    let r = rig(Strategy::SessionRbac).await;
    r.kube.seed_rolebinding(
        "a",
        json!({"metadata": {"name": "tollgate-r-7f3k2"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "User", "name": "mallory"}]}),
    );
    let err = r
        .rbac(&[("R-7F3K2", &rbac_spec("edit", &["a"]))])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("a/tollgate-r-7f3k2"),
        "{err}"
    );
    let kept = r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-7f3k2")
        .unwrap();
    assert_eq!(kept["subjects"][0]["name"], "mallory");
}

/// Spec 9.6: a binding of the same name marked by another installation is
/// never granted over; the refusal names that installation.
#[tokio::test]
async fn session_rbac_refuses_another_installations_binding_by_name() {
    let r = rig(Strategy::SessionRbac).await;
    r.kube.seed_rolebinding(
        "a",
        json!({"metadata": {"name": "tollgate-r-7f3k2", "labels": {
                   "app.kubernetes.io/managed-by": "tollgate",
                   "tollgate.dev/grant": "R-7F3K2",
                   "tollgate.dev/instance": "green"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
               "subjects": [{"kind": "User", "name": USER}]}),
    );
    match r.rbac(&[("R-7F3K2", &rbac_spec("edit", &["a"]))]).await {
        Err(AccessError::OtherInstallation {
            instance, object, ..
        }) => {
            assert_eq!(instance, "green");
            assert_eq!(object, "RoleBinding a/tollgate-r-7f3k2");
        }
        other => panic!("granted over another installation's binding: {other:?}"),
    }
    let kept = r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-7f3k2")
        .unwrap();
    assert_eq!(kept["roleRef"]["name"], "view", "left exactly as it was");
}

#[tokio::test]
async fn aws_auth_adds_and_removes_exactly_its_item() {
    let r = rig(Strategy::AwsAuth).await;
    r.seed_aws_auth();
    let spec = auth_spec(SSO_ROLE, &["tollgate-debug"]);
    for _ in 0..2 {
        r.auth(SSO_ROLE, &[("R-AAAAA", &spec)]).await.unwrap();
    }
    let items = r.map_roles();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], node_item(), "node role unchanged");
    assert_eq!(items[1]["rolearn"], SSO_ROLE_STRIPPED);
    assert_eq!(items[1]["username"], USER);
    assert_eq!(
        items[1]["groups"],
        serde_yaml::from_str::<Value>("[tollgate-debug]").unwrap()
    );

    for _ in 0..2 {
        r.auth(SSO_ROLE, &[]).await.unwrap();
    }
    assert_eq!(r.map_roles(), vec![node_item()]);
}

#[tokio::test]
async fn aws_auth_survives_a_concurrent_writer() {
    let r = rig(Strategy::AwsAuth).await;
    r.seed_aws_auth();
    // Another tool writes between Tollgate's read and its write: the first
    // PUT is a 409 and a correct client re-reads, keeping both changes.
    r.kube.inject_concurrent_write(Kind::ConfigMap, "kube-system", "aws-auth", |cm| {
        let roles = cm["data"]["mapRoles"].as_str().unwrap().to_string();
        cm["data"]["mapRoles"] = json!(format!("{roles}- rolearn: arn:aws:iam::123456789012:role/other-team\n  username: other\n  groups:\n    - viewers\n"));
    });
    r.auth(
        SSO_ROLE,
        &[("R-AAAAA", &auth_spec(SSO_ROLE, &["tollgate-debug"]))],
    )
    .await
    .unwrap();
    let items = r.map_roles();
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(items[0], node_item());
    assert_eq!(items[1]["username"], "other");
    assert_eq!(items.iter().filter(|i| i["username"] == USER).count(), 1);
    let conflicts = r
        .kube
        .calls()
        .iter()
        .filter(|c| c.method == "PUT" && c.status == 409)
        .count();
    assert_eq!(conflicts, 1);
}

#[tokio::test]
async fn aws_auth_refuses_foreign_mappings_and_missing_configmap() {
    let r = rig(Strategy::AwsAuth).await;
    let node = "arn:aws:iam::123456789012:role/eks-node";
    let err = r
        .auth(node, &[("R-AAAAA", &auth_spec(node, &["g"]))])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist on cluster dev") && err.contains("never creates it"),
        "{err}"
    );
    assert!(r
        .kube
        .get_object(Kind::ConfigMap, "kube-system", "aws-auth")
        .is_none());

    r.seed_aws_auth();
    let err = r
        .auth(node, &[("R-AAAAA", &auth_spec(node, &["g"]))])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already mapped"), "{err}");
    assert_eq!(r.map_roles(), vec![node_item()]);
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    let r = rig(Strategy::SessionRbac).await;
    r.rbac(&[]).await.unwrap();
    assert_eq!(r.kube.tokens_seen().len(), 1);
    r.advance(Duration::from_secs(5 * 60));
    r.rbac(&[]).await.unwrap();
    assert_eq!(
        r.kube.tokens_seen().len(),
        1,
        "a five-minute-old token is reused"
    );
    // Sixteen minutes after the first token was signed it would be refused;
    // the client was rebuilt with a fresh one before that.
    r.advance(Duration::from_secs(11 * 60));
    r.rbac(&[]).await.unwrap();
    assert_eq!(r.kube.tokens_seen().len(), 2);
    assert_eq!(r.kube.rejected_count(), 0, "{:?}", r.kube.rejections());
}

#[tokio::test]
async fn owned_lists_what_carries_tollgate_marks() {
    let r = rig(Strategy::SessionRbac).await;
    r.kube.seed_rolebinding(
        "a",
        json!({"metadata": {"name": "team"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
               "subjects": [{"kind": "User", "name": USER}]}),
    );
    r.rbac(&[("R-AAAAA", &rbac_spec("edit", &["a", "b"]))])
        .await
        .unwrap();
    let mut owned = r.rbac.owned(&r.cluster, Look::Everything).await.unwrap();
    owned.sort_by(|x, y| x.object.cmp(&y.object));
    let objects: Vec<&str> = owned.iter().map(|o| o.object.as_str()).collect();
    assert_eq!(
        objects,
        vec![
            "RoleBinding a/tollgate-r-aaaaa",
            "RoleBinding b/tollgate-r-aaaaa"
        ]
    );
    assert!(owned
        .iter()
        .all(|o| o.principal == USER && o.grant_id.as_deref() == Some("R-AAAAA")));

    r.seed_aws_auth();
    r.auth(SSO_ROLE, &[("R-BBBBB", &auth_spec(SSO_ROLE, &["g"]))])
        .await
        .unwrap();
    let owned = r
        .aws_auth
        .owned(&r.cluster, Look::Everything)
        .await
        .unwrap();
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!(owned[0].principal, SSO_ROLE_STRIPPED);
}

#[tokio::test]
async fn bindings_the_store_did_not_create_are_left_alone() {
    let r = rig(Strategy::SessionRbac).await;
    let binding = |name: &str, labels: Value| {
        json!({"metadata": {"name": name, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "User", "name": USER}]})
    };
    // Labels anyone with RBAC write can set: a grant id Tollgate never
    // issued, and another installation's live grant.
    r.kube.seed_rolebinding(
        "a",
        binding(
            "forged",
            json!({"app.kubernetes.io/managed-by": "tollgate", "tollgate.dev/grant": "R-GH0ST", "tollgate.dev/instance": "tollgate"}),
        ),
    );
    r.kube.seed_clusterrolebinding(binding(
        "tollgate-r-b1ue0",
        json!({"app.kubernetes.io/managed-by": "tollgate", "tollgate.dev/grant": "R-B1VE0", "tollgate.dev/instance": "blue"}),
    ));
    let spec = rbac_spec("edit", &["a"]);
    r.rbac(&[("R-7F3K2", &spec)]).await.unwrap();
    let made = r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-7f3k2")
        .expect("ours");
    assert_eq!(
        made["metadata"]["labels"]["tollgate.dev/instance"],
        "tollgate"
    );

    let owned = r.rbac.owned(&r.cluster, Look::Everything).await.unwrap();
    let mut objects: Vec<&str> = owned.iter().map(|o| o.object.as_str()).collect();
    objects.sort();
    assert_eq!(
        objects,
        vec!["RoleBinding a/forged", "RoleBinding a/tollgate-r-7f3k2"],
        "another installation's binding is not listed"
    );

    for _ in 0..2 {
        r.rbac(&[]).await.unwrap();
    }
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "a", "tollgate-r-7f3k2")
        .is_none());
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "a", "forged")
        .is_some());
    assert!(r
        .kube
        .get_object(Kind::ClusterRoleBinding, "", "tollgate-r-b1ue0")
        .is_some());
}

#[tokio::test]
async fn missing_bindings_are_reported_per_grant() {
    let r = rig(Strategy::SessionRbac).await;
    let two = rbac_spec("edit", &["a", "b"]);
    let wide = rbac_spec("view", &[]);
    r.rbac(&[("R-AAAAA", &two), ("R-BBBBB", &wide)])
        .await
        .unwrap();
    let expires = Some(*r.clock.0.lock().unwrap() + Duration::from_secs(3600));
    let grants = [
        InForce {
            grant_id: "R-AAAAA",
            spec: &two,
            expires_at: expires,
        },
        InForce {
            grant_id: "R-BBBBB",
            spec: &wide,
            expires_at: expires,
        },
    ];
    assert!(r
        .rbac
        .missing(&r.cluster, USER, &grants)
        .await
        .unwrap()
        .is_empty());
    assert!(r
        .kube
        .delete_object(Kind::RoleBinding, "b", "tollgate-r-aaaaa"));
    assert_eq!(
        r.rbac.missing(&r.cluster, USER, &grants).await.unwrap(),
        vec!["R-AAAAA".to_string()]
    );
}

#[tokio::test]
async fn a_refused_token_rebuilds_the_client_at_once() {
    let r = rig(Strategy::SessionRbac).await;
    r.rbac(&[]).await.unwrap();
    assert_eq!(r.kube.tokens_seen().len(), 1);
    // The API server refuses the token (rotated credentials, say): the
    // next call must not keep using the client that holds it.
    r.kube.fail_next("GET", 401);
    let err = r.rbac(&[]).await.unwrap_err().to_string();
    assert!(err.contains("401") || err.contains("Unauthorized"), "{err}");
    r.advance(Duration::from_secs(1));
    r.rbac(&[]).await.unwrap();
    assert_eq!(
        r.kube.tokens_seen().len(),
        2,
        "a fresh token right after the 401, not at the 10-minute rebuild"
    );
}

/// Everything session-rbac does on a cluster: namespaced and cluster-wide
/// grants (list, create, bind), an extension (update), a name clash with a
/// foreign binding of each kind (get), and revocation (delete).
async fn session_rbac_lifecycle(r: &Rig) -> Result<(), String> {
    let ns_spec = rbac_spec("edit", &["a"]);
    let wide = rbac_spec("view", &[]);
    let both = [("R-AAAAA", &ns_spec), ("R-BBBBB", &wide)];
    r.rbac(&both).await.map_err(|e| e.to_string())?;
    let later = *r.clock.0.lock().unwrap() + Duration::from_secs(3 * 3600);
    r.rbac_until(&both, later)
        .await
        .map_err(|e| e.to_string())?;
    r.kube.seed_rolebinding(
        "a",
        json!({"metadata": {"name": "tollgate-r-ccccc"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "User", "name": "mallory"}]}),
    );
    r.kube.seed_clusterrolebinding(
        json!({"metadata": {"name": "tollgate-r-ddddd"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
               "subjects": [{"kind": "User", "name": "mallory"}]}),
    );
    for (id, spec) in [("R-CCCCC", &ns_spec), ("R-DDDDD", &wide)] {
        match r.rbac(&[(id, spec)]).await {
            Err(e) if e.to_string().contains("was not created by Tollgate") => {}
            other => return Err(format!("name clash for {id}: {other:?}")),
        }
    }
    r.rbac(&[]).await.map_err(|e| e.to_string())?;
    for (id, spec) in both {
        match r.verify_rbac(id, spec, &[]).await {
            Ok(ReadBack::Removed) => {}
            other => return Err(format!("read-back of {id}: {other:?}")),
        }
    }
    let left: Vec<Value> = [Kind::RoleBinding, Kind::ClusterRoleBinding]
        .into_iter()
        .flat_map(|k| r.kube.list_objects(k))
        .filter(|o| o["metadata"]["labels"]["tollgate.dev/grant"].is_string())
        .collect();
    match left.is_empty() {
        true => Ok(()),
        false => Err(format!("bindings left after revocation: {left:?}")),
    }
}

/// Everything aws-auth does: add an item (get, update) and remove it.
async fn aws_auth_lifecycle(r: &Rig) -> Result<(), String> {
    r.seed_aws_auth();
    let spec = auth_spec(SSO_ROLE, &["tollgate-debug"]);
    r.auth(SSO_ROLE, &[("R-AAAAA", &spec)])
        .await
        .map_err(|e| e.to_string())?;
    r.auth(SSO_ROLE, &[]).await.map_err(|e| e.to_string())?;
    match r.verify_auth(SSO_ROLE, "R-AAAAA", &spec, &[]).await {
        Ok(ReadBack::Removed) => {}
        other => return Err(format!("read-back: {other:?}")),
    }
    match r.map_roles() == vec![node_item()] {
        true => Ok(()),
        false => Err(format!("aws-auth after removal: {:?}", r.map_roles())),
    }
}

async fn both_lifecycles(rbac: Option<Rbac>) -> (Result<(), String>, Result<(), String>, usize) {
    let s = rig(Strategy::SessionRbac).await;
    s.kube.set_rbac(rbac.clone());
    let a = rig(Strategy::AwsAuth).await;
    a.kube.set_rbac(rbac);
    let forbidden = |r: &Rig| r.kube.forbidden().len();
    let session = session_rbac_lifecycle(&s).await;
    let auth = aws_auth_lifecycle(&a).await;
    (session, auth, forbidden(&s) + forbidden(&a))
}

#[tokio::test]
async fn the_shipped_rbac_allows_exactly_what_the_strategies_do() {
    let (session, auth, forbidden) = both_lifecycles(Some(Rbac::shipped())).await;
    session.expect("session-rbac with the shipped ClusterRole");
    auth.expect("aws-auth with the shipped Role");
    assert_eq!(forbidden, 0);

    // Every verb, resource and resource name the manifests grant is needed:
    // without it, one of the strategies fails with a 403, as a real cluster
    // would answer.
    let shipped = Rbac::shipped();
    let mut variants: Vec<(String, Rbac)> = Vec::new();
    let rule_sets = shipped.cluster.len() + shipped.namespaced.len();
    assert!(rule_sets >= 2, "a ClusterRole and a Role are shipped");
    let mut push_without = |label: String, edit: &dyn Fn(&mut Rule) -> bool| {
        for i in 0..shipped.cluster.len() {
            let mut rbac = shipped.clone();
            if edit(&mut rbac.cluster[i]) {
                variants.push((format!("{label} (ClusterRole rule {i})"), rbac));
            }
        }
        for (j, (ns, rules)) in shipped.namespaced.iter().enumerate() {
            for i in 0..rules.len() {
                let mut rbac = shipped.clone();
                if edit(&mut rbac.namespaced[j].1[i]) {
                    variants.push((format!("{label} (Role rule {i} in {ns})"), rbac));
                }
            }
        }
    };
    let mut words: Vec<String> = shipped
        .cluster
        .iter()
        .chain(shipped.namespaced.iter().flat_map(|(_, r)| r))
        .flat_map(|r| {
            r.verbs
                .iter()
                .chain(&r.resources)
                .chain(&r.resource_names)
                .cloned()
        })
        .collect();
    words.sort();
    words.dedup();
    for word in words {
        push_without(format!("without {word:?}"), &|rule| {
            let count = |r: &Rule| r.verbs.len() + r.resources.len() + r.resource_names.len();
            let (before, had_names) = (count(rule), !rule.resource_names.is_empty());
            rule.verbs.retain(|v| *v != word);
            rule.resources.retain(|v| *v != word);
            rule.resource_names.retain(|v| *v != word);
            // No resourceNames would widen the rule to every name: a rule
            // whose last name is gone grants nothing instead.
            if had_names && rule.resource_names.is_empty() {
                rule.verbs.clear();
            }
            before != count(rule)
        });
    }
    assert!(variants.len() >= 10, "{} variants", variants.len());
    for (label, rbac) in variants {
        let (session, auth, forbidden) = both_lifecycles(Some(rbac)).await;
        assert!(
            session.is_err() || auth.is_err(),
            "{label}: both strategies still work, so the manifests grant more than Tollgate uses"
        );
        assert!(forbidden > 0, "{label}: failed without a 403");
    }
}

#[tokio::test]
async fn binding_a_cluster_role_the_manifest_does_not_name_is_forbidden() {
    let r = rig(Strategy::SessionRbac).await;
    let err = r
        .rbac(&[("R-7F3K2", &rbac_spec("cluster-admin", &[]))])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("403") || err.contains("Forbidden"), "{err}");
    assert!(err.contains("cluster-admin"), "{err}");
    assert!(r.kube.list_objects(Kind::ClusterRoleBinding).is_empty());
}

/// The read-back after a revoke (spec 10.2): another grant's binding for
/// the same user is not the revoked grant's access, and a DELETE answered
/// with success that left the binding is caught.
#[tokio::test]
async fn session_rbac_read_back_sees_only_the_revoked_grants_bindings() {
    let r = rig(Strategy::SessionRbac).await;
    let first = rbac_spec("edit", &["a"]);
    let second = rbac_spec("view", &["a"]);
    r.rbac(&[("R-AAAAA", &first), ("R-BBBBB", &second)])
        .await
        .unwrap();
    r.rbac(&[("R-BBBBB", &second)]).await.unwrap();
    assert_eq!(
        r.verify_rbac("R-AAAAA", &first, &[("R-BBBBB", &second)])
            .await
            .unwrap(),
        ReadBack::Removed,
        "the other grant's binding in a is its own"
    );

    r.kube.set_lying(true);
    r.rbac(&[]).await.expect("the lie is a success");
    match r.verify_rbac("R-BBBBB", &second, &[]).await.unwrap() {
        ReadBack::StillThere(found) => {
            assert_eq!(found, vec!["RoleBinding a/tollgate-r-bbbbb still exists"])
        }
        other => panic!("{other:?}"),
    }
    r.kube.set_lying(false);
    r.rbac(&[]).await.unwrap();
    assert_eq!(
        r.verify_rbac("R-BBBBB", &second, &[]).await.unwrap(),
        ReadBack::Removed
    );
}

/// A grantee with rights over bindings in their namespace relabels their
/// own binding as another installation's, so Tollgate's lookup by marks no
/// longer finds it: the read-back, which looks it up by the name the
/// grant's row records, still sees it and the revoke is not verified.
#[tokio::test]
async fn session_rbac_read_back_is_not_fooled_by_a_relabelled_binding() {
    let r = rig(Strategy::SessionRbac).await;
    let edit = rbac_spec("edit", &["a"]);
    r.rbac(&[("R-AAAAA", &edit)]).await.unwrap();
    r.kube
        .modify_object(Kind::RoleBinding, "a", "tollgate-r-aaaaa", |rb| {
            rb["metadata"]["labels"]["tollgate.dev/instance"] = json!("other");
        });
    r.rbac(&[]).await.unwrap();
    assert!(
        r.kube
            .get_object(Kind::RoleBinding, "a", "tollgate-r-aaaaa")
            .is_some(),
        "the relabelled binding is still there"
    );
    match r.verify_rbac("R-AAAAA", &edit, &[]).await.unwrap() {
        ReadBack::StillThere(found) => {
            assert_eq!(found, vec!["RoleBinding a/tollgate-r-aaaaa still exists"])
        }
        other => panic!("a binding the user still holds was verified gone: {other:?}"),
    }
}

/// aws-auth checks fail closed: a list that cannot be parsed fails the
/// revoke and its read-back instead of reading as "no item", and an item
/// of the same ARN added under another username (what a grantee holding
/// system:masters could write) that maps the revoked groups still counts.
#[tokio::test]
async fn aws_auth_read_back_fails_closed() {
    let r = rig(Strategy::AwsAuth).await;
    r.seed_aws_auth();
    let debug = auth_spec(SSO_ROLE, &["tollgate-debug"]);
    r.auth(SSO_ROLE, &[("R-AAAAA", &debug)]).await.unwrap();
    let kept = r
        .kube
        .get_object(Kind::ConfigMap, "kube-system", "aws-auth")
        .unwrap();
    r.kube
        .modify_object(Kind::ConfigMap, "kube-system", "aws-auth", |cm| {
            cm["data"]["mapRoles"] = json!("- rolearn: [unclosed\n  username: x");
        });
    let err = r
        .auth(SSO_ROLE, &[])
        .await
        .expect_err("a revoke over an unreadable aws-auth succeeded");
    assert!(err.to_string().contains("cannot be parsed"), "{err}");
    let err = r
        .verify_auth(SSO_ROLE, "R-AAAAA", &debug, &[])
        .await
        .expect_err("an unreadable aws-auth was verified");
    assert!(err.to_string().contains("cannot be parsed"), "{err}");

    // The grantee's own item for the ARN under another username.
    r.kube
        .modify_object(Kind::ConfigMap, "kube-system", "aws-auth", |cm| {
            let mut items: Vec<Value> =
                serde_yaml::from_str(kept["data"]["mapRoles"].as_str().unwrap()).unwrap();
            items.push(json!({
                "rolearn": SSO_ROLE_STRIPPED,
                "username": "backdoor",
                "groups": ["tollgate-debug"],
            }));
            cm["data"]["mapRoles"] = json!(serde_yaml::to_string(&items).unwrap());
        });
    r.auth(SSO_ROLE, &[]).await.unwrap();
    match r
        .verify_auth(SSO_ROLE, "R-AAAAA", &debug, &[])
        .await
        .unwrap()
    {
        ReadBack::StillThere(found) => assert_eq!(
            found,
            vec!["aws-auth item for backdoor still maps groups tollgate-debug".to_string()]
        ),
        other => panic!("an item mapping the revoked group was verified gone: {other:?}"),
    }
}

/// The same for aws-auth: groups another grant still needs are not left
/// over, and an update answered with success that kept the old data is.
#[tokio::test]
async fn aws_auth_read_back_judges_groups_against_the_grants_in_force() {
    let r = rig(Strategy::AwsAuth).await;
    r.seed_aws_auth();
    let wide = auth_spec(SSO_ROLE, &["tollgate-debug", "tollgate-view"]);
    let narrow = auth_spec(SSO_ROLE, &["tollgate-view"]);
    r.auth(SSO_ROLE, &[("R-AAAAA", &wide), ("R-BBBBB", &narrow)])
        .await
        .unwrap();
    r.auth(SSO_ROLE, &[("R-BBBBB", &narrow)]).await.unwrap();
    assert_eq!(
        r.verify_auth(SSO_ROLE, "R-AAAAA", &wide, &[("R-BBBBB", &narrow)])
            .await
            .unwrap(),
        ReadBack::Removed,
        "tollgate-view is still the other grant's"
    );

    r.kube.set_lying(true);
    r.auth(SSO_ROLE, &[]).await.expect("the lie is a success");
    assert_eq!(r.map_roles().len(), 2, "the liar kept the item");
    assert!(matches!(
        r.verify_auth(SSO_ROLE, "R-BBBBB", &narrow, &[])
            .await
            .unwrap(),
        ReadBack::StillThere(_)
    ));
    r.kube.set_lying(false);
    r.auth(SSO_ROLE, &[]).await.unwrap();
    assert_eq!(
        r.verify_auth(SSO_ROLE, "R-BBBBB", &narrow, &[])
            .await
            .unwrap(),
        ReadBack::Removed
    );
    assert_eq!(r.map_roles(), vec![node_item()]);
}

/// Issue 21: a grantee allowed to edit RoleBindings in their namespace
/// binds their own `tollgate-<id>` to another identity they hold (a group
/// here) and strips its labels, so neither a lookup by marks nor one by
/// user finds it. The read-back judges the binding by the name the row
/// recorded, so the revoke is not verified; the revoke's removal by name
/// deletes it, after which it is.
#[tokio::test]
async fn a_subject_swapped_binding_is_not_verified_removed_and_is_deleted_by_name() {
    let r = rig(Strategy::SessionRbac).await;
    let edit = rbac_spec("edit", &["a"]);
    r.rbac(&[("R-AAAAA", &edit)]).await.unwrap();
    r.kube
        .modify_object(Kind::RoleBinding, "a", "tollgate-r-aaaaa", |rb| {
            rb["subjects"] = json!([{
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": "alice-other-identity",
            }]);
            rb["metadata"]["labels"] = json!({});
        });
    // The converge of the revoke looks by marks and user: it misses it.
    r.rbac(&[]).await.unwrap();
    assert!(
        r.kube
            .get_object(Kind::RoleBinding, "a", "tollgate-r-aaaaa")
            .is_some(),
        "the swapped binding survived the converge"
    );
    match r.verify_rbac("R-AAAAA", &edit, &[]).await.unwrap() {
        ReadBack::StillThere(found) => {
            assert_eq!(found, vec!["RoleBinding a/tollgate-r-aaaaa still exists"])
        }
        other => panic!("a binding still giving access was verified gone: {other:?}"),
    }
    // What the revoke runs next: every binding its row recorded, by name.
    r.rbac
        .remove_recorded(&r.cluster, USER, "R-AAAAA")
        .await
        .unwrap();
    assert!(
        r.kube
            .get_object(Kind::RoleBinding, "a", "tollgate-r-aaaaa")
            .is_none(),
        "the binding named for the revoked grant was not deleted"
    );
    assert_eq!(
        r.verify_rbac("R-AAAAA", &edit, &[]).await.unwrap(),
        ReadBack::Removed
    );
    // A binding the row never recorded (another namespace) is not
    // Tollgate's, whatever its name: removal by name leaves it.
    r.kube.seed_rolebinding(
        "b",
        json!({"metadata": {"name": "tollgate-r-aaaaa", "namespace": "b"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]}),
    );
    r.rbac
        .remove_recorded(&r.cluster, USER, "R-AAAAA")
        .await
        .unwrap();
    assert!(r
        .kube
        .get_object(Kind::RoleBinding, "b", "tollgate-r-aaaaa")
        .is_some());
}

/// A binding that took a grant's name before the grant was first
/// attempted (its create then failed) is not Tollgate's, although the row
/// recorded that name: removal by name leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_by_name_leaves_a_binding_older_than_the_grant() {
    let r = rig(Strategy::SessionRbac).await;
    let edit = rbac_spec("edit", &["a"]);
    r.kube.seed_rolebinding(
        "a",
        json!({"metadata": {"name": "tollgate-r-bbbbb", "namespace": "a"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]}),
    );
    let mut row = recorded_row("R-BBBBB", &edit, Strategy::SessionRbac);
    let seeded = OffsetDateTime::from(r.kube.now());
    row.first_attempt_at = Some(seeded + time::Duration::minutes(10));
    r.store.create(&row, Vec::new()).await.unwrap();
    r.rbac
        .remove_recorded(&r.cluster, USER, "R-BBBBB")
        .await
        .unwrap();
    assert!(
        r.kube
            .get_object(Kind::RoleBinding, "a", "tollgate-r-bbbbb")
            .is_some(),
        "a binding created before the grant was first attempted was deleted"
    );
}
