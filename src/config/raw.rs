//! The file as written: serde structs that mirror its sections, refuse
//! unknown keys (`deny_unknown_fields`) and fill in each key's default.
//! `validate` turns them into the typed `Config`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Pricing;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) tenants: Vec<RawTenant>,
    #[serde(default)]
    pub(super) pricing: BTreeMap<String, Pricing>,
    pub(super) redis: Option<RawRedis>,
    #[serde(default)]
    pub(super) budgets: RawBudgets,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBudgets {
    pub(super) state_path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    pub(super) url: String,
    pub(super) cluster: bool,
    pub(super) key_prefix: String,
    pub(super) timeout_ms: u64,
    pub(super) on_error: String,
    pub(super) limits: bool,
    pub(super) cache: bool,
    pub(super) coalesce: bool,
    pub(super) cache_max_entry_bytes: u64,
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
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) admin_listen: String,
    pub(super) max_body_bytes: u64,
    pub(super) shutdown_grace_secs: u64,
    pub(super) header_read_timeout_secs: u64,
    pub(super) send_timeout_secs: u64,
    pub(super) keepalive_timeout_secs: u64,
    pub(super) max_connections: u64,
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
pub(super) struct RawUpstream {
    pub(super) base_url: String,
    /// `None`: `base_url` + `/anthropic`; `""`: no Messages API.
    pub(super) anthropic_base_url: Option<String>,
    pub(super) api_key_env: String,
    pub(super) connect_timeout_secs: u64,
    pub(super) first_byte_timeout_secs: u64,
    pub(super) idle_timeout_secs: u64,
    pub(super) max_retries: u32,
    pub(super) max_concurrent: u64,
    pub(super) balance_poll_secs: u64,
    pub(super) ca_file: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            base_url: "https://api.deepseek.com".into(),
            anthropic_base_url: None,
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
pub(super) struct RawCache {
    pub(super) enabled: bool,
    pub(super) max_bytes: u64,
    pub(super) ttl_secs: u64,
    pub(super) scope: String,
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
pub(super) struct RawTenant {
    pub(super) name: String,
    pub(super) key_sha256: KeyList,
    #[serde(default = "default_rpm")]
    pub(super) requests_per_minute: u32,
    pub(super) request_burst: Option<u32>,
    #[serde(default = "default_tpm")]
    pub(super) tokens_per_minute: u64,
    #[serde(default = "default_tenant_concurrency")]
    pub(super) max_concurrent: u32,
    #[serde(default)]
    pub(super) models: Vec<String>,
    #[serde(default = "default_true")]
    pub(super) cache: bool,
    #[serde(default)]
    pub(super) budget_usd: f64,
    #[serde(default = "default_period")]
    pub(super) budget_period: String,
    #[serde(default = "default_weight")]
    pub(super) weight: u32,
}

fn default_weight() -> u32 {
    1
}

fn default_period() -> String {
    "month".into()
}

/// `key_sha256` takes one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum KeyList {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::{no_env, tenant};
    use crate::config::Config;

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
}
