//! `pool-ipc`: everything two processes need to talk about pools over pool-managerd's Unix socket.
//!
//! - [`codec`]: length-prefixed bincode frames, size-checked before any allocation.
//! - [`wire`]: the messages (handshake, pipelined calls and replies, pushed events).
//! - [`registry`]: the registry's value types (pools, states, leases) shared by both daemons.
//! - [`error_code`]: the typed error every request can fail with, with stable numeric codes.
//! - [`client`]: the async client (one shared connection, pipelining, reconnect, registry mirror).
//! - [`socket_path`]: where the socket lives when nobody says.
//!
//! The plumbing both daemons share besides (systemd, signals, HTTP serving) is `daemon-support`'s.
//!
//! Wire evolution rule: enum variants are only ever appended, never reordered or removed, because
//! bincode encodes the variant index; `PROTOCOL_VERSION` changes when that rule cannot be kept.

pub mod client;
pub mod codec;
pub mod error_code;
pub mod framed;
mod outbox;
pub mod registry;
pub mod socket_path;
pub mod wire;

pub use client::{ClientConfig, ClientError, ConnectionState, LeaseGuard, PoolClient};
pub use codec::{CodecError, DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_BYTES_CEILING};
pub use error_code::{ErrorCode, IpcError};
pub use registry::{
    AcquireTarget, ApiEndpoint, DispatchCheck, Lease, LeaseId, LeaseSecret, PoolId, PoolSnapshot,
    PoolState, RegistrySnapshot, ReleaseOutcome,
};
pub use wire::{
    Call, Change, ClientFrame, Event, HeldLease, Hello, HelloPreamble, MAGIC, PROTOCOL_VERSION,
    Reply, Request, Response, ServerFrame, Welcome,
};
