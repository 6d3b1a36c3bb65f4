//! One request's life, the same for every endpoint of both APIs: validate (the API modules turn a
//! body into an [`Exchange`]) → admit → lease → engine request → relay or pass-through → finish
//! (lease back, metrics, session accounting). Written once, here; `api/openai`, `api/anthropic`
//! and `api/tasks` only validate requests and choose how answers are framed.
//!
//! A [`Lifecycle`] owns everything a request holds — its place in the queue, its lease, its
//! engine connection — and gives all of it back exactly once, in `finish`: on success, on a
//! failure, or in `Drop` when the client went away (dropping the engine stream closes its
//! connection, which cancels the generation; the lease is released with `Cancelled`).
//!
//! Streams keep the stall limit (`streaming.decode_stall_ms`) between engine bytes; a
//! non-streaming request has a total-time limit instead (`non_streaming.answer_timeout_ms`),
//! since an engine sends nothing until it is done. What the engine answers reaches the client
//! unchanged, but for the rewrites `api` documents: a whole JSON answer's top-level `model` says
//! the id the client asked for, and an OpenAI stream's usage chunk, which orchestratord always
//! asks for, is passed on only when the client asked for it.

use crate::adapters::{
    AdapterError, EngineEvent, EngineRequest, EngineRoute, EngineStream, WholeAnswer, WholeRequest,
};
use crate::admission::Priority;
use crate::app::{AppState, Inbound};
use crate::drain::HostState;
use crate::error::{ApiError, ErrorShape, error_event};
use crate::json_object::{self, TopLevel};
use crate::keys::Caller;
use crate::metrics::{Metrics, ReasonLabels};
use crate::placement::{self, NoPlacement, PlacementHints, SlotNeed, Wanted};
use crate::request_trace::{Outcome, RequestTrace, Usage};
use crate::scheduler::{Demand, Placed, Ticket};
use crate::sse::{self, StreamFormat};
use crate::tenants::TenantPermit;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt as _;
use futures_util::future::Either;
use pool_ipc::client::{ClientError, LeaseGuard};
use pool_ipc::error_code::ErrorCode;
use pool_ipc::registry::{ApiEndpoint, Endpoint, EngineKind, PoolId, ReleaseOutcome};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A validated request, ready to be admitted: only these reach the queue.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub model: String,
    /// The API called: only pools whose engine serves it are considered.
    pub api: ApiEndpoint,
    pub call: EngineCall,
    /// The engine sequences it runs, which its lease reserves; `None` for requests that occupy no
    /// slot (the token counters), which are sent to a ready pool at once and never queued.
    pub slots: Option<SlotNeed>,
    pub priority: Priority,
    /// A native session: its budget is charged when the request ends.
    pub session: Option<String>,
    pub hints: PlacementHints,
    pub queue_deadline: Duration,
    /// Client headers forwarded to the engine.
    pub headers: HeaderMap,
    pub correlation_id: String,
    /// Who asked (the key's name and role): a session is its creator's.
    pub caller: Caller,
}

impl Exchange {
    /// An interactive request of the OpenAI or Anthropic API, as `inbound` brought it.
    pub fn interactive(
        inbound: &Inbound,
        queue_deadline: Duration,
        model: String,
        api: ApiEndpoint,
        call: EngineCall,
        slots: Option<SlotNeed>,
    ) -> Exchange {
        Exchange {
            model,
            api,
            call,
            slots,
            priority: Priority::Interactive,
            session: None,
            hints: PlacementHints::default(),
            queue_deadline,
            headers: inbound.forward.clone(),
            correlation_id: inbound.correlation_id.clone(),
            caller: inbound.caller.clone(),
        }
    }
}

/// What the engine is asked.
#[derive(Debug, Clone)]
pub enum EngineCall {
    /// A stream on `route` with this body.
    Stream { route: EngineRoute, body: Bytes },
    /// A native task's generation: llama-server's `/completion`, or `/v1/completions` on an
    /// OpenAI-compatible engine.
    Task { prompt: String, max_tokens: u32 },
    /// A non-streaming request to `path`; its answer goes back whole.
    Whole { path: &'static str, body: Bytes },
}

/// Where a request runs: the engine of one pool, under a lease unless it takes no slot.
#[derive(Debug)]
pub struct Placement {
    pub pool: PoolId,
    pub endpoint: Endpoint,
    pub engine: EngineKind,
    pub queued_for: Duration,
    lease: Option<LeaseGuard>,
}

#[derive(Debug)]
enum Phase {
    Queued(Ticket),
    Placed(Placement),
    Streaming {
        stream: EngineStream,
        placement: Placement,
        /// Made once per stream and polled only while the engine is silent, so waiting for a
        /// revocation costs nothing per relayed event.
        revocation: Revocation,
    },
    Finished,
}

/// Completes when the request's lease is revoked (see [`revoked`]).
struct Revocation(Pin<Box<dyn Future<Output = ()> + Send>>);

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revocation")
    }
}

/// What opening a placed request's engine stream came to.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Streaming,
    /// The engine failed before answering and the request waits for another pool: wait with
    /// [`Lifecycle::placed`] and open again.
    Requeued,
}

