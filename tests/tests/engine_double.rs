//! The test engine double against its contract (the llama-server shapes the supervisor relies on, and
//! each injected fault), and the harness's own READY / failure handling.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic is the failure report"
)]

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use e2e::{Daemon, Signal, binary, http, start_engine_double, temp_dir};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `GET path` until it answers `status`, returning that reply; panics after `TIMEOUT`.
fn wait_for_status(addr: &str, path: &str, status: u16) -> http::Reply {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = http::get(addr, path, TIMEOUT).unwrap();
        if reply.status == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {} ({}), not {status}",
            reply.status,
            reply.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn health_is_503_while_loading_then_200_over_tcp() {
    let spawned = Instant::now();
    let engine = start_engine_double(&["--listen", "127.0.0.1:0", "--load-ms", "300"]);
    let addr = engine.ready("listen");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_ne!(addr, "127.0.0.1:0", "READY must carry the bound port");

    let loading = http::get(addr, "/health", TIMEOUT).unwrap();
    assert_eq!(loading.status, 503, "{}", loading.text());
    assert_eq!(
        loading.json(),
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    );
    let props_while_loading = http::get(addr, "/props", TIMEOUT).unwrap();
    assert_eq!(props_while_loading.status, 503);

    let ok = wait_for_status(addr, "/health", 200);
    assert!(spawned.elapsed() >= Duration::from_millis(300));
    assert_eq!(ok.json(), json!({"status": "ok"}));
    assert_eq!(ok.header("content-type"), Some("application/json"));
}

#[test]
fn props_and_slots_describe_the_engine_over_a_unix_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let engine = start_engine_double(&[
        "--listen".as_ref(),
        socket.as_os_str(),
        "--slots".as_ref(),
        "3".as_ref(),
        "--model-alias".as_ref(),
        "tiny".as_ref(),
    ]);
    assert_eq!(engine.ready_path("listen"), socket);
    assert!(engine.ready_line().starts_with("READY listen=/tmp/pm"));
    let addr = engine.ready("listen");

    let health = http::get(addr, "/health", TIMEOUT).unwrap();
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );

    let props = http::get(addr, "/props", TIMEOUT).unwrap();
    assert_eq!(props.status, 200);
    let props = props.json();
    assert_eq!(props["total_slots"], 3);
    assert_eq!(props["model_alias"], "tiny");
    assert_eq!(props["default_generation_settings"]["n_ctx"], 256);
    assert!(
        props["build_info"]
            .as_str()
            .unwrap()
            .starts_with("test-engine-double ")
    );

    let slots = http::get(addr, "/slots", TIMEOUT).unwrap();
    assert_eq!(slots.status, 200);
    assert_eq!(
        slots.json(),
        json!([
            {"id": 0, "is_processing": false},
            {"id": 1, "is_processing": false},
            {"id": 2, "is_processing": false},
        ])
    );

    let missing = http::get(addr, "/no-such-route", TIMEOUT).unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], 404);
}

#[test]
fn props_defaults_to_four_slots_and_the_test_double_alias() {
    let engine = start_engine_double::<&str>(&[]);
    let props = http::get(engine.ready("listen"), "/props", TIMEOUT)
        .unwrap()
        .json();
    assert_eq!(props["total_slots"], 4);
    assert_eq!(props["model_alias"], "test-double");
}

fn assert_never_answers(addr: &str) {
    let asked = Instant::now();
    let err = http::get(addr, "/health", Duration::from_millis(500)).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "expected a read timeout (connection accepted, no answer, not closed), got {err:?}"
    );
    assert!(asked.elapsed() >= Duration::from_millis(450));
}

#[test]
fn hang_accepts_connections_but_never_answers() {
    let engine = start_engine_double(&["--hang"]);
    assert_never_answers(engine.ready("listen"));

    let dir = temp_dir();
    let socket = dir.path().join("hang.sock");
    let engine = start_engine_double(&["--hang".as_ref(), "--listen".as_ref(), socket.as_os_str()]);
    assert_never_answers(engine.ready("listen"));
}

#[test]
fn health_delay_slows_health_but_it_still_answers() {
    let engine = start_engine_double(&["--health-delay-ms", "300"]);
    let asked = Instant::now();
    let health = http::get(engine.ready("listen"), "/health", TIMEOUT).unwrap();
    assert_eq!(health.status, 200);
    assert!(asked.elapsed() >= Duration::from_millis(300));
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket_file() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let mut engine = start_engine_double(&["--listen".as_ref(), socket.as_os_str()]);
    assert!(socket.exists());

    engine.kill_with(Signal::SIGTERM);
    let status = engine.wait_exit(TIMEOUT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}: {}", engine.stderr());
    assert!(!socket.exists(), "socket file left behind");
    assert!(engine.stderr().contains("SIGTERM"), "{}", engine.stderr());
}

#[test]
fn sigint_also_exits_zero() {
    let mut engine = start_engine_double::<&str>(&[]);
    engine.kill_with(Signal::SIGINT);
    let status = engine.wait_exit(TIMEOUT).expect("no exit after SIGINT");
    assert!(status.success(), "{status}");
}

#[test]
fn injected_crash_exits_with_the_chosen_code_and_leaves_the_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let mut engine = start_engine_double(&[
        "--listen".as_ref(),
        socket.as_os_str(),
        "--exit-after-ms".as_ref(),
        "200".as_ref(),
        "--exit-code".as_ref(),
        "7".as_ref(),
    ]);
    let status = engine.wait_exit(TIMEOUT).expect("the crash did not happen");
    assert_eq!(status.code(), Some(7), "{}", engine.stderr());
    assert!(socket.exists(), "a crash must not clean up its socket");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let engine = start_engine_double(&["--listen".as_ref(), socket.as_os_str()]);
    let health = http::get(engine.ready("listen"), "/health", TIMEOUT).unwrap();
    assert_eq!(health.status, 200);
}

#[test]
fn a_regular_file_at_the_socket_path_is_not_deleted() {
    let dir = temp_dir();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();

    let run = Daemon::run_to_exit(
        binary("test-engine-double"),
        &["--listen".as_ref(), path.as_os_str()],
        TIMEOUT,
    );
    assert!(!run.status.success());
    assert!(run.stderr.contains("is not a socket"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn help_says_it_is_a_test_double() {
    let run = Daemon::run_to_exit(binary("test-engine-double"), &["--help"], TIMEOUT);
    assert!(run.status.success());
    assert!(run.stdout.contains("TEST DOUBLE"), "{}", run.stdout);
    assert!(
        run.stdout.contains("not an inference engine"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_daemon_that_exits_before_ready_fails_fast_with_its_stderr() {
    let started = Instant::now();
    let panic = std::panic::catch_unwind(|| start_engine_double(&["--listen", "nonsense"]))
        .expect_err("start must fail");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("before printing READY"), "{message}");
    assert!(
        message.contains("expected HOST:PORT"),
        "stderr missing: {message}"
    );
    assert!(started.elapsed() < TIMEOUT);
}
