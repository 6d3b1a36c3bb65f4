//! The OpenTelemetry spans of one request (docs/operations.md, "Tracing"). They exist only when
//! `otlp_endpoint` is configured: otherwise a [`Lifecycle`](crate::lifecycle::Lifecycle) holds no
//! [`RequestTrace`], each step of the request checks that once, and no span, context or header
//! is made. Nothing here runs per relayed chunk: the first token is one event, the rest of the
//! stream none.
//!
//! The tree of one request:
//! - `request` (server): the whole request, a child of the client's span when the client sent a
//!   valid W3C `traceparent`, else a root; its attributes say how it ended;
//!   - `admission`: the admission decision (host drained, key limits, queue full, unknown model);
//!   - `queue` (one per wait for a slot): until the request holds its lease;
//!     - `acquire` (client; made by the scheduler, one per Acquire round trip): its
//!       `traceparent` goes to pool-managerd in the Acquire, whose own `acquire` span is its child;
//!   - `engine` (client; one per engine attempt): the engine request, whose `traceparent` replaces
//!     the client's in the request to the engine; events `response_head` (the engine's status)
//!     and `first_token`.
//!
//! Spans end in the batch exporter's queue (`daemon_support::trace_export`), never waiting for
//! the collector.

use crate::admission::Priority;
use crate::error::ApiError;
use axum::http::HeaderMap;
use daemon_support::trace_export::{self, Tracer};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use pool_ipc::client::{ClientError, LeaseGuard};
use pool_ipc::registry::{ApiEndpoint, EngineKind, PoolId};

/// How a request ended, as its `request` span says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// What the request span's end records besides the outcome.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub retries: u32,
}

/// The open spans of one request. Each is a [`Context`] holding its span, so that children can
/// hang on it; a span ends when its step does, or when this is dropped.
#[derive(Debug)]
pub struct RequestTrace {
    tracer: Tracer,
    request: Context,
    admission: Option<Context>,
    queue: Option<Context>,
    engine: Option<Context>,
    first_token_seen: bool,
}

