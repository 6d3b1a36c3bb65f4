//! [`EngineClients`]: one pooled HTTP/1.1 client per engine endpoint, and the one retry rule.
//!
//! Each endpoint gets, on first use, a hyper-util client over a TCP or Unix-socket connector from
//! `connection`, whose connections record what they carried. Connections are kept alive and
//! reused. Idle ones are dropped after [`IDLE_TIMEOUT`], below cpp-httplib's 5 s keep-alive in
//! llama-server, so we do not pick a connection the engine is about to time out.
//!
//! Streams to llama-server always go on a new connection: it closes the connection after every
//! streamed response (it advertises `Keep-Alive`, then half-closes, reads and discards whatever
//! arrives for 100 ms, and closes: cpp-httplib's `drain_and_close_socket`), so a pooled one could
//! only meet that close. Meeting it mostly failed fast and was sent again (below), but about once
//! in 15 runs of the 256-stream load test a request written on such a connection got neither an
//! answer nor an error until the 30 s stall limit (seen in hyper-util's trace: "reuse idle
//! connection", then nothing).
//!
//! Retry rule (the only one): a request is sent again, once, on a brand-new connection, only when
//! the engine cannot have acted on it:
//! - establishing the connection failed (`hyper_util::client::legacy::Error::is_connect()`);
//! - hyper handed the request back unsent: the pooled connection was found closed before its task
//!   dequeued the request (hyper-util's `Canceled` kind, caused by a `hyper::Error` with
//!   `is_canceled()`);
//! - writing the request failed (hyper's `BodyWrite` kind, "error writing a body to connection",
//!   e.g. EPIPE): a failed write means at least the request's last bytes never left, and an engine
//!   acts only on a complete request (a JSON body of known length). This is how a stale pooled
//!   Unix-socket connection often shows up;
//! - the connection had already carried an earlier request and failed (closed, reset) before one
//!   byte of this request's answer arrived, at once after the request was written (within
//!   `connection::STALE_CLOSE_WINDOW`; [`ConnectionUse::closed_while_idle`]): the engine closed a
//!   connection it held idle and never read the request. llama-server does this after every
//!   streamed response (it advertises `Keep-Alive` and then closes) and after 100 requests on one
//!   connection, and hyper pools the connection a moment before the close arrives, so under load a
//!   request dispatched the instant a slot frees meets it. On TCP the write then succeeds and the
//!   failure is the read's (EOF or reset). A failure that comes later may be an engine that read
//!   the request and worked on it (it answers only when done): never resent.
//!
//! The first three kinds have no public predicate, so each is recognised by its type in the error
//! chain *and* its `Display` text: if an upgrade rewords one, we retry less, never more (the
//! stale-connection tests pin the behaviour). Never retried: a failure on a connection's first
//! request after it was written, or anything after the first byte of the answer, since the engine
//! may have started the generation.
//!
//! hyper-util's own retry of unsent requests is switched off, so this is the whole policy, and the
//! retry goes to a client with pooling disabled: after an engine restart every pooled connection is
//! stale, and "try another pooled one" could hit the next stale one. A generation never runs twice.
//!
//! Connection tasks (and hyper-util's pool tasks) run on a `TaskTracker` owned here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::HeaderMap;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioTimer;
use pool_ipc::registry::{Endpoint, EngineKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{ConnectionUse, TcpEngineConnector, UnixEngineConnector};
use super::stream::EngineStream;
use super::{AdapterError, EngineRequest, MAX_ENGINE_TEXT, error_chain};

/// How long an idle pooled connection may be reused. Below cpp-httplib's (llama-server's) 5 s
/// keep-alive timeout, so the engine never closes a connection just as we reuse it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// The largest non-streaming answer read (an embeddings batch of a few thousand wide vectors fits).
pub const MAX_WHOLE_ANSWER: usize = 256 * 1024 * 1024;

/// A non-streaming request: a POST of a JSON `body` to `path` on the engine at `endpoint`.
#[derive(Debug, Clone)]
pub struct WholeRequest {
    pub endpoint: Endpoint,
    pub path: &'static str,
    pub body: Bytes,
    /// Client headers the engine may use (trace context, API versions).
    pub headers: HeaderMap,
}

/// An engine's 2xx answer to a [`WholeRequest`], as it came.
#[derive(Debug, Clone)]
pub struct WholeAnswer {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

type LegacyError = hyper_util::client::legacy::Error;

/// Runs hyper's connection tasks on a tracker, so they have an owner ([`EngineClients::close`]).
#[derive(Debug, Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        // The tracker owns the task; the handle is not needed.
        drop(self.0.spawn(future));
    }
}

