//! The HTTP application: shared state, the router, and the cross-cutting layers every request
//! passes (correlation id, API keys, body limit). Handlers live in `api/`.

use crate::api::{control, health, openai, tasks};
use crate::config::LiveConfig;
use crate::error::ApiError;
use crate::scheduler::Scheduler;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use pool_ipc::client::{PoolClient, RegistryMirror};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

pub const CORRELATION_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

/// Everything handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<LiveConfig>,
    pub pools: PoolClient,
    pub mirror: watch::Receiver<RegistryMirror>,
    pub scheduler: Scheduler,
    pub engines: Arc<crate::adapters::EngineClients>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub tasks: Arc<crate::tasks::TaskStore>,
    pub sessions: Arc<crate::sessions::SessionStore>,
    /// Set on SIGTERM: /readyz answers 503 while running requests finish.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// The request's correlation id, set by [`correlate`] for handlers to read.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

pub fn router(state: AppState) -> Router {
    let limit = state.config.get().max_body_bytes;
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v2/tasks", post(tasks::create))
        .route("/v2/tasks/{id}", get(tasks::status))
        .route("/v2/tasks/{id}/events", get(tasks::events))
        .route("/v2/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v2/meta/capabilities", get(tasks::capabilities))
        .route(
            "/v2/sessions/{id}",
            get(tasks::session).delete(tasks::delete_session),
        )
        .route("/v2/pools", get(control::pools))
        .route("/v2/pools/{id}/health", get(control::health))
        .route("/v2/pools/{id}/drain", post(control::drain))
        .route("/v2/pools/{id}/reload", post(control::reload))
        .fallback(health::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn(correlate))
        .with_state(state)
}

/// Takes the client's `X-Correlation-Id` (or makes one), hands it to handlers and logs, and
/// returns it on every response.
async fn correlate(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    request.extensions_mut().insert(CorrelationId(id.clone()));
    let span = tracing::info_span!("request", correlation_id = %id, method = %request.method(), path = %request.uri().path());
    let mut response = {
        let _entered = span.enter();
        next.run(request)
    }
    .await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

/// Bearer API keys, compared in constant time; configured open paths pass without one.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let config = state.config.get();
    let keys = &config.api_keys;
    if keys.is_empty()
        || config
            .open_paths
            .iter()
            .any(|path| path == request.uri().path())
    {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    // Every key is compared, so the time taken does not tell which one nearly matched.
    let matched = keys.iter().fold(0u8, |found, key| {
        found | presented.as_bytes().ct_eq(key.as_bytes()).unwrap_u8()
    });
    if matched == 1 {
        next.run(request).await
    } else {
        let error = ApiError::Unauthorized;
        if request.uri().path().starts_with("/v1/") {
            error.openai_response()
        } else {
            error.native_response()
        }
    }
}
