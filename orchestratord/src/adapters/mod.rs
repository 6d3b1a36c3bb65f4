//! Engine adapters: how orchestratord talks to an engine — llama.cpp's `llama-server` or any
//! OpenAI-compatible server — over TCP or a Unix socket, streaming.
//!
//! What lives here: [`EngineClients`] (one pooled HTTP/1.1 client per engine endpoint, and the single
//! retry rule), [`EngineStream`] (one streamed generation: stall detection, cancellation on drop),
//! [`WholeAnswer`] (a non-streaming request's answer, read whole within a time limit), the pure SSE
//! framing (`sse`) and the stream dialects (`llamacpp`: native `/completion`; `openai`:
//! `/v1/chat/completions` and `/v1/completions`; `anthropic`: `/v1/messages`; `responses`:
//! `/v1/responses`). Callers build the JSON body; this module never re-serialises it, and hands every
//! engine event back with its exact bytes (the whole SSE event, and its `data:` payload) so a relay
//! that speaks the engine's API can forward it untouched.
//!
//! Invariants a reader must not break:
//! - A generation never runs twice: the only retry is of a request hyper proves the engine never
//!   received whole (see `clients`).
//! - Dropping an [`EngineStream`] (or the future of [`EngineClients::stream`]) closes that engine
//!   connection at once; it never goes back to the pool, so the engine sees its client leave and
//!   cancels the generation. Only a stream read to its terminator returns its connection to the pool.
//! - Every error is one [`AdapterError`]; after an error or [`EngineEvent::Done`] a stream yields
//!   nothing more.
//! - `AdapterError` details are for logs: they may hold engine or OS error text and must be mapped to
//!   a public error code before they reach a client.

mod anthropic;
mod clients;
mod connection;
mod llamacpp;
mod openai;
mod responses;
pub mod sse;
mod stream;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use daemon_support::errors::error_chain;
use hyper::HeaderMap;
use pool_ipc::registry::{Endpoint, EngineKind};

pub use clients::{EngineClients, MAX_WHOLE_ANSWER, WholeAnswer, WholeRequest};
pub use stream::EngineStream;

/// The engine routes a generation can be sent to. The route decides the stream dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineRoute {
    /// llama-server's native `POST /completion`: ends with a `"stop":true` event, no `[DONE]`.
    /// Only [`EngineKind::Llamacpp`] serves it.
    Completion,
    /// OpenAI `POST /v1/chat/completions`: chunks, then `data: [DONE]`.
    ChatCompletions,
    /// OpenAI `POST /v1/completions`: chunks, then `data: [DONE]`.
    Completions,
    /// Anthropic `POST /v1/messages`: named events ending with `message_stop`, no `[DONE]`.
    Messages,
    /// OpenAI `POST /v1/responses`: named events ending with `response.completed` (or
    /// `response.incomplete`, `response.failed`), no `[DONE]`.
    Responses,
}

impl EngineRoute {
    /// The request path on the engine.
    pub fn path(self) -> &'static str {
        match self {
            Self::Completion => "/completion",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Messages => "/v1/messages",
            Self::Responses => "/v1/responses",
        }
    }

    /// Whether an engine of `kind` serves this route.
    pub fn is_served_by(self, kind: EngineKind) -> bool {
        match (self, kind) {
            (Self::Completion, EngineKind::Llamacpp) => true,
            (Self::Completion, EngineKind::Openai) => false,
            (Self::ChatCompletions | Self::Completions | Self::Messages | Self::Responses, _) => {
                true
            }
        }
    }
}

impl fmt::Display for EngineRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// One generation to stream from an engine. `body` is the JSON the engine receives, already built by
/// the caller; it must ask for a stream (`"stream": true`; on OpenAI routes the caller may add
/// `stream_options.include_usage` to get [`EngineEvent::Done`]'s usage). Only the first choice's
/// text is decoded into [`EngineEvent::Chunk::token_text`]; every chunk is handed back whole.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub endpoint: Endpoint,
    pub kind: EngineKind,
    pub route: EngineRoute,
    pub body: Bytes,
    /// Client headers the engine may use (trace context, API versions), added to the request.
    pub headers: HeaderMap,
    /// How long to wait for the engine's response head: connect, queueing inside the engine and
    /// prompt processing, since llama-server answers only once the prompt is accepted. `None`: the
    /// stall limit given to [`EngineClients::stream`].
    pub head_limit: Option<Duration>,
}

impl EngineRequest {
    pub fn new(endpoint: Endpoint, kind: EngineKind, route: EngineRoute, body: Bytes) -> Self {
        Self {
            endpoint,
            kind,
            route,
            body,
            headers: HeaderMap::new(),
            head_limit: None,
        }
    }

