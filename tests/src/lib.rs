//! Harness for end-to-end tests that run the workspace's real binaries as child processes.
//!
//! It owns: finding binaries in the target directory ([`binary`]), short temporary directories for
//! Unix socket paths ([`temp_dir`]), starting a daemon and waiting for its `READY key=value…` line
//! ([`Daemon`]), running a short CLI invocation to completion ([`RunOutput`]), and a minimal blocking
//! HTTP/1.1 GET over TCP or a Unix socket ([`http`]), and vllm-router as a peer for `relay-bench`
//! ([`vllm_router`], which returns errors instead of panicking). The binary `test-engine-double` (a fake
//! llama-server for fault injection) lives in this package too.
//!
//! Everything here is blocking (std processes and threads), so it works from plain `#[test]`s and from
//! `#[tokio::test]`s alike. Failures panic with the daemon's collected stderr in the message: this is
//! test code, and a panic is how a test reports.
//!
//! Invariants a reader must not break: a started child is always owned by a [`Daemon`] before anything
//! can panic, so its `Drop` kills (by pid, SIGKILL) and reaps it; signals go to the pid we spawned,
//! never to a process looked up by name.

pub mod daemon;
pub mod http;
pub mod real_engine;
pub mod sidecar;
pub mod stack;
pub mod vllm_router;

use std::ffi::OsStr;
use std::path::PathBuf;

pub use daemon::{Daemon, DaemonBuilder, RunOutput};
pub use nix::sys::signal::Signal;

/// Path of the workspace binary `name` (e.g. `"pool-managerd"`, `"test-engine-double"`) in the target
/// directory the running test was built into.
///
/// Integration test executables live in `<target>/<profile>/deps/`, binaries in `<target>/<profile>/`.
/// Cargo builds only the *test's own package's* binaries before running it, so binaries of other
/// packages must already be built: panics with instructions when the file is missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot locate the running test executable: {e}"));
    let Some(mut dir) = exe.parent() else {
        panic!("test executable {} has no parent directory", exe.display());
    };
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}.\n\
             Run `cargo build --workspace --bins` first, with the same profile and CARGO_TARGET_DIR \
             as the tests.",
            path.display()
        );
    }
    path
}

/// Whether process `pid` is running: it exists and is not a zombie (reaped or dead, it is gone
/// for a test's purposes).
pub fn process_alive(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            != Some("Z")
    })
}

/// A fresh temporary directory with a short path (`/tmp/pmXXXXXX`), removed on drop.
///
/// Unix socket paths are limited to about 108 bytes, and the default temp dir (`$TMPDIR`) can be long.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pm")
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("cannot create a temporary directory in /tmp: {e}"))
}

/// Starts `test-engine-double` with `args` and waits for its `READY listen=<addr>` line; the address
/// is `daemon.ready("listen")`. Without `--listen` it listens on `127.0.0.1:0`.
pub fn start_engine_double<S: AsRef<OsStr>>(args: &[S]) -> Daemon {
    DaemonBuilder::new(binary("test-engine-double"))
        .args(args)
        .start()
}
