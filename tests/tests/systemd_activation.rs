//! The daemons under systemd's protocols, driven by systemd's own tools where they exist:
//! socket activation through `systemd-socket-activate` (Debian's systemd package), and the
//! sd_notify datagrams read from a NOTIFY_SOCKET the test binds itself. The engine is the test
//! engine double (a fake llama-server).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use daemon_support::systemd::CORE_TASK_FAULT_ENV;
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
    let config = one_pool_config(dir.path(), &engine);
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

/// pool-managerd's config in `dir` with one pool, `p` (2 slots), on the test's `engine`.
fn one_pool_config(dir: &Path, engine: &e2e::Daemon) -> std::path::PathBuf {
    write_config(dir, "", &[PoolSpec::new("p", engine.ready("listen"), 2)])
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
    let config = one_pool_config(dir.path(), &engine);

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
    let config = one_pool_config(dir2.path(), &engine);
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

/// Stops the socket holder cleanly (it stops pool-managerd, which stops its engines), then kills
/// whatever engine is still recorded.
struct Holder {
    daemon: e2e::Daemon,
    state_dir: std::path::PathBuf,
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.daemon.try_wait().is_none() {
            self.daemon.kill_with(Signal::SIGTERM);
            self.daemon.wait_exit(WAIT);
        }
        e2e::sidecar::kill_recorded_engines(&self.state_dir);
    }
}

fn child_pids(holder: &e2e::Daemon) -> Vec<i32> {
    holder
        .stdout()
        .lines()
        .filter_map(|line| line.strip_prefix("CHILD pid="))
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

fn stream_chat(addr: &str, tokens: u32) -> (usize, bool) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let body = serde_json::json!({
        "model": "double", "stream": true, "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut chunks = 0;
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return (chunks, true);
            }
            let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
            if chunk["choices"][0]["delta"]["content"].is_string() {
                chunks += 1;
            }
        }
    }
    (chunks, false)
}

#[test]
fn pool_managerd_restarted_on_its_inherited_sockets_under_load_loses_nothing() {
    let dir = temp_dir();
    let model = dir.path().join("model.json");
    std::fs::write(&model, "{}").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[pool]]\nid = \"p\"\nmodel = \"double\"\nengine = \"llamacpp\"\n\
             command = [{:?}, \"--listen\", \"{{socket}}\", \"--slots\", \"2\", \"--token-delay-ms\", \"20\", \"--model\", \"{{model}}\"]\n\
             model_path = {:?}\nlisten = \"unix\"\n",
            binary("test-engine-double").display().to_string(),
            model.display().to_string()
        ),
    )
    .unwrap();
    let socket = dir.path().join("pool.sock");
    let state_dir = dir.path().join("state");
    let holder = Holder {
        daemon: DaemonBuilder::new(binary("socket-holder"))
            .name("socket-holder")
            .arg("--unix")
            .arg(&socket)
            .arg("--")
            .arg(binary("pool-managerd"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .start(),
        state_dir: state_dir.clone(),
    };
    let shim = holder.daemon.ready("tcp").to_owned();
    let orchestrator = DaemonBuilder::new(binary("orchestratord"))
        .args(["--listen", "127.0.0.1:0", "--socket"])
        .arg(&socket)
        .start();
    let addr = orchestrator.ready("listen").to_owned();
    let status = |field: &str| -> serde_json::Value {
        http::get(&shim, "/pools/p/status", WAIT)
            .map(|reply| reply.json()[field].clone())
            .unwrap_or(serde_json::Value::Null)
    };
    let deadline = Instant::now() + WAIT;
    while http::get(&addr, "/readyz", WAIT).unwrap().status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let engine_record = || {
        std::fs::read_to_string(state_dir.join("engines/p.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|record| record["pid"].as_u64())
    };
    let engine = engine_record().unwrap();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || stream_chat(&addr, 80))
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while status("active_leases") != 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }

    let first = *child_pids(&holder.daemon).last().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + WAIT;
    while child_pids(&holder.daemon).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the holder never restarted pool-managerd"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for stream in streams {
        assert_eq!(
            stream.join().unwrap(),
            (80, true),
            "a client saw its stream break"
        );
    }
    assert_eq!(
        engine_record(),
        Some(engine),
        "the engine was adopted, not restarted"
    );
    assert_eq!(status("restarts"), 0);
    let deadline = Instant::now() + WAIT;
    while status("active_leases") != 0 {
        assert!(
            Instant::now() < deadline,
            "a lease leaked: {}",
            status("active_leases")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(orchestrator);
    drop(holder);
}

/// FAULT INJECTED (debug builds only: nothing a peer sends can make a core task panic): whichever
/// core task of either daemon panics, the daemon ends at once with status 70 and says which task
/// died, so that systemd restarts it instead of keeping a daemon that answers 503 for ever.
#[test]
fn an_injected_panic_in_a_core_task_ends_its_daemon_with_status_70_naming_the_task() {
    let engine = start_engine_double::<&str>(&[]);
    for task in ["the registry", "the pools controller"] {
        let dir = temp_dir();
        let config = one_pool_config(dir.path(), &engine);
        let run = sidecar_command(dir.path(), &config)
            .env(CORE_TASK_FAULT_ENV, format!("{task}=panic"))
            .run_to_exit(WAIT);
        assert_eq!(run.status.code(), Some(70), "{task}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("{task} panicked")),
            "{task}: {}",
            run.stderr
        );
    }

    let dir = temp_dir();
    let config = one_pool_config(dir.path(), &engine);
    let _sidecar = sidecar_command(dir.path(), &config).start();
    let run = DaemonBuilder::new(binary("orchestratord"))
        .args(["--listen", "127.0.0.1:0", "--socket"])
        .arg(e2e::sidecar::socket_path(dir.path()))
        .env(CORE_TASK_FAULT_ENV, "the scheduler=panic")
        .run_to_exit(WAIT);
    assert_eq!(run.status.code(), Some(70), "{}", run.stderr);
    assert!(
        run.stderr.contains("the scheduler panicked"),
        "{}",
        run.stderr
    );
}

/// FAULT INJECTED (debug builds only): a core task that stops answering — deadlocked, not dead —
/// stops the watchdog being fed, so systemd's WatchdogSec= kills and restarts the daemon. A
/// plain timer would keep feeding it.
#[test]
fn an_injected_hang_in_a_core_task_stops_the_watchdog_being_fed() {
    let engine = start_engine_double::<&str>(&[]);
    let dir = temp_dir();
    let config = one_pool_config(dir.path(), &engine);
    let _sidecar = sidecar_command(dir.path(), &config).start();
    let (notify, notify_path) = notify_socket(dir.path());
    let orchestrator = under_watchdog(binary("orchestratord"))
        .args(["--listen", "127.0.0.1:0", "--socket"])
        .arg(e2e::sidecar::socket_path(dir.path()))
        .env("NOTIFY_SOCKET", &notify_path)
        .env(CORE_TASK_FAULT_ENV, "the scheduler=hang")
        .start();
    let mut seen = Vec::new();
    read_until(&notify, "READY=1", &mut seen);
    // The watchdog interval is 200 ms, fed every 100 ms when all is well: a second is ten feeds.
    assert!(
        orchestrator.wait_for_stderr("did not answer", WAIT),
        "{}",
        orchestrator.stderr()
    );
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    while let Ok(size) = notify.recv(&mut buffer) {
        let message = String::from_utf8_lossy(&buffer[..size]).into_owned();
        assert!(
            !message.lines().any(|line| line == "WATCHDOG=1"),
            "the watchdog was fed by a daemon whose scheduler hangs: {message}"
        );
    }
}