    /// Adds `headers` to the engine request.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Bounds the wait for the response head separately from the stall limit (a long prompt).
    #[must_use]
    pub fn with_head_limit(mut self, limit: Duration) -> Self {
        self.head_limit = Some(limit);
        self
    }
}

/// What an [`EngineStream`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// One engine event, in order.
    Chunk {
        /// The whole SSE event exactly as sent (`event:` line, `data:` line, blank line), for a relay
        /// that speaks the engine's API to forward without re-serialising.
        frame: Bytes,
        /// The event's exact `data:` payload bytes (no `data: ` prefix, no blank line).
        data: Bytes,
        /// The text this chunk adds, when it adds any (`content`, `delta.content`, `text`, an
        /// Anthropic `text_delta`, a Responses `output_text` delta).
        token_text: Option<String>,
        /// Tokens generated in this chunk: the native event's `tokens` array length; otherwise 1
        /// when the event carries generated output (text, reasoning, tool-call arguments), else 0
        /// (role-only, finish and bookkeeping events).
        tokens: u32,
        /// An OpenAI choice's finish chunk that adds no output (a finish reason and an empty
        /// delta or text): the stream's end follows it, so a relay may hold it for that end.
        closes_choice: bool,
    },
    /// The stream ended at its terminator (native `"stop":true`, OpenAI `[DONE]`, Anthropic
    /// `message_stop`, Responses `response.completed`/`incomplete`/`failed`). Last event.
    Done {
        /// `length` or `stop` for native and OpenAI streams (native `stop_type` limit → length,
        /// eos/word → stop; an OpenAI engine's own value passes through; `stop` when an OpenAI
        /// stream named none); Anthropic's `stop_reason`; the Responses status.
        finish_reason: String,
        /// Prompt tokens, when the engine reported them (native `tokens_evaluated`, OpenAI
        /// `usage.prompt_tokens`, Anthropic/Responses `input_tokens`).
        prompt_tokens: Option<u32>,
        /// Generated tokens, when the engine reported them (native `tokens_predicted`, OpenAI
        /// `usage.completion_tokens`, Anthropic/Responses `output_tokens`).
        completion_tokens: Option<u32>,
        /// OpenAI's usage chunk (the one with `"choices": []`; with `n` > 1 llama-server sends one
        /// per choice, kept in order), exactly as sent. It is never yielded as a
        /// [`EngineEvent::Chunk`], so a relay forwards it only to a client that asked for
        /// `include_usage`.
        usage_frame: Option<Bytes>,
        /// The terminating event exactly as sent (`data: [DONE]`, native final event,
        /// `message_stop`, `response.completed`, ...), for a relay to forward.
        terminator: Bytes,
    },
}

/// Why a call to an engine failed. One enum for this boundary; callers map it to public codes
/// (`WORKER_RESET`, `DECODE_TIMEOUT`, …) in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    /// The engine could not be reached, closed or reset the connection, ended the stream before its
    /// terminator, sent a malformed stream, or reported an error mid-stream.
    #[error("engine connection lost: {detail}")]
    WorkerReset { detail: String },
    /// No bytes arrived from the engine for longer than the limit.
    #[error("engine sent nothing for {after:?}")]
    DecodeTimeout { after: Duration },
    /// The engine answered an error status before streaming; `body` is its (JSON) body, e.g. 400
    /// `exceed_context_size_error`, truncated to 64 KiB.
    #[error("engine rejected the request with status {status}")]
    EngineRejected { status: u16, body: String },
    /// The clients' shutdown token ([`EngineClients::new`]) was cancelled while the request was in
    /// flight; its connection was closed.
    #[error("engine request cancelled by shutdown")]
    Cancelled,
    /// The route does not exist on that kind of engine (a caller bug; nothing was sent).
    #[error("route {route} is not served by {} engines", .kind.name())]
    UnsupportedRoute {
        kind: EngineKind,
        route: EngineRoute,
    },
}

/// Token usage as Anthropic's and the Responses API's events report it.
#[derive(Debug, serde::Deserialize)]
struct TokenUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

/// How much of an engine's own error text goes into a detail or a rejection body.
const MAX_ENGINE_TEXT: usize = 64 * 1024;

/// An error the engine reported inside a stream (llama-server's `error:` event, or a chunk with an
/// `error` member): the generation failed after the stream started.
fn engine_reported(payload: &[u8]) -> AdapterError {
    let shown = &payload[..payload.len().min(MAX_ENGINE_TEXT)];
    AdapterError::WorkerReset {
        detail: format!(
            "engine reported an error mid-stream: {}",
            String::from_utf8_lossy(shown)
        ),
    }
}