/// The two clients of one endpoint: `shared` pools connections, `fresh` never reuses one (for the
/// retry of a request that a stale pooled connection handed back).
#[derive(Debug, Clone)]
struct Clients<C> {
    shared: Client<C, Full<Bytes>>,
    fresh: Client<C, Full<Bytes>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    Shared,
    Fresh,
}

impl<C> Clients<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    fn new(executor: &TrackedExecutor, connector: C) -> Self {
        let mut builder = Client::builder(executor.clone());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            // This module decides retries (see the module header).
            .retry_canceled_requests(false);
        let shared = builder.build(connector.clone());
        builder.pool_max_idle_per_host(0);
        let fresh = builder.build(connector);
        Self { shared, fresh }
    }

    async fn send(
        &self,
        pool: Pool,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, LegacyError> {
        match pool {
            Pool::Shared => self.shared.request(request).await,
            Pool::Fresh => self.fresh.request(request).await,
        }
    }
}

/// How requests reach one endpoint.
#[derive(Debug, Clone)]
enum Transport {
    Tcp {
        clients: Clients<TcpEngineConnector>,
        authority: Authority,
    },
    /// The connector holds the socket path; URIs carry a placeholder authority.
    Unix {
        clients: Clients<UnixEngineConnector>,
    },
}

impl Transport {
    fn new(executor: &TrackedExecutor, endpoint: &Endpoint) -> Result<Self, AdapterError> {
        match endpoint {
            Endpoint::Http { authority } => Ok(Self::Tcp {
                clients: Clients::new(executor, TcpEngineConnector::new()),
                authority: Authority::try_from(authority.as_str()).map_err(bad_uri)?,
            }),
            Endpoint::Unix { path } => Ok(Self::Unix {
                clients: Clients::new(executor, UnixEngineConnector::new(path)),
            }),
        }
    }

    fn uri(&self, path: &'static str) -> Result<Uri, AdapterError> {
        let authority = match self {
            Self::Tcp { authority, .. } => authority.clone(),
            Self::Unix { .. } => Authority::from_static("localhost"),
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(PathAndQuery::from_static(path))
            .build()
            .map_err(bad_uri)
    }

    async fn send(
        &self,
        pool: Pool,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, LegacyError> {
        match self {
            Self::Tcp { clients, .. } => clients.send(pool, request).await,
            Self::Unix { clients } => clients.send(pool, request).await,
        }
    }
}

fn bad_uri(error: impl std::fmt::Display) -> AdapterError {
    AdapterError::WorkerReset {
        detail: format!("the engine endpoint cannot be addressed: {error}"),
    }
}

/// Whether the engine cannot have acted on the failed request (module header).
fn safe_to_resend(error: &LegacyError) -> bool {
    if error.is_connect() {
        return true;
    }
    if error
        .connect_info()
        .and_then(ConnectionUse::of)
        .is_some_and(|usage| usage.closed_while_idle())
    {
        return true;
    }
    let Some(cause) = hyper_cause(error) else {
        return false;
    };
    match error.to_string().as_str() {
        // The request came back from the connection's queue without being written.
        "client error (Canceled)" => cause.is_canceled(),
        // A write of the request failed, so its end never left.
        "client error (SendRequest)" => cause.to_string() == "error writing a body to connection",
        _ => false,
    }
}

/// The first `hyper::Error` in `error`'s source chain.
fn hyper_cause(error: &LegacyError) -> Option<&hyper::Error> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            return Some(hyper_error);
        }
        source = cause.source();
    }
    None
}

fn connection_lost(error: &LegacyError) -> AdapterError {
    AdapterError::WorkerReset {
        detail: error_chain(error),
    }
}

/// One pooled HTTP client per engine endpoint, created on first use. Shared by every request
/// (`&self`); cheap to call concurrently.
#[derive(Debug)]
pub struct EngineClients {
    /// Endpoint → its clients. A std mutex: held only to look up or insert, never across an await.
    transports: Mutex<HashMap<Endpoint, Transport>>,
    executor: TrackedExecutor,
    shutdown: CancellationToken,
    unsent_retries: AtomicU64,
}

impl Default for EngineClients {
    /// Clients with a shutdown token nobody cancels.
    fn default() -> Self {
        Self::new(CancellationToken::new())
    }
}

