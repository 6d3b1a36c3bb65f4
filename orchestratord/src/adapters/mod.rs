//! Engine adapters: how orchestratord talks to an engine — llama.cpp's `llama-server` or any
//! OpenAI-compatible server — over TCP or a Unix socket, streaming.
//!
//! What lives here: [`EngineClients`] (one pooled HTTP/1.1 client per engine endpoint, and the single
//! retry rule), [`EngineStream`] (one streamed generation: stall detection, cancellation on drop),
//! the pure SSE framing (`sse`) and the two stream dialects (`llamacpp`: native `/completion`;
//! `openai`: `/v1/chat/completions` and `/v1/completions`). Callers build the JSON body; this module
//! never re-serialises it, and hands every engine chunk back with its exact `data:` payload bytes so a
//! relay that speaks the engine's API can forward them untouched.
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

mod clients;
mod connection;
mod llamacpp;
mod openai;
mod sse;
mod stream;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use pool_ipc::registry::{Endpoint, EngineKind};

pub use clients::EngineClients;
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
}

impl EngineRoute {
    /// The request path on the engine.
    pub fn path(self) -> &'static str {
        match self {
            Self::Completion => "/completion",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }

    /// Whether an engine of `kind` serves this route.
    pub fn is_served_by(self, kind: EngineKind) -> bool {
        match (self, kind) {
            (Self::Completion, EngineKind::Llamacpp) => true,
            (Self::Completion, EngineKind::Openai) => false,
            (Self::ChatCompletions | Self::Completions, _) => true,
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
/// `stream_options.include_usage` to get [`EngineEvent::Done`]'s usage) and one choice only (`n` = 1).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub endpoint: Endpoint,
    pub kind: EngineKind,
    pub route: EngineRoute,
    pub body: Bytes,
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
            head_limit: None,
        }
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
    /// One engine chunk, in order.
    Chunk {
        /// The exact `data:` payload bytes (no `data: ` prefix, no blank line), for a relay that
        /// speaks the engine's API to forward without re-serialising.
        raw: Bytes,
        /// The text this chunk adds, when it adds any (`content`, `delta.content` or `text`).
        token_text: Option<String>,
        /// Tokens generated in this chunk: the native event's `tokens` array length; for OpenAI
        /// chunks 1 when the choice carries generated output, else 0 (role-only and finish chunks).
        tokens: u32,
    },
    /// The stream ended at its terminator (native `"stop":true`, OpenAI `[DONE]`). Last event.
    Done {
        /// `length` or `stop` (native `stop_type` limit → length, eos/word → stop; an OpenAI engine's
        /// own value passes through; `stop` when an OpenAI stream named none).
        finish_reason: String,
        /// Native `tokens_evaluated`, or OpenAI `usage.prompt_tokens` when the engine sent usage.
        prompt_tokens: Option<u32>,
        /// Native `tokens_predicted`, or OpenAI `usage.completion_tokens` when the engine sent usage.
        completion_tokens: Option<u32>,
        /// The payload that carried the usage, exactly as sent: OpenAI's usage chunk (the one with
        /// `"choices": []`, which is never yielded as a [`EngineEvent::Chunk`], so a relay forwards it
        /// only to a client that asked for `include_usage`), or the native final `"stop":true` event.
        raw_usage: Option<Bytes>,
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

/// An error with its whole `source()` chain, for [`AdapterError::WorkerReset`] details.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
