//! Reloading pool-managerd's configuration in place (SIGHUP): pools added, removed and changed
//! without restarting the daemon or disturbing the pools that did not change. Engines are test
//! engine doubles (fake llama-servers).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::sidecar::{
    PoolSpec, Sidecar, recorded_engine, sidecar_command, socket_path, wait_for_pool,
};
use e2e::stack::Stack;
use e2e::{Signal, binary, http, temp_dir};
use pool_ipc::client::{ClientConfig, PoolClient};
use pool_ipc::registry::{
    AcquireTarget, ApiEndpoint, EngineKind, PoolId, PoolState, ReleaseOutcome,
};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

fn pool_toml(dir: &Path, id: &str, slots: u32, token_delay_ms: u32) -> String {
    let model = dir.join(format!("{id}.json"));
    std::fs::write(&model, "{}").unwrap();
    format!(
        r#"
[[pool]]
id = "{id}"
model = "{id}-model"
engine = "llamacpp"
command = [{engine:?}, "--listen", "{{socket}}", "--slots", "{slots}", "--token-delay-ms", "{token_delay_ms}", "--model", "{{model}}"]
model_path = {model:?}
listen = "unix"
stop_grace_ms = 500
[pool.probe]
interval_ms = 50
[pool.reload]
drain_deadline_ms = 2000
"#,
        engine = binary("test-engine-double").display().to_string(),
        model = model.display().to_string(),
    )
}

fn engine_pid(dir: &Path, pool: &str) -> Option<i32> {
    recorded_engine(dir, pool).map(|(pid, _)| pid)
}

