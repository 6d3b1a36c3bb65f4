//! The async client of pool-managerd's socket.
//!
//! One [`PoolClient`] owns one connection, shared by any number of concurrent callers: each call
//! gets an id, its frame is written straight into the socket (see [`crate::outbox`]), and a
//! supervisor task reads frames and hands each reply to its caller. When the
//! connection drops, calls in flight fail with [`ClientError::Disconnected`], and the supervisor
//! reconnects with jittered exponential backoff, re-asserting in its `Hello` every lease this
//! client still holds (each with the secret it was granted with) and re-subscribing, so the
//! server's slot accounting and the local mirror survive a sidecar restart. While it holds leases
//! it renews them on the open connection three times per lease time-to-live the server announced
//! in `Welcome`, so only a client that stops running (frozen, stuck) loses them to expiry.
//!
//! Leases never leak through this client: a granted lease reaches its caller as a [`LeaseGuard`]
//! whose `Drop` releases it, and a grant whose caller gave up (timed out or went away) is released
//! at once by the supervisor.

use crate::codec::{CodecError, DEFAULT_MAX_FRAME_BYTES, decode_payload, frame_bytes};
use crate::error_code::IpcError;
use crate::framed::{FrameReader, ReadError};
use crate::outbox::Outbox;
use crate::registry::{
    AcquireTarget, DispatchCheck, GpuInventory, Lease, LeaseId, MemoryReport, PoolId, PoolSnapshot,
    RegistrySnapshot, ReleaseOutcome,
};
use crate::wire::{
    Call, Change, ClientFrame, HeldLease, Hello, MAGIC, PROTOCOL_VERSION, Request, Response,
    ServerFrame, Welcome,
};
use backon::BackoffBuilder;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How to reach pool-managerd and how patient to be.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub socket_path: PathBuf,
    /// Shown in the server's logs.
    pub client_name: String,
    /// How long one call may wait for its reply.
    pub call_timeout: Duration,
    /// How long connecting plus the handshake may take.
    pub handshake_timeout: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub max_frame_bytes: u32,
}

