//! Validation: the raw sections into typed values, one function per
//! section, each adding its problems (every one naming its key) to the one
//! list, so a file's problems are all reported at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ca::read_ca_file;
use super::raw::{
    KeyList, RawBudgets, RawCache, RawConfig, RawPeer, RawRedis, RawServer, RawTenant, RawUpstream,
};
use super::{
    redact_url, BudgetPeriod, BudgetSpec, BudgetsConfig, CacheConfig, CacheScope, Config,
    ConfigError, LimitSpec, OnError, PeerConfig, Pricing, RedisConfig, ServerConfig, TenantConfig,
    UpstreamConfig,
};

/// The problems found so far, each naming its key.
type Errors = Vec<String>;

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errs = Errors::new();
    let server = server(raw.server, &mut errs);
    let upstreams = peers(&raw.upstream, raw.upstreams, &mut errs);
    let upstream = upstream(raw.upstream, &mut errs);
    let cache = cache(raw.cache, &mut errs);
    let tenants = tenants(raw.tenants, &raw.pricing, &mut errs);
    pricing(&raw.pricing, &mut errs);
    let redis = raw
        .redis
        .filter(|r| !r.url.is_empty())
        .map(|r| redis(r, &mut errs));
    let budgets = budgets(raw.budgets);
    if errs.is_empty() {
        Ok(Config {
            server,
            upstream,
            upstreams,
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

/// Durations are bounded so deadlines computed from them never overflow.
const MAX_SECS: u64 = 10 * 365 * 86_400;

fn seconds(errs: &mut Errors, key: &str, v: u64) -> Duration {
    if v > MAX_SECS {
        errs.push(format!("{key}: must be at most {MAX_SECS} (ten years)"));
    }
    Duration::from_secs(v.min(MAX_SECS))
}

fn positive(errs: &mut Errors, key: &str, v: u64) -> Duration {
    if v == 0 {
        errs.push(format!("{key}: must be greater than 0"));
    }
    seconds(errs, key, v)
}

fn addr(errs: &mut Errors, key: &str, v: &str) -> SocketAddr {
    v.parse().unwrap_or_else(|_| {
        errs.push(format!(
            "{key}: {v:?} is not an address like 127.0.0.1:8080"
        ));
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

/// `[server]`.
fn server(raw: RawServer, errs: &mut Errors) -> ServerConfig {
    let listen = addr(errs, "server.listen", &raw.listen);
    let admin_listen = addr(errs, "server.admin_listen", &raw.admin_listen);
    if raw.max_body_bytes == 0 {
        errs.push("server.max_body_bytes: must be greater than 0".into());
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
        shutdown_grace: seconds(errs, "server.shutdown_grace_secs", raw.shutdown_grace_secs),
        header_read_timeout: positive(
            errs,
            "server.header_read_timeout_secs",
            raw.header_read_timeout_secs,
        ),
        send_timeout: positive(errs, "server.send_timeout_secs", raw.send_timeout_secs),
        keepalive_timeout: positive(
            errs,
            "server.keepalive_timeout_secs",
            raw.keepalive_timeout_secs,
        ),
        max_connections: usize::try_from(raw.max_connections).unwrap_or(usize::MAX),
    };
    if raw.max_connections == 0 {
        errs.push("server.max_connections: must be greater than 0".into());
    }
    server
}

/// `[upstream]`: the settings every upstream shares.
fn upstream(raw: RawUpstream, errs: &mut Errors) -> UpstreamConfig {
    let upstream = UpstreamConfig {
        connect_timeout: positive(
            errs,
            "upstream.connect_timeout_secs",
            raw.connect_timeout_secs,
        ),
        first_byte_timeout: positive(
            errs,
            "upstream.first_byte_timeout_secs",
            raw.first_byte_timeout_secs,
        ),
        idle_timeout: positive(errs, "upstream.idle_timeout_secs", raw.idle_timeout_secs),
        max_retries: raw.max_retries,
        eject_after: raw.eject_after,
        eject_for: positive(errs, "upstream.eject_secs", raw.eject_secs),
    };
    if upstream.max_retries > 10 {
        errs.push("upstream.max_retries: must be at most 10".into());
    }
    if upstream.eject_after == 0 {
        errs.push("upstream.eject_after: must be greater than 0".into());
    }
    upstream
}

/// The upstreams: `[[upstreams]]`, or the one `[upstream]` (`default`).
fn peers(shared: &RawUpstream, raw: Vec<RawPeer>, errs: &mut Errors) -> Vec<PeerConfig> {
    if raw.is_empty() {
        return vec![peer("upstream", shared.as_peer(), errs)];
    }
    for key in shared.account_keys() {
        errs.push(format!(
            "upstream.{key}: with [[upstreams]], [upstream] holds only the settings all \
             upstreams share; set {key} on each upstream"
        ));
    }
    if raw.len() > super::MAX_UPSTREAMS {
        errs.push(format!(
            "upstreams: at most {} upstreams",
            super::MAX_UPSTREAMS
        ));
    }
    let mut names = HashSet::new();
    raw.into_iter()
        .enumerate()
        .map(|(i, p)| {
            let at = if p.name.is_empty() {
                format!("upstreams[{i}]")
            } else {
                format!("upstreams.{}", p.name)
            };
            let valid_name = !p.name.is_empty()
                && p.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid_name {
                errs.push(format!(
                    "{at}.name: {:?} must be one or more of a-z, 0-9, _ and -",
                    p.name
                ));
            } else if !names.insert(p.name.clone()) {
                errs.push(format!("{at}.name: two upstreams are named {:?}", p.name));
            }
            peer(&at, p, errs)
        })
        .collect()
}

/// One upstream, its keys named under `at`.
fn peer(at: &str, raw: RawPeer, errs: &mut Errors) -> PeerConfig {
    let base_url = raw.base_url.trim_end_matches('/').to_string();
    if !is_http_url(&base_url) {
        errs.push(format!(
            "{at}.base_url: {:?} is not an http:// or https:// URL",
            raw.base_url
        ));
    }
    let anthropic_base_url = match raw.anthropic_base_url {
        None => Some(format!("{base_url}/anthropic")),
        Some(url) if url.is_empty() => None,
        Some(url) => {
            let trimmed = url.trim_end_matches('/').to_string();
            if !is_http_url(&trimmed) {
                errs.push(format!(
                    "{at}.anthropic_base_url: {url:?} is not an http:// or https:// URL"
                ));
            }
            Some(trimmed)
        }
    };
    if raw.weight < 1 || raw.weight > i64::from(u32::MAX) {
        errs.push(format!("{at}.weight: must be at least 1"));
    }
    if raw.tier < 0 || raw.tier > i64::from(u32::MAX) {
        errs.push(format!("{at}.tier: must not be negative"));
    }
    if !raw.models.is_empty() {
        for model in raw.model_map.keys() {
            if !raw.models.contains(model) {
                errs.push(format!(
                    "{at}.model_map: maps {model:?}, which its models list excludes"
                ));
            }
        }
    }
    for (from, to) in &raw.model_map {
        if from.is_empty() || to.is_empty() {
            errs.push(format!("{at}.model_map: model names must not be empty"));
        }
    }
    let peer = PeerConfig {
        name: raw.name,
        base_url,
        anthropic_base_url,
        api_key_env: raw.api_key_env,
        weight: u32::try_from(raw.weight).unwrap_or(1).max(1),
        tier: u32::try_from(raw.tier).unwrap_or(0),
        models: raw.models,
        model_map: raw.model_map,
        max_concurrent: usize::try_from(raw.max_concurrent).unwrap_or(usize::MAX),
        balance_poll: (raw.balance_poll_secs > 0).then(|| {
            seconds(
                errs,
                &format!("{at}.balance_poll_secs"),
                raw.balance_poll_secs,
            )
        }),
        ca_file: (!raw.ca_file.is_empty()).then(|| PathBuf::from(&raw.ca_file)),
    };
    // A relative path is checked once `load` knows the file's directory.
    if let Some(path) = peer.ca_file.as_deref().filter(|p| p.is_absolute()) {
        if let Err(e) = read_ca_file(path) {
            errs.push(e);
        }
    }
    peer
}

fn is_http_url(url: &str) -> bool {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
                && uri.query().is_none()
        }
        Err(_) => false,
    }
}

/// `[cache]`.
fn cache(raw: RawCache, errs: &mut Errors) -> CacheConfig {
    let scope = match raw.scope.as_str() {
        "tenant" => CacheScope::Tenant,
        "shared" => CacheScope::Shared,
        other => {
            errs.push(format!(
                "cache.scope: {other:?} is not one of \"tenant\", \"shared\""
            ));
            CacheScope::Tenant
        }
    };
    CacheConfig {
        enabled: raw.enabled,
        max_bytes: raw.max_bytes,
        ttl: positive(errs, "cache.ttl_secs", raw.ttl_secs),
        scope,
    }
}

/// `[[tenants]]`: each valid on its own, names and key hashes unique across
/// them all.
fn tenants(
    raw: Vec<RawTenant>,
    pricing: &BTreeMap<String, Pricing>,
    errs: &mut Errors,
) -> Vec<TenantConfig> {
    if raw.is_empty() {
        errs.push("tenants: at least one [[tenants]] entry is required".into());
    }
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut tenants = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
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
        let hexes = match &t.key_sha256 {
            KeyList::One(k) => std::slice::from_ref(k),
            KeyList::Many(ks) => ks.as_slice(),
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
        if t.weight == 0 {
            errs.push(format!("{at}.weight: must be at least 1"));
        }
        let budget = tenant_budget(&at, &t, pricing, errs);
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
            weight: t.weight.max(1),
        });
    }
    tenants
}

/// A tenant's `budget_usd` and `budget_period`. A budget must be able to
/// price everything the tenant may use.
fn tenant_budget(
    at: &str,
    t: &RawTenant,
    pricing: &BTreeMap<String, Pricing>,
    errs: &mut Errors,
) -> Option<BudgetSpec> {
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
    if budget.is_some() && !pricing.contains_key("default") {
        if t.models.is_empty() {
            errs.push(format!(
                "{at}: tenant {:?} has a budget and models = [] allows models without a price; \
                 list its models, price them, or set [pricing.default]",
                t.name
            ));
        }
        for m in t.models.iter().filter(|m| !pricing.contains_key(*m)) {
            errs.push(format!(
                "{at}: tenant {:?} has a budget but model {m:?} has no [pricing.{m}] \
                 (or set [pricing.default])",
                t.name
            ));
        }
    }
    budget
}

/// `[pricing.*]`: every price a finite number of at least 0.
fn pricing(pricing: &BTreeMap<String, Pricing>, errs: &mut Errors) {
    for (model, p) in pricing {
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
}

/// `[redis]` with a non-empty `url`.
fn redis(r: RawRedis, errs: &mut Errors) -> RedisConfig {
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

/// `[budgets]` (the tenants' own budgets are checked with each tenant).
fn budgets(raw: RawBudgets) -> BudgetsConfig {
    BudgetsConfig {
        state_path: (!raw.state_path.is_empty()).then(|| PathBuf::from(&raw.state_path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{no_env, tenant, KEY};

    #[test]
    fn anthropic_base_url() {
        let c = Config::parse(
            &format!("[upstream]\nbase_url = \"http://h:1/x/\"\n{}", tenant("")),
            no_env,
        )
        .expect("valid");
        assert_eq!(
            c.upstreams[0].anthropic_base_url.as_deref(),
            Some("http://h:1/x/anthropic"),
            "DeepSeek's layout by default"
        );
        let env = |k: &str| (k == "SLUICE_UPSTREAM_URL").then(|| "http://o:2".to_string());
        let c = Config::parse(&tenant(""), env).expect("valid");
        assert_eq!(
            c.upstreams[0].anthropic_base_url.as_deref(),
            Some("http://o:2/anthropic"),
            "from the overridden base_url"
        );
        let c = Config::parse(
            &format!("[upstream]\nanthropic_base_url = \"\"\n{}", tenant("")),
            no_env,
        )
        .expect("valid");
        assert_eq!(c.upstreams[0].anthropic_base_url, None, "\"\" serves none");
        let c = Config::parse(
            &format!(
                "[upstream]\nanthropic_base_url = \"https://a.example/m/\"\n{}",
                tenant("")
            ),
            no_env,
        )
        .expect("valid");
        assert_eq!(
            c.upstreams[0].anthropic_base_url.as_deref(),
            Some("https://a.example/m")
        );
        let err = Config::parse(
            &format!(
                "[upstream]\nanthropic_base_url = \"ftp://x\"\n{}",
                tenant("")
            ),
            no_env,
        )
        .expect_err("not http")
        .to_string();
        assert!(err.contains("upstream.anthropic_base_url"), "{err}");
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

    const TWO: &str = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"A\"\n\
                       [[upstreams]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:2\"\napi_key_env = \"B\"\n";

    #[test]
    fn several_upstreams() {
        let text = format!(
            "[upstream]\neject_after = 5\neject_secs = 7\n{TWO}tier = 1\nweight = 3\n\
             models = [\"deepseek-chat\"]\nmodel_map = {{ \"deepseek-chat\" = \"ds-v3\" }}\n\
             anthropic_base_url = \"\"\n{}",
            tenant("")
        );
        let c = Config::parse(&text, no_env).expect("valid");
        assert_eq!(c.upstream.eject_after, 5);
        assert_eq!(c.upstream.eject_for, Duration::from_secs(7));
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let (a, b) = (&c.upstreams[0], &c.upstreams[1]);
        assert_eq!((a.tier, a.weight, a.models.len()), (0, 1, 0));
        assert_eq!(
            a.anthropic_base_url.as_deref(),
            Some("http://127.0.0.1:1/anthropic")
        );
        assert_eq!((b.tier, b.weight), (1, 3));
        assert_eq!(b.model_map["deepseek-chat"], "ds-v3");
        assert_eq!(b.anthropic_base_url, None, "\"\" serves no Messages API");
        let summary = c.to_string();
        assert!(summary.contains("a "), "{summary}");
        assert!(summary.contains("tier 1, weight 3"), "{summary}");
        assert!(
            summary.contains("models deepseek-chat (as ds-v3)"),
            "{summary}"
        );
    }

    #[test]
    fn invalid_upstreams_name_the_key() {
        for (extra, key) in [
            ("[upstream]\nbase_url = \"http://x\"\n", "upstream.base_url"),
            ("[upstream]\napi_key_env = \"X\"\n", "upstream.api_key_env"),
            (
                "[upstream]\nmax_concurrent = 4\n",
                "upstream.max_concurrent",
            ),
            (
                "[upstream]\nbalance_poll_secs = 0\n",
                "upstream.balance_poll_secs",
            ),
            ("[upstream]\nca_file = \"x.pem\"\n", "upstream.ca_file"),
            ("[upstream]\neject_after = 0\n", "upstream.eject_after"),
            ("[upstream]\neject_secs = 0\n", "upstream.eject_secs"),
            ("[[upstreams]]\nname = \"a\"\n", "upstreams.a.name"),
            ("[[upstreams]]\nname = \"C\"\n", "upstreams.C.name"),
            ("[[upstreams]]\nname = \"\"\n", "upstreams[0].name"),
            (
                "[[upstreams]]\nname = \"c\"\nweight = 0\n",
                "upstreams.c.weight",
            ),
            (
                "[[upstreams]]\nname = \"c\"\ntier = -1\n",
                "upstreams.c.tier",
            ),
            (
                "[[upstreams]]\nname = \"c\"\nbase_url = \"ftp://x\"\n",
                "upstreams.c.base_url",
            ),
            (
                "[[upstreams]]\nname = \"c\"\nmodels = [\"m\"]\nmodel_map = { \"n\" = \"x\" }\n",
                "upstreams.c.model_map",
            ),
        ] {
            let text = format!("{extra}{TWO}{}", tenant(""));
            let err = Config::parse(&text, no_env).expect_err(extra).to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
        }
        let env = |k: &str| (k == "SLUICE_UPSTREAM_URL").then(|| "http://h".to_string());
        let err = Config::parse(&format!("{TWO}{}", tenant("")), env).expect_err("env");
        assert!(err.to_string().contains("SLUICE_UPSTREAM_URL"), "{err}");
    }
}