impl EngineClients {
    /// Cancelling `shutdown` (or calling [`close`](Self::close)) ends every request in flight, and
    /// every stream, with [`AdapterError::Cancelled`], closing its engine connection.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            transports: Mutex::new(HashMap::new()),
            executor: TrackedExecutor(TaskTracker::new()),
            // A child, so that `close` cancels engine work without cancelling the caller's token.
            shutdown: shutdown.child_token(),
            unsent_retries: AtomicU64::new(0),
        }
    }

    /// Sends `request` to its engine and returns the stream of its events once the engine has
    /// answered 2xx. Waits at most `request.head_limit` (default `stall_limit`) for the answer, then
    /// at most `stall_limit` for each later read. Sends `X-Correlation-Id: correlation_id` (omitted,
    /// with a warning, if it is not a valid header value).
    ///
    /// Dropping the returned future before it completes closes the connection, as dropping the
    /// stream does.
    pub async fn stream(
        &self,
        request: EngineRequest,
        stall_limit: Duration,
        correlation_id: &str,
    ) -> Result<EngineStream, AdapterError> {
        if !request.route.is_served_by(request.kind) {
            return Err(AdapterError::UnsupportedRoute {
                kind: request.kind,
                route: request.route,
            });
        }
        let head_limit = request.head_limit.unwrap_or(stall_limit);
        let transport = self.transport(&request.endpoint)?;
        let outgoing = Outgoing {
            path: request.route.path(),
            body: &request.body,
            headers: &request.headers,
            accept: EVENT_STREAM,
            correlation_id,
        };
        // See the module header: llama-server never keeps a streamed response's connection.
        let pool = match request.kind {
            EngineKind::Llamacpp => Pool::Fresh,
            EngineKind::Openai => Pool::Shared,
        };
        let exchange = tokio::time::timeout(head_limit, self.send(&transport, &outgoing, pool));
        let response = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Err(AdapterError::Cancelled),
            answer = exchange => match answer {
                Ok(response) => response?,
                Err(_) => return Err(AdapterError::DecodeTimeout { after: head_limit }),
            },
        };
        let status = response.status();
        let body = response.into_body();
        if !status.is_success() {
            let body = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Err(AdapterError::Cancelled),
                body = read_error_body(body, stall_limit) => body,
            };
            tracing::debug!(
                correlation_id,
                status = status.as_u16(),
                route = %request.route,
                engine = request.kind.name(),
                "engine rejected the request"
            );
            return Err(AdapterError::EngineRejected {
                status: status.as_u16(),
                body,
            });
        }
        Ok(EngineStream::new(
            status.as_u16(),
            body,
            request.route,
            stall_limit,
            self.shutdown.clone(),
            correlation_id,
        ))
    }

    /// Sends a non-streaming request and reads the engine's whole answer, all within `limit`. A 2xx
    /// answer is returned as it came (status, content type, body); any other status is
    /// [`AdapterError::EngineRejected`] with the engine's body. An answer larger than
    /// [`MAX_WHOLE_ANSWER`] is a [`AdapterError::WorkerReset`].
    ///
    /// Dropping the returned future closes the connection, so the engine sees its client leave.
    pub async fn whole(
        &self,
        request: &WholeRequest,
        limit: Duration,
        correlation_id: &str,
    ) -> Result<WholeAnswer, AdapterError> {
        let transport = self.transport(&request.endpoint)?;
        let outgoing = Outgoing {
            path: request.path,
            body: &request.body,
            headers: &request.headers,
            accept: JSON,
            correlation_id,
        };
        let exchange = async {
            let response = self.send(&transport, &outgoing, Pool::Shared).await?;
            let status = response.status();
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            let body = read_whole(response.into_body()).await?;
            Ok::<_, AdapterError>((status, content_type, body))
        };
        let answer = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Err(AdapterError::Cancelled),
            answer = tokio::time::timeout(limit, exchange) => match answer {
                Ok(answer) => answer?,
                Err(_) => return Err(AdapterError::DecodeTimeout { after: limit }),
            },
        };
        let (status, content_type, body) = answer;
        if !status.is_success() {
            tracing::debug!(
                correlation_id,
                status = status.as_u16(),
                path = request.path,
                "engine rejected the request"
            );
            let shown = &body[..body.len().min(MAX_ENGINE_TEXT)];
            return Err(AdapterError::EngineRejected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(shown).into_owned(),
            });
        }
        Ok(WholeAnswer {
            status: status.as_u16(),
            content_type,
            body,
        })
    }

    /// How many requests were sent a second time because the engine cannot have acted on the
    /// first attempt (a stale pooled connection, or a failed connect). For metrics and tests.
    pub fn unsent_retries(&self) -> u64 {
        self.unsent_retries.load(Ordering::Relaxed)
    }

    /// Drops the clients of an endpoint that is gone (its engine was stopped or moved), closing its
    /// idle connections. Streams already running keep their connections until they end.
    pub fn forget(&self, endpoint: &Endpoint) {
        let removed = self.transports().remove(endpoint);
        drop(removed);
    }

    /// Shuts the clients down: every request and stream in flight ends with
    /// [`AdapterError::Cancelled`] at its next poll, every endpoint is forgotten (idle connections
    /// close at once), then this waits until every connection task has ended — those of running
    /// streams end when their holders drop them. Requests made afterwards fail with `Cancelled`.
    pub async fn close(&self) {
        self.shutdown.cancel();
        let removed = std::mem::take(&mut *self.transports());
        drop(removed);
        self.executor.0.close();
        self.executor.0.wait().await;
    }

    fn transports(&self) -> MutexGuard<'_, HashMap<Endpoint, Transport>> {
        // The map is only inserted into or removed from; a panic elsewhere cannot leave it torn.
        self.transports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn transport(&self, endpoint: &Endpoint) -> Result<Transport, AdapterError> {
        let mut transports = self.transports();
        if let Some(transport) = transports.get(endpoint) {
            return Ok(transport.clone());
        }
        let transport = Transport::new(&self.executor, endpoint)?;
        transports.insert(endpoint.clone(), transport.clone());
        Ok(transport)
    }

    /// Sends once (on a pooled connection, or a new one with `Pool::Fresh`), and once more on a
    /// new connection if the engine cannot have acted on the first attempt.
    async fn send(
        &self,
        transport: &Transport,
        outgoing: &Outgoing<'_>,
        pool: Pool,
    ) -> Result<Response<Incoming>, AdapterError> {
        let correlation_id = outgoing.correlation_id;
        let first = transport.send(pool, build(transport, outgoing)?).await;
        let error = match first {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        if !safe_to_resend(&error) {
            return Err(connection_lost(&error));
        }
        self.unsent_retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            correlation_id,
            error = %error_chain(&error),
            "the engine cannot have acted on the request; sending it once more on a fresh connection"
        );
        transport
            .send(Pool::Fresh, build(transport, outgoing)?)
            .await
            .map_err(|error| connection_lost(&error))
    }
}

