//! pool-managerd supervising engines it starts itself. The engines are `test-engine-double`
//! processes (a fake llama-server: no model or GPU needed to exercise supervision); its
//! behaviour comes from the "model file" pool-managerd passes as `{model}`, a JSON file of
//! fault-injection knobs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{socket_path, state_dir, wait_for_pool};
use e2e::stack::Stack;
use e2e::{Signal, binary, temp_dir};
use pool_ipc::client::{ClientConfig, ClientError, ConnectionState, PoolClient};
use pool_ipc::registry::{AcquireTarget, Endpoint, PoolId, PoolState, ReleaseOutcome};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

struct Options {
    /// Lines before the pool (top-level tables such as `[debug_http]`).
    top_extra: String,
    /// Extra lines for the `[[pool]]` table.
    pool_extra: &'static str,
    /// Extra engine-double flags.
    engine_flags: &'static [&'static str],
    model: serde_json::Value,
    listen: &'static str,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            top_extra: String::new(),
            pool_extra: "",
            engine_flags: &[],
            model: serde_json::json!({}),
            listen: "unix",
        }
    }
}

fn model_file(dir: &Path, name: &str, knobs: &serde_json::Value) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, knobs.to_string()).unwrap();
    path
}

fn config_text(dir: &Path, options: &Options) -> String {
    let model = model_file(dir, "model", &options.model);
    let listen_args = if options.listen == "unix" {
        r#""--listen", "{socket}""#
    } else {
        r#""--listen", "{host}:{port}""#
    };
    let flags: String = options
        .engine_flags
        .iter()
        .map(|flag| format!(", {flag:?}"))
        .collect();
    format!(
        r#"
{top}
[[pool]]
id = "m"
model = "double"
engine = "llamacpp"
command = [{engine:?}, {listen_args}, "--slots", "3", "--model", "{{model}}"{flags}]
model_path = {model:?}
listen = {listen:?}
startup_timeout_ms = 3000
stop_grace_ms = 500
{extra}
[pool.probe]
interval_ms = 50
timeout_ms = 300
failure_threshold = 2
liveness_failure_threshold = 3
[pool.restart]
initial_ms = 200
max_ms = 2000
multiplier = 2.0
jitter = 0.0
max_restarts = 3
window_ms = 60000
"#,
        engine = binary("test-engine-double").display().to_string(),
        model = model.display().to_string(),
        listen = options.listen,
        extra = options.pool_extra,
        top = options.top_extra,
    )
}

/// One managed pool `m`: the engine double on a Unix socket with 3 slots, pool-managerd alone.
fn managed(options: Options) -> Stack {
    let dir = temp_dir();
    let config = config_text(dir.path(), &options);
    Stack::builder()
        .without_orchestrator()
        .pool(&config)
        .start_in(dir)
}

