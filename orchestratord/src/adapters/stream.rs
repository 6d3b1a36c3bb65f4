//! One streamed generation: reads the engine's response body, frames it as SSE, hands each payload to
//! its dialect (`llamacpp` or `openai`) and yields [`EngineEvent`]s, bounding every wait by the stall
//! limit and by the clients' shutdown token.
//!
//! Connection ownership, which a reader must not break: the response body (`hyper::body::Incoming`)
//! is the only handle this stream has on its connection. Dropping the body before its end makes
//! hyper's connection task see its body receiver gone; it then stops reading, marks the connection
//! closed and drops the socket, and hyper-util does not return a connection that is not idle to the
//! pool. So every way of abandoning a stream — dropping it, an error, the stall limit, shutdown —
//! drops the body at once and the engine sees its client leave. Only a body read to its end (after the
//! terminator) leaves its connection to be reused.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as _, Incoming};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::anthropic::AnthropicStream;
use super::openai::OpenAiStream;
use super::sse::{SseDecoder, SseEvent};
use super::{AdapterError, EngineEvent, EngineRoute, error_chain, llamacpp, responses};

/// Bytes read and thrown away after the terminator before the connection is given up instead.
const MAX_TRAILING_BYTES: usize = 64 * 1024;

#[derive(Debug)]
enum Dialect {
    Native,
    OpenAi(OpenAiStream),
    Anthropic(AnthropicStream),
    Responses,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading events.
    Streaming,
    /// `Done` was yielded; reading the rest of the body (normally just its end) so the connection
    /// can be reused.
    Draining { discarded: usize },
    /// Nothing more to yield; the body is gone.
    Ended,
}

/// A streamed generation from an engine. Yields [`EngineEvent::Chunk`]s in order, then one
/// [`EngineEvent::Done`], or one [`AdapterError`]; then `None`. Dropping it cancels the generation.
///
/// A one-pointer handle, so callers can keep it in their own state machines without bloating them.
#[derive(Debug)]
pub struct EngineStream {
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    body: Option<Incoming>,
    decoder: SseDecoder,
    dialect: Dialect,
    phase: Phase,
    stall_limit: Duration,
    /// Re-armed (not re-allocated) each time the stream starts waiting for bytes.
    stall: Pin<Box<Sleep>>,
    stall_armed: bool,
    shutdown: CancellationToken,
    /// Waits for `shutdown` in polls (made once per stream).
    shutdown_waiter: Pin<Box<WaitForCancellationFutureOwned>>,
    correlation_id: Box<str>,
    /// An error [`Inner::next_buffered`] met, for the next poll to report.
    pending_error: Option<AdapterError>,
    /// The status of the engine's response head.
    status: u16,
}

impl EngineStream {
    /// The stream of a response whose head said `status` (a 2xx) and whose body is `body`.
    pub(super) fn new(
        status: u16,
        body: Incoming,
        route: EngineRoute,
        stall_limit: Duration,
        shutdown: CancellationToken,
        correlation_id: &str,
    ) -> Self {
        Self {
            inner: Box::new(Inner::new(
                status,
                body,
                route,
                stall_limit,
                shutdown,
                correlation_id,
            )),
        }
    }

    /// The status of the engine's response head.
    pub fn status(&self) -> u16 {
        self.inner.status
    }

    /// The next event. Waits at most the stall limit for engine bytes (then
    /// [`AdapterError::DecodeTimeout`]). Cancel-safe: dropping the returned future loses nothing.
    pub async fn next(&mut self) -> Option<Result<EngineEvent, AdapterError>> {
        std::future::poll_fn(|cx| self.inner.poll_next_event(cx)).await
    }

    /// The next event if the engine already sent it: decoded from bytes already read, without
    /// reading or waiting (`None` otherwise). A malformed event is kept for the next
    /// [`next`](Self::next), which reports it.
    pub fn next_buffered(&mut self) -> Option<EngineEvent> {
        self.inner.next_buffered()
    }

    /// The poll form of [`next`](Self::next).
    pub fn poll_next_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<EngineEvent, AdapterError>>> {
        self.inner.poll_next_event(cx)
    }
}

impl Inner {
    fn new(
        status: u16,
        body: Incoming,
        route: EngineRoute,
        stall_limit: Duration,
        shutdown: CancellationToken,
        correlation_id: &str,
    ) -> Self {
        let dialect = match route {
            EngineRoute::Completion => Dialect::Native,
            EngineRoute::ChatCompletions | EngineRoute::Completions => {
                Dialect::OpenAi(OpenAiStream::default())
            }
            EngineRoute::Messages => Dialect::Anthropic(AnthropicStream::default()),
            EngineRoute::Responses => Dialect::Responses,
        };
        Self {
            body: Some(body),
            decoder: SseDecoder::default(),
            dialect,
            phase: Phase::Streaming,
            stall_limit,
            stall: Box::pin(tokio::time::sleep(stall_limit)),
            stall_armed: false,
            shutdown_waiter: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown,
            correlation_id: correlation_id.into(),
            pending_error: None,
            status,
        }
    }

