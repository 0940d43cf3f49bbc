//! The HTTP vocabulary of the client API: the route table (`routes`),
//! request ids (`request_id`), header hygiene (`headers`) and Sluice's own
//! errors (`error`, the only place error bodies are built). Knows no
//! connection, no tenant and no limiter.

pub(crate) mod error;
pub(crate) mod headers;
pub(crate) mod request_id;
pub(crate) mod routes;
