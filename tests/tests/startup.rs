//! Starting, refusing to start, and stopping the real pool-managerd: config errors, socket
//! ownership, peer credentials, SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{PoolSpec, sidecar_command, socket_path, start_sidecar, write_config};
use e2e::{DaemonBuilder, Signal, binary, start_engine_double, temp_dir};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn status_cli(socket: &Path) -> e2e::RunOutput {
    DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .run_to_exit(WAIT)
}

/// Runs pool-managerd with `config` and expects it to fail before binding anything.
fn expect_startup_failure(config: &Path, needle: &str) {
    let dir = temp_dir();
    let run = sidecar_command(dir.path(), config).run_to_exit(WAIT);
    assert_eq!(run.status.code(), Some(2), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in: {}",
        run.stderr
    );
    assert!(!run.stdout.contains("READY"), "{}", run.stdout);
    assert!(
        !socket_path(dir.path()).exists(),
        "a failed start left a socket behind"
    );
}

#[test]
fn a_malformed_or_unreadable_config_names_the_problem_and_starts_nothing() {
    let dir = temp_dir();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    expect_startup_failure(&dir.path().join("missing.toml"), "cannot read config");
    expect_startup_failure(dir.path(), "cannot read config");
    expect_startup_failure(&write("syntax.toml", "[[pool]\nid ="), "is not valid");
    let pool = "[[pool]]\nid = \"a\"\nmodel = \"m\"\nengine = \"llamacpp\"\nendpoint = \"http://127.0.0.1:1\"\nslots = 2\n";
    expect_startup_failure(
        &write("engine.toml", &pool.replace("llamacpp", "tgi")),
        "unknown variant `tgi`",
    );
    expect_startup_failure(
        &write("slots.toml", &pool.replace("slots = 2", "slots = 0")),
        "pool \"a\": slots must be between 1 and 1024, got 0",
    );
    expect_startup_failure(
        &write("twice.toml", &format!("{pool}{pool}")),
        "pool \"a\" is declared twice",
    );
    expect_startup_failure(
        &write("typo.toml", &pool.replace("slots", "slot")),
        "unknown field `slot`",
    );
    expect_startup_failure(
        &write(
            "public.toml",
            &format!("[debug_http]\nlisten = \"0.0.0.0:9200\"\n{pool}"),
        ),
        "not a loopback address",
    );
}

#[test]
fn a_second_daemon_on_a_live_socket_refuses_to_start_and_the_first_keeps_serving() {
    let dir = temp_dir();
    let config = write_config(dir.path(), "", &[]);
    let first = start_sidecar(dir.path(), &config);
    let second = sidecar_command(dir.path(), &config).run_to_exit(WAIT);
    assert_eq!(second.status.code(), Some(2), "{}", second.stderr);
    assert!(
        second.stderr.contains("another pool-managerd"),
        "{}",
        second.stderr
    );
    let status = status_cli(&socket_path(dir.path()));
    assert_eq!(status.status.code(), Some(0), "{}", status.stderr);
    drop(first);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = temp_dir();
    let socket = socket_path(dir.path());
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    // A socket file nobody listens on, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let config = write_config(dir.path(), "", &[]);
    let daemon = start_sidecar(dir.path(), &config);
    assert!(
        daemon.wait_for_stderr("replacing a stale socket file", WAIT),
        "{}",
        daemon.stderr()
    );
    assert_eq!(status_cli(&socket).status.code(), Some(0));
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_removes_its_socket() {
    let dir = temp_dir();
    let engine = start_engine_double::<&str>(&[]);
    let config = write_config(
        dir.path(),
        "",
        &[PoolSpec::new("p", engine.ready("listen"), 2)],
    );
    let mut daemon = start_sidecar(dir.path(), &config);
    let socket = socket_path(dir.path());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o750);
    daemon.kill_with(Signal::SIGTERM);
    let status = daemon.wait_exit(WAIT).expect("pool-managerd did not stop");
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(!socket.exists(), "the socket file was left behind");
}

