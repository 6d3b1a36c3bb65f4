//! The OpenAI-compatible API: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/rerank` (and llama.cpp's `/v1/reranking`), `/v1/responses`, the token counters
//! `/v1/responses/input_tokens` and `/v1/chat/completions/input_tokens`, and `GET /v1/models`.
//!
//! Each handler checks the few members orchestratord needs (`validate`) and hands the request to
//! the one request lifecycle (`lifecycle`), routed by its `model` to pools whose engine serves its
//! API. The body goes to the engine as the client sent it; the only change is that a streaming chat
//! or completion asks for `stream_options.include_usage` (the usage chunk is passed on only when
//! the client asked for it). Non-streaming requests go to the engine non-streaming and its answer
//! comes back as it is, its top-level `model` naming the id the client asked for. Errors are in
//! OpenAI's shape.

use crate::adapters::EngineRoute;
use crate::api::validate::{self, invalid};
use crate::app::{AppState, Inbound};
use crate::error::{ApiError, ErrorShape};
use crate::json_object::{self, TopLevel};
use crate::lifecycle::{self, EngineCall, Exchange, Reply};
use crate::placement::{self, SlotNeed};
use crate::sse::StreamFormat;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use pool_ipc::registry::ApiEndpoint;
use serde_json::{Value, json};

/// A validated OpenAI request: what to run and how to answer.
#[derive(Debug)]
pub struct ValidRequest {
    pub exchange: Exchange,
    pub reply: Reply,
}

/// What a handler knows before reading the body.
struct Context {
    inbound: Inbound,
    queue_deadline: std::time::Duration,
}

impl Context {
    fn exchange(
        &self,
        model: String,
        api: ApiEndpoint,
        call: EngineCall,
        slots: Option<SlotNeed>,
    ) -> Exchange {
        Exchange::interactive(&self.inbound, self.queue_deadline, model, api, call, slots)
    }
}

/// How many sequences a chat or completion request runs at once: llama.cpp's `n_cmpl`, else `n`.
fn parallel(top: &TopLevel<'_>) -> Result<u32, ApiError> {
    let n = validate::positive(top, "n")?;
    let n_cmpl = validate::positive(top, "n_cmpl")?;
    Ok(n_cmpl.or(n).unwrap_or(1))
}

/// The streaming body of a chat or completion: the client's, asking for the usage chunk.
fn streaming_body(top: &mut TopLevel<'_>) -> Result<(Bytes, bool), ApiError> {
    validate::optional_object(top, "stream_options")?;
    let mut options = match top.get("stream_options").map(|raw| raw.get().to_owned()) {
        Some(text) if text != "null" => text,
        _ => "{}".to_owned(),
    };
    let mut parsed = TopLevel::parse(options.as_bytes())
        .map_err(|_| invalid("'stream_options' must be an object"))?;
    let include_usage = validate::boolean(&parsed, "include_usage")
        .map_err(|_| invalid("'stream_options.include_usage' must be a boolean"))?
        .unwrap_or(false);
    parsed.set(
        "include_usage",
        json_object::raw("true".into()).map_err(internal)?,
    );
    options = String::from_utf8(parsed.to_vec()).map_err(internal)?;
    top.set(
        "stream_options",
        json_object::raw(options).map_err(internal)?,
    );
    Ok((Bytes::from(top.to_vec()), include_usage))
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("re-encoding a request: {error}"))
}

