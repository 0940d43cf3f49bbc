//! The summary `check-config` prints: one line per concern (listeners,
//! connections, upstreams, cache, shared state, pricing) and one per tenant
//! with its limits and budget; the Redis URL is shown without its password.

use std::fmt;

use super::{CacheScope, Config, OnError};

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
            "upstream      retries {}, connect timeout {}s, first byte timeout {}s, eject after {} failures for {}s",
            u.max_retries,
            u.connect_timeout.as_secs(),
            u.first_byte_timeout.as_secs(),
            u.eject_after,
            u.eject_for.as_secs(),
        )?;
        writeln!(f, "upstreams     {}", self.upstreams.len())?;
        for p in &self.upstreams {
            let models = if p.models.is_empty() {
                "any".to_string()
            } else {
                p.models
                    .iter()
                    .map(|m| match p.model_map.get(m) {
                        Some(to) => format!("{m} (as {to})"),
                        None => m.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mapped: Vec<String> = p
                .model_map
                .iter()
                .filter(|(m, _)| p.models.is_empty() || !p.models.contains(m))
                .map(|(m, to)| format!("{m} as {to}"))
                .collect();
            writeln!(
                f,
                "  {:<20} {} (key from {}, tier {}, weight {}, max_concurrent {})  models {}{}  messages {}",
                p.name,
                p.base_url,
                if p.api_key_env.is_empty() {
                    "<none>"
                } else {
                    &p.api_key_env
                },
                p.tier,
                p.weight,
                unlimited(p.max_concurrent as u64),
                models,
                if mapped.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", mapped.join(", "))
                },
                p.anthropic_base_url.as_deref().unwrap_or("none"),
            )?;
        }
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