/// What goes to the engine: a POST of `body` to `path`, with the client's forwarded `headers`.
struct Outgoing<'a> {
    path: &'static str,
    body: &'a Bytes,
    headers: &'a HeaderMap,
    accept: HeaderValue,
    correlation_id: &'a str,
}

const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The HTTP request for `outgoing`. Its body is shared, not copied, between attempts.
fn build(
    transport: &Transport,
    outgoing: &Outgoing<'_>,
) -> Result<Request<Full<Bytes>>, AdapterError> {
    let mut http = Request::new(Full::new(outgoing.body.clone()));
    *http.method_mut() = Method::POST;
    *http.uri_mut() = transport.uri(outgoing.path)?;
    let headers = http.headers_mut();
    headers.clone_from(outgoing.headers);
    headers.insert(CONTENT_TYPE, JSON);
    headers.insert(ACCEPT, outgoing.accept.clone());
    match HeaderValue::from_str(outgoing.correlation_id) {
        Ok(value) => {
            headers.insert(CORRELATION_ID, value);
        }
        Err(_) => tracing::warn!(
            correlation_id = outgoing.correlation_id,
            "correlation id is not a valid header value; not sent to the engine"
        ),
    }
    Ok(http)
}

/// A non-streaming answer's body, up to [`MAX_WHOLE_ANSWER`] bytes.
async fn read_whole(mut body: Incoming) -> Result<Bytes, AdapterError> {
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| AdapterError::WorkerReset {
            detail: format!("engine answer broke: {}", error_chain(&error)),
        })?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > MAX_WHOLE_ANSWER {
                return Err(AdapterError::WorkerReset {
                    detail: format!("engine answer larger than {MAX_WHOLE_ANSWER} bytes"),
                });
            }
            if collected.is_empty() && body.is_end_stream() {
                return Ok(data);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

/// An error answer's body, up to [`MAX_ENGINE_TEXT`] bytes, read within `limit`.
async fn read_error_body(mut body: Incoming, limit: Duration) -> String {
    let mut collected = Vec::new();
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                let room = MAX_ENGINE_TEXT - collected.len();
                collected.extend_from_slice(&data[..data.len().min(room)]);
                if collected.len() >= MAX_ENGINE_TEXT {
                    break;
                }
            }
        }
    };
    // An engine that stalls mid-error keeps what it sent.
    let _ = tokio::time::timeout(limit, read).await;
    String::from_utf8_lossy(&collected).into_owned()
}
