//! Hostile clients against the real daemons: connections that never finish a request head
//! (slowloris) must not take every file descriptor. Each daemon runs under a low descriptor limit
//! (`prlimit --nofile=128`, util-linux); 140 connections each send half a request head and stall,
//! and a well-behaved client must still be served once the header timeout has closed them
//! (orchestratord with its defaults; the shim with a 1 s timeout to keep the test short); nor can
//! half-sent request bodies stall the shim's capped connections. And
//! exposure is judged on the socket really served: a non-loopback socket handed over as systemd
//! does (inside a network namespace of the test's own) without keys or a token is refused. And a
//! managed engine is out of other local users' reach, but not of the socket directory's group.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{Sidecar, sidecar_command, socket_path, write_config};
use e2e::stack::Stack;
use e2e::{DaemonBuilder, binary, http, temp_dir};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const STALLED: usize = 140;

/// Opens `STALLED` connections to `addr` that each send half a request head and then nothing.
fn stall(addr: &str) -> Vec<TcpStream> {
    (0..STALLED)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Typ")
                .unwrap();
            stream
        })
        .collect()
}

/// A well-behaved GET answered 200 within `within`, retried on timeouts.
fn served(addr: &str, path: &str, within: Duration) -> Duration {
    served_with(addr, path, &[], within)
}

/// [`served`] with extra header lines (a token).
fn served_with(addr: &str, path: &str, headers: &[(&str, &str)], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let reply = http::request_with_headers(
            addr,
            "GET",
            path,
            headers,
            None,
            Duration::from_millis(500),
        );
        match reply {
            Ok(reply) if reply.status == 200 => return started.elapsed(),
            outcome => assert!(
                started.elapsed() < within,
                "{path} not served within {within:?} while connections stall: {:?}",
                outcome.map(|reply| reply.status)
            ),
        }
    }
}

/// Every stalled connection was closed by the daemon (EOF, or an error answer then EOF).
fn all_closed(stalled: Vec<TcpStream>, within: Duration) {
    let deadline = Instant::now() + within;
    for mut stream in stalled {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        assert!(
            read.is_ok(),
            "a stalled connection was still open after {within:?}: {read:?}"
        );
    }
}

#[test]
fn half_sent_request_heads_cannot_starve_orchestratord_of_descriptors() {
    let dir = temp_dir();
    // Default limits (10 s for a head; connections capped below the descriptor limit). No
    // pool-managerd: /livez does not need one.
    let orchestrator = DaemonBuilder::new(binary("orchestratord"))
        .name("orchestratord")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--socket")
        .arg(dir.path().join("absent.sock"))
        .wrapped("prlimit", &["--nofile=128:128", "--"])
        .start();
    let addr = orchestrator.ready("listen").to_owned();
    let stalled = stall(&addr);
    let waited = served(&addr, "/livez", Duration::from_secs(30));
    eprintln!("orchestratord served /livez {waited:?} after {STALLED} stalled connections");
    all_closed(stalled, Duration::from_secs(30));
    served(&addr, "/livez", Duration::from_secs(2));
}

#[test]
fn half_sent_request_heads_cannot_starve_the_pool_managerd_shim_of_descriptors() {
    let dir = temp_dir();
    let config = write_config(
        dir.path(),
        "[debug_http]\nmax_connections = 16\nheader_timeout_ms = 1000\n",
        &[],
    );
    let sidecar = sidecar_command(dir.path(), &config)
        .wrapped("prlimit", &["--nofile=128:128", "--"])
        .start();
    let addr = sidecar.ready("debug_http").to_owned();
    let stalled = stall(&addr);
    let waited = served(&addr, "/health", Duration::from_secs(10));
    eprintln!("pool-managerd's shim served /health {waited:?} after {STALLED} stalled connections");
    all_closed(stalled, Duration::from_secs(10));
    served(&addr, "/health", Duration::from_secs(2));
}

/// The shim with at most 4 connections and a 1 s limit on request bodies, and with `token` if
/// given, gets 4 connections that each send a reload request's head (with the token) and 4
/// bytes of its 100-byte body, then nothing: it must still answer /health soon after, and have
/// answered and closed them all.
fn half_sent_reload_bodies_cannot_stall_the_shim(token: Option<&str>) {
    let dir = temp_dir();
    let mut debug_http = "[debug_http]\nmax_connections = 4\nbody_timeout_ms = 1000\n".to_owned();
    if let Some(token) = token {
        let token_file = dir.path().join("shim.token");
        std::fs::write(&token_file, token).unwrap();
        debug_http.push_str(&format!(
            "token_file = {:?}\n",
            token_file.display().to_string()
        ));
    }
    let config = write_config(dir.path(), &debug_http, &[]);
    let sidecar = sidecar_command(dir.path(), &config).start();
    let addr = sidecar.ready("debug_http").to_owned();
    let authorization = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("Authorization", value.as_str()))
        .collect();
    let auth_lines: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream
                .write_all(
                    format!(
                        "POST /pools/p/reload HTTP/1.1\r\nHost: x\r\n{auth_lines}\
                         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"mo"
                    )
                    .as_bytes(),
                )
                .unwrap();
            stream
        })
        .collect();
    let waited = served_with(&addr, "/health", &headers, Duration::from_secs(5));
    eprintln!("the shim served /health {waited:?} after 4 stalled request bodies");
    // Without a token the admin route is refused at once; with one, the body's read fails.
    let expected = if token.is_some() {
        "HTTP/1.1 400"
    } else {
        "HTTP/1.1 403"
    };
    for mut stream in stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .expect("the shim closed the stalled connection");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(expected), "{answer}");
    }
    served_with(&addr, "/health", &headers, Duration::from_secs(2));
}