/// Runs `pool-managerd status` as uid/gid 65534 (nobody/nogroup) from a copy of the binary
/// that user can execute.
fn status_as_nobody(dir: &Path, socket: &Path) -> std::process::Output {
    cli_as_nobody(dir, socket, &["status"])
}

fn cli_as_nobody(dir: &Path, socket: &Path, args: &[&str]) -> std::process::Output {
    let copy = dir.join("pool-managerd");
    std::fs::copy(binary("pool-managerd"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Another test's fork can briefly hold the copy's write descriptor (until its exec), which
    // makes exec fail with ETXTBSY: try again.
    for _ in 0..100 {
        match std::process::Command::new(&copy)
            .args(args)
            .arg("--socket")
            .arg(socket)
            .uid(65534)
            .gid(65534)
            .output()
        {
            Err(error) if error.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
    panic!("{} stayed busy", copy.display());
}

#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused_and_an_allowed_group_is_admitted() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run a client as another uid");
        return;
    }
    let dir = temp_dir();
    // The socket's group lets nobody reach the socket; only the credentials check stops it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = write_config(dir.path(), "socket_group = 65534", &[]);
    let daemon = start_sidecar(dir.path(), &config);
    let refused = status_as_nobody(dir.path(), &socket_path(dir.path()));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("refused the connection: unauthorized (5): uid 65534"),
        "{stderr}"
    );
    assert!(daemon.wait_for_stderr("refused a peer that is not on the allowlist", WAIT));
    drop(daemon);

    let config = write_config(
        dir.path(),
        "socket_group = 65534\nallowed_gids = [65534]",
        &[],
    );
    let _daemon = start_sidecar(dir.path(), &config);
    let admitted = status_as_nobody(dir.path(), &socket_path(dir.path()));
    assert_eq!(
        admitted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );
    // Admitted is not admin: admin operations stay with admin_uids/admin_gids.
    let drain = cli_as_nobody(dir.path(), &socket_path(dir.path()), &["drain", "any"]);
    let stderr = String::from_utf8_lossy(&drain.stderr);
    assert_eq!(drain.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unauthorized (5): drain is an admin operation; uid 65534 is not an admin"),
        "{stderr}"
    );
}

/// A dying holder of pool-managerd's lock (what a crashed daemon's child between fork and exec
/// looks like): it holds the lock and, with `listening`, a bound, listening socket that answers
/// nothing (a connect succeeds, into its backlog); it lets go of both a second later. Returns the
/// socket's path and the thread that lets go.
fn dying_lock_holder(dir: &Path, listening: bool) -> (PathBuf, std::thread::JoinHandle<()>) {
    let socket = socket_path(dir);
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let mut lock_name = socket.as_os_str().to_owned();
    lock_name.push(".lock");
    let file = std::fs::File::create(&lock_name).unwrap();
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .unwrap_or_else(|(_, errno)| panic!("cannot take the lock: {errno}"));
    let listener = listening.then(|| std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(listener);
        drop(held);
    });
    (socket, releaser)
}

#[test]
fn a_daemon_restarted_while_a_dying_holder_keeps_the_lock_waits_for_it_instead_of_failing() {
    let dir = temp_dir();
    let config = write_config(dir.path(), "", &[]);
    let (_, releaser) = dying_lock_holder(dir.path(), false);
    let daemon = sidecar_command(dir.path(), &config).start();
    assert!(daemon.ready("socket").ends_with("pool.sock"));
    releaser.join().unwrap();
}

#[test]
fn a_daemon_restarted_while_a_silent_holder_keeps_the_lock_and_a_listener_waits_for_it() {
    let dir = temp_dir();
    let config = write_config(dir.path(), "", &[]);
    let (socket, releaser) = dying_lock_holder(dir.path(), true);
    let daemon = sidecar_command(dir.path(), &config).start();
    assert!(daemon.ready("socket").ends_with("pool.sock"));
    releaser.join().unwrap();
    assert_eq!(status_cli(&socket).status.code(), Some(0));
}
