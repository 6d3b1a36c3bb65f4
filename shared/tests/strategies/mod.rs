//! proptest strategies for every wire type, shared by the codec test binaries.
//!
//! Each enum strategy is a `prop_oneof!` over every variant, and each enum also has a
//! `*_variant` function: an exhaustive `match` (no `_ =>`) naming the variant. Appending a variant
//! to the protocol therefore stops these tests compiling until the strategy learns it too, and
//! `codec_roundtrip::strategies_generate_every_variant` checks the strategy really produces it.

#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a different subset of it"
)]

use pool_ipc::registry::{
    ApiEndpoint, DeviceMemory, Endpoint, EngineKind, GpuInfo, GpuInventory, MemoryReport,
    PoolFootprint,
};
use pool_ipc::{
    AcquireTarget, Call, Change, ClientFrame, DispatchCheck, ErrorCode, Event, HeldLease, Hello,
    IpcError, Lease, LeaseId, LeaseSecret, MAGIC, PROTOCOL_VERSION, PoolId, PoolSnapshot,
    PoolState, RegistrySnapshot, ReleaseOutcome, Reply, Request, Response, ServerFrame, Welcome,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Any characters at all (control characters and multi-byte UTF-8 included), kept short.
pub fn text() -> BoxedStrategy<String> {
    vec(any::<char>(), 0..8)
        .prop_map(|chars| chars.into_iter().collect())
        .boxed()
}

pub fn pool_id() -> BoxedStrategy<PoolId> {
    text().prop_map(PoolId).boxed()
}

pub fn lease_id() -> BoxedStrategy<LeaseId> {
    any::<u64>().prop_map(LeaseId).boxed()
}

pub fn engine_kind() -> BoxedStrategy<EngineKind> {
    prop_oneof![Just(EngineKind::Llamacpp), Just(EngineKind::Openai)].boxed()
}

pub fn endpoint() -> BoxedStrategy<Endpoint> {
    prop_oneof![
        text().prop_map(|authority| Endpoint::Http { authority }),
        text().prop_map(|path| Endpoint::Unix { path }),
    ]
    .boxed()
}

pub fn api_endpoint() -> BoxedStrategy<ApiEndpoint> {
    prop_oneof![
        Just(ApiEndpoint::ChatCompletions),
        Just(ApiEndpoint::Completions),
        Just(ApiEndpoint::Embeddings),
        Just(ApiEndpoint::Rerank),
        Just(ApiEndpoint::Messages),
        Just(ApiEndpoint::MessagesCountTokens),
        Just(ApiEndpoint::Responses),
        Just(ApiEndpoint::ResponsesInputTokens),
        Just(ApiEndpoint::ChatCompletionsInputTokens),
        Just(ApiEndpoint::Models),
    ]
    .boxed()
}

pub fn pool_state() -> BoxedStrategy<PoolState> {
    prop_oneof![
        Just(PoolState::Starting),
        Just(PoolState::Ready),
        Just(PoolState::Unhealthy),
        Just(PoolState::Draining),
        Just(PoolState::Stopped),
        any::<u64>().prop_map(|until_unix_ms| PoolState::BackingOff { until_unix_ms }),
        Just(PoolState::Failed),
        Just(PoolState::Unloaded),
        Just(PoolState::Loading),
    ]
    .boxed()
}

pub fn pool_snapshot() -> BoxedStrategy<PoolSnapshot> {
    (
        (pool_id(), text(), engine_kind(), endpoint(), pool_state()),
        (any::<bool>(), any::<u32>(), any::<u32>()),
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
        ),
        // Unsorted and repeated too: the codec carries whatever a peer sends.
        vec(api_endpoint(), 0..12),
    )
        .prop_map(
            |(
                (pool_id, model, engine, endpoint, state),
                (live, slots_total, slots_free),
                (engine_version, last_error, restarts, last_probe_unix_ms),
                api_endpoints,
            )| PoolSnapshot {
                pool_id,
                model,
                engine,
                endpoint,
                state,
                live,
                slots_total,
                slots_free,
                engine_version,
                last_error,
                restarts,
                last_probe_unix_ms,
                api_endpoints,
            },
        )
        .boxed()
}

