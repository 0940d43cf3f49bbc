//! Configuration: the TOML schema of SPEC §2 parsed into raw serde structs
//! (unknown keys refused), then validated into typed values (`SocketAddr`,
//! `Duration`, key hashes). Used at start-up, by `check-config` and by SIGHUP
//! reload; nothing on the request path parses config.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

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

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub tenants: Vec<TenantConfig>,
    pub pricing: BTreeMap<String, Pricing>,
    /// `None`: every replica keeps its own state (SPEC §8).
    pub redis: Option<RedisConfig>,
    pub budgets: BudgetsConfig,
}

/// What a request gets while Redis is unavailable (SPEC §8).
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

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme, authority and optional path prefix, without a trailing slash.
    pub base_url: String,
    pub api_key_env: String,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_retries: u32,
    /// 0 = unlimited.
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
}

/// A calendar period in UTC (SPEC §9).
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

// ---- raw schema -------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    pricing: BTreeMap<String, Pricing>,
    redis: Option<RawRedis>,
    #[serde(default)]
    budgets: RawBudgets,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawBudgets {
    state_path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: String,
    cluster: bool,
    key_prefix: String,
    timeout_ms: u64,
    on_error: String,
    limits: bool,
    cache: bool,
    coalesce: bool,
    cache_max_entry_bytes: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster: false,
            key_prefix: "sluice".into(),
            timeout_ms: 25,
            on_error: "local".into(),
            limits: true,
            cache: true,
            coalesce: true,
            cache_max_entry_bytes: 1024 * 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    admin_listen: String,
    max_body_bytes: u64,
    shutdown_grace_secs: u64,
    header_read_timeout_secs: u64,
    send_timeout_secs: u64,
    keepalive_timeout_secs: u64,
    max_connections: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace_secs: 30,
            header_read_timeout_secs: 10,
            send_timeout_secs: 60,
            keepalive_timeout_secs: 75,
            max_connections: 10_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    base_url: String,
    api_key_env: String,
    connect_timeout_secs: u64,
    first_byte_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_retries: u32,
    max_concurrent: u64,
    balance_poll_secs: u64,
    ca_file: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            base_url: "https://api.deepseek.com".into(),
            api_key_env: "DEEPSEEK_API_KEY".into(),
            connect_timeout_secs: 5,
            first_byte_timeout_secs: 600,
            idle_timeout_secs: 120,
            max_retries: 2,
            max_concurrent: 0,
            balance_poll_secs: 300,
            ca_file: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    enabled: bool,
    max_bytes: u64,
    ttl_secs: u64,
    scope: String,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            ttl_secs: 3600,
            scope: "tenant".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    key_sha256: KeyList,
    #[serde(default = "default_rpm")]
    requests_per_minute: u32,
    request_burst: Option<u32>,
    #[serde(default = "default_tpm")]
    tokens_per_minute: u64,
    #[serde(default = "default_tenant_concurrency")]
    max_concurrent: u32,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default = "default_true")]
    cache: bool,
    #[serde(default)]
    budget_usd: f64,
    #[serde(default = "default_period")]
    budget_period: String,
}

fn default_period() -> String {
    "month".into()
}

/// `key_sha256` takes one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum KeyList {
    One(String),
    Many(Vec<String>),
}

fn default_rpm() -> u32 {
    600
}
fn default_tpm() -> u64 {
    1_000_000
}
fn default_tenant_concurrency() -> u32 {
    32
}
fn default_true() -> bool {
    true
}

