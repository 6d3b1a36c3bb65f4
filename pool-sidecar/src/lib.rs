//! pool-managerd: the pool registry sidecar. It knows which engines serve which models, whether
//! they are healthy, and who holds their slots; it serves that over a Unix socket (`ipc`), with
//! a read-only HTTP shim for operators (`debug_http`).
//!
//! Module map: `config` (the TOML file), `registry` (state + the actor that owns it), `probe`
//! and `engine_http` (engine health), `ipc` (socket file, accept loop, one connection),
//! `debug_http`, `status_view` and `status_page` (operator views), `metrics`, `cli`, `startup` (from flags to
//! a running daemon), `listeners` (which sockets it serves: systemd's or its own), `daemon`
//! (wiring and shutdown order), `pools` (the controller of which pools run) and `supervisor`
//! (one managed engine's lifecycle), `eviction`, `residency`, `footprint`, `gguf`, `gpu` and
//! `gpu_baselines` (on-demand pools under memory budgets), `durable` (files that survive a
//! crash), `spans` (OpenTelemetry spans of Acquires, Releases, probes and engine starts).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod debug_http;
pub mod durable;
pub mod engine_http;
pub mod eviction;
pub mod footprint;
pub mod gguf;
pub mod gpu;
pub mod gpu_baselines;
pub mod ipc;
pub mod listeners;
pub mod metrics;
pub mod pools;
pub mod probe;
pub mod registry;
pub mod residency;
pub mod spans;
pub mod startup;
pub mod status_page;
pub mod status_view;
pub mod supervisor;