pub fn registry_snapshot() -> BoxedStrategy<RegistrySnapshot> {
    (any::<u64>(), vec(pool_snapshot(), 0..3))
        .prop_map(|(epoch, pools)| RegistrySnapshot { epoch, pools })
        .boxed()
}

pub fn dispatch_check() -> BoxedStrategy<DispatchCheck> {
    (any::<bool>(), pool_state(), any::<u32>())
        .prop_map(|(dispatchable, state, slots_free)| DispatchCheck {
            dispatchable,
            state,
            slots_free,
        })
        .boxed()
}

pub fn lease() -> BoxedStrategy<Lease> {
    (
        lease_id(),
        pool_id(),
        text(),
        engine_kind(),
        endpoint(),
        any::<u32>(),
        lease_secret(),
        any::<u64>(),
    )
        .prop_map(
            |(id, pool, model, engine, endpoint, slots, secret, registry_epoch)| Lease {
                id,
                pool,
                model,
                engine,
                endpoint,
                slots,
                secret,
                registry_epoch,
            },
        )
        .boxed()
}

pub fn lease_secret() -> BoxedStrategy<LeaseSecret> {
    any::<[u8; 16]>().prop_map(LeaseSecret).boxed()
}

pub fn acquire_target() -> BoxedStrategy<AcquireTarget> {
    prop_oneof![
        pool_id().prop_map(AcquireTarget::Pool),
        text().prop_map(AcquireTarget::Model),
    ]
    .boxed()
}

pub fn release_outcome() -> BoxedStrategy<ReleaseOutcome> {
    prop_oneof![
        Just(ReleaseOutcome::Completed),
        Just(ReleaseOutcome::Cancelled),
        Just(ReleaseOutcome::Failed),
    ]
    .boxed()
}

pub fn error_code() -> BoxedStrategy<ErrorCode> {
    prop_oneof![
        Just(ErrorCode::NotFound),
        Just(ErrorCode::NotReady),
        Just(ErrorCode::Draining),
        Just(ErrorCode::NoCapacity),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Unsupported),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::LeaseCapReached),
    ]
    .boxed()
}

pub fn ipc_error() -> BoxedStrategy<IpcError> {
    (error_code(), text())
        .prop_map(|(code, message)| IpcError { code, message })
        .boxed()
}

pub fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Snapshot),
        pool_id().prop_map(|pool| Request::PoolStatus { pool }),
        pool_id().prop_map(|pool| Request::CanDispatch { pool }),
        (
            acquire_target(),
            text(),
            proptest::option::of(text()),
            any::<u32>(),
            proptest::option::of(text()),
        )
            .prop_map(
                |(target, task_id, session, slots, trace_parent)| Request::Acquire {
                    target,
                    task_id,
                    session,
                    slots,
                    trace_parent,
                }
            ),
        (lease_id(), release_outcome())
            .prop_map(|(lease, outcome)| Request::Release { lease, outcome }),
        Just(Request::Subscribe),
        (pool_id(), any::<u64>())
            .prop_map(|(pool, deadline_ms)| Request::Drain { pool, deadline_ms }),
        (pool_id(), text()).prop_map(|(pool, model)| Request::Reload { pool, model }),
        pool_id().prop_map(|pool| Request::Restart { pool }),
        Just(Request::Gpus),
        Just(Request::Renew),
        (pool_id(), any::<bool>()).prop_map(|(pool, for_waiting_requests)| Request::Load {
            pool,
            for_waiting_requests
        }),
        pool_id().prop_map(|pool| Request::Unload { pool }),
        pool_id().prop_map(|pool| Request::CancelLoad { pool }),
        Just(Request::Memory),
    ]
    .boxed()
}