fn notifications(socket: &UnixDatagram) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(len) = socket.recv(&mut buffer) {
        seen.push(String::from_utf8_lossy(&buffer[..len]).into_owned());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_removes_and_changes_pools_without_disturbing_the_others() {
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let initial = [
        pool_toml(dir.path(), "keep", 2, 20),
        pool_toml(dir.path(), "gone", 2, 0),
        pool_toml(dir.path(), "changed", 3, 0),
    ]
    .concat();
    std::fs::write(&config, &initial).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut sidecar = Sidecar::from_daemon(
        sidecar_command(dir.path(), &config)
            .env("NOTIFY_SOCKET", &notify_path)
            .start(),
        dir.path(),
    );
    let daemon_pid = sidecar.pid();
    let client = PoolClient::connect(ClientConfig::new(socket_path(dir.path()), "test"))
        .await
        .unwrap();
    let mut mirror = client.subscribe().await.unwrap();
    for id in ["keep", "gone", "changed"] {
        wait_for_pool(&mut mirror, id, "ready", |p| p.state == PoolState::Ready).await;
    }
    let keep = PoolId("keep".into());
    let keep_pid = engine_pid(dir.path(), "keep").unwrap();
    let changed_pid = engine_pid(dir.path(), "changed").unwrap();

    // A generation runs on `keep` under its lease while the configuration changes.
    let lease = client
        .acquire(AcquireTarget::Pool(keep.clone()), "long", None, 1)
        .await
        .unwrap();
    let pool_ipc::registry::Endpoint::Unix { path } = lease.lease().endpoint.clone() else {
        panic!("unix endpoint expected");
    };
    let stream = std::thread::spawn(move || {
        let mut engine = UnixStream::connect(&path).unwrap();
        let body = r#"{"prompt":"x","n_predict":60,"stream":true}"#;
        write!(
            engine,
            "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let reader = BufReader::new(engine);
        reader
            .lines()
            .map_while(Result::ok)
            .filter(|line| line.starts_with("data: "))
            .count()
    });
    let _ = notifications(&notify);

    let reloaded = [
        pool_toml(dir.path(), "keep", 2, 20),
        pool_toml(dir.path(), "changed", 2, 0),
        pool_toml(dir.path(), "new", 1, 0),
    ]
    .concat();
    std::fs::write(&config, reloaded).unwrap();
    sidecar.kill_with(Signal::SIGHUP);

    wait_for_pool(&mut mirror, "new", "the new pool ready", |p| {
        p.state == PoolState::Ready
    })
    .await;
    wait_for_pool(
        &mut mirror,
        "changed",
        "the changed pool ready with 2 slots",
        |p| p.state == PoolState::Ready && p.slots_total == 2,
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while mirror
        .borrow()
        .snapshot
        .pool(&PoolId("gone".into()))
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the removed pool is still listed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(
        engine_pid(dir.path(), "changed"),
        Some(changed_pid),
        "a changed pool gets a new engine"
    );
    assert_eq!(
        engine_pid(dir.path(), "keep"),
        Some(keep_pid),
        "an unchanged pool keeps its engine"
    );
    assert_eq!(engine_pid(dir.path(), "gone"), None);
    let keep_status = client.pool_status(&keep).await.unwrap();
    assert_eq!(
        (keep_status.state, keep_status.active_leases()),
        (PoolState::Ready, 1)
    );
    assert_eq!(
        stream.join().unwrap(),
        61,
        "the unchanged pool's stream ran to its end (60 tokens + final)"
    );
    lease.release(ReleaseOutcome::Completed).await.unwrap();
    assert_eq!(sidecar.pid(), daemon_pid);
    assert!(sidecar.try_wait().is_none(), "the daemon kept running");
    let seen = notifications(&notify);
    let reloading = seen
        .iter()
        .position(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
    let ready = seen.iter().rposition(|m| m.contains("READY=1"));
    assert!(
        matches!((reloading, ready), (Some(r), Some(d)) if r < d),
        "{seen:?}"
    );

    // A broken configuration changes nothing.
    std::fs::write(&config, "[[pool]\n").unwrap();
    sidecar.kill_with(Signal::SIGHUP);
    assert!(sidecar.wait_for_stderr("reload refused", WAIT));
    assert_eq!(client.snapshot().await.unwrap().pools.len(), 3);
    let shim = http::get(sidecar.ready("debug_http"), "/pools", WAIT).unwrap();
    assert_eq!(shim.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pool_is_replaced_without_ever_looking_stopped_or_absent_and_serves_what_waited()
{
    let dir = temp_dir();
    let first = pool_toml(dir.path(), "changed", 1, 20);
    let stack = Stack::builder().pool(&first).start_in(dir);
    let addr = stack.api();
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    let pool = PoolId("changed".into());
    wait_for_pool(&mut mirror, pool.as_str(), "ready", |p| {
        p.state == PoolState::Ready
    })
    .await;

    // Every state the pool shows from here on, as registry subscribers (orchestratord) see it.
    let mut watcher = mirror.clone();
    let watched = pool.clone();
    let seen = tokio::spawn(async move {
        let mut seen: Vec<Option<PoolState>> = Vec::new();
        loop {
            let state = watcher
                .borrow_and_update()
                .snapshot
                .pool(&watched)
                .map(|p| p.state);
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            if seen.len() > 2 && state == Some(PoolState::Ready) {
                return seen;
            }
            if watcher.changed().await.is_err() {
                return seen;
            }
        }
    });

    // One stream holds the only slot; one request waits in orchestratord's queue behind it.
    let running = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let body = serde_json::json!({"model": "changed-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": true});
            http::post_json(&addr, "/v1/chat/completions", &body, WAIT).unwrap()
        }
    });
    let deadline = Instant::now() + WAIT;
    while client.pool_status(&pool).await.unwrap().active_leases() != 1 {
        assert!(Instant::now() < deadline, "the stream never took the slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let body = serde_json::json!({"model": "changed-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
            http::post_json(&addr, "/v1/chat/completions", &body, WAIT).unwrap()
        }
    });
    let queued = "orchestratord_queue_depth{class=\"interactive\"} 1";
    let deadline = Instant::now() + WAIT;
    while !http::get(&addr, "/metrics", WAIT)
        .unwrap()
        .text()
        .contains(queued)
    {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    std::fs::write(&stack.config, pool_toml(stack.path(), "changed", 2, 20)).unwrap();
    stack.sidecar.kill_with(Signal::SIGHUP);

    let streamed = running.join().unwrap();
    assert_eq!(streamed.status, 200);
    assert!(
        streamed.text().contains("data: [DONE]"),
        "the running stream was cut: {}",
        streamed.text()
    );
    let answer = waiting.join().unwrap();
    assert_eq!(
        answer.status,
        200,
        "the waiting request was turned away: {}",
        answer.text()
    );
    assert_eq!(answer.json()["usage"]["completion_tokens"], 3);
    let seen = tokio::time::timeout(WAIT, seen).await.unwrap().unwrap();
    assert_eq!(
        seen,
        [
            Some(PoolState::Ready),
            Some(PoolState::Draining),
            Some(PoolState::Starting),
            Some(PoolState::Ready)
        ],
        "the pool's states through the replacement"
    );
    assert_eq!(client.pool_status(&pool).await.unwrap().slots_total, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_only_a_pools_endpoints_publishes_the_new_list() {
    let dir = temp_dir();
    let engine =
        e2e::start_engine_double(&["--listen", dir.path().join("e.sock").to_str().unwrap()]);
    let spec = PoolSpec::new("p", engine.ready("listen"), 2);
    let stack = Stack::builder()
        .without_orchestrator()
        .engine(engine)
        .pool(&spec.toml())
        .start_in(dir);
    let client = stack.client("test").await;
    let mut mirror = client.subscribe().await.unwrap();
    let pool = PoolId("p".into());
    let before = wait_for_pool(&mut mirror, pool.as_str(), "ready", |p| {
        p.state == PoolState::Ready
    })
    .await;
    assert_eq!(
        before.api_endpoints,
        ApiEndpoint::defaults(EngineKind::Llamacpp)
    );

    let changed = PoolSpec {
        endpoints: Some(vec!["rerank", "embeddings"]),
        ..spec
    };
    std::fs::write(&stack.config, changed.toml()).unwrap();
    stack.sidecar.kill_with(Signal::SIGHUP);
    let after = wait_for_pool(
        &mut mirror,
        pool.as_str(),
        "the new endpoints, ready",
        |p| p.state == PoolState::Ready && p.api_endpoints != before.api_endpoints,
    )
    .await;
    assert_eq!(
        after.api_endpoints,
        vec![ApiEndpoint::Embeddings, ApiEndpoint::Rerank]
    );
    assert_eq!(
        client.pool_status(&pool).await.unwrap().api_endpoints,
        after.api_endpoints
    );
}