#[test]
fn half_sent_admin_request_bodies_cannot_stall_the_tokenless_shim() {
    half_sent_reload_bodies_cannot_stall_the_shim(None);
}

#[test]
fn half_sent_admin_request_bodies_cannot_stall_the_shim_with_a_token() {
    half_sent_reload_bodies_cannot_stall_the_shim(Some("a-long-enough-shim-token"));
}

#[test]
fn a_request_body_that_stalls_gets_408_in_its_apis_shape_and_the_connection_back() {
    let dir = temp_dir();
    let config = dir.path().join("orchestratord.toml");
    std::fs::write(&config, "[http]\nbody_timeout_ms = 500\n").unwrap();
    let orchestrator = DaemonBuilder::new(binary("orchestratord"))
        .name("orchestratord")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--socket")
        .arg(dir.path().join("absent.sock"))
        .start();
    let addr = orchestrator.ready("listen").to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"model\":",
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 4096];
    let read = stream.read(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer[..read]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains(r#""type":"error""#),
        "Anthropic's shape: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Runs `daemon_args` under `socket-holder --once`, inside a network namespace of its own, on a TCP
/// socket bound to 0.0.0.0 (nothing can reach it from outside the namespace), named `tcp_name`;
/// returns the daemon's stderr once it exited. `None` without root (`unshare -n` needs it).
fn refused_on_an_inherited_public_socket(
    tcp_name: &str,
    daemon_args: &[&std::ffi::OsStr],
) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: unshare -n needs root (CI runs as root)");
        return None;
    }
    let dir = temp_dir();
    let holder = binary("socket-holder");
    let mut daemon = DaemonBuilder::new(&holder)
        .name("socket-holder")
        .arg("--unix")
        .arg(dir.path().join("ipc.sock"))
        .args(["--tcp", "0.0.0.0:0", "--once", "--names"])
        .arg(format!("ipc:{tcp_name}"))
        .arg("--")
        .args(daemon_args)
        .wrapped("unshare", &["-n", "--"])
        .start();
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("the daemon refused and exited");
    assert!(!status.success(), "{}", daemon.stderr());
    Some(daemon.stderr())
}

#[test]
fn orchestratord_refuses_an_inherited_public_socket_without_api_keys() {
    let dir = temp_dir();
    let program = binary("orchestratord");
    let socket = dir.path().join("absent.sock");
    let Some(stderr) = refused_on_an_inherited_public_socket(
        "http",
        &[program.as_os_str(), "--socket".as_ref(), socket.as_os_str()],
    ) else {
        return;
    };
    assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");
}

