//! Runs MiniStack (a local AWS emulator from PyPI) as a child process so tests
//! can drive the real AWS SDK against an EKS API that keeps state.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const START_DEADLINE: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const CLUSTER_ACTIVE_DEADLINE: Duration = Duration::from_secs(30);
/// Another process can grab the port between our probe and MiniStack's bind;
/// a few fresh ports make that race irrelevant in practice.
const START_ATTEMPTS: usize = 5;

/// MiniStack routes a request to a service by the service name in the SigV4
/// credential scope; with `AUTH` unset it never checks the signature, so a
/// fixed, obviously fake one is enough.
const EKS_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
     Credential=test/20260101/us-east-1/eks/aws4_request, \
     SignedHeaders=host, Signature=00";

pub struct MiniStack {
    pub endpoint: String,
    pub port: u16,
    child: Child,
    /// Holds MiniStack's log and pid file; removed when the stack is dropped.
    dir: tempfile::TempDir,
}

impl MiniStack {
    /// Starts a fresh MiniStack on a free loopback port and waits until it
    /// answers HTTP. Every instance has its own, empty state.
    pub fn start() -> MiniStack {
        ensure_tools();
        let binary = repo_root().join(".venv-test/bin/ministack");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match try_start(&binary) {
                Ok(stack) => return stack,
                Err(why) => failures.push(why),
            }
        }
        panic!(
            "MiniStack did not start after {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// An AWS outage: the emulator is killed; its port refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// AWS back after an outage, on the same port, with fresh (empty) state.
    pub fn resume(&mut self) {
        let binary = repo_root().join(".venv-test/bin/ministack");
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match try_start_on(&binary, self.port) {
                Ok(stack) => {
                    // Swap in the new process; the old (dead) one is dropped.
                    let old = std::mem::replace(self, stack);
                    drop(old);
                    return;
                }
                // The old socket may linger for a moment after the kill.
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Err(why) => panic!("MiniStack did not come back on port {}: {why}", self.port),
            }
        }
    }

