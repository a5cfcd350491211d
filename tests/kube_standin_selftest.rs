//! Checks the Kubernetes API stand-in in `tests/support/kube.rs` through the
//! clients Tollgate uses (kube-rs over HTTPS), so a failing strategy test
//! points at Tollgate, not at its harness.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::Status;
use serde_json::{json, Value};

use support::kube::{fake_eks_token, parse_eks_token, Kind, KubeStandIn};

const REGION: &str = "eu-west-1";

fn token_now() -> String {
    fake_eks_token(REGION, SystemTime::now())
}

/// A kube client for `standin` built the way Tollgate builds one: endpoint,
/// the CA as DER in `root_cert`, the bearer token in `auth_info.token`.
fn client(standin: &KubeStandIn, token: &str) -> kube::Client {
    support::install_crypto_provider();
    let mut config = kube::Config::new(standin.endpoint().parse().unwrap());
    config.root_cert = Some(vec![pem_to_der(&standin.ca_pem())]);
    // `secrecy::SecretString` converts from `String`/`&str`.
    config.auth_info.token = Some(token.into());
    kube::Client::try_from(config).unwrap()
}

/// The base64 between the BEGIN and END lines of a one-certificate PEM.
fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn api_error(err: kube::Error) -> Box<Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn binding(name: &str, grant: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(&[
                ("app.kubernetes.io/managed-by", "tollgate"),
                ("tollgate.dev/grant", grant),
            ]),
            annotations: Some(
                [(
                    "tollgate.dev/expires-at".to_string(),
                    "2030-01-01T00:00:00Z".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "view".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: "tollgate:alice@example.com".into(),
            namespace: None,
        }]),
    }
}

fn aws_auth() -> Value {
    json!({
        "metadata": {"name": "aws-auth"},
        "data": {
            "mapRoles": "- rolearn: arn:aws:iam::111122223333:role/node\n  username: system:node:{{EC2PrivateDNSName}}\n  groups:\n  - system:bootstrappers\n  - system:nodes\n",
        },
    })
}

fn names(list: &kube::core::ObjectList<RoleBinding>) -> Vec<String> {
    list.items
        .iter()
        .map(|rb| rb.metadata.name.clone().unwrap())
        .collect()
}

