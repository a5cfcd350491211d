//! The DynamoDB deployment variant and the IAM policy agree with what this
//! backend does.

use crate::config::{Backend, Config};

fn manifest(rel: &str) -> (String, String) {
    let path = format!("{}/manifests/{rel}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (path, text)
}

#[test]
fn dynamodb_variant_runs_two_replicas_on_the_table_the_policy_allows() {
    let (path, text) = manifest("overlays/dynamodb/configmap.yaml");
    let cm: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let toml = cm["data"]["tollgate.toml"].as_str().unwrap();
    let cfg = Config::parse(toml, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.store.backend, Backend::Dynamodb);
    let table = cfg.store.table.clone().unwrap();

    let (_, text) = manifest("overlays/dynamodb/deployment.yaml");
    let deploy: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    assert_eq!(
        deploy["spec"]["strategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    assert_eq!(
        deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );
    let mounts = deploy["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"].as_str() == cfg.store.path.to_str()),
        "the admin socket directory is writable"
    );

    let (_, text) = manifest("overlays/dynamodb/pdb.yaml");
    let pdb: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(pdb["kind"].as_str(), Some("PodDisruptionBudget"));
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));

    let (_, text) = manifest("iam-policy.json");
    let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
    let statement = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "DynamoDbStore")
        .unwrap();
    let resource = statement["Resource"].as_str().unwrap();
    assert!(resource.ends_with(&format!(":table/{table}")), "{resource}");
    let actions: Vec<&str> = statement["Action"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    // What DynamoStore calls (TransactWriteItems is authorised per item as
    // PutItem / DeleteItem); CreateTable belongs to `store init`, run by an
    // operator, not to the server.
    for needed in [
        "dynamodb:DescribeTable",
        "dynamodb:GetItem",
        "dynamodb:Query",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:BatchWriteItem",
    ] {
        assert!(
            actions.contains(&needed),
            "{needed} missing from the policy"
        );
    }
    assert!(!actions
        .iter()
        .any(|a| a.contains("CreateTable") || a.contains('*')));
}