impl ClientConfig {
    pub fn new(socket_path: impl Into<PathBuf>, client_name: impl Into<String>) -> ClientConfig {
        ClientConfig {
            socket_path: socket_path.into(),
            client_name: client_name.into(),
            call_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(2),
            reconnect_initial: Duration::from_millis(50),
            // A local socket: retrying often is cheap, and a restarted sidecar is found at once.
            reconnect_max: Duration::from_secs(1),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to pool-managerd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pool-managerd is not connected right now")]
    Unavailable,
    #[error("the connection to pool-managerd was lost before the reply arrived")]
    Disconnected,
    #[error("pool-managerd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("pool-managerd refused the connection: {0}")]
    Refused(IpcError),
    #[error(
        "protocol version mismatch: this client speaks version {client}, pool-managerd speaks version {server}"
    )]
    VersionMismatch { client: u32, server: u32 },
    #[error(transparent)]
    Remote(#[from] IpcError),
    #[error("frame error: {0}")]
    Frame(#[from] CodecError),
    #[error("connection error: {0}")]
    Read(#[from] ReadError),
    #[error("write to pool-managerd failed: {0}")]
    Write(std::io::Error),
    #[error("pool-managerd sent {0} where it should not")]
    UnexpectedFrame(&'static str),
    #[error("pool-managerd answered {request} with an unexpected response")]
    UnexpectedResponse { request: &'static str },
    #[error("use PoolClient::acquire for Acquire: it returns a guard that releases the lease")]
    AcquireNeedsGuard,
}

/// Where the client's connection stands; watch it with [`PoolClient::connection_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    Connecting,
    Connected { server_version: String },
    Disconnected { reason: String },
    Closed,
}

/// The local copy of the registry kept current by pushed events once subscribed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryMirror {
    /// False while disconnected: the pools shown may be stale.
    pub connected: bool,
    pub snapshot: RegistrySnapshot,
}

/// A lease the server took back (engine failed, pool removed, reconnect could not re-create it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRevoked {
    pub lease: LeaseId,
    pub pool: PoolId,
    pub reason: String,
}

/// What the supervisor hands a waiting caller.
enum Delivery {
    Reply(Result<Response, IpcError>),
    /// A granted lease, already wrapped so that dropping it anywhere releases it.
    Lease(LeaseGuard),
}

enum Pending {
    Caller(oneshot::Sender<Delivery>),
    /// Sent by the client itself (re-subscribe, releases from `Drop`); nobody waits.
    Internal(&'static str),
}

struct Shared {
    config: ClientConfig,
    /// The current connection's write side; `None` while disconnected.
    outbox: Mutex<Option<Arc<Outbox>>>,
    max_frame_bytes: AtomicU32,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// Every lease this client holds, as it re-asserts them after a reconnect.
    held: Mutex<HashMap<LeaseId, HeldLease>>,
    /// Cancelled when the server revokes the lease ([`LeaseGuard::revoked`]); an entry lives as
    /// long as the lease is in `held`.
    revocations: Mutex<HashMap<LeaseId, CancellationToken>>,
    subscribed: AtomicBool,
    mirror: watch::Sender<RegistryMirror>,
    state: watch::Sender<ConnectionState>,
    revoked: broadcast::Sender<LeaseRevoked>,
}

/// Locks a std mutex; the maps behind these locks are left consistent at every step, so a
/// poisoned lock (a panic elsewhere while holding it) is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Cancels the supervisor when the last `PoolClient` clone goes away.
struct Lifetime(CancellationToken);

impl Drop for Lifetime {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A cloneable handle on one shared connection to pool-managerd.
#[derive(Clone)]
pub struct PoolClient {
    shared: Arc<Shared>,
    lifetime: Arc<Lifetime>,
}

/// An established, handshaken connection.
struct Link {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    welcome: Welcome,
}

impl PoolClient {
    /// Connects now and fails with a clear error if that is impossible (daemon down, refused,
    /// version mismatch); afterwards reconnects by itself.
    pub async fn connect(config: ClientConfig) -> Result<PoolClient, ClientError> {
        let client = PoolClient::new(config);
        let link = establish(&client.shared).await?;
        let active = activate(&client.shared, link);
        client.spawn_supervisor(Some(active));
        Ok(client)
    }

    /// Returns at once and connects in the background, retrying with backoff until it succeeds.
    pub fn start(config: ClientConfig) -> PoolClient {
        let client = PoolClient::new(config);
        client.spawn_supervisor(None);
        client
    }

    fn new(config: ClientConfig) -> PoolClient {
        let max_frame_bytes = config.max_frame_bytes;
        let shared = Arc::new(Shared {
            config,
            outbox: Mutex::new(None),
            max_frame_bytes: AtomicU32::new(max_frame_bytes),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            held: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            mirror: watch::Sender::new(RegistryMirror::default()),
            state: watch::Sender::new(ConnectionState::Connecting),
            revoked: broadcast::Sender::new(256),
            revocations: Mutex::new(HashMap::new()),
        });
        PoolClient {
            shared,
            lifetime: Arc::new(Lifetime(CancellationToken::new())),
        }
    }

    fn spawn_supervisor(&self, link: Option<ActiveLink>) {
        let shared = Arc::clone(&self.shared);
        let token = self.lifetime.0.clone();
        tokio::spawn(supervise(shared, token, link));
    }

    /// Stops the supervisor and closes the connection; the server releases this client's leases.
    pub fn close(&self) {
        self.lifetime.0.cancel();
    }

    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// Leases the server revoked; subscribe before acquiring to see every one.
    pub fn revocations(&self) -> broadcast::Receiver<LeaseRevoked> {
        self.shared.revoked.subscribe()
    }

    /// The leases this client holds and would re-assert after a reconnect.
    pub fn held_leases(&self) -> Vec<LeaseId> {
        lock(&self.shared.held).keys().copied().collect()
    }

    /// Sends one request and waits for its reply. `Acquire` must go through [`Self::acquire`].
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        if matches!(request, Request::Acquire { .. }) {
            return Err(ClientError::AcquireNeedsGuard);
        }
        match self.round_trip(request).await? {
            Delivery::Reply(result) => Ok(result?),
            Delivery::Lease(_) => Err(ClientError::UnexpectedResponse { request: "call" }),
        }
    }

    async fn round_trip(&self, request: Request) -> Result<Delivery, ClientError> {
        let (sender, receiver) = oneshot::channel();
        let id = send_call(&self.shared, request, Pending::Caller(sender))?;
        let timeout = self.shared.config.call_timeout;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(delivery)) => Ok(delivery),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Err(_) => {
                // A reply arriving later finds no caller; a lease in it is released then.
                lock(&self.shared.pending).remove(&id);
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.call(Request::Ping).await? {
            Response::Pong => Ok(()),
            _ => Err(ClientError::UnexpectedResponse { request: "ping" }),
        }
    }

    pub async fn snapshot(&self) -> Result<RegistrySnapshot, ClientError> {
        match self.call(Request::Snapshot).await? {
            Response::Snapshot(snapshot) => Ok(snapshot),
            _ => Err(ClientError::UnexpectedResponse {
                request: "snapshot",
            }),
        }
    }

    pub async fn pool_status(&self, pool: &PoolId) -> Result<PoolSnapshot, ClientError> {
        match self
            .call(Request::PoolStatus { pool: pool.clone() })
            .await?
        {
            Response::PoolStatus(status) => Ok(status),
            _ => Err(ClientError::UnexpectedResponse {
                request: "pool_status",
            }),
        }
    }

    pub async fn can_dispatch(&self, pool: &PoolId) -> Result<DispatchCheck, ClientError> {
        match self
            .call(Request::CanDispatch { pool: pool.clone() })
            .await?
        {
            Response::CanDispatch(check) => Ok(check),
            _ => Err(ClientError::UnexpectedResponse {
                request: "can_dispatch",
            }),
        }
    }

    /// Reserves `slots` slots of one pool at once: as many sequences as the request makes the
    /// engine run (1 for a plain completion; `n`, a prompt array's length, an embedding batch).
    /// The server refuses 0, and more than the pool has, with `BadRequest`. The lease is
    /// released when the guard is released or dropped.
    pub async fn acquire(
        &self,
        target: AcquireTarget,
        task_id: impl Into<String>,
        session: Option<String>,
        slots: u32,
    ) -> Result<LeaseGuard, ClientError> {
        self.acquire_traced(target, task_id, session, slots, None)
            .await
    }

    /// [`acquire`](Self::acquire) as part of a trace: `trace_parent` is the W3C `traceparent` of
    /// the caller's span for it, which pool-managerd's span of the Acquire takes as its parent.
    pub async fn acquire_traced(
        &self,
        target: AcquireTarget,
        task_id: impl Into<String>,
        session: Option<String>,
        slots: u32,
        trace_parent: Option<String>,
    ) -> Result<LeaseGuard, ClientError> {
        let request = Request::Acquire {
            target,
            task_id: task_id.into(),
            session,
            slots,
            trace_parent,
        };
        match self.round_trip(request).await? {
            Delivery::Lease(guard) => Ok(guard),
            Delivery::Reply(Err(error)) => Err(ClientError::Remote(error)),
            Delivery::Reply(Ok(_)) => Err(ClientError::UnexpectedResponse { request: "acquire" }),
        }
    }

    /// Subscribes to registry changes; the returned mirror is kept current from then on,
    /// across reconnects.
    pub async fn subscribe(&self) -> Result<watch::Receiver<RegistryMirror>, ClientError> {
        self.shared.subscribed.store(true, Ordering::SeqCst);
        match self.call(Request::Subscribe).await? {
            Response::Subscribed(_) => Ok(self.shared.mirror.subscribe()),
            _ => Err(ClientError::UnexpectedResponse {
                request: "subscribe",
            }),
        }
    }

    /// Each device's memory budget and the managed pools' footprints.
    pub async fn memory(&self) -> Result<MemoryReport, ClientError> {
        match self.call(Request::Memory).await? {
            Response::Memory(report) => Ok(report),
            _ => Err(ClientError::UnexpectedResponse { request: "memory" }),
        }
    }

    pub async fn gpus(&self) -> Result<GpuInventory, ClientError> {
        match self.call(Request::Gpus).await? {
            Response::Gpus(inventory) => Ok(inventory),
            _ => Err(ClientError::UnexpectedResponse { request: "gpus" }),
        }
    }

    /// The registry mirror, kept current from now on: subscribes at once when connected, and
    /// on every (re)connect otherwise. Unlike [`Self::subscribe`] it never waits or fails, so a
    /// daemon can start before pool-managerd does.
    pub fn follow(&self) -> watch::Receiver<RegistryMirror> {
        if !self.shared.subscribed.swap(true, Ordering::SeqCst) {
            // Without a connection this fails, and the connect that follows subscribes.
            let _ = send_call(
                &self.shared,
                Request::Subscribe,
                Pending::Internal("subscribe"),
            );
        }
        self.shared.mirror.subscribe()
    }

    pub async fn drain(&self, pool: &PoolId, deadline: Duration) -> Result<(), ClientError> {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        self.admin(Request::Drain {
            pool: pool.clone(),
            deadline_ms,
        })
        .await
    }

    pub async fn reload(&self, pool: &PoolId, model: &str) -> Result<(), ClientError> {
        self.admin(Request::Reload {
            pool: pool.clone(),
            model: model.to_owned(),
        })
        .await
    }

    pub async fn restart(&self, pool: &PoolId) -> Result<(), ClientError> {
        self.admin(Request::Restart { pool: pool.clone() }).await
    }

    /// An operator's load: starts an Unloaded on-demand pool's engine and always finishes it;
    /// `Ok` once the load is under way (watch the pool turn Loading, then Ready). Any allowed
    /// peer may ask.
    pub async fn load(&self, pool: &PoolId) -> Result<(), ClientError> {
        self.admin(Request::Load {
            pool: pool.clone(),
            for_waiting_requests: false,
        })
        .await
    }

    /// Starts an Unloaded on-demand pool's engine for requests waiting on this client's side:
    /// withdrawn with [`cancel_load`](Self::cancel_load), or when the connection closes.
    pub async fn load_for_waiting_requests(&self, pool: &PoolId) -> Result<(), ClientError> {
        self.admin(Request::Load {
            pool: pool.clone(),
            for_waiting_requests: true,
        })
        .await
    }

    /// Withdraws this connection's wish for a load it asked for (see `Request::CancelLoad`).
    pub async fn cancel_load(&self, pool: &PoolId) -> Result<(), ClientError> {
        self.admin(Request::CancelLoad { pool: pool.clone() }).await
    }

    /// Admin: drains an on-demand pool and stops its engine, leaving it Unloaded.
    pub async fn unload(&self, pool: &PoolId) -> Result<(), ClientError> {
        self.admin(Request::Unload { pool: pool.clone() }).await
    }

    async fn admin(&self, request: Request) -> Result<(), ClientError> {
        let name = request.name();
        match self.call(request).await? {
            Response::Accepted => Ok(()),
            _ => Err(ClientError::UnexpectedResponse { request: name }),
        }
    }
}

/// Slots of one pool (`lease().slots` of them), held until released or dropped.
pub struct LeaseGuard {
    lease: Lease,
    shared: Arc<Shared>,
    released: bool,
    revoked: CancellationToken,
}

impl LeaseGuard {
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Completes when pool-managerd revokes this lease (its engine failed, its pool was
    /// removed, a reconnect could not re-create it): whatever runs under it must stop.
    pub fn revoked(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.revoked.clone().cancelled_owned()
    }

    /// Releases the lease with `outcome` without waiting for the server's answer (the slots come
    /// back as soon as the server reads it; the next registry update shows them free). Without a
    /// connection there is nothing to release: the server dropped the lease with it.
    pub fn release_detached(mut self, outcome: ReleaseOutcome) {
        self.released = true;
        release_in_background(&self.shared, self.lease.id, outcome);
    }

    /// Releases the lease and waits for the server to confirm. A lease the server already took
    /// back (revoked, or dropped with a lost connection) counts as released.
    pub async fn release(mut self, outcome: ReleaseOutcome) -> Result<(), ClientError> {
        self.released = true;
        if !forget_lease(&self.shared, self.lease.id) {
            return Ok(());
        }
        let (sender, receiver) = oneshot::channel();
        let request = Request::Release {
            lease: self.lease.id,
            outcome,
        };
        match send_call(&self.shared, request, Pending::Caller(sender)) {
            Err(ClientError::Unavailable) => return Ok(()),
            Err(error) => return Err(error),
            Ok(_) => {}
        }
        let timeout = self.shared.config.call_timeout;
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(Delivery::Reply(Ok(Response::Released)))) => Ok(()),
            Ok(Ok(Delivery::Reply(Err(error)))) => Err(ClientError::Remote(error)),
            Ok(Ok(_)) => Err(ClientError::UnexpectedResponse { request: "release" }),
            // The connection closed: the server released every lease it carried.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.released {
            release_in_background(&self.shared, self.lease.id, ReleaseOutcome::Cancelled);
        }
    }
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("lease", &self.lease)
            .finish()
    }
}

/// Stops tracking a lease this client gives back; `false` if it no longer held it.
fn forget_lease(shared: &Shared, lease: LeaseId) -> bool {
    lock(&shared.revocations).remove(&lease);
    lock(&shared.held).remove(&lease).is_some()
}

/// A lease the server took back: it is no longer held, its holder is told
/// ([`LeaseGuard::revoked`]) and so are [`PoolClient::revocations`] subscribers.
fn revoke_lease(shared: &Shared, lease: LeaseId, pool: PoolId, reason: String) {
    if let Some(token) = lock(&shared.revocations).remove(&lease) {
        token.cancel();
    }
    let _ = shared.revoked.send(LeaseRevoked {
        lease,
        pool,
        reason,
    });
}

/// Releases a lease nobody will wait for; without a connection there is nothing to release,
/// because the server dropped the lease with the connection and it is no longer re-asserted.
fn release_in_background(shared: &Shared, lease: LeaseId, outcome: ReleaseOutcome) {
    if !forget_lease(shared, lease) {
        return;
    }
    let request = Request::Release { lease, outcome };
    if let Err(error) = send_call(shared, request, Pending::Internal("release")) {
        tracing::debug!(%lease, %error, "lease not released explicitly; the server drops it with the connection");
    }
}

/// Queues one call on the current connection and registers who gets its reply.
fn send_call(shared: &Shared, request: Request, pending: Pending) -> Result<u64, ClientError> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let max = shared.max_frame_bytes.load(Ordering::Relaxed);
    let frame = frame_bytes(&ClientFrame::Call(Call { id, request }), max)?;
    // Registered before it is sent, so the reply always finds it.
    lock(&shared.pending).insert(id, pending);
    let outbox = lock(&shared.outbox).clone();
    let sent = outbox.is_some_and(|outbox| outbox.send(&frame).is_ok());
    if sent {
        Ok(id)
    } else {
        lock(&shared.pending).remove(&id);
        Err(ClientError::Unavailable)
    }
}