#[tokio::test]
async fn rolebindings_are_created_read_listed_by_label_and_deleted() {
    let standin = KubeStandIn::start_unrestricted().await;
    let client = client(&standin, &token_now());
    let team: Api<RoleBinding> = Api::namespaced(client.clone(), "team-a");
    standin.seed_rolebinding(
        "team-a",
        json!({
            "metadata": {"name": "pre-existing", "labels": {"owner": "platform"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "devs"}],
        }),
    );

    let created = team
        .create(&PostParams::default(), &binding("tollgate-g1", "g1"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    assert!(rv.parse::<u64>().is_ok(), "{rv}");
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), Some("team-a"));
    let other_ns: Api<RoleBinding> = Api::namespaced(client.clone(), "team-b");
    other_ns
        .create(&PostParams::default(), &binding("tollgate-g2", "g2"))
        .await
        .unwrap();

    let got = team.get("tollgate-g1").await.unwrap();
    assert_eq!(got.metadata.resource_version.as_deref(), Some(rv.as_str()));
    assert_eq!(got.role_ref.name, "view");
    let stored = standin
        .get_object(Kind::RoleBinding, "team-a", "tollgate-g1")
        .unwrap();
    assert_eq!(stored["kind"], "RoleBinding");
    assert_eq!(stored["apiVersion"], "rbac.authorization.k8s.io/v1");

    let all = team.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(&all), ["pre-existing", "tollgate-g1"]);
    let ours = team
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=tollgate"))
        .await
        .unwrap();
    assert_eq!(names(&ours), ["tollgate-g1"]);
    assert!(ours.metadata.resource_version.is_some());
    for (selector, want) in [
        (
            "app.kubernetes.io/managed-by==tollgate",
            vec!["tollgate-g1"],
        ),
        (
            "app.kubernetes.io/managed-by!=tollgate",
            vec!["pre-existing"],
        ),
        ("tollgate.dev/grant", vec!["tollgate-g1"]),
        ("!tollgate.dev/grant", vec!["pre-existing"]),
        ("tollgate.dev/grant in (g0,g1)", vec!["tollgate-g1"]),
        ("tollgate.dev/grant notin (g1)", vec!["pre-existing"]),
        (
            "app.kubernetes.io/managed-by=tollgate,tollgate.dev/grant=g2",
            vec![],
        ),
        ("owner=platform,!tollgate.dev/grant", vec!["pre-existing"]),
    ] {
        let got = team
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        assert_eq!(names(&got), want, "labelSelector {selector}");
    }
    let bad = team
        .list(&ListParams::default().labels("tollgate.dev/grant=a b"))
        .await
        .unwrap_err();
    assert_eq!(api_error(bad).code, 400);

    let everywhere: Api<RoleBinding> = Api::all(client.clone());
    let ours = everywhere
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=tollgate"))
        .await
        .unwrap();
    assert_eq!(names(&ours), ["tollgate-g1", "tollgate-g2"]);
    let by_name = everywhere
        .list(&ListParams::default().fields("metadata.name=tollgate-g2"))
        .await
        .unwrap();
    assert_eq!(names(&by_name), ["tollgate-g2"]);

    let deleted = team
        .delete("tollgate-g1", &DeleteParams::default())
        .await
        .unwrap();
    let status = deleted.right().expect("a Status for a deleted RoleBinding");
    assert!(status.is_success(), "{status:?}");
    assert_eq!(status.details.unwrap().name, "tollgate-g1");
    assert!(standin
        .get_object(Kind::RoleBinding, "team-a", "tollgate-g1")
        .is_none());
    let err = team.get("tollgate-g1").await.unwrap_err();
    assert_eq!(api_error(err).code, 404);

    // delete_collection by label leaves what Tollgate does not own.
    let removed = other_ns
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tollgate.dev/grant=g2"),
        )
        .await
        .unwrap();
    let removed = removed.left().expect("the deleted list");
    assert_eq!(names(&removed), ["tollgate-g2"]);
    assert_eq!(standin.list_objects(Kind::RoleBinding).len(), 1);

    let requests = standin.requests();
    assert!(requests.contains(&(
        "POST".to_string(),
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings".to_string()
    )));
    assert!(requests.contains(&(
        "DELETE".to_string(),
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/tollgate-g1".to_string()
    )));
    assert_eq!(standin.tokens_seen().len(), 1);
    assert_eq!(standin.rejected_count(), 0);
}

#[tokio::test]
async fn creating_an_existing_name_is_409_already_exists() {
    let standin = KubeStandIn::start_unrestricted().await;
    let api: Api<RoleBinding> = Api::namespaced(client(&standin, &token_now()), "team-a");
    api.create(&PostParams::default(), &binding("tollgate-g1", "g1"))
        .await
        .unwrap();
    let err = api
        .create(&PostParams::default(), &binding("tollgate-g1", "g1"))
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "AlreadyExists");
    assert_eq!(
        status.message,
        "rolebindings.rbac.authorization.k8s.io \"tollgate-g1\" already exists"
    );
    let details = status.details.unwrap();
    assert_eq!(details.name, "tollgate-g1");
    assert_eq!(details.group, "rbac.authorization.k8s.io");
    assert_eq!(details.kind, "rolebindings");
}

#[tokio::test]
async fn missing_objects_are_404_not_found() {
    let standin = KubeStandIn::start_unrestricted().await;
    let client = client(&standin, &token_now());
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), "team-a");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");

    let status = api_error(rbs.get("nope").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        status.message,
        "rolebindings.rbac.authorization.k8s.io \"nope\" not found"
    );
    let status = api_error(
        rbs.delete("nope", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));

    let status = api_error(cms.get("aws-auth").await.unwrap_err());
    assert_eq!(status.message, "configmaps \"aws-auth\" not found");
    // ConfigMaps are not created by PUT...
    let cm: ConfigMap = serde_json::from_value(aws_auth()).unwrap();
    let status = api_error(
        cms.replace("aws-auth", &PostParams::default(), &cm)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    // ...but RBAC bindings are, as the API server's RBAC strategies allow.
    let created = rbs
        .replace(
            "tollgate-g9",
            &PostParams::default(),
            &binding("tollgate-g9", "g9"),
        )
        .await
        .unwrap();
    assert!(created.metadata.resource_version.is_some());

    // Unknown paths are a 404 Status too (after authentication).
    let http = reqwest_client(&standin);
    let res = http
        .get(format!("{}/apis/apps/v1/deployments", standin.endpoint()))
        .bearer_auth(token_now())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "NotFound");
}

