//! `/livez` (the process is up) and `/readyz` (pool-managerd connected, at least one pool
//! ready or loadable, the host neither drained nor shutting down), `/metrics`, and the JSON 404 for unknown routes.

use crate::app::AppState;
use crate::drain::HostState;
use crate::error::{ApiError, ErrorShape};
use crate::metrics::ModelLoad;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use daemon_support::exposition::Format;
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
    let host = state.host.state();
    let body = json!({
        "pool_manager_connected": mirror.connected,
        "pools_ready": ready,
        "pools_loadable": loadable,
        "draining": host != HostState::Serving,
        "host": host.name(),
    });
    let status = if mirror.connected && ready + loadable > 0 && host == HostState::Serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Every model the registry knows, with its requests waiting here and slots held by leases; and
/// the gauges read when scraped (pool-managerd connected, sessions remembered) brought up to date.
async fn scraped(state: &AppState) -> Vec<ModelLoad> {
    let mut waiting = state.scheduler.waiting_by_model().await;
    let mut models: Vec<ModelLoad> = Vec::new();
    let connected = {
        let mirror = state.mirror.borrow();
        for pool in &mirror.snapshot.pools {
            let running = u64::from(pool.active_leases());
            match models.iter_mut().find(|load| load.model == pool.model) {
                Some(load) => load.running += running,
                None => models.push(ModelLoad {
                    model: pool.model.clone(),
                    waiting: 0,
                    running,
                }),
            }
        }
        mirror.connected
    };
    for load in &mut models {
        load.waiting = waiting
            .remove(&load.model)
            .map_or(0, |count| u64::try_from(count).unwrap_or(u64::MAX));
    }
    state.metrics.sidecar_connected.set(i64::from(connected));
    let sessions = state.sessions.remembered();
    state
        .metrics
        .sessions
        .set(i64::try_from(sessions).unwrap_or(i64::MAX));
    models
}

/// `/metrics` in the format the scraper asks for (`daemon_support::exposition`), with the
/// model-server signals of every model the registry knows.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let format = Format::of_request(&headers);
    let models = scraped(&state).await;
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.render(format, &models),
    )
        .into_response()
}

/// `GET /v2/admin/metrics` (admin key): `/metrics` with the per-key series (`tenants`), which
/// the open view never shows.
pub async fn admin_metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let format = Format::of_request(&headers);
    let models = scraped(&state).await;
    let mut text = state.metrics.render(Format::OpenMetrics, &models);
    text.push_str(&state.tenants.render());
    (
        [(header::CONTENT_TYPE, format.content_type())],
        format.render(&text),
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
