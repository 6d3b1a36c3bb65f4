//! The HTTP application: shared state, the router, and what every request passes through —
//! its correlation id and access line, the API key check, and [`Inbound`]: the body read within
//! its endpoint family's limit and the client headers an engine may use. Handlers live in `api/`.

use crate::api::{anthropic, control, health, openai, tasks};
use crate::client_address::client_address;
use crate::config::{Config, LiveConfig};
use crate::error::{ApiError, ErrorShape};
use crate::keys::{Caller, Role};
use crate::scheduler::Scheduler;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use daemon_support::http_server::PeerAddr;
use pool_ipc::client::{PoolClient, RegistryMirror};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::Instrument as _;

pub const CORRELATION_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Anthropic's SDKs send their key here.
const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Client headers always forwarded to engines: trace context and API version selectors. Credentials
/// never are (the configured allowlist cannot name them). When spans are exported, the engine gets
/// the trace context of orchestratord's own span instead of the client's (`request_trace`).
pub const FORWARDED_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("openai-beta"),
];

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
    pub models_seen: Arc<ModelsSeen>,
    /// Whether new requests are admitted (the operator's drain, SIGTERM).
    pub host: Arc<crate::drain::HostDrain>,
    /// Per-key limits and usage.
    pub tenants: Arc<crate::tenants::Tenants>,
    /// Makes requests' spans when `otlp_endpoint` is configured (`request_trace`).
    pub tracer: Option<daemon_support::trace_export::Tracer>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// When this orchestratord first saw each model (`created` in `GET /v1/models`).
#[derive(Debug, Default)]
pub struct ModelsSeen {
    /// A std mutex: looked up and inserted into, never held across an await.
    first: Mutex<HashMap<String, u64>>,
}

impl ModelsSeen {
    /// Unix seconds when `model` was first asked about here.
    pub fn first_seen(&self, model: &str) -> u64 {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        *first.entry(model.to_owned()).or_insert_with(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs())
        })
    }
}

/// The request's correlation id, set by [`correlate`] for handlers to read.
#[derive(Clone, Debug)]
pub struct CorrelationId(pub String);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route(
            "/v1/chat/completions/input_tokens",
            post(openai::chat_input_tokens),
        )
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings_handler))
        .route("/v1/rerank", post(openai::rerank_handler))
        .route("/v1/reranking", post(openai::reranking_handler))
        .route("/v1/responses", post(openai::responses_handler))
        .route(
            "/v1/responses/input_tokens",
            post(openai::responses_input_tokens),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v2/tasks", post(tasks::create))
        .route("/v2/tasks/{id}", get(tasks::status))
        .route("/v2/tasks/{id}/events", get(tasks::events))
        .route("/v2/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v2/meta/capabilities", get(tasks::capabilities))
        .route(
            "/v2/sessions/{id}",
            get(tasks::session).delete(tasks::delete_session),
        )
        .route("/v2/usage", get(control::usage))
        .route("/v2/admin/metrics", get(health::admin_metrics))
        .route("/v2/admin/drain", post(control::drain_host))
        .route("/v2/admin/undrain", post(control::undrain_host))
        .route("/v2/pools", get(control::pools))
        .route("/v2/pools/{id}/health", get(control::health))
        .route("/v2/pools/{id}/drain", post(control::drain))
        .route("/v2/pools/{id}/reload", post(control::reload))
        .route("/v2/pools/{id}/load", post(control::load))
        .route("/v2/pools/{id}/unload", post(control::unload))
        .fallback(health::not_found)
        // [`Inbound`] reads bodies within each endpoint family's own limit.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn_with_state(state.clone(), correlate))
        .with_state(state)
}

/// Takes the client's `X-Correlation-Id`, else its `X-Request-Id`, else makes one; hands it to
/// handlers and logs, and returns it on every response (an `X-Request-Id` is echoed too). Writes
/// the request's access line (target `access`, level info) when its response head leaves: client
/// (`client_address`), method, path, status, key name, correlation id and the time to the head (a
/// stream's head leaves with its first frame).
async fn correlate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = usable_id(request.headers(), &REQUEST_ID_HEADER);
    let id = usable_id(request.headers(), &CORRELATION_HEADER)
        .or_else(|| request_id.clone())
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    request.extensions_mut().insert(CorrelationId(id.clone()));
    let logged = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
        let client = request.extensions().get::<PeerAddr>().map(|peer| {
            client_address(
                peer.0.ip(),
                request.headers(),
                &state.config.get().trusted_proxies,
            )
        });
        (
            client,
            request.method().clone(),
            request.uri().path().to_owned(),
        )
    });
    let span = tracing::info_span!("request", correlation_id = %id, method = %request.method(), path = %request.uri().path());
    let mut response = next.run(request).instrument(span).await;
    if let Some((client, method, path)) = logged {
        let key = response
            .extensions()
            .get::<Caller>()
            .and_then(|caller| caller.key.as_deref())
            .unwrap_or("-");
        tracing::info!(
            target: "access",
            client = %client.map_or_else(|| "-".to_owned(), |client| client.to_string()),
            %method,
            %path,
            status = response.status().as_u16(),
            key,
            correlation_id = %id,
            head_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(CORRELATION_HEADER, value);
    }
    if let Some(value) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// A client-chosen id from header `name`, if it is short enough to log and echo.
fn usable_id(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= 128)
        .map(str::to_owned)
}

