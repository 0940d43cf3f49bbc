//! Sluice: a gateway that lets many teams share one LLM API key.
//!
//! Services point their OpenAI/DeepSeek SDK's `base_url` at Sluice. Each
//! request goes through, in order (see `proxy` for the why of the order):
//!
//! - [`routes`]: path and method to an endpoint;
//! - [`state`]: the tenant table; auth hashes the presented key and finds
//!   the `Tenant` (code past auth never sees a raw key);
//! - [`limit`]: request bucket, concurrency cap, token bucket, in memory or
//!   shared by the fleet through Redis ([`shared`] is the connection);
//! - [`cache`]: exact-match store and the in-flight map that coalesces
//!   identical requests; [`cache_store`] puts Redis behind the store;
//! - [`upstream`]: the pooled client, timeouts and retries — the only
//!   outbound code;
//! - [`relay`]: the response body that streams the answer back while
//!   reading usage, filling the cache and feeding followers, using [`sse`];
//! - [`body`]: the response body type and the per-request `Record` that
//!   writes metrics ([`metrics`]) and the access log when the body is done;
//! - [`error`]: Sluice's own errors in the OpenAI shape;
//! - [`request_id`]: the `x-request-id` of every response.
//!
//! [`server::Gateway`] binds the listeners and runs them, each client
//! connection under [`send_timeout`]; the binary, `sluice
//! demo`, the tests and the benchmarks all start it. [`simulator`] is the
//! simulated DeepSeek upstream they share.

pub mod body;
pub mod cache;
pub mod cache_store;
pub mod config;
pub mod error;
pub mod fleet_flight;
pub mod json;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod request_id;
pub mod routes;
pub mod send_timeout;
pub mod server;
pub mod shared;
pub mod simulator;
pub mod sse;
pub mod state;
pub mod text;
pub mod upstream;

pub use config::{Config, ConfigError, Secret};
pub use server::{Gateway, Handle};
