//! orchestratord: the front door. `app` (router and cross-cutting layers), `api` (handlers),
//! `scheduler` (the queue's owner: admission → placement → lease), `admission` (the pure
//! queue), `placement` (choosing a pool from the registry mirror), `adapters` (talking to
//! engines), `config`, `error` (every failure's status and shape).

pub mod adapters;
pub mod admission;
pub mod api;
pub mod app;
pub mod config;
pub mod error;
pub mod metrics;
pub mod placement;
pub mod scheduler;
pub mod sessions;
pub mod sse;
pub mod tasks;
