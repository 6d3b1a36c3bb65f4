//! Creating the listening socket file the safe way.
//!
//! The socket lives in a directory of mode 0750 (created if missing) and is itself mode 0660,
//! optionally owned by a client group. A lock file beside it (`<socket>.lock`, flock) makes two
//! daemons starting at once exclude each other; a daemon restarted right after a crash waits a
//! few seconds for a lock whose holder does not answer a Hello on the socket (a child of the
//! crashed daemon between fork and exec can hold the lock, and the listening socket, for a
//! moment). An existing socket file is probed: a live one is never
//! taken over, a stale one (nobody listening) is replaced. Anything at the path that is not a
//! socket is left alone and reported. Engines' Unix sockets get a directory of their own beside
//! the socket ([`prepare_engine_directory`]) that nobody but pool-managerd and the client group
//! (configured, or handed down by a setgid parent) can enter.

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, chown};
use pool_ipc::codec::{DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES, frame_bytes};
use pool_ipc::wire::{ClientFrame, Hello, MAGIC, PROTOCOL_VERSION};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another pool-managerd is already serving {0} (it answered a connect, or a Hello while holding the lock); refusing to take over its socket"
    )]
    AlreadyServing(PathBuf),
    #[error("another pool-managerd holds the lock {0}; refusing to start a second one")]
    Locked(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket path {path} is {len} bytes long; Unix sockets allow at most 107")]
    PathTooLong { path: PathBuf, len: usize },
    #[error("socket path {0} has no parent directory")]
    NoParent(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SocketError {
    let path = path.to_owned();
    move |source| SocketError::Io { what, path, source }
}

/// Keeps the socket's lock; removes the socket file and the lock when dropped.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// How long a daemon waits for the lock when its holder is not a pool-managerd serving the socket:
/// right after a crash, a child between fork and exec (or a dying process) may still hold it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the lock's holder has to answer a Hello on the socket to count as a live daemon.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The socket's lock. Refused at once when another pool-managerd answers on the socket; otherwise
/// retried for up to [`LOCK_WAIT`], since a holder that serves nothing is on its way out.
fn take_lock(file: File, lock_path: &Path, socket: &Path) -> Result<Flock<File>, SocketError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, _)) => file = returned,
        }
        if answers_hello(socket) {
            return Err(SocketError::AlreadyServing(socket.to_owned()));
        }
        if std::time::Instant::now() >= deadline {
            return Err(SocketError::Locked(lock_path.to_owned()));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether a pool-managerd serves `socket`: it answers a Hello with a frame (`Welcome`, or
/// `Refused` for a peer it does not admit) within [`ANSWER_WAIT`]. A connect alone proves nothing:
/// it also succeeds, into the backlog, against a process that merely holds the listening socket
/// (a child of a killed daemon between fork and exec).
fn answers_hello(socket: &Path) -> bool {
    let hello = ClientFrame::Hello(Hello {
        magic: MAGIC,
        protocol_version: PROTOCOL_VERSION,
        client_name: "pool-managerd (starting: is the socket served?)".to_owned(),
        held_leases: Vec::new(),
    });
    let Ok(frame) = frame_bytes(&hello, DEFAULT_MAX_FRAME_BYTES) else {
        return false;
    };
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let mut header = [0u8; HEADER_BYTES];
    stream.set_write_timeout(Some(ANSWER_WAIT)).is_ok()
        && stream.set_read_timeout(Some(ANSWER_WAIT)).is_ok()
        && stream.write_all(&frame).is_ok()
        && stream.read_exact(&mut header).is_ok()
}

/// Binds the socket at `path` (see the module docs for the rules).
pub fn bind_socket(
    path: &Path,
    group: Option<u32>,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let len = path.as_os_str().len();
    if len > 107 {
        return Err(SocketError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .ok_or_else(|| SocketError::NoParent(path.to_owned()))?;
    prepare_directory(dir, group)?;

    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock_path = PathBuf::from(lock_name);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io("cannot open lock file", &lock_path))?;
    let lock = take_lock(lock_file, &lock_path, path)?;

    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_owned()));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::AlreadyServing(path.to_owned())),
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing a stale socket file (nobody listening)");
                std::fs::remove_file(path).map_err(io("cannot remove stale socket", path))?;
            }
            Err(error) => return Err(io("cannot probe existing socket", path)(error)),
        },
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(io("cannot inspect socket path", path)(error)),
    }

    let listener = UnixListener::bind(path).map_err(io("cannot bind socket", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("cannot set socket mode", path))?;
    if let Some(gid) = group {
        chown(path, None, Some(Gid::from_raw(gid)))
            .map_err(|errno| io("cannot chown socket", path)(errno.into()))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(io("cannot make socket non-blocking", path))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            lock_path,
            _lock: lock,
        },
    ))
}

fn prepare_directory(dir: &Path, group: Option<u32>) -> Result<(), SocketError> {
    match std::fs::metadata(dir) {
        Ok(metadata) => {
            if metadata.permissions().mode() & 0o007 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", metadata.permissions().mode() & 0o7777), "socket directory is accessible to everyone; 0750 is recommended");
            }
            Ok(())
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io("cannot create socket directory", dir))?;
            // The mode given to mkdir is filtered by the umask; say exactly what we mean.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                .map_err(io("cannot set socket directory mode", dir))?;
            if let Some(gid) = group {
                chown(dir, None, Some(Gid::from_raw(gid)))
                    .map_err(|errno| io("cannot chown socket directory", dir)(errno.into()))?;
            }
            Ok(())
        }
        Err(error) => Err(io("cannot inspect socket directory", dir)(error)),
    }
}

