//! Integration tests: the real gateway and the simulated upstream on
//! ephemeral ports, spoken to over HTTP. One binary, a module per concern.

mod support;

mod binary;
mod budgets;
mod cache;
mod connections;
mod errors;
mod exactly_once;
mod fair_share;
mod fault_proxy;
mod faults;
mod fleet;
mod fleet_cap;
mod fleet_coalesce;
mod flight_faults;
mod hostile;
mod limits;
mod messages;
mod metrics;
mod ops;
mod proxy;
mod shared_cache;
mod shares;
mod slow_clients;
mod tls;
mod upstreams;