impl RequestTrace {
    /// Opens the `request` span (a child of the client's span when `client_headers` name one)
    /// and its `admission` span.
    pub fn begin(
        tracer: &Tracer,
        client_headers: &HeaderMap,
        api: ApiEndpoint,
        model: &str,
        priority: Priority,
        correlation_id: &str,
    ) -> RequestTrace {
        let parent = trace_export::parent_from_headers(client_headers).unwrap_or_default();
        let request = tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("orchestratord.api", api.path()),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new(
                    "orchestratord.priority",
                    match priority {
                        Priority::Interactive => "interactive",
                        Priority::Batch => "batch",
                    },
                ),
                KeyValue::new("correlation_id", correlation_id.to_owned()),
            ])
            .start_with_context(tracer, &parent);
        let request = parent.with_span(request);
        let admission = child(tracer, &request, "admission", SpanKind::Internal);
        RequestTrace {
            tracer: tracer.clone(),
            request,
            admission: Some(admission),
            queue: None,
            engine: None,
            first_token_seen: false,
        }
    }

    /// The request was admitted.
    pub fn admitted(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.span().end();
        }
    }

    /// The request was refused at admission: both spans end with the reason.
    pub fn refused(mut self, error: &ApiError) {
        if let Some(admission) = self.admission.take() {
            fail(&admission, error);
            admission.span().end();
        }
        self.failed(error);
        self.end(Outcome::Failed, Usage::default());
    }

    /// A wait for a slot begins (at admission, or again after an engine failed before
    /// answering): a `queue` span.
    pub fn queued(&mut self) {
        let queue = child(&self.tracer, &self.request, "queue", SpanKind::Internal);
        if let Some(previous) = self.queue.replace(queue) {
            previous.span().end();
        }
    }

    /// Where the scheduler hangs the `acquire` spans of the current wait.
    pub fn acquire_parent(&self) -> Option<AcquireParent> {
        self.queue.as_ref().map(|queue| AcquireParent {
            tracer: self.tracer.clone(),
            queue: queue.clone(),
        })
    }

    /// The request holds a slot of `pool`: the wait ends.
    pub fn placed(&mut self, pool: &PoolId) {
        if let Some(queue) = self.queue.take() {
            let span = queue.span();
            span.set_attribute(KeyValue::new(
                "orchestratord.pool",
                pool.as_str().to_owned(),
            ));
            span.end();
        }
    }

    /// An engine request to `pool` begins: the `engine` span, whose context replaces the client's
    /// in `headers` (the engine request's).
    pub fn engine_request(
        &mut self,
        pool: &PoolId,
        engine: EngineKind,
        path: &'static str,
        headers: &mut HeaderMap,
    ) {
        let span = self
            .tracer
            .span_builder("engine")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("orchestratord.pool", pool.as_str().to_owned()),
                KeyValue::new("orchestratord.engine", engine.name()),
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("url.path", path),
            ])
            .start_with_context(&self.tracer, &self.request);
        let engine = self.request.with_span(span);
        trace_export::inject_headers(&engine, headers);
        if let Some(previous) = self.engine.replace(engine) {
            previous.span().end();
        }
    }

    /// The engine's response head arrived with `status`.
    pub fn engine_answered(&self, status: u16) {
        if let Some(engine) = &self.engine {
            let span = engine.span();
            let status = KeyValue::new("http.response.status_code", i64::from(status));
            span.set_attribute(status.clone());
            span.add_event("response_head", vec![status]);
        }
    }

    /// The first token reached the client (once per request).
    pub fn first_token(&mut self) {
        if std::mem::replace(&mut self.first_token_seen, true) {
            return;
        }
        if let Some(engine) = &self.engine {
            engine.span().add_event("first_token", Vec::new());
        }
    }

    /// The engine attempt (or the wait for a slot) failed with `error`; the request may go on
    /// elsewhere.
    pub fn attempt_failed(&mut self, error: &ApiError) {
        for step in [self.engine.take(), self.queue.take()]
            .into_iter()
            .flatten()
        {
            fail(&step, error);
            step.span().end();
        }
    }

    /// The request fails with `error`: recorded on the request span and on the step under way.
    pub fn failed(&mut self, error: &ApiError) {
        self.attempt_failed(error);
        fail(&self.request, error);
    }

    /// The request ended: every span still open ends, the request span with the outcome and
    /// usage.
    pub fn end(&mut self, outcome: Outcome, usage: Usage) {
        for step in [self.admission.take(), self.queue.take(), self.engine.take()]
            .into_iter()
            .flatten()
        {
            step.span().end();
        }
        let span = self.request.span();
        let mut attributes = vec![
            KeyValue::new("orchestratord.outcome", outcome.name()),
            KeyValue::new("orchestratord.retries", i64::from(usage.retries)),
        ];
        if let Some(tokens) = usage.prompt_tokens {
            attributes.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                saturating(tokens),
            ));
        }
        if let Some(tokens) = usage.completion_tokens {
            attributes.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                saturating(tokens),
            ));
        }
        span.set_attributes(attributes);
        span.end();
    }
}

/// Where the scheduler hangs a request's `acquire` spans: its current `queue` span.
#[derive(Debug, Clone)]
pub struct AcquireParent {
    tracer: Tracer,
    queue: Context,
}

impl AcquireParent {
    /// Opens the `acquire` span of one Acquire of `slots` slots of `pool`.
    pub fn acquire(&self, pool: &PoolId, slots: u32) -> AcquireSpan {
        let span = self
            .tracer
            .span_builder("acquire")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("orchestratord.pool", pool.as_str().to_owned()),
                KeyValue::new("orchestratord.slots", i64::from(slots)),
            ])
            .start_with_context(&self.tracer, &self.queue);
        AcquireSpan(self.queue.with_span(span))
    }
}

/// One Acquire round trip's span.
#[derive(Debug)]
pub struct AcquireSpan(Context);

impl AcquireSpan {
    /// The `traceparent` pool-managerd gets in the Acquire.
    pub fn traceparent(&self) -> Option<String> {
        trace_export::traceparent_of(&self.0)
    }

    /// Ends the span with the Acquire's answer.
    pub fn answered(self, result: &Result<LeaseGuard, ClientError>) {
        let span = self.0.span();
        match result {
            Ok(lease) => span.set_attribute(KeyValue::new(
                "orchestratord.lease",
                lease.lease().id.to_string(),
            )),
            Err(error) => {
                let kind = match error {
                    ClientError::Remote(remote) => remote.code.name(),
                    _ => "unavailable",
                };
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(error.to_string()));
            }
        }
        span.end();
    }
}

fn child(tracer: &Tracer, parent: &Context, name: &'static str, kind: SpanKind) -> Context {
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, parent);
    parent.with_span(span)
}

/// Marks `step`'s span failed with `error`'s code and message.
fn fail(step: &Context, error: &ApiError) {
    let span = step.span();
    span.set_attribute(KeyValue::new("error.type", error.code()));
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(error.status().as_u16()),
    ));
    span.set_status(Status::error(error.to_string()));
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
