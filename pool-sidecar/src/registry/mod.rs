//! The pool registry: [`state`] holds the rules, [`actor`] owns the one instance and is the
//! only code that mutates it; everyone else holds a [`RegistryHandle`].

pub mod actor;
pub mod signer;
pub mod state;

pub use actor::{CORE_TASK, RegistryEvent, RegistryHandle, spawn_registry};
pub use signer::LeaseSigner;
pub use state::{ConnectionId, EngineReport, LeasePolicy, Owner, ProbeReport, UnloadReason};