/// Environment variables that override config keys (SPEC §2).
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
        for p in [
            config.budgets.state_path.as_mut(),
            config.upstream.ca_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if let Some(ca) = &config.upstream.ca_file {
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
            raw.upstream.base_url = v;
        }
        // With no [redis] section, the env var turns it on with the defaults.
        if let Some(v) = env("SLUICE_REDIS_URL") {
            raw.redis.get_or_insert_with(RawRedis::default).url = v;
        }
        validate(raw)
    }

    /// Reads the upstream key from the env var that `upstream.api_key_env`
    /// names. An unset or empty variable is an error unless the name is "".
    pub fn upstream_key(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Secret, ConfigError> {
        let name = &self.upstream.api_key_env;
        if name.is_empty() {
            return Ok(Secret::default());
        }
        match env(name) {
            Some(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim())),
            _ => Err(ConfigError(vec![format!(
                "upstream.api_key_env: environment variable {name} is unset or empty \
                 (set api_key_env = \"\" for an upstream that takes no key)"
            )])),
        }
    }

    /// Every model name that keeps its own metric label (SPEC §6).
    pub fn known_models(&self) -> HashSet<String> {
        let mut models: HashSet<String> = ["deepseek-chat", "deepseek-reasoner"]
            .into_iter()
            .map(String::from)
            .collect();
        for t in &self.tenants {
            models.extend(t.models.iter().cloned());
        }
        models.extend(self.pricing.keys().cloned());
        models
    }
}