pub fn memory_report() -> BoxedStrategy<MemoryReport> {
    let device =
        (text(), any::<u64>(), any::<u64>()).prop_map(|(device, budget_bytes, held_bytes)| {
            DeviceMemory {
                device,
                budget_bytes,
                held_bytes,
            }
        });
    let pool = (
        pool_id(),
        text(),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
    )
        .prop_map(|(pool, device, footprint_bytes, measured)| PoolFootprint {
            pool,
            device,
            footprint_bytes,
            measured,
        });
    (vec(device, 0..3), vec(pool, 0..3))
        .prop_map(|(devices, pools)| MemoryReport { devices, pools })
        .boxed()
}

pub fn gpu_inventory() -> BoxedStrategy<GpuInventory> {
    let gpu = (any::<u32>(), text(), text(), any::<u64>(), any::<u64>()).prop_map(
        |(index, name, uuid, memory_total_bytes, memory_used_bytes)| GpuInfo {
            index,
            name,
            uuid,
            memory_total_bytes,
            memory_used_bytes,
        },
    );
    (proptest::option::of(text()), vec(gpu, 0..3))
        .prop_map(|(driver, gpus)| GpuInventory { driver, gpus })
        .boxed()
}

pub fn hello() -> BoxedStrategy<Hello> {
    // Mostly well-formed handshakes, but the codec must carry any magic and version.
    let magic = prop_oneof![Just(MAGIC), any::<[u8; 4]>()];
    let version = prop_oneof![Just(PROTOCOL_VERSION), any::<u32>()];
    let held = vec(
        (lease_id(), pool_id(), any::<u32>(), lease_secret()).prop_map(
            |(lease, pool, slots, secret)| HeldLease {
                lease,
                pool,
                slots,
                secret,
            },
        ),
        0..3,
    );
    (magic, version, text(), held)
        .prop_map(
            |(magic, protocol_version, client_name, held_leases)| Hello {
                magic,
                protocol_version,
                client_name,
                held_leases,
            },
        )
        .boxed()
}

pub fn client_frame() -> BoxedStrategy<ClientFrame> {
    prop_oneof![
        hello().prop_map(ClientFrame::Hello),
        (any::<u64>(), request()).prop_map(|(id, request)| ClientFrame::Call(Call { id, request })),
    ]
    .boxed()
}

pub fn response() -> BoxedStrategy<Response> {
    prop_oneof![
        Just(Response::Pong),
        registry_snapshot().prop_map(Response::Snapshot),
        pool_snapshot().prop_map(Response::PoolStatus),
        dispatch_check().prop_map(Response::CanDispatch),
        lease().prop_map(Response::Acquired),
        Just(Response::Released),
        registry_snapshot().prop_map(Response::Subscribed),
        Just(Response::Accepted),
        gpu_inventory().prop_map(Response::Gpus),
        any::<u32>().prop_map(|leases| Response::Renewed { leases }),
        memory_report().prop_map(Response::Memory),
    ]
    .boxed()
}

pub fn change() -> BoxedStrategy<Change> {
    prop_oneof![
        pool_snapshot().prop_map(Change::PoolUpdated),
        pool_id().prop_map(Change::PoolRemoved),
        (pool_id(), vec(lease_id(), 0..4), text()).prop_map(|(pool, leases, reason)| {
            Change::LeasesRevoked {
                pool,
                leases,
                reason,
            }
        }),
        registry_snapshot().prop_map(Change::Resync),
    ]
    .boxed()
}

pub fn welcome() -> BoxedStrategy<Welcome> {
    (
        any::<u32>(),
        text(),
        any::<u64>(),
        any::<u32>(),
        vec(lease_id(), 0..3),
        vec((lease_id(), ipc_error()), 0..3),
        any::<u64>(),
    )
        .prop_map(
            |(
                protocol_version,
                server_version,
                registry_epoch,
                max_frame_bytes,
                reasserted,
                rejected,
                lease_ttl_ms,
            )| Welcome {
                protocol_version,
                server_version,
                registry_epoch,
                max_frame_bytes,
                reasserted,
                rejected,
                lease_ttl_ms,
            },
        )
        .boxed()
}

