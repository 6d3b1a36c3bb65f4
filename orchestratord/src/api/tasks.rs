//! The native task API: `POST /v2/tasks` (202 with the task id, queue position, predicted
//! start and the event stream's URL), `GET /v2/tasks/{id}/events` (SSE: `started`, `token
//! {t,i}`, `metrics`, then `end {tokens_out, decode_ms}` or `error {code, message, retriable,
//! retry_after_ms}`; `retry {retries}` and `started` again when an engine failed before the
//! first token and the task went to another pool), `POST /v2/tasks/{id}/cancel` and `GET /v2/tasks/{id}`. A task runs once
//! admitted, whether or not its events are read; cancelling it (or its deadline passing in the
//! queue) ends it with one `error` event and releases its slot at once.

use crate::adapters::EngineEvent;
use crate::admission::Priority;
use crate::app::{AppState, Inbound};
use crate::error::ApiError;
use crate::keys::Caller;
use crate::lifecycle::{EngineCall, Exchange, Lifecycle, Next, Opened};
use crate::placement::{PlacementHints, SlotNeed};
use crate::sse;
use crate::tasks::TaskHandle;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pool_ipc::registry::{ApiEndpoint, PoolId};
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

pub async fn create(State(state): State<AppState>, inbound: Inbound) -> Response {
    let task = match validate(&inbound.body, state.config.get().queue_deadline) {
        Ok(task) => task,
        Err(error) => return error.native_response(),
    };
    let exchange = Exchange {
        model: task.model.clone(),
        api: ApiEndpoint::Completions,
        call: EngineCall::Task {
            prompt: task.prompt,
            max_tokens: task.max_tokens,
        },
        slots: Some(SlotNeed::ONE),
        priority: task.priority,
        session: task.session,
        hints: task.hints,
        queue_deadline: task.queue_deadline,
        headers: inbound.forward,
        correlation_id: inbound.correlation_id,
        caller: inbound.caller,
    };
    let life = match Lifecycle::admit(&state, exchange).await {
        Ok(life) => life,
        Err(error) => return error.native_response(),
    };
    let (position, predicted_start) = life.ticket().map_or((0, Duration::ZERO), |ticket| {
        (ticket.position, ticket.predicted_start)
    });
    let id = format!("t-{:016x}", rand::random::<u64>());
    let handle = state.tasks.create(&id, &task.model);
    let reply = json!({
        "task_id": id,
        "queue_position": position,
        "predicted_start_ms": predicted_start.as_millis() as u64,
        "streams": {"events": format!("/v2/tasks/{id}/events")},
    });
    state.tasks.sweep(std::time::Instant::now());
    tokio::spawn(run(life, handle, state.config.get().unattended_grace));
    (StatusCode::ACCEPTED, Json(reply)).into_response()
}

/// Runs an admitted task to its end, whether or not anyone reads its events; a cancel ends it
/// at once (dropping `life` closes the engine connection and releases the lease).
async fn run(mut life: Lifecycle, handle: Arc<TaskHandle>, grace: Duration) {
    let outcome = tokio::select! {
        () = handle.cancel.cancelled() => Err(ApiError::Cancelled),
        () = handle.unattended_for(grace) => Err(ApiError::Unattended(grace)),
        outcome = generate(&mut life, &handle) => outcome,
    };
    drop(life);
    if let Err(error) = outcome {
        handle.fail(&error);
    }
}

/// Waits for the slot, then streams the generation into the task's events.
async fn generate(life: &mut Lifecycle, handle: &TaskHandle) -> Result<(), ApiError> {
    let mut started = begin(life, handle).await?;
    let mut first_token = None;
    let mut index = 0u32;
    while let Some(event) = life.next_event().await {
        let event = match event? {
            Next::Event(event) => event,
            Next::Requeued => {
                handle.push("retry", json!({"retries": life.retries()}));
                started = begin(life, handle).await?;
                continue;
            }
        };
        match event {
            EngineEvent::Chunk {
                token_text, tokens, ..
            } => {
                if tokens == 0 {
                    continue;
                }
                first_token.get_or_insert_with(|| started.elapsed());
                handle.push(
                    "token",
                    json!({"t": token_text.unwrap_or_default(), "i": index}),
                );
                index += 1;
            }
            EngineEvent::Done {
                finish_reason,
                prompt_tokens,
                ..
            } => {
                let queue_ms = life
                    .placement()
                    .map(|placement| placement.queued_for.as_millis() as u64);
                handle.push(
                    "metrics",
                    json!({
                        "queue_ms": queue_ms,
                        "ttft_ms": first_token.map(|d| d.as_millis() as u64),
                        "prompt_tokens": prompt_tokens,
                        "finish_reason": finish_reason,
                    }),
                );
                let decode_ms = started.elapsed().as_millis() as u64;
                handle.push("end", json!({"tokens_out": index, "decode_ms": decode_ms}));
                // After `end`: a cancel arriving now cannot turn a finished task into a failed one.
                life.release().await;
                return Ok(());
            }
        }
    }
    Err(ApiError::WorkerReset(
        "the engine stream ended early".into(),
    ))
}

/// Waits for the slot (`started` says where) and opens the engine stream; an engine that fails
/// before answering sends the task to another pool (`retry`, then `started` again). The stream's
/// opening time.
async fn begin(life: &mut Lifecycle, handle: &TaskHandle) -> Result<Instant, ApiError> {
    loop {
        life.placed().await?;
        if let Some(placement) = life.placement() {
            handle.push(
                "started",
                json!({"queue_ms": placement.queued_for.as_millis() as u64, "pool_id": placement.pool}),
            );
        }
        let opening = Instant::now();
        match life.open_stream().await? {
            Opened::Streaming => return Ok(opening),
            Opened::Requeued => handle.push("retry", json!({"retries": life.retries()})),
        }
    }
}

pub async fn events(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(handle) = state.tasks.get(&id) else {
        return ApiError::TaskNotFound(id).native_response();
    };
    let keepalive = state.config.get().keepalive;
    let reader = handle.attach();
    let stream = futures_util::stream::unfold(
        (handle, 0usize, false, reader),
        move |(handle, from, ended, reader)| async move {
            if ended {
                return None;
            }
            match tokio::time::timeout(keepalive, handle.events_from(from)).await {
                Err(_) => Some((
                    Ok::<Bytes, Infallible>(Bytes::from_static(sse::KEEP_ALIVE)),
                    (handle, from, false, reader),
                )),
                Ok((events, ended)) => {
                    let mut frame = String::new();
                    for event in &events {
                        sse::push_named(&mut frame, event.name, &event.data.to_string());
                    }
                    let next = from + events.len();
                    Some((Ok(Bytes::from(frame)), (handle, next, ended, reader)))
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
pub async fn session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    match state.sessions.view(&id, &caller, Instant::now()) {
        Some(view) => Json(view).into_response(),
        None => session_not_found(&id),
    }
}

/// `DELETE /v2/sessions/{id}`: forgets the session (its budget starts afresh).
pub async fn delete_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    if state.sessions.delete(&id, &caller) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        session_not_found(&id)
    }
}

fn session_not_found(id: &str) -> Response {
    ApiError::SessionNotFound(id.to_owned()).native_response()
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
