//! `/livez` (the process is up) and `/readyz` (pool-managerd connected, at least one pool
//! ready, not shutting down), `/metrics`, and the JSON 404 for unknown routes.

use crate::app::AppState;
use crate::error::{ApiError, ErrorShape};
use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pool_ipc::registry::PoolState;
use serde_json::json;

pub async fn livez() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let mirror = state.mirror.borrow();
    let ready = mirror
        .snapshot
        .pools
        .iter()
        .filter(|pool| pool.state == PoolState::Ready)
        .count();
    // A host whose on-demand pools are all unloaded is healthy: the first request loads one.
    let loadable = mirror
        .snapshot
        .pools
        .iter()
        .filter(|pool| matches!(pool.state, PoolState::Unloaded | PoolState::Loading))
        .count();
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let body = json!({
        "pool_manager_connected": mirror.connected,
        "pools_ready": ready,
        "pools_loadable": loadable,
        "draining": draining,
    });
    let status = if mirror.connected && ready + loadable > 0 && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let connected = state.mirror.borrow().connected;
    state.metrics.sidecar_connected.set(i64::from(connected));
    let sessions = state.sessions.remembered();
    state
        .metrics
        .sessions
        .set(i64::try_from(sessions).unwrap_or(i64::MAX));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn not_found(request: Request) -> Response {
    let path = request.uri().path();
    ApiError::RouteNotFound {
        method: request.method().to_string(),
        path: path.to_owned(),
    }
    .response(ErrorShape::of_path(path))
}