/// What a stream's next step brought.
#[must_use]
#[derive(Debug)]
pub enum Next {
    Event(EngineEvent),
    /// The engine failed before the first event and the request waits for another pool, as after
    /// [`Opened::Requeued`].
    Requeued,
}

/// How a request ended, for the lease's release and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Completed,
    Failed,
    Cancelled,
}

/// One admitted request, from its place in the queue to its last engine byte.
#[derive(Debug)]
pub struct Lifecycle {
    state: AppState,
    exchange: Exchange,
    received: Instant,
    phase: Phase,
    /// Set when the engine request began (the in-flight gauge counts it).
    engine_started: Option<Instant>,
    last_token: Option<Instant>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// The lease of a request that ended, until [`Lifecycle::release`] has it confirmed (or `Drop`
    /// releases it without waiting).
    ending_lease: Option<(LeaseGuard, ReleaseOutcome)>,
    /// Times the request was placed again after an engine failed before answering.
    retries: u32,
    /// Set once an engine event has gone to the caller: from then on a failure is final.
    answer_began: bool,
    /// The request's place in its key's limits (`tenants`), until it ends.
    tenant: Option<TenantPermit>,
    /// Tokens relayed so far (chunks with output): what a request that does not complete is
    /// charged to its key, so that leaving early does not dodge a token budget.
    tokens_relayed: u64,
    /// Its spans, when spans are exported (`request_trace`); boxed, so that a request without
    /// them carries one null pointer.
    trace: Option<Box<RequestTrace>>,
}

impl Lifecycle {
    /// Admits `exchange` (or says at once why not: the host drained or shutting down, a key's
    /// limit, queue full, unknown model or API, pool-manager down, session over budget). A request
    /// that takes no slot is placed on a ready pool here.
    pub async fn admit(state: &AppState, mut exchange: Exchange) -> Result<Lifecycle, ApiError> {
        let received = Instant::now();
        let mut trace = state.tracer.as_ref().map(|tracer| {
            Box::new(RequestTrace::begin(
                tracer,
                &exchange.headers,
                exchange.api,
                &exchange.model,
                exchange.priority,
                &exchange.correlation_id,
            ))
        });
        let admitted = match state.host.state() {
            HostState::Serving => match state.tenants.admit(&exchange.caller, &exchange.model) {
                Ok(tenant) => {
                    if let Some(class) = tenant.as_ref().and_then(|tenant| tenant.class) {
                        exchange.priority = class;
                    }
                    Self::place_or_queue(state, &exchange, trace.as_deref_mut())
                        .await
                        .map(|phase| (phase, tenant))
                }
                Err(refused) => Err(refused),
            },
            HostState::Drained => Err(ApiError::HostDraining),
            HostState::ShuttingDown => Err(ApiError::ShuttingDown),
        };
        let (phase, tenant) = match admitted {
            Ok(admitted) => {
                if let Some(trace) = &mut trace {
                    trace.admitted();
                }
                admitted
            }
            Err(error) => {
                state.metrics.reject(error.code());
                if let Some(trace) = trace {
                    trace.refused(&error);
                }
                return Err(error);
            }
        };
        Ok(Lifecycle {
            state: state.clone(),
            exchange,
            received,
            phase,
            engine_started: None,
            last_token: None,
            prompt_tokens: None,
            completion_tokens: None,
            ending_lease: None,
            retries: 0,
            answer_began: false,
            tokens_relayed: 0,
            tenant,
            trace,
        })
    }

    /// Places a request that takes no slot, or queues one that does (its `queue` span begins).
    async fn place_or_queue(
        state: &AppState,
        exchange: &Exchange,
        trace: Option<&mut RequestTrace>,
    ) -> Result<Phase, ApiError> {
        let Some(slots) = exchange.slots else {
            return unleased_placement(state, exchange, &exchange.hints).map(Phase::Placed);
        };
        let turn = match &exchange.session {
            Some(session) => Some(state.sessions.begin_turn(
                session,
                &exchange.caller,
                Instant::now(),
            )?),
            None => None,
        };
        let demand = Demand {
            model: exchange.model.clone(),
            api: exchange.api,
            slots,
            priority: exchange.priority,
            session: exchange.session.clone(),
            hints: exchange.hints.clone(),
            deadline: Instant::now() + exchange.queue_deadline,
            correlation_id: exchange.correlation_id.clone(),
            trace: trace.and_then(|trace| {
                trace.queued();
                trace.acquire_parent()
            }),
        };
        let submitted = state.scheduler.submit(demand).await;
        if let (Err(_), Some(session), Some(turn)) = (&submitted, &exchange.session, turn) {
            // A refused request leaves no session behind.
            state.sessions.forget_new(session, turn);
        }
        submitted.map(Phase::Queued)
    }

    /// The queue ticket while the request waits (position, predicted start).
    pub fn ticket(&self) -> Option<&Ticket> {
        match &self.phase {
            Phase::Queued(ticket) => Some(ticket),
            Phase::Placed(_) | Phase::Streaming { .. } | Phase::Finished => None,
        }
    }

    /// Where the request runs, once placed.
    pub fn placement(&self) -> Option<&Placement> {
        match &self.phase {
            Phase::Placed(placement) | Phase::Streaming { placement, .. } => Some(placement),
            Phase::Queued(_) | Phase::Finished => None,
        }
    }

