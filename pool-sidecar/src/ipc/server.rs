//! Accepting peers on the Unix socket. Every connection is a task owned by the daemon's task
//! tracker, so shutdown waits for all of them.

use super::connection;
use crate::config::AccessPolicy;
use crate::gpu::GpuProbe;
use crate::metrics::Metrics;
use crate::pools::PoolsHandle;
use crate::registry::{ConnectionId, RegistryHandle};
use daemon_support::trace_export::Tracer;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every connection needs to serve its peer.
pub struct IpcContext {
    pub registry: RegistryHandle,
    /// Where admin requests (drain, reload, restart) go.
    pub pools: PoolsHandle,
    pub gpus: Arc<GpuProbe>,
    pub access: AccessPolicy,
    pub max_frame_bytes: u32,
    /// Announced in `Welcome`; 0: leases never expire.
    pub lease_ttl_ms: u64,
    /// One uid's lease cap in slots; a `Hello` re-asserting more leases than this is refused
    /// whole (each lease holds at least one slot), before any secret is checked.
    pub max_leased_slots_per_uid: u32,
    pub metrics: Arc<Metrics>,
    /// Makes the spans of Acquires and Releases when `server.otlp_endpoint` is configured.
    pub tracer: Option<Tracer>,
}

pub async fn serve(
    listener: UnixListener,
    context: Arc<IpcContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut next_id: ConnectionId = 1;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let id = next_id;
                next_id += 1;
                tracker.spawn(connection::serve(
                    stream,
                    id,
                    Arc::clone(&context),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accept on the Unix socket failed");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}