fn assert_not_zombie(pid: u32) {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        assert_ne!(state, Some("Z"), "engine {pid} was left a zombie");
    }
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_engine_starts_and_reports_the_slots_and_version_it_announces() {
    for listen in ["unix", "tcp"] {
        let stack = managed(Options {
            listen,
            ..Options::default()
        });
        let client = stack.client("test").await;
        let mut mirror = client.subscribe().await.unwrap();
        let ready = wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
        assert_eq!(ready.slots_total, 3, "slots come from the engine's /props");
        assert!(
            ready
                .engine_version
                .as_deref()
                .is_some_and(|v| v.starts_with("test-engine-double")),
            "{ready:?}"
        );
        match (&ready.endpoint, listen) {
            (Endpoint::Unix { path }, "unix") => {
                assert!(path.ends_with("engines/m.sock"), "{path}")
            }
            (Endpoint::Http { authority }, "tcp") => assert!(authority.starts_with("127.0.0.1:")),
            (endpoint, _) => panic!("{listen}: unexpected endpoint {endpoint:?}"),
        }
        let lease = client
            .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
            .await
            .unwrap();
        assert_eq!(lease.lease().endpoint, ready.endpoint);
        lease.release(ReleaseOutcome::Completed).await.unwrap();
        assert!(e2e::process_alive(stack.recorded_engine_pid("m").unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_crashing_in_a_loop_backs_off_with_growing_delays_then_fails_until_restarted() {
    let stack = managed(Options {
        model: serde_json::json!({"exit_after_ms": 150, "exit_code": 3}),
        ..Options::default()
    });
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    let mut delays = Vec::new();
    let mut seen_until = 0;
    loop {
        let pool = wait_for_pool(&mut mirror, "m", "backing off or failed", |p| {
            matches!(p.state, PoolState::BackingOff { until_unix_ms } if until_unix_ms != seen_until)
                || p.state == PoolState::Failed
        })
        .await;
        match pool.state {
            PoolState::BackingOff { until_unix_ms } => {
                seen_until = until_unix_ms;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                delays.push(until_unix_ms.saturating_sub(now));
                assert!(
                    pool.last_error
                        .as_deref()
                        .unwrap()
                        .contains("exited with status 3")
                );
            }
            PoolState::Failed => {
                let error = pool.last_error.unwrap();
                assert!(
                    error.contains("giving up until an operator restarts"),
                    "{error}"
                );
                break;
            }
            _ => unreachable!(),
        }
    }
    // Policy: 200 ms doubling, no jitter, at most 3 restarts in the window.
    assert_eq!(delays.len(), 3, "{delays:?}");
    // Each delay is seen a little after it was set, so it reads up to that latency short.
    for (index, expected) in [200u64, 400, 800].into_iter().enumerate() {
        assert!(
            delays[index] <= expected && delays[index] + 100 >= expected / 2,
            "delay {index} was {} ms, policy says {expected}: {delays:?}",
            delays[index]
        );
    }
    assert!(delays[2] > delays[0], "{delays:?}");

    // The operator fixes the model and restarts the pool.
    model_file(stack.path(), "model", &serde_json::json!({}));
    let admin = PoolClient::connect(ClientConfig::new(socket_path(stack.path()), "operator"))
        .await
        .unwrap();
    admin.restart(&PoolId::from("m")).await.unwrap();
    let ready = wait_for_pool(&mut mirror, "m", "ready after restart", |p| {
        p.state == PoolState::Ready
    })
    .await;
    assert_eq!(ready.restarts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_with_sigkill_is_restarted_and_its_leases_are_revoked_with_an_event() {
    let stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut revocations = client.revocations();
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let guard = client
        .acquire(AcquireTarget::Pool(PoolId::from("m")), "victim", None, 1)
        .await
        .unwrap();
    let first = stack.recorded_engine_pid("m").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let revoked = tokio::time::timeout(WAIT, revocations.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.lease, guard.lease().id);
    assert!(
        revoked.reason.contains("killed by signal SIGKILL"),
        "{}",
        revoked.reason
    );
    let ready = wait_for_pool(&mut mirror, "m", "ready again", |p| {
        p.state == PoolState::Ready && p.restarts == 1
    })
    .await;
    assert_eq!(
        ready.slots_free, 3,
        "the dead engine's lease is not carried over"
    );
    let second = stack.recorded_engine_pid("m").unwrap();
    assert_ne!(first, second);
    assert_not_zombie(first);
    // Releasing the revoked lease is harmless; the slot is not released twice.
    guard.release(ReleaseOutcome::Failed).await.unwrap();
    assert_eq!(
        client
            .pool_status(&PoolId::from("m"))
            .await
            .unwrap()
            .slots_free,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_is_marked_unhealthy_and_restarted() {
    let stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let hung = stack.recorded_engine_pid("m").unwrap();
    // A stopped process still has its listening socket: connections are accepted by the kernel
    // and never answered, exactly like an engine stuck in a loop.
    let stopped_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(hung as i32), Signal::SIGSTOP).unwrap();
    wait_for_pool(&mut mirror, "m", "unhealthy", |p| {
        p.state == PoolState::Unhealthy
    })
    .await;
    // failure_threshold 2 × (interval 50 ms + timeout 300 ms), plus scheduling slack.
    assert!(
        stopped_at.elapsed() < Duration::from_millis(3000),
        "{:?}",
        stopped_at.elapsed()
    );
    let ready = wait_for_pool(&mut mirror, "m", "restarted and ready", |p| {
        p.state == PoolState::Ready && p.restarts == 1
    })
    .await;
    assert!(ready.last_error.is_none());
    wait_until("the hung engine is gone", || !e2e::process_alive(hung)).await;
    assert_ne!(stack.recorded_engine_pid("m"), Some(hung));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_answering_engine_is_not_restarted() {
    let stack = managed(Options {
        engine_flags: &["--health-delay-ms", "200"],
        ..Options::default()
    });
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = client.pool_status(&PoolId::from("m")).await.unwrap();
    assert_eq!(status.state, PoolState::Ready, "{status:?}");
    assert_eq!(status.restarts, 0);
    assert_eq!(stack.recorded_engine_pid("m"), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_last_lease_then_stops_the_engine() {
    let stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    let guard = client
        .acquire(AcquireTarget::Pool(PoolId::from("m")), "last", None, 1)
        .await
        .unwrap();
    client
        .drain(&PoolId::from("m"), Duration::from_secs(30))
        .await
        .unwrap();
    wait_for_pool(&mut mirror, "m", "draining", |p| {
        p.state == PoolState::Draining
    })
    .await;
    let refused = client
        .acquire(AcquireTarget::Pool(PoolId::from("m")), "late", None, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Remote(e) if e.code == pool_ipc::ErrorCode::Draining),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        e2e::process_alive(pid),
        "the engine must run while a lease is live"
    );
    guard.release(ReleaseOutcome::Completed).await.unwrap();
    wait_for_pool(&mut mirror, "m", "stopped", |p| {
        p.state == PoolState::Stopped
    })
    .await;
    wait_until("the engine has exited", || !e2e::process_alive(pid)).await;

    // A drained pool comes back on restart.
    client.restart(&PoolId::from("m")).await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready again", |p| {
        p.state == PoolState::Ready
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_stops_the_engine_anyway() {
    let stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut revocations = client.revocations();
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    let guard = client
        .acquire(AcquireTarget::Pool(PoolId::from("m")), "stubborn", None, 1)
        .await
        .unwrap();
    let started = Instant::now();
    client
        .drain(&PoolId::from("m"), Duration::from_millis(400))
        .await
        .unwrap();
    let stopped = wait_for_pool(&mut mirror, "m", "stopped", |p| {
        p.state == PoolState::Stopped
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(stopped.last_error.unwrap().contains("deadline passed"));
    let revoked = tokio::time::timeout(WAIT, revocations.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.lease, guard.lease().id);
    wait_until("the engine has exited", || !e2e::process_alive(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_never_becomes_ready_rolls_back_and_the_pool_serves_throughout() {
    let stack = managed(Options {
        pool_extra: "[pool.reload]\nstrategy = \"overlap\"\ndrain_deadline_ms = 2000\n",
        ..Options::default()
    });
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    let before = wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    let broken = model_file(
        stack.path(),
        "broken",
        &serde_json::json!({"never_ready": true}),
    );
    client
        .reload(&PoolId::from("m"), broken.to_str().unwrap())
        .await
        .unwrap();

    // Serve all through the reload attempt (startup timeout 3 s).
    let watcher = {
        let mut mirror = mirror.clone();
        tokio::spawn(async move {
            loop {
                if mirror.changed().await.is_err() {
                    return;
                }
                let state = mirror
                    .borrow_and_update()
                    .snapshot
                    .pool(&PoolId::from("m"))
                    .map(|p| p.state);
                assert_eq!(
                    state,
                    Some(PoolState::Ready),
                    "the pool left Ready during a reload"
                );
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < deadline {
        let guard = client
            .acquire(
                AcquireTarget::Pool(PoolId::from("m")),
                format!("during-{served}"),
                None,
                1,
            )
            .await
            .unwrap();
        assert_eq!(guard.lease().endpoint, before.endpoint);
        guard.release(ReleaseOutcome::Completed).await.unwrap();
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rolled_back = wait_for_pool(&mut mirror, "m", "the failed reload reported", |p| {
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("failed"))
    })
    .await;
    watcher.abort();
    assert!(served > 20);
    assert_eq!(rolled_back.state, PoolState::Ready);
    assert_eq!(rolled_back.endpoint, before.endpoint);
    assert_eq!(
        stack.recorded_engine_pid("m"),
        Some(pid),
        "the old engine served on"
    );

    // A good reload swaps to a new engine and retires the old one.
    let good = model_file(stack.path(), "good", &serde_json::json!({}));
    client
        .reload(&PoolId::from("m"), good.to_str().unwrap())
        .await
        .unwrap();
    let swapped = wait_for_pool(&mut mirror, "m", "swapped", |p| {
        p.endpoint != before.endpoint
    })
    .await;
    assert_eq!(swapped.state, PoolState::Ready);
    assert_ne!(stack.recorded_engine_pid("m"), Some(pid));
    wait_until("the old engine is retired", || !e2e::process_alive(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_adopts_live_engines_and_reasserted_leases_keep_their_slots() {
    let mut stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut state = client.connection_state();
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    let held = client
        .acquire(AcquireTarget::Pool(PoolId::from("m")), "survivor", None, 1)
        .await
        .unwrap();

    stack.sidecar.kill_with(Signal::SIGKILL);
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| !matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        e2e::process_alive(pid),
        "the engine outlives a killed sidecar"
    );
    stack.restart_sidecar();
    assert!(
        stack
            .sidecar
            .wait_for_stderr("adopted a running engine", WAIT)
    );
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        stack.recorded_engine_pid("m"),
        Some(pid),
        "adopted, not restarted"
    );
    let status = client.pool_status(&PoolId::from("m")).await.unwrap();
    assert_eq!(status.state, PoolState::Ready);
    assert_eq!(
        (status.slots_total, status.slots_free),
        (3, 2),
        "{status:?}"
    );
    assert_eq!(status.restarts, 0);
    held.release(ReleaseOutcome::Completed).await.unwrap();
    assert_eq!(
        client
            .pool_status(&PoolId::from("m"))
            .await
            .unwrap()
            .slots_free,
        3
    );

    // An engine whose configuration changed while the sidecar was down is replaced.
    stack.sidecar.kill_with(Signal::SIGKILL);
    let config = stack.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("stop_grace_ms = 500", "stop_grace_ms = 400"),
    )
    .unwrap();
    stack.restart_sidecar();
    wait_until("the mismatched engine is stopped", || {
        !e2e::process_alive(pid)
    })
    .await;
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    wait_until("a new engine is recorded", || {
        stack
            .recorded_engine_pid("m")
            .is_some_and(|new| new != pid && e2e::process_alive(new))
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while client.pool_status(&PoolId::from("m")).await.unwrap().state != PoolState::Ready {
        assert!(
            Instant::now() < deadline,
            "the new engine never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_no_engine_running_and_no_record() {
    let mut stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    client.close();
    stack.sidecar.kill_with(Signal::SIGTERM);
    let status = stack
        .sidecar
        .wait_exit(WAIT)
        .expect("pool-managerd did not stop");
    assert_eq!(status.code(), Some(0), "{}", stack.sidecar.stderr());
    assert!(!e2e::process_alive(pid), "the engine survived a clean stop");
    assert_eq!(
        stack.recorded_engine_pid("m"),
        None,
        "the engine record was left behind"
    );
}

/// One raw HTTP/1.1 request to the debug shim, with an optional bearer token.
fn shim_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn cli(stack: &Stack, args: &[&str]) -> e2e::RunOutput {
    e2e::DaemonBuilder::new(binary("pool-managerd"))
        .args(args)
        .arg("--socket")
        .arg(socket_path(stack.path()))
        .run_to_exit(WAIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_a_pool_from_the_cli_and_the_token_guarded_shim() {
    let token = "a-long-enough-shim-token";
    let token_dir = temp_dir();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let stack = managed(Options {
        top_extra: format!(
            "[debug_http]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ),
        ..Options::default()
    });
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;

    let drained = cli(&stack, &["drain", "m", "--deadline-secs", "5"]);
    assert_eq!(drained.status.code(), Some(0), "{}", drained.stderr);
    wait_for_pool(&mut mirror, "m", "stopped", |p| {
        p.state == PoolState::Stopped
    })
    .await;
    let status = cli(&stack, &["status"]);
    assert!(status.stdout.contains("stopped"), "{}", status.stdout);
    assert!(status.stdout.contains("GPUs:"), "{}", status.stdout);
    let json = cli(&stack, &["status", "--json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(parsed["gpus"]["gpus"].is_array(), "{parsed}");
    let unknown = cli(&stack, &["restart", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        unknown.stderr.contains("unknown pool"),
        "{}",
        unknown.stderr
    );

    let shim = stack.sidecar.ready("debug_http").to_owned();
    assert_eq!(
        shim_request(&shim, "POST", "/pools/m/restart", None, "").0,
        401
    );
    assert_eq!(
        shim_request(&shim, "GET", "/pools/m/status", None, "").0,
        401
    );
    let (status, body) = shim_request(&shim, "POST", "/pools/m/restart", Some(token), "");
    assert_eq!(status, 202, "{body}");
    wait_for_pool(&mut mirror, "m", "ready after the shim's restart", |p| {
        p.state == PoolState::Ready
    })
    .await;
    let (status, body) = shim_request(&shim, "POST", "/pools/m/reload", Some(token), "{not json");
    assert_eq!(status, 400, "{body}");
    let (status, _) = shim_request(&shim, "POST", "/pools/nope/drain", Some(token), "");
    assert_eq!(status, 404);
    let (status, body) = shim_request(&shim, "GET", "/gpus", Some(token), "");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_started_for_a_reload_does_not_outlive_a_sidecar_crash() {
    let mut stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    let main = stack.recorded_engine_pid("m").unwrap();
    let slow = model_file(stack.path(), "slow", &serde_json::json!({"load_ms": 60000}));
    client
        .reload(&PoolId::from("m"), slow.to_str().unwrap())
        .await
        .unwrap();
    let engines = state_dir(stack.path()).join("engines");
    let side_pid = || -> Option<u32> {
        let entry = std::fs::read_dir(&engines)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(".side.json"))?;
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
        record["pid"].as_u64().map(|pid| pid as u32)
    };
    wait_until("the reload's engine is recorded", || side_pid().is_some()).await;
    let candidate = side_pid().unwrap();
    assert!(e2e::process_alive(candidate));

    stack.sidecar.kill_with(Signal::SIGKILL);
    stack.restart_sidecar();
    wait_until("the interrupted reload's engine is stopped", || {
        !e2e::process_alive(candidate)
    })
    .await;
    assert!(side_pid().is_none(), "its record is gone too");
    assert_eq!(
        stack.recorded_engine_pid("m"),
        Some(main),
        "the main engine was adopted"
    );
    assert!(e2e::process_alive(main));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_loads_only_files_inside_the_model_directories_by_their_resolved_path() {
    let stack = managed(Options::default());
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    let before = wait_for_pool(&mut mirror, "m", "ready", |p| p.state == PoolState::Ready).await;
    // The pool's model file lies in the test's directory, which is therefore the model directory
    // (server.model_dirs' default). A file elsewhere, directly or through a link, is refused.
    let elsewhere = temp_dir();
    let outside = model_file(elsewhere.path(), "outside", &serde_json::json!({}));
    let link = stack.path().join("looks-inside.json");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for path in [
        outside.to_str().unwrap(),
        link.to_str().unwrap(),
        "/etc/passwd",
        "relative/../../nothing",
    ] {
        let refused = client.reload(&PoolId::from("m"), path).await.unwrap_err();
        let ClientError::Remote(error) = refused else {
            panic!("{path}: {refused:?}");
        };
        assert_eq!(
            error.code,
            pool_ipc::ErrorCode::BadRequest,
            "{path}: {error}"
        );
    }
    assert_eq!(
        client
            .snapshot()
            .await
            .unwrap()
            .pool(&PoolId::from("m"))
            .unwrap()
            .endpoint,
        before.endpoint,
        "nothing was reloaded"
    );
    // A file inside is loaded.
    let inside = model_file(stack.path(), "inside", &serde_json::json!({}));
    client
        .reload(&PoolId::from("m"), inside.to_str().unwrap())
        .await
        .unwrap();
    wait_for_pool(&mut mirror, "m", "swapped", |p| {
        p.endpoint != before.endpoint
    })
    .await;
}