    /// How many times the request was placed again on another pool after an engine failed before
    /// answering.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Waits until the request holds its lease. Cancel-safe: a caller may give up waiting (to send
    /// a keep-alive) and call again.
    pub async fn placed(&mut self) -> Result<(), ApiError> {
        let Phase::Queued(ticket) = &mut self.phase else {
            return Ok(());
        };
        let placed = match (&mut ticket.placed).await {
            Ok(Ok(placed)) => placed,
            Ok(Err(error)) => return Err(self.fail_before_start(error).await),
            Err(_) => {
                let error = ApiError::Internal("the scheduler dropped a request".into());
                return Err(self.fail_before_start(error).await);
            }
        };
        let Placed { lease, queued_for } = placed;
        let held = lease.lease();
        if let Some(trace) = &mut self.trace {
            trace.placed(&held.pool);
        }
        self.phase = Phase::Placed(Placement {
            pool: held.pool.clone(),
            endpoint: held.endpoint.clone(),
            engine: held.engine,
            queued_for,
            lease: Some(lease),
        });
        Ok(())
    }

    /// Opens the engine stream of a placed request; an engine that fails to answer may send the
    /// request back to the queue for another pool (see [`Opened`]).
    pub async fn open_stream(&mut self) -> Result<Opened, ApiError> {
        let Phase::Placed(placement) = &self.phase else {
            return Err(ApiError::Internal(
                "a stream opened before placement".into(),
            ));
        };
        let (route, body) = match &self.exchange.call {
            EngineCall::Stream { route, body } => (*route, body.clone()),
            EngineCall::Task { prompt, max_tokens } => {
                task_request(placement.engine, &self.exchange.model, prompt, *max_tokens)
            }
            EngineCall::Whole { .. } => {
                return Err(ApiError::Internal(
                    "a whole request opened as a stream".into(),
                ));
            }
        };
        let mut headers = self.exchange.headers.clone();
        if let Some(trace) = &mut self.trace {
            trace.engine_request(
                &placement.pool,
                placement.engine,
                route.path(),
                &mut headers,
            );
        }
        let request = EngineRequest::new(placement.endpoint.clone(), placement.engine, route, body)
            .with_headers(headers);
        self.engine_began();
        let stall = self.state.config.get().decode_stall;
        let opened = self
            .state
            .engines
            .stream(request, stall, &self.exchange.correlation_id)
            .await;
        match opened {
            Ok(stream) => {
                if let Some(trace) = &self.trace {
                    trace.engine_answered(stream.status());
                }
                if let Phase::Placed(placement) =
                    std::mem::replace(&mut self.phase, Phase::Finished)
                {
                    let revocation = Revocation(Box::pin(revoked(&placement)));
                    self.phase = Phase::Streaming {
                        stream,
                        placement,
                        revocation,
                    };
                }
                Ok(Opened::Streaming)
            }
            Err(error) => {
                let error = adapter_error(error);
                if self.retry_elsewhere(&error).await {
                    return Ok(Opened::Requeued);
                }
                self.trace_failure(&error);
                self.finish(Ending::Failed).await;
                Err(error)
            }
        }
    }

    /// The next event of an open stream; `None` after the last. With the terminator or a failure
    /// the request ends (the engine connection closes, the metrics are recorded); the caller then
    /// has the lease's release confirmed with [`release`](Self::release) before it says anything
    /// more to its client.
    pub async fn next_event(&mut self) -> Option<Result<Next, ApiError>> {
        let Phase::Streaming {
            stream, revocation, ..
        } = &mut self.phase
        else {
            return None;
        };
        let next = tokio::select! {
            biased;
            next = stream.next() => Some(next),
            () = &mut revocation.0 => None,
        };
        let failure = match next {
            None => ApiError::LeaseRevoked,
            Some(Some(Err(error))) => adapter_error(error),
            Some(None) => ApiError::WorkerReset("the engine stream ended early".into()),
            Some(Some(Ok(event))) => return Some(Ok(Next::Event(self.relayed(event)))),
        };
        if self.retry_elsewhere(&failure).await {
            return Some(Ok(Next::Requeued));
        }
        self.trace_failure(&failure);
        self.settle(Ending::Failed);
        Some(Err(failure))
    }

    /// The next engine event if the engine already sent it (no reading, no waiting), accounted for
    /// as [`next_event`](Self::next_event) does; `None` otherwise, and for anything that is not an
    /// event (the next `next_event` reports it).
    pub fn next_ready_event(&mut self) -> Option<EngineEvent> {
        let Phase::Streaming { stream, .. } = &mut self.phase else {
            return None;
        };
        let event = stream.next_buffered()?;
        Some(self.relayed(event))
    }

    /// Accounts for an engine event going to the caller: the answer has begun.
    fn relayed(&mut self, event: EngineEvent) -> EngineEvent {
        self.answer_began = true;
        match &event {
            EngineEvent::Chunk { tokens, .. } => {
                if *tokens > 0 {
                    self.tokens_relayed += u64::from(*tokens);
                    self.token_seen();
                }
            }
            EngineEvent::Done {
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                self.prompt_tokens = prompt_tokens.map(u64::from);
                self.completion_tokens = completion_tokens.map(u64::from);
                self.settle(Ending::Completed);
            }
        }
        event
    }

