//! A daemon's listening sockets, inherited or bound, written once for both daemons: a socket
//! systemd passed in (socket activation, see [`InheritedSockets`](crate::systemd::InheritedSockets))
//! is served as it is, whatever the configuration says; otherwise the daemon binds the configured
//! one. Either way the listener comes back non-blocking and registered with the tokio runtime, so
//! these functions must run inside one. Whatever a socket's file needs (a lock, a stale socket
//! replaced, modes) is the bind closure's business: [`unix_listener`] only chooses.

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum TcpListenerError {
    #[error("cannot register the inherited socket: {0}")]
    Inherited(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum UnixListenerError<E> {
    #[error(transparent)]
    Bind(E),
    #[error("cannot make the socket non-blocking: {0}")]
    NonBlocking(#[source] std::io::Error),
    #[error("cannot register the socket: {0}")]
    Register(#[source] std::io::Error),
}

/// The inherited TCP socket, or one bound on `configured`.
pub fn tcp_listener(
    inherited: Option<std::net::TcpListener>,
    configured: SocketAddr,
) -> Result<tokio::net::TcpListener, TcpListenerError> {
    match inherited {
        Some(listener) => register_tcp(listener),
        None => bind_tcp(configured),
    }
}

/// As [`tcp_listener`] for a listener the configuration may turn off: `None` when nothing was
/// inherited and nothing is configured.
pub fn optional_tcp_listener(
    inherited: Option<std::net::TcpListener>,
    configured: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, TcpListenerError> {
    match (inherited, configured) {
        (Some(listener), _) => register_tcp(listener).map(Some),
        (None, Some(addr)) => bind_tcp(addr).map(Some),
        (None, None) => Ok(None),
    }
}

fn register_tcp(
    listener: std::net::TcpListener,
) -> Result<tokio::net::TcpListener, TcpListenerError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .map_err(TcpListenerError::Inherited)
}

/// As `tokio::net::TcpListener::bind` does it (SO_REUSEADDR, a backlog of 1024), without the
/// name lookup an address does not need.
fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, TcpListenerError> {
    let bound = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bound().map_err(|source| TcpListenerError::Bind { addr, source })
}

/// The inherited Unix socket, or the one `bind` creates together with whatever guards its file
/// (`T`: `None` for an inherited socket, whose file belongs to systemd).
pub fn unix_listener<T, E>(
    inherited: Option<UnixListener>,
    bind: impl FnOnce() -> Result<(UnixListener, T), E>,
) -> Result<(tokio::net::UnixListener, Option<T>), UnixListenerError<E>> {
    let (listener, guard) = match inherited {
        Some(listener) => (listener, None),
        None => {
            let (listener, guard) = bind().map_err(UnixListenerError::Bind)?;
            (listener, Some(guard))
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(UnixListenerError::NonBlocking)?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(UnixListenerError::Register)?;
    Ok((listener, guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_inherited_tcp_socket_is_served_instead_of_the_configured_address() {
        let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = inherited.local_addr().unwrap();
        let configured: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let listener = tcp_listener(Some(inherited), configured).unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        let bound = tcp_listener(None, "127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(bound.local_addr().unwrap().port() != 0);
    }

    #[tokio::test]
    async fn a_listener_turned_off_and_not_inherited_is_none() {
        assert!(optional_tcp_listener(None, None).unwrap().is_none());
        let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(
            optional_tcp_listener(Some(inherited), None)
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_busy_address_names_itself_in_the_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = tcp_listener(None, addr).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_inherited_unix_socket_is_served_without_binding() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("inherited.sock");
        let inherited = UnixListener::bind(&path).unwrap();
        let (listener, guard) = unix_listener(Some(inherited), || {
            Err::<(UnixListener, ()), _>("must not bind")
        })
        .unwrap();
        assert!(guard.is_none());
        let served = listener.local_addr().unwrap();
        assert_eq!(served.as_pathname(), Some(path.as_path()));

        let bound_path = temp.path().join("bound.sock");
        let (_listener, guard) = unix_listener(None, || {
            UnixListener::bind(&bound_path).map(|listener| (listener, "guard"))
        })
        .unwrap();
        assert_eq!(guard, Some("guard"));
    }
}
