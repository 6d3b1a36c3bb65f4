//! One peer on the Unix socket, from credentials check to close.
//!
//! Order of business: SO_PEERCRED against the allowlist (refused peers get one `Refused` frame
//! and nothing else), then exactly one `Hello` (magic and version checked, held leases
//! re-asserted), then calls answered in order with replies batched per burst, interleaved with
//! pushed registry events. Any malformed or oversized frame ends the connection with a typed
//! `Refused` frame: after a framing error the byte stream cannot be trusted. However the
//! connection ends, its leases are handed back (`LeasesReturn`'s `Drop`).

use super::server::IpcContext;
use crate::pools::Requester;
use crate::registry::{ConnectionId, Owner, RegistryEvent};
use crate::spans;
use bytes::BytesMut;
use pool_ipc::codec::{decode_payload, decode_payload_prefix, encode_frame};
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::framed::{FrameReader, ReadError};
use pool_ipc::registry::{DispatchCheck, PoolId, PoolSnapshot};
use pool_ipc::wire::{
    Call, Change, ClientFrame, Event, Hello, HelloPreamble, MAGIC, PROTOCOL_VERSION, Reply,
    Request, Response, ServerFrame, Welcome,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf, UCred};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an admin request may wait for its supervisor to take it on.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `Memory` request waits for the pools controller (busy only while it applies a
/// configuration reload).
const MEMORY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ID_LEN: usize = 256;

pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a connection ends early; becomes the one `Refused` frame the peer gets.
struct Refusal(IpcError);

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal(IpcError::new(code, message))
    }
}

/// Why a connection's first frame is not a Hello this server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstFrameError {
    /// A pool-managerd client of another protocol version (`client_name` is `?` when its Hello
    /// could only be read as far as the version).
    VersionMismatch {
        client_version: u32,
        client_name: String,
    },
    /// Not a pool-managerd Hello at all (another message, bad magic, malformed bytes): why.
    NotHello(String),
}

/// Judges the payload of a connection's first frame, as the server does before anything else:
/// a `Hello` with the right magic and this protocol version, or why not. Pure, and total on any
/// bytes (it is what a hostile peer reaches first, and what the `hello_handshake` fuzz target
/// drives). A first frame that does not decode as this version's `Hello` is read again as the
/// preamble every version shares, to tell a client of another version from a stranger.
pub fn judge_first_frame(payload: &[u8]) -> Result<Hello, FirstFrameError> {
    let hello = match decode_payload::<ClientFrame>(payload) {
        Ok(ClientFrame::Hello(hello)) => hello,
        Ok(ClientFrame::Call(_)) => {
            return Err(FirstFrameError::NotHello(
                "the first frame must be Hello".to_owned(),
            ));
        }
        Err(error) => {
            return Err(match decode_payload_prefix::<HelloPreamble>(payload) {
                Ok((preamble, _))
                    if preamble.frame_variant == 0
                        && preamble.magic == MAGIC
                        && preamble.protocol_version != PROTOCOL_VERSION =>
                {
                    FirstFrameError::VersionMismatch {
                        client_version: preamble.protocol_version,
                        client_name: "?".to_owned(),
                    }
                }
                _ => FirstFrameError::NotHello(format!("not a pool-managerd Hello: {error}")),
            });
        }
    };
    if hello.magic != MAGIC {
        return Err(FirstFrameError::NotHello(
            "bad magic: not a pool-managerd client".to_owned(),
        ));
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(FirstFrameError::VersionMismatch {
            client_version: hello.protocol_version,
            client_name: hello.client_name,
        });
    }
    Ok(hello)
}

/// Returns the connection's leases to the registry, and withdraws the loads it asked for,
/// however the connection ends.
struct LeasesReturn {
    context: Arc<IpcContext>,
    id: ConnectionId,
}

impl Drop for LeasesReturn {
    fn drop(&mut self) {
        self.context.registry.connection_closed(self.id);
        self.context.pools.connection_closed(self.id);
        self.context.metrics.ipc_connections.dec();
    }
}