    /// Waits for the lease, sends the non-streaming request and reads the engine's whole answer.
    /// An engine that fails before answering may send the request to another pool first.
    pub async fn whole(&mut self) -> Result<WholeAnswer, ApiError> {
        let mut answer = loop {
            self.placed().await?;
            match self.whole_attempt().await {
                Ok(answer) => break answer,
                Err(error) => {
                    if self.retry_elsewhere(&error).await {
                        continue;
                    }
                    self.trace_failure(&error);
                    self.finish(Ending::Failed).await;
                    return Err(error);
                }
            }
        };
        let model = self.exchange.model.clone();
        let body = std::mem::take(&mut answer.body);
        // A large answer (an embeddings batch) is read off the async workers.
        let read = if body.len() > READ_OFF_THREAD_BYTES {
            tokio::task::spawn_blocking(move || for_client(body, &model))
                .await
                .map_err(|error| ApiError::Internal(format!("reading an answer: {error}")))
        } else {
            Ok(for_client(body, &model))
        };
        let (body, usage) = match read {
            Ok(read) => read,
            Err(error) => {
                self.trace_failure(&error);
                self.finish(Ending::Failed).await;
                return Err(error);
            }
        };
        if self.exchange.slots.is_some() {
            (self.prompt_tokens, self.completion_tokens) = usage;
        }
        answer.body = body;
        self.finish(Ending::Completed).await;
        Ok(answer)
    }

    /// One engine's answer to a placed non-streaming request.
    async fn whole_attempt(&mut self) -> Result<WholeAnswer, ApiError> {
        let Phase::Placed(placement) = &self.phase else {
            return Err(ApiError::Internal(
                "a whole request sent before placement".into(),
            ));
        };
        let EngineCall::Whole { path, body } = &self.exchange.call else {
            return Err(ApiError::Internal(
                "a stream sent as a whole request".into(),
            ));
        };
        let mut headers = self.exchange.headers.clone();
        if let Some(trace) = &mut self.trace {
            trace.engine_request(&placement.pool, placement.engine, path, &mut headers);
        }
        let request = WholeRequest {
            endpoint: placement.endpoint.clone(),
            path,
            body: body.clone(),
            headers,
        };
        let revocation = revoked(placement);
        self.engine_began();
        let limit = self.state.config.get().answer_timeout;
        let engines = Arc::clone(&self.state.engines);
        let answer = tokio::select! {
            biased;
            answer = engines.whole(&request, limit, &self.exchange.correlation_id) => {
                answer.map_err(|error| match error {
                    AdapterError::DecodeTimeout { after } => ApiError::ResponseTimeout(after),
                    error => adapter_error(error),
                })
            }
            () = revocation => Err(ApiError::LeaseRevoked),
        };
        if let (Some(trace), Ok(answer)) = (&self.trace, &answer) {
            trace.engine_answered(answer.status);
        }
        answer
    }

    /// After the engine of a placed or streaming request failed with `error` before the answer
    /// began: places the request again, on another ready pool of its model, when the failure is
    /// the engine's (its connection refused or reset, a 5xx, a 503 busy, its lease revoked),
    /// `admission.max_retries` allows one more and such a pool exists (never for a request
    /// pinned to its pool). The failed attempt's
    /// engine connection and lease are given back (`Failed`) and its pool avoided from then on.
    /// `false`: nothing changed, the failure is final.
    async fn retry_elsewhere(&mut self, error: &ApiError) -> bool {
        let worth_another_pool = matches!(
            error,
            ApiError::WorkerReset(_)
                | ApiError::LeaseRevoked
                | ApiError::EngineFailed(_)
                | ApiError::EngineRejected { status: 503, .. }
        );
        if self.answer_began
            || !worth_another_pool
            || self.exchange.hints.pin.is_some()
            || self.retries >= self.state.config.get().max_retries
        {
            return false;
        }
        let failed_pool = match &self.phase {
            Phase::Placed(placement) | Phase::Streaming { placement, .. } => placement.pool.clone(),
            Phase::Queued(_) | Phase::Finished => return false,
        };
        if let Some(trace) = &mut self.trace {
            trace.attempt_failed(error);
        }
        let mut hints = self.exchange.hints.clone();
        hints.avoid.push(failed_pool.clone());
        let replaced = match self.exchange.slots {
            None => match unleased_placement(&self.state, &self.exchange, &hints) {
                Ok(placement) => Phase::Placed(placement),
                Err(_) => return false,
            },
            Some(slots) => {
                let wanted = Wanted {
                    model: &self.exchange.model,
                    api: self.exchange.api,
                    slots,
                    hints: &hints,
                    held_back: &[],
                };
                if !placement::another_ready(&self.state.mirror.borrow().snapshot, &wanted) {
                    return false;
                }
                if let Some(trace) = &mut self.trace {
                    trace.queued();
                }
                let demand = Demand {
                    model: self.exchange.model.clone(),
                    api: self.exchange.api,
                    slots,
                    priority: self.exchange.priority,
                    session: self.exchange.session.clone(),
                    hints: hints.clone(),
                    deadline: Instant::now() + self.exchange.queue_deadline,
                    correlation_id: self.exchange.correlation_id.clone(),
                    trace: self.trace.as_deref().and_then(RequestTrace::acquire_parent),
                };
                match self.state.scheduler.submit(demand).await {
                    Ok(ticket) => Phase::Queued(ticket),
                    Err(_) => return false,
                }
            }
        };
        let failed_lease = match std::mem::replace(&mut self.phase, replaced) {
            Phase::Placed(placement) => placement.lease,
            Phase::Streaming {
                stream, placement, ..
            } => {
                drop(stream);
                placement.lease
            }
            Phase::Queued(_) | Phase::Finished => None,
        };
        if self.engine_started.take().is_some() {
            self.state.metrics.in_flight.dec();
        }
        self.retries += 1;
        self.exchange.hints = hints;
        self.state
            .metrics
            .engine_retries
            .get_or_create(&ReasonLabels {
                reason: error.code(),
            })
            .inc();
        tracing::warn!(
            pool = %failed_pool,
            %error,
            retry = self.retries,
            correlation_id = %self.exchange.correlation_id,
            "the engine failed before answering; the request goes to another pool"
        );
        if let Some(lease) = failed_lease {
            give_back(lease, ReleaseOutcome::Failed).await;
        }
        true
    }

