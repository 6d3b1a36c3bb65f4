//! The client's write side of one connection.
//!
//! A caller writes its frame straight into the socket when nothing is queued, so the hot path
//! costs no task hop; whatever the kernel does not take at once is queued, in order, for a
//! drain task that waits for the socket to become writable. Invariant: bytes reach the socket
//! in the order `send` was called, because a caller writes directly only while no earlier bytes
//! are queued or being drained.

use bytes::{Buf, BytesMut};
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) struct Outbox {
    writer: OwnedWriteHalf,
    /// Held only for non-blocking work (a `try_write`, a buffer append): never across an await.
    state: Mutex<OutboxState>,
    wake: Notify,
    /// Cancelled when a write fails; the connection is then finished.
    failed: CancellationToken,
}

#[derive(Default)]
struct OutboxState {
    backlog: BytesMut,
    /// The drain task holds bytes it has taken from `backlog` but not yet written.
    draining: bool,
    closed: bool,
}

/// The connection can take no more bytes.
pub(crate) struct Closed;

impl Outbox {
    /// Returns the outbox and the task that drains its backlog; run that task until the
    /// connection ends.
    pub(crate) fn new(
        writer: OwnedWriteHalf,
        failed: CancellationToken,
    ) -> (Arc<Outbox>, impl Future<Output = ()> + Send + 'static) {
        let outbox = Arc::new(Outbox {
            writer,
            state: Mutex::new(OutboxState::default()),
            wake: Notify::new(),
            failed,
        });
        let drain = Arc::clone(&outbox).drain();
        (outbox, drain)
    }

    fn state(&self) -> MutexGuard<'_, OutboxState> {
        // The state is consistent at every step, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn send(&self, frame: &[u8]) -> Result<(), Closed> {
        let mut state = self.state();
        if state.closed {
            return Err(Closed);
        }
        if state.backlog.is_empty() && !state.draining {
            match self.writer.try_write(frame) {
                Ok(written) if written == frame.len() => return Ok(()),
                Ok(written) => state.backlog.extend_from_slice(&frame[written..]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    state.backlog.extend_from_slice(frame);
                }
                Err(error) => {
                    tracing::debug!(%error, "write to pool-managerd failed");
                    state.closed = true;
                    self.failed.cancel();
                    return Err(Closed);
                }
            }
        } else {
            state.backlog.extend_from_slice(frame);
        }
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops accepting frames; the drain task ends.
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.wake.notify_one();
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let mut chunk = {
                let mut state = self.state();
                if state.closed {
                    return;
                }
                if state.backlog.is_empty() {
                    state.draining = false;
                    None
                } else {
                    state.draining = true;
                    Some(state.backlog.split())
                }
            };
            let Some(chunk) = chunk.as_mut() else {
                self.wake.notified().await;
                continue;
            };
            while chunk.has_remaining() {
                if let Err(error) = self.writer.writable().await {
                    self.fail(&error);
                    return;
                }
                match self.writer.try_write(chunk) {
                    Ok(written) => chunk.advance(written),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                    Err(error) => {
                        self.fail(&error);
                        return;
                    }
                }
            }
        }
    }

    fn fail(&self, error: &std::io::Error) {
        tracing::debug!(%error, "write to pool-managerd failed");
        self.state().closed = true;
        self.failed.cancel();
    }
}
