//! The HTTP debug shim (default 127.0.0.1:9200): JSON views of the registry and Prometheus
//! metrics for operators, from the published snapshot only, so it can never slow the registry
//! down. With a token configured every route demands `Authorization: Bearer <token>` (compared
//! in constant time), and the admin routes (drain, reload, restart, load, unload) exist; without
//! one they answer 403 before reading any request body, and pool views leave out the engines' log
//! lines and addresses (every local user can read them). Request bodies are read within
//! `debug_http.body_timeout_ms` for each wait ([`HttpLimits::body_timeout`]).

use crate::gpu::GpuProbe;
use crate::metrics::Metrics;
use crate::pools::{PoolsHandle, Requester};
use crate::registry::RegistryHandle;
use crate::status_page::{self, OrchestratorFeed, StatusView};
use crate::status_view::{PoolStatusView, RegistryView};
use crate::supervisor::log::{FOLLOW_POLL, LogTail};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use daemon_support::exposition::Format;
use daemon_support::http_server::{self, HttpLimits};
use futures_util::StreamExt as _;
use pool_ipc::error_code::ErrorCode;
use pool_ipc::registry::{PoolId, PoolState};
use pool_ipc::wire::Request as WireRequest;
use serde::Deserialize;
use serde_json::json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct DebugState {
    pub registry: RegistryHandle,
    /// Where admin requests (drain, reload, restart, load, unload) go.
    pub pools: PoolsHandle,
    pub gpus: Arc<GpuProbe>,
    pub metrics: Arc<Metrics>,
    pub token: Option<Arc<str>>,
    /// Where engine logs are (`<log_dir>/<pool>.log`).
    pub log_dir: PathBuf,
    /// orchestratord's figures for the status page, when configured.
    pub feed: Option<Arc<OrchestratorFeed>>,
    /// Ends the shim's endless streams (followed logs, status events) when the daemon stops, so
    /// an open page does not hold up the shutdown.
    pub shutdown: CancellationToken,
}

pub fn router(state: DebugState) -> Router {
    // Refused before their extractors run, so a tokenless shim reads no admin request's body.
    // Engine logs may hold prompts, so they are behind the token too.
    let admin_routes = Router::new()
        .route("/pools/{id}/logs", get(logs))
        .route("/pools/{id}/drain", post(drain))
        .route("/pools/{id}/reload", post(reload))
        .route("/pools/{id}/restart", post(restart))
        .route("/pools/{id}/load", post(load))
        .route("/pools/{id}/unload", post(unload))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_token,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/pools", get(pools))
        .route("/pools/{id}/status", get(pool_status))
        .route("/metrics", get(metrics))
        .route("/gpus", get(gpus))
        .route("/memory", get(memory))
        .route("/status", get(status_page))
        .route("/status/events", get(status_events))
        .merge(admin_routes)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Serves the shim on `listener` within `limits` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: DebugState,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    http_server::serve(listener, router(state), limits, shutdown.cancelled_owned()).await;
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

/// Admin routes change things, so they exist only behind a token.
async fn require_admin_token(
    State(state): State<DebugState>,
    request: Request,
    next: Next,
) -> Response {
    if state.token.is_none() {
        return admin_needs_a_token();
    }
    next.run(request).await
}

fn admin_needs_a_token() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        "admin routes and engine logs need debug_http.token_file to be set".into(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// How many of the last lines to send first (default 100).
    lines: Option<usize>,
    /// `1`: then follow the log as SSE.
    follow: Option<u8>,
}

/// The most lines a request may ask for at once.
const MAX_LOG_LINES: usize = 10_000;

/// `GET /pools/{id}/logs?lines=N[&follow=1]` (token only): the engine log's last lines as text, or
/// with `follow=1` as SSE, one `data:` event per line, then every new line as it is written
/// (across rotations) until the client leaves.
async fn logs(
    State(state): State<DebugState>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected ?lines=N (0 to 10000) and/or follow=1".into(),
        );
    };
    if state
        .registry
        .snapshot()
        .pool(&PoolId(id.clone()))
        .is_none()
    {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown pool {id:?}"),
        );
    }
    let lines = query.lines.unwrap_or(100).min(MAX_LOG_LINES);
    let path = state.log_dir.join(format!("{id}.log"));
    let (tail, last) = match tokio::task::spawn_blocking(move || LogTail::open(&path, lines)).await
    {
        Ok(Ok(opened)) => opened,
        Ok(Err(failure)) if failure.kind() == std::io::ErrorKind::NotFound => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("pool {id:?} has no engine log (an external or never-started engine)"),
            );
        }
        Ok(Err(failure)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read the engine log: {failure}"),
            );
        }
        Err(failure) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read the engine log: {failure}"),
            );
        }
    };
    if query.follow != Some(1) {
        let mut text = last.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
    }
    let following = Following {
        pending: last.into(),
        tail: Some(tail),
    };
    let events = futures_util::stream::unfold(following, |mut following| async move {
        loop {
            if let Some(line) = following.pending.pop_front() {
                // SSE cannot carry a carriage return inside an event (progress bars write them).
                let event = Event::default().data(line.replace('\r', ""));
                return Some((Ok::<Event, Infallible>(event), following));
            }
            let mut tail = following.tail.take()?;
            tokio::time::sleep(FOLLOW_POLL).await;
            let read = tokio::task::spawn_blocking(move || {
                let lines = tail.read_new();
                (tail, lines)
            })
            .await;
            match read {
                Ok((tail, Ok(lines))) => {
                    following.tail = Some(tail);
                    following.pending.extend(lines);
                }
                Ok((_, Err(failure))) => {
                    // The last event; the stream ends after it.
                    let event = Event::default()
                        .event("error")
                        .data(format!("cannot read the engine log: {failure}"));
                    return Some((Ok(event), following));
                }
                Err(_) => return None,
            }
        }
    })
    .take_until(state.shutdown.clone().cancelled_owned());
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A followed log: lines read and not yet sent, and the tail (`None` once it failed).
struct Following {
    pending: VecDeque<String>,
    tail: Option<LogTail>,
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
    let view = RegistryView::from(&*state.registry.snapshot());
    Json(match state.token {
        Some(_) => view,
        None => view.without_engine_details(),
    })
}

