//! The OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions` (streaming
//! and not) and `GET /v1/models`.
//!
//! The client's JSON is validated (model, messages/prompt, stream, max_tokens, stream_options)
//! and forwarded to the engine as it came, always streaming, so the engine's chunks are relayed
//! without being re-serialised. A streaming client gets `data:` chunks, the usage chunk when it
//! asked (`stream_options.include_usage`), then `data: [DONE]`; once the stream has begun a
//! failure becomes one final error event and no `[DONE]`. While a request waits for a slot
//! longer than the keep-alive interval, `: keep-alive` comments hold the connection open.

use crate::adapters::{AdapterError, EngineEvent, EngineRequest, EngineRoute, EngineStream};
use crate::admission::Priority;
use crate::app::{AppState, CorrelationId};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::placement::{self, PlacementHints};
use crate::scheduler::{Demand, Placed, Ticket};
use crate::sse;
use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use pool_ipc::registry::ReleaseOutcome;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Which OpenAI endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    fn engine_route(self) -> EngineRoute {
        match self {
            Api::Chat => EngineRoute::ChatCompletions,
            Api::Completions => EngineRoute::Completions,
        }
    }
}

/// A validated request: only these reach the queue.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub api: Api,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// What the engine gets: the client's JSON, streaming, usage always on.
    pub engine_body: Bytes,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidParams(message.into())
}

