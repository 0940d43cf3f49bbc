//! Sluice: a gateway that lets many teams share one LLM API key.
//!
//! Services point their OpenAI/DeepSeek SDK's `base_url` at Sluice. The
//! crate is layered; a module uses only modules of the layers below it
//! (ARCHITECTURE.md has the rules). Lowest first:
//!
//! - [`config`]: the validated configuration and `check-config`'s summary;
//!   [`log`]: the JSON log line;
//!   [`api`]: the wire formats (the strict JSON body scan, SSE framing,
//!   usage and its estimate, assembling and replaying answers);
//! - [`metrics`]: one Prometheus registry per gateway, plain numbers in;
//!   `shared`: the Redis connection, its health circuit and its scripts;
//!   `http`: routes, request ids, header hygiene and Sluice's own errors;
//! - [`limit`]: request, token and concurrency limits and spend budgets, in
//!   memory or shared through Redis; [`cache`]: the exact-match cache (key,
//!   entry, in-memory store, and the tiered store with Redis behind it);
//!   `upstream`: the upstream pool, the outbound client, retries, TLS and
//!   the balance poller — the only outbound code;
//! - `flight`: coalescing identical requests in flight, on this replica
//!   and across replicas; [`tenant`]: tenants and auth;
//! - [`app`]: the composition root (`App`, the reloadable `Snapshot`);
//!   [`response`]: the response body, the relay that streams an answer back
//!   while metering, caching and feeding followers, and the `Record` that
//!   writes metrics and the access log;
//! - [`request`]: the request path, as phases over one request context;
//! - `server`: `Gateway`: listeners, the connection driver, the service
//!   stack, the admin listener.
//!
//! [`Gateway`] is what the binary, `sluice demo`, the tests and the
//! benchmarks all start; [`simulator`] is the simulated DeepSeek upstream
//! they share.

pub mod api;
pub mod app;
pub mod cache;
pub mod config;
pub(crate) mod flight;
pub(crate) mod http;
pub mod limit;
pub mod log;
pub mod metrics;
pub mod request;
pub mod response;
pub(crate) mod server;
pub(crate) mod shared;
pub mod simulator;
pub mod tenant;
pub(crate) mod upstream;

pub use config::{Config, ConfigError, Keys, Secret};
pub use server::{Gateway, Handle};
