//! The messages of the pool-managerd protocol (DESIGN.md §3).
//!
//! A connection opens with exactly one [`ClientFrame::Hello`], answered by
//! [`ServerFrame::Welcome`] or [`ServerFrame::Refused`] (after which the server closes). Then the
//! client sends [`ClientFrame::Call`]s, many in flight at once, each answered by one
//! [`ServerFrame::Reply`] with the same id; replies may interleave with pushed
//! [`ServerFrame::Event`]s. Append-only: never reorder or remove a variant or a field. The first
//! two fields of [`Hello`] and the `Refused` variant must stay where they are in every future
//! version, so that a mismatched peer can still be told why it was refused.

use crate::error_code::IpcError;
use crate::registry::{
    AcquireTarget, DispatchCheck, GpuInventory, Lease, LeaseId, LeaseSecret, MemoryReport, PoolId,
    PoolSnapshot, RegistrySnapshot, ReleaseOutcome,
};
use bincode::{Decode, Encode};

/// The first four bytes of every `Hello`: tells a pool-managerd socket from anything else.
pub const MAGIC: [u8; 4] = *b"PMGR";

/// Bumped whenever the append-only rule cannot be kept. 2: leases hold several slots
/// (`Acquire::slots`, `Lease::slots`, `HeldLease::slots`) and pools say which APIs their engine
/// serves (`PoolSnapshot::api_endpoints`). 3: leases are owned and can expire: every lease comes
/// with a secret (`Lease::secret`) that a re-assertion must show (`HeldLease::secret`), the server
/// announces its lease time-to-live (`Welcome::lease_ttl_ms`) and clients keep their leases alive
/// with `Request::Renew`; a peer over its lease cap gets `ErrorCode::LeaseCapReached`.
/// 4: pools can be loaded on demand: two appended pool states (`PoolState::Unloaded`,
/// `PoolState::Loading`) that an older client could not decode in a snapshot or event,
/// `Request::Load` / `Request::Unload` / `Request::CancelLoad`, `Request::Memory` answered
/// by `Response::Memory`, and `Lease::registry_epoch`.
/// 5: `Request::Acquire::trace_parent`, the caller's W3C `traceparent`, so that the server's span
/// of the Acquire joins the caller's trace.
pub const PROTOCOL_VERSION: u32 = 5;

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ClientFrame {
    Hello(Hello),
    Call(Call),
}

/// The handshake. `magic` and `protocol_version` come first, in every version.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    pub magic: [u8; 4],
    pub protocol_version: u32,
    /// Shown in the server's logs (e.g. `orchestratord`, `pool-managerd status`).
    pub client_name: String,
    /// Leases this client still uses from before a reconnect; the server re-creates those whose
    /// secret it recognises.
    pub held_leases: Vec<HeldLease>,
}

/// The part of a `Hello` every protocol version shares: the frame's variant index, the magic and
/// the version. A server decodes this when a first frame does not decode as its own `Hello`, to
/// tell "a client of another version" from "not our protocol at all".
#[derive(Debug, Clone, PartialEq, Eq, Decode)]
pub struct HelloPreamble {
    pub frame_variant: u32,
    pub magic: [u8; 4],
    pub protocol_version: u32,
}

/// A lease the client re-asserts after reconnecting.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HeldLease {
    pub lease: LeaseId,
    pub pool: PoolId,
    /// The slots the lease held, so the server re-creates it at its true size.
    pub slots: u32,
    /// The secret the lease was granted with ([`Lease::secret`]): the proof that it is ours.
    pub secret: LeaseSecret,
}

