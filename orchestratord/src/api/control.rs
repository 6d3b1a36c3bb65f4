//! Pools and control on the native API: `GET /v2/pools`, `GET /v2/pools/{id}/health` (from the
//! registry mirror; engine addresses are never shown to clients) and `POST
//! /v2/pools/{id}/drain|reload|load|unload`, forwarded to pool-managerd over its socket (an
//! operator's load is never withdrawn, unlike the loads the queue asks for); and the whole host's
//! drain, `POST /v2/admin/drain|undrain` (see `drain`); usage per key, `GET /v2/usage` (see
//! `tenants`).

use crate::app::{AppState, Inbound};
use crate::drain::HostState;
use crate::error::ApiError;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pool_ipc::client::ClientError;
use pool_ipc::registry::{PoolId, PoolSnapshot, PoolState};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

fn view(pool: &PoolSnapshot) -> Value {
    json!({
        "pool_id": pool.pool_id,
        "model": pool.model,
        "engine": pool.engine.name(),
        "state": pool.state.name(),
        "live": pool.live,
        "ready": pool.state == PoolState::Ready,
        "draining": pool.state == PoolState::Draining,
        "slots_total": pool.slots_total,
        "slots_free": pool.slots_free,
        "active_leases": pool.active_leases(),
        "engine_version": pool.engine_version,
    })
}

pub async fn pools(State(state): State<AppState>) -> Json<Value> {
    let mirror = state.mirror.borrow();
    let pools: Vec<Value> = mirror.snapshot.pools.iter().map(view).collect();
    Json(json!({
        "pool_manager_connected": mirror.connected,
        "host": state.host.state().name(),
        "pools": pools,
    }))
}

pub async fn health(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let mirror = state.mirror.borrow();
    match mirror.snapshot.pool(&PoolId(id.clone())) {
        Some(pool) => Json(view(pool)).into_response(),
        None => ApiError::PoolNotFound(id).native_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {
    model: String,
}

/// pool-managerd's answer to a forwarded operation: 202, or its refusal as an [`ApiError`].
fn forwarded(result: Result<(), ClientError>, op: &str) -> Response {
    match result {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"accepted": op}))).into_response(),
        Err(error) => ApiError::from(error).native_response(),
    }
}

pub async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
    inbound: Inbound,
) -> Response {
    let body = inbound.body;
    let body: DrainBody = if body.is_empty() {
        DrainBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(error) => {
                return ApiError::InvalidParams(format!("invalid drain request: {error}"))
                    .native_response();
            }
        }
    };
    let deadline = Duration::from_millis(body.deadline_ms.unwrap_or(60_000));
    forwarded(state.pools.drain(&PoolId(id), deadline).await, "drain")
}

pub async fn reload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    inbound: Inbound,
) -> Response {
    let body: ReloadBody = match serde_json::from_slice(&inbound.body) {
        Ok(body) => body,
        Err(error) => {
            return ApiError::InvalidParams(format!("invalid reload request: {error}"))
                .native_response();
        }
    };
    forwarded(state.pools.reload(&PoolId(id), &body.model).await, "reload")
}

/// An operator's load of an on-demand pool: 202 once the load is under way (the pool shows
/// Loading, then Ready); pool-managerd's refusal otherwise (one that can never fit in its
/// device's budget: 503 with pool-managerd's reason, footprint and budget).
pub async fn load(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    forwarded(state.pools.load(&PoolId(id)).await, "load")
}

/// An operator's unload of an on-demand pool: 202, then no new leases; the engine stops once
/// its leases end (or at its drain deadline) and the pool shows Unloaded.
pub async fn unload(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    forwarded(state.pools.unload(&PoolId(id)).await, "unload")
}

/// The host's drain and undrain take no parameters: an empty body or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostBody {}

fn no_parameters(inbound: &Inbound, op: &str) -> Result<(), ApiError> {
    if inbound.body.is_empty() {
        return Ok(());
    }
    serde_json::from_slice::<HostBody>(&inbound.body)
        .map(|_| ())
        .map_err(|error| ApiError::InvalidParams(format!("invalid {op} request: {error}")))
}

/// What the host's drain and undrain answer: the state now and before, and the requests still
/// holding a slot.
fn host_view(state: &AppState, before: HostState) -> Response {
    let now = state.host.state();
    Json(json!({
        "host": now.name(),
        "before": before.name(),
        "in_flight": state.metrics.in_flight.get(),
    }))
    .into_response()
}

/// `POST /v2/admin/drain`: `/readyz` answers 503 from now on and nothing new is admitted;
/// requests already admitted run to their end. Idempotent.
pub async fn drain_host(State(state): State<AppState>, inbound: Inbound) -> Response {
    if let Err(refused) = no_parameters(&inbound, "drain") {
        return refused.native_response();
    }
    let before = state.host.drain();
    if before == HostState::Serving {
        tracing::warn!(
            key = inbound.caller.key.as_deref().unwrap_or("-"),
            "host drained by the operator: admitting nothing new, running requests finish"
        );
        daemon_support::systemd::notify(&[daemon_support::systemd::NotifyState::Status(
            "drained by the operator: admitting nothing new",
        )]);
    }
    host_view(&state, before)
}

/// `POST /v2/admin/undrain`: admits again; 503 `SHUTTING_DOWN` once SIGTERM came. Idempotent.
pub async fn undrain_host(State(state): State<AppState>, inbound: Inbound) -> Response {
    if let Err(refused) = no_parameters(&inbound, "undrain") {
        return refused.native_response();
    }
    match state.host.undrain() {
        Ok(before) => {
            if before == HostState::Drained {
                tracing::warn!(
                    key = inbound.caller.key.as_deref().unwrap_or("-"),
                    "host undrained by the operator: admitting again"
                );
                daemon_support::systemd::notify(&[daemon_support::systemd::NotifyState::Status(
                    "serving",
                )]);
            }
            host_view(&state, before)
        }
        Err(_) => ApiError::ShuttingDown.native_response(),
    }
}

/// `GET /v2/usage` (admin key): every named key's requests, tokens as engines reported them,
/// running requests and refusals by limit.
pub async fn usage(State(state): State<AppState>) -> Json<Value> {
    Json(state.tenants.usage())
}
