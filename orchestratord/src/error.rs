//! Every way a request can fail, and how each failure looks to a client: one HTTP status, one
//! native error code (DESIGN.md §6), and the error shape of the API the request came in on —
//! OpenAI's `{"error":{"message","type","code"}}`, Anthropic's
//! `{"type":"error","error":{"type","message"}}`, or the native envelope — as a response or as the
//! final event of a stream. The mapping is one exhaustive match per aspect, so a new failure cannot
//! be added without deciding all of them; pool-managerd's errors become `ApiError`s in one `From`.
//! Internal detail (io errors, engine addresses) never reaches the client; an engine's own error
//! message does, since it is about the client's request.

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pool_ipc::client::ClientError;
use pool_ipc::error_code::ErrorCode;
use serde_json::{Value, json};
use std::time::Duration;

/// How long a client is asked to wait when pool-managerd cannot be reached.
pub const POOL_MANAGER_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidParams(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("a valid API key is required")]
    Unauthorized,
    #[error("this operation needs an admin key")]
    AdminOnly,
    #[error("the request must be sent with Content-Type: application/json")]
    NotJson,
    #[error("model {0:?} is not served here")]
    ModelNotFound(String),
    #[error("model {model:?} is served here, but no pool of it serves {path}")]
    EndpointNotServed { model: String, path: &'static str },
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("task {0:?} not found")]
    TaskNotFound(String),
    #[error("session {0:?} not found")]
    SessionNotFound(String),
    #[error("pool {0:?} not found")]
    PoolNotFound(String),
    #[error("the queue is full; retry later")]
    QueueFull { retry_after: Duration },
    /// A key over one of its limits (the key file's `concurrency`, `rpm` or `tpm`).
    #[error("key {key:?} is over its limit of {limit}; retry later")]
    KeyLimit {
        key: String,
        /// The limit in words, with its value ("60 requests per minute").
        limit: String,
        retry_after: Duration,
    },
    /// A key whose `models` setting does not name the model asked for.
    #[error("key {key:?} may not use model {model:?}")]
    ModelNotAllowed { key: String, model: String },
    #[error("dropped from the full queue to make room for newer work")]
    DroppedFromQueue,
    #[error("the request's deadline passed before it could start")]
    DeadlineUnmet,
    #[error("every pool serving model {0:?} is stopped or failed")]
    PoolUnready(String),
    /// The model's pools were unloaded and loading one failed (its engine is backing off); the
    /// reason is pool-managerd's.
    #[error("model {model:?} failed to load: {reason}")]
    ModelLoadFailed {
        model: String,
        reason: String,
        retry_after: Duration,
    },
    /// The model's pool can never be loaded here: its footprint is above its device's budget (the
    /// reason, pool-managerd's, names both).
    #[error("model {model:?} cannot be loaded here: {reason}")]
    ModelNeverFits { model: String, reason: String },
    #[error("the pool manager is unavailable; retry later")]
    PoolUnavailable { retry_after: Duration },
    /// pool-managerd refused an operation with a code that is about the request itself.
    #[error("{message}")]
    PoolManagerRefused { code: ErrorCode, message: String },
    /// The detail (an engine-side io error) is for logs only.
    #[error("the engine connection failed")]
    WorkerReset(String),
    /// pool-managerd took the request's slots back (its engine failed, its pool was removed).
    #[error("the engine serving the request failed; its slots were taken back")]
    LeaseRevoked,
    #[error("the engine stopped producing tokens for {0:?}")]
    DecodeTimeout(Duration),
    #[error("the engine did not answer within {0:?}")]
    ResponseTimeout(Duration),
    /// The engine refused the request for a reason about the request (a 4xx other than a refusal
    /// of orchestratord's own credentials, 501 for an API it was not started for, 503 while
    /// busy): its status and message (and, when it sent one, its own `error` object, passed on
    /// unchanged to clients of the same API shape).
    #[error("{message}")]
    EngineRejected {
        status: u16,
        message: String,
        detail: Option<Value>,
    },
    /// The engine failed the request (any other status); the detail (its body) is for logs only.
    #[error("the engine failed the request")]
    EngineFailed(String),
    #[error("the task was cancelled")]
    Cancelled,
    #[error("the task was cancelled: nobody read its events for {0:?}")]
    Unattended(Duration),
    #[error("{0}")]
    SessionBudget(String),
    #[error("this host is drained: it admits no new requests")]
    HostDraining,
    #[error("orchestratord is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal(String),
}

