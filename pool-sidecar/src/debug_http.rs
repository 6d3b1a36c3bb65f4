//! The HTTP debug shim (default 127.0.0.1:9200): read-only JSON views of the registry and
//! Prometheus metrics, for operators and remote debugging. It reads the published snapshot only,
//! so it can never slow the registry down, and it changes nothing. With a token configured every
//! route demands `Authorization: Bearer <token>` (compared in constant time).

use crate::metrics::Metrics;
use crate::registry::RegistryHandle;
use crate::status_view::{PoolStatusView, RegistryView};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pool_ipc::registry::{PoolId, PoolState};
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct DebugState {
    pub registry: RegistryHandle,
    pub metrics: Arc<Metrics>,
    pub token: Option<Arc<str>>,
}

pub fn router(state: DebugState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/pools", get(pools))
        .route("/pools/{id}/status", get(pool_status))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: DebugState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn require_token(
    State(state): State<DebugState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required".into(),
            );
        }
    }
    next.run(request).await
}

async fn health(State(state): State<DebugState>) -> Json<serde_json::Value> {
    let snapshot = state.registry.snapshot();
    let ready = snapshot
        .pools
        .iter()
        .filter(|pool| pool.state == PoolState::Ready)
        .count();
    Json(json!({
        "status": "ok",
        "epoch": snapshot.epoch,
        "pools": snapshot.pools.len(),
        "pools_ready": ready,
    }))
}

async fn pools(State(state): State<DebugState>) -> Json<RegistryView> {
    Json(RegistryView::from(&*state.registry.snapshot()))
}

async fn pool_status(State(state): State<DebugState>, Path(id): Path<String>) -> Response {
    let snapshot = state.registry.snapshot();
    match snapshot.pool(&PoolId(id.clone())) {
        Some(pool) => Json(PoolStatusView::from(pool)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown pool {id:?}"),
        ),
    }
}

async fn metrics(State(state): State<DebugState>) -> Response {
    let text = state.metrics.render(&state.registry.snapshot());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}