/// The certificates of `upstream.ca_file`: a missing or unreadable file,
/// or one without a PEM certificate, is an error naming the key.
pub fn read_ca_file(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let bytes =
        std::fs::read(path).map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream.ca_file: {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
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

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errs = Vec::new();
    let mut addr = |key: &str, v: &str| -> SocketAddr {
        v.parse().unwrap_or_else(|_| {
            errs.push(format!(
                "{key}: {v:?} is not an address like 127.0.0.1:8080"
            ));
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    };
    let listen = addr("server.listen", &raw.server.listen);
    let admin_listen = addr("server.admin_listen", &raw.server.admin_listen);

    // Durations are bounded so deadlines computed from them never overflow.
    const MAX_SECS: u64 = 10 * 365 * 86_400;
    let seconds = |errs: &mut Vec<String>, key: &str, v: u64| {
        if v > MAX_SECS {
            errs.push(format!("{key}: must be at most {MAX_SECS} (ten years)"));
        }
        Duration::from_secs(v.min(MAX_SECS))
    };
    let positive = |errs: &mut Vec<String>, key: &str, v: u64| {
        if v == 0 {
            errs.push(format!("{key}: must be greater than 0"));
        }
        seconds(errs, key, v)
    };
    if raw.server.max_body_bytes == 0 {
        errs.push("server.max_body_bytes: must be greater than 0".into());
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        max_body_bytes: usize::try_from(raw.server.max_body_bytes).unwrap_or(usize::MAX),
        shutdown_grace: seconds(
            &mut errs,
            "server.shutdown_grace_secs",
            raw.server.shutdown_grace_secs,
        ),
        header_read_timeout: positive(
            &mut errs,
            "server.header_read_timeout_secs",
            raw.server.header_read_timeout_secs,
        ),
        send_timeout: positive(
            &mut errs,
            "server.send_timeout_secs",
            raw.server.send_timeout_secs,
        ),
        keepalive_timeout: positive(
            &mut errs,
            "server.keepalive_timeout_secs",
            raw.server.keepalive_timeout_secs,
        ),
        max_connections: usize::try_from(raw.server.max_connections).unwrap_or(usize::MAX),
    };
    if raw.server.max_connections == 0 {
        errs.push("server.max_connections: must be greater than 0".into());
    }

    let base_url = raw.upstream.base_url.trim_end_matches('/').to_string();
    match base_url.parse::<http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
                && uri.query().is_none() => {}
        _ => errs.push(format!(
            "upstream.base_url: {:?} is not an http:// or https:// URL",
            raw.upstream.base_url
        )),
    }
    let upstream = UpstreamConfig {
        base_url,
        api_key_env: raw.upstream.api_key_env,
        connect_timeout: positive(
            &mut errs,
            "upstream.connect_timeout_secs",
            raw.upstream.connect_timeout_secs,
        ),
        first_byte_timeout: positive(
            &mut errs,
            "upstream.first_byte_timeout_secs",
            raw.upstream.first_byte_timeout_secs,
        ),
        idle_timeout: positive(
            &mut errs,
            "upstream.idle_timeout_secs",
            raw.upstream.idle_timeout_secs,
        ),
        max_retries: raw.upstream.max_retries,
        max_concurrent: usize::try_from(raw.upstream.max_concurrent).unwrap_or(usize::MAX),
        balance_poll: (raw.upstream.balance_poll_secs > 0).then(|| {
            seconds(
                &mut errs,
                "upstream.balance_poll_secs",
                raw.upstream.balance_poll_secs,
            )
        }),
        ca_file: (!raw.upstream.ca_file.is_empty())
            .then(|| std::path::PathBuf::from(&raw.upstream.ca_file)),
    };
    // A relative path is checked once `load` knows the file's directory.
    if let Some(path) = upstream.ca_file.as_deref().filter(|p| p.is_absolute()) {
        if let Err(e) = read_ca_file(path) {
            errs.push(e);
        }
    }
    if upstream.max_retries > 10 {
        errs.push("upstream.max_retries: must be at most 10".into());
    }

    let scope = match raw.cache.scope.as_str() {
        "tenant" => CacheScope::Tenant,
        "shared" => CacheScope::Shared,
        other => {
            errs.push(format!(
                "cache.scope: {other:?} is not one of \"tenant\", \"shared\""
            ));
            CacheScope::Tenant
        }
    };
    let cache = CacheConfig {
        enabled: raw.cache.enabled,
        max_bytes: raw.cache.max_bytes,
        ttl: positive(&mut errs, "cache.ttl_secs", raw.cache.ttl_secs),
        scope,
    };

    if raw.tenants.is_empty() {
        errs.push("tenants: at least one [[tenants]] entry is required".into());
    }
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut tenants = Vec::with_capacity(raw.tenants.len());
    for (i, t) in raw.tenants.into_iter().enumerate() {
        let at = format!("tenants[{i}]");
        let valid_name = !t.name.is_empty()
            && t.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            errs.push(format!("{at}.name: {:?} must match [a-z0-9_-]+", t.name));
        } else if !names.insert(t.name.clone()) {
            errs.push(format!("{at}.name: duplicate tenant name {:?}", t.name));
        }
        let hexes = match t.key_sha256 {
            KeyList::One(k) => vec![k],
            KeyList::Many(ks) => ks,
        };
        if hexes.is_empty() {
            errs.push(format!(
                "{at}.key_sha256: at least one key hash is required"
            ));
        }
        let mut key_sha256 = Vec::with_capacity(hexes.len());
        for (j, h) in hexes.iter().enumerate() {
            let mut out = [0u8; 32];
            if h.len() != 64 || hex::decode_to_slice(h, &mut out).is_err() {
                errs.push(format!(
                    "{at}.key_sha256[{j}]: {h:?} is not a key hash (64 hex digits): run `sluice new-key` \
                     and paste the key_sha256 it prints (or `sluice hash-key KEY` for an existing key)"
                ));
                continue;
            }
            if !keys.insert(out) {
                errs.push(format!("{at}.key_sha256[{j}]: duplicate key"));
            }
            key_sha256.push(out);
        }
        let request_burst = t
            .request_burst
            .unwrap_or((t.requests_per_minute / 10).max(1));
        if t.requests_per_minute > 0 && request_burst == 0 {
            errs.push(format!("{at}.request_burst: must be at least 1"));
        }
        if t.models.iter().any(|m| m.is_empty()) {
            errs.push(format!("{at}.models: model names must not be empty"));
        }
        let period = match t.budget_period.as_str() {
            "day" => BudgetPeriod::Day,
            "week" => BudgetPeriod::Week,
            "month" => BudgetPeriod::Month,
            other => {
                errs.push(format!(
                    "{at}.budget_period: {other:?} is not one of \"day\", \"week\", \"month\""
                ));
                BudgetPeriod::Month
            }
        };
        if !t.budget_usd.is_finite() || t.budget_usd < 0.0 {
            errs.push(format!(
                "{at}.budget_usd: must be a number of at least 0 (0 = no budget)"
            ));
        }
        let budget = (t.budget_usd > 0.0 && t.budget_usd.is_finite()).then_some(BudgetSpec {
            usd: t.budget_usd,
            period,
        });
        // A budget must be able to price everything the tenant may use.
        if budget.is_some() && !raw.pricing.contains_key("default") {
            if t.models.is_empty() {
                errs.push(format!(
                    "{at}: tenant {:?} has a budget and models = [] allows models without a price; \
                     list its models, price them, or set [pricing.default]",
                    t.name
                ));
            }
            for m in t.models.iter().filter(|m| !raw.pricing.contains_key(*m)) {
                errs.push(format!(
                    "{at}: tenant {:?} has a budget but model {m:?} has no [pricing.{m}] \
                     (or set [pricing.default])",
                    t.name
                ));
            }
        }
        tenants.push(TenantConfig {
            name: t.name,
            key_sha256,
            limits: LimitSpec {
                requests_per_minute: t.requests_per_minute,
                request_burst,
                tokens_per_minute: t.tokens_per_minute,
                max_concurrent: t.max_concurrent,
            },
            models: t.models,
            cache: t.cache,
            budget,
        });
    }
    for (model, p) in &raw.pricing {
        for (field, v) in [
            ("input_cache_hit", p.input_cache_hit),
            ("input_cache_miss", p.input_cache_miss),
            ("output", p.output),
        ] {
            if !v.is_finite() || v < 0.0 {
                errs.push(format!(
                    "pricing.{model}.{field}: must be a non-negative number"
                ));
            }
        }
    }

    let redis = raw
        .redis
        .filter(|r| !r.url.is_empty())
        .map(|r| validate_redis(r, &mut errs));
    let budgets = BudgetsConfig {
        state_path: (!raw.budgets.state_path.is_empty())
            .then(|| std::path::PathBuf::from(&raw.budgets.state_path)),
    };

    if errs.is_empty() {
        Ok(Config {
            server,
            upstream,
            cache,
            tenants,
            pricing: raw.pricing,
            redis,
            budgets,
        })
    } else {
        Err(ConfigError(errs))
    }
}

fn validate_redis(r: RawRedis, errs: &mut Vec<String>) -> RedisConfig {
    // The client library is the judge of what it can connect to; its
    // message may quote the URL, so only the redacted form is shown.
    if !matches!(
        r.url.split_once("://").map(|(s, _)| s),
        Some("redis" | "rediss" | "redis+unix" | "unix" | "valkey" | "valkeys")
    ) || redis::IntoConnectionInfo::into_connection_info(r.url.as_str()).is_err()
    {
        errs.push(format!(
            "redis.url: {:?} is not a Redis URL like redis://host:6379/0, rediss://… or redis+unix:///path",
            redact_url(&r.url)
        ));
    }
    let on_error = match r.on_error.as_str() {
        "local" => OnError::Local,
        "deny" => OnError::Deny,
        other => {
            errs.push(format!(
                "redis.on_error: {other:?} is not one of \"local\", \"deny\""
            ));
            OnError::Local
        }
    };
    if r.timeout_ms == 0 || r.timeout_ms > 60_000 {
        errs.push("redis.timeout_ms: must be between 1 and 60000".into());
    }
    let prefix_ok = !r.key_prefix.is_empty()
        && !r.key_prefix.contains(['{', '}'])
        && r.key_prefix.bytes().all(|b| b.is_ascii_graphic());
    if !prefix_ok {
        errs.push(format!(
            "redis.key_prefix: {:?} must be printable ASCII without spaces or braces",
            r.key_prefix
        ));
    }
    RedisConfig {
        url: r.url,
        cluster: r.cluster,
        key_prefix: r.key_prefix,
        timeout: Duration::from_millis(r.timeout_ms.clamp(1, 60_000)),
        on_error,
        limits: r.limits,
        cache: r.cache,
        coalesce: r.coalesce,
        cache_max_entry_bytes: r.cache_max_entry_bytes,
    }
}

impl fmt::Display for Config {
    /// The summary `check-config` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        let u = &self.upstream;
        let c = &self.cache;
        writeln!(f, "listen        {} (admin {})", s.listen, s.admin_listen)?;
        writeln!(
            f,
            "connections   max {}, idle close after {}s, header timeout {}s, shutdown grace {}s",
            s.max_connections,
            s.keepalive_timeout.as_secs(),
            s.header_read_timeout.as_secs(),
            s.shutdown_grace.as_secs(),
        )?;
        writeln!(
            f,
            "upstream      {} (key from {}, retries {}, max_concurrent {})",
            u.base_url,
            if u.api_key_env.is_empty() {
                "<none>"
            } else {
                &u.api_key_env
            },
            u.max_retries,
            unlimited(u.max_concurrent as u64),
        )?;
        writeln!(
            f,
            "cache         {} (max_bytes {}, ttl {}s, scope {})",
            if c.enabled { "on" } else { "off" },
            c.max_bytes,
            c.ttl.as_secs(),
            match c.scope {
                CacheScope::Tenant => "tenant",
                CacheScope::Shared => "shared",
            }
        )?;
        match &self.redis {
            None => writeln!(
                f,
                "shared state  none: limits, cache and coalescing are per replica"
            )?,
            Some(r) => writeln!(
                f,
                "shared state  redis {}{} (limits {}, cache {}, coalescing {}, timeout {}ms, on_error {})",
                r.redacted_url(),
                if r.cluster { " (cluster)" } else { "" },
                if r.limits { "shared" } else { "per replica" },
                if r.cache { "shared" } else { "per replica" },
                if r.coalesce { "shared" } else { "per replica" },
                r.timeout.as_millis(),
                match r.on_error {
                    OnError::Local => "local",
                    OnError::Deny => "deny",
                },
            )?,
        }
        writeln!(f, "tenants       {}", self.tenants.len())?;
        for t in &self.tenants {
            let l = &t.limits;
            writeln!(
                f,
                "  {:<20} keys {}  req/min {} (burst {})  tokens/min {}  concurrent {}  models {}  cache {}",
                t.name,
                t.key_sha256.len(),
                unlimited(u64::from(l.requests_per_minute)),
                l.request_burst,
                unlimited(l.tokens_per_minute),
                unlimited(u64::from(l.max_concurrent)),
                if t.models.is_empty() { "any".to_string() } else { t.models.join(",") },
                if t.cache { "on" } else { "off" },
            )?;
            if let Some(b) = &t.budget {
                writeln!(f, "  {:<20} budget ${} per {}", "", b.usd, b.period.label())?;
            }
        }
        if self.tenants.iter().any(|t| t.budget.is_some()) {
            writeln!(
                f,
                "budgets       spend kept {}",
                match (&self.redis, &self.budgets.state_path) {
                    (Some(r), _) if r.limits => "in Redis, shared by the fleet".to_string(),
                    (_, Some(p)) => format!("in {}", p.display()),
                    (_, None) => "in memory only: a restart resets it".to_string(),
                }
            )?;
        }
        if !self.pricing.is_empty() {
            writeln!(
                f,
                "pricing       {}",
                self.pricing.keys().cloned().collect::<Vec<_>>().join(", ")
            )?;
        }
        Ok(())
    }
}

