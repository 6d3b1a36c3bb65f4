//! Connections to one engine endpoint, and what each has carried, so the retry rule (`clients`)
//! can tell a request that died on a *reused* connection before any byte of its answer arrived
//! from one the engine may have acted on.
//!
//! [`TcpEngineConnector`] (hyper-util's `HttpConnector`, `TCP_NODELAY` on) and
//! [`UnixEngineConnector`] (the endpoint's socket path; the request URI's authority is ignored)
//! hand hyper [`Tracked`] streams that note, without locks, the turns of the HTTP/1 exchange: a
//! write after a read (or the first write) starts a new request, a read that returns bytes means
//! its answer began; and when the request's last byte was written. hyper-util attaches each
//! connection's `Connected` info, which carries its [`ConnectionUse`], to the error of a request
//! that failed on it; `clients` reads it there.
//!
//! Why this is needed: llama-server (cpp-httplib) closes the connection after every streamed
//! response although it advertises `Keep-Alive`, and hyper returns the connection to the pool as
//! soon as the body's terminator arrives, a moment before the close does. A request sent on it at
//! that moment (a slot just freed, the next request dispatched) is written whole and then meets
//! the close at once. An engine that closed an idle connection never read that request, so it may
//! be sent again on a fresh connection. A connection that fails later than
//! [`STALE_CLOSE_WINDOW`] after the request went out may have carried it to an engine that worked
//! on it (an answer that comes only when done, a proxy's idle timeout): that one is not resent.
//!
//! Invariant: the bookkeeping only observes; it never changes what is read or written.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting<S> =
    Pin<Box<dyn Future<Output = Result<TokioIo<Tracked<S>>, BoxError>> + Send + 'static>>;

/// `UseState::turn` before the first write is 0.
const WRITING: u8 = 1;
const READING: u8 = 2;

/// How soon after a request was written a connection must fail for the failure to be the close of
/// an idle connection the engine never read from. The engine's close is already on its way when we
/// write (on loopback it follows its last chunk by microseconds), so the failure shows at the first
/// read; this leaves room for a busy machine. An engine that read a request and worked on it fails
/// later than this.
pub(super) const STALE_CLOSE_WINDOW: Duration = Duration::from_millis(50);

/// A fixed point to measure write times from, so they fit an atomic.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The exchange so far on one connection; shared by the stream and its `Connected` info.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnectionUse(Arc<UseState>);

#[derive(Debug, Default)]
struct UseState {
    /// Requests started on the connection (writes that followed a read, or the first write).
    requests: AtomicU32,
    /// `WRITING` from a request's first byte until its answer's first byte, then `READING`.
    turn: AtomicU8,
    /// When a byte was last written ([`epoch`]-relative nanoseconds).
    last_write: AtomicU64,
}

impl ConnectionUse {
    /// The use recorded in `connected` (hyper-util's info on the connection a request failed on).
    pub(super) fn of(connected: &Connected) -> Option<ConnectionUse> {
        let mut extensions = hyper::http::Extensions::new();
        connected.get_extras(&mut extensions);
        extensions.remove::<ConnectionUse>()
    }

    /// An earlier request went out on this connection before the current one.
    pub(super) fn was_reused(&self) -> bool {
        self.0.requests.load(Ordering::Relaxed) > 1
    }

    /// The current request was written (in part or whole) and not one byte of its answer came.
    pub(super) fn awaiting_answer(&self) -> bool {
        self.0.turn.load(Ordering::Relaxed) == WRITING
    }

    /// How long ago the last byte was written.
    pub(super) fn since_last_write(&self) -> Duration {
        let written = self.0.last_write.load(Ordering::Relaxed);
        Duration::from_nanos(nanos_since_epoch().saturating_sub(written))
    }

    /// The engine closed this connection while it was idle and never read the current request:
    /// an earlier request was answered on it, no byte of this one's answer came, and it failed at
    /// once after being written.
    pub(super) fn closed_while_idle(&self) -> bool {
        self.was_reused() && self.awaiting_answer() && self.since_last_write() <= STALE_CLOSE_WINDOW
    }

    fn wrote(&self) {
        self.0
            .last_write
            .store(nanos_since_epoch(), Ordering::Relaxed);
        if self.0.turn.swap(WRITING, Ordering::Relaxed) != WRITING {
            self.0.requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) {
        self.0.turn.store(READING, Ordering::Relaxed);
    }
}

/// A stream that records its [`ConnectionUse`].
#[derive(Debug)]
pub(super) struct Tracked<S> {
    inner: S,
    usage: ConnectionUse,
}

impl<S> Tracked<S> {
    fn new(inner: S) -> TokioIo<Self> {
        TokioIo::new(Tracked {
            inner,
            usage: ConnectionUse::default(),
        })
    }
}

impl<S: Connection> Connection for Tracked<S> {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.usage.clone())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.usage.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !data.is_empty() {
            this.usage.wrote();
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if data.iter().any(|slice| !slice.is_empty()) {
            this.usage.wrote();
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// TCP connections to an engine, `TCP_NODELAY` on (without it Nagle's algorithm against a delayed
/// ACK adds ~40 ms per request on a keep-alive connection).
#[derive(Debug, Clone)]
pub(super) struct TcpEngineConnector(HttpConnector);

impl TcpEngineConnector {
    pub(super) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        Self(connector)
    }
}

impl Service<Uri> for TcpEngineConnector {
    type Response = TokioIo<Tracked<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting<TcpStream>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(Tracked::new(connecting.await?.into_inner())) })
    }
}

/// Connections to an engine's Unix socket.
#[derive(Debug, Clone)]
pub(super) struct UnixEngineConnector {
    path: Arc<Path>,
}

impl UnixEngineConnector {
    pub(super) fn new(path: &str) -> Self {
        Self {
            path: Arc::from(Path::new(path)),
        }
    }
}

impl Service<Uri> for UnixEngineConnector {
    type Response = TokioIo<Tracked<UnixStream>>;
    type Error = BoxError;
    type Future = Connecting<UnixStream>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = Arc::clone(&self.path);
        Box::pin(async move { Ok(Tracked::new(UnixStream::connect(&*path).await?)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_reused_from_its_second_request_and_awaits_until_its_answer_begins() {
        let usage = ConnectionUse::default();
        usage.wrote();
        usage.wrote();
        assert!(
            !usage.was_reused(),
            "a head and a body written are one request"
        );
        assert!(usage.awaiting_answer());
        usage.read();
        usage.read();
        assert!(!usage.awaiting_answer());
        usage.wrote();
        assert!(usage.was_reused());
        assert!(usage.awaiting_answer());
        assert!(usage.closed_while_idle());
        assert!(usage.since_last_write() < STALE_CLOSE_WINDOW);
    }
}
