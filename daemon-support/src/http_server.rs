//! Serving HTTP/1.1 on a TCP listener for both daemons (orchestratord's API, pool-managerd's debug
//! shim), with the limits a hostile or broken client meets:
//! - at most [`HttpLimits::max_connections`] connections at once; further ones wait in the kernel's
//!   accept backlog, which costs this process no file descriptor, and are accepted as others close;
//! - a request head must arrive whole within [`HttpLimits::header_timeout`], and so must the next
//!   one on an idle keep-alive connection (hyper's header read timeout: one timer for both), so a
//!   client that sends half a head, or nothing, holds its connection only that long;
//! - `TCP_NODELAY` on every connection, and `TCP_USER_TIMEOUT` at
//!   [`HttpLimits::unread_timeout`]: a client that stops reading while we have bytes for it (its
//!   receive window stays shut) is disconnected by the kernel after that long, which ends the
//!   request it was being answered (a stream's engine connection and lease go with it).
//!
//! - with [`HttpLimits::body_timeout`], a request body whose next bytes take longer than that to
//!   arrive fails its reader (tower-http's `TimeoutBody`, a timer per wait, restarted by each piece
//!   that arrives); the answer to the failed read ends the connection, since its body is unread.
//!   Without it (orchestratord, which bounds the whole read where it reads a body, in its
//!   `Inbound`, and answers 408) bodies are handed over as they come.
//!
//! Every request carries its connection's peer address as a [`PeerAddr`] extension.
//!
//! These bound reading requests and idle connections, never the answer: a request that is waiting
//! for a slot, or streaming, keeps its connection as long as it needs.
//!
//! When `shutdown` completes, nothing more is accepted, idle connections close, and every
//! connection finishes the request it is serving; [`serve`] returns once all have closed.

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request's body as [`serve`] hands it to the service: behind [`HttpLimits::body_timeout`]
/// when that is set, as it came otherwise.
pub type RequestBody = Either<TimeoutBody<Incoming>, Incoming>;

/// What one HTTP server allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    /// For a whole request head, and for the next head on an idle keep-alive connection.
    pub header_timeout: Duration,
    /// How long sent bytes may stay unacknowledged (or unsent for a shut receive window).
    pub unread_timeout: Duration,
    /// How long a request body's reader waits for its next bytes; `None`: as long as it likes
    /// (the service bounds the read itself).
    pub body_timeout: Option<Duration>,
}

impl HttpLimits {
    /// `max_connections`, but never more than three quarters of this process's file descriptor
    /// limit (`RLIMIT_NOFILE`), so connections cannot take the descriptors engines, sockets and
    /// logs need.
    pub fn within_fd_limit(
        max_connections: usize,
        header_timeout: Duration,
        unread_timeout: Duration,
    ) -> HttpLimits {
        let fd_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(u64::MAX, |(soft, _)| soft);
        let room = usize::try_from(fd_limit / 4 * 3)
            .unwrap_or(usize::MAX)
            .max(1);
        HttpLimits {
            max_connections: max_connections.min(room).max(1),
            header_timeout,
            unread_timeout,
            body_timeout: None,
        }
    }

    /// These limits, with request bodies read within `body_timeout` per wait.
    pub fn with_body_timeout(self, body_timeout: Duration) -> HttpLimits {
        HttpLimits {
            body_timeout: Some(body_timeout),
            ..self
        }
    }
}

/// `service` with each request's body behind `body_timeout`, if set.
#[derive(Clone)]
struct BoundedBodies<S> {
    service: S,
    body_timeout: Option<Duration>,
    peer: SocketAddr,
}

/// The address a request's connection came from (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl<S> tower_service::Service<Request<Incoming>> for BoundedBodies<S>
where
    S: tower_service::Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> S::Future {
        let body_timeout = self.body_timeout;
        let mut request = request.map(|body| match body_timeout {
            Some(timeout) => Either::Left(TimeoutBody::new(timeout, body)),
            None => Either::Right(body),
        });
        request.extensions_mut().insert(PeerAddr(self.peer));
        self.service.call(request)
    }
}

/// Serves `service` on `listener` within `limits` until `shutdown` completes (module header).
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower_service::Service<Request<RequestBody>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors (or a connection reset before it was accepted): back off
                // briefly rather than spin; what is open keeps being served.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let unread_ms = u32::try_from(limits.unread_timeout.as_millis()).unwrap_or(u32::MAX);
        if let Err(error) = nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::TcpUserTimeout,
            &unread_ms,
        ) {
            tracing::debug!(%error, "cannot set TCP_USER_TIMEOUT");
        }
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(BoundedBodies {
                service: service.clone(),
                body_timeout: limits.body_timeout,
                peer,
            }),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