/// API keys, as `Authorization: Bearer <key>` or Anthropic's `x-api-key: <key>` (see `keys`);
/// configured open paths pass without one. The caller's role must allow the route: the
/// operator's routes (usage, the admin metrics view, the host's drain and undrain; a pool's drain,
/// reload, load, unload) need an admin key. Every POST must say it carries JSON: a browser cannot
/// send that cross-site without asking first (a form or a "simple" fetch can only send
/// `text/plain`, a form encoding or `multipart/form-data`), so a web page can neither run
/// inference on nor drive a daemon on the visitor's host.
async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let config = state.config.get();
    let path = request.uri().path();
    let shape = ErrorShape::of_path(path);
    if request.method() == Method::POST && !declares_json(request.headers()) {
        return ApiError::NotJson.response(shape);
    }
    let caller = if config.api_keys.is_empty() {
        Caller::HOST
    } else if config.open_paths.iter().any(|open| open == path) {
        return next.run(request).await;
    } else {
        let headers = request.headers();
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .or_else(|| {
                headers
                    .get(&API_KEY_HEADER)
                    .and_then(|value| value.to_str().ok())
            })
            .unwrap_or("");
        match config.api_keys.caller(presented) {
            Some(caller) => caller,
            None => return ApiError::Unauthorized.response(shape),
        }
    };
    if caller.role != Role::Admin && is_operators(request.method(), path) {
        return ApiError::AdminOnly.response(shape);
    }
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    // For the access log line, written outside this layer.
    response.extensions_mut().insert(caller);
    response
}

/// The operator's routes: usage per key, the metrics with per-key series, draining the host;
/// draining, reloading, loading and unloading pools.
fn is_operators(method: &Method, path: &str) -> bool {
    path == "/v2/usage"
        || path.starts_with("/v2/admin/")
        || method == Method::POST
            && path.starts_with("/v2/pools/")
            && ["/drain", "/reload", "/load", "/unload"]
                .iter()
                .any(|action| path.ends_with(action))
}

/// `Content-Type: application/json` or another JSON type (`application/<anything>+json`), with or
/// without parameters (`; charset=utf-8`). None of these is a type a browser sends cross-site
/// without a preflight.
fn declares_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| is_json_type(essence.trim()))
}

/// Whether a media type's essence (`type/subtype`, no parameters) is JSON.
fn is_json_type(essence: &str) -> bool {
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !kind.eq_ignore_ascii_case("application") {
        return false;
    }
    let subtype = subtype.to_ascii_lowercase();
    subtype == "json"
        || subtype
            .strip_suffix("+json")
            .is_some_and(|prefix| !prefix.is_empty() && !prefix.contains(['/', ' ', '\t']))
}

/// What an API handler takes from a request besides the shared state: the body, read within the
/// limit of its endpoint family (a larger one is a 413 in the API's error shape), the correlation
/// id, and the client headers to forward to the engine.
#[derive(Debug)]
pub struct Inbound {
    pub body: Bytes,
    pub correlation_id: String,
    pub forward: HeaderMap,
    pub caller: Caller,
}

impl FromRequest<AppState> for Inbound {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let config = state.config.get();
        let path = request.uri().path().to_owned();
        let shape = ErrorShape::of_path(&path);
        let limit = config.body_limits.for_path(&path);
        let correlation_id = request
            .extensions()
            .get::<CorrelationId>()
            .map(|id| id.0.clone())
            .unwrap_or_default();
        let forward = forwarded_headers(request.headers(), &config);
        let caller = caller_of(request.extensions());
        let read = axum::body::to_bytes(request.into_body(), limit);
        let body = tokio::time::timeout(config.body_timeout, read)
            .await
            .map_err(|_| ApiError::BodyTimeout(config.body_timeout).response(shape))?
            .map_err(|error| {
                let too_large = std::error::Error::source(&error)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
                if too_large {
                    ApiError::BodyTooLarge { limit }.response(shape)
                } else {
                    ApiError::InvalidParams(format!("cannot read the request body: {error}"))
                        .response(shape)
                }
            })?;
        Ok(Inbound {
            body,
            correlation_id,
            forward,
            caller,
        })
    }
}

/// Who the key check said is calling; on an open path (no key asked) an anonymous inference
/// caller.
fn caller_of(extensions: &axum::http::Extensions) -> Caller {
    extensions.get::<Caller>().cloned().unwrap_or(Caller {
        key: None,
        role: Role::Inference,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &AppState,
    ) -> Result<Caller, Self::Rejection> {
        Ok(caller_of(&parts.extensions))
    }
}

/// The client headers an engine may use: [`FORWARDED_HEADERS`] and the configured allowlist.
fn forwarded_headers(headers: &HeaderMap, config: &Config) -> HeaderMap {
    let mut forward = HeaderMap::new();
    for name in FORWARDED_HEADERS.iter().chain(&config.forward_headers) {
        for value in headers.get_all(name) {
            forward.append(name.clone(), value.clone());
        }
    }
    forward
}

#[cfg(test)]
mod tests {
    use super::declares_json;
    use axum::http::{HeaderMap, HeaderValue, header};

    fn with_type(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            headers.insert(header::CONTENT_TYPE, value);
        }
        headers
    }

    #[test]
    fn json_types_with_or_without_parameters_declare_json_and_what_a_form_sends_does_not() {
        for json in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/vnd.api+json",
            "application/merge-patch+json; charset=utf-8",
        ] {
            assert!(declares_json(&with_type(json)), "{json}");
        }
        for not_json in [
            "",
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/json",
            "application/+json",
            "application/jsonx",
            "application/json-seq",
            "json",
        ] {
            assert!(!declares_json(&with_type(not_json)), "{not_json:?}");
        }
        assert!(!declares_json(&HeaderMap::new()), "no Content-Type at all");
    }
}