#[tokio::test]
async fn a_put_with_a_stale_resource_version_is_409_conflict() {
    let standin = KubeStandIn::start_unrestricted().await;
    standin.seed_configmap("kube-system", aws_auth());
    let cms: Api<ConfigMap> = Api::namespaced(client(&standin, &token_now()), "kube-system");

    let read = cms.get("aws-auth").await.unwrap();
    let mut first = read.clone();
    first
        .data
        .as_mut()
        .unwrap()
        .insert("mapUsers".into(), "[]\n".into());
    let written = cms
        .replace("aws-auth", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(
        written.metadata.resource_version,
        read.metadata.resource_version
    );
    assert_eq!(written.metadata.uid, read.metadata.uid);

    // The copy read before that write is now stale.
    let status = api_error(
        cms.replace("aws-auth", &PostParams::default(), &read)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on configmaps \"aws-auth\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );

    // Without a resourceVersion the update is unconditional.
    let mut blind = read.clone();
    blind.metadata.resource_version = None;
    cms.replace("aws-auth", &PostParams::default(), &blind)
        .await
        .unwrap();

    // A uid in the body must be the stored object's.
    blind.metadata.uid = Some("00000000-0000-4000-a000-000000000000".into());
    let status = api_error(
        cms.replace("aws-auth", &PostParams::default(), &blind)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains("Precondition failed: UID"),
        "{}",
        status.message
    );

    // An update that changes nothing keeps the version.
    let now = cms.get("aws-auth").await.unwrap();
    let again = cms
        .replace("aws-auth", &PostParams::default(), &now)
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        now.metadata.resource_version
    );
}

/// Read-modify-write with retry on 409, as the aws-auth strategy does it.
async fn add_map_role(cms: &Api<ConfigMap>, line: &str) -> usize {
    for attempt in 1..=5 {
        let mut cm = cms.get("aws-auth").await.unwrap();
        let data = cm.data.get_or_insert_with(Default::default);
        let roles = data.entry("mapRoles".into()).or_default();
        roles.push_str(line);
        match cms.replace("aws-auth", &PostParams::default(), &cm).await {
            Ok(_) => return attempt,
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(other) => panic!("{other:?}"),
        }
    }
    panic!("still conflicting after 5 attempts");
}

#[tokio::test]
async fn injected_conflicts_clear_once_the_client_rereads() {
    let standin = KubeStandIn::start_unrestricted().await;
    let seeded = standin.seed_configmap("kube-system", aws_auth());
    let cms: Api<ConfigMap> = Api::namespaced(client(&standin, &token_now()), "kube-system");

    standin.inject_conflicts(Kind::ConfigMap, 2);
    let attempts = add_map_role(&cms, "- rolearn: arn:aws:iam::111122223333:role/alice\n").await;
    assert_eq!(attempts, 3);
    let stored = standin
        .get_object(Kind::ConfigMap, "kube-system", "aws-auth")
        .unwrap();
    let roles = stored["data"]["mapRoles"].as_str().unwrap();
    assert!(roles.contains("role/node"), "{roles}");
    assert!(roles.contains("role/alice"), "{roles}");
    assert_ne!(
        stored["metadata"]["resourceVersion"],
        seeded["metadata"]["resourceVersion"]
    );

    // Retrying the same stale body keeps failing: the version moved on.
    standin.inject_conflicts(Kind::ConfigMap, 1);
    let read = cms.get("aws-auth").await.unwrap();
    for _ in 0..2 {
        let status = api_error(
            cms.replace("aws-auth", &PostParams::default(), &read)
                .await
                .unwrap_err(),
        );
        assert_eq!(status.reason, "Conflict");
    }
}

#[tokio::test]
async fn a_concurrent_write_is_kept_by_a_client_that_rereads() {
    let standin = KubeStandIn::start_unrestricted().await;
    standin.seed_configmap("kube-system", aws_auth());
    let cms: Api<ConfigMap> = Api::namespaced(client(&standin, &token_now()), "kube-system");

    standin.inject_concurrent_write(Kind::ConfigMap, "kube-system", "aws-auth", |cm| {
        let roles = cm["data"]["mapRoles"].as_str().unwrap().to_string();
        cm["data"]["mapRoles"] = json!(format!(
            "{roles}- rolearn: arn:aws:iam::111122223333:role/other-node\n"
        ));
    });
    let attempts = add_map_role(&cms, "- rolearn: arn:aws:iam::111122223333:role/alice\n").await;
    assert_eq!(attempts, 2);
    let roles = standin
        .get_object(Kind::ConfigMap, "kube-system", "aws-auth")
        .unwrap()["data"]["mapRoles"]
        .as_str()
        .unwrap()
        .to_string();
    for role in ["role/node", "role/other-node", "role/alice"] {
        assert!(roles.contains(role), "{role} missing from {roles}");
    }
}

#[tokio::test]
async fn bad_or_missing_tokens_are_401() {
    let standin = KubeStandIn::start_unrestricted().await;
    let path = "/api/v1/namespaces/kube-system/configmaps";

    for token in [
        "not-a-token".to_string(),
        format!("k8s-aws-v1.{}", "aGVsbG8"),
        // A presigned URL for the wrong STS action.
        {
            let good = token_now();
            let url = decode(&good).replace("GetCallerIdentity", "AssumeRole");
            encode(&url)
        },
    ] {
        let api: Api<ConfigMap> = Api::namespaced(client(&standin, &token), "kube-system");
        let status = api_error(api.list(&ListParams::default()).await.unwrap_err());
        assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
        assert_eq!(status.message, "Unauthorized");
    }
    assert_eq!(standin.rejected_count(), 3);
    assert!(standin.tokens_seen().is_empty());

    let res = reqwest_client(&standin)
        .get(format!("{}{path}", standin.endpoint()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"Unauthorized","reason":"Unauthorized","code":401})
    );
    assert_eq!(standin.rejections().last().unwrap(), "no bearer token");

    // A fixed token can be allowed as is.
    standin.allow_token("fixed-test-token");
    let api: Api<ConfigMap> = Api::namespaced(client(&standin, "fixed-test-token"), "default");
    api.list(&ListParams::default()).await.unwrap();
    assert_eq!(standin.tokens_seen(), ["fixed-test-token"]);
}

