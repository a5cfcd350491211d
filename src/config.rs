//! `tollgate.toml` (spec 8.1): parsing with errors that name the key and the
//! line, and resolution of defaults → cluster → role into one policy per role.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::domain::backstop::{Backstop, DEFAULT_GRACE, DEFAULT_GROUP};
use crate::domain::namespaces::{validate_glob, NamespaceRules};
use crate::domain::policy::{
    BreakGlass, ClusterPolicy, IdentityPolicy, Limits, RolePolicy, Strategy,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: line {line}: `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

pub const EKS_POLICY_ARN_PREFIX: &str = "arn:aws:eks::aws:cluster-access-policy/";

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}); use a value like \"90m\", \"2h\" or \"1h30m\""
        ))
    })
}

/// The keys of `[defaults]`, which any cluster or role may override; a macro
/// keeps the three sections' lists identical while `deny_unknown_fields`
/// (which does not combine with `flatten`) stays on.
macro_rules! with_limit_keys {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        struct $name {
            #[serde(default, deserialize_with = "de_duration")]
            min_duration: Option<Duration>,
            #[serde(default, deserialize_with = "de_duration")]
            max_duration: Option<Duration>,
            #[serde(default, deserialize_with = "de_duration")]
            default_duration: Option<Duration>,
            #[serde(default, deserialize_with = "de_duration")]
            approval_timeout: Option<Duration>,
            #[serde(default, deserialize_with = "de_duration")]
            reminder_before: Option<Duration>,
            #[serde(default, deserialize_with = "de_duration")]
            max_total_duration: Option<Duration>,
            required_approvals: Option<u32>,
            allow_self_approval: Option<bool>,
            require_reason: Option<bool>,
            /// Spec 9.7 (globs); not limits, so resolved apart from them.
            deny_namespaces: Option<Vec<String>>,
            sensitive_namespaces: Option<Vec<String>>,
            $($(#[$fmeta])* $field: $ty,)*
        }

        impl $name {
            fn limit_overrides(&self) -> LimitOverrides {
                LimitOverrides {
                    min_duration: self.min_duration,
                    max_duration: self.max_duration,
                    default_duration: self.default_duration,
                    approval_timeout: self.approval_timeout,
                    reminder_before: self.reminder_before,
                    // A cluster setting, not a role's (the reconciler
                    // runs per cluster): only `[defaults]` and a cluster
                    // have the key, and add it to these.
                    reconcile_interval: None,
                    max_total_duration: self.max_total_duration,
                    required_approvals: self.required_approvals,
                    allow_self_approval: self.allow_self_approval,
                    require_reason: self.require_reason,
                }
            }
        }
    };
}

/// `deny_namespaces` and `sensitive_namespaces` as set at one level
/// (`None`: inherited from the level above).
#[derive(Debug, Clone, Default)]
struct NamespaceKeys {
    deny: Option<Vec<String>>,
    sensitive: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LimitOverrides {
    min_duration: Option<Duration>,
    max_duration: Option<Duration>,
    default_duration: Option<Duration>,
    approval_timeout: Option<Duration>,
    reminder_before: Option<Duration>,
    reconcile_interval: Option<Duration>,
    max_total_duration: Option<Duration>,
    required_approvals: Option<u32>,
    allow_self_approval: Option<bool>,
    require_reason: Option<bool>,
}

impl LimitOverrides {
    fn apply(&self, base: &Limits) -> Limits {
        Limits {
            min_duration: self.min_duration.unwrap_or(base.min_duration),
            max_duration: self.max_duration.unwrap_or(base.max_duration),
            default_duration: self.default_duration.unwrap_or(base.default_duration),
            approval_timeout: self.approval_timeout.unwrap_or(base.approval_timeout),
            reminder_before: self.reminder_before.unwrap_or(base.reminder_before),
            reconcile_interval: self.reconcile_interval.unwrap_or(base.reconcile_interval),
            max_total_duration: self.max_total_duration.unwrap_or(base.max_total_duration),
            required_approvals: self.required_approvals.unwrap_or(base.required_approvals),
            allow_self_approval: self.allow_self_approval.unwrap_or(base.allow_self_approval),
            require_reason: self.require_reason.unwrap_or(base.require_reason),
        }
    }
}

const BUILTIN_LIMITS: Limits = Limits {
    min_duration: Duration::from_secs(5 * 60),
    max_duration: Duration::from_secs(8 * 3600),
    default_duration: Duration::from_secs(3600),
    approval_timeout: Duration::from_secs(30 * 60),
    reminder_before: Duration::from_secs(10 * 60),
    reconcile_interval: Duration::from_secs(5 * 60),
    max_total_duration: Duration::from_secs(12 * 3600),
    required_approvals: 1,
    allow_self_approval: false,
    require_reason: false,
};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    slack: SlackSection,
    #[serde(default)]
    identity: IdentitySection,
    #[serde(default)]
    defaults: DefaultsSection,
    #[serde(default)]
    clusters: Vec<ClusterSection>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub public_url: Option<String>,
    /// Names this installation on every object it creates
    /// (`tollgate-instance` tag, `tollgate.dev/instance` label).
    #[serde(default = "default_instance")]
    pub instance: String,
    /// `/metrics` on its own listener, never behind the Slack ingress;
    /// unset: no metrics endpoint at all.
    pub metrics_listen: Option<String>,
    /// The Kubernetes namespace Tollgate runs in: never granted, on any
    /// cluster (spec 9.7).
    #[serde(default = "default_server_namespace")]
    pub namespace: String,
    /// Connections held open at once on the Slack listener (spec 9.9);
    /// one more is answered 503 at once and closed, so a flood of stalled
    /// connections cannot grow memory without bound.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
            public_url: None,
            instance: default_instance(),
            metrics_listen: None,
            namespace: default_server_namespace(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_server_namespace() -> String {
    crate::domain::namespaces::DEFAULT_SERVER_NAMESPACE.into()
}

pub const DEFAULT_INSTANCE: &str = "tollgate";

fn default_instance() -> String {
    DEFAULT_INSTANCE.into()
}

/// An instance name must be both an EKS tag value and a Kubernetes label
/// value: 1-63 characters, letters, digits, `-`, `_`, `.`, starting and
/// ending with a letter or digit.
pub fn valid_instance(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sled,
    Dynamodb,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub backend: Backend,
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    pub table: Option<String>,
    /// Spec 9.8: the NAME of the environment variable holding the row
    /// integrity key (never the key itself); `main` reads it once.
    pub integrity_key_env: Option<String>,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            backend: Backend::Sled,
            path: default_store_path(),
            table: None,
            integrity_key_env: None,
        }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("./tollgate-data")
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SlackSection {
    pub api_url: Option<String>,
    /// Commands and interactions for another Slack app are refused.
    pub app_id: Option<String>,
    pub security_channel: Option<String>,
    /// Standing-access summary to `security_channel` (spec section 12).
    #[serde(default)]
    pub standing_access_digest: Digest,
    /// Slash commands one user may send in a minute (spec 9.9); more are
    /// refused with the time to wait.
    #[serde(default = "default_commands_per_minute")]
    pub commands_per_minute: u32,
}

fn default_commands_per_minute() -> u32 {
    20
}

impl Default for SlackSection {
    fn default() -> Self {
        SlackSection {
            api_url: None,
            app_id: None,
            security_channel: None,
            standing_access_digest: Digest::default(),
            commands_per_minute: default_commands_per_minute(),
        }
    }
}

/// `[slack] standing_access_digest`.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Digest {
    #[default]
    Off,
    /// Mondays 09:00 UTC.
    Weekly,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IdentitySection {
    principal_template: Option<String>,
    #[serde(default)]
    principals: BTreeMap<String, String>,
    allowed_email_domains: Option<Vec<String>>,
    #[serde(default)]
    allow_guests: bool,
}

with_limit_keys! {
    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct DefaultsSection {
        /// Per user, across every cluster: it bounds what one person can
        /// put in front of approvers, so it is not a per-role setting.
        max_pending_per_user: Option<u32>,
        #[serde(default, deserialize_with = "de_duration")]
        reconcile_interval: Option<Duration>,
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
enum StrategyName {
    #[default]
    AccessEntry,
    SessionRbac,
    AwsAuth,
}

with_limit_keys! {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ClusterSection {
        name: String,
        region: String,
        account_id: String,
        assume_role_arn: Option<String>,
        #[serde(default)]
        strategy: StrategyName,
        endpoint: Option<String>,
        ca_file: Option<String>,
        approval_channel: String,
        #[serde(default)]
        approvers: Vec<String>,
        #[serde(default)]
        dm_approvers: bool,
        #[serde(default)]
        requesters: Vec<String>,
        default_role: Option<String>,
        break_glass: Option<BreakGlassSection>,
        backstop: Option<BackstopSection>,
        #[serde(default)]
        roles: BTreeMap<String, RoleSection>,
        #[serde(default, deserialize_with = "de_duration")]
        reconcile_interval: Option<Duration>,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlassSection {
    #[serde(default)]
    allowed: Vec<String>,
    #[serde(default, deserialize_with = "de_duration")]
    max_duration: Option<Duration>,
}

/// `[clusters.backstop]` (spec 10.1).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackstopSection {
    scheduler_role_arn: String,
    #[serde(default, deserialize_with = "de_duration")]
    grace: Option<Duration>,
    group: Option<String>,
}

with_limit_keys! {
    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RoleSection {
        access_policy: Option<String>,
        cluster_role: Option<String>,
        groups: Option<Vec<String>>,
        #[serde(default)]
        namespaced: bool,
        #[serde(default)]
        auto_approve: Vec<String>,
        approvers: Option<Vec<String>>,
        requesters: Option<Vec<String>>,
        /// Spec 9.7: the only namespaces this role reaches (globs);
        /// replaces `deny_namespaces` for it.
        namespaces: Option<Vec<String>>,
    }
}

/// The whole configuration, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: String,
    pub server: ServerSection,
    pub store: StoreSection,
    pub slack: SlackSection,
    pub identity: IdentityPolicy,
    /// `[defaults] max_pending_per_user`.
    pub max_pending_per_user: u32,
    pub clusters: Vec<ClusterPolicy>,
    /// `serve --dry-run`: the whole flow runs, access is never changed.
    pub dry_run: bool,
}

impl Config {
    pub fn cluster(&self, name: &str) -> Option<&ClusterPolicy> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Resolver { text, path }.resolve(file)
    }
}

struct Resolver<'a> {
    text: &'a str,
    path: &'a str,
}

impl Resolver<'_> {
    fn invalid(&self, section: Section<'_>, key: &str, message: String) -> ConfigError {
        let (line, shown) = locate(self.text, section, key);
        ConfigError::Invalid {
            path: self.path.to_string(),
            line,
            key: shown,
            message,
        }
    }

    fn resolve(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let defaults = LimitOverrides {
            reconcile_interval: file.defaults.reconcile_interval,
            ..file.defaults.limit_overrides()
        }
        .apply(&BUILTIN_LIMITS);
        self.check_limits(&defaults, Section::Table("defaults"))?;
        if !valid_instance(&file.server.instance) {
            return Err(self.invalid(
                Section::Table("server"),
                "instance",
                format!(
                    "`{}` is not a valid instance name: 1-63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit",
                    file.server.instance
                ),
            ));
        }
        if crate::domain::command::validate_namespace(&file.server.namespace).is_err() {
            return Err(self.invalid(
                Section::Table("server"),
                "namespace",
                format!(
                    "`{}` is not a Kubernetes namespace name: lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit",
                    file.server.namespace
                ),
            ));
        }
        let default_ns = NamespaceKeys {
            deny: self.globs(
                Section::Table("defaults"),
                "deny_namespaces",
                &file.defaults.deny_namespaces,
            )?,
            sensitive: self.globs(
                Section::Table("defaults"),
                "sensitive_namespaces",
                &file.defaults.sensitive_namespaces,
            )?,
        };
        if file.store.backend == Backend::Dynamodb && file.store.table.is_none() {
            return Err(self.invalid(
                Section::Table("store"),
                "backend",
                "the dynamodb backend needs `table` in [store]".into(),
            ));
        }
        if let Some(url) = &file.slack.api_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(self.invalid(
                    Section::Table("slack"),
                    "api_url",
                    "must be an http(s) URL".into(),
                ));
            }
        }
        if file.slack.standing_access_digest == Digest::Weekly
            && file.slack.security_channel.is_none()
        {
            return Err(self.invalid(
                Section::Table("slack"),
                "standing_access_digest",
                "a weekly digest is posted to `security_channel`; set it in [slack]".into(),
            ));
        }
        if let Some(id) = &file.slack.app_id {
            if !(id.starts_with('A')
                && id.len() > 1
                && id
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
            {
                return Err(self.invalid(
                    Section::Table("slack"),
                    "app_id",
                    "must be a Slack app id like \"A0123ABCDEF\" (Basic Information page of the app)".into(),
                ));
            }
        }
        if let Some(addr) = &file.server.metrics_listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.invalid(
                    Section::Table("server"),
                    "metrics_listen",
                    "must be an address and port, e.g. \"0.0.0.0:9090\"".into(),
                ));
            }
            if *addr == file.server.listen {
                return Err(self.invalid(
                    Section::Table("server"),
                    "metrics_listen",
                    "must differ from `listen`: metrics never share the Slack listener".into(),
                ));
            }
        }
        if file.server.max_connections == 0 || file.server.max_connections > 65_536 {
            return Err(self.invalid(
                Section::Table("server"),
                "max_connections",
                "must be between 1 and 65536".into(),
            ));
        }
        if file.slack.commands_per_minute == 0 {
            return Err(self.invalid(
                Section::Table("slack"),
                "commands_per_minute",
                "must be at least 1".into(),
            ));
        }
        let identity = self.resolve_identity(&file.identity)?;
        let max_pending_per_user = file.defaults.max_pending_per_user.unwrap_or(5);
        if max_pending_per_user == 0 {
            return Err(self.invalid(
                Section::Table("defaults"),
                "max_pending_per_user",
                "must be at least 1".into(),
            ));
        }
        let mut clusters: Vec<ClusterPolicy> = Vec::new();
        for (index, c) in file.clusters.iter().enumerate() {
            let cluster =
                self.resolve_cluster(index, c, &defaults, &default_ns, &file.server.namespace)?;
            if clusters.iter().any(|other| other.name == cluster.name) {
                return Err(self.invalid(
                    Section::Cluster(index),
                    "name",
                    format!("cluster `{}` is defined twice", cluster.name),
                ));
            }
            clusters.push(cluster);
        }
        Ok(Config {
            path: self.path.to_string(),
            server: file.server,
            store: file.store,
            slack: file.slack,
            identity,
            max_pending_per_user,
            clusters,
            dry_run: false,
        })
    }

    /// `[identity]` (spec 9.1): a template that reads the email needs the
    /// domains it may come from, and every ARN it can produce, like every
    /// ARN of the table, must have the strict IAM shape.
    fn resolve_identity(&self, id: &IdentitySection) -> Result<IdentityPolicy, ConfigError> {
        use crate::domain::identity::{check_arn, uses_email};
        let here = Section::Table("identity");
        let domains: Vec<String> = id
            .allowed_email_domains
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        for d in &domains {
            let ok = !d.is_empty()
                && d.contains('.')
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !ok {
                return Err(self.invalid(
                    here,
                    "allowed_email_domains",
                    format!("`{d}` is not a domain name like \"example.com\""),
                ));
            }
        }
        if let Some(template) = &id.principal_template {
            if uses_email(template) && domains.is_empty() {
                // The line is the template's: that is what needs the key.
                let (line, _) = locate(self.text, here, "principal_template");
                return Err(ConfigError::Invalid {
                    path: self.path.to_string(),
                    line,
                    key: "identity.allowed_email_domains".into(),
                    message: "required when `principal_template` uses {email} or {email_local}: list the email domains whose users may get a principal, e.g. allowed_email_domains = [\"example.com\"]".into(),
                });
            }
            // alice@a.example and alice@b.example would share one principal.
            if template.contains("{email_local}")
                && !template.contains("{email}")
                && domains.len() > 1
            {
                return Err(self.invalid(
                    here,
                    "principal_template",
                    format!(
                        "uses {{email_local}} with {} allowed email domains, so people with the same name in different domains would get the same principal: allow one domain, or use {{email}} or [identity.principals]",
                        domains.len()
                    ),
                ));
            }
            let sample = template
                .replace("{account_id}", "111122223333")
                .replace("{email_local}", "alice")
                .replace("{email}", "alice@example.com");
            if let Err(why) = check_arn(&sample) {
                return Err(self.invalid(
                    here,
                    "principal_template",
                    format!("must give an IAM role or user ARN, e.g. \"arn:aws:iam::{{account_id}}:role/{{email_local}}\" ({why} for alice@example.com)"),
                ));
            }
        }
        for (email, arn) in &id.principals {
            if let Err(why) = check_arn(arn) {
                return Err(self.invalid(
                    Section::Table("identity.principals"),
                    email,
                    format!("`{arn}` is not a well-formed IAM role or user ARN: {why}"),
                ));
            }
        }
        Ok(IdentityPolicy {
            principal_template: id.principal_template.clone(),
            principals: id
                .principals
                .iter()
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.clone()))
                .collect(),
            allowed_email_domains: domains,
            allow_guests: id.allow_guests,
        })
    }

    fn resolve_cluster(
        &self,
        index: usize,
        c: &ClusterSection,
        defaults: &Limits,
        default_ns: &NamespaceKeys,
        server_namespace: &str,
    ) -> Result<ClusterPolicy, ConfigError> {
        let here = Section::Cluster(index);
        let name_ok = !c.name.is_empty()
            && c.name.len() <= 100
            && c.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
        if !name_ok {
            return Err(self.invalid(
                here,
                "name",
                "cluster names are 1-100 letters, digits, `-` or `_`".into(),
            ));
        }
        if c.account_id.len() != 12 || !c.account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(
                here,
                "account_id",
                format!("`{}` is not a 12-digit AWS account id", c.account_id),
            ));
        }
        if c.region.is_empty() {
            return Err(self.invalid(here, "region", "must not be empty".into()));
        }
        if c.approval_channel.is_empty() {
            return Err(self.invalid(
                here,
                "approval_channel",
                "must be a Slack channel id".into(),
            ));
        }
        if c.roles.is_empty() {
            return Err(self.invalid(
                here,
                "roles",
                format!(
                    "cluster `{}` has no roles: add a [clusters.roles.<name>] table",
                    c.name
                ),
            ));
        }
        let strategy = match c.strategy {
            StrategyName::AccessEntry => Strategy::AccessEntry,
            StrategyName::SessionRbac => Strategy::SessionRbac,
            StrategyName::AwsAuth => Strategy::AwsAuth,
        };
        let cluster_limits = LimitOverrides {
            reconcile_interval: c.reconcile_interval,
            ..c.limit_overrides()
        }
        .apply(defaults);
        self.check_limits(&cluster_limits, here)?;
        let cluster_ns = NamespaceKeys {
            deny: self
                .globs(here, "deny_namespaces", &c.deny_namespaces)?
                .or_else(|| default_ns.deny.clone()),
            sensitive: self
                .globs(here, "sensitive_namespaces", &c.sensitive_namespaces)?
                .or_else(|| default_ns.sensitive.clone()),
        };
        let mut roles = BTreeMap::new();
        for (role_name, r) in &c.roles {
            let role_here = Section::Role(index, role_name);
            let limits = r.limit_overrides().apply(&cluster_limits);
            self.check_limits(&limits, role_here)?;
            let access_policy = match &r.access_policy {
                Some(p) => Some(
                    self.policy_arn(p)
                        .map_err(|m| self.invalid(role_here, "access_policy", m))?,
                ),
                None => None,
            };
            match strategy {
                Strategy::AccessEntry if access_policy.is_none() => {
                    return Err(self.invalid(role_here, "access_policy", format!(
                        "role `{role_name}` needs `access_policy` on an access-entry cluster, e.g. \"AmazonEKSViewPolicy\""
                    )));
                }
                Strategy::SessionRbac if r.cluster_role.is_none() => {
                    return Err(self.invalid(
                        role_here,
                        "cluster_role",
                        format!(
                            "role `{role_name}` needs `cluster_role` on a session-rbac cluster"
                        ),
                    ));
                }
                Strategy::AwsAuth if r.namespaced => {
                    return Err(self.invalid(
                        role_here,
                        "namespaced",
                        format!("role `{role_name}` cannot be namespaced on an aws-auth cluster: aws-auth groups are cluster-wide"),
                    ));
                }
                Strategy::AwsAuth if r.groups.as_ref().is_none_or(|g| g.is_empty()) => {
                    return Err(self.invalid(
                        role_here,
                        "groups",
                        format!("role `{role_name}` needs `groups` on an aws-auth cluster"),
                    ));
                }
                _ => {}
            }
            let namespace_rules =
                self.namespace_rules(role_here, r, &cluster_ns, strategy, server_namespace)?;
            roles.insert(
                role_name.clone(),
                RolePolicy {
                    name: role_name.clone(),
                    access_policy,
                    cluster_role: r.cluster_role.clone(),
                    groups: r.groups.clone().unwrap_or_default(),
                    namespaced: r.namespaced,
                    auto_approve: r.auto_approve.clone(),
                    approvers: r.approvers.clone().unwrap_or_else(|| c.approvers.clone()),
                    requesters: r.requesters.clone().unwrap_or_else(|| c.requesters.clone()),
                    limits,
                    namespace_rules,
                },
            );
        }
        if let Some(default_role) = &c.default_role {
            if !roles.contains_key(default_role) {
                return Err(self.invalid(
                    here,
                    "default_role",
                    format!(
                        "`{default_role}` is not one of this cluster's roles ({})",
                        roles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        for id in &c.approvers {
            if !(id.starts_with('U') || id.starts_with('W') || id.starts_with('S')) {
                return Err(self.invalid(
                    here,
                    "approvers",
                    format!("`{id}` is not a Slack user id (U…/W…) or user-group id (S…)"),
                ));
            }
        }
        let break_glass = c.break_glass.as_ref().map(|b| BreakGlass {
            allowed: b.allowed.clone(),
            max_duration: b.max_duration.unwrap_or(Duration::from_secs(3600)),
        });
        let backstop = match &c.backstop {
            Some(b) => Some(self.resolve_backstop(index, c, strategy, b)?),
            None => None,
        };
        Ok(ClusterPolicy {
            name: c.name.clone(),
            region: c.region.clone(),
            account_id: c.account_id.clone(),
            assume_role_arn: c.assume_role_arn.clone(),
            strategy,
            endpoint: c.endpoint.clone(),
            ca_file: c.ca_file.clone(),
            approval_channel: c.approval_channel.clone(),
            dm_approvers: c.dm_approvers,
            default_role: c.default_role.clone(),
            roles,
            break_glass,
            reconcile_interval: cluster_limits.reconcile_interval,
            backstop,
        })
    }

    fn resolve_backstop(
        &self,
        index: usize,
        c: &ClusterSection,
        strategy: Strategy,
        b: &BackstopSection,
    ) -> Result<Backstop, ConfigError> {
        let here = Section::Backstop(index);
        if strategy != Strategy::AccessEntry {
            // The line of the table itself: that is what has to go.
            let (line, _) = locate(self.text, here, "");
            return Err(ConfigError::Invalid {
                path: self.path.to_string(),
                line,
                key: format!("clusters[{index}].backstop"),
                message: format!(
                    "cluster `{}` uses the {} strategy: the backstop undoes EKS access-policy associations, so it exists only on access-entry clusters",
                    c.name,
                    strategy.name()
                ),
            });
        }
        let role = &b.scheduler_role_arn;
        let role_ok = crate::domain::identity::check_arn(role)
            .and_then(|()| {
                if role.contains(":role/") {
                    Ok(())
                } else {
                    Err("it names a user, and Scheduler can only assume a role".into())
                }
            })
            .and_then(|()| {
                // Scheduler passes only roles of the schedule's own account,
                // and schedules live in the cluster's account.
                if role.split(':').nth(4) == Some(c.account_id.as_str()) {
                    Ok(())
                } else {
                    Err(format!(
                        "it is not in the cluster's account {}",
                        c.account_id
                    ))
                }
            });
        if let Err(why) = role_ok {
            return Err(self.invalid(
                here,
                "scheduler_role_arn",
                format!("`{role}` is not a usable IAM role ARN for EventBridge Scheduler: {why}, e.g. \"arn:aws:iam::{}:role/tollgate-backstop\"", c.account_id),
            ));
        }
        let grace = b.grace.unwrap_or(DEFAULT_GRACE);
        let group = b.group.clone().unwrap_or_else(|| DEFAULT_GROUP.to_string());
        let group_ok = !group.is_empty()
            && group.len() <= 64
            && group
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !group_ok {
            return Err(self.invalid(
                here,
                "group",
                format!(
                    "`{group}` is not a schedule group name: 1-64 letters, digits, `-`, `_` or `.`"
                ),
            ));
        }
        Ok(Backstop {
            role_arn: role.clone(),
            grace,
            group,
        })
    }

    /// A list of namespace globs (spec 9.7), each checked, the key's line
    /// named when one is not a pattern.
    fn globs(
        &self,
        at: Section<'_>,
        key: &str,
        list: &Option<Vec<String>>,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(list) = list else {
            return Ok(None);
        };
        for pattern in list {
            if let Err(why) = validate_glob(pattern) {
                return Err(self.invalid(at, key, why));
            }
        }
        Ok(Some(list.clone()))
    }

    /// One role's namespace rules: its own keys, else the cluster's, else
    /// `[defaults]`, else the built-in deny list.
    fn namespace_rules(
        &self,
        at: Section<'_>,
        r: &RoleSection,
        cluster: &NamespaceKeys,
        strategy: Strategy,
        server_namespace: &str,
    ) -> Result<NamespaceRules, ConfigError> {
        let allow = self.globs(at, "namespaces", &r.namespaces)?;
        if let Some(allow) = &allow {
            if strategy == Strategy::AwsAuth {
                return Err(self.invalid(
                    at,
                    "namespaces",
                    "aws-auth groups are cluster-wide and `--ns` is refused on aws-auth clusters, so a namespace allow-list would refuse every request".into(),
                ));
            }
            if allow.is_empty() {
                return Err(self.invalid(
                    at,
                    "namespaces",
                    "an empty allow-list would refuse every request: list namespaces (globs) or remove the key".into(),
                ));
            }
            // Written out, it reads as granted; it never is (spec 9.7).
            if allow.iter().any(|p| p == server_namespace) {
                return Err(self.invalid(
                    at,
                    "namespaces",
                    format!("`{server_namespace}` is Tollgate's own namespace ([server] namespace) and is never granted; remove it from the allow-list"),
                ));
            }
        }
        let defaults = NamespaceRules::default();
        Ok(NamespaceRules {
            server: server_namespace.to_string(),
            deny: self
                .globs(at, "deny_namespaces", &r.deny_namespaces)?
                .or_else(|| cluster.deny.clone())
                .unwrap_or(defaults.deny),
            allow,
            sensitive: self
                .globs(at, "sensitive_namespaces", &r.sensitive_namespaces)?
                .or_else(|| cluster.sensitive.clone())
                .unwrap_or_default(),
        })
    }

    fn check_limits(&self, l: &Limits, at: Section<'_>) -> Result<(), ConfigError> {
        if l.min_duration.is_zero() {
            return Err(self.invalid(at, "min_duration", "must be more than zero".into()));
        }
        if l.max_duration < l.min_duration {
            return Err(self.invalid(
                at,
                "max_duration",
                format!(
                    "{} is below min_duration {}",
                    humantime::format_duration(l.max_duration),
                    humantime::format_duration(l.min_duration)
                ),
            ));
        }
        if l.default_duration < l.min_duration || l.default_duration > l.max_duration {
            return Err(self.invalid(
                at,
                "default_duration",
                format!(
                    "{} is outside min_duration..max_duration ({}..{})",
                    humantime::format_duration(l.default_duration),
                    humantime::format_duration(l.min_duration),
                    humantime::format_duration(l.max_duration)
                ),
            ));
        }
        if l.approval_timeout.is_zero() {
            return Err(self.invalid(at, "approval_timeout", "must be more than zero".into()));
        }
        if l.required_approvals == 0 {
            return Err(self.invalid(at, "required_approvals", "must be at least 1".into()));
        }
        if l.max_total_duration < l.max_duration {
            return Err(self.invalid(
                at,
                "max_total_duration",
                format!(
                    "{} is below max_duration {}: a grant with its extensions would be capped below one request",
                    humantime::format_duration(l.max_total_duration),
                    humantime::format_duration(l.max_duration)
                ),
            ));
        }
        Ok(())
    }

    fn policy_arn(&self, name: &str) -> Result<String, String> {
        let short = name.strip_prefix(EKS_POLICY_ARN_PREFIX).unwrap_or(name);
        let ok = short.starts_with("AmazonEKS")
            && short.ends_with("Policy")
            && short.chars().all(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(format!("{EKS_POLICY_ARN_PREFIX}{short}"))
        } else {
            Err(format!(
                "`{name}` is not an EKS access policy name (like \"AmazonEKSViewPolicy\") or ARN ({EKS_POLICY_ARN_PREFIX}…)"
            ))
        }
    }
}

#[derive(Clone, Copy)]
enum Section<'a> {
    Table(&'a str),
    Cluster(usize),
    Role(usize, &'a str),
    Backstop(usize),
}

/// Finds the line of a key for errors found after deserialisation, when toml's
/// own spans are gone. Falls back to the section header, then line 1.
fn locate(text: &str, section: Section<'_>, key: &str) -> (usize, String) {
    let lines: Vec<&str> = text.lines().collect();
    let header_of = |l: &str| -> Option<String> {
        let t = l.trim();
        if t.starts_with('[') {
            Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        } else {
            None
        }
    };
    let (wanted_header, shown) = match section {
        Section::Table(t) => (t.to_string(), format!("{t}.{key}")),
        Section::Cluster(i) => ("clusters".to_string(), format!("clusters[{i}].{key}")),
        Section::Backstop(i) => (
            "clusters.backstop".to_string(),
            format!("clusters[{i}].backstop.{key}"),
        ),
        Section::Role(i, r) => (
            format!("clusters.roles.{r}"),
            format!("clusters[{i}].roles.{r}.{key}"),
        ),
    };
    let cluster_index = match section {
        Section::Cluster(i) | Section::Role(i, _) | Section::Backstop(i) => Some(i),
        Section::Table(_) => None,
    };
    let mut clusters_seen: Option<usize> = None;
    let mut in_section = false;
    let mut header_line = 0;
    for (n, line) in lines.iter().enumerate() {
        if let Some(h) = header_of(line) {
            if h == "clusters" && line.trim().starts_with("[[") {
                clusters_seen = Some(clusters_seen.map_or(0, |c| c + 1));
            }
            let right_cluster = cluster_index.is_none() || clusters_seen == cluster_index;
            in_section = h == wanted_header && right_cluster;
            if in_section {
                header_line = n + 1;
            }
            continue;
        }
        if in_section {
            let t = line.trim_start();
            if t.starts_with(key) && t[key.len()..].trim_start().starts_with('=') {
                return (n + 1, shown);
            }
            // A quoted key, like an email in `[identity.principals]`.
            let quoted = format!("\"{key}\"");
            if t.starts_with(&quoted) && t[quoted.len()..].trim_start().starts_with('=') {
                return (n + 1, shown);
            }
        }
    }
    (header_line.max(1), shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[identity]
principal_template = "arn:aws:iam::{account_id}:role/{email_local}"
allowed_email_domains = ["example.com"]

[[clusters]]
name = "prod-cluster"
region = "us-east-1"
account_id = "111122223333"
approval_channel = "C0APPROVALS"
approvers = ["U0APP", "S0ONCALL"]
default_role = "view"
max_duration = "4h"

[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"

[clusters.roles.edit]
access_policy = "AmazonEKSEditPolicy"
namespaced = true
max_duration = "2h"
"#;

    fn line_of(text: &str, needle: &str) -> String {
        let n = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        format!("line {n}")
    }

    #[test]
    fn backstop_table_defaults_and_errors_name_the_line() {
        let with = |table: &str| format!("{MINIMAL}\n[clusters.backstop]\n{table}");
        let text =
            with("scheduler_role_arn = \"arn:aws:iam::111122223333:role/tollgate-backstop\"\n");
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let b = cfg.clusters[0].backstop.clone().unwrap();
        assert_eq!(
            b.role_arn,
            "arn:aws:iam::111122223333:role/tollgate-backstop"
        );
        assert_eq!(b.grace, Duration::from_secs(900));
        assert_eq!(b.group, "tollgate");
        assert!(Config::parse(MINIMAL, "t.toml").unwrap().clusters[0]
            .backstop
            .is_none());

        let text = with(
            "scheduler_role_arn = \"arn:aws:iam::111122223333:role/b\"\ngrace = \"2s\"\ngroup = \"jit.backstop\"\n",
        );
        let b = Config::parse(&text, "t.toml").unwrap().clusters[0]
            .backstop
            .clone()
            .unwrap();
        assert_eq!(
            (b.grace, b.group.as_str()),
            (Duration::from_secs(2), "jit.backstop")
        );

        for bad in [
            "arn:aws:iam::111122223333:role/*",
            "arn:aws:iam::111122223333:user/bob",
            "arn:aws:iam::444455556666:role/tollgate-backstop",
            "tollgate-backstop",
        ] {
            let text = with(&format!("scheduler_role_arn = \"{bad}\"\n"));
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                err.contains(&line_of(&text, bad)) && err.contains("scheduler_role_arn"),
                "{bad}: {err}"
            );
        }
        let text = with(
            "scheduler_role_arn = \"arn:aws:iam::111122223333:role/b\"\ngroup = \"no spaces\"\n",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains(&line_of(&text, "no spaces")), "{err}");
        let text =
            with("scheduler_role_arn = \"arn:aws:iam::111122223333:role/b\"\nwhen = \"1m\"\n");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("when"), "{err}");

        // Only access-entry clusters have an AWS-side backstop.
        let text = with("scheduler_role_arn = \"arn:aws:iam::111122223333:role/b\"\n")
            .replace(
                "default_role = \"view\"",
                "default_role = \"view\"\nstrategy = \"aws-auth\"",
            )
            .replace("namespaced = true\n", "")
            .replace(
                "access_policy = \"AmazonEKSViewPolicy\"",
                "groups = [\"viewers\"]",
            )
            .replace(
                "access_policy = \"AmazonEKSEditPolicy\"",
                "groups = [\"editors\"]",
            );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "[clusters.backstop]")) && err.contains("access-entry"),
            "{err}"
        );
    }

    #[test]
    fn weekly_digest_needs_a_security_channel_and_a_known_value() {
        let weekly = format!("[slack]\nstanding_access_digest = \"weekly\"\n{MINIMAL}");
        let err = Config::parse(&weekly, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("standing_access_digest") && err.contains("security_channel"),
            "{err}"
        );
        assert!(
            err.contains(&line_of(&weekly, "standing_access_digest")),
            "{err}"
        );
        let ok = weekly.replace("[slack]\n", "[slack]\nsecurity_channel = \"C0SEC\"\n");
        let config = Config::parse(&ok, "t.toml").unwrap();
        assert_eq!(config.slack.standing_access_digest, Digest::Weekly);
        let daily = ok.replace("\"weekly\"", "\"daily\"");
        let err = Config::parse(&daily, "t.toml").unwrap_err().to_string();
        assert!(err.contains("daily") && err.contains("weekly"), "{err}");
        assert_eq!(
            Config::parse(MINIMAL, "t.toml")
                .unwrap()
                .slack
                .standing_access_digest,
            Digest::Off
        );
    }

    #[test]
    fn resolves_defaults_cluster_role() {
        let cfg = Config::parse(MINIMAL, "t.toml").unwrap();
        let c = cfg.cluster("prod-cluster").unwrap();
        assert_eq!(c.strategy, Strategy::AccessEntry);
        let view = &c.roles["view"];
        assert_eq!(view.limits.max_duration, Duration::from_secs(4 * 3600));
        assert_eq!(view.limits.min_duration, Duration::from_secs(300));
        assert_eq!(
            view.access_policy.as_deref(),
            Some("arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy")
        );
        assert_eq!(view.approvers, vec!["U0APP", "S0ONCALL"]);
        assert_eq!(
            c.roles["edit"].limits.max_duration,
            Duration::from_secs(2 * 3600)
        );
        assert!(c.roles["edit"].namespaced);
        assert_eq!(cfg.store.backend, Backend::Sled);
        assert_eq!(cfg.server.listen, "0.0.0.0:8080");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("namespaced = true", "namespaced = true\nnamespacd = true");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("namespacd"), "{err}");
        assert!(err.contains(&line_of(&text, "namespacd")), "{err}");
    }

    /// The reconciler runs per cluster, so a role's `reconcile_interval`
    /// would be silently ignored: it is refused like any unknown key.
    #[test]
    fn reconcile_interval_is_a_cluster_key_not_a_role_key() {
        let text = MINIMAL.replace(
            "namespaced = true",
            "namespaced = true\nreconcile_interval = \"1m\"",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("reconcile_interval"), "{err}");
        assert!(err.contains(&line_of(&text, "reconcile_interval")), "{err}");
        let cluster = MINIMAL.replace(
            "default_role = \"view\"",
            "default_role = \"view\"\nreconcile_interval = \"1m\"",
        );
        let cfg = Config::parse(&cluster, "t.toml").unwrap();
        assert_eq!(cfg.clusters[0].reconcile_interval, Duration::from_secs(60));
        let defaults = format!("[defaults]\nreconcile_interval = \"2m\"\n{MINIMAL}");
        let cfg = Config::parse(&defaults, "t.toml").unwrap();
        assert_eq!(cfg.clusters[0].reconcile_interval, Duration::from_secs(120));
    }

    #[test]
    fn instance_defaults_and_is_validated() {
        let cfg = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(cfg.server.instance, "tollgate");
        for good in ["blue", "prod.eu-1", "a"] {
            let text = format!("[server]\ninstance = \"{good}\"\n{MINIMAL}");
            assert_eq!(
                Config::parse(&text, "t.toml").unwrap().server.instance,
                good
            );
        }
        for bad in ["", "-x", "x-", "a b", "a/b", &"x".repeat(64), "tollgate*"] {
            let text = format!("[server]\ninstance = \"{bad}\"\n{MINIMAL}");
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                err.contains("instance") && err.contains("line 2"),
                "{bad}: {err}"
            );
        }
    }

    /// Spec 9.7: defaults → cluster → role like the other defaults keys;
    /// the allow-list only on the role; every pattern checked, by line.
    #[test]
    fn namespace_rules_resolve_and_bad_patterns_name_key_and_line() {
        let cfg = Config::parse(MINIMAL, "t.toml").unwrap();
        let edit = &cfg.clusters[0].roles["edit"].namespace_rules;
        assert_eq!(edit.server, "tollgate");
        assert_eq!(
            edit.deny,
            vec!["kube-system", "kube-public", "kube-node-lease"]
        );
        assert_eq!((edit.allow.as_ref(), edit.sensitive.len()), (None, 0));

        let text = format!(
            "[server]\nnamespace = \"access\"\n[defaults]\ndeny_namespaces = [\"kube-*\"]\nsensitive_namespaces = [\"*-prod\"]\n{}",
            MINIMAL
                .replace(
                    "max_duration = \"4h\"",
                    "max_duration = \"4h\"\nsensitive_namespaces = [\"payments\"]"
                )
                .replace(
                    "namespaced = true",
                    "namespaced = true\nnamespaces = [\"team-*\"]\ndeny_namespaces = []"
                )
        );
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let view = &cfg.clusters[0].roles["view"].namespace_rules;
        assert_eq!(view.server, "access");
        assert_eq!(view.deny, vec!["kube-*"]);
        assert_eq!(view.sensitive, vec!["payments"], "the cluster's wins");
        let edit = &cfg.clusters[0].roles["edit"].namespace_rules;
        assert_eq!(edit.allow, Some(vec!["team-*".to_string()]));
        assert!(edit.deny.is_empty());

        for (extra, needle, key) in [
            (
                "[server]\nnamespace = \"Tollgate_NS\"\n",
                "Tollgate_NS",
                "server.namespace",
            ),
            (
                "[defaults]\ndeny_namespaces = [\"kube-system\", \"Kube-*\"]\n",
                "Kube-*",
                "defaults.deny_namespaces",
            ),
            (
                "[defaults]\nsensitive_namespaces = [\"pay ments\"]\n",
                "pay ments",
                "defaults.sensitive_namespaces",
            ),
        ] {
            let text = format!("{extra}{MINIMAL}");
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                err.contains(&line_of(&text, needle)) && err.contains(key),
                "{extra}: {err}"
            );
        }
        for (role_keys, needle, why) in [
            (
                "namespaces = [\"team/*\"]",
                "team/*",
                "not a namespace pattern",
            ),
            (
                "namespaces = [\"team-*\", \"tollgate\"]",
                "tollgate\"]",
                "never granted",
            ),
            ("namespaces = []", "namespaces = []", "empty allow-list"),
            (
                "sensitive_namespaces = [\"\"]",
                "sensitive_namespaces",
                "not a namespace pattern",
            ),
        ] {
            let text = MINIMAL.replace(
                "namespaced = true",
                &format!("namespaced = true\n{role_keys}"),
            );
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                err.contains(&line_of(&text, needle))
                    && err.contains("clusters[0].roles.edit.")
                    && err.contains(why),
                "{role_keys}: {err}"
            );
        }
        // aws-auth refuses `--ns`, so an allow-list would refuse everything.
        let text = MINIMAL
            .replace(
                "default_role = \"view\"",
                "default_role = \"view\"\nstrategy = \"aws-auth\"",
            )
            .replace("namespaced = true\n", "namespaces = [\"team-*\"]\n")
            .replace(
                "access_policy = \"AmazonEKSViewPolicy\"",
                "groups = [\"viewers\"]",
            )
            .replace(
                "access_policy = \"AmazonEKSEditPolicy\"",
                "groups = [\"editors\"]",
            );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "namespaces = [")) && err.contains("aws-auth"),
            "{err}"
        );
        // The key is a role's: not a cluster's or the defaults'.
        let text = format!("[defaults]\nnamespaces = [\"team-*\"]\n{MINIMAL}");
        assert!(Config::parse(&text, "t.toml")
            .unwrap_err()
            .to_string()
            .contains("namespaces"));
    }

    #[test]
    fn bad_duration_names_line() {
        let text = MINIMAL.replace("max_duration = \"4h\"", "max_duration = \"4 hours-ish\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "4 hours-ish")) && err.contains("not a duration"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = MINIMAL.replace("default_role = \"view\"", "default_role = \"admin\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "default_role"))
                && err.contains("clusters[0].default_role"),
            "{err}"
        );

        let text = MINIMAL.replace("\"AmazonEKSEditPolicy\"", "\"EditEverything\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "EditEverything"))
                && err.contains("roles.edit.access_policy"),
            "{err}"
        );

        let text = MINIMAL.replace("max_duration = \"2h\"", "max_duration = \"1m\"");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "\"1m\"")) && err.contains("roles.edit.max_duration"),
            "{err}"
        );

        let text = MINIMAL.replace("111122223333", "1234");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "account_id = ")) && err.contains("account_id"),
            "{err}"
        );
    }

    #[test]
    fn identity_and_limit_keys_are_checked() {
        // A template reading the email without the domains it may come from.
        let text = MINIMAL.replace("allowed_email_domains = [\"example.com\"]\n", "");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "principal_template"))
                && err.contains("identity.allowed_email_domains"),
            "{err}"
        );
        // A template without the email needs no domains.
        let text = text.replace("{email_local}", "shared-oncall");
        assert!(Config::parse(&text, "t.toml").is_ok());

        // {email_local} from two domains: two people, one principal.
        let two = MINIMAL.replace(
            "allowed_email_domains = [\"example.com\"]",
            "allowed_email_domains = [\"example.com\", \"contractor.example\"]",
        );
        let err = Config::parse(&two, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("identity.principal_template") && err.contains("same principal"),
            "{err}"
        );

        for bad in [
            "arn:aws:iam::{account_id}:role/*",
            "arn:aws:iam::{account_id}:group/{email_local}",
            "arn:aws:sts::{account_id}:assumed-role/x/{email_local}",
        ] {
            let text = MINIMAL.replace("arn:aws:iam::{account_id}:role/{email_local}", bad);
            let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains("identity.principal_template"), "{bad}: {err}");
        }

        let text = MINIMAL.replace(
            "[[clusters]]",
            "[identity.principals]\n\"Bob@Example.com\" = \"arn:aws:iam::111122223333:role/b{{x}}\"\n\n[[clusters]]",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains(&line_of(&text, "Bob@")) && err.contains("well-formed"),
            "{err}"
        );

        let cfg = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(cfg.identity.allowed_email_domains, vec!["example.com"]);
        assert!(!cfg.identity.allow_guests);
        assert_eq!(cfg.max_pending_per_user, 5);
        let view = &cfg.cluster("prod-cluster").unwrap().roles["view"];
        assert_eq!(
            view.limits.max_total_duration,
            Duration::from_secs(12 * 3600)
        );

        let text = MINIMAL.replace(
            "max_duration = \"2h\"",
            "max_duration = \"2h\"\nmax_total_duration = \"3h\"",
        );
        let cfg = Config::parse(&text, "t.toml").unwrap();
        let edit = &cfg.cluster("prod-cluster").unwrap().roles["edit"];
        assert_eq!(
            edit.limits.max_total_duration,
            Duration::from_secs(3 * 3600)
        );

        let text = MINIMAL.replace(
            "max_duration = \"2h\"",
            "max_duration = \"2h\"\nmax_total_duration = \"1h\"",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("roles.edit.max_total_duration"), "{err}");

        let text = format!("[defaults]\nmax_pending_per_user = 0\n{MINIMAL}");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("max_pending_per_user"),
            "{err}"
        );
        // Per user, so not a cluster key.
        let text = MINIMAL.replace(
            "max_duration = \"4h\"",
            "max_duration = \"4h\"\nmax_pending_per_user = 2",
        );
        assert!(Config::parse(&text, "t.toml").is_err());
    }

    #[test]
    fn strategy_specific_role_keys_required() {
        let text = MINIMAL.replace(
            "region = \"us-east-1\"",
            "region = \"us-east-1\"\nstrategy = \"session-rbac\"",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("cluster_role"), "{err}");
        let text = MINIMAL.replace(
            "region = \"us-east-1\"",
            "region = \"us-east-1\"\nstrategy = \"magic\"",
        );
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("magic") && err.contains(&line_of(&text, "magic")),
            "{err}"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tollgate.example.toml");
        if let Ok(text) = std::fs::read_to_string(path) {
            let cfg = Config::parse(&text, path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.clusters.is_empty());
        } else {
            panic!("tollgate.example.toml is missing");
        }
    }

    #[test]
    fn metrics_listen_and_app_id_are_checked() {
        let with = |extra: &str| format!("{extra}\n{MINIMAL}");
        let cfg = Config::parse(
            &with(
                "[server]\nmetrics_listen = \"127.0.0.1:9090\"\n[slack]\napp_id = \"A0TOLLGATE\"",
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(cfg.server.metrics_listen.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(cfg.slack.app_id.as_deref(), Some("A0TOLLGATE"));
        for (extra, key) in [
            ("[server]\nmetrics_listen = \"nine\"", "metrics_listen"),
            (
                "[server]\nlisten = \"0.0.0.0:8080\"\nmetrics_listen = \"0.0.0.0:8080\"",
                "metrics_listen",
            ),
            ("[slack]\napp_id = \"T0NOTANAPP\"", "app_id"),
        ] {
            let err = Config::parse(&with(extra), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn deployment_configmap_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/manifests/overlays/sled/configmap.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let cm: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let toml = cm["data"]["tollgate.toml"].as_str().unwrap();
        let cfg = Config::parse(toml, path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.store.path, PathBuf::from("/var/lib/tollgate"));
    }
}
