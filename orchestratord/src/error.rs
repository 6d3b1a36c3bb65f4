//! Every way a request can fail, and how each failure looks to a client: one HTTP status, one
//! native error code (DESIGN.md §6), and OpenAI's error shape for /v1. The mapping is one
//! exhaustive match per aspect, so a new failure cannot be added without deciding all of them.
//! Internal detail (io errors, engine addresses) never reaches the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidParams(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("a valid API key is required")]
    Unauthorized,
    #[error("model {0:?} is not served here")]
    ModelNotFound(String),
    #[error("task {0:?} not found")]
    TaskNotFound(String),
    #[error("the queue is full; retry later")]
    QueueFull { retry_after: Duration },
    #[error("dropped from the full queue to make room for newer work")]
    DroppedFromQueue,
    #[error("the request's deadline passed before it could start")]
    DeadlineUnmet,
    #[error("every pool serving model {0:?} is stopped or failed")]
    PoolUnready(String),
    #[error("the pool manager is unavailable; retry later")]
    PoolUnavailable { retry_after: Duration },
    /// The detail (an engine-side io error) is for logs only.
    #[error("the engine connection failed")]
    WorkerReset(String),
    #[error("the engine stopped producing tokens for {0:?}")]
    DecodeTimeout(Duration),
    #[error("{message}")]
    EngineRejected { status: u16, message: String },
    #[error("the task was cancelled")]
    Cancelled,
    #[error("{0}")]
    SessionBudget(String),
    #[error("orchestratord is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParams(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::TaskNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::QueueFull { .. }
            | ApiError::DroppedFromQueue
            | ApiError::SessionBudget(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DeadlineUnmet | ApiError::DecodeTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::PoolUnready(_)
            | ApiError::PoolUnavailable { .. }
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WorkerReset(_) => StatusCode::BAD_GATEWAY,
            ApiError::EngineRejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            // 499 is nginx's "client closed request"; nobody is listening by then anyway.
            ApiError::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The native API's stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidParams(_) | ApiError::BodyTooLarge { .. } => "INVALID_PARAMS",
            ApiError::Unauthorized => "UNAUTHORIZED",
            ApiError::ModelNotFound(_) => "MODEL_NOT_FOUND",
            ApiError::TaskNotFound(_) => "TASK_NOT_FOUND",
            ApiError::QueueFull { .. } => "ADMISSION_REJECT",
            ApiError::DroppedFromQueue => "QUEUE_FULL_DROP_LRU",
            ApiError::DeadlineUnmet => "DEADLINE_UNMET",
            ApiError::PoolUnready(_) => "POOL_UNREADY",
            ApiError::PoolUnavailable { .. } => "POOL_UNAVAILABLE",
            ApiError::WorkerReset(_) => "WORKER_RESET",
            ApiError::DecodeTimeout(_) => "DECODE_TIMEOUT",
            ApiError::EngineRejected { .. } => "INVALID_PARAMS",
            ApiError::Cancelled => "CANCELLED",
            ApiError::SessionBudget(_) => "SESSION_BUDGET_EXCEEDED",
            ApiError::ShuttingDown => "SHUTTING_DOWN",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::QueueFull { retry_after } | ApiError::PoolUnavailable { retry_after } => {
                Some(*retry_after)
            }
            ApiError::PoolUnready(_) | ApiError::ShuttingDown => Some(Duration::from_secs(1)),
            ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::Unauthorized
            | ApiError::ModelNotFound(_)
            | ApiError::TaskNotFound(_)
            | ApiError::DroppedFromQueue
            | ApiError::DeadlineUnmet
            | ApiError::WorkerReset(_)
            | ApiError::DecodeTimeout(_)
            | ApiError::EngineRejected { .. }
            | ApiError::Cancelled
            | ApiError::SessionBudget(_)
            | ApiError::Internal(_) => None,
        }
    }

    /// Whether the same request may succeed if sent again.
    pub fn retriable(&self) -> bool {
        match self {
            ApiError::QueueFull { .. }
            | ApiError::DroppedFromQueue
            | ApiError::PoolUnready(_)
            | ApiError::PoolUnavailable { .. }
            | ApiError::WorkerReset(_)
            | ApiError::DecodeTimeout(_)
            | ApiError::ShuttingDown => true,
            ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::Unauthorized
            | ApiError::ModelNotFound(_)
            | ApiError::TaskNotFound(_)
            | ApiError::DeadlineUnmet
            | ApiError::EngineRejected { .. }
            | ApiError::Cancelled
            | ApiError::SessionBudget(_)
            | ApiError::Internal(_) => false,
        }
    }

    /// OpenAI's error `type`.
    fn openai_type(&self) -> &'static str {
        match self {
            ApiError::InvalidParams(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::ModelNotFound(_)
            | ApiError::TaskNotFound(_)
            | ApiError::EngineRejected { .. } => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::QueueFull { .. }
            | ApiError::DroppedFromQueue
            | ApiError::SessionBudget(_) => "rate_limit_error",
            ApiError::DeadlineUnmet
            | ApiError::PoolUnready(_)
            | ApiError::PoolUnavailable { .. }
            | ApiError::WorkerReset(_)
            | ApiError::DecodeTimeout(_)
            | ApiError::Cancelled
            | ApiError::ShuttingDown
            | ApiError::Internal(_) => "server_error",
        }
    }

    /// `{"error":{"message","type","code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.openai_type(),
            "code": self.code().to_ascii_lowercase(),
        }})
    }

    /// The native envelope `{code, message, retriable, retry_after_ms}`.
    pub fn envelope(&self) -> serde_json::Value {
        json!({
            "code": self.code(),
            "message": self.to_string(),
            "retriable": self.retriable(),
            "retry_after_ms": self.retry_after().map(|d| d.as_millis() as u64),
        })
    }

    fn with_headers(&self, body: serde_json::Value) -> Response {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
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
        self.with_headers(self.openai_body())
    }

    /// The response for the native API.
    pub fn native_response(&self) -> Response {
        self.with_headers(self.envelope())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_429_with_retry_after_in_both_shapes() {
        let error = ApiError::QueueFull {
            retry_after: Duration::from_millis(1500),
        };
        let response = error.openai_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(error.openai_body()["error"]["type"], "rate_limit_error");
        assert_eq!(error.envelope()["code"], "ADMISSION_REJECT");
        assert_eq!(error.envelope()["retry_after_ms"], 1500);
        assert_eq!(error.envelope()["retriable"], true);
    }

    #[test]
    fn internal_detail_never_reaches_the_client() {
        let error = ApiError::Internal("/run/engines/a.sock: connection refused".into());
        assert_eq!(error.openai_body()["error"]["message"], "internal error");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn every_error_has_a_status_and_a_code() {
        let all = [
            ApiError::InvalidParams("x".into()),
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::Unauthorized,
            ApiError::ModelNotFound("m".into()),
            ApiError::TaskNotFound("t".into()),
            ApiError::QueueFull {
                retry_after: Duration::from_secs(1),
            },
            ApiError::DroppedFromQueue,
            ApiError::DeadlineUnmet,
            ApiError::PoolUnready("m".into()),
            ApiError::PoolUnavailable {
                retry_after: Duration::from_secs(1),
            },
            ApiError::WorkerReset("x".into()),
            ApiError::DecodeTimeout(Duration::from_secs(1)),
            ApiError::EngineRejected {
                status: 400,
                message: "too long".into(),
            },
            ApiError::Cancelled,
            ApiError::SessionBudget("s".into()),
            ApiError::ShuttingDown,
            ApiError::Internal("x".into()),
        ];
        for error in all {
            assert!(error.status().as_u16() >= 400, "{error:?}");
            assert!(!error.code().is_empty());
        }
    }
}