async fn establish(shared: &Shared) -> Result<Link, ClientError> {
    let config = &shared.config;
    let held_leases: Vec<HeldLease> = lock(&shared.held).values().cloned().collect();
    let handshake = async {
        let stream = UnixStream::connect(&config.socket_path)
            .await
            .map_err(|source| ClientError::Connect {
                path: config.socket_path.clone(),
                source,
            })?;
        let (read, mut writer) = stream.into_split();
        let hello = ClientFrame::Hello(Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            client_name: config.client_name.clone(),
            held_leases,
        });
        let sent = writer
            .write_all(&frame_bytes(&hello, config.max_frame_bytes)?)
            .await;
        let mut reader = FrameReader::new(read, config.max_frame_bytes);
        // A server that refuses a peer says why and closes at once, possibly before our Hello
        // is written: its answer is still worth reading.
        let payload = match (sent, reader.read_frame().await) {
            (_, Ok(Some(payload))) => payload,
            (Err(error), _) => return Err(ClientError::Write(error)),
            (Ok(()), Ok(None)) => return Err(ClientError::Disconnected),
            (Ok(()), Err(error)) => return Err(error.into()),
        };
        match decode_payload::<ServerFrame>(&payload)? {
            ServerFrame::Welcome(welcome) if welcome.protocol_version != PROTOCOL_VERSION => {
                Err(ClientError::VersionMismatch {
                    client: PROTOCOL_VERSION,
                    server: welcome.protocol_version,
                })
            }
            ServerFrame::Welcome(welcome) => Ok(Link {
                reader,
                writer,
                welcome,
            }),
            ServerFrame::Refused(error) => Err(ClientError::Refused(error)),
            ServerFrame::Reply(_) => Err(ClientError::UnexpectedFrame("a reply before Welcome")),
            ServerFrame::Event(_) => Err(ClientError::UnexpectedFrame("an event before Welcome")),
        }
    };
    match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout(config.handshake_timeout)),
    }
}