pub fn validate(body: &[u8], api: Api) -> Result<ValidRequest, ApiError> {
    let mut json: Value =
        serde_json::from_slice(body).map_err(|error| invalid(format!("invalid JSON: {error}")))?;
    let object = json
        .as_object_mut()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => return Err(invalid("'model' must be a non-empty string")),
        None => return Err(invalid("'model' is required")),
    };
    match api {
        Api::Chat => match object.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => {
                if messages.iter().any(|message| !message.is_object()) {
                    return Err(invalid("every entry of 'messages' must be an object"));
                }
            }
            Some(_) => return Err(invalid("'messages' must be a non-empty array")),
            None => return Err(invalid("'messages' is required")),
        },
        Api::Completions => match object.get("prompt") {
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) if parts.iter().all(Value::is_string) => {}
            Some(_) => return Err(invalid("'prompt' must be a string or an array of strings")),
            None => return Err(invalid("'prompt' is required")),
        },
    }
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(invalid("'stream' must be a boolean")),
    };
    for field in ["max_tokens", "max_completion_tokens", "n_predict"] {
        match object.get(field) {
            None | Some(Value::Null) => {}
            Some(value) if value.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => return Err(invalid(format!("'{field}' must be a positive integer"))),
        }
    }
    if let Some(n) = object.get("n")
        && n.as_u64() != Some(1)
    {
        return Err(invalid("only n = 1 is supported"));
    }
    let include_usage = match object.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => return Err(invalid("'stream_options.include_usage' must be a boolean")),
        },
        Some(_) => return Err(invalid("'stream_options' must be an object")),
    };
    object.insert("stream".into(), Value::Bool(true));
    object.insert("stream_options".into(), json!({"include_usage": true}));
    let engine_body = serde_json::to_vec(&json)
        .map_err(|error| ApiError::Internal(format!("re-encoding the request: {error}")))?;
    Ok(ValidRequest {
        api,
        model,
        stream,
        include_usage,
        engine_body: Bytes::from(engine_body),
    })
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let models = placement::models(&state.mirror.borrow().snapshot);
    let data: Vec<Value> = models
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "orchestratord"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    body: Bytes,
) -> Response {
    serve(state, correlation, &body, Api::Chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    body: Bytes,
) -> Response {
    serve(state, correlation, &body, Api::Completions).await
}

async fn serve(state: AppState, correlation: CorrelationId, body: &[u8], api: Api) -> Response {
    let received = Instant::now();
    let request = match validate(body, api) {
        Ok(request) => request,
        Err(error) => return error.openai_response(),
    };
    let demand = Demand {
        model: request.model.clone(),
        priority: Priority::Interactive,
        session: None,
        hints: PlacementHints::default(),
        deadline: Instant::now() + state.config.get().queue_deadline,
        correlation_id: correlation.0.clone(),
    };
    let mut ticket = match state.scheduler.submit(demand).await {
        Ok(ticket) => ticket,
        Err(error) => {
            state.metrics.reject(error.code());
            return error.openai_response();
        }
    };
    // Quick outcomes keep their HTTP status; a long wait turns into a stream with keep-alives.
    let early = tokio::time::timeout(state.config.get().keepalive, &mut ticket.placed).await;
    let placed = match early {
        Ok(Ok(Ok(placed))) => Some(placed),
        Ok(Ok(Err(error))) => return error.openai_response(),
        Ok(Err(_)) => {
            return ApiError::Internal("the scheduler dropped a request".into()).openai_response();
        }
        Err(_) => None,
    };
    if !request.stream {
        let placed = match placed {
            Some(placed) => placed,
            None => match (&mut ticket.placed).await {
                Ok(Ok(placed)) => placed,
                Ok(Err(error)) => return error.openai_response(),
                Err(_) => {
                    return ApiError::Internal("the scheduler dropped a request".into())
                        .openai_response();
                }
            },
        };
        return match complete(&state, &correlation.0, &request, placed).await {
            Ok(body) => Json(body).into_response(),
            Err(error) => error.openai_response(),
        };
    }
    let relay = Relay {
        state,
        correlation: correlation.0,
        request,
        received,
        last_token: None,
        phase: match placed {
            Some(placed) => Phase::Placed(placed),
            None => Phase::Queued(ticket),
        },
    };
    sse::response(futures_util::stream::unfold(
        relay,
        |mut relay| async move {
            relay
                .next_frame()
                .await
                .map(|frame| (Ok::<Bytes, Infallible>(frame), relay))
        },
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

pub fn adapter_error(error: AdapterError) -> ApiError {
    match error.clone() {
        AdapterError::WorkerReset { detail } => {
            tracing::warn!(%detail, "engine stream failed");
            ApiError::WorkerReset(detail)
        }
        AdapterError::DecodeTimeout { after } => ApiError::DecodeTimeout(after),
        AdapterError::EngineRejected { status, body } => ApiError::EngineRejected {
            status,
            message: engine_message(&body),
        },
        AdapterError::Cancelled => ApiError::ShuttingDown,
        AdapterError::UnsupportedRoute { .. } => ApiError::Internal(error.to_string()),
    }
}

/// The engine's own error message, without anything else it may have said.
fn engine_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|json| json["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "the engine refused the request".to_owned())
}

async fn open_stream(
    state: &AppState,
    correlation: &str,
    request: &ValidRequest,
    placed: &Placed,
) -> Result<EngineStream, ApiError> {
    let lease = placed.lease.lease();
    let engine_request = EngineRequest::new(
        lease.endpoint.clone(),
        lease.engine,
        request.api.engine_route(),
        request.engine_body.clone(),
    );
    state
        .engines
        .stream(engine_request, state.config.get().decode_stall, correlation)
        .await
        .map_err(adapter_error)
}

/// Runs a whole generation for a non-streaming client and builds OpenAI's response object.
async fn complete(
    state: &AppState,
    correlation: &str,
    request: &ValidRequest,
    placed: Placed,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let mut stream = open_stream(state, correlation, request, &placed).await?;
    let mut text = String::new();
    let outcome = loop {
        match stream.next().await {
            Some(Ok(EngineEvent::Chunk { token_text, .. })) => {
                text.push_str(token_text.as_deref().unwrap_or(""));
            }
            Some(Ok(EngineEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                ..
            })) => break Ok((finish_reason, prompt_tokens, completion_tokens)),
            Some(Err(error)) => break Err(adapter_error(error)),
            None => {
                break Err(ApiError::WorkerReset(
                    "the engine stream ended early".into(),
                ));
            }
        }
    };
    drop(stream);
    finish(state, placed, started, outcome.is_ok()).await;
    let (finish_reason, prompt_tokens, completion_tokens) = outcome?;
    // Only what the engine reported: an engine that sends no usage in its streams (llama-cpp-python's
    // server) gets `usage: null`, never made-up zeros.
    let usage = match (prompt_tokens, completion_tokens) {
        (Some(prompt), Some(completion)) => json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": u64::from(prompt) + u64::from(completion),
        }),
        _ => Value::Null,
    };
    let created = unix_now();
    Ok(match request.api {
        Api::Chat => json!({
            "id": format!("chatcmpl-{correlation}"),
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        }),
        Api::Completions => json!({
            "id": format!("cmpl-{correlation}"),
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        }),
    })
}

/// Gives the slot back and tells the scheduler how long it was held.
async fn finish(state: &AppState, placed: Placed, started: Instant, completed: bool) {
    let outcome = if completed {
        ReleaseOutcome::Completed
    } else {
        ReleaseOutcome::Failed
    };
    let pool = placed.lease.lease().pool.clone();
    if let Err(error) = placed.lease.release(outcome).await {
        tracing::warn!(%pool, %error, "lease release failed; the connection's close returns it");
    }
    state.scheduler.served(None, started.elapsed());
}

enum Phase {
    Queued(Ticket),
    Placed(Placed),
    Streaming {
        stream: EngineStream,
        placed: Placed,
        started: Instant,
    },
    Finished,
}

/// The body of a streaming response: waits for a slot (sending keep-alives), opens the engine
/// stream, relays its chunks, and ends with `[DONE]` or one error event. Dropping it (the
/// client went away) drops the engine stream, which closes the engine connection and cancels
/// the generation, and the lease guard, which releases the slot.
struct Relay {
    state: AppState,
    correlation: String,
    request: ValidRequest,
    received: Instant,
    last_token: Option<Instant>,
    phase: Phase,
}

impl Drop for Relay {
    /// The client went away before the end: the engine stream and the lease go with `phase`.
    fn drop(&mut self) {
        if !matches!(self.phase, Phase::Finished) {
            self.state.metrics.cancellations.inc();
            if matches!(self.phase, Phase::Streaming { .. }) {
                self.state.metrics.in_flight.dec();
            }
        }
    }
}

fn error_event(error: &ApiError) -> Bytes {
    sse::data(error.openai_body().to_string().as_bytes())
}

impl Relay {
    /// The next bytes for the client, or `None` at the end. The phase stays in `self` across
    /// every await, so a client that leaves mid-await is seen by `Drop`.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            match &mut self.phase {
                Phase::Finished => return None,
                Phase::Queued(ticket) => {
                    let keepalive = self.state.config.get().keepalive;
                    match tokio::time::timeout(keepalive, &mut ticket.placed).await {
                        Err(_) => return Some(Bytes::from_static(sse::KEEP_ALIVE)),
                        Ok(Ok(Ok(placed))) => self.phase = Phase::Placed(placed),
                        Ok(Ok(Err(error))) => return Some(self.fail(&error)),
                        Ok(Err(_)) => {
                            let error =
                                ApiError::Internal("the scheduler dropped a request".into());
                            return Some(self.fail(&error));
                        }
                    }
                }
                Phase::Placed(placed) => {
                    let started = Instant::now();
                    let opened =
                        open_stream(&self.state, &self.correlation, &self.request, placed).await;
                    let Phase::Placed(placed) = std::mem::replace(&mut self.phase, Phase::Finished)
                    else {
                        return None;
                    };
                    match opened {
                        Ok(stream) => {
                            self.state.metrics.in_flight.inc();
                            self.phase = Phase::Streaming {
                                stream,
                                placed,
                                started,
                            };
                        }
                        Err(error) => {
                            finish(&self.state, placed, started, false).await;
                            return Some(error_event(&error));
                        }
                    }
                }
                Phase::Streaming { stream, .. } => {
                    let next = stream.next().await;
                    match next {
                        Some(Ok(EngineEvent::Chunk { raw, tokens, .. })) => {
                            if tokens > 0 {
                                self.token_seen();
                            }
                            return Some(sse::data(&raw));
                        }
                        Some(Ok(EngineEvent::Done {
                            raw_usage,
                            prompt_tokens,
                            completion_tokens,
                            ..
                        })) => {
                            let metrics = &self.state.metrics;
                            metrics
                                .tokens_in
                                .inc_by(u64::from(prompt_tokens.unwrap_or(0)));
                            metrics
                                .tokens_out
                                .inc_by(u64::from(completion_tokens.unwrap_or(0)));
                            Metrics::observe(&metrics.request_duration, self.received.elapsed());
                            self.end_stream(true).await;
                            let mut tail = Vec::new();
                            if self.request.include_usage
                                && let Some(usage) = raw_usage
                            {
                                tail.extend_from_slice(&sse::data(&usage));
                            }
                            tail.extend_from_slice(b"data: [DONE]\n\n");
                            return Some(Bytes::from(tail));
                        }
                        Some(Err(error)) => {
                            self.end_stream(false).await;
                            return Some(error_event(&adapter_error(error)));
                        }
                        None => {
                            self.end_stream(false).await;
                            let error =
                                ApiError::WorkerReset("the engine stream ended early".into());
                            return Some(error_event(&error));
                        }
                    }
                }
            }
        }
    }

    fn token_seen(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => Metrics::observe(&self.state.metrics.time_to_first_token, now - self.received),
            Some(last) => Metrics::observe(&self.state.metrics.inter_token, now - last),
        }
        self.last_token = Some(now);
    }

    /// Closes the engine stream and gives the slot back.
    async fn end_stream(&mut self, completed: bool) {
        if let Phase::Streaming {
            stream,
            placed,
            started,
        } = std::mem::replace(&mut self.phase, Phase::Finished)
        {
            drop(stream);
            self.state.metrics.in_flight.dec();
            finish(&self.state, placed, started, completed).await;
        }
    }

    /// A failure before the stream began: one error event, then the end.
    fn fail(&mut self, error: &ApiError) -> Bytes {
        self.state.metrics.reject(error.code());
        self.phase = Phase::Finished;
        error_event(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_named_and_never_queued() {
        let cases: [(&[u8], Api, &str); 7] = [
            (b"{", Api::Chat, "invalid JSON"),
            (b"[]", Api::Chat, "JSON object"),
            (
                br#"{"messages":[{"role":"user","content":"hi"}]}"#,
                Api::Chat,
                "'model' is required",
            ),
            (
                br#"{"model":"m","messages":[]}"#,
                Api::Chat,
                "non-empty array",
            ),
            (
                br#"{"model":"m","messages":[{}],"max_tokens":-1}"#,
                Api::Chat,
                "max_tokens",
            ),
            (
                br#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                Api::Chat,
                "'stream'",
            ),
            (br#"{"model":"m","prompt":7}"#, Api::Completions, "'prompt'"),
        ];
        for (body, api, needle) in cases {
            let error = validate(body, api).unwrap_err();
            assert!(error.to_string().contains(needle), "{needle}: {error}");
        }
    }

    #[test]
    fn the_engine_always_streams_with_usage_whatever_the_client_asked() {
        let request = validate(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#,
            Api::Chat,
        )
        .unwrap();
        assert!(!request.stream && !request.include_usage);
        let forwarded: Value = serde_json::from_slice(&request.engine_body).unwrap();
        assert_eq!(forwarded["stream"], true);
        assert_eq!(forwarded["stream_options"]["include_usage"], true);
        assert_eq!(forwarded["max_tokens"], 4);
    }
}
