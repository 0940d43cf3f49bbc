//! Tenants as the request path sees them past auth: name, allowed models,
//! cache flag, limits and metric handles; and the keys that identify them
//! (only a key's SHA-256 is ever kept). Code past auth sees a `Tenant`,
//! never the key that was presented.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use http::HeaderMap;
use prometheus::IntGauge;
use sha2::{Digest, Sha256};

use crate::api::Format;
use crate::config::TenantConfig;
use crate::limit::TenantLimits;
use crate::metrics::{Metrics, ModelLabels, UsageHandles};

/// A fresh tenant key: `sk-sluice-` and 40 random alphanumerics.
pub fn new_key() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!(
        "sk-sluice-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    )
}

/// The SHA-256 a tenant key is stored in config and looked up by.
pub fn key_sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// A configured tenant, as the request path sees it after auth. Code past
/// auth sees this, never the key that was presented.
pub struct Tenant {
    pub(crate) name: Arc<str>,
    /// Empty = any model.
    pub(crate) models: Vec<String>,
    pub(crate) cache: bool,
    /// Its share of a full upstream's slots while its requests wait.
    pub(crate) weight: u32,
    pub(crate) limits: Arc<TenantLimits>,
    pub(crate) inflight: IntGauge,
    /// Usage metric handles per model label, resolved on first use.
    usage: HashMap<Arc<str>, OnceLock<UsageHandles>, foldhash::fast::RandomState>,
    metrics: Arc<Metrics>,
}

impl Tenant {
    pub(crate) fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// The usage handles for a model label (one `ModelLabels` returned):
    /// borrowed, so metering clones no counter handles.
    pub(crate) fn usage(&self, model: &str) -> Cow<'_, UsageHandles> {
        match self.usage.get(model) {
            Some(cell) => {
                Cow::Borrowed(cell.get_or_init(|| self.metrics.usage_handles(&self.name, model)))
            }
            None => Cow::Owned(self.metrics.usage_handles(&self.name, model)),
        }
    }
}

impl Tenant {
    /// A configured tenant with its limits (kept from before a reload, or
    /// new) and its metric handles, one per model label, made on first use.
    pub(crate) fn new(
        config: &TenantConfig,
        limits: Arc<TenantLimits>,
        models: &ModelLabels,
        metrics: &Arc<Metrics>,
    ) -> Tenant {
        Tenant {
            name: Arc::from(config.name.as_str()),
            models: config.models.clone(),
            cache: config.cache,
            weight: config.weight,
            limits,
            inflight: metrics.inflight.with_label_values(&[&config.name]),
            usage: models
                .all()
                .map(|m| (Arc::clone(m), OnceLock::new()))
                .collect(),
            metrics: Arc::clone(metrics),
        }
    }
}

/// The tenant key a request presents: `Authorization: Bearer <key>`; on
/// Anthropic's paths `x-api-key: <key>` too, the Bearer winning when both
/// are sent (as at Anthropic and DeepSeek).
pub(crate) fn presented_key(headers: &HeaderMap, format: Format) -> Option<&[u8]> {
    let bearer = || {
        let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
        let (scheme, key) = value.split_at(value.iter().position(|&b| b == b' ')?);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return None;
        }
        let key = key.trim_ascii();
        (!key.is_empty()).then_some(key)
    };
    match format {
        Format::OpenAi => bearer(),
        Format::Anthropic => bearer().or_else(|| {
            let key = headers.get("x-api-key")?.as_bytes().trim_ascii();
            (!key.is_empty()).then_some(key)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_as_bearer_or_on_anthropic_paths_as_x_api_key() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, http::HeaderValue::from_static(v));
            }
            h
        };
        let both = headers(&[("authorization", "Bearer sk-a"), ("x-api-key", "sk-b")]);
        assert_eq!(presented_key(&both, Format::Anthropic), Some(&b"sk-a"[..]));
        assert_eq!(presented_key(&both, Format::OpenAi), Some(&b"sk-a"[..]));
        let x = headers(&[("x-api-key", " sk-b ")]);
        assert_eq!(presented_key(&x, Format::Anthropic), Some(&b"sk-b"[..]));
        assert_eq!(presented_key(&x, Format::OpenAi), None);
        let basic = headers(&[("authorization", "Basic sk-a"), ("x-api-key", "sk-b")]);
        assert_eq!(presented_key(&basic, Format::Anthropic), Some(&b"sk-b"[..]));
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "")]), Format::Anthropic),
            None
        );
    }
}