/// The error shape of the API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
    Native,
}

impl ErrorShape {
    /// The shape clients of `path` expect (errors raised before a handler knows its API).
    pub fn of_path(path: &str) -> ErrorShape {
        if path.starts_with("/v1/messages") {
            ErrorShape::Anthropic
        } else if path.starts_with("/v1/") {
            ErrorShape::OpenAi
        } else {
            ErrorShape::Native
        }
    }
}

impl From<ClientError> for ApiError {
    /// pool-managerd's answer to an operation: refusals about the request keep their meaning;
    /// everything that says "pool-managerd is not there or not working" is a retriable 503.
    fn from(error: ClientError) -> ApiError {
        match error {
            ClientError::Remote(remote) => match remote.code {
                ErrorCode::NotFound
                | ErrorCode::NotReady
                | ErrorCode::Draining
                | ErrorCode::NoCapacity
                | ErrorCode::LeaseCapReached
                | ErrorCode::Unauthorized
                | ErrorCode::BadRequest
                | ErrorCode::Unsupported => ApiError::PoolManagerRefused {
                    code: remote.code,
                    message: remote.message,
                },
                ErrorCode::VersionMismatch | ErrorCode::Internal | ErrorCode::ShuttingDown => {
                    tracing::warn!(error = %remote, "pool-managerd failed an operation");
                    ApiError::PoolUnavailable {
                        retry_after: POOL_MANAGER_RETRY_AFTER,
                    }
                }
            },
            ClientError::Connect { .. }
            | ClientError::Unavailable
            | ClientError::Disconnected
            | ClientError::Timeout(_)
            | ClientError::Refused(_)
            | ClientError::VersionMismatch { .. }
            | ClientError::Frame(_)
            | ClientError::Read(_)
            | ClientError::Write(_) => {
                tracing::warn!(%error, "pool-managerd did not take the request");
                ApiError::PoolUnavailable {
                    retry_after: POOL_MANAGER_RETRY_AFTER,
                }
            }
            ClientError::UnexpectedFrame(_)
            | ClientError::UnexpectedResponse { .. }
            | ClientError::AcquireNeedsGuard => ApiError::Internal(error.to_string()),
        }
    }
}

