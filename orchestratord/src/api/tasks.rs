//! The native task API: `POST /v2/tasks` (202 with the task id, queue position, predicted
//! start and the event stream's URL), `GET /v2/tasks/{id}/events` (SSE: `started`, `token
//! {t,i}`, `metrics`, then `end {tokens_out, decode_ms}` or `error {code, message, retriable,
//! retry_after_ms}`), `POST /v2/tasks/{id}/cancel` and `GET /v2/tasks/{id}`. A task runs once
//! admitted, whether or not its events are read; cancelling it (or its deadline passing in the
//! queue) ends it with one `error` event and releases its slot at once.

use crate::adapters::{AdapterError, EngineEvent, EngineRequest, EngineRoute};
use crate::admission::Priority;
use crate::app::{AppState, CorrelationId};
use crate::error::ApiError;
use crate::placement::PlacementHints;
use crate::scheduler::{Demand, Placed, Ticket};
use crate::sse;
use crate::tasks::TaskHandle;
use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pool_ipc::registry::{EngineKind, PoolId, ReleaseOutcome};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_TOKENS_LIMIT: u32 = 100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    model: String,
    prompt: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    placement: Option<PlacementBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementBody {
    pin: Option<String>,
    prefer: Option<String>,
    #[serde(default)]
    avoid: Vec<String>,
}

/// A task that passed validation: only these are queued.
#[derive(Debug, Clone)]
struct ValidTask {
    model: String,
    prompt: String,
    max_tokens: u32,
    priority: Priority,
    session: Option<String>,
    queue_deadline: Duration,
    hints: PlacementHints,
}

fn validate(body: &[u8], default_deadline: Duration) -> Result<ValidTask, ApiError> {
    let task: TaskBody = serde_json::from_slice(body)
        .map_err(|error| ApiError::InvalidParams(format!("invalid task: {error}")))?;
    if task.model.is_empty() {
        return Err(ApiError::InvalidParams("'model' must not be empty".into()));
    }
    if task.prompt.is_empty() {
        return Err(ApiError::InvalidParams("'prompt' must not be empty".into()));
    }
    let max_tokens = task.max_tokens.unwrap_or(16);
    if !(1..=MAX_TOKENS_LIMIT).contains(&max_tokens) {
        return Err(ApiError::InvalidParams(format!(
            "'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}"
        )));
    }
    let queue_deadline = match task.deadline_ms {
        None => default_deadline,
        Some(ms) if (1..=86_400_000).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            return Err(ApiError::InvalidParams(
                "'deadline_ms' must be between 1 and 86400000".into(),
            ));
        }
    };
    if task
        .session_id
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.len() > 128)
    {
        return Err(ApiError::InvalidParams(
            "'session_id' must be 1-128 characters".into(),
        ));
    }
    let placement = task.placement.unwrap_or_default();
    Ok(ValidTask {
        model: task.model,
        prompt: task.prompt,
        max_tokens,
        priority: task.priority.unwrap_or(Priority::Interactive),
        session: task.session_id,
        queue_deadline,
        hints: PlacementHints {
            pin: placement.pin.map(PoolId),
            prefer: placement.prefer.map(PoolId),
            avoid: placement.avoid.into_iter().map(PoolId).collect(),
        },
    })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    body: Bytes,
) -> Response {
    let task = match validate(&body, state.config.get().queue_deadline) {
        Ok(task) => task,
        Err(error) => return error.native_response(),
    };
    if let Some(session) = &task.session
        && let Err(error) = state.sessions.begin_turn(session, Instant::now())
    {
        state.metrics.reject(error.code());
        return error.native_response();
    }
    let demand = Demand {
        model: task.model.clone(),
        priority: task.priority,
        session: task.session.clone(),
        hints: task.hints.clone(),
        deadline: Instant::now() + task.queue_deadline,
        correlation_id: correlation.0.clone(),
    };
    let ticket = match state.scheduler.submit(demand).await {
        Ok(ticket) => ticket,
        Err(error) => {
            state.metrics.reject(error.code());
            return error.native_response();
        }
    };
    let id = format!("t-{:016x}", rand::random::<u64>());
    let handle = state.tasks.create(&id, &task.model);
    let reply = json!({
        "task_id": id,
        "queue_position": ticket.position,
        "predicted_start_ms": ticket.predicted_start.as_millis() as u64,
        "streams": {"events": format!("/v2/tasks/{id}/events")},
    });
    state.tasks.sweep();
    tokio::spawn(run(state, correlation.0, task, ticket, handle));
    (StatusCode::ACCEPTED, Json(reply)).into_response()
}

