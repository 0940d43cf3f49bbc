//! The response side: the body type every response has (`body`), the
//! relay that carries an upstream answer to its client while metering,
//! caching and feeding a flight's followers (`relay`), and the `Record`
//! that writes a request's metrics and access-log line when its body is
//! dropped (`record`). Given what it needs (metrics, the cache, a tenant's
//! handles), never the whole `App`.

pub(crate) mod body;
pub mod hit;
pub(crate) mod lead;
pub(crate) mod log;
pub(crate) mod record;
pub(crate) mod relay;

/// The error a response body ends with (an abort).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