async fn supervise(shared: Arc<Shared>, token: CancellationToken, mut link: Option<ActiveLink>) {
    let mut backoff = reconnect_backoff(&shared.config);
    loop {
        let current = match link.take() {
            Some(current) => current,
            None => {
                shared.state.send_replace(ConnectionState::Connecting);
                let attempt = tokio::select! {
                    () = token.cancelled() => break,
                    attempt = establish(&shared) => attempt,
                };
                match attempt {
                    Ok(current) => activate(&shared, current),
                    Err(error) => {
                        let delay = backoff.next().unwrap_or(shared.config.reconnect_max);
                        tracing::warn!(socket = %shared.config.socket_path.display(), %error, retry_in_ms = delay.as_millis() as u64, "pool-managerd unreachable");
                        shared.state.send_replace(ConnectionState::Disconnected {
                            reason: error.to_string(),
                        });
                        tokio::select! {
                            () = token.cancelled() => break,
                            () = tokio::time::sleep(delay) => continue,
                        }
                    }
                }
            }
        };
        backoff = reconnect_backoff(&shared.config);
        let reason = serve_link(&shared, current, &token).await;
        teardown(&shared);
        if token.is_cancelled() {
            break;
        }
        tracing::warn!(%reason, "connection to pool-managerd lost; reconnecting");
        shared
            .state
            .send_replace(ConnectionState::Disconnected { reason });
    }
    teardown(&shared);
    shared.state.send_replace(ConnectionState::Closed);
}

