//! The validated configuration (`Config` and its sections; the keys are in
//! docs/config.md), parsed from a file with the env overrides applied;
//! `ConfigError`, listing every problem; the upstream key as a `Secret`.

mod ca;
mod raw;
mod summary;
mod validate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub(crate) use ca::read_ca_file;
use raw::{RawConfig, RawRedis};
use validate::validate;

/// Every problem found in a config file, each naming the key it concerns.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// The shared upstream key. `Debug` never shows it, so it cannot reach a log
/// line by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// The most upstreams one configuration may list (the pool chooses among
/// them with bit sets).
pub(crate) const MAX_UPSTREAMS: usize = 64;

/// The upstream keys, by upstream name: read from the environment at
/// start and at each reload. `Debug` never shows them.
#[derive(Clone, Default)]
pub struct Keys {
    by_name: std::collections::HashMap<String, Secret>,
    /// The key of an upstream not named (every one, for `From<Secret>`).
    every: Secret,
}

impl Keys {
    /// The key `upstream` is sent.
    pub fn get(&self, upstream: &str) -> &Secret {
        self.by_name.get(upstream).unwrap_or(&self.every)
    }

    /// These keys with `upstream`'s set to `key`.
    pub fn with(mut self, upstream: &str, key: Secret) -> Keys {
        self.by_name.insert(upstream.to_string(), key);
        self
    }
}

impl From<Secret> for Keys {
    /// The same key for every upstream.
    fn from(every: Secret) -> Keys {
        Keys {
            by_name: Default::default(),
            every,
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    /// At least one; in the order written.
    pub upstreams: Vec<PeerConfig>,
    pub cache: CacheConfig,
    pub tenants: Vec<TenantConfig>,
    pub pricing: BTreeMap<String, Pricing>,
    /// `None`: every replica keeps its own state (docs/redis.md).
    pub redis: Option<RedisConfig>,
    pub budgets: BudgetsConfig,
}

/// What a request gets while Redis is unavailable (`redis.on_error` in
/// docs/config.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Each replica decides on its own.
    Local,
    /// A tenant with a limit is answered 503 `shared_state_unavailable`.
    Deny,
}

/// `[redis]`: state shared by every replica that uses the same server and
/// `key_prefix`. Fixed at start.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// May carry a password: never printed whole (see `redacted_url`).
    pub url: String,
    pub cluster: bool,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: OnError,
    pub limits: bool,
    pub cache: bool,
    pub coalesce: bool,
    pub cache_max_entry_bytes: u64,
}

impl RedisConfig {
    /// The URL with any password replaced by `*****`, for logs and summaries.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .field("coalesce", &self.coalesce)
            .field("cache_max_entry_bytes", &self.cache_max_entry_bytes)
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://user:*****@host`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:*****")
            } else {
                "*****".to_string()
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// A client that accepts no bytes of its response this long is dropped.
    pub send_timeout: Duration,
    /// A client connection with no request in flight this long is closed.
    pub keepalive_timeout: Duration,
    /// Open client connections; past it, new ones wait in the backlog.
    pub max_connections: usize,
}

/// `[upstream]`: the settings every upstream shares.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_retries: u32,
    /// Consecutive failed attempts that rest an upstream (at least 1).
    pub eject_after: u32,
    /// How long the first rest lasts (doubling, at most 300 s).
    pub eject_for: Duration,
}

/// One upstream: an account behind a URL (`[[upstreams]]`, or the
/// `[upstream]` of a config without them, named `default`).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// `[a-z0-9_-]+`, unique.
    pub name: String,
    /// Scheme, authority and optional path prefix, without a trailing slash.
    pub base_url: String,
    /// Where its Messages API is; `None`: it serves none.
    pub anthropic_base_url: Option<String>,
    pub api_key_env: String,
    /// Its share of its tier's traffic (at least 1).
    pub weight: u32,
    /// Lower first.
    pub tier: u32,
    /// The models it serves, as clients name them; empty = any.
    pub models: Vec<String>,
    /// Client model name → the name this upstream gets.
    pub model_map: BTreeMap<String, String>,
    /// The account's in-flight cap; 0 = unlimited.
    pub max_concurrent: usize,
    /// `None` = balance polling off.
    pub balance_poll: Option<Duration>,
    /// Extra CA certificates (PEM) trusted for an https upstream, besides
    /// the public web roots. Relative to the config file's directory.
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Tenant,
    Shared,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub enabled: bool,
    pub max_bytes: u64,
    pub ttl: Duration,
    pub scope: CacheScope,
}

