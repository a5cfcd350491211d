//! The deployable artifacts: both kustomize overlays render, every document
//! validates against Kubernetes 1.31–1.33 schemas in strict mode, and what
//! is rendered has what running behind an ALB needs.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate::config::Config;

const OVERLAYS: [&str; 2] = ["sled", "dynamodb"];
const KUBERNETES_VERSIONS: [&str; 3] = ["1.31.0", "1.32.0", "1.33.0"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize manifests/overlays/<overlay>`, as YAML text.
fn render(overlay: &str) -> String {
    let dir = root().join("manifests/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl (with kustomize) is needed to render the manifests: {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// kubernetes-validate --strict on a file of documents: (passed, output).
fn validate(file: &Path, version: &str) -> (bool, String) {
    support::ministack::ensure_tools();
    let out = Command::new(root().join(".venv-test/bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", version])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn both_overlays_render_and_validate_strictly_for_kubernetes_1_31_to_1_33() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        let text = render(overlay);
        assert!(documents(&text).len() >= 8, "{overlay}: {text}");
        std::fs::write(&file, text).unwrap();
        for version in KUBERNETES_VERSIONS {
            let (ok, out) = validate(&file, version);
            assert!(ok, "{overlay} on Kubernetes {version}:\n{out}");
        }
    }
    // The validator does refuse what the API server would: a field a
    // Deployment does not have fails strict validation.
    let bad = dir.path().join("bad.yaml");
    let deployment = render("sled")
        .split("\n---\n")
        .find(|d| d.contains("kind: Deployment"))
        .unwrap()
        .replace("  replicas: 1", "  replicas: 1\n  replicaz: 1");
    std::fs::write(&bad, deployment).unwrap();
    let (ok, out) = validate(&bad, "1.33.0");
    assert!(!ok, "an unknown field passed strict validation: {out}");
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn rendered_overlays_work_behind_an_alb_and_keep_metrics_inside() {
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay));
        let at = |what: &str| format!("{overlay}: {what}");

        // The config the pods run parses, and its listeners are the
        // container's ports.
        let cm = find(&docs, "ConfigMap");
        let cfg = Config::parse(cm["data"]["tollgate.toml"].as_str().unwrap(), overlay)
            .unwrap_or_else(|e| panic!("{overlay}: {e}"));
        let metrics_listen = cfg
            .server
            .metrics_listen
            .clone()
            .expect("metrics_listen set");
        let deploy = find(&docs, "Deployment");
        let pod = &deploy["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let ports: Vec<(String, u64)> = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(
            ports.contains(&("http".into(), port_of(&cfg.server.listen))),
            "{}",
            at("http port")
        );
        assert!(
            ports.contains(&("metrics".into(), port_of(&metrics_listen))),
            "{}",
            at("metrics port")
        );

        // Start-up recovery runs before the port opens: a startup probe
        // holds liveness off for minutes, not seconds.
        let startup = &container["startupProbe"];
        let patience = startup["periodSeconds"].as_u64().unwrap_or(10)
            * startup["failureThreshold"].as_u64().unwrap_or(3);
        assert!(
            patience >= 120,
            "{}",
            at(&format!("startup probe allows {patience}s"))
        );
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        for limit in ["cpu", "memory"] {
            assert!(
                container["resources"]["limits"][limit].is_string(),
                "{}",
                at(limit)
            );
        }

        // IRSA without a Kubernetes API token.
        let sa = find(&docs, "ServiceAccount");
        assert!(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].is_string());
        assert_eq!(sa["automountServiceAccountToken"], false, "{}", at("SA"));
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", at("pod"));

        // The ALB: internet-facing, pod IP targets, health on /readyz, and
        // only /slack/ routed, never to the metrics port.
        let ingress = find(&docs, "Ingress");
        let ann = &ingress["metadata"]["annotations"];
        assert_eq!(ann["alb.ingress.kubernetes.io/scheme"], "internet-facing");
        assert_eq!(ann["alb.ingress.kubernetes.io/target-type"], "ip");
        assert_eq!(ann["alb.ingress.kubernetes.io/healthcheck-path"], "/readyz");
        let idle: u64 = ann["alb.ingress.kubernetes.io/load-balancer-attributes"]
            .as_str()
            .unwrap()
            .split(',')
            .find_map(|kv| kv.strip_prefix("idle_timeout.timeout_seconds="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            idle < tollgate::http::HEADER_TIMEOUT.as_secs(),
            "{}",
            at("ALB idle timeout")
        );
        assert!(ingress["spec"]["defaultBackend"].is_null());
        let service = find(&docs, "Service");
        let metrics_service_port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["targetPort"] == "metrics")
            .expect("a Service port for metrics");
        for rule in ingress["spec"]["rules"].as_array().unwrap() {
            for path in rule["http"]["paths"].as_array().unwrap() {
                assert_eq!(path["path"], "/slack/", "{}", at("only /slack/ routed"));
                let port = &path["backend"]["service"]["port"];
                assert_eq!(port["name"], "http", "{}", at("routed port"));
                assert_ne!(port["number"], metrics_service_port["port"]);
            }
        }

        // A NetworkPolicy selects the pods and lets the metrics port in
        // only from a labelled namespace.
        let np = find(&docs, "NetworkPolicy");
        assert_eq!(
            np["spec"]["podSelector"]["matchLabels"],
            deploy["spec"]["selector"]["matchLabels"]
        );
        let metrics_port = port_of(&metrics_listen);
        for rule in np["spec"]["ingress"].as_array().unwrap() {
            let opens_metrics = rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"].as_u64() == Some(metrics_port));
            if opens_metrics {
                assert!(
                    rule["from"][0]["namespaceSelector"].is_object(),
                    "{}",
                    at("metrics from")
                );
                assert!(rule["from"][0]["ipBlock"].is_null());
            }
        }
    }
}

/// What a new EKS cluster needs from the rendered overlays, and what the
/// README's steps promise: the namespace first, a StorageClass for the sled
/// volume (EKS clusters from 1.30 on have no default one), the image set in
/// one place, and no shipped placeholder that breaks real requests.
#[test]
fn overlays_apply_to_a_new_cluster_in_order_with_nothing_to_fix_first() {
    for overlay in OVERLAYS {
        let kustomization: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(
                root()
                    .join("manifests/overlays")
                    .join(overlay)
                    .join("kustomization.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        let docs = documents(&render(overlay));
        let at = |what: &str| format!("{overlay}: {what}");
        let first_namespaced = docs
            .iter()
            .position(|d| d["metadata"]["namespace"].is_string())
            .unwrap();
        let namespace = docs.iter().position(|d| d["kind"] == "Namespace").unwrap();
        assert!(namespace < first_namespaced, "{}", at("Namespace first"));

        // Every claim names a StorageClass the overlay ships, provisioned
        // by the EBS CSI driver the README installs.
        for pvc in docs.iter().filter(|d| d["kind"] == "PersistentVolumeClaim") {
            let class = pvc["spec"]["storageClassName"]
                .as_str()
                .unwrap_or_else(|| panic!("{}", at("the claim names no StorageClass")));
            let sc = docs
                .iter()
                .find(|d| d["kind"] == "StorageClass" && d["metadata"]["name"] == class)
                .unwrap_or_else(|| panic!("{}", at(&format!("StorageClass {class} shipped"))));
            assert_eq!(sc["provisioner"], "ebs.csi.aws.com", "{}", at("EBS CSI"));
        }

        // The image is the one the overlay's `images:` sets (what the
        // README's `kustomize edit set image` changes).
        let image = find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string();
        let set = &kustomization["images"][0];
        assert_eq!(set["name"].as_str(), Some("tollgate"), "{}", at("images"));
        assert_eq!(
            image,
            format!(
                "{}:{}",
                set["newName"].as_str().unwrap(),
                set["newTag"].as_str().unwrap()
            ),
            "{}",
            at("image")
        );

        // No placeholder that makes every real request fail: a wrong
        // app_id answers 401 to all of Slack, and a backstop whose group
        // and role do not exist yet fails every grant.
        let cm = find(&docs, "ConfigMap");
        let cfg = Config::parse(cm["data"]["tollgate.toml"].as_str().unwrap(), overlay).unwrap();
        assert_eq!(cfg.slack.app_id, None, "{}", at("app_id"));
        assert!(
            cfg.clusters.iter().all(|c| c.backstop.is_none()),
            "{}",
            at("backstop on before its step")
        );
    }
    let example = std::fs::read_to_string(root().join("tollgate.example.toml")).unwrap();
    let cfg = Config::parse(&example, "tollgate.example.toml").unwrap();
    assert_eq!(cfg.slack.app_id, None, "the README's first command");

    // The README's setup applies the namespace before the Secret in it.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let setup = &readme[readme.find("## Setting it up").unwrap()..];
    let setup = &setup[..setup[3..].find("\n## ").unwrap()];
    let ns = setup.find("manifests/base/namespace.yaml").unwrap();
    let secret = setup.find("secret.template.yaml").unwrap();
    assert!(ns < secret, "namespace before the Secret in README's steps");
    for needed in [
        "aws-ebs-csi-driver",
        "kustomize edit set image",
        "create-schedule-group",
        "enableNetworkPolicy",
        "cargo install --locked --path .",
    ] {
        assert!(setup.contains(needed), "README's setup says {needed}");
    }
}