pub async fn serve(
    stream: UnixStream,
    id: ConnectionId,
    context: Arc<IpcContext>,
    shutdown: CancellationToken,
) {
    let peer = match stream.peer_cred() {
        Ok(peer) => peer,
        Err(error) => {
            tracing::warn!(connection = id, %error, "cannot read peer credentials; closing");
            context.metrics.record_refused("no_credentials");
            return;
        }
    };
    let (read, write) = stream.into_split();
    let (admin_replies, admin_done) = mpsc::channel(8);
    let mut session = Session {
        admin_replies,
        admin_done,
        id,
        peer,
        reader: FrameReader::new(read, context.max_frame_bytes),
        writer: write,
        out: BytesMut::with_capacity(4096),
        subscribed: false,
        events: context.registry.subscribe_events(),
        context,
    };
    if !session.context.access.admits(peer.uid(), peer.gid()) {
        tracing::warn!(connection = id, uid = peer.uid(), gid = peer.gid(), pid = ?peer.pid(), "refused a peer that is not on the allowlist");
        session.context.metrics.record_refused("unauthorized");
        let message = format!(
            "uid {} (gid {}) is not allowed on this socket",
            peer.uid(),
            peer.gid()
        );
        session
            .refuse(Refusal::new(ErrorCode::Unauthorized, message))
            .await;
        return;
    }
    session.context.metrics.ipc_connections.inc();
    let _leases_return = LeasesReturn {
        context: Arc::clone(&session.context),
        id,
    };
    if let Err(refusal) = session.run(&shutdown).await {
        session.refuse(refusal).await;
    }
}

struct Session {
    id: ConnectionId,
    peer: UCred,
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: BytesMut,
    subscribed: bool,
    events: broadcast::Receiver<Arc<Vec<RegistryEvent>>>,
    context: Arc<IpcContext>,
    /// Admin requests are carried out beside the connection, so that a slow supervisor never
    /// holds up the calls behind them; their replies come back here, out of order (calls are
    /// matched by id).
    admin_replies: mpsc::Sender<Reply>,
    admin_done: mpsc::Receiver<Reply>,
}