/// The limits of one tenant; a reload keeps limiter state when these are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// 0 = unlimited.
    pub requests_per_minute: u32,
    pub request_burst: u32,
    /// 0 = unlimited.
    pub tokens_per_minute: u64,
    /// 0 = unlimited.
    pub max_concurrent: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub name: String,
    pub key_sha256: Vec<[u8; 32]>,
    pub limits: LimitSpec,
    /// Empty = any model.
    pub models: Vec<String>,
    pub cache: bool,
    /// `None` = no spend cap.
    pub budget: Option<BudgetSpec>,
    /// The tenant's share of a full upstream's slots while its requests
    /// wait for them (at least 1).
    pub weight: u32,
}

/// A calendar period in UTC (docs/budgets.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    Day,
    /// ISO week, from Monday.
    Week,
    Month,
}

impl BudgetPeriod {
    pub fn label(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
        }
    }
}

/// A tenant's spend cap: USD per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSpec {
    pub usd: f64,
    pub period: BudgetPeriod,
}

/// `[budgets]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BudgetsConfig {
    /// Without Redis, where spend survives restarts; `None` = memory only.
    /// Relative to the config file's directory.
    pub state_path: Option<std::path::PathBuf>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    #[serde(default)]
    pub input_cache_hit: f64,
    #[serde(default)]
    pub input_cache_miss: f64,
    #[serde(default)]
    pub output: f64,
}

/// Environment variables that override config keys (docs/config.md,
/// "Environment").
pub const ENV_OVERRIDES: [(&str, &str); 4] = [
    ("SLUICE_LISTEN", "server.listen"),
    ("SLUICE_ADMIN_LISTEN", "server.admin_listen"),
    ("SLUICE_UPSTREAM_URL", "upstream.base_url"),
    ("SLUICE_REDIS_URL", "redis.url"),
];

impl Config {
    /// Reads and validates the file at `path`, applying the env overrides
    /// that `env` returns (a function, so tests never touch the process env).
    /// Relative paths in it are relative to the file's directory.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                // The image ships no config: say where one goes.
                " (no config there: mount yours at that path, or point --config or \
                 SLUICE_CONFIG at it; `sluice new-key` makes tenant keys)"
            } else {
                ""
            };
            ConfigError(vec![format!("{}: {e}{hint}", path.display())])
        })?;
        let mut config = Self::parse(&text, env)?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let paths = config
            .upstreams
            .iter_mut()
            .filter_map(|u| u.ca_file.as_mut())
            .chain(config.budgets.state_path.as_mut());
        for p in paths {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        for ca in config.upstreams.iter().filter_map(|u| u.ca_file.as_ref()) {
            read_ca_file(ca).map_err(|e| ConfigError(vec![e]))?;
        }
        Ok(config)
    }

    /// Parses and validates TOML text, applying env overrides.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError(vec![describe_toml_error(text, &e)]))?;
        if let Some(v) = env("SLUICE_LISTEN") {
            raw.server.listen = v;
        }
        if let Some(v) = env("SLUICE_ADMIN_LISTEN") {
            raw.server.admin_listen = v;
        }
        if let Some(v) = env("SLUICE_UPSTREAM_URL") {
            if !raw.upstreams.is_empty() {
                return Err(ConfigError(vec![
                    "SLUICE_UPSTREAM_URL: overrides upstream.base_url, which a config with \
                     [[upstreams]] does not have (set each upstream's base_url instead)"
                        .into(),
                ]));
            }
            raw.upstream.base_url = Some(v);
        }
        // With no [redis] section, the env var turns it on with the defaults.
        if let Some(v) = env("SLUICE_REDIS_URL") {
            raw.redis.get_or_insert_with(RawRedis::default).url = v;
        }
        validate(raw)
    }

    /// Reads each upstream's key from the env var its `api_key_env` names.
    /// An unset or empty variable is an error unless the name is "".
    pub fn upstream_keys(&self, env: impl Fn(&str) -> Option<String>) -> Result<Keys, ConfigError> {
        let mut keys = Keys::default();
        let mut errs = Vec::new();
        for u in &self.upstreams {
            let name = &u.api_key_env;
            if name.is_empty() {
                keys.by_name.insert(u.name.clone(), Secret::default());
                continue;
            }
            match env(name) {
                Some(v) if !v.trim().is_empty() => {
                    keys.by_name.insert(u.name.clone(), Secret::new(v.trim()));
                }
                _ => errs.push(format!(
                    "{}.api_key_env: environment variable {name} is unset or empty \
                     (set api_key_env = \"\" for an upstream that takes no key)",
                    self.upstream_key_path(u)
                )),
            }
        }
        if errs.is_empty() {
            Ok(keys)
        } else {
            Err(ConfigError(errs))
        }
    }

    /// Where an upstream's keys are written: `upstream` for the one
    /// `[upstream]`, `upstreams.<name>` otherwise.
    pub(crate) fn upstream_key_path(&self, u: &PeerConfig) -> String {
        if self.upstreams.len() == 1 && u.name == "default" {
            "upstream".into()
        } else {
            format!("upstreams.{}", u.name)
        }
    }

    /// Every model name that keeps its own metric label (docs/metrics.md).
    pub fn known_models(&self) -> HashSet<String> {
        let mut models: HashSet<String> = ["deepseek-chat", "deepseek-reasoner"]
            .into_iter()
            .map(String::from)
            .collect();
        for t in &self.tenants {
            models.extend(t.models.iter().cloned());
        }
        models.extend(self.pricing.keys().cloned());
        for u in &self.upstreams {
            models.extend(u.models.iter().cloned());
        }
        models
    }
}

