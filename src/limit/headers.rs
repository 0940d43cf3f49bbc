//! Where a tenant stands, as response headers: for the request and token
//! buckets `x-ratelimit-*` (the way OpenAI writes them) or, on Anthropic's
//! paths, `anthropic-ratelimit-*` (resets as RFC 3339 times), and
//! `x-sluice-budget-*` for a budget. A limit the tenant does not have gets
//! no header.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::budget::civil_from_days;
use super::Standings;
use crate::api::Format;

// Limit, remaining, reset; parsed once.
static REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
static BUDGET_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-sluice-budget-limit-usd"),
    HeaderName::from_static("x-sluice-budget-remaining-usd"),
    HeaderName::from_static("x-sluice-budget-reset"),
];
static TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
static ANTHROPIC_REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
];
static ANTHROPIC_TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
];

impl Standings {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, or for
    /// Anthropic's API `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`.
    pub(crate) fn write_headers(&self, h: &mut HeaderMap, format: Format) {
        let (requests, tokens) = match format {
            Format::OpenAi => (&REQUEST_HEADERS, &TOKEN_HEADERS),
            Format::Anthropic => (&ANTHROPIC_REQUEST_HEADERS, &ANTHROPIC_TOKEN_HEADERS),
        };
        for (names, standing) in [(requests, self.requests), (tokens, self.tokens)] {
            let Some(s) = standing else { continue };
            let [limit, remaining, reset] = names;
            h.insert(limit, HeaderValue::from(s.limit));
            h.insert(remaining, HeaderValue::from(s.remaining));
            let at = match format {
                Format::OpenAi => format_reset(s.reset),
                Format::Anthropic => rfc3339_after(SystemTime::now(), s.reset),
            };
            if let Ok(v) = HeaderValue::from_str(&at) {
                h.insert(reset, v);
            }
        }
        if let Some(b) = self.budget {
            let [limit, remaining, reset] = &BUDGET_HEADERS;
            for (name, value) in [
                (limit, usd(b.limit_usd)),
                (remaining, usd(b.remaining_usd)),
                (reset, format_reset(b.reset)),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, v);
                }
            }
        }
    }
}

/// Dollars as a header shows them: up to six decimals, no trailing zeros.
fn usd(v: f64) -> String {
    let s = format!("{:.6}", v.max(0.0));
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// The UTC time `wait` after `now`, as RFC 3339 with whole seconds
/// (rounded up, so a client that waits until then is never early):
/// `2026-01-02T03:04:05Z`, the way Anthropic writes its resets.
pub(crate) fn rfc3339_after(now: SystemTime, wait: Duration) -> String {
    let at = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(wait);
    let secs = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        (t % 3600) / 60,
        t % 60
    )
}

/// Durations the way OpenAI writes them: `20ms`, `1s`, `6m0s`.
pub(crate) fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let total = d.as_secs();
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_formats() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3725)), "1h2m5s");
    }

    #[test]
    fn anthropic_resets_are_rfc3339_times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_767_323_045); // 2026-01-02T03:04:05Z
        assert_eq!(rfc3339_after(now, Duration::ZERO), "2026-01-02T03:04:05Z");
        assert_eq!(
            rfc3339_after(now, Duration::from_millis(1)),
            "2026-01-02T03:04:06Z",
            "rounded up"
        );
        assert_eq!(
            rfc3339_after(now, Duration::from_secs(86_400 * 60)),
            "2026-03-03T03:04:05Z"
        );
        let mut h = HeaderMap::new();
        let standings = Standings {
            requests: Some(super::super::Standing {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1),
            }),
            tokens: None,
            budget: None,
        };
        standings.write_headers(&mut h, Format::Anthropic);
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "59");
        let reset = h["anthropic-ratelimit-requests-reset"]
            .to_str()
            .expect("ascii");
        assert!(reset.ends_with('Z') && reset.len() == 20, "{reset}");
        assert!(h.get("x-ratelimit-limit-requests").is_none());
        assert!(
            h.get("anthropic-ratelimit-tokens-limit").is_none(),
            "no such limit"
        );
    }
}
