//! Process settings that are not in `tollgate.toml`: the timing of steps
//! and the Slack Web API's address. Read once, in `main`, from the
//! environment (and the config, for the Slack URL), then passed down; no
//! code below `main` reads these variables itself, so a test or a second
//! service in one process can use its own.

use std::time::Duration;

use crate::config::Config;
use crate::domain::integrity::{RowKey, MIN_KEY_BYTES};

pub const DEFAULT_SLACK_API_URL: &str = "https://slack.com/api";

/// First retry delay of a failing step (humantime); outage drills and tests
/// shorten it.
pub const RETRY_BASE_ENV: &str = "TOLLGATE_RETRY_BASE";
/// How long a replica's claim on a row and its principal lease last
/// (humantime, at least 1 s); drills and tests shorten it.
pub const CLAIM_TTL_ENV: &str = "TOLLGATE_CLAIM_TTL";
/// Another Slack Web API base URL (a stand-in in tests); wins over
/// `[slack] api_url`.
pub const SLACK_API_URL_ENV: &str = "SLACK_API_URL";

const RETRY_BASE: Duration = Duration::from_secs(2);
const CLAIM_TTL: Duration = Duration::from_secs(30);
/// The longest one step may take, whatever the claim: one stuck request
/// must not hold up every other due one for long.
const STEP_LIMIT_CAP: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// First retry delay of a failing step; later ones double (capped).
    pub retry_base: Duration,
    /// How long a claim on a row, and a principal lease, last: the failover
    /// time when a replica dies mid-step.
    pub claim_ttl: Duration,
    /// How long one converge (reading the grants in force, then the cloud
    /// calls) may take before it counts as a failed attempt.
    pub converge_limit: Duration,
    pub slack_api_url: String,
    /// The row integrity key (`[store] integrity_key_env`, spec 9.8), read
    /// by `integrity_key`; `None`: rows carry no MAC and none is checked.
    pub integrity: Option<RowKey>,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables::new(RETRY_BASE, CLAIM_TTL, DEFAULT_SLACK_API_URL.into())
    }
}

impl Tunables {
    /// The converge limit follows from the claim: see `step_limit`.
    pub fn new(retry_base: Duration, claim_ttl: Duration, slack_api_url: String) -> Self {
        let mut t = Tunables {
            retry_base,
            claim_ttl,
            converge_limit: Duration::ZERO,
            slack_api_url,
            integrity: None,
        };
        t.converge_limit = t.step_limit() * 2 / 5;
        t
    }

    /// Reads the variables above; an unset, empty or unparsable one keeps
    /// its default, as before (they are drill knobs, not configuration).
    pub fn from_env(config: &Config) -> Self {
        let duration = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| humantime::parse_duration(&v).ok())
        };
        let retry_base = duration(RETRY_BASE_ENV)
            .filter(|d| !d.is_zero())
            .unwrap_or(RETRY_BASE);
        let claim_ttl = duration(CLAIM_TTL_ENV)
            .filter(|d| *d >= Duration::from_secs(1))
            .unwrap_or(CLAIM_TTL);
        let slack_api_url = std::env::var(SLACK_API_URL_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| config.slack.api_url.clone())
            .unwrap_or_else(|| DEFAULT_SLACK_API_URL.to_string());
        Tunables::new(retry_base, claim_ttl, slack_api_url)
    }

    /// How long one step (grant, revoke, expire) may run before it is cut
    /// off and simply driven again (it is idempotent). Kept well inside the
    /// claim, so a step never outlives the claim it runs under; the
    /// converge limit is well inside this, which leaves room to record the
    /// outcome (and, for a grant, one cleanup).
    pub fn step_limit(&self) -> Duration {
        STEP_LIMIT_CAP.min(self.claim_ttl * 2 / 3)
    }
}

/// The row integrity key from the variable `[store] integrity_key_env`
/// names, or `None` when the config names none. A named variable that is
/// unset or shorter than `MIN_KEY_BYTES` is an error naming the variable,
/// never its value: a server told to check rows must not run without.
pub fn integrity_key(config: &Config) -> Result<Option<RowKey>, String> {
    let Some(name) = config.store.integrity_key_env.as_deref() else {
        return Ok(None);
    };
    let value = std::env::var_os(name).unwrap_or_default();
    let bytes = value.as_encoded_bytes();
    if bytes.is_empty() {
        return Err(format!(
            "{}: [store] integrity_key_env names the environment variable {name}, which is not set",
            config.path
        ));
    }
    RowKey::new(bytes).map(Some).ok_or_else(|| {
        format!(
            "{}: the environment variable {name} ([store] integrity_key_env) holds {} bytes; \
             the row integrity key must have at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
            config.path,
            bytes.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_claim() {
        let t = Tunables::default();
        assert_eq!(t.step_limit(), Duration::from_secs(20));
        assert_eq!(t.converge_limit, Duration::from_secs(8));
        let long = Tunables::new(RETRY_BASE, Duration::from_secs(600), String::new());
        assert_eq!(long.step_limit(), STEP_LIMIT_CAP);
        assert_eq!(long.converge_limit, Duration::from_secs(24));
    }
}