/// Chat or text completion.
fn generation(context: &Context, body: &Bytes, chat: bool) -> Result<ValidRequest, ApiError> {
    let mut top = validate::object(body)?;
    let model = validate::model(&top)?;
    let inputs = if chat {
        validate::objects(&top, "messages")?;
        1
    } else {
        validate::inputs(
            &top,
            "prompt",
            "a string, an array of strings, an array of token ids or an array of those",
        )?
    };
    let stream = validate::stream(&top)?;
    // Integers: llama.cpp takes -1 for "until the context is full"; the engine judges the value.
    validate::integers(&top, &["max_tokens", "max_completion_tokens", "n_predict"])?;
    let parallel = parallel(&top)?;
    let slots = SlotNeed {
        parallel,
        total: parallel.saturating_mul(inputs),
    };
    let (api, route) = if chat {
        (ApiEndpoint::ChatCompletions, EngineRoute::ChatCompletions)
    } else {
        (ApiEndpoint::Completions, EngineRoute::Completions)
    };
    let (call, reply) = if stream {
        let (body, include_usage) = streaming_body(&mut top)?;
        (
            EngineCall::Stream { route, body },
            Reply::Stream {
                format: StreamFormat::OpenAiChunks,
                include_usage,
            },
        )
    } else {
        (whole(api, body), Reply::Whole)
    };
    Ok(ValidRequest {
        exchange: context.exchange(model, api, call, Some(slots)),
        reply,
    })
}

fn whole(api: ApiEndpoint, body: &Bytes) -> EngineCall {
    EngineCall::Whole {
        path: api.path(),
        body: body.clone(),
    }
}

fn embeddings(context: &Context, body: &Bytes) -> Result<ValidRequest, ApiError> {
    let top = validate::object(body)?;
    let model = validate::model(&top)?;
    let inputs = validate::inputs(
        &top,
        "input",
        "a string, an array of strings, an array of token ids or an array of those",
    )?;
    let slots = SlotNeed {
        parallel: 1,
        total: inputs,
    };
    Ok(ValidRequest {
        exchange: context.exchange(
            model,
            ApiEndpoint::Embeddings,
            whole(ApiEndpoint::Embeddings, body),
            Some(slots),
        ),
        reply: Reply::Whole,
    })
}

fn rerank(context: &Context, body: &Bytes, path: &'static str) -> Result<ValidRequest, ApiError> {
    let top = validate::object(body)?;
    let model = validate::model(&top)?;
    validate::string(&top, "query")?;
    let documents = validate::strings(&top, "documents")?;
    validate::positive(&top, "top_n")?;
    let slots = SlotNeed {
        parallel: 1,
        total: documents,
    };
    let call = EngineCall::Whole {
        path,
        body: body.clone(),
    };
    Ok(ValidRequest {
        exchange: context.exchange(model, ApiEndpoint::Rerank, call, Some(slots)),
        reply: Reply::Whole,
    })
}

/// The Responses API's `input`: a string or a non-empty array (of messages or content parts).
fn responses_input(top: &TopLevel<'_>) -> Result<(), ApiError> {
    match top.get("input").map(|raw| raw.get()) {
        None | Some("null") => Err(invalid("'input' is required")),
        Some(text) if text.starts_with('"') => Ok(()),
        Some(text) if text.starts_with('[') => {
            match serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text) {
                Ok(items) if !items.is_empty() => Ok(()),
                _ => Err(invalid("'input' must not be empty")),
            }
        }
        Some(_) => Err(invalid("'input' must be a string or an array")),
    }
}

fn responses(context: &Context, body: &Bytes) -> Result<ValidRequest, ApiError> {
    let top = validate::object(body)?;
    let model = validate::model(&top)?;
    responses_input(&top)?;
    validate::positive(&top, "max_output_tokens")?;
    let (call, reply) = if validate::stream(&top)? {
        (
            EngineCall::Stream {
                route: EngineRoute::Responses,
                body: body.clone(),
            },
            Reply::Stream {
                format: StreamFormat::ResponsesEvents,
                include_usage: true,
            },
        )
    } else {
        (whole(ApiEndpoint::Responses, body), Reply::Whole)
    };
    Ok(ValidRequest {
        exchange: context.exchange(model, ApiEndpoint::Responses, call, Some(SlotNeed::ONE)),
        reply,
    })
}

/// A token counter: answered by a ready engine at once, taking no slot.
fn counter(context: &Context, body: &Bytes, api: ApiEndpoint) -> Result<ValidRequest, ApiError> {
    let top = validate::object(body)?;
    let model = validate::model(&top)?;
    match api {
        ApiEndpoint::ResponsesInputTokens => responses_input(&top)?,
        _ => {
            validate::objects(&top, "messages")?;
        }
    }
    Ok(ValidRequest {
        exchange: context.exchange(model, api, whole(api, body), None),
        reply: Reply::Whole,
    })
}