    /// Environment that points the AWS SDK (and anything else reading the
    /// standard variables) at this MiniStack with throwaway credentials.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// MiniStack's combined stdout and stderr so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ministack.log")).unwrap_or_default()
    }

    /// Creates an EKS cluster that accepts access entries and waits until
    /// DescribeCluster reports it ACTIVE.
    ///
    /// MiniStack cannot reach a Docker daemon (see `try_start`), so the cluster
    /// has no Kubernetes API behind it; only the EKS control-plane records
    /// exist. Like real EKS, creation also adds an admin access entry for the
    /// caller, which for the `test` access key is
    /// `arn:aws:iam::000000000000:root`.
    pub async fn create_cluster(&self, name: &str) {
        let body = json!({
            "name": name,
            "roleArn": "arn:aws:iam::000000000000:role/eks-role",
            "resourcesVpcConfig": {},
            "accessConfig": {"authenticationMode": "API_AND_CONFIG_MAP"},
        });
        let (status, answer) = self.eks_json("POST", "/clusters", Some(body)).await;
        assert_eq!(
            status,
            200,
            "EKS CreateCluster {name} failed: {answer}\nMiniStack log:\n{}",
            self.log()
        );

        let deadline = Instant::now() + CLUSTER_ACTIVE_DEADLINE;
        loop {
            let (status, answer) = self
                .eks_json("GET", &format!("/clusters/{name}"), None)
                .await;
            if status == 200 && answer["cluster"]["status"] == "ACTIVE" {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "EKS cluster {name} not ACTIVE after {CLUSTER_ACTIVE_DEADLINE:?}; \
                     last DescribeCluster answered {status}: {answer}"
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Calls MiniStack's EKS REST API directly, for setting up or inspecting
    /// state behind the back of the code under test. Returns the HTTP status
    /// and the JSON answer (`Value::Null` for an empty body, a string for a
    /// body that is not JSON).
    ///
    /// Paths MiniStack routes (`{c}` a cluster name, `{p}` a principal ARN and
    /// `{a}` a policy ARN, both passed through [`encode_arn`]):
    ///
    /// | method | path | operation |
    /// |---|---|---|
    /// | POST | `/clusters` | CreateCluster (prefer [`MiniStack::create_cluster`]) |
    /// | GET | `/clusters`, `/clusters/{c}` | ListClusters, DescribeCluster |
    /// | POST | `/clusters/{c}/access-entries` | CreateAccessEntry, body `{"principalArn": …, "type": "STANDARD"}` |
    /// | GET | `/clusters/{c}/access-entries` | ListAccessEntries → `{"accessEntries": [arn, …]}` |
    /// | GET, POST, DELETE | `/clusters/{c}/access-entries/{p}` | Describe, Update, DeleteAccessEntry (delete cascades to its policies) |
    /// | POST | `/clusters/{c}/access-entries/{p}/access-policies` | AssociateAccessPolicy, body `{"policyArn": …, "accessScope": {"type": "cluster"}}` |
    /// | GET | `/clusters/{c}/access-entries/{p}/access-policies` | ListAssociatedAccessPolicies → `{"associatedAccessPolicies": [{"policyArn", "accessScope", …}]}` |
    /// | DELETE | `/clusters/{c}/access-entries/{p}/access-policies/{a}` | DisassociateAccessPolicy |
    ///
    /// Errors come back as `{"__type": "ResourceNotFoundException", "message": …}`
    /// with a 4xx status. Unknown paths answer 400 `InvalidRequestException`.
    /// MiniStack decodes the path before matching (and unquotes the ARN once
    /// more), so raw ARNs with `/` and `:` also work, but encoding them is what
    /// the AWS SDK does.
    pub async fn eks_json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .unwrap_or_else(|_| panic!("not an HTTP method: {method}"));
        let url = format!("{}{}", self.endpoint, path);
        let mut request = reqwest::Client::new()
            .request(method.clone(), &url)
            .header("Authorization", EKS_AUTHORIZATION);
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("EKS {method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("EKS {method} {url}: reading answer: {e}"));
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }
}

impl Drop for MiniStack {
    fn drop(&mut self) {
        // SIGKILL rather than a polite stop: the state is throwaway and a hung
        // shutdown must not stall the test. Errors mean it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes an ARN for use as one path segment, as the AWS SDK does
/// for `{principalArn}` and `{policyArn}` labels.
pub fn encode_arn(arn: &str) -> String {
    let mut out = String::with_capacity(arn.len() * 3);
    for byte in arn.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/test-tools` once per test process; the script itself is
/// idempotent and serialises concurrent installs across processes.
pub fn ensure_tools() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let script = repo_root().join("scripts/test-tools");
        let output = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}):\n{}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding a free loopback port")
}

fn try_start(binary: &Path) -> Result<MiniStack, String> {
    try_start_on(binary, free_port())
}

fn try_start_on(binary: &Path, port: u16) -> Result<MiniStack, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("creating temp dir: {e}"))?;
    let log_path = dir.path().join("ministack.log");
    let log = File::create(&log_path).map_err(|e| format!("creating log: {e}"))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("duplicating log handle: {e}"))?;

    let child = Command::new(binary)
        .env("GATEWAY_PORT", port.to_string())
        .env("MINISTACK_HOST", "127.0.0.1")
        // Loopback only: nothing outside this machine should reach the test stack.
        .env("BIND_HOST", "127.0.0.1")
        // MiniStack writes a pid file named after the port into TMPDIR; a
        // killed stack would otherwise leave it behind in /tmp.
        .env("TMPDIR", dir.path())
        // With a Docker daemon, MiniStack backs each EKS cluster with a k3s
        // container and, at boot, removes every container it labelled, which
        // includes those of stacks other tests run concurrently. Pointing it
        // at a socket that does not exist keeps it a pure API emulator.
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", binary.display()))?;

    let mut stack = MiniStack {
        endpoint: format!("http://127.0.0.1:{port}"),
        port,
        child,
        dir,
    };

    let deadline = Instant::now() + START_DEADLINE;
    loop {
        // If another server took the port first, MiniStack exits on its own
        // busy-port check; requiring the child to be alive after the answer
        // keeps us from mistaking that server for ours in most interleavings.
        if answers_http(port) && matches!(stack.child.try_wait(), Ok(None)) {
            return Ok(stack);
        }
        if let Ok(Some(status)) = stack.child.try_wait() {
            return Err(format!(
                "MiniStack on port {port} exited early ({status}):\n{}",
                stack.log()
            ));
        }
        if Instant::now() >= deadline {
            // Dropping `stack` kills the child.
            return Err(format!(
                "MiniStack on port {port} did not answer HTTP within {START_DEADLINE:?}:\n{}",
                stack.log()
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether something speaking HTTP listens on the port; any status counts,
/// since all we need to know is that the server loop is up.
fn answers_http(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, POLL_INTERVAL) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "GET /_ministack/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}