    /// Ends a request that never reached its engine (its wait in the queue ended in `error`).
    async fn fail_before_start(&mut self, error: ApiError) -> ApiError {
        self.state.metrics.reject(error.code());
        self.trace_failure(&error);
        self.finish(Ending::Failed).await;
        error
    }

    /// Records on the request's spans that it fails with `error`.
    fn trace_failure(&mut self, error: &ApiError) {
        if let Some(trace) = &mut self.trace {
            trace.failed(error);
        }
    }

    fn engine_began(&mut self) {
        self.engine_started = Some(Instant::now());
        self.state.metrics.in_flight.inc();
    }

    fn token_seen(&mut self) {
        let now = Instant::now();
        let metrics = &self.state.metrics;
        match self.last_token {
            None => {
                Metrics::observe(&metrics.time_to_first_token, now - self.received);
                if let Some(trace) = &mut self.trace {
                    trace.first_token();
                }
            }
            Some(last) => Metrics::observe(&metrics.inter_token, now - last),
        }
        self.last_token = Some(now);
    }

    /// Ends the request and has its lease's release confirmed.
    async fn finish(&mut self, ending: Ending) {
        self.settle(ending);
        self.release().await;
    }

    /// Has the release of an ended request's lease confirmed by pool-managerd, so a client that
    /// is told the request ended sees its slot free. Nothing to do for a request without one.
    pub async fn release(&mut self) {
        if let Some((lease, outcome)) = self.ending_lease.take() {
            give_back(lease, outcome).await;
        }
    }

    /// Gives back everything the request holds, once: the engine connection first (so the engine
    /// sees its client leave), then the lease (kept for [`release`](Self::release)); records the
    /// metrics and charges the session.
    fn settle(&mut self, ending: Ending) {
        let placement = match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Finished => return,
            Phase::Queued(ticket) => {
                drop(ticket);
                None
            }
            Phase::Placed(placement) => Some(placement),
            Phase::Streaming {
                stream, placement, ..
            } => {
                drop(stream);
                Some(placement)
            }
        };
        let metrics = &self.state.metrics;
        if self.engine_started.is_some() {
            metrics.in_flight.dec();
        }
        match ending {
            Ending::Completed => {
                metrics.tokens_in.inc_by(self.prompt_tokens.unwrap_or(0));
                metrics
                    .tokens_out
                    .inc_by(self.completion_tokens.unwrap_or(0));
                Metrics::observe(&metrics.request_duration, self.received.elapsed());
            }
            Ending::Failed => {
                Metrics::observe(&metrics.request_duration, self.received.elapsed());
            }
            Ending::Cancelled => {
                metrics.cancellations.inc();
            }
        }
        if let Some(tenant) = &self.tenant {
            // The engine's usage when it reported one; else the tokens that reached the client.
            let completion = match ending {
                Ending::Completed => self.completion_tokens.unwrap_or(self.tokens_relayed),
                Ending::Failed | Ending::Cancelled => self.tokens_relayed,
            };
            tenant.charge(self.prompt_tokens.unwrap_or(0), completion);
        }
        if let Some(mut trace) = self.trace.take() {
            let outcome = match ending {
                Ending::Completed => Outcome::Completed,
                Ending::Failed => Outcome::Failed,
                Ending::Cancelled => Outcome::Cancelled,
            };
            trace.end(
                outcome,
                Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                    retries: self.retries,
                },
            );
        }
        // The key's running count frees with the request, not with its connection.
        self.tenant = None;
        if let Some(session) = &self.exchange.session {
            let used = match ending {
                Ending::Completed => {
                    self.prompt_tokens.unwrap_or(0) + self.completion_tokens.unwrap_or(0)
                }
                Ending::Failed | Ending::Cancelled => 0,
            };
            self.state.sessions.end_turn(session, used, Instant::now());
        }
        let Some(Placement {
            pool,
            lease: Some(lease),
            ..
        }) = placement
        else {
            return;
        };
        let held_for = self
            .engine_started
            .map_or(Duration::ZERO, |at| at.elapsed());
        let session = self.exchange.session.clone().map(|session| (session, pool));
        self.state.scheduler.served(session, held_for);
        let outcome = match ending {
            Ending::Completed => ReleaseOutcome::Completed,
            Ending::Failed => ReleaseOutcome::Failed,
            Ending::Cancelled => ReleaseOutcome::Cancelled,
        };
        self.ending_lease = Some((lease, outcome));
    }
}