fn unlimited(v: u64) -> String {
    if v == 0 {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn tenant(extra: &str) -> String {
        format!("[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{KEY}\"]\n{extra}\n")
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(&tenant(""), no_env).expect("valid");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.max_body_bytes, 4_194_304);
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.upstream.base_url, "https://api.deepseek.com");
        assert_eq!(c.upstream.balance_poll, Some(Duration::from_secs(300)));
        assert_eq!(c.tenants[0].limits.request_burst, 60);
        assert!(c.cache.enabled);
        assert!(c.tenants[0].cache);
    }

    #[test]
    fn redis_section() {
        let c = Config::parse(&tenant(""), no_env).expect("valid");
        assert!(c.redis.is_none(), "no [redis]: per replica");
        let c =
            Config::parse(&format!("[redis]\nurl = \"\"\n{}", tenant("")), no_env).expect("valid");
        assert!(c.redis.is_none(), "an empty url is per replica too");
        let env = |k: &str| (k == "SLUICE_REDIS_URL").then(|| "redis://h:1/0".to_string());
        let c = Config::parse(&tenant(""), env).expect("valid");
        let r = c.redis.expect("the env var turns [redis] on");
        assert_eq!(r.timeout, Duration::from_millis(25));
        assert_eq!(r.on_error, OnError::Local);
        assert_eq!(r.key_prefix, "sluice");
        assert!(r.limits && r.cache && r.coalesce && !r.cluster);
        let text = format!(
            "[redis]\nurl = \"redis://u:hunter2@h:6379/0\"\non_error = \"deny\"\ntimeout_ms = 5\n{}",
            tenant("")
        );
        let c = Config::parse(&text, no_env).expect("valid");
        let r = c.redis.as_ref().expect("on");
        assert_eq!(r.on_error, OnError::Deny);
        assert_eq!(r.redacted_url(), "redis://u:*****@h:6379/0");
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(!c.to_string().contains("hunter2"));
        assert!(c.to_string().contains("limits shared"));
        for (extra, key) in [
            ("url = \"http://h\"", "redis.url"),
            ("url = \"redis://:pw@h:notaport\"", "redis.url"),
            ("url = \"redis://h\"\non_error = \"open\"", "redis.on_error"),
            ("url = \"redis://h\"\ntimeout_ms = 0", "redis.timeout_ms"),
            (
                "url = \"redis://h\"\nkey_prefix = \"a{b}\"",
                "redis.key_prefix",
            ),
            ("url = \"redis://h\"\ntimeout = 3", "timeout"),
        ] {
            let text = format!("[redis]\n{extra}\n{}", tenant(""));
            let err = Config::parse(&text, no_env).expect_err(extra).to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
            assert!(!err.contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("sluice-ca-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        for path in [&missing, &empty] {
            let text = format!(
                "[upstream]\nca_file = \"{}\"\n{}",
                path.display(),
                tenant("")
            );
            let err = Config::parse(&text, no_env)
                .expect_err("refused")
                .to_string();
            assert!(err.contains("upstream.ca_file"), "{err}");
        }
        // Relative to the config file's directory.
        let file = dir.join("s.toml");
        std::fs::write(
            &file,
            format!("[upstream]\nca_file = \"empty.pem\"\n{}", tenant("")),
        )
        .expect("write");
        let err = Config::load(&file, no_env)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("upstream.ca_file") && err.contains("empty.pem"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn budgets() {
        let t = |extra: &str| Config::parse(&tenant(extra), no_env);
        let priced = "[pricing.deepseek-chat]\noutput = 1.0\n";
        let c = Config::parse(
            &format!(
                "{priced}{}",
                tenant("models = [\"deepseek-chat\"]\nbudget_usd = 5")
            ),
            no_env,
        )
        .expect("valid");
        let b = c.tenants[0].budget.expect("budget");
        assert_eq!((b.usd, b.period), (5.0, BudgetPeriod::Month));
        assert!(c.to_string().contains("budget $5 per month"));
        assert!(c.to_string().contains("a restart resets it"));
        assert!(t("budget_usd = 0").expect("valid").tenants[0]
            .budget
            .is_none());
        let err = t("budget_usd = -1").expect_err("negative").to_string();
        assert!(err.contains("budget_usd"), "{err}");
        let err = t("budget_usd = 1\nbudget_period = \"year\"")
            .expect_err("period")
            .to_string();
        assert!(err.contains("budget_period"), "{err}");
        let err = t("budget_usd = 1").expect_err("unpriced").to_string();
        assert!(
            err.contains("\"a\"") && err.contains("models = []"),
            "{err}"
        );
        let err = t("budget_usd = 1\nmodels = [\"m1\"]")
            .expect_err("unpriced")
            .to_string();
        assert!(err.contains("\"m1\"") && err.contains("pricing"), "{err}");
        let default = "[pricing.default]\noutput = 1.0\n";
        Config::parse(&format!("{default}{}", tenant("budget_usd = 1")), no_env)
            .expect("[pricing.default] prices everything");
        let dir = std::env::temp_dir().join(format!("sluice-cfg-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("s.toml");
        std::fs::write(
            &file,
            format!("[budgets]\nstate_path = \"spend.json\"\n{}", tenant("")),
        )
        .expect("write");
        let c = Config::load(&file, no_env).expect("valid");
        assert_eq!(c.budgets.state_path, Some(dir.join("spend.json")));
        let _ = std::fs::remove_dir_all(&dir);
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
        assert_eq!(c.upstream.base_url, "http://127.0.0.1:3");
    }

    #[test]
    fn rejections_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[server]\nlisen = \"x\"\n", "lisen"),
            ("[upstream]\nbase_url = \"ftp://x\"\n", "upstream.base_url"),
            (
                "[upstream]\nidle_timeout_secs = 0\n",
                "upstream.idle_timeout_secs",
            ),
            ("[cache]\nscope = \"global\"\n", "cache.scope"),
            (
                "[upstream]\nfirst_byte_timeout_secs = 18446744073709551615\n",
                "first_byte_timeout_secs",
            ),
            (
                "[upstream]\nfirst_byte_timeout_secs = 999999999999\n",
                "upstream.first_byte_timeout_secs",
            ),
            (
                "[server]\nshutdown_grace_secs = 999999999999\n",
                "server.shutdown_grace_secs",
            ),
            (
                "[server]\nsend_timeout_secs = 0\n",
                "server.send_timeout_secs",
            ),
            ("[cache]\nttl = 3\n", "ttl"),
            (
                "[server]\nkeepalive_timeout_secs = 0\n",
                "server.keepalive_timeout_secs",
            ),
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            ("[pricing.x]\ninput = 1.0\n", "input"),
        ];
        for (extra, key) in cases {
            let text = format!("{extra}\n{}", tenant(""));
            let err = Config::parse(&text, no_env).expect_err(extra).to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
        }
    }

    #[test]
    fn tenant_rejections() {
        let bad = |text: &str, needle: &str| {
            let err = Config::parse(text, no_env).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        };
        bad("", "at least one");
        bad(&tenant("colour = 1"), "colour");
        bad(
            &format!("[[tenants]]\nname = \"Bad Name\"\nkey_sha256 = [\"{KEY}\"]\n"),
            "tenants[0].name",
        );
        bad(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"abc\"]\n",
            "tenants[0].key_sha256[0]",
        );
        bad(
            &format!(
                "{}\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{}\"]\n",
                tenant(""),
                "0".repeat(64)
            ),
            "duplicate tenant name",
        );
        bad(
            &format!(
                "{}\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\n",
                tenant(""),
                KEY.to_uppercase()
            ),
            "duplicate key",
        );
    }

    #[test]
    fn upper_case_hex_is_accepted() {
        let text = format!(
            "[[tenants]]\nname = \"a\"\nkey_sha256 = \"{}\"\n",
            KEY.to_uppercase()
        );
        let c = Config::parse(&text, no_env).expect("valid");
        assert_eq!(hex::encode(c.tenants[0].key_sha256[0]), KEY);
    }

    #[test]
    fn several_problems_are_reported_at_once() {
        let text = format!(
            "[server]\nlisten = \"x\"\nadmin_listen = \"y\"\n{}",
            tenant("")
        );
        let err = Config::parse(&text, no_env).expect_err("invalid");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn upstream_key_from_env() {
        let c = Config::parse(&tenant(""), no_env).expect("valid");
        assert!(c.upstream_key(no_env).is_err());
        assert!(c.upstream_key(|_| Some("  ".into())).is_err());
        let key = c.upstream_key(|_| Some("sk-x".into())).expect("set");
        assert_eq!(key.expose(), "sk-x");
        assert_eq!(format!("{key:?}"), "*****");
        let open = Config::parse(
            &format!("[upstream]\napi_key_env = \"\"\n{}", tenant("")),
            no_env,
        )
        .expect("valid");
        assert!(open.upstream_key(no_env).expect("no key needed").is_empty());
    }
}
