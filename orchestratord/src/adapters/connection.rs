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
//!
//! [`Spares`]: connections opened ahead of demand. Every stream to llama-server needs a new
//! connection (it closes each after its answer), and connecting on the request's path costs
//! 1–3 ms of time to first token in a burst on a busy host (BENCHMARKS.md). Once an endpoint has
//! carried such a stream, its connector keeps [`SPARES`] never-used connections ready and opens a
//! new one whenever one is taken. A spare is handed out only while younger than
//! [`SPARE_MAX_AGE`] (below cpp-httplib's 5 s wait for a first request) and still open (a
//! non-blocking read finds nothing to read and no end of stream); otherwise it is dropped.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
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
    /// Opened ahead of demand and idle until its first request ([`Spares`]).
    spare: AtomicBool,
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
    /// the connection had sat idle before it (an earlier request was answered on it, or it was a
    /// spare opened ahead of demand), no byte of this one's answer came, and it failed at once
    /// after being written.
    pub(super) fn closed_while_idle(&self) -> bool {
        (self.was_reused() || self.0.spare.load(Ordering::Relaxed))
            && self.awaiting_answer()
            && self.since_last_write() <= STALE_CLOSE_WINDOW
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

    /// A spare handed out: it sat idle before its first request.
    fn spare(inner: S) -> TokioIo<Self> {
        let usage = ConnectionUse::default();
        usage.0.spare.store(true, Ordering::Relaxed);
        TokioIo::new(Tracked { inner, usage })
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

/// How many never-used connections an endpoint that needs a new one per stream keeps ready.
pub(super) const SPARES: usize = 4;

/// How old a spare may be when handed out: well below the 5 s cpp-httplib waits for a first
/// request before closing.
pub(super) const SPARE_MAX_AGE: Duration = Duration::from_secs(2);

/// A connection that can tell, without blocking, that it is still open and unused.
pub(super) trait SpareStream: Send + Sized + 'static {
    /// Open, and nothing has arrived on it (the peer sends nothing before a request).
    fn still_open(&self) -> bool;
}

impl SpareStream for TcpStream {
    fn still_open(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.try_read(&mut byte), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl SpareStream for UnixStream {
    fn still_open(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.try_read(&mut byte), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Connections opened ahead of demand for one endpoint (module header).
#[derive(Debug)]
pub(super) struct Spares<S> {
    ready: Mutex<VecDeque<(Instant, S)>>,
    /// Connects under way for the spares.
    opening: AtomicUsize,
    /// Set once the endpoint has carried a stream that needed a new connection.
    wanted: AtomicBool,
}

impl<S> Default for Spares<S> {
    fn default() -> Self {
        Self {
            ready: Mutex::new(VecDeque::new()),
            opening: AtomicUsize::new(0),
            wanted: AtomicBool::new(false),
        }
    }
}

impl<S: SpareStream> Spares<S> {
    /// From now on, keep spares for this endpoint.
    pub(super) fn want(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, S)>> {
        // Only pushes and pops happen under the lock; a panic elsewhere cannot tear it.
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A spare young enough and still open, if there is one (stale ones are dropped).
    fn take(&self) -> Option<S> {
        let mut ready = self.ready();
        while let Some((opened, stream)) = ready.pop_front() {
            if opened.elapsed() < SPARE_MAX_AGE && stream.still_open() {
                return Some(stream);
            }
        }
        None
    }

    /// Opens connections with `open` until `SPARES` are ready or on their way.
    fn refill<F, Fut>(self: &Arc<Self>, open: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::io::Result<S>> + Send + 'static,
    {
        if !self.wanted.load(Ordering::Relaxed) {
            return;
        }
        let have = self.ready().len();
        let opening = self.opening.load(Ordering::Relaxed);
        for _ in have + opening..SPARES {
            self.opening.fetch_add(1, Ordering::Relaxed);
            let spares: Weak<Self> = Arc::downgrade(self);
            let connecting = open();
            tokio::spawn(async move {
                let opened = connecting.await;
                let Some(spares) = spares.upgrade() else {
                    return;
                };
                spares.opening.fetch_sub(1, Ordering::Relaxed);
                if let Ok(stream) = opened {
                    spares.ready().push_back((Instant::now(), stream));
                }
            });
        }
    }
}

/// A connector that can be copied without its spares: a request sent again after its connection
/// failed goes on a connection opened for it, never on one that sat idle.
pub(super) trait WithoutSpares {
    fn without_spares(&self) -> Self;
}

impl WithoutSpares for TcpEngineConnector {
    fn without_spares(&self) -> Self {
        Self {
            connector: self.connector.clone(),
            spares: Arc::default(),
        }
    }
}

impl WithoutSpares for UnixEngineConnector {
    fn without_spares(&self) -> Self {
        Self {
            path: Arc::clone(&self.path),
            spares: Arc::default(),
        }
    }
}

/// TCP connections to an engine, `TCP_NODELAY` on (without it Nagle's algorithm against a delayed
/// ACK adds ~40 ms per request on a keep-alive connection).
#[derive(Debug, Clone)]
pub(super) struct TcpEngineConnector {
    connector: HttpConnector,
    spares: Arc<Spares<TcpStream>>,
}

impl TcpEngineConnector {
    pub(super) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        Self {
            connector,
            spares: Arc::default(),
        }
    }

    pub(super) fn spares(&self) -> Arc<Spares<TcpStream>> {
        Arc::clone(&self.spares)
    }
}

impl Service<Uri> for TcpEngineConnector {
    type Response = TokioIo<Tracked<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting<TcpStream>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connector.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let spare = self.spares.take();
        let connector = self.connector.clone();
        let spare_uri = uri.clone();
        self.spares.refill(move || {
            let connecting = connector.clone().call(spare_uri.clone());
            async move {
                connecting
                    .await
                    .map(TokioIo::into_inner)
                    .map_err(std::io::Error::other)
            }
        });
        if let Some(stream) = spare {
            return Box::pin(std::future::ready(Ok(Tracked::spare(stream))));
        }
        let connecting = self.connector.call(uri);
        Box::pin(async move { Ok(Tracked::new(connecting.await?.into_inner())) })
    }
}

/// Connections to an engine's Unix socket.
#[derive(Debug, Clone)]
pub(super) struct UnixEngineConnector {
    path: Arc<Path>,
    spares: Arc<Spares<UnixStream>>,
}

impl UnixEngineConnector {
    pub(super) fn new(path: &str) -> Self {
        Self {
            path: Arc::from(Path::new(path)),
            spares: Arc::default(),
        }
    }

    pub(super) fn spares(&self) -> Arc<Spares<UnixStream>> {
        Arc::clone(&self.spares)
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
        let spare = self.spares.take();
        let spare_path = Arc::clone(&self.path);
        self.spares.refill(move || {
            let path = Arc::clone(&spare_path);
            async move { UnixStream::connect(&*path).await }
        });
        if let Some(stream) = spare {
            return Box::pin(std::future::ready(Ok(Tracked::spare(stream))));
        }
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

    #[test]
    fn a_spare_that_fails_at_once_on_its_first_request_was_closed_while_idle() {
        let fresh = ConnectionUse::default();
        fresh.wrote();
        assert!(
            !fresh.closed_while_idle(),
            "a new connection's first request"
        );
        let spare = ConnectionUse::default();
        spare.0.spare.store(true, Ordering::Relaxed);
        spare.wrote();
        assert!(spare.closed_while_idle());
        spare.read();
        assert!(!spare.closed_while_idle(), "its answer began");
    }
}