#[test]
fn pool_managerd_refuses_an_inherited_public_shim_socket_without_a_token() {
    let dir = temp_dir();
    let config = write_config(dir.path(), "", &[]);
    let program = binary("pool-managerd");
    let socket = dir.path().join("pool.sock");
    let state = dir.path().join("state");
    let Some(stderr) = refused_on_an_inherited_public_socket(
        "debug-http",
        &[
            program.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ],
    ) else {
        return;
    };
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

/// Who tries to connect in [`connects_as`].
#[derive(Clone, Copy)]
enum Peer {
    Root,
    /// uid and gid 65534 (nobody/nogroup), no supplementary groups.
    Nobody,
    /// uid and gid 65534 with this supplementary group.
    NobodyInGroup(u32),
}

/// Tries to connect to `endpoint` (`http://HOST:PORT` or a Unix socket path) as `peer`
/// (`setpriv`, util-linux, for another user): whether it connected. Debian's own Python, which
/// every user can run.
fn connects_as(endpoint: &str, peer: Peer) -> bool {
    let probe = r#"
import socket, sys
target = sys.argv[1]
if target.startswith("http://"):
    host, port = target[len("http://"):].rstrip("/").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
else:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(target)
"#;
    let groups = match peer {
        Peer::Root => None,
        Peer::Nobody => Some("--clear-groups".to_owned()),
        Peer::NobodyInGroup(gid) => Some(format!("--groups={gid}")),
    };
    let mut command = match groups {
        None => std::process::Command::new("/usr/bin/python3"),
        Some(groups) => {
            let mut command = std::process::Command::new("setpriv");
            command.args([
                "--reuid=65534",
                "--regid=65534",
                &groups,
                "--",
                "/usr/bin/python3",
            ]);
            command
        }
    };
    command
        .args(["-c", probe, endpoint])
        .output()
        .unwrap()
        .status
        .success()
}

fn connects_as_nobody_and_as_root(endpoint: &str) -> (bool, bool) {
    (
        connects_as(endpoint, Peer::Nobody),
        connects_as(endpoint, Peer::Root),
    )
}

/// A managed llama.cpp pool of the engine double (Unix socket, the default `listen`).
fn double_llamacpp_pool() -> String {
    format!(
        r#"
[[pool]]
id = "p"
model = "double"
engine = "llamacpp"
command = [{engine:?}, "--listen", "{{socket}}", "--slots", "1", "--model", "{{model}}"]
model_path = "{{dir}}/double-model.json"
"#,
        engine = binary("test-engine-double").display().to_string(),
    )
}

#[test]
fn a_managed_llamacpp_engine_listens_where_other_local_users_cannot_connect() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to another user needs root (CI runs as root)");
        return;
    }
    // No `listen`: the default for llama.cpp engines. The test's own directories are open to
    // everyone, so only what pool-managerd creates can keep other users out.
    let dir = temp_dir();
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), open.clone()).unwrap();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::set_permissions(dir.path().join("run"), open).unwrap();
    let pool = double_llamacpp_pool();
    let open_to_all = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let control = format!("http://{}", open_to_all.local_addr().unwrap());
    assert_eq!(
        connects_as_nobody_and_as_root(&control),
        (true, true),
        "the probe itself works as nobody"
    );
    let stack = Stack::builder().pool(&pool).start_in(dir);
    let endpoint = stack.endpoint("p");
    assert!(endpoint.starts_with('/'), "a Unix socket: {endpoint}");
    let (as_nobody, as_root) = connects_as_nobody_and_as_root(&endpoint);
    assert!(as_root, "pool-managerd's own user reaches the engine");
    assert!(
        !as_nobody,
        "another local user reached the engine at {endpoint}"
    );
}

#[test]
fn without_a_socket_group_engine_sockets_take_the_setgid_run_directorys_group_and_its_members_connect()
 {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to another user needs root (CI runs as root)");
        return;
    }
    // As systemd's tmpfiles.d sets up /run/pool-managerd: setgid, group of the clients
    // (orchestratord's supplementary group), no access for others. No `server.socket_group`.
    const CLIENTS: u32 = 54_321;
    let dir = temp_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, None, Some(nix::unistd::Gid::from_raw(CLIENTS))).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2750)).unwrap();
    let stack = Stack::builder().pool(&double_llamacpp_pool()).start_in(dir);
    let endpoint = stack.endpoint("p");
    assert!(endpoint.starts_with('/'), "a Unix socket: {endpoint}");
    assert!(
        connects_as(&endpoint, Peer::NobodyInGroup(CLIENTS)),
        "a member of the run directory's group could not reach the engine at {endpoint}"
    );
    assert!(
        !connects_as(&endpoint, Peer::Nobody),
        "another local user reached the engine at {endpoint}"
    );
}

#[test]
fn the_tokenless_shim_shows_why_an_engine_failed_but_not_its_output_nor_its_address() {
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        r#"
[[pool]]
id = "p"
model = "m"
engine = "llamacpp"
listen = "tcp"
command = ["/bin/sh", "-c", "echo a-users-prompt-text; exit 3", "sh", "{host}", "{port}"]
model_path = "/dev/null"
[pool.restart]
initial_ms = 60000
max_ms = 60000
"#,
    )
    .unwrap();
    let sidecar = Sidecar::from_daemon(sidecar_command(dir.path(), &config).start(), dir.path());
    let shim = sidecar.ready("debug_http").to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    let shown = loop {
        let status = http::get(&shim, "/pools/p/status", Duration::from_secs(5))
            .unwrap()
            .json();
        if let Some(error) = status["last_error"].as_str() {
            // A local user who knew a TCP engine's port could bypass keys and the queue.
            assert!(status.get("endpoint").is_none(), "{status}");
            break error.to_owned();
        }
        assert!(Instant::now() < deadline, "no failure reported: {status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(shown.contains("exited with status 3"), "{shown}");
    assert!(!shown.contains("a-users-prompt-text"), "{shown}");
    let pools = http::get(&shim, "/pools", Duration::from_secs(5)).unwrap();
    assert!(
        !pools.text().contains("a-users-prompt-text")
            && !pools.text().contains("\"endpoint\"")
            && !pools.text().contains("127.0.0.1"),
        "{}",
        pools.text()
    );
    let operator = DaemonBuilder::new(binary("pool-managerd"))
        .args(["status", "p", "--json", "--socket"])
        .arg(socket_path(dir.path()))
        .run_to_exit(Duration::from_secs(10));
    assert!(
        operator.stdout.contains("a-users-prompt-text")
            && operator
                .stdout
                .contains("\"endpoint\": \"http://127.0.0.1:"),
        "an allowed peer of the socket sees both: {}",
        operator.stdout
    );
}