impl Drop for Lifecycle {
    /// The client went away (or the caller gave up) before the end: nobody waits for the release.
    fn drop(&mut self) {
        self.settle(Ending::Cancelled);
        if let Some((lease, outcome)) = self.ending_lease.take() {
            lease.release_detached(outcome);
        }
    }
}

/// Releases `lease` and waits for pool-managerd to confirm it. A lease pool-managerd no longer
/// knows was taken back already (revoked, or expired, while the request ended): nothing to warn
/// about.
async fn give_back(lease: LeaseGuard, outcome: ReleaseOutcome) {
    let pool = lease.lease().pool.clone();
    match lease.release(outcome).await {
        Ok(()) => {}
        Err(ClientError::Remote(error)) if error.code == ErrorCode::NotFound => {
            tracing::debug!(%pool, "the lease was taken back already");
        }
        Err(error) => {
            tracing::warn!(%pool, %error, "lease release failed; the connection's close returns it");
        }
    }
}

/// Completes when the placement's lease is revoked; never for a request without a lease.
fn revoked(placement: &Placement) -> impl Future<Output = ()> + use<> {
    let revocation = placement.lease.as_ref().map(LeaseGuard::revoked);
    async move {
        match revocation {
            Some(revocation) => revocation.await,
            None => std::future::pending().await,
        }
    }
}

/// A ready pool for a request that takes no slot, straight from the registry mirror, as `hints`
/// allow.
fn unleased_placement(
    state: &AppState,
    exchange: &Exchange,
    hints: &PlacementHints,
) -> Result<Placement, ApiError> {
    let mirror = state.mirror.borrow();
    if !mirror.connected {
        return Err(ApiError::PoolUnavailable {
            retry_after: crate::error::POOL_MANAGER_RETRY_AFTER,
        });
    }
    let wanted = Wanted {
        model: &exchange.model,
        api: exchange.api,
        slots: SlotNeed::ONE,
        hints,
        held_back: &[],
    };
    let pool = placement::choose_unleased(&mirror.snapshot, &wanted).map_err(|why| match why {
        NoPlacement::UnknownModel => ApiError::ModelNotFound(exchange.model.clone()),
        NoPlacement::ApiNotServed => ApiError::EndpointNotServed {
            model: exchange.model.clone(),
            path: exchange.api.path(),
        },
        NoPlacement::TooManyParallel { .. }
        | NoPlacement::NoneReady
        | NoPlacement::Busy
        | NoPlacement::OutOfService => ApiError::PoolUnready(exchange.model.clone()),
    })?;
    let snapshot = mirror
        .snapshot
        .pool(&pool)
        .ok_or_else(|| ApiError::Internal("placement chose a pool it cannot see".into()))?;
    Ok(Placement {
        pool,
        endpoint: snapshot.endpoint.clone(),
        engine: snapshot.engine,
        queued_for: Duration::ZERO,
        lease: None,
    })
}

/// The engine request of a native task on an engine of `kind`.
fn task_request(
    kind: EngineKind,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> (EngineRoute, Bytes) {
    let body = match kind {
        EngineKind::Llamacpp => {
            json!({"prompt": prompt, "n_predict": max_tokens, "stream": true})
        }
        EngineKind::Openai => json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "stream": true, "stream_options": {"include_usage": true},
        }),
    };
    let route = match kind {
        EngineKind::Llamacpp => EngineRoute::Completion,
        EngineKind::Openai => EngineRoute::Completions,
    };
    (route, Bytes::from(body.to_string()))
}

/// An adapter failure as clients see it.
pub fn adapter_error(error: AdapterError) -> ApiError {
    match error {
        AdapterError::WorkerReset { detail } => {
            tracing::warn!(%detail, "engine request failed");
            ApiError::WorkerReset(detail)
        }
        AdapterError::DecodeTimeout { after } => ApiError::DecodeTimeout(after),
        AdapterError::EngineRejected { status, body } => ApiError::from_engine(status, &body),
        AdapterError::Cancelled => ApiError::ShuttingDown,
        error @ AdapterError::UnsupportedRoute { .. } => ApiError::Internal(error.to_string()),
    }
}

/// How a request's answer goes back to the client.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// Relayed event by event; an OpenAI stream's usage chunk only when `include_usage`.
    Stream {
        format: StreamFormat,
        include_usage: bool,
    },
    /// The engine's answer as it came, its top-level `model` set to the id the client asked for.
    Whole,
}

