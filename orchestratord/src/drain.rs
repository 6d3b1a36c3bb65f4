//! Whether this host takes new requests: serving, drained by the operator (`POST
//! /v2/admin/drain`, reversed by `POST /v2/admin/undrain`), or shutting down (SIGTERM, never
//! reversed). While drained or shutting down, `/readyz` answers 503 at once and admission refuses
//! every new request (503 `HOST_DRAINING` / `SHUTTING_DOWN` with Retry-After), so a balancer
//! sends new work to other hosts; requests already admitted (queued or streaming) run to their end.

use std::sync::atomic::{AtomicU8, Ordering};

/// The host's admission state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Serving,
    /// Drained by the operator: admits nothing new until undrained.
    Drained,
    /// SIGTERM: admits nothing new, for good.
    ShuttingDown,
}

impl HostState {
    /// The name `/readyz` and logs use.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Serving => "serving",
            HostState::Drained => "drained",
            HostState::ShuttingDown => "shutting_down",
        }
    }

    const fn bits(self) -> u8 {
        match self {
            HostState::Serving => 0,
            HostState::Drained => 1,
            HostState::ShuttingDown => 2,
        }
    }

    fn of_bits(bits: u8) -> HostState {
        match bits {
            0 => HostState::Serving,
            1 => HostState::Drained,
            _ => HostState::ShuttingDown,
        }
    }
}

/// Undrain refused: the host is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("orchestratord is shutting down; it cannot be undrained")]
pub struct ShuttingDown;

/// The host's admission state, shared by the API handlers, admission and the shutdown path.
#[derive(Debug, Default)]
pub struct HostDrain {
    state: AtomicU8,
}

impl HostDrain {
    pub fn state(&self) -> HostState {
        HostState::of_bits(self.state.load(Ordering::Acquire))
    }

    /// Whether new requests are admitted.
    pub fn admits(&self) -> bool {
        self.state() == HostState::Serving
    }

    /// The operator's drain; the state before (a host shutting down stays so).
    pub fn drain(&self) -> HostState {
        match self.state.compare_exchange(
            HostState::Serving.bits(),
            HostState::Drained.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(before) | Err(before) => HostState::of_bits(before),
        }
    }

    /// The operator's undrain; the state before. Refused while shutting down.
    pub fn undrain(&self) -> Result<HostState, ShuttingDown> {
        match self.state.compare_exchange(
            HostState::Drained.bits(),
            HostState::Serving.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(before) => Ok(HostState::of_bits(before)),
            Err(before) => match HostState::of_bits(before) {
                HostState::ShuttingDown => Err(ShuttingDown),
                state => Ok(state),
            },
        }
    }

    /// SIGTERM: for good.
    pub fn shut_down(&self) {
        self.state
            .store(HostState::ShuttingDown.bits(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_and_undrain_toggle_but_shutdown_is_final() {
        let host = HostDrain::default();
        assert!(host.admits());
        assert_eq!(host.drain(), HostState::Serving);
        assert_eq!(host.drain(), HostState::Drained);
        assert!(!host.admits());
        assert_eq!(host.undrain(), Ok(HostState::Drained));
        assert_eq!(host.undrain(), Ok(HostState::Serving));
        assert!(host.admits());
        host.shut_down();
        assert_eq!(host.drain(), HostState::ShuttingDown);
        assert_eq!(host.undrain(), Err(ShuttingDown));
        assert_eq!(host.state(), HostState::ShuttingDown);
    }
}