/// The directory of the engines' Unix sockets: mode 0750 and setgid with a group, so that every
/// socket in it belongs to that group: the client group when one is configured (the directory is
/// then owned by it), else the group a setgid parent hands down (systemd's tmpfiles.d makes
/// `/run/pool-managerd` 2750, group pool-clients), else none (pool-managerd's own group, no
/// setgid). Connecting to a socket needs search permission on its directory, so other local users
/// cannot reach an engine whatever its socket's mode. An existing directory of ours that others can
/// enter is closed to them, and one that lost the setgid bit its parent hands down gets it back.
pub fn prepare_engine_directory(dir: &Path, group: Option<u32>) -> Result<(), SocketError> {
    match std::fs::metadata(dir) {
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o7777;
            let mut wanted = mode & !0o007;
            if group.is_none() && parent_hands_down_group(dir, metadata.gid()) {
                wanted |= 0o2000;
            }
            if wanted == mode {
                return Ok(());
            }
            if metadata.uid() != nix::unistd::geteuid().as_raw() {
                if mode & 0o007 != 0 {
                    tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the engines' socket directory is accessible to everyone and not ours to change; 0750 is needed");
                }
                return Ok(());
            }
            tracing::info!(dir = %dir.display(), mode = format!("{mode:o}"), wanted = format!("{wanted:o}"), "setting the engines' socket directory's mode: closed to other users, setgid to the group its parent hands down");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))
                .map_err(io("cannot set the engines' socket directory mode", dir))
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io("cannot create the engines' socket directory", dir))?;
            let setgid = match group {
                Some(gid) => {
                    chown(dir, None, Some(Gid::from_raw(gid))).map_err(|errno| {
                        io("cannot chown the engines' socket directory", dir)(errno.into())
                    })?;
                    0o2000
                }
                // In a setgid parent mkdir gave the directory the parent's group and the setgid
                // bit: keep both.
                None => {
                    std::fs::metadata(dir)
                        .map_err(io("cannot inspect the engines' socket directory", dir))?
                        .permissions()
                        .mode()
                        & 0o2000
                }
            };
            // After the chown, which clears setgid; the mode given to mkdir is filtered by the
            // umask besides.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750 | setgid))
                .map_err(io("cannot set the engines' socket directory mode", dir))
        }
        Err(error) => Err(io("cannot inspect the engines' socket directory", dir)(
            error,
        )),
    }
}

/// Whether `dir`'s parent is setgid with group `gid`: what mkdir hands down to a new directory.
fn parent_hands_down_group(dir: &Path, gid: u32) -> bool {
    dir.parent()
        .and_then(|parent| std::fs::metadata(parent).ok())
        .is_some_and(|parent| parent.permissions().mode() & 0o2000 != 0 && parent.gid() == gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_socket_directory_is_closed_to_other_users_even_when_it_existed() {
        let temp = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let fresh = temp.path().join("run/engines");
        prepare_engine_directory(&fresh, None).unwrap();
        assert_eq!(mode(&fresh), 0o750);
        let grouped = temp.path().join("grouped/engines");
        let own_group = nix::unistd::getegid().as_raw();
        prepare_engine_directory(&grouped, Some(own_group)).unwrap();
        assert_eq!(
            mode(&grouped),
            0o2750,
            "setgid: sockets inside get the group"
        );
        let open = temp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_engine_directory(&open, None).unwrap();
        assert_eq!(mode(&open), 0o770);
    }

    #[test]
    fn without_a_client_group_the_engines_socket_directory_keeps_the_setgid_its_parent_hands_down()
    {
        let temp = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let run = temp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2750)).unwrap();
        let fresh = run.join("engines");
        prepare_engine_directory(&fresh, None).unwrap();
        assert_eq!(mode(&fresh), 0o2750);
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().gid(),
            std::fs::metadata(&run).unwrap().gid()
        );
        // One an earlier version left without the bit gets it back.
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o750)).unwrap();
        prepare_engine_directory(&fresh, None).unwrap();
        assert_eq!(mode(&fresh), 0o2750);
    }

    #[test]
    fn a_fresh_socket_gets_a_private_directory_and_mode_0660() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("run/pool.sock");
        let (_listener, file) = bind_socket(&path, None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o660);
        assert_eq!(mode(path.parent().unwrap()), 0o750);
        drop(file);
        assert!(!path.exists(), "the socket file is removed on drop");
    }

    #[test]
    fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("pool.sock");
        let (listener, first) = bind_socket(&path, None).unwrap();
        // The lock's holder answers a Hello on the socket: refused at once.
        listener.set_nonblocking(false).unwrap();
        let outcome = std::thread::scope(|scope| {
            let answering = scope.spawn(|| {
                let (mut peer, _) = listener.accept().unwrap();
                let mut hello = [0u8; HEADER_BYTES];
                peer.read_exact(&mut hello).unwrap();
                peer.write_all(&[0, 0, 0, 1, 0]).unwrap();
            });
            let started = std::time::Instant::now();
            let second = bind_socket(&path, None);
            answering.join().unwrap();
            (second, started.elapsed())
        });
        assert!(
            matches!(outcome.0, Err(SocketError::AlreadyServing(_))),
            "{:?}",
            outcome.0
        );
        assert!(outcome.1 < LOCK_WAIT, "refused at once: {:?}", outcome.1);
        // A listener without the lock (e.g. started by hand elsewhere) is still detected live.
        std::mem::forget(first);
        let lock_path = temp.path().join("pool.sock.lock");
        std::fs::remove_file(&lock_path).unwrap();
        assert!(matches!(
            bind_socket(&path, None),
            Err(SocketError::AlreadyServing(_))
        ));
        drop(listener);
        // Nobody listens now: the file is stale.
        assert!(bind_socket(&path, None).is_ok());
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("pool.sock");
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            bind_socket(&path, None),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