/// Runs `exchange` to its end and answers the client: the whole life of one HTTP request.
pub async fn serve(
    state: &AppState,
    exchange: Exchange,
    shape: ErrorShape,
    reply: Reply,
) -> Response {
    let mut life = match Lifecycle::admit(state, exchange).await {
        Ok(life) => life,
        Err(error) => return error.response(shape),
    };
    let response = match reply {
        Reply::Whole => match life.whole().await {
            Ok(answer) => whole_response(answer),
            Err(error) => error.response(shape),
        },
        Reply::Stream {
            format,
            include_usage,
        } => {
            // Quick outcomes keep their HTTP status (an engine's own refusal too); a long wait
            // turns into a stream with keep-alives.
            let keepalive = state.config.get().keepalive;
            loop {
                match tokio::time::timeout(keepalive, life.placed()).await {
                    Ok(Err(error)) => return with_retries(error.response(shape), life.retries()),
                    Ok(Ok(())) => match life.open_stream().await {
                        Err(error) => return with_retries(error.response(shape), life.retries()),
                        Ok(Opened::Requeued) => continue,
                        Ok(Opened::Streaming) => {}
                    },
                    Err(_) => {}
                }
                break;
            }
            let retries_before = life.retries();
            // A request still queued after the keep-alive interval answers with its head now.
            let queued = life.ticket().is_some();
            let mut relay = Relay {
                life,
                format,
                include_usage,
                keepalive,
                ready: None,
            };
            // The head waits for the first frame (the keep-alive interval at most), so that both
            // leave in one write: one syscall and one client wake-up fewer per stream. A first
            // frame still coming after that follows the head as before.
            let mut first = Box::pin(async move {
                let frame = relay.next_frame().await;
                (frame, relay)
            });
            let started = if queued {
                None
            } else {
                tokio::select! {
                    biased;
                    started = &mut first => Some(started),
                    () = tokio::time::sleep(keepalive) => None,
                }
            };
            let (head_start, retries) = match started {
                Some((frame, relay)) => {
                    let retries = relay.life.retries();
                    (Either::Left(std::future::ready((frame, relay))), retries)
                }
                None => (Either::Right(first), retries_before),
            };
            let frames = futures_util::stream::once(head_start).flat_map(|(frame, relay)| {
                futures_util::stream::iter(frame).chain(futures_util::stream::unfold(
                    relay,
                    |mut relay| async move { relay.next_frame().await.map(|frame| (frame, relay)) },
                ))
            });
            let response = sse::response(frames.map(Ok::<Bytes, Infallible>));
            return with_retries(response, retries);
        }
    };
    with_retries(response, life.retries())
}

/// Says on a response how many times its request went to another pool after an engine failed
/// before answering (nothing when it never did).
fn with_retries(mut response: Response, retries: u32) -> Response {
    if retries > 0 {
        response
            .headers_mut()
            .insert(ENGINE_RETRIES_HEADER, HeaderValue::from(retries));
    }
    response
}