/// toml's message names the offending key for unknown fields and wrong
/// types, but not always (a number out of range, bad syntax), so the line
/// it points at is quoted too.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().replace('\n', " ").trim().to_string();
    let Some(span) = e.span() else { return message };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    format!("line {line_no} (`{line}`): {message}")
}

#[cfg(test)]
mod tests {
    //! Also the helpers the other config files' tests share.

    use super::*;

    pub(super) const KEY: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    pub(super) fn no_env(_: &str) -> Option<String> {
        None
    }

    pub(super) fn tenant(extra: &str) -> String {
        format!("[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{KEY}\"]\n{extra}\n")
    }

    #[test]
    fn example_config_is_valid_but_for_its_placeholder_keys() {
        // No shipped file grants access with a publicly known key: every
        // tenant key in the example is a placeholder that is refused, with
        // the command that makes a real one.
        let text = include_str!("../../config/sluice.toml");
        let err = Config::parse(text, no_env).expect_err("placeholders are refused");
        for problem in &err.0 {
            assert!(
                problem.contains("key_sha256") && problem.contains("sluice new-key"),
                "only the placeholder keys are wrong: {problem}"
            );
        }
        // A distinct real hash for each placeholder.
        let filled: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if l.trim_start().starts_with("key_sha256") {
                    format!("key_sha256 = [\"{i:064x}\"]")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&filled, no_env).expect("valid once keys are filled in");
        assert!(!c.tenants.is_empty());
    }

    #[test]
    fn env_overrides() {
        let env = |k: &str| match k {
            "SLUICE_LISTEN" => Some("127.0.0.1:1".to_string()),
            "SLUICE_ADMIN_LISTEN" => Some("127.0.0.1:2".to_string()),
            "SLUICE_UPSTREAM_URL" => Some("http://127.0.0.1:3/".to_string()),
            _ => None,
        };
        let c = Config::parse(&tenant(""), env).expect("valid");
        assert_eq!(c.server.listen.port(), 1);
        assert_eq!(c.server.admin_listen.port(), 2);
        assert_eq!(c.upstreams[0].base_url, "http://127.0.0.1:3");
    }

    #[test]
    fn upstream_key_from_env() {
        let c = Config::parse(&tenant(""), no_env).expect("valid");
        let err = c.upstream_keys(no_env).expect_err("unset");
        assert!(err.0[0].starts_with("upstream.api_key_env: environment variable DEEPSEEK_API_KEY"));
        assert!(c.upstream_keys(|_| Some("  ".into())).is_err());
        let keys = c.upstream_keys(|_| Some("sk-x".into())).expect("set");
        assert_eq!(keys.get("default").expose(), "sk-x");
        assert_eq!(format!("{keys:?}"), "*****");
        let open = Config::parse(
            &format!("[upstream]\napi_key_env = \"\"\n{}", tenant("")),
            no_env,
        )
        .expect("valid");
        assert!(open
            .upstream_keys(no_env)
            .expect("no key needed")
            .get("default")
            .is_empty());
    }

    #[test]
    fn each_upstream_has_its_own_key() {
        let text = format!(
            "[[upstreams]]\nname = \"a\"\nbase_url = \"http://a\"\napi_key_env = \"KEY_A\"\n\
             [[upstreams]]\nname = \"b\"\nbase_url = \"http://b\"\napi_key_env = \"KEY_B\"\n{}",
            tenant("")
        );
        let c = Config::parse(&text, no_env).expect("valid");
        let only_a = |k: &str| (k == "KEY_A").then(|| "sk-a".to_string());
        let err = c.upstream_keys(only_a).expect_err("KEY_B unset");
        assert_eq!(err.0.len(), 1);
        assert!(
            err.0[0].starts_with("upstreams.b.api_key_env: environment variable KEY_B"),
            "{err}"
        );
        let both = |k: &str| Some(format!("sk-{k}"));
        let keys = c.upstream_keys(both).expect("both set");
        assert_eq!(keys.get("a").expose(), "sk-KEY_A");
        assert_eq!(keys.get("b").expose(), "sk-KEY_B");
    }
}