pub fn server_frame() -> BoxedStrategy<ServerFrame> {
    prop_oneof![
        welcome().prop_map(ServerFrame::Welcome),
        (any::<u64>(), response()).prop_map(|(id, response)| ServerFrame::Reply(Reply {
            id,
            result: Ok(response)
        })),
        (any::<u64>(), ipc_error()).prop_map(|(id, error)| ServerFrame::Reply(Reply {
            id,
            result: Err(error)
        })),
        (any::<u64>(), change())
            .prop_map(|(epoch, change)| ServerFrame::Event(Event { epoch, change })),
        ipc_error().prop_map(ServerFrame::Refused),
    ]
    .boxed()
}

pub fn client_frame_variant(frame: &ClientFrame) -> &'static str {
    match frame {
        ClientFrame::Hello(_) => "hello",
        ClientFrame::Call(_) => "call",
    }
}

pub fn server_frame_variant(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome(_) => "welcome",
        ServerFrame::Reply(Reply { result: Ok(_), .. }) => "reply_ok",
        ServerFrame::Reply(Reply { result: Err(_), .. }) => "reply_err",
        ServerFrame::Event(_) => "event",
        ServerFrame::Refused(_) => "refused",
    }
}

pub fn response_variant(response: &Response) -> &'static str {
    match response {
        Response::Pong => "pong",
        Response::Snapshot(_) => "snapshot",
        Response::PoolStatus(_) => "pool_status",
        Response::CanDispatch(_) => "can_dispatch",
        Response::Acquired(_) => "acquired",
        Response::Released => "released",
        Response::Subscribed(_) => "subscribed",
        Response::Accepted => "accepted",
        Response::Gpus(_) => "gpus",
        Response::Renewed { .. } => "renewed",
        Response::Memory(_) => "memory",
    }
}

pub fn change_variant(change: &Change) -> &'static str {
    match change {
        Change::PoolUpdated(_) => "pool_updated",
        Change::PoolRemoved(_) => "pool_removed",
        Change::LeasesRevoked { .. } => "leases_revoked",
        Change::Resync(_) => "resync",
    }
}

pub fn engine_kind_variant(kind: &EngineKind) -> &'static str {
    match kind {
        EngineKind::Llamacpp => "llamacpp",
        EngineKind::Openai => "openai",
    }
}

pub fn api_endpoint_variant(api: &ApiEndpoint) -> &'static str {
    api.name()
}

pub fn endpoint_variant(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Http { .. } => "http",
        Endpoint::Unix { .. } => "unix",
    }
}

pub fn acquire_target_variant(target: &AcquireTarget) -> &'static str {
    match target {
        AcquireTarget::Pool(_) => "pool",
        AcquireTarget::Model(_) => "model",
    }
}

pub fn release_outcome_variant(outcome: &ReleaseOutcome) -> &'static str {
    match outcome {
        ReleaseOutcome::Completed => "completed",
        ReleaseOutcome::Cancelled => "cancelled",
        ReleaseOutcome::Failed => "failed",
    }
}

pub fn error_code_variant(code: &ErrorCode) -> &'static str {
    match code {
        ErrorCode::NotFound => "not_found",
        ErrorCode::NotReady => "not_ready",
        ErrorCode::Draining => "draining",
        ErrorCode::NoCapacity => "no_capacity",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::VersionMismatch => "version_mismatch",
        ErrorCode::Internal => "internal",
        ErrorCode::Unsupported => "unsupported",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::LeaseCapReached => "lease_cap_reached",
    }
}

pub fn pool_state_variant(state: &PoolState) -> &'static str {
    match state {
        PoolState::Starting => "starting",
        PoolState::Ready => "ready",
        PoolState::Unhealthy => "unhealthy",
        PoolState::Draining => "draining",
        PoolState::Stopped => "stopped",
        PoolState::BackingOff { .. } => "backing_off",
        PoolState::Failed => "failed",
        PoolState::Unloaded => "unloaded",
        PoolState::Loading => "loading",
    }
}

pub fn request_variant(request: &Request) -> &'static str {
    match request {
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