#[tokio::test]
async fn tokens_older_than_15_minutes_are_401() {
    let standin = KubeStandIn::start_unrestricted().await;
    let signed = SystemTime::now();
    let token = fake_eks_token(REGION, signed);
    let api: Api<ConfigMap> = Api::namespaced(client(&standin, &token), "default");

    standin.set_now(signed + Duration::from_secs(14 * 60));
    api.list(&ListParams::default()).await.unwrap();

    standin.set_now(signed + Duration::from_secs(20 * 60));
    let status = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(status.code, 401);
    assert!(
        standin.rejections()[0].contains("expired"),
        "{:?}",
        standin.rejections()
    );

    // Signed well in the future (clock skew beyond 5 minutes) fails too.
    standin.set_now(signed - Duration::from_secs(10 * 60));
    let status = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(status.code, 401);

    standin.use_real_clock();
    api.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn tollgates_own_signed_token_is_accepted() {
    use aws_credential_types::Credentials;
    let standin = KubeStandIn::start_unrestricted().await;
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        Some("session-token".into()),
        None,
        "test",
    );
    let now = SystemTime::now();
    let token = tollgate::access::eks_token::token(&creds, REGION, "prod", now).unwrap();
    let info = parse_eks_token(&token, now).unwrap();
    assert_eq!(info.region, REGION);
    assert_eq!(info.access_key_id, "AKIDEXAMPLE");
    assert_eq!(info.security_token.as_deref(), Some("session-token"));

    let api: Api<ClusterRoleBinding> = Api::all(client(&standin, &token));
    api.list(&ListParams::default()).await.unwrap();
    assert_eq!(standin.tokens_seen(), vec![token]);

    let old = tollgate::access::eks_token::token(
        &creds,
        REGION,
        "prod",
        now - Duration::from_secs(16 * 60),
    )
    .unwrap();
    let api: Api<ClusterRoleBinding> = Api::all(client(&standin, &old));
    assert_eq!(
        api_error(api.list(&ListParams::default()).await.unwrap_err()).code,
        401
    );
}

