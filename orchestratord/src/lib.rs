//! orchestratord: the front door. `startup` (from flags to a running server: config, listener,
//! signals), `daemon` ([`run`]: wiring and phased shutdown), `app` (router and
//! what every request passes through: keys, correlation ids, access lines), `client_address` (who
//! a request came from, through trusted balancers), `api` (handlers: validation and answer shapes),
//! `lifecycle` (one request's life, the same for every endpoint), `request_trace` (its
//! OpenTelemetry spans, when exported), `scheduler` (the queue's owner:
//! admission → placement → lease), `admission` (the pure queue), `placement` (choosing a pool
//! from the registry mirror), `adapters` (talking to engines), `json_object` (top-level JSON edits
//! that keep every other byte), `keys` (API keys, their roles and limits), `tenants` (per-key
//! limits and usage), `drain` (whether the host
//! takes new requests), `config`, `error` (every failure's status and shape).

pub mod adapters;
pub mod admission;
pub mod api;
pub mod app;
pub mod client_address;
pub mod config;
pub mod daemon;
pub mod drain;
pub mod error;
pub mod json_object;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod request_trace;
pub mod scheduler;
pub mod sessions;
pub mod sse;
pub mod startup;
pub mod tasks;
pub mod tenants;

pub use daemon::run;
