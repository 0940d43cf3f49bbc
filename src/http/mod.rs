//! The HTTP vocabulary of the client API: the route table (`routes`),
//! request ids (`request_id`), header hygiene (`headers`) and Sluice's own
//! errors (`error`, the only place error bodies are built). Knows no
//! connection, no tenant and no limiter.

pub mod error;
pub mod headers;
pub mod request_id;
pub mod routes;