impl ApiError {
    /// An engine's error answer. A refusal about the request keeps its status and its message
    /// from a JSON error body in OpenAI's or Anthropic's shape (both put it in `error.message`);
    /// anything else (a 5xx, a refusal of orchestratord's credentials, an unexpected status) is
    /// a 502 whose detail only the log sees.
    pub fn from_engine(status: u16, body: &str) -> ApiError {
        let about_the_request = match status {
            401 | 403 | 407 => false,
            400..=499 | 501 | 503 => true,
            _ => false,
        };
        if !about_the_request {
            let shown: String = body.chars().take(1024).collect();
            return ApiError::EngineFailed(format!("engine answered {status}: {shown}"));
        }
        let detail = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|json| json.get("error").filter(|error| error.is_object()).cloned());
        let message = detail
            .as_ref()
            .and_then(|error| error["message"].as_str())
            .map_or_else(
                || "the engine refused the request".to_owned(),
                str::to_owned,
            );
        ApiError::EngineRejected {
            status,
            message,
            detail,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParams(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminOnly => StatusCode::FORBIDDEN,
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::ModelNotFound(_)
            | ApiError::EndpointNotServed { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::TaskNotFound(_)
            | ApiError::SessionNotFound(_)
            | ApiError::PoolNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::QueueFull { .. }
            | ApiError::KeyLimit { .. }
            | ApiError::DroppedFromQueue
            | ApiError::SessionBudget(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            ApiError::DeadlineUnmet | ApiError::DecodeTimeout(_) | ApiError::ResponseTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ApiError::PoolUnready(_)
            | ApiError::ModelLoadFailed { .. }
            | ApiError::PoolUnavailable { .. }
            | ApiError::HostDraining
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ModelNeverFits { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::PoolManagerRefused { code, .. } => match code {
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Unauthorized => StatusCode::FORBIDDEN,
                ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported => StatusCode::CONFLICT,
                ErrorCode::NotReady
                | ErrorCode::Draining
                | ErrorCode::NoCapacity
                | ErrorCode::LeaseCapReached
                | ErrorCode::VersionMismatch
                | ErrorCode::Internal
                | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::WorkerReset(_) | ApiError::EngineFailed(_) | ApiError::LeaseRevoked => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::EngineRejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            // 499 is nginx's "client closed request"; nobody is listening by then anyway.
            ApiError::Cancelled | ApiError::Unattended(_) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The native API's stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidParams(_) | ApiError::BodyTooLarge { .. } => "INVALID_PARAMS",
            ApiError::BodyTimeout(_) => "REQUEST_TIMEOUT",
            ApiError::Unauthorized => "UNAUTHORIZED",
            ApiError::AdminOnly => "FORBIDDEN",
            ApiError::NotJson => "UNSUPPORTED_MEDIA_TYPE",
            ApiError::ModelNotFound(_) => "MODEL_NOT_FOUND",
            ApiError::EndpointNotServed { .. } => "ENDPOINT_NOT_SERVED",
            ApiError::RouteNotFound { .. } => "NOT_FOUND",
            ApiError::TaskNotFound(_) => "TASK_NOT_FOUND",
            ApiError::SessionNotFound(_) => "SESSION_NOT_FOUND",
            ApiError::PoolNotFound(_) => "POOL_NOT_FOUND",
            ApiError::QueueFull { .. } => "ADMISSION_REJECT",
            ApiError::KeyLimit { .. } => "KEY_LIMIT_EXCEEDED",
            ApiError::ModelNotAllowed { .. } => "MODEL_NOT_ALLOWED",
            ApiError::DroppedFromQueue => "QUEUE_FULL_DROP_LRU",
            ApiError::DeadlineUnmet => "DEADLINE_UNMET",
            ApiError::PoolUnready(_) => "POOL_UNREADY",
            ApiError::ModelNeverFits { .. } => "MODEL_TOO_LARGE",
            ApiError::ModelLoadFailed { .. } => "MODEL_LOAD_FAILED",
            ApiError::PoolUnavailable { .. } => "POOL_UNAVAILABLE",
            ApiError::PoolManagerRefused { code, .. } => match code {
                ErrorCode::NotFound => "NOT_FOUND",
                ErrorCode::NotReady => "NOT_READY",
                ErrorCode::Draining => "DRAINING",
                ErrorCode::NoCapacity => "NO_CAPACITY",
                ErrorCode::Unauthorized => "FORBIDDEN",
                ErrorCode::BadRequest => "INVALID_PARAMS",
                ErrorCode::VersionMismatch => "VERSION_MISMATCH",
                ErrorCode::Internal => "INTERNAL",
                ErrorCode::Unsupported => "UNSUPPORTED",
                ErrorCode::ShuttingDown => "SHUTTING_DOWN",
                ErrorCode::LeaseCapReached => "LEASE_CAP_REACHED",
            },
            ApiError::WorkerReset(_) => "WORKER_RESET",
            ApiError::LeaseRevoked => "LEASE_REVOKED",
            ApiError::DecodeTimeout(_) => "DECODE_TIMEOUT",
            ApiError::ResponseTimeout(_) => "RESPONSE_TIMEOUT",
            ApiError::EngineRejected {
                status: 429 | 503, ..
            } => "ENGINE_BUSY",
            ApiError::EngineRejected { status: 501, .. } => "UNSUPPORTED",
            ApiError::EngineRejected { .. } => "INVALID_PARAMS",
            ApiError::EngineFailed(_) => "ENGINE_ERROR",
            ApiError::Cancelled | ApiError::Unattended(_) => "CANCELLED",
            ApiError::SessionBudget(_) => "SESSION_BUDGET_EXCEEDED",
            ApiError::HostDraining => "HOST_DRAINING",
            ApiError::ShuttingDown => "SHUTTING_DOWN",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::QueueFull { retry_after }
            | ApiError::KeyLimit { retry_after, .. }
            | ApiError::PoolUnavailable { retry_after }
            | ApiError::ModelLoadFailed { retry_after, .. } => Some(*retry_after),
            ApiError::PoolUnready(_) | ApiError::HostDraining | ApiError::ShuttingDown => {
                Some(Duration::from_secs(1))
            }
            ApiError::PoolManagerRefused { .. } if self.retriable() => Some(Duration::from_secs(1)),
            ApiError::ModelNeverFits { .. }
            | ApiError::ModelNotAllowed { .. }
            | ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::Unauthorized
            | ApiError::AdminOnly
            | ApiError::NotJson
            | ApiError::ModelNotFound(_)
            | ApiError::EndpointNotServed { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::TaskNotFound(_)
            | ApiError::SessionNotFound(_)
            | ApiError::PoolNotFound(_)
            | ApiError::PoolManagerRefused { .. }
            | ApiError::DroppedFromQueue
            | ApiError::DeadlineUnmet
            | ApiError::WorkerReset(_)
            | ApiError::LeaseRevoked
            | ApiError::DecodeTimeout(_)
            | ApiError::ResponseTimeout(_)
            | ApiError::EngineRejected { .. }
            | ApiError::EngineFailed(_)
            | ApiError::Cancelled
            | ApiError::Unattended(_)
            | ApiError::SessionBudget(_)
            | ApiError::Internal(_) => None,
        }
    }

    /// Whether the same request may succeed if sent again.
    pub fn retriable(&self) -> bool {
        match self {
            ApiError::QueueFull { .. }
            | ApiError::KeyLimit { .. }
            | ApiError::DroppedFromQueue
            | ApiError::PoolUnready(_)
            | ApiError::ModelLoadFailed { .. }
            | ApiError::PoolUnavailable { .. }
            | ApiError::WorkerReset(_)
            | ApiError::LeaseRevoked
            | ApiError::EngineFailed(_)
            | ApiError::DecodeTimeout(_)
            | ApiError::HostDraining
            | ApiError::ShuttingDown => true,
            ApiError::PoolManagerRefused { .. } => self.status() == StatusCode::SERVICE_UNAVAILABLE,
            ApiError::EngineRejected { status, .. } => *status == 503 || *status == 429,
            ApiError::ModelNeverFits { .. }
            | ApiError::ModelNotAllowed { .. }
            | ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::Unauthorized
            | ApiError::AdminOnly
            | ApiError::NotJson
            | ApiError::ModelNotFound(_)
            | ApiError::EndpointNotServed { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::TaskNotFound(_)
            | ApiError::SessionNotFound(_)
            | ApiError::PoolNotFound(_)
            | ApiError::DeadlineUnmet
            | ApiError::ResponseTimeout(_)
            | ApiError::Cancelled
            | ApiError::Unattended(_)
            | ApiError::SessionBudget(_)
            | ApiError::Internal(_) => false,
        }
    }

    /// OpenAI's error `type`.
    fn openai_type(&self) -> &'static str {
        match self {
            ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::NotJson
            | ApiError::ModelNotFound(_)
            | ApiError::EndpointNotServed { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::TaskNotFound(_)
            | ApiError::SessionNotFound(_)
            | ApiError::PoolNotFound(_) => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::AdminOnly | ApiError::ModelNotAllowed { .. } => "permission_error",
            ApiError::PoolManagerRefused { .. } | ApiError::EngineRejected { .. }
                if self.status().is_client_error() =>
            {
                "invalid_request_error"
            }
            ApiError::QueueFull { .. }
            | ApiError::KeyLimit { .. }
            | ApiError::DroppedFromQueue
            | ApiError::SessionBudget(_) => "rate_limit_error",
            ApiError::DeadlineUnmet
            | ApiError::PoolUnready(_)
            | ApiError::ModelLoadFailed { .. }
            | ApiError::ModelNeverFits { .. }
            | ApiError::PoolUnavailable { .. }
            | ApiError::PoolManagerRefused { .. }
            | ApiError::WorkerReset(_)
            | ApiError::LeaseRevoked
            | ApiError::EngineFailed(_)
            | ApiError::DecodeTimeout(_)
            | ApiError::ResponseTimeout(_)
            | ApiError::EngineRejected { .. }
            | ApiError::Cancelled
            | ApiError::Unattended(_)
            | ApiError::HostDraining
            | ApiError::ShuttingDown
            | ApiError::Internal(_) => "server_error",
        }
    }

    /// Anthropic's error `type`, from the status as Anthropic's API assigns them.
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            504 => "timeout_error",
            status if (400..500).contains(&status) => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// `{"error":{"message","type","code"}}`; an engine's own OpenAI-shaped `error` object as it
    /// came.
    pub fn openai_body(&self) -> Value {
        if let ApiError::EngineRejected {
            detail: Some(detail),
            ..
        } = self
            && detail.get("type").is_some()
            && detail.get("message").is_some()
        {
            return json!({"error": detail});
        }
        json!({"error": {
            "message": self.to_string(),
            "type": self.openai_type(),
            "code": self.code().to_ascii_lowercase(),
        }})
    }

    /// `{"type":"error","error":{"type","message"}}`.
    pub fn anthropic_body(&self) -> Value {
        json!({"type": "error", "error": {
            "type": self.anthropic_type(),
            "message": self.to_string(),
        }})
    }

    /// The native envelope `{code, message, retriable, retry_after_ms}`.
    pub fn envelope(&self) -> Value {
        json!({
            "code": self.code(),
            "message": self.to_string(),
            "retriable": self.retriable(),
            "retry_after_ms": self.retry_after().map(|d| d.as_millis() as u64),
        })
    }

    pub fn body(&self, shape: ErrorShape) -> Value {
        match shape {
            ErrorShape::OpenAi => self.openai_body(),
            ErrorShape::Anthropic => self.anthropic_body(),
            ErrorShape::Native => self.envelope(),
        }
    }

    /// The response in the API's error shape, with `Retry-After` where a retry may succeed.
    pub fn response(&self, shape: ErrorShape) -> Response {
        match self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::EngineFailed(detail) => tracing::warn!(%detail, "engine failed a request"),
            _ => {}
        }
        let mut response = (self.status(), axum::Json(self.body(shape))).into_response();
        if let Some(after) = self.retry_after() {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }

    /// The response for the OpenAI-compatible API.
    pub fn openai_response(&self) -> Response {
        self.response(ErrorShape::OpenAi)
    }

    /// The response for the native API.
    pub fn native_response(&self) -> Response {
        self.response(ErrorShape::Native)
    }
}

impl IntoResponse for ApiError {
    /// The native shape; handlers of other APIs call [`ApiError::response`] with theirs.
    fn into_response(self) -> Response {
        self.native_response()
    }
}

/// The final event of a stream that failed after it began, in the shape of the stream's API:
/// OpenAI chunks `data: {"error":…}`, Anthropic `event: error` with its error body, OpenAI
/// Responses `event: error` with `{"type":"error","code","message"}`.
pub fn error_event(error: &ApiError, format: crate::sse::StreamFormat) -> Bytes {
    use crate::sse::StreamFormat;
    match format {
        StreamFormat::OpenAiChunks => crate::sse::data(error.openai_body().to_string().as_bytes()),
        StreamFormat::AnthropicEvents => {
            crate::sse::named("error", error.anthropic_body().to_string().as_bytes())
        }
        StreamFormat::ResponsesEvents => {
            let body = json!({
                "type": "error",
                "code": error.code().to_ascii_lowercase(),
                "message": error.to_string(),
                "param": null,
            });
            crate::sse::named("error", body.to_string().as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_ipc::error_code::IpcError;

    #[test]
    fn a_full_queue_is_429_with_retry_after_in_every_shape() {
        let error = ApiError::QueueFull {
            retry_after: Duration::from_millis(1500),
        };
        let response = error.openai_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(error.openai_body()["error"]["type"], "rate_limit_error");
        assert_eq!(error.anthropic_body()["error"]["type"], "rate_limit_error");
        assert_eq!(error.envelope()["code"], "ADMISSION_REJECT");
        assert_eq!(error.envelope()["retry_after_ms"], 1500);
        assert_eq!(error.envelope()["retriable"], true);
    }

    #[test]
    fn internal_detail_never_reaches_the_client() {
        let error = ApiError::Internal("/run/engines/a.sock: connection refused".into());
        assert_eq!(error.openai_body()["error"]["message"], "internal error");
        assert_eq!(error.anthropic_body()["error"]["message"], "internal error");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn an_engine_error_keeps_its_status_and_message_and_its_openai_object() {
        let body = r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error","n_ctx":256}}"#;
        let error = ApiError::from_engine(400, body);
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        let openai = error.openai_body();
        assert_eq!(openai["error"]["type"], "exceed_context_size_error");
        assert_eq!(openai["error"]["n_ctx"], 256);
        let anthropic = error.anthropic_body();
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "invalid_request_error");
        assert_eq!(
            anthropic["error"]["message"],
            "the request exceeds the available context size"
        );
        let unreadable = ApiError::from_engine(501, "<html>");
        assert_eq!(unreadable.status().as_u16(), 501);
        assert_eq!(unreadable.code(), "UNSUPPORTED");
        assert_eq!(
            unreadable.openai_body()["error"]["message"],
            "the engine refused the request"
        );
        // What is not about the request stays in the log: a crash, a refusal of our credentials.
        for status in [500, 401, 302] {
            let failed = ApiError::from_engine(
                status,
                r#"{"error":{"message":"/srv/models/x.gguf: internal detail"}}"#,
            );
            assert_eq!(failed.status(), StatusCode::BAD_GATEWAY, "{status}");
            assert_eq!(failed.code(), "ENGINE_ERROR");
            assert_eq!(
                failed.openai_body()["error"]["message"],
                "the engine failed the request"
            );
        }
    }

    #[test]
    fn pool_manager_refusals_keep_their_meaning_and_its_absence_is_a_retriable_503() {
        let refused = |code| ApiError::from(ClientError::Remote(IpcError::new(code, "why")));
        assert_eq!(refused(ErrorCode::NotFound).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            refused(ErrorCode::Unauthorized).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(ErrorCode::BadRequest).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(ErrorCode::Unsupported).status(),
            StatusCode::CONFLICT
        );
        assert!(refused(ErrorCode::NoCapacity).retriable());
        let capped = refused(ErrorCode::LeaseCapReached);
        assert_eq!(
            (capped.status(), capped.code(), capped.retriable()),
            (StatusCode::SERVICE_UNAVAILABLE, "LEASE_CAP_REACHED", true)
        );
        let gone = ApiError::from(ClientError::Unavailable);
        assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(gone.code(), "POOL_UNAVAILABLE");
        assert!(gone.retriable());
    }

    #[test]
    fn shapes_follow_the_path() {
        assert_eq!(ErrorShape::of_path("/v1/messages"), ErrorShape::Anthropic);
        assert_eq!(
            ErrorShape::of_path("/v1/messages/count_tokens"),
            ErrorShape::Anthropic
        );
        assert_eq!(ErrorShape::of_path("/v1/embeddings"), ErrorShape::OpenAi);
        assert_eq!(ErrorShape::of_path("/v2/tasks"), ErrorShape::Native);
    }

    #[test]
    fn every_error_has_a_status_and_a_code() {
        let all = [
            ApiError::InvalidParams("x".into()),
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::BodyTimeout(Duration::from_secs(1)),
            ApiError::Unauthorized,
            ApiError::AdminOnly,
            ApiError::NotJson,
            ApiError::ModelNotFound("m".into()),
            ApiError::EndpointNotServed {
                model: "m".into(),
                path: "/v1/embeddings",
            },
            ApiError::RouteNotFound {
                method: "GET".into(),
                path: "/x".into(),
            },
            ApiError::TaskNotFound("t".into()),
            ApiError::SessionNotFound("s".into()),
            ApiError::PoolNotFound("p".into()),
            ApiError::QueueFull {
                retry_after: Duration::from_secs(1),
            },
            ApiError::DroppedFromQueue,
            ApiError::DeadlineUnmet,
            ApiError::PoolUnready("m".into()),
            ApiError::PoolUnavailable {
                retry_after: Duration::from_secs(1),
            },
            ApiError::PoolManagerRefused {
                code: ErrorCode::BadRequest,
                message: "x".into(),
            },
            ApiError::WorkerReset("x".into()),
            ApiError::LeaseRevoked,
            ApiError::DecodeTimeout(Duration::from_secs(1)),
            ApiError::ResponseTimeout(Duration::from_secs(1)),
            ApiError::from_engine(400, "{}"),
            ApiError::EngineFailed("x".into()),
            ApiError::Cancelled,
            ApiError::Unattended(Duration::from_secs(1)),
            ApiError::SessionBudget("s".into()),
            ApiError::KeyLimit {
                key: "k".into(),
                limit: "1 requests per minute".into(),
                retry_after: Duration::from_secs(30),
            },
            ApiError::ModelNotAllowed {
                key: "k".into(),
                model: "m".into(),
            },
            ApiError::HostDraining,
            ApiError::ShuttingDown,
            ApiError::Internal("x".into()),
        ];
        for error in all {
            assert!(error.status().as_u16() >= 400, "{error:?}");
            assert!(!error.code().is_empty());
            assert!(error.anthropic_body()["error"]["type"].is_string());
        }
    }
}
