//! The daemons under systemd's protocols, driven by systemd's own tools where they exist:
//! socket activation through `systemd-socket-activate` (Debian's systemd package), and the
//! sd_notify datagrams read from a NOTIFY_SOCKET the test binds itself. The engine is the test
//! engine double (a fake llama-server).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{PoolSpec, sidecar_command, write_config};
use e2e::{DaemonBuilder, Signal, binary, http, start_engine_double, temp_dir};
use pool_ipc::client::{ClientConfig, PoolClient};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_managerd_under_socket_activation_serves_an_early_client_and_binds_nothing() {
    let dir = temp_dir();
    // A slow first probe keeps the daemon busy starting while the client is already waiting.
    let engine = start_engine_double(&["--health-delay-ms", "400"]);
    let config = write_config(
        dir.path(),
        "",
        &[PoolSpec::new("p", engine.ready("listen"), 2)],
    );
    let socket = dir.path().join("pool.sock");
    let port = free_port();
    let not_used = dir.path().join("own.sock");
    let child = Child(
        std::process::Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--fdname=ipc:debug-http")
            .arg(binary("pool-managerd"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&not_used)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("systemd-socket-activate (Debian's systemd package) must be installed"),
    );
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // This connection starts the daemon; it is answered once the daemon is up.
    let started = Instant::now();
    let client = PoolClient::connect(ClientConfig::new(&socket, "early"))
        .await
        .unwrap();
    let status = client.pool_status(&"p".into()).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered before the daemon could have started"
    );
    assert_eq!(status.slots_total, 2);
    assert!(!not_used.exists(), "the daemon bound a socket of its own");
    let shim = http::get(&format!("127.0.0.1:{port}"), "/health", WAIT).unwrap();
    assert_eq!(shim.status, 200, "the inherited shim socket serves");
    client.close();
    drop(child);
    assert!(
        socket.exists(),
        "an inherited socket belongs to systemd: the daemon must not remove it"
    );
}

/// Reads notify datagrams until one contains `wanted`; returns everything read.
fn read_until(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT;
    let mut buffer = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "never got {wanted}; got {seen:?}"
        );
        match socket.recv(&mut buffer) {
            Ok(len) => {
                let message = String::from_utf8_lossy(&buffer[..len]).into_owned();
                let done = message.lines().any(|line| line.starts_with(wanted));
                seen.push(message);
                if done {
                    return;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(error) => panic!("{error}"),
        }
    }
}

fn notify_socket(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (socket, path)
}

fn position(seen: &[String], prefix: &str) -> usize {
    seen.iter()
        .position(|message| message.lines().any(|line| line.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no {prefix} in {seen:?}"))
}

/// Runs `program` the way systemd does with WatchdogSec=: WATCHDOG_USEC set, and WATCHDOG_PID
/// naming the daemon itself (a shell that `exec`s keeps its pid).
fn under_watchdog(program: std::path::PathBuf) -> DaemonBuilder {
    DaemonBuilder::new("sh")
        .name(program.file_name().unwrap().to_string_lossy().into_owned())
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(program)
        .env("WATCHDOG_USEC", "200000")
}

#[test]
fn both_daemons_tell_systemd_ready_status_watchdog_and_stopping_in_order() {
    let dir = temp_dir();
    let engine = start_engine_double::<&str>(&[]);
    let config = write_config(
        dir.path(),
        "",
        &[PoolSpec::new("p", engine.ready("listen"), 2)],
    );

    let (notify, notify_path) = notify_socket(dir.path());
    let mut sidecar = under_watchdog(binary("pool-managerd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(e2e::sidecar::socket_path(dir.path()))
        .arg("--debug-listen")
        .arg("off")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify_path)
        .start();
    let mut seen = Vec::new();
    read_until(&notify, "WATCHDOG=1", &mut seen);
    assert!(
        position(&seen, "READY=1") <= position(&seen, "STATUS=1/1 pools ready"),
        "{seen:?}"
    );
    assert!(
        position(&seen, "STATUS=") < position(&seen, "WATCHDOG=1"),
        "{seen:?}"
    );
    sidecar.kill_with(Signal::SIGTERM);
    read_until(&notify, "STOPPING=1", &mut seen);
    assert_eq!(sidecar.wait_exit(WAIT).unwrap().code(), Some(0));

    let dir2 = temp_dir();
    let config = write_config(
        dir2.path(),
        "",
        &[PoolSpec::new("p", engine.ready("listen"), 2)],
    );
    let _sidecar = sidecar_command(dir2.path(), &config).start();
    let (notify, notify_path) = notify_socket(dir2.path());
    let mut orchestrator = under_watchdog(binary("orchestratord"))
        .args(["--listen", "127.0.0.1:0", "--socket"])
        .arg(e2e::sidecar::socket_path(dir2.path()))
        .env("NOTIFY_SOCKET", &notify_path)
        .start();
    let mut seen = Vec::new();
    read_until(&notify, "WATCHDOG=1", &mut seen);
    assert!(
        position(&seen, "READY=1") < position(&seen, "WATCHDOG=1"),
        "{seen:?}"
    );
    orchestrator.kill_with(Signal::SIGTERM);
    read_until(&notify, "STOPPING=1", &mut seen);
    assert_eq!(orchestrator.wait_exit(WAIT).unwrap().code(), Some(0));
}
