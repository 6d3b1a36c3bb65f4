//! Which sockets the daemon serves, chosen before anything starts (so a busy socket fails
//! first): the Unix socket's path (`--socket`, else `$POOL_MANAGERD_SOCKET`, else the config's
//! `server.socket`, else the default), then each socket systemd passed in (`ipc`, `debug-http`)
//! or one bound here (the Unix socket by [`bind_socket`], with its file's safety rules). The debug
//! shim's exposure is judged on the socket really served, inherited ones included.

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::daemon::Listeners;
use crate::ipc::socket::{SocketFile, bind_socket};
use daemon_support::listeners::{TcpListenerError, optional_tcp_listener, unix_listener};
use daemon_support::systemd::InheritedSockets;
use pool_ipc::socket_path::{SOCKET_ENV, resolve_socket_path};
use std::path::{Path, PathBuf};

/// The daemon's listeners, and what the rest of startup needs to know about them.
pub struct Served {
    pub listeners: Listeners,
    /// The socket's path as served (an inherited socket's own): READY shows it, and the engines'
    /// socket directory sits beside it.
    pub socket_path: PathBuf,
    /// Held while the daemon runs; dropping it removes the socket file and its lock. `None` for
    /// an inherited socket, which belongs to systemd.
    pub socket_file: Option<SocketFile>,
    /// The shim's address for READY, or `off`.
    pub debug_addr: String,
}

/// Takes the inherited sockets or binds the configured ones (module header).
pub fn open(
    args: &ServeArgs,
    config: &Config,
    mut inherited: InheritedSockets,
) -> Result<Served, String> {
    let socket_path = socket_path(args, config)?;
    let inherited_ipc = inherited
        .take_unix("ipc")
        .map_err(|error| error.to_string())?;
    let inherited_debug = inherited
        .take_tcp("debug-http")
        .map_err(|error| error.to_string())?;
    if let Some(unknown) = inherited
        .names()
        .iter()
        .find(|name| !matches!(name.as_str(), "ipc" | "debug-http"))
    {
        tracing::warn!(name = %unknown, "ignoring an inherited socket with an unknown FileDescriptorName");
    }
    let (ipc, socket_file) = unix_listener(inherited_ipc, || {
        bind_socket(&socket_path, config.server.socket_group)
    })
    .map_err(|error| error.to_string())?;
    let socket_path = ipc
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or(socket_path);
    let debug_http =
        optional_tcp_listener(inherited_debug, config.debug_http.listen).map_err(|error| {
            match error {
                TcpListenerError::Inherited(error) => {
                    format!("cannot register the inherited shim socket: {error}")
                }
                TcpListenerError::Bind { addr, source } => {
                    format!("cannot bind the debug HTTP shim on {addr}: {source}")
                }
            }
        })?;
    let debug_addr = match &debug_http {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|error| format!("cannot read the shim's address: {error}"))?;
            config.debug_http.check_exposure_of(addr)?;
            addr.to_string()
        }
        None => "off".into(),
    };
    Ok(Served {
        listeners: Listeners { ipc, debug_http },
        socket_path,
        socket_file,
        debug_addr,
    })
}

/// `--socket`; else `$POOL_MANAGERD_SOCKET` (which outranks the config file); else the config's
/// `server.socket`; else the default for this user.
fn socket_path(args: &ServeArgs, config: &Config) -> Result<PathBuf, String> {
    let explicit = args.socket.clone().or(match std::env::var_os(SOCKET_ENV) {
        Some(value) if !value.is_empty() => None,
        _ => config.server.socket.clone(),
    });
    resolve_socket_path(explicit).map_err(|error| error.to_string())
}