async fn run(
    state: AppState,
    correlation: String,
    task: ValidTask,
    mut ticket: Ticket,
    handle: Arc<TaskHandle>,
) {
    let received = Instant::now();
    let placed = tokio::select! {
        () = handle.cancel.cancelled() => {
            handle.fail(&ApiError::Cancelled);
            state.metrics.cancellations.inc();
            return;
        }
        placed = &mut ticket.placed => placed,
    };
    let placed = match placed {
        Ok(Ok(placed)) => placed,
        Ok(Err(error)) => return handle.fail(&error),
        Err(_) => return handle.fail(&ApiError::Internal("the scheduler dropped a task".into())),
    };
    let queue_ms = placed.queued_for.as_millis() as u64;
    handle.push(
        "started",
        json!({"queue_ms": queue_ms, "pool_id": placed.lease.lease().pool}),
    );
    state.metrics.in_flight.inc();
    let outcome = tokio::select! {
        () = handle.cancel.cancelled() => Err(ApiError::Cancelled),
        outcome = generate(&state, &correlation, &task, &placed, &handle, received) => outcome,
    };
    if let Some(session) = &task.session {
        let tokens = outcome.as_ref().map_or(0, |used| *used);
        state.sessions.end_turn(session, tokens, Instant::now());
    }
    let outcome = outcome.map(|_| ());
    state.metrics.in_flight.dec();
    let release = match &outcome {
        Ok(()) => ReleaseOutcome::Completed,
        Err(ApiError::Cancelled) => {
            state.metrics.cancellations.inc();
            ReleaseOutcome::Cancelled
        }
        Err(_) => ReleaseOutcome::Failed,
    };
    // The engine stream is gone by now (it lived in `generate`): the slot can come back.
    let pool = placed.lease.lease().pool.clone();
    let started = Instant::now();
    let Placed { lease, .. } = placed;
    if let Err(error) = lease.release(release).await {
        tracing::warn!(%pool, %error, "lease release failed; the connection's close returns it");
    }
    state
        .scheduler
        .served(task.session.clone().map(|s| (s, pool)), started.elapsed());
    if let Err(error) = outcome {
        handle.fail(&error);
    }
}