/// The OpenAI routes whose body is checked before the request is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/rerank`.
    Rerank,
    /// `POST /v1/reranking` (llama.cpp's name for the same).
    Reranking,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/responses/input_tokens`.
    ResponsesInputTokens,
    /// `POST /v1/chat/completions/input_tokens`.
    ChatInputTokens,
}

/// Checks the body `inbound` brought to `route`, exactly as that route's handler does before
/// queueing anything: what to run and how to answer, or the typed error the client gets. Pure and
/// total on any bytes (the `openai_validator` fuzz target drives it).
pub fn check(
    route: Route,
    inbound: Inbound,
    queue_deadline: std::time::Duration,
) -> Result<ValidRequest, ApiError> {
    let body = inbound.body.clone();
    let context = Context {
        inbound,
        queue_deadline,
    };
    match route {
        Route::ChatCompletions => generation(&context, &body, true),
        Route::Completions => generation(&context, &body, false),
        Route::Embeddings => embeddings(&context, &body),
        Route::Rerank => rerank(&context, &body, "/v1/rerank"),
        Route::Reranking => rerank(&context, &body, "/v1/reranking"),
        Route::Responses => responses(&context, &body),
        Route::ResponsesInputTokens => counter(&context, &body, ApiEndpoint::ResponsesInputTokens),
        Route::ChatInputTokens => counter(&context, &body, ApiEndpoint::ChatCompletionsInputTokens),
    }
}

async fn serve(state: AppState, inbound: Inbound, route: Route) -> Response {
    let queue_deadline = state.config.get().queue_deadline;
    match check(route, inbound, queue_deadline) {
        Ok(request) => {
            lifecycle::serve(&state, request.exchange, ErrorShape::OpenAi, request.reply).await
        }
        Err(error) => error.response(ErrorShape::OpenAi),
    }
}

pub async fn chat_completions(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::ChatCompletions).await
}

pub async fn completions(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::Completions).await
}

pub async fn embeddings_handler(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::Embeddings).await
}

pub async fn rerank_handler(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::Rerank).await
}

pub async fn reranking_handler(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::Reranking).await
}

pub async fn responses_handler(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::Responses).await
}

pub async fn responses_input_tokens(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::ResponsesInputTokens).await
}

pub async fn chat_input_tokens(State(state): State<AppState>, inbound: Inbound) -> Response {
    serve(state, inbound, Route::ChatInputTokens).await
}

/// `GET /v1/models`: every model a pool serves, loaded or not (`loaded`: a pool of it is ready;
/// an unloaded one loads on the first request); `created` is when this orchestratord first saw
/// it.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let models = placement::models(&state.mirror.borrow().snapshot);
    let data: Vec<Value> = models
        .into_iter()
        .map(|(id, loaded)| {
            let created = state.models_seen.first_seen(&id);
            json!({"id": id, "object": "model", "created": created, "owned_by": "orchestratord", "loaded": loaded})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn context() -> Context {
        Context {
            inbound: Inbound {
                body: Bytes::new(),
                correlation_id: "c".into(),
                forward: HeaderMap::new(),
                caller: crate::keys::Caller::HOST,
            },
            queue_deadline: std::time::Duration::from_secs(1),
        }
    }

    fn check(body: &str, chat: bool) -> Result<ValidRequest, ApiError> {
        generation(&context(), &Bytes::copy_from_slice(body.as_bytes()), chat)
    }

    #[test]
    fn bad_requests_are_named_and_never_queued() {
        let cases: [(&str, bool, &str); 8] = [
            ("{", true, "invalid JSON"),
            ("[]", true, "JSON object"),
            (
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                true,
                "'model' is required",
            ),
            (r#"{"model":"m","messages":[]}"#, true, "non-empty array"),
            (
                r#"{"model":"m","messages":[{}],"max_tokens":"ten"}"#,
                true,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                true,
                "'stream'",
            ),
            (r#"{"model":"m","messages":[{}],"n":0}"#, true, "'n'"),
            (r#"{"model":"m","prompt":7}"#, false, "'prompt'"),
        ];
        for (body, chat, needle) in cases {
            let error = check(body, chat).unwrap_err();
            assert!(error.to_string().contains(needle), "{needle}: {error}");
        }
    }

    #[test]
    fn a_non_streaming_request_goes_to_the_engine_exactly_as_it_came() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"tools":[{"type":"function"}],"logprobs":true}"#;
        let request = check(body, true).unwrap();
        let EngineCall::Whole { path, body: sent } = &request.exchange.call else {
            panic!("expected a whole request");
        };
        assert_eq!(*path, "/v1/chat/completions");
        assert_eq!(&sent[..], body.as_bytes());
        assert!(matches!(request.reply, Reply::Whole));
    }

    #[test]
    fn a_stream_asks_the_engine_for_usage_and_keeps_everything_else() {
        let request = check(
            r#"{"model":"m","messages":[{}],"stream":true,"stream_options":{"x":1},"seed":42}"#,
            true,
        )
        .unwrap();
        let EngineCall::Stream { body, .. } = &request.exchange.call else {
            panic!("expected a stream");
        };
        assert_eq!(
            std::str::from_utf8(body).unwrap(),
            r#"{"model":"m","messages":[{}],"stream":true,"stream_options":{"x":1,"include_usage":true},"seed":42}"#
        );
        assert!(matches!(
            request.reply,
            Reply::Stream {
                include_usage: false,
                ..
            }
        ));
    }

    #[test]
    fn choices_and_prompt_arrays_reserve_the_slots_they_occupy() {
        let n2 = check(r#"{"model":"m","messages":[{}],"n":2}"#, true).unwrap();
        assert_eq!(
            n2.exchange.slots,
            Some(SlotNeed {
                parallel: 2,
                total: 2
            })
        );
        let batch = check(r#"{"model":"m","prompt":["a","b","c"],"n_cmpl":2}"#, false).unwrap();
        assert_eq!(
            batch.exchange.slots,
            Some(SlotNeed {
                parallel: 2,
                total: 6
            })
        );
        let tokens = check(r#"{"model":"m","prompt":[1,2,3]}"#, false).unwrap();
        assert_eq!(tokens.exchange.slots, Some(SlotNeed::ONE));
    }

    #[test]
    fn embeddings_rerank_and_counters_are_checked_and_counted() {
        let body = |text: &str| Bytes::copy_from_slice(text.as_bytes());
        let batch = embeddings(&context(), &body(r#"{"model":"e","input":["a","b"]}"#)).unwrap();
        assert_eq!(batch.exchange.slots.map(|slots| slots.total), Some(2));
        assert!(embeddings(&context(), &body(r#"{"model":"e","input":[]}"#)).is_err());
        assert!(embeddings(&context(), &body(r#"{"model":"e"}"#)).is_err());
        let ranked = rerank(
            &context(),
            &body(r#"{"model":"r","query":"q","documents":["a","b","c"]}"#),
            "/v1/rerank",
        )
        .unwrap();
        assert_eq!(ranked.exchange.slots.map(|slots| slots.total), Some(3));
        assert!(
            rerank(
                &context(),
                &body(r#"{"model":"r","documents":["a"]}"#),
                "/v1/rerank"
            )
            .is_err()
        );
        let count = counter(
            &context(),
            &body(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#),
            ApiEndpoint::ChatCompletionsInputTokens,
        )
        .unwrap();
        assert_eq!(count.exchange.slots, None);
        assert!(responses(&context(), &body(r#"{"model":"m","input":7}"#)).is_err());
        assert!(responses(&context(), &body(r#"{"model":"m","input":[ ]}"#)).is_err());
        assert!(
            responses(
                &context(),
                &body(r#"{"model":"m","input":[{"role":"user"}]}"#)
            )
            .is_ok()
        );
    }
}
