//! Where a tenant stands, as response headers: for the request and token
//! buckets `x-ratelimit-*` (the way OpenAI writes them) or, on Anthropic's
//! paths, `anthropic-ratelimit-*` (resets as RFC 3339 times), and
//! `x-sluice-budget-*` for a budget. A limit the tenant does not have gets
//! no header.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
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
    ///
    /// Every answer carries these, so they are written by hand into one
    /// buffer that all the values share: one allocation for up to nine
    /// values, where a `HeaderValue` each (and a `String` for each reset)
    /// cost eleven.
    pub(crate) fn write_headers(&self, h: &mut HeaderMap, format: Format) {
        let (requests, tokens) = match format {
            Format::OpenAi => (&REQUEST_HEADERS, &TOKEN_HEADERS),
            Format::Anthropic => (&ANTHROPIC_REQUEST_HEADERS, &ANTHROPIC_TOKEN_HEADERS),
        };
        let mut buf = BytesMut::with_capacity(160);
        let mut ends: [(&HeaderName, usize); 9] = [(&REQUEST_HEADERS[0], 0); 9];
        let mut n = 0;
        let mut push = |name, buf: &BytesMut| {
            ends[n] = (name, buf.len());
            n += 1;
        };
        for (names, standing) in [(requests, self.requests), (tokens, self.tokens)] {
            let Some(s) = standing else { continue };
            let [limit, remaining, reset] = names;
            put_u64(&mut buf, s.limit);
            push(limit, &buf);
            put_u64(&mut buf, s.remaining);
            push(remaining, &buf);
            match format {
                Format::OpenAi => put_reset(&mut buf, s.reset),
                Format::Anthropic => put_rfc3339_after(&mut buf, SystemTime::now(), s.reset),
            }
            push(reset, &buf);
        }
        if let Some(b) = self.budget {
            let [limit, remaining, reset] = &BUDGET_HEADERS;
            put_usd(&mut buf, b.limit_usd);
            push(limit, &buf);
            put_usd(&mut buf, b.remaining_usd);
            push(remaining, &buf);
            put_reset(&mut buf, b.reset);
            push(reset, &buf);
        }
        let buf = buf.freeze();
        let mut at = 0;
        for &(name, end) in &ends[..n] {
            // Digits, letters, `.`, `:` and `-` only: always a valid value.
            if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(at..end)) {
                h.insert(name, v);
            }
            at = end;
        }
    }
}

fn put_u64(buf: &mut BytesMut, v: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// `n` as exactly two digits (`n` < 100).
fn put_2(buf: &mut BytesMut, n: u64) {
    buf.extend_from_slice(&[b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]);
}

/// `frac` (< `10^digits`) as a decimal fraction of `digits` places, without
/// trailing zeros, and nothing at all for zero.
fn put_fraction(buf: &mut BytesMut, mut frac: u64, mut digits: u32) {
    if frac == 0 {
        return;
    }
    while frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    buf.extend_from_slice(b".");
    let text = itoa::Buffer::new().format(frac).len();
    for _ in text..digits as usize {
        buf.extend_from_slice(b"0");
    }
    put_u64(buf, frac);
}

/// Dollars as a header shows them: up to six decimals, no trailing zeros.
fn put_usd(buf: &mut BytesMut, v: f64) {
    // Whole micro-dollars; `as` saturates, and no budget comes near 2^64.
    let micros = (v.max(0.0) * 1e6).round() as u64;
    put_u64(buf, micros / 1_000_000);
    put_fraction(buf, micros % 1_000_000, 6);
}

/// The UTC time `wait` after `now`, as RFC 3339 with whole seconds
/// (rounded up, so a client that waits until then is never early):
/// `2026-01-02T03:04:05Z`, the way Anthropic writes its resets.
fn put_rfc3339_after(buf: &mut BytesMut, now: SystemTime, wait: Duration) {
    let at = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(wait);
    let secs = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400).unsigned_abs();
    let year = u64::try_from(y).unwrap_or(0);
    put_2(buf, year / 100);
    put_2(buf, year);
    for (sep, v) in [
        (b'-', u64::from(mo)),
        (b'-', u64::from(d)),
        (b'T', t / 3600),
        (b':', (t % 3600) / 60),
        (b':', t % 60),
    ] {
        buf.extend_from_slice(&[sep]);
        put_2(buf, v);
    }
    buf.extend_from_slice(b"Z");
}

/// Durations the way OpenAI writes them: `20ms`, `1.5s`, `6m0s`
/// (whole milliseconds, truncated).
fn put_reset(buf: &mut BytesMut, d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        put_u64(buf, ms);
        buf.extend_from_slice(b"ms");
        return;
    }
    if ms < 60_000 {
        put_u64(buf, ms / 1000);
        put_fraction(buf, ms % 1000, 3);
        buf.extend_from_slice(b"s");
        return;
    }
    let total = ms / 1000;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        put_u64(buf, h);
        buf.extend_from_slice(b"h");
    }
    for (v, unit) in [(m, b"m"), (s, b"s")] {
        put_u64(buf, v);
        buf.extend_from_slice(unit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc3339_after(now: SystemTime, wait: Duration) -> String {
        let mut buf = BytesMut::new();
        put_rfc3339_after(&mut buf, now, wait);
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn format_reset(d: Duration) -> String {
        let mut buf = BytesMut::new();
        put_reset(&mut buf, d);
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[test]
    fn reset_formats() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3725)), "1h2m5s");
        assert_eq!(format_reset(Duration::from_millis(1050)), "1.05s");
        assert_eq!(format_reset(Duration::from_millis(59_999)), "59.999s");
        assert_eq!(format_reset(Duration::from_micros(20_900)), "20ms");
        assert_eq!(format_reset(Duration::ZERO), "0ms");
        assert_eq!(format_reset(Duration::from_secs(7200)), "2h0m0s");
        // A budget's month: hours past 24.
        assert_eq!(
            format_reset(Duration::from_secs(743 * 3600 + 59 * 60)),
            "743h59m0s"
        );
    }

    #[test]
    fn budget_values() {
        let mut h = HeaderMap::new();
        let standings = Standings {
            requests: None,
            tokens: Some(super::super::Standing {
                limit: 1_000_000,
                remaining: 0,
                reset: Duration::from_millis(250),
            }),
            budget: Some(super::super::BudgetStanding {
                limit_usd: 25.0,
                remaining_usd: 0.0012345,
                reset: Duration::from_secs(90),
            }),
        };
        standings.write_headers(&mut h, Format::OpenAi);
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000000");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(h["x-ratelimit-reset-tokens"], "250ms");
        assert_eq!(h["x-sluice-budget-limit-usd"], "25");
        assert_eq!(h["x-sluice-budget-remaining-usd"], "0.001235");
        assert_eq!(h["x-sluice-budget-reset"], "1m30s");
        assert_eq!(h.len(), 6, "no request limit, no request headers");
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