/// One request; `id` is chosen by the client and echoed in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Call {
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    Ping,
    /// The whole registry.
    Snapshot,
    PoolStatus {
        pool: PoolId,
    },
    /// Advisory: could a lease on this pool be granted right now?
    CanDispatch {
        pool: PoolId,
    },
    /// Check-and-reserve `slots` slots of one pool in one step: as many as the request makes
    /// the engine run sequences at once (`n` choices, a prompt batch), never fewer.
    Acquire {
        target: AcquireTarget,
        task_id: String,
        session: Option<String>,
        slots: u32,
        /// The W3C `traceparent` of the caller's span for this Acquire (`None`: not traced); the
        /// server's span of it becomes that span's child.
        trace_parent: Option<String>,
    },
    Release {
        lease: LeaseId,
        outcome: ReleaseOutcome,
    },
    /// Answered with the whole registry; then every change is pushed as an [`Event`].
    Subscribe,
    /// Admin: no new leases; stop the engine when the leases end or at the deadline.
    Drain {
        pool: PoolId,
        deadline_ms: u64,
    },
    /// Admin: bring `model` up on the pool and swap to it.
    Reload {
        pool: PoolId,
        model: String,
    },
    /// Admin: restart the pool's engine (also clears `Failed`).
    Restart {
        pool: PoolId,
    },
    /// The host's GPUs (NVML).
    Gpus,
    /// Keeps every lease of this connection alive for another `Welcome::lease_ttl_ms`; a client
    /// holding leases sends it well within that time (the shared client: every third of it).
    Renew,
    /// Start the engine of an Unloaded on-demand pool (answered once the load is under way; the
    /// pool then shows Loading, then Ready). Not admin-only: a demand for the pool's model (from
    /// orchestratord) must be able to bring it up. A no-op for a pool that is loaded or loading.
    /// `for_waiting_requests`: the load is for requests waiting on this connection, so it is
    /// withdrawn by `CancelLoad` or when the connection closes; otherwise (an operator's load) it
    /// is always finished.
    Load {
        pool: PoolId,
        for_waiting_requests: bool,
    },
    /// Admin: no new leases; unload the on-demand pool's engine when its leases end (or at its
    /// drain deadline), leaving it Unloaded.
    Unload {
        pool: PoolId,
    },
    /// This connection no longer needs the load it asked for (`Load` with
    /// `for_waiting_requests`: its waiting requests went away). Once no connection (and no
    /// operator) wants a load still under way, a pool configured `abandoned_load = "cancel"`
    /// gives it up: its engine is stopped and it shows Unloaded again. A no-op once the pool is
    /// loaded, and for a connection that never asked.
    CancelLoad {
        pool: PoolId,
    },
    /// Each device's memory budget and the managed pools' footprints.
    Memory,
}

impl Request {
    /// A short, stable name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Snapshot => "snapshot",
            Request::PoolStatus { .. } => "pool_status",
            Request::CanDispatch { .. } => "can_dispatch",
            Request::Acquire { .. } => "acquire",
            Request::Release { .. } => "release",
            Request::Subscribe => "subscribe",
            Request::Drain { .. } => "drain",
            Request::Reload { .. } => "reload",
            Request::Restart { .. } => "restart",
            Request::Gpus => "gpus",
            Request::Renew => "renew",
            Request::Load { .. } => "load",
            Request::Unload { .. } => "unload",
            Request::CancelLoad { .. } => "cancel_load",
            Request::Memory => "memory",
        }
    }

    /// Admin requests may be restricted to an admin group.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::Drain { .. }
                | Request::Reload { .. }
                | Request::Restart { .. }
                | Request::Unload { .. }
        )
    }
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ServerFrame {
    Welcome(Welcome),
    Reply(Reply),
    Event(Event),
    /// The connection is refused or broken beyond repair; the server closes it after this frame.
    Refused(IpcError),
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    pub protocol_version: u32,
    pub server_version: String,
    pub registry_epoch: u64,
    /// The largest frame the server accepts.
    pub max_frame_bytes: u32,
    /// Re-asserted leases the server re-created for this connection.
    pub reasserted: Vec<LeaseId>,
    /// Re-asserted leases it could not re-create, and why; they are gone.
    pub rejected: Vec<(LeaseId, IpcError)>,
    /// A lease not renewed (`Request::Renew`) for this long is taken back and its holder told
    /// (`Change::LeasesRevoked`); 0: leases never expire.
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Reply {
    pub id: u64,
    pub result: Result<Response, IpcError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    Pong,
    Snapshot(RegistrySnapshot),
    PoolStatus(PoolSnapshot),
    CanDispatch(DispatchCheck),
    Acquired(Lease),
    Released,
    Subscribed(RegistrySnapshot),
    /// An admin request was accepted and is being carried out.
    Accepted,
    Gpus(GpuInventory),
    /// The answer to `Renew`: this many of the connection's leases were renewed.
    Renewed {
        leases: u32,
    },
    Memory(MemoryReport),
}

/// A pushed registry change. Changes coalesced into one flush share an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Event {
    pub epoch: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Change {
    /// The pool's new state (added or changed).
    PoolUpdated(PoolSnapshot),
    PoolRemoved(PoolId),
    /// These leases are gone (engine failed, pool removed); their holders must stop using them.
    LeasesRevoked {
        pool: PoolId,
        leases: Vec<LeaseId>,
        reason: String,
    },
    /// The subscriber fell behind; this replaces its whole mirror.
    Resync(RegistrySnapshot),
}
