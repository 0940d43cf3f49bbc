//! The balance poller's one request: upstream's `GET /user/balance`, read
//! into `sluice_upstream_balance`, so ops see the shared account running
//! dry before everyone gets 402.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use super::pool::{Pool, BALANCE_PATH};
use super::{read_small, Outbound, Upstream};
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// Asks the upstream at `index` of `pool` for its balance and sets the
/// gauge per currency.
pub(crate) async fn fetch(
    upstream: &Upstream,
    pool: &Pool,
    index: usize,
    cfg: &UpstreamConfig,
    metrics: &Metrics,
) -> Result<(), String> {
    let peer = pool.peer(index);
    let outbound = Outbound::new(
        Method::GET,
        BALANCE_PATH,
        http::HeaderMap::new(),
        Bytes::new(),
    );
    let within = cfg.connect_timeout + Duration::from_secs(10);
    let mut route = Pool::only(index);
    let outbound = outbound.to(index, peer);
    let sent = upstream
        .send(
            pool,
            &mut route,
            cfg,
            metrics,
            std::time::Instant::now() + within,
            &outbound,
        )
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
