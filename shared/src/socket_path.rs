//! Where pool-managerd's socket is when nobody says: `--socket`, then `$POOL_MANAGERD_SOCKET`,
//! then `/run/pool-managerd/pool.sock` for root, `$XDG_RUNTIME_DIR/pool-managerd/pool.sock`
//! for everyone else. Every binary resolves it the same way, through [`resolve_socket_path`].

use std::path::PathBuf;

pub const SOCKET_ENV: &str = "POOL_MANAGERD_SOCKET";
pub const SYSTEM_SOCKET_PATH: &str = "/run/pool-managerd/pool.sock";

#[derive(Debug, thiserror::Error)]
#[error(
    "no socket path: pass --socket or set {SOCKET_ENV} (neither root nor XDG_RUNTIME_DIR is set)"
)]
pub struct NoSocketPath;

/// `explicit` is the `--socket` flag, if given.
pub fn resolve_socket_path(explicit: Option<PathBuf>) -> Result<PathBuf, NoSocketPath> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from(SYSTEM_SOCKET_PATH));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|value| !value.is_empty())
        .map(|dir| PathBuf::from(dir).join("pool-managerd").join("pool.sock"))
        .ok_or(NoSocketPath)
}