    fn next_buffered(&mut self) -> Option<EngineEvent> {
        if self.phase != Phase::Streaming || self.pending_error.is_some() {
            return None;
        }
        if self.shutdown.is_cancelled() {
            return None;
        }
        let mut context = Context::from_waker(std::task::Waker::noop());
        match self.decode_buffered() {
            Ok(Some(event)) => {
                if matches!(event, EngineEvent::Done { .. }) {
                    self.phase = Phase::Draining { discarded: 0 };
                    // As in `poll_next_event`; the caller polls again for the rest.
                    let _ = self.poll_drain(&mut context);
                }
                Some(event)
            }
            Ok(None) => None,
            Err(error) => {
                self.pending_error = Some(self.fail(error));
                None
            }
        }
    }

    fn poll_next_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<EngineEvent, AdapterError>>> {
        if let Some(error) = self.pending_error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match self.phase {
            Phase::Streaming => {}
            Phase::Draining { .. } => return self.poll_drain(cx).map(|()| None),
            Phase::Ended => return Poll::Ready(None),
        }
        // Checked before buffered events, so nothing is yielded after shutdown.
        if self.shutdown_waiter.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(self.fail(AdapterError::Cancelled))));
        }
        loop {
            match self.decode_buffered() {
                Ok(Some(event)) => {
                    if matches!(event, EngineEvent::Done { .. }) {
                        self.phase = Phase::Draining { discarded: 0 };
                        // Usually the body's end is already here: consume it now, so the connection
                        // goes back to the pool even if the caller drops the stream after `Done`.
                        let _ = self.poll_drain(cx);
                    }
                    return Poll::Ready(Some(Ok(event)));
                }
                Ok(None) => {}
                Err(error) => return Poll::Ready(Some(Err(self.fail(error)))),
            }
            let Some(body) = self.body.as_mut() else {
                self.phase = Phase::Ended;
                return Poll::Ready(None);
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.stall_armed = false;
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(data);
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    let detail = format!("engine stream broke: {}", error_chain(&error));
                    return Poll::Ready(Some(Err(self.fail(AdapterError::WorkerReset { detail }))));
                }
                Poll::Ready(None) => {
                    let detail = if self.decoder.has_partial_event() {
                        "engine closed the stream in the middle of an event"
                    } else {
                        "engine ended the stream before its terminator"
                    };
                    let error = AdapterError::WorkerReset {
                        detail: detail.to_owned(),
                    };
                    return Poll::Ready(Some(Err(self.fail(error))));
                }
                Poll::Pending => {
                    if self.stall_expired(cx) {
                        let error = AdapterError::DecodeTimeout {
                            after: self.stall_limit,
                        };
                        return Poll::Ready(Some(Err(self.fail(error))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Decodes the next event from bytes already read, if one is complete.
    fn decode_buffered(&mut self) -> Result<Option<EngineEvent>, AdapterError> {
        loop {
            let sse = self
                .decoder
                .next_event()
                .map_err(|e| AdapterError::WorkerReset {
                    detail: format!("malformed engine stream: {e}"),
                })?;
            let (data, frame) = match sse {
                None => return Ok(None),
                Some(SseEvent::Error(payload)) => return Err(super::engine_reported(&payload)),
                Some(SseEvent::Data { data, frame }) => (data, frame),
            };
            let event = match &mut self.dialect {
                Dialect::Native => Some(llamacpp::on_data(data, frame)?),
                Dialect::OpenAi(stream) => stream.on_data(data, frame)?,
                Dialect::Anthropic(stream) => Some(stream.on_data(data, frame)?),
                Dialect::Responses => Some(responses::on_data(data, frame)?),
            };
            if event.is_some() {
                return Ok(event);
            }
        }
    }

    /// Arms the stall timer when a wait for bytes begins; whether it has run out.
    fn stall_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.stall_armed {
            let deadline = Instant::now() + self.stall_limit;
            self.stall.as_mut().reset(deadline);
            self.stall_armed = true;
        }
        self.stall.as_mut().poll(cx).is_ready()
    }

    /// After `Done`: reads the body to its end so hyper can reuse the connection; gives the
    /// connection up (drops the body) on an error, a stall, or too much trailing data.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Phase::Draining { discarded } = self.phase else {
                return Poll::Ready(());
            };
            let Some(body) = self.body.as_mut() else {
                self.phase = Phase::Ended;
                return Poll::Ready(());
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.stall_armed = false;
                    let size = frame.data_ref().map_or(0, |data| data.len());
                    let discarded = discarded.saturating_add(size);
                    if discarded > MAX_TRAILING_BYTES {
                        self.end();
                        return Poll::Ready(());
                    }
                    self.phase = Phase::Draining { discarded };
                }
                Poll::Ready(Some(Err(_)) | None) => {
                    self.end();
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    if self.stall_expired(cx) {
                        self.end();
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Ends the stream with `error`, dropping the body (closing the connection) first.
    fn fail(&mut self, error: AdapterError) -> AdapterError {
        self.end();
        tracing::debug!(
            correlation_id = %self.correlation_id,
            error = %error,
            "engine stream ended with an error"
        );
        error
    }

    fn end(&mut self) {
        self.body = None;
        self.phase = Phase::Ended;
    }
}

impl futures_util::Stream for EngineStream {
    type Item = Result<EngineEvent, AdapterError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_event(cx)
    }
}