fn decode(token: &str) -> String {
    use base64::Engine;
    let b64 = token.strip_prefix("k8s-aws-v1.").unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn encode(url: &str) -> String {
    use base64::Engine;
    format!(
        "k8s-aws-v1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
    )
}

#[test]
fn token_shape_checks() {
    let now = SystemTime::now();
    let good = fake_eks_token(REGION, now);
    let info = parse_eks_token(&good, now).unwrap();
    assert_eq!(info.expires_secs, 60);
    let url = decode(&good);
    // The global endpoint signs for us-east-1.
    let global = fake_eks_token("us-east-1", now);
    let global = decode(&global).replace("sts.us-east-1.amazonaws.com", "sts.amazonaws.com");
    assert!(parse_eks_token(&encode(&global), now).is_ok());

    let broken = [
        ("padding", format!("{good}=")),
        ("prefix", good.replace("k8s-aws-v1.", "k8s-aws-v2.")),
        ("scheme", encode(&url.replace("https://", "http://"))),
        ("host", encode(&url.replace("amazonaws.com", "example.com"))),
        (
            "signed headers",
            encode(&url.replace("host%3Bx-k8s-aws-id", "host")),
        ),
        (
            "signature",
            encode(&url.replace("0123456789abcdef", "0123456789abcdeg")),
        ),
        (
            "expires",
            encode(&url.replace("X-Amz-Expires=60", "X-Amz-Expires=900")),
        ),
        (
            "algorithm",
            encode(&url.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1")),
        ),
        ("unknown parameter", encode(&format!("{url}&Foo=bar"))),
        (
            "credential region",
            encode(&url.replace("%2Feu-west-1%2F", "%2Fus-east-1%2F")),
        ),
    ];
    for (what, token) in broken {
        assert_ne!(token, good, "{what}: the token did not change");
        let err = parse_eks_token(&token, now).expect_err(what);
        eprintln!("{what}: {err}");
    }
    assert!(parse_eks_token(&good, now + Duration::from_secs(16 * 60)).is_err());
}

#[tokio::test]
async fn cluster_role_bindings_and_validation() {
    let standin = KubeStandIn::start_unrestricted().await;
    let api: Api<ClusterRoleBinding> = Api::all(client(&standin, &token_now()));
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tollgate-g1", "labels": {"app.kubernetes.io/managed-by": "tollgate"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        // apiGroup is defaulted for User subjects, as the API server does.
        "subjects": [{"kind": "User", "name": "tollgate:alice@example.com"}],
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &crb).await.unwrap();
    assert_eq!(created.metadata.namespace, None);
    assert_eq!(
        created.subjects.as_ref().unwrap()[0].api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert!(standin
        .get_object(Kind::ClusterRoleBinding, "", "tollgate-g1")
        .is_some());

    // roleRef is immutable.
    let mut changed = created.clone();
    changed.role_ref.name = "view".into();
    let status = api_error(
        api.replace("tollgate-g1", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.contains("cannot change roleRef"),
        "{}",
        status.message
    );

    // Label values are validated.
    let mut bad = crb.clone();
    bad.metadata.name = Some("tollgate-g2".into());
    bad.metadata.labels = labels(&[("tollgate.dev/grant", "G:1")]);
    let status = api_error(api.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(status.code, 422);
    assert!(status.message.starts_with(
        "ClusterRoleBinding.rbac.authorization.k8s.io \"tollgate-g2\" is invalid: metadata.labels"
    ));

    // A RoleBinding-only roleRef kind is refused on a ClusterRoleBinding.
    let mut bad = crb.clone();
    bad.metadata.name = Some("tollgate-g3".into());
    bad.role_ref.kind = "Role".into();
    let status = api_error(api.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(status.code, 422);

    // Creating with a resourceVersion set is refused by storage.
    let mut bad = created.clone();
    bad.metadata.name = Some("tollgate-g4".into());
    let status = api_error(api.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(status.code, 500);

    let deleted = api
        .delete("tollgate-g1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.right().unwrap().is_success());
}

fn reqwest_client(standin: &KubeStandIn) -> reqwest::Client {
    support::install_crypto_provider();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(standin.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn http1_with_reqwest_and_http2_via_alpn() {
    let standin = KubeStandIn::start_unrestricted().await;
    standin.seed_configmap("kube-system", aws_auth());
    let url = format!(
        "{}/api/v1/namespaces/kube-system/configmaps/aws-auth",
        standin.endpoint()
    );

    let res = reqwest_client(&standin)
        .get(&url)
        .bearer_auth(token_now())
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["kind"], "ConfigMap");
    assert_eq!(body["metadata"]["namespace"], "kube-system");

    // HTTP/2, negotiated with ALPN like any h2-capable client would.
    use http_body_util::BodyExt;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(standin.ca_der()))
        .unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let req = axum::http::Request::get(&url)
        .header("authorization", format!("Bearer {}", token_now()))
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.version(), axum::http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["metadata"]["name"], "aws-auth");

    let versions: Vec<String> = standin
        .calls()
        .into_iter()
        .map(|call| call.http_version)
        .collect();
    assert_eq!(versions, ["HTTP/1.1", "HTTP/2.0"]);
}

#[tokio::test]
async fn the_ca_file_and_the_support_client_work_and_drop_stops_serving() {
    let standin = KubeStandIn::start_unrestricted().await;
    let dir = tempfile::tempdir().unwrap();
    let path = standin.write_ca(dir.path());
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert_eq!(pem_to_der(&pem), standin.ca_der());
    // Tollgate's own PEM reader gets the same certificate from the file.
    assert_eq!(tollgate::access::kube::pem_to_der(&pem), [standin.ca_der()]);

    support::install_crypto_provider();
    let api: Api<ConfigMap> = Api::namespaced(standin.client(&token_now()), "default");
    api.list(&ListParams::default()).await.unwrap();
    // Also through root_cert_file, kube's other way to take a CA.
    let mut config = standin.kube_config(&token_now());
    config.root_cert = None;
    config.root_cert_file = Some(path.clone());
    let api: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
    api.list(&ListParams::default()).await.unwrap();

    // Injected failures answer as the API server would.
    standin.fail_next("GET", 403);
    let status = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    api.list(&ListParams::default()).await.unwrap();

    // kube's client retries 503 (and 429, 504) by itself: the caller sees
    // success and the stand-in sees two requests.
    standin.clear_calls();
    standin.fail_next("GET", 503);
    api.list(&ListParams::default()).await.unwrap();
    let statuses: Vec<u16> = standin.calls().iter().map(|call| call.status).collect();
    assert_eq!(statuses, [503, 200]);

    let addr = standin.addr();
    drop(standin);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after drop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The kept-alive connection is gone too.
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
}

/// The lying mode the read-back tests use: the answers are a real API
/// server's success answers, and nothing changes.
#[tokio::test]
async fn a_lying_stand_in_answers_success_and_keeps_the_objects() {
    let standin = KubeStandIn::start_unrestricted().await;
    let client = client(&standin, &token_now());
    let team: Api<RoleBinding> = Api::namespaced(client.clone(), "team-a");
    team.create(&PostParams::default(), &binding("tollgate-g1", "g1"))
        .await
        .unwrap();
    standin.seed_configmap(
        "kube-system",
        json!({"metadata": {"name": "aws-auth", "namespace": "kube-system"},
               "data": {"mapRoles": "- rolearn: arn:aws:iam::1:role/a\n"}}),
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");

    standin.set_lying(true);
    let deleted = team
        .delete("tollgate-g1", &DeleteParams::default())
        .await
        .unwrap();
    let status = deleted.right().expect("a Status, as for a real delete");
    assert_eq!(
        status.status,
        Some(kube::core::response::StatusSummary::Success)
    );
    assert!(team.get("tollgate-g1").await.is_ok(), "kept");
    let mut cm = cms.get("aws-auth").await.unwrap();
    cm.data = Some(BTreeMap::new());
    let answered = cms
        .replace("aws-auth", &PostParams::default(), &cm)
        .await
        .unwrap();
    assert_eq!(answered.data, Some(BTreeMap::new()), "answered as written");
    let kept = cms.get("aws-auth").await.unwrap();
    assert!(kept.data.unwrap().contains_key("mapRoles"), "old data kept");

    standin.set_lying(false);
    team.delete("tollgate-g1", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        api_error(team.get("tollgate-g1").await.unwrap_err()).code,
        404
    );
}