/// A whole answer as the client gets it: the engine's status, content type and (already
/// rewritten, see [`for_client`]) body.
fn whole_response(answer: WholeAnswer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let content_type = answer
        .content_type
        .unwrap_or(HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// The response header [`with_retries`] sets.
pub const ENGINE_RETRIES_HEADER: HeaderName = HeaderName::from_static("x-engine-retries");

/// Answers larger than this are read on a blocking thread.
const READ_OFF_THREAD_BYTES: usize = 1024 * 1024;

/// A whole answer as the client gets it, and its token counts, from one reading of its top level:
/// the body with its top-level `model` string replaced by `model` (unchanged when it has none,
/// names it already, or is not a JSON object; otherwise every member's value keeps its bytes), and
/// `usage` in OpenAI's names or in Anthropic's and the Responses API's.
fn for_client(body: Bytes, model: &str) -> (Bytes, (Option<u64>, Option<u64>)) {
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
    let Ok(mut top) = TopLevel::parse(&body) else {
        return (body.clone(), (None, None));
    };
    let usage = match top.parse_member::<Usage>("usage") {
        Some(Ok(usage)) => (
            usage.prompt_tokens.or(usage.input_tokens),
            usage.completion_tokens.or(usage.output_tokens),
        ),
        Some(Err(_)) | None => (None, None),
    };
    let renamed = match top.parse_member::<String>("model") {
        Some(Ok(named)) if named != model => serde_json::to_string(model)
            .ok()
            .and_then(|text| json_object::raw(text).ok()),
        Some(_) | None => None,
    };
    let Some(quoted) = renamed else {
        return (body.clone(), usage);
    };
    top.set("model", quoted);
    (Bytes::from(top.to_vec()), usage)
}

/// The body of a streaming response: waits for the lease (sending keep-alives), opens the engine
/// stream, relays its events as they came, and ends with the engine's terminator or one error
/// event in the stream's format. Dropping it (the client went away) drops the lifecycle, which
/// closes the engine connection and releases the lease.
struct Relay {
    life: Lifecycle,
    format: StreamFormat,
    include_usage: bool,
    keepalive: Duration,
    /// The event after the one being handed over, taken ahead (see `next_frame`).
    ready: Option<Result<EngineEvent, ApiError>>,
}

impl Relay {
    /// The next bytes for the client, or `None` at the end. Every await leaves the request's
    /// state in `life`, so a client that leaves mid-await is seen by its `Drop`.
    ///
    /// Frames leave in as few writes as the engine allows: after a chunk the next event is taken
    /// ahead — one the engine already sent, or, after an OpenAI finish chunk that adds no output,
    /// the stream's end whenever it comes — so that the frames follow each other without a wait
    /// and hyper writes them in one call. When the event taken ahead ends the stream after a chunk
    /// without output, the lease is released (and confirmed) before the chunk is handed over, so
    /// nothing waits between the last frames either; a chunk with output is never held back for
    /// the release. Nothing else is held: progress, pings and reasoning go out as they come.
    async fn next_frame(&mut self) -> Option<Bytes> {
        let event = match self.ready.take() {
            Some(event) => event,
            None => match self.next_event().await {
                Ok(event) => event,
                Err(frame) => return frame,
            },
        };
        if let Ok(EngineEvent::Chunk {
            tokens,
            closes_choice,
            ..
        }) = &event
        {
            self.ready = if *closes_choice {
                match self.life.next_event().await {
                    Some(Ok(Next::Event(next))) => Some(Ok(next)),
                    Some(Err(error)) => Some(Err(error)),
                    // No retry once the answer began; the next call sees the requeue.
                    Some(Ok(Next::Requeued)) | None => None,
                }
            } else {
                self.life.next_ready_event().map(Ok)
            };
            // Only a chunk without output waits for the release: a last token never does.
            if *tokens == 0 && matches!(self.ready, Some(Ok(EngineEvent::Done { .. }))) {
                self.life.release().await;
            }
        }
        Some(self.frame_of(event).await)
    }

    /// The next engine event, waiting for the lease and opening the stream as needed; or, as
    /// `Err`, what to send instead (a keep-alive while queued, an error event) or `None` at the
    /// end.
    async fn next_event(&mut self) -> Result<Result<EngineEvent, ApiError>, Option<Bytes>> {
        loop {
            if self.life.ticket().is_some() {
                match tokio::time::timeout(self.keepalive, self.life.placed()).await {
                    Err(_) => return Err(Some(Bytes::from_static(sse::KEEP_ALIVE))),
                    Ok(Err(error)) => return Err(Some(error_event(&error, self.format))),
                    Ok(Ok(())) => {}
                }
            }
            if matches!(self.life.phase, Phase::Placed(_)) {
                match self.life.open_stream().await {
                    Err(error) => return Err(Some(error_event(&error, self.format))),
                    Ok(Opened::Requeued) => continue,
                    Ok(Opened::Streaming) => {}
                }
            }
            match self.life.next_event().await {
                None => return Err(None),
                Some(Ok(Next::Requeued)) => continue,
                Some(Ok(Next::Event(event))) => return Ok(Ok(event)),
                Some(Err(error)) => return Ok(Err(error)),
            }
        }
    }

    /// The bytes of one event for the client; the end of the stream (its terminator or an error)
    /// comes after the lease is released.
    async fn frame_of(&mut self, event: Result<EngineEvent, ApiError>) -> Bytes {
        if !matches!(event, Ok(EngineEvent::Chunk { .. })) {
            self.life.release().await;
        }
        match event {
            Ok(EngineEvent::Chunk { frame, .. }) => frame,
            Ok(EngineEvent::Done {
                usage_frame,
                terminator,
                ..
            }) => match usage_frame.filter(|_| self.include_usage) {
                Some(usage) => {
                    let mut tail = Vec::with_capacity(usage.len() + terminator.len());
                    tail.extend_from_slice(&usage);
                    tail.extend_from_slice(&terminator);
                    Bytes::from(tail)
                }
                None => terminator,
            },
            Err(error) => error_event(&error, self.format),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(text: &'static [u8]) -> Bytes {
        Bytes::from_static(text)
    }

    #[test]
    fn a_whole_answer_names_the_model_asked_for_and_keeps_every_other_value_byte_for_byte() {
        let (body, usage) = for_client(
            body_of(
                br#"{"id":"x","model":"engine.gguf","choices":[{"logprobs":{"content":[{"logprob":-0.10000000149011612}]}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            ),
            "tiny",
        );
        assert_eq!(
            &body[..],
            &br#"{"id":"x","model":"tiny","choices":[{"logprobs":{"content":[{"logprob":-0.10000000149011612}]}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#[..]
        );
        assert_eq!(usage, (Some(3), Some(4)));
        for unchanged in [
            &br#"{"model":"tiny", "a": 1}"#[..],
            &br#"{"input_tokens":3}"#[..],
            &b"[1]"[..],
        ] {
            let body = Bytes::copy_from_slice(unchanged);
            assert_eq!(for_client(body.clone(), "tiny").0, body);
        }
    }

    #[test]
    fn usage_is_read_in_every_apis_names() {
        let usage = |text: &'static [u8]| for_client(body_of(text), "m").1;
        assert_eq!(
            usage(br#"{"usage":{"input_tokens":5,"output_tokens":6}}"#),
            (Some(5), Some(6))
        );
        assert_eq!(
            usage(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            (Some(8), None)
        );
        assert_eq!(usage(br#"{"data":[]}"#), (None, None));
    }
}