impl Session {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), Refusal> {
        let hello = tokio::select! {
            () = shutdown.cancelled() => return Err(shutting_down()),
            hello = self.handshake() => hello?,
        };
        let Some(hello) = hello else {
            return Ok(());
        };
        self.welcome(hello).await?;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Err(shutting_down()),
                frame = self.reader.read_frame() => match frame {
                    Ok(Some(payload)) => {
                        self.handle_payload(&payload).await?;
                        while let Some(payload) = self.reader.buffered_frame().map_err(bad_frame)? {
                            self.handle_payload(&payload).await?;
                        }
                        self.flush().await?;
                    }
                    Ok(None) => return Ok(()),
                    Err(ReadError::Codec(error)) => return Err(bad_frame(error)),
                    Err(error) => {
                        tracing::debug!(connection = self.id, %error, "connection broke off");
                        return Ok(());
                    }
                },
                Some(reply) = self.admin_done.recv() => {
                    self.context.metrics.record_request("admin", reply.result.is_ok());
                    self.queue(&ServerFrame::Reply(reply))?;
                    self.flush().await?;
                }
                batch = self.events.recv() => {
                    match batch {
                        Ok(batch) => self.forward_events(&batch)?,
                        Err(broadcast::error::RecvError::Lagged(missed)) => self.resync(missed)?,
                        Err(broadcast::error::RecvError::Closed) => return Err(shutting_down()),
                    }
                    self.flush().await?;
                }
            }
        }
    }

    /// Reads the first frame; `Ok(None)` if the peer left without saying anything.
    async fn handshake(&mut self) -> Result<Option<Hello>, Refusal> {
        let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.reader.read_frame()).await {
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    format!("no Hello within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                ));
            }
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(ReadError::Codec(error))) => return Err(bad_frame(error)),
            Ok(Err(error)) => {
                tracing::debug!(connection = self.id, %error, "connection broke off before Hello");
                return Ok(None);
            }
            Ok(Ok(Some(payload))) => payload,
        };
        match judge_first_frame(&first) {
            Ok(hello) => Ok(Some(hello)),
            Err(FirstFrameError::VersionMismatch {
                client_version,
                client_name,
            }) => Err(self.version_mismatch(client_version, &client_name)),
            Err(FirstFrameError::NotHello(message)) => {
                Err(Refusal::new(ErrorCode::BadRequest, message))
            }
        }
    }

    /// Whose leases this connection takes: the cap counts the uid.
    fn owner(&self) -> Owner {
        Owner {
            connection: self.id,
            uid: self.peer.uid(),
        }
    }

    fn version_mismatch(&self, client_version: u32, client_name: &str) -> Refusal {
        tracing::warn!(
            connection = self.id,
            client = client_name,
            client_version,
            server_version = PROTOCOL_VERSION,
            "refused a client speaking another protocol version"
        );
        self.context.metrics.record_refused("version_mismatch");
        Refusal::new(
            ErrorCode::VersionMismatch,
            format!(
                "this pool-managerd speaks protocol version {PROTOCOL_VERSION}, the client speaks version {client_version}"
            ),
        )
    }

    async fn welcome(&mut self, hello: Hello) -> Result<(), Refusal> {
        let most = self.context.max_leased_slots_per_uid;
        if hello.held_leases.len() > most as usize {
            self.context.metrics.record_refused("too_many_leases");
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "the Hello re-asserts {} leases; one uid may hold at most {most} leased slots",
                    hello.held_leases.len()
                ),
            ));
        }
        let (reasserted, rejected) = if hello.held_leases.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.context
                .registry
                .reassert(self.owner(), hello.held_leases)
                .await
                .map_err(Refusal)?
        };
        tracing::info!(connection = self.id, client = %hello.client_name, uid = self.peer.uid(), pid = ?self.peer.pid(), reasserted = reasserted.len(), rejected = rejected.len(), "client connected");
        let welcome = ServerFrame::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: SERVER_VERSION.to_owned(),
            registry_epoch: self.context.registry.snapshot().epoch,
            max_frame_bytes: self.context.max_frame_bytes,
            reasserted,
            rejected,
            lease_ttl_ms: self.context.lease_ttl_ms,
        });
        self.queue(&welcome)?;
        self.flush().await
    }

    async fn handle_payload(&mut self, payload: &[u8]) -> Result<(), Refusal> {
        let call = match decode_payload::<ClientFrame>(payload) {
            Ok(ClientFrame::Call(call)) => call,
            Ok(ClientFrame::Hello(_)) => {
                return Err(Refusal::new(ErrorCode::BadRequest, "Hello sent twice"));
            }
            Err(error) => {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    format!("malformed frame: {error}"),
                ));
            }
        };
        let Call { id, request } = call;
        let op = request.name();
        // An admin's admin requests, and anyone's Load and CancelLoad (a demand for a model may
        // bring its pool up, and withdraw that), go to the pools controller.
        let to_controller = matches!(request, Request::Load { .. } | Request::CancelLoad { .. })
            || (request.is_admin()
                && self
                    .context
                    .access
                    .admits_admin(self.peer.uid(), self.peer.gid()));
        if to_controller {
            self.start_admin(id, request).await;
            return Ok(());
        }
        let result = self.answer(request).await;
        self.context.metrics.record_request(op, result.is_ok());
        let reply = ServerFrame::Reply(Reply { id, result });
        if let Err(error) = encode_frame(&reply, &mut self.out, self.context.max_frame_bytes) {
            tracing::error!(connection = self.id, op, %error, "reply does not fit in a frame");
            let reply = ServerFrame::Reply(Reply {
                id,
                result: Err(IpcError::new(
                    ErrorCode::Internal,
                    format!("the reply does not fit in a frame: {error}"),
                )),
            });
            self.queue(&reply)?;
        }
        Ok(())
    }

    /// Hands an admin request (or a load) to the pools controller, in the order the connection
    /// sent them; its answer is awaited in a task of its own and comes back through
    /// `admin_done`. Bounded by `ADMIN_TIMEOUT`; if the connection is gone by then the reply is
    /// dropped, and the supervisor carries out the request all the same.
    async fn start_admin(&self, id: u64, request: Request) {
        tracing::info!(
            connection = self.id,
            uid = self.peer.uid(),
            op = request.name(),
            "admin request"
        );
        let from = Requester::of(&request, self.id);
        let submitted = self.context.pools.submit(request, from).await;
        let replies = self.admin_replies.clone();
        tokio::spawn(async move {
            let result = match submitted {
                Err(error) => Err(error),
                Ok(answer) => match tokio::time::timeout(ADMIN_TIMEOUT, answer).await {
                    Ok(Ok(result)) => result.map(|()| Response::Accepted),
                    Ok(Err(_)) => Err(IpcError::new(
                        ErrorCode::ShuttingDown,
                        "pool-managerd is stopping",
                    )),
                    Err(_) => Err(IpcError::new(
                        ErrorCode::Internal,
                        format!(
                            "the pool's supervisor did not take the request within {} s",
                            ADMIN_TIMEOUT.as_secs()
                        ),
                    )),
                },
            };
            let _ = replies.send(Reply { id, result }).await;
        });
    }

    async fn answer(&mut self, request: Request) -> Result<Response, IpcError> {
        if request.is_admin()
            && !self
                .context
                .access
                .admits_admin(self.peer.uid(), self.peer.gid())
        {
            return Err(IpcError::new(
                ErrorCode::Unauthorized,
                format!(
                    "{} is an admin operation; uid {} is not an admin",
                    request.name(),
                    self.peer.uid()
                ),
            ));
        }
        let registry = &self.context.registry;
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::Snapshot => Ok(Response::Snapshot((*registry.snapshot()).clone())),
            Request::PoolStatus { pool } => {
                self.with_pool(&pool, |status| Response::PoolStatus(status.clone()))
            }
            Request::CanDispatch { pool } => self.with_pool(&pool, |status| {
                Response::CanDispatch(DispatchCheck {
                    dispatchable: status.is_dispatchable(),
                    state: status.state,
                    slots_free: status.slots_free,
                })
            }),
            Request::Acquire {
                target,
                task_id,
                session,
                slots,
                trace_parent,
            } => {
                if task_id.len() > MAX_ID_LEN
                    || session.as_ref().is_some_and(|s| s.len() > MAX_ID_LEN)
                    || trace_parent.as_ref().is_some_and(|t| t.len() > MAX_ID_LEN)
                {
                    return Err(IpcError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "task_id, session and trace_parent must be at most {MAX_ID_LEN} bytes"
                        ),
                    ));
                }
                let span = self.context.tracer.as_ref().map(|tracer| {
                    spans::acquire(tracer, trace_parent.as_deref(), &target, slots, &task_id)
                });
                let acquired = registry.acquire(self.owner(), target, slots).await;
                if let Some(span) = span {
                    spans::acquired(span, &acquired);
                }
                let lease = acquired?;
                tracing::debug!(connection = self.id, lease = %lease.id, pool = %lease.pool, slots, %task_id, ?session, "lease granted");
                Ok(Response::Acquired(lease))
            }
            Request::Release { lease, outcome } => {
                let span = (self.context.tracer.as_ref())
                    .map(|tracer| spans::release(tracer, lease, outcome));
                let released = registry.release(self.id, lease, outcome).await;
                if let Some(span) = span {
                    spans::released(span, &released);
                }
                released?;
                Ok(Response::Released)
            }
            Request::Renew => {
                let leases = registry.renew(self.id).await?;
                Ok(Response::Renewed { leases })
            }
            Request::Subscribe => {
                self.subscribed = true;
                Ok(Response::Subscribed((*registry.snapshot()).clone()))
            }
            Request::Memory => {
                match tokio::time::timeout(MEMORY_TIMEOUT, self.context.pools.memory()).await {
                    Ok(report) => report.map(Response::Memory),
                    Err(_) => Err(IpcError::new(
                        ErrorCode::NotReady,
                        "the pools controller is busy (a configuration reload); try again",
                    )),
                }
            }
            Request::Gpus => {
                let gpus = Arc::clone(&self.context.gpus);
                tokio::task::spawn_blocking(move || gpus.inventory())
                    .await
                    .map(Response::Gpus)
                    .map_err(|error| {
                        IpcError::new(
                            ErrorCode::Internal,
                            format!("GPU inventory failed: {error}"),
                        )
                    })
            }
            // Loads and admins' admin requests never get here (`start_admin` takes them beside
            // the connection), and everyone else's admin requests were refused above.
            Request::Drain { .. }
            | Request::Reload { .. }
            | Request::Restart { .. }
            | Request::Unload { .. }
            | Request::Load { .. }
            | Request::CancelLoad { .. } => Err(IpcError::new(
                ErrorCode::Internal,
                "pool lifecycle request reached the inline path",
            )),
        }
    }

    fn with_pool(
        &self,
        pool: &PoolId,
        view: impl FnOnce(&PoolSnapshot) -> Response,
    ) -> Result<Response, IpcError> {
        let snapshot = self.context.registry.snapshot();
        snapshot.pool(pool).map(view).ok_or_else(|| {
            IpcError::new(
                ErrorCode::NotFound,
                format!("unknown pool {:?}", pool.as_str()),
            )
        })
    }

    fn forward_events(&mut self, batch: &[RegistryEvent]) -> Result<(), Refusal> {
        for event in batch {
            let for_us = self.subscribed
                || (matches!(event.change, Change::LeasesRevoked { .. })
                    && event.lease_owners.contains(&self.id));
            if for_us {
                self.queue(&ServerFrame::Event(Event {
                    epoch: event.epoch,
                    change: event.change.clone(),
                }))?;
            }
        }
        Ok(())
    }

    /// The peer fell behind the event stream: replace its mirror wholesale.
    fn resync(&mut self, missed: u64) -> Result<(), Refusal> {
        if !self.subscribed {
            return Ok(());
        }
        tracing::warn!(
            connection = self.id,
            missed,
            "subscriber lagged; sending a full resync"
        );
        let snapshot = (*self.context.registry.snapshot()).clone();
        self.queue(&ServerFrame::Event(Event {
            epoch: snapshot.epoch,
            change: Change::Resync(snapshot),
        }))
    }

    fn queue(&mut self, frame: &ServerFrame) -> Result<(), Refusal> {
        encode_frame(frame, &mut self.out, self.context.max_frame_bytes)
            .map_err(|error| Refusal::new(ErrorCode::Internal, error.to_string()))
    }

    async fn flush(&mut self) -> Result<(), Refusal> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.writer.write_all(&self.out).await;
        self.out.clear();
        written.map_err(|error| {
            tracing::debug!(connection = self.id, %error, "write failed");
            Refusal::new(ErrorCode::Internal, "write failed")
        })
    }

    /// Sends one `Refused` frame (best effort) and closes.
    async fn refuse(&mut self, Refusal(error): Refusal) {
        tracing::debug!(connection = self.id, %error, "closing connection");
        self.out.clear();
        if encode_frame(
            &ServerFrame::Refused(error),
            &mut self.out,
            self.context.max_frame_bytes,
        )
        .is_ok()
        {
            let _ = self.writer.write_all(&self.out).await;
        }
        let _ = self.writer.shutdown().await;
    }
}

