//! Supervision of the engines pool-managerd runs itself (DESIGN.md §5): [`machine`] decides what
//! a pool's engine goes through (pure, no I/O), [`engine`] is the per-pool supervisor task that
//! carries those decisions out, [`process`] starts and stops one engine process, [`restart`]
//! decides when to try again, [`record`] keeps what a restarted sidecar needs to adopt engines, and
//! [`log`] follows and caps each engine's log file.

pub mod engine;
pub mod log;
pub mod machine;
pub mod process;
pub mod record;
pub mod restart;

pub use engine::{AdminCommand, EnginePaths, EngineSupervisor};
