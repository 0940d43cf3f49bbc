//! Where a tenant stands, as response headers: `x-ratelimit-*` for the
//! request and token buckets (the way OpenAI writes them) and
//! `x-sluice-budget-*` for a budget. A limit the tenant does not have gets
//! no header.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::Standings;

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

impl Standings {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    pub(crate) fn write_headers(&self, h: &mut HeaderMap) {
        for (names, standing) in [
            (&REQUEST_HEADERS, self.requests),
            (&TOKEN_HEADERS, self.tokens),
        ] {
            let Some(s) = standing else { continue };
            let [limit, remaining, reset] = names;
            h.insert(limit, HeaderValue::from(s.limit));
            h.insert(remaining, HeaderValue::from(s.remaining));
            if let Ok(v) = HeaderValue::from_str(&format_reset(s.reset)) {
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
}