/// Streams the generation into the task's events; returns when it ended.
async fn generate(
    state: &AppState,
    correlation: &str,
    task: &ValidTask,
    placed: &Placed,
    handle: &TaskHandle,
    received: Instant,
) -> Result<u64, ApiError> {
    let lease = placed.lease.lease();
    let (route, body) = match lease.engine {
        EngineKind::Llamacpp => (
            EngineRoute::Completion,
            json!({"prompt": task.prompt, "n_predict": task.max_tokens, "stream": true}),
        ),
        EngineKind::Openai => (
            EngineRoute::Completions,
            json!({
                "model": task.model, "prompt": task.prompt, "max_tokens": task.max_tokens,
                "stream": true, "stream_options": {"include_usage": true},
            }),
        ),
    };
    let request = EngineRequest::new(
        lease.endpoint.clone(),
        lease.engine,
        route,
        Bytes::from(body.to_string()),
    );
    let decode_started = Instant::now();
    let mut stream = state
        .engines
        .stream(request, state.config.get().decode_stall, correlation)
        .await
        .map_err(map_adapter)?;
    let mut index = 0u32;
    let mut first_token = None;
    loop {
        match stream.next().await {
            Some(Ok(EngineEvent::Chunk {
                token_text, tokens, ..
            })) => {
                if tokens == 0 {
                    continue;
                }
                first_token.get_or_insert_with(|| received.elapsed());
                handle.push(
                    "token",
                    json!({"t": token_text.unwrap_or_default(), "i": index}),
                );
                index += 1;
            }
            Some(Ok(EngineEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                ..
            })) => {
                let decode_ms = decode_started.elapsed().as_millis() as u64;
                state
                    .metrics
                    .tokens_in
                    .inc_by(u64::from(prompt_tokens.unwrap_or(0)));
                state
                    .metrics
                    .tokens_out
                    .inc_by(u64::from(completion_tokens.unwrap_or(index)));
                handle.push(
                    "metrics",
                    json!({
                        "queue_ms": placed.queued_for.as_millis() as u64,
                        "ttft_ms": first_token.map(|d| d.as_millis() as u64),
                        "prompt_tokens": prompt_tokens,
                        "finish_reason": finish_reason,
                    }),
                );
                handle.push("end", json!({"tokens_out": index, "decode_ms": decode_ms}));
                let used = u64::from(prompt_tokens.unwrap_or(0))
                    + u64::from(completion_tokens.unwrap_or(index));
                return Ok(used);
            }
            Some(Err(error)) => return Err(map_adapter(error)),
            None => {
                return Err(ApiError::WorkerReset(
                    "the engine stream ended early".into(),
                ));
            }
        }
    }
}

fn map_adapter(error: AdapterError) -> ApiError {
    crate::api::openai::adapter_error(error)
}

pub async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(handle) = state.tasks.get(&id) else {
        return ApiError::TaskNotFound(id).native_response();
    };
    let keepalive = state.config.get().keepalive;
    let stream = futures_util::stream::unfold(
        (handle, 0usize, false),
        move |(handle, from, ended)| async move {
            if ended {
                return None;
            }
            match tokio::time::timeout(keepalive, handle.events_from(from)).await {
                Err(_) => Some((
                    Ok::<Bytes, Infallible>(Bytes::from_static(sse::KEEP_ALIVE)),
                    (handle, from, false),
                )),
                Ok((events, ended)) => {
                    let mut frame = String::new();
                    for event in &events {
                        sse::push_named(&mut frame, event.name, &event.data.to_string());
                    }
                    let next = from + events.len();
                    Some((Ok(Bytes::from(frame)), (handle, next, ended)))
                }
            }
        },
    );
    sse::response(stream)
}

pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(handle) = state.tasks.get(&id) else {
        return ApiError::TaskNotFound(id).native_response();
    };
    handle.cancel.cancel();
    (
        StatusCode::ACCEPTED,
        Json(json!({"task_id": id, "cancelled": true})),
    )
        .into_response()
}

pub async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.tasks.get(&id) {
        Some(handle) => Json(handle.status(&id)).into_response(),
        None => ApiError::TaskNotFound(id).native_response(),
    }
}

/// `GET /v2/sessions/{id}`: turns and tokens used, limits, time left.
pub async fn session(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.sessions.view(&id, Instant::now()) {
        Some(view) => Json(view).into_response(),
        None => session_not_found(&id),
    }
}

/// `DELETE /v2/sessions/{id}`: forgets the session (its budget starts afresh).
pub async fn delete_session(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if state.sessions.delete(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        session_not_found(&id)
    }
}

fn session_not_found(id: &str) -> Response {
    let mut response =
        ApiError::InvalidParams(format!("session {id:?} not found")).native_response();
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// `GET /v2/meta/capabilities`.
pub async fn capabilities(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "api_version": "2",
        "apis": ["openai-v1", "tasks-v2"],
        "engines": ["llamacpp", "openai"],
        "priorities": ["interactive", "batch"],
        "max_tokens_limit": MAX_TOKENS_LIMIT,
        "queue": {
            "capacity": state.config.get().admission.capacity,
            "full_policy": state.config.get().admission.full_policy,
            "default_deadline_ms": state.config.get().queue_deadline.as_millis() as u64,
        },
        "events": ["started", "token", "metrics", "end", "error"],
    }))
}
