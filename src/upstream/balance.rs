//! The balance poller's one request: upstream's `GET /user/balance`, read
//! into `sluice_upstream_balance`, so ops see the shared account running
//! dry before everyone gets 402.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode};

use super::pool::{Peer, BALANCE_PATH};
use super::{read_small, Outbound, Upstream};
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// Asks `peer` for its balance and sets the gauge per currency.
pub(crate) async fn fetch(
    upstream: &Upstream,
    peer: &Peer,
    cfg: &UpstreamConfig,
    metrics: &Metrics,
) -> Result<(), String> {
    let target = peer.target(BALANCE_PATH).ok_or("no upstream URI")?;
    let mut headers = http::HeaderMap::new();
    if let Some(auth) = peer.auth() {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let outbound = Outbound::new(Method::GET, target, headers, Bytes::new());
    let within = cfg.connect_timeout + Duration::from_secs(10);
    let sent = upstream
        .send(cfg, metrics, std::time::Instant::now() + within, &outbound)
        .await
        .map_err(|e| e.to_string())?;
    if sent.response.status() != StatusCode::OK {
        return Err(format!("status {}", sent.response.status()));
    }
    let body = read_small(sent.response.into_body(), 1 << 20, within)
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    for info in v
        .get("balance_infos")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let currency = info.get("currency").and_then(|c| c.as_str()).unwrap_or("");
        // Bounded label: a currency code is three letters.
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            continue;
        }
        let total = match info.get("total_balance") {
            Some(serde_json::Value::String(s)) => s.parse::<f64>().ok(),
            Some(n) => n.as_f64(),
            None => None,
        };
        if let Some(total) = total {
            metrics
                .balance
                .with_label_values(&[&**peer.name(), currency])
                .set(total);
        }
    }
    Ok(())
}