async fn pool_status(State(state): State<DebugState>, Path(id): Path<String>) -> Response {
    let snapshot = state.registry.snapshot();
    match snapshot.pool(&PoolId(id.clone())) {
        Some(pool) => {
            let view = PoolStatusView::from(pool);
            Json(match state.token {
                Some(_) => view,
                None => view.without_engine_details(),
            })
            .into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown pool {id:?}"),
        ),
    }
}

/// In the format the scraper asks for (`daemon_support::exposition`).
async fn metrics(State(state): State<DebugState>, headers: HeaderMap) -> Response {
    let format = Format::of_request(&headers);
    let text = format.render(&state.metrics.render(&state.registry.snapshot()));
    ([(header::CONTENT_TYPE, format.content_type())], text).into_response()
}

/// The status page's view now (`status_page`): an empty memory report if the pools controller
/// does not answer, no GPUs if their inventory failed.
async fn status_view(state: &DebugState) -> StatusView {
    let memory = state.pools.memory().await.unwrap_or_default();
    // NVML blocks: off the runtime, as for `/gpus`.
    let probe = Arc::clone(&state.gpus);
    let gpus = tokio::task::spawn_blocking(move || probe.inventory())
        .await
        .unwrap_or_default();
    StatusView::new(
        &state.registry.snapshot(),
        &memory,
        &gpus,
        state.feed.as_deref().map(OrchestratorFeed::figures),
    )
}

/// `GET /status`: the status page, rendered with the view of now.
async fn status_page(State(state): State<DebugState>) -> Response {
    let html = status_view(&state).await.html();
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// `GET /status/events`: the status page's view as JSON, one SSE event a second, for as long as
/// the page is open.
async fn status_events(State(state): State<DebugState>) -> Response {
    let stop = state.shutdown.clone().cancelled_owned();
    let events = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(status_page::REFRESH).await;
        }
        let view = status_view(&state).await;
        let event = Event::default()
            .json_data(&view)
            .unwrap_or_else(|error| Event::default().event("error").data(error.to_string()));
        Some((Ok::<Event, Infallible>(event), (state, false)))
    })
    .take_until(stop);
    Sse::new(events).into_response()
}

/// Each device's memory budget and what its pools hold, and each managed pool's footprint.
async fn memory(State(state): State<DebugState>) -> Response {
    match state.pools.memory().await {
        Ok(report) => Json(report).into_response(),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, "stopping", failure.message),
    }
}

async fn gpus(State(state): State<DebugState>) -> Response {
    let probe = Arc::clone(&state.gpus);
    match tokio::task::spawn_blocking(move || probe.inventory()).await {
        Ok(inventory) => Json(inventory).into_response(),
        Err(failure) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("GPU inventory failed: {failure}"),
        ),
    }
}

#[derive(Deserialize)]
struct DrainQuery {
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
struct ReloadBody {
    model: String,
}

async fn drain(
    State(state): State<DebugState>,
    Path(id): Path<String>,
    Query(query): Query<DrainQuery>,
) -> Response {
    let request = WireRequest::Drain {
        pool: PoolId(id),
        deadline_ms: query.deadline_ms.unwrap_or(60_000),
    };
    admin(state, request).await
}

async fn reload(
    State(state): State<DebugState>,
    Path(id): Path<String>,
    body: Result<Json<ReloadBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"model\": \"<path>\"}}: {rejection}"),
            );
        }
    };
    let request = WireRequest::Reload {
        pool: PoolId(id),
        model: body.model,
    };
    admin(state, request).await
}

async fn restart(State(state): State<DebugState>, Path(id): Path<String>) -> Response {
    admin(state, WireRequest::Restart { pool: PoolId(id) }).await
}

/// Behind the token like every route that changes things: the shim has no peer identity to tell
/// a demand from anyone else's request.
async fn load(State(state): State<DebugState>, Path(id): Path<String>) -> Response {
    admin(
        state,
        WireRequest::Load {
            pool: PoolId(id),
            for_waiting_requests: false,
        },
    )
    .await
}

async fn unload(State(state): State<DebugState>, Path(id): Path<String>) -> Response {
    admin(state, WireRequest::Unload { pool: PoolId(id) }).await
}

/// Behind [`require_admin_token`]; checked again here, so no admin route can go without it.
async fn admin(state: DebugState, request: WireRequest) -> Response {
    if state.token.is_none() {
        return admin_needs_a_token();
    }
    let op = request.name();
    tracing::info!(op, "admin request on the debug shim");
    match state.pools.admin(request, Requester::Operator).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"accepted": op}))).into_response(),
        Err(failure) => {
            let status = match failure.code {
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported => StatusCode::CONFLICT,
                ErrorCode::Unauthorized => StatusCode::FORBIDDEN,
                ErrorCode::NotReady
                | ErrorCode::Draining
                | ErrorCode::NoCapacity
                | ErrorCode::LeaseCapReached
                | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::VersionMismatch | ErrorCode::Internal => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            error(status, failure.code.name(), failure.message)
        }
    }
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}