fn bad_frame(error: pool_ipc::codec::CodecError) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, error.to_string())
}

fn shutting_down() -> Refusal {
    Refusal::new(ErrorCode::ShuttingDown, "pool-managerd is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_ipc::codec::{HEADER_BYTES, frame_bytes};
    use pool_ipc::{DEFAULT_MAX_FRAME_BYTES, HeldLease, LeaseId};

    fn payload_of(message: &ClientFrame) -> Vec<u8> {
        frame_bytes(message, DEFAULT_MAX_FRAME_BYTES).unwrap()[HEADER_BYTES..].to_vec()
    }

    fn hello(magic: [u8; 4], protocol_version: u32) -> ClientFrame {
        ClientFrame::Hello(Hello {
            magic,
            protocol_version,
            client_name: "orchestratord".into(),
            held_leases: vec![HeldLease {
                lease: LeaseId(7),
                pool: PoolId::from("p"),
                slots: 1,
                secret: pool_ipc::registry::LeaseSecret([3; 16]),
            }],
        })
    }

    #[test]
    fn a_hello_of_this_version_is_accepted_as_sent() {
        let frame = hello(MAGIC, PROTOCOL_VERSION);
        let ClientFrame::Hello(expected) = frame.clone() else {
            unreachable!()
        };
        assert_eq!(judge_first_frame(&payload_of(&frame)), Ok(expected));
    }

    #[test]
    fn a_hello_of_another_version_is_a_version_mismatch_naming_the_client() {
        let judged = judge_first_frame(&payload_of(&hello(MAGIC, PROTOCOL_VERSION + 1)));
        assert_eq!(
            judged,
            Err(FirstFrameError::VersionMismatch {
                client_version: PROTOCOL_VERSION + 1,
                client_name: "orchestratord".into(),
            })
        );
    }

    #[test]
    fn a_version_3_hello_is_refused_though_it_decodes_as_todays() {
        // Version 3 kept today's Hello layout; only its number says it cannot decode the
        // Unloaded and Loading states it would meet in snapshots.
        assert_eq!(
            judge_first_frame(&payload_of(&hello(MAGIC, 3))),
            Err(FirstFrameError::VersionMismatch {
                client_version: 3,
                client_name: "orchestratord".into(),
            })
        );
    }

    #[test]
    fn a_foreign_hello_that_keeps_the_shared_preamble_is_a_version_mismatch() {
        // Variant 0, the magic, version 1, then bytes this version cannot read as a Hello.
        let mut payload = vec![0];
        payload.extend_from_slice(&MAGIC);
        payload.extend_from_slice(&[1, 0xff, 0xff]);
        assert_eq!(
            judge_first_frame(&payload),
            Err(FirstFrameError::VersionMismatch {
                client_version: 1,
                client_name: "?".into(),
            })
        );
    }

    #[test]
    fn a_call_bad_magic_or_garbage_is_not_a_hello() {
        let call = ClientFrame::Call(Call {
            id: 1,
            request: Request::Ping,
        });
        for payload in [
            payload_of(&call),
            payload_of(&hello(*b"HTTP", PROTOCOL_VERSION)),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            Vec::new(),
        ] {
            assert!(
                matches!(
                    judge_first_frame(&payload),
                    Err(FirstFrameError::NotHello(_))
                ),
                "{payload:?}"
            );
        }
    }
}
