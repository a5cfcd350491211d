//! Runs the real `tollgate` binary as a process against a Slack stand-in
//! and MiniStack, as an operator would run it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ministack::MiniStack;

pub const BOT_TOKEN: &str = "xoxb-test-token-not-secret";
pub const SIGNING_SECRET: &str = "e2e-signing-secret-0123456789abcdef";

pub struct Tollgate {
    pub base: String,
    /// `http://127.0.0.1:PORT` of the metrics listener (`metrics_listen`),
    /// which the harness adds to every config that leaves it out.
    pub metrics_base: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Waits for `cond` with a deadline, polling; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

impl Tollgate {
    /// Writes `config` (with `{listen}` and `{data}` filled in) into `dir`
    /// and starts the server; returns once `/healthz` answers.
    pub async fn start(dir: &Path, config: &str, slack_api_url: &str, ms: &MiniStack) -> Tollgate {
        Tollgate::start_with_args(dir, config, slack_api_url, ms, &[]).await
    }

    /// As `start`, with extra arguments for `tollgate serve`.
    pub async fn start_with_args(
        dir: &Path,
        config: &str,
        slack_api_url: &str,
        ms: &MiniStack,
        args: &[&str],
    ) -> Tollgate {
        Tollgate::start_with_env(dir, config, slack_api_url, ms, args, &[]).await
    }

    /// As `start_with_args`, with extra environment variables.
    pub async fn start_with_env(
        dir: &Path,
        config: &str,
        slack_api_url: &str,
        ms: &MiniStack,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Tollgate {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{}", free_port());
        let config = if config.contains("metrics_listen") {
            config.to_string()
        } else {
            config.replacen(
                "listen = \"{listen}\"",
                "listen = \"{listen}\"\nmetrics_listen = \"{metrics_listen}\"",
                1,
            )
        };
        let config_text = config
            .replace("{listen}", &listen)
            .replace("{metrics_listen}", &metrics)
            .replace("{data}", &dir.join("data").display().to_string());
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, config_text).unwrap_or_else(|e| panic!("writing config: {e}"));
        let mut env = ms.aws_env();
        env.push(("SLACK_BOT_TOKEN".into(), BOT_TOKEN.into()));
        env.push(("SLACK_SIGNING_SECRET".into(), SIGNING_SECRET.into()));
        env.push(("SLACK_API_URL".into(), slack_api_url.into()));
        env.push(("RUST_LOG".into(), "info,tollgate=debug".into()));
        env.push(("LOG_FORMAT".into(), "json".into()));
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut t = Tollgate {
            base: format!("http://{listen}"),
            metrics_base: format!("http://{metrics}"),
            config_path,
            log_path: dir.join("tollgate.log"),
            child: None,
            env,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        t.spawn().await;
        t
    }

    /// Replaces the extra `serve` arguments for the next start.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Starts the server expecting it to refuse: waits (bounded) for it to
    /// exit with a failure and returns its log. Panics if it comes up.
    pub async fn start_refused(&mut self, within: Duration) -> String {
        self.spawn_child();
        let url = format!("{}/healthz", self.base);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                assert!(!status.success(), "refused with a failure status");
                return self.log();
            }
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                panic!(
                    "tollgate started when it should have refused:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tollgate neither refused nor came up within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn_child(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting tollgate: {e}"));
        self.child = Some(child);
    }

    async fn spawn(&mut self) {
        self.spawn_child();
        let url = format!("{}/healthz", self.base);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tollgate exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not come up:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no shutdown path runs, exactly like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the process to exit; its status.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("tollgate is not running"));
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "tollgate did not exit within {within:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    pub async fn restart(&mut self) -> Instant {
        self.kill9();
        let started = Instant::now();
        self.spawn().await;
        started
    }

    /// Sets (or clears) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Waits (bounded) for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("tollgate is not running"));
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP / SIGCONT: the process freezes mid-whatever and resumes
    /// later with its old view of the world, like a long GC pause or a
    /// descheduled VM.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .map(|c| c.id())
            .unwrap_or_else(|| panic!("tollgate is not running"));
        let status = std::process::Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill {sig}: {e}"));
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.kill9();
    }
}
