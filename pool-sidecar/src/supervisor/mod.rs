//! Supervision of the engines pool-managerd runs itself (DESIGN.md §5): [`engine`] is the
//! per-pool supervisor task, [`process`] starts and stops one engine process, [`restart`] decides
//! when to try again, [`record`] keeps what a restarted sidecar needs to adopt engines, and
//! [`log`] follows and caps each engine's log file.

pub mod engine;
pub mod log;
pub mod process;
pub mod record;
pub mod restart;

pub use engine::{AdminCommand, EnginePaths, EngineSupervisor};