fn reconnect_backoff(config: &ClientConfig) -> impl Iterator<Item = Duration> + use<> {
    backon::ExponentialBuilder::default()
        .with_min_delay(config.reconnect_initial)
        .with_max_delay(config.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Forgets the connection: queued calls fail, and the mirror is marked stale.
fn teardown(shared: &Shared) {
    if let Some(outbox) = lock(&shared.outbox).take() {
        outbox.close();
    }
    // Dropping the senders wakes every waiting caller with `Disconnected`.
    lock(&shared.pending).clear();
    shared.mirror.send_if_modified(|mirror| {
        let was_connected = mirror.connected;
        mirror.connected = false;
        was_connected
    });
}

/// A connection whose writer runs and whose outbox is installed: calls can be sent.
struct ActiveLink {
    reader: FrameReader<OwnedReadHalf>,
    writer_task: tokio::task::JoinHandle<()>,
    write_failed: CancellationToken,
    /// How often to renew held leases; `None` when the server's leases never expire.
    renew_every: Option<Duration>,
}

/// Three renewals per time-to-live: one late or lost renewal never costs a lease.
fn renewal_period(lease_ttl_ms: u64) -> Option<Duration> {
    (lease_ttl_ms > 0).then(|| Duration::from_millis((lease_ttl_ms / 3).max(1)))
}

/// Makes a handshaken connection the current one. Synchronous, so that `connect` returns a
/// client that can send at once.
fn activate(shared: &Arc<Shared>, link: Link) -> ActiveLink {
    let Link {
        reader,
        writer,
        welcome,
    } = link;
    let max_frame = shared.config.max_frame_bytes.min(welcome.max_frame_bytes);
    shared.max_frame_bytes.store(max_frame, Ordering::Relaxed);
    let write_failed = CancellationToken::new();
    let (outbox, drain) = Outbox::new(writer, write_failed.clone());
    let writer_task = tokio::spawn(drain);
    *lock(&shared.outbox) = Some(outbox);
    settle_reasserted_leases(shared, &welcome);
    shared.state.send_replace(ConnectionState::Connected {
        server_version: welcome.server_version.clone(),
    });
    tracing::info!(server_version = %welcome.server_version, epoch = welcome.registry_epoch, reasserted = welcome.reasserted.len(), "connected to pool-managerd");
    if shared.subscribed.load(Ordering::SeqCst)
        && let Err(error) = send_call(shared, Request::Subscribe, Pending::Internal("subscribe"))
    {
        tracing::warn!(%error, "could not re-subscribe");
    }
    ActiveLink {
        reader,
        writer_task,
        write_failed,
        renew_every: renewal_period(welcome.lease_ttl_ms),
    }
}

/// Reads from the current connection until it ends; returns why it ended.
async fn serve_link(shared: &Arc<Shared>, link: ActiveLink, token: &CancellationToken) -> String {
    let ActiveLink {
        mut reader,
        writer_task,
        write_failed,
        renew_every,
    } = link;
    let mut renewals = renew_every.map(|period| {
        let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
        renewals
    });
    let reason = loop {
        let frame = tokio::select! {
            () = token.cancelled() => break "client closed".to_owned(),
            () = write_failed.cancelled() => break "write to pool-managerd failed".to_owned(),
            () = next_renewal(&mut renewals) => {
                renew_leases(shared);
                continue;
            }
            frame = reader.read_frame() => frame,
        };
        match frame {
            Ok(Some(payload)) => match decode_payload::<ServerFrame>(&payload) {
                Ok(frame) => {
                    if let Err(reason) = handle_frame(shared, frame) {
                        break reason;
                    }
                }
                Err(error) => break format!("undecodable frame from pool-managerd: {error}"),
            },
            Ok(None) => break "pool-managerd closed the connection".to_owned(),
            Err(error) => break error.to_string(),
        }
    };
    writer_task.abort();
    reason
}

/// Waits for the next renewal tick; forever when leases do not expire.
async fn next_renewal(renewals: &mut Option<Interval>) {
    match renewals {
        Some(renewals) => {
            renewals.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Renews every lease of this connection, if it holds any; the reply only matters to the server.
fn renew_leases(shared: &Shared) {
    if lock(&shared.held).is_empty() {
        return;
    }
    if let Err(error) = send_call(shared, Request::Renew, Pending::Internal("renew")) {
        tracing::debug!(%error, "could not renew leases; the reconnect re-asserts them");
    }
}

/// Leases re-asserted in `Hello` that were released while the handshake was in flight are
/// released now; leases the server could not re-create are revoked locally.
fn settle_reasserted_leases(shared: &Shared, welcome: &Welcome) {
    for lease in &welcome.reasserted {
        let still_held = lock(&shared.held).contains_key(lease);
        if !still_held {
            let request = Request::Release {
                lease: *lease,
                outcome: ReleaseOutcome::Cancelled,
            };
            if let Err(error) = send_call(shared, request, Pending::Internal("release")) {
                tracing::debug!(%lease, %error, "could not release a lease dropped during reconnect");
            }
        }
    }
    for (lease, error) in &welcome.rejected {
        let held = lock(&shared.held).remove(lease);
        if let Some(held) = held {
            tracing::warn!(%lease, pool = %held.pool, %error, "pool-managerd did not re-create a held lease");
            revoke_lease(shared, *lease, held.pool, error.to_string());
        }
    }
}

fn handle_frame(shared: &Arc<Shared>, frame: ServerFrame) -> Result<(), String> {
    match frame {
        ServerFrame::Reply(reply) => {
            deliver_reply(shared, reply.id, reply.result);
            Ok(())
        }
        ServerFrame::Event(event) => {
            apply_change(shared, event.epoch, event.change);
            Ok(())
        }
        ServerFrame::Refused(error) => Err(format!("pool-managerd closed the connection: {error}")),
        ServerFrame::Welcome(_) => Err("pool-managerd sent a second Welcome".to_owned()),
    }
}

fn deliver_reply(shared: &Arc<Shared>, id: u64, result: Result<Response, IpcError>) {
    let pending = lock(&shared.pending).remove(&id);
    match result {
        Ok(Response::Acquired(lease)) => {
            let lease_id = lease.id;
            lock(&shared.held).insert(
                lease_id,
                HeldLease {
                    lease: lease_id,
                    pool: lease.pool.clone(),
                    slots: lease.slots,
                    secret: lease.secret,
                },
            );
            let revoked = CancellationToken::new();
            lock(&shared.revocations).insert(lease_id, revoked.clone());
            let guard = LeaseGuard {
                lease,
                shared: Arc::clone(shared),
                released: false,
                revoked,
            };
            // If the caller is gone, the guard comes back and dropping it releases the lease.
            match pending {
                Some(Pending::Caller(sender)) => {
                    if let Err(Delivery::Lease(orphan)) = sender.send(Delivery::Lease(guard)) {
                        tracing::debug!(lease = %lease_id, "caller left before its lease arrived; releasing");
                        drop(orphan);
                    }
                }
                _ => {
                    tracing::debug!(lease = %lease_id, "lease granted after its caller gave up; releasing");
                    drop(guard);
                }
            }
        }
        result => {
            if let Ok(Response::Subscribed(snapshot)) = &result {
                let snapshot = snapshot.clone();
                shared.mirror.send_replace(RegistryMirror {
                    connected: true,
                    snapshot,
                });
            }
            match pending {
                Some(Pending::Caller(sender)) => {
                    let _ = sender.send(Delivery::Reply(result));
                }
                Some(Pending::Internal(what)) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, request = what, "internal request failed");
                    }
                }
                None => {}
            }
        }
    }
}

fn apply_change(shared: &Shared, epoch: u64, change: Change) {
    if let Change::LeasesRevoked {
        pool,
        leases,
        reason,
    } = &change
    {
        for lease in leases {
            let held = lock(&shared.held).remove(lease).is_some();
            if held {
                tracing::warn!(%lease, %pool, %reason, "lease revoked by pool-managerd");
                revoke_lease(shared, *lease, pool.clone(), reason.clone());
            }
        }
        return;
    }
    if !shared.subscribed.load(Ordering::SeqCst) {
        return;
    }
    shared.mirror.send_if_modified(|mirror| {
        if epoch < mirror.snapshot.epoch {
            return false;
        }
        mirror.snapshot.epoch = epoch;
        match change {
            Change::PoolUpdated(pool) => {
                match mirror
                    .snapshot
                    .pools
                    .iter_mut()
                    .find(|known| known.pool_id == pool.pool_id)
                {
                    Some(known) => *known = pool,
                    None => mirror.snapshot.pools.push(pool),
                }
            }
            Change::PoolRemoved(id) => mirror.snapshot.pools.retain(|pool| pool.pool_id != id),
            Change::Resync(snapshot) => mirror.snapshot = snapshot,
            Change::LeasesRevoked { .. } => return false,
        }
        true
    });
}
