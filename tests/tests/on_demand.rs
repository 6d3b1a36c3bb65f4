//! On-demand pools (`load = "on-demand"`): pool-managerd alone with one managed pool running the
//! engine double. The pool starts Unloaded with no engine, loads on `Load` (a client's or an
//! operator's), and goes back to Unloaded after its idle time without a lease, or on an
//! operator's `unload` once its leases end.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::http;
use e2e::sidecar::wait_for_pool;
use e2e::stack::{Stack, double_pool, prometheus_value};
use pool_ipc::client::RegistryMirror;
use pool_ipc::registry::{AcquireTarget, PoolId, PoolState, ReleaseOutcome};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use tokio::sync::watch;

const IDLE_MS: u64 = 300;

/// pool-managerd with one on-demand pool `m` (model "double", 2 slots, engine-double `flags`)
/// unloaded after `idle_ms` without a lease.
fn on_demand(idle_ms: u64, flags: &[&str]) -> Stack {
    let pool = double_pool("m", "double", 2, flags).replace(
        "[pool.probe]",
        &format!("load = \"on-demand\"\nidle_unload_ms = {idle_ms}\n[pool.probe]"),
    );
    Stack::builder().without_orchestrator().pool(&pool).start()
}

async fn state_is(mirror: &mut watch::Receiver<RegistryMirror>, state: PoolState) {
    wait_for_pool(mirror, "m", state.name(), |pool| pool.state == state).await;
}

fn shim_metric(stack: &Stack, name: &str) -> f64 {
    let reply = http::get(&stack.shim(), "/metrics", Duration::from_secs(10)).unwrap();
    prometheus_value(&reply.text(), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_pool_starts_unloaded_with_no_engine_and_a_load_brings_it_up() {
    let stack = on_demand(60_000, &["--load-ms", "1000"]);
    let client = stack.client("demand").await;
    let mut mirror = client.subscribe().await.unwrap();
    state_is(&mut mirror, PoolState::Unloaded).await;
    assert_eq!(
        stack.recorded_engine_pid("m"),
        None,
        "no engine before a load"
    );
    let refused = client
        .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("ready"), "{refused}");

    // The engine takes a second to load its model: the pool shows Loading meanwhile.
    client.load(&PoolId::from("m")).await.unwrap();
    state_is(&mut mirror, PoolState::Loading).await;
    state_is(&mut mirror, PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").expect("the loaded engine");
    assert!(e2e::process_alive(pid));
    client.load(&PoolId::from("m")).await.unwrap();
    assert_eq!(
        stack.recorded_engine_pid("m"),
        Some(pid),
        "a load of a loaded pool changes nothing"
    );
    let lease = client
        .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
        .await
        .unwrap();
    lease.release(ReleaseOutcome::Completed).await.unwrap();
    assert_eq!(shim_metric(&stack, "pool_managerd_loads_total"), 1.0);
    assert_eq!(
        shim_metric(&stack, "pool_managerd_load_duration_seconds_count"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_is_unloaded_after_its_idle_time_and_a_held_lease_keeps_it_loaded() {
    let stack = on_demand(IDLE_MS, &[]);
    let client = stack.client("demand").await;
    let mut mirror = client.subscribe().await.unwrap();
    client.load(&PoolId::from("m")).await.unwrap();
    state_is(&mut mirror, PoolState::Ready).await;
    let lease = client
        .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
        .await
        .unwrap();
    let pid = stack.recorded_engine_pid("m").unwrap();

    // Ten idle times with the lease held: the pool stays Ready throughout. (A sleep here is the
    // point: nothing may happen while it runs.)
    let held = Duration::from_millis(10 * IDLE_MS);
    let left_ready = tokio::time::timeout(
        held,
        mirror.wait_for(|m| {
            m.snapshot
                .pool(&PoolId::from("m"))
                .is_none_or(|pool| pool.state != PoolState::Ready)
        }),
    )
    .await
    .is_ok();
    assert!(!left_ready, "left Ready with a lease held");
    assert!(e2e::process_alive(pid));

    lease.release(ReleaseOutcome::Completed).await.unwrap();
    state_is(&mut mirror, PoolState::Unloaded).await;
    assert!(
        !e2e::process_alive(pid),
        "the unloaded engine {pid} is gone"
    );
    assert_eq!(stack.recorded_engine_pid("m"), None);
    assert_eq!(
        shim_metric(&stack, "pool_managerd_unloads_total{reason=\"idle\"}"),
        1.0
    );

    // The next demand loads it again.
    client.load(&PoolId::from("m")).await.unwrap();
    state_is(&mut mirror, PoolState::Ready).await;
    assert!(e2e::process_alive(stack.recorded_engine_pid("m").unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_unload_waits_for_the_held_lease_to_end() {
    let stack = on_demand(0, &[]);
    let client = stack.client("demand").await;
    let mut mirror = client.subscribe().await.unwrap();
    stack.operator(&["load", "m"]);
    state_is(&mut mirror, PoolState::Ready).await;
    let pid = stack.recorded_engine_pid("m").unwrap();
    let lease = client
        .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
        .await
        .unwrap();

    stack.operator(&["unload", "m"]);
    state_is(&mut mirror, PoolState::Draining).await;
    assert!(e2e::process_alive(pid), "the engine serves its lease");
    let refused = client
        .acquire(AcquireTarget::Model("double".into()), "t", None, 1)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("ready"), "{refused}");

    lease.release(ReleaseOutcome::Completed).await.unwrap();
    state_is(&mut mirror, PoolState::Unloaded).await;
    assert!(!e2e::process_alive(pid));
    assert_eq!(
        shim_metric(&stack, "pool_managerd_unloads_total{reason=\"operator\"}"),
        1.0
    );
    let status = Command::new(e2e::binary("pool-managerd"))
        .args(["status", "m", "--socket"])
        .arg(e2e::sidecar::socket_path(stack.path()))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("unloaded"), "{table}");
}

/// orchestratord in front of one on-demand pool `m` (engine-double `flags`, more pool settings
/// in `pool_extra`), queue deadline `deadline_ms`.
fn served_on_demand(flags: &[&str], deadline_ms: u64, pool_extra: &str) -> Stack {
    let pool = double_pool("m", "double", 2, flags).replace(
        "[pool.probe]",
        &format!("load = \"on-demand\"\nidle_unload_ms = 60000\n{pool_extra}\n[pool.probe]"),
    );
    Stack::builder()
        .pool(&pool)
        .orchestrator(&format!("[admission]\nqueue_deadline_ms = {deadline_ms}\n"))
        .start()
}

fn chat(stack: &Stack) -> http::Reply {
    let body = serde_json::json!({
        "model": "double",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    });
    http::post_json(
        &stack.api(),
        "/v1/chat/completions",
        &body,
        Duration::from_secs(30),
    )
    .unwrap()
}

#[test]
fn a_request_for_an_unloaded_model_loads_it_and_is_served_even_past_its_queue_deadline() {
    // Loading takes 1.5 s, longer than the 500 ms the request may wait in the queue: the load
    // does not count against it.
    let stack = served_on_demand(&["--load-ms", "1500"], 500, "");
    assert_eq!(stack.pool_status("m")["state"], "unloaded");
    let ready = http::get(&stack.api(), "/readyz", Duration::from_secs(5)).unwrap();
    assert_eq!(
        ready.status,
        200,
        "an idle host is healthy: {}",
        ready.text()
    );
    let models = stack.get("/v1/models");
    assert_eq!(models["data"][0]["loaded"], false, "{models}");
    let answer = chat(&stack);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["usage"]["completion_tokens"], 3);
    assert_eq!(stack.pool_status("m")["state"], "ready");
    assert_eq!(stack.get("/v1/models")["data"][0]["loaded"], true);
}

#[test]
fn a_load_that_fails_answers_its_waiting_request_at_once_with_a_typed_503() {
    // A model file the engine cannot read: it exits at once (status 3), the load fails.
    let stack = served_on_demand(&[], 60_000, "");
    std::fs::write(stack.path().join("double-model.json"), "not json").unwrap();
    let started = std::time::Instant::now();
    let answer = chat(&stack);
    assert_eq!(answer.status, 503, "{}", answer.text());
    let error = answer.json();
    assert_eq!(error["error"]["code"], "model_load_failed", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("double")),
        "{error}"
    );
    assert!(answer.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered after {:?}, not at the 60 s deadline",
        started.elapsed()
    );
}

/// Sends a whole-answer chat request for the double's model on a connection of its own and
/// waits until orchestratord has it queued and the pool's load is under way (its engine
/// spawned); returns the connection and the loading engine's pid.
fn queue_a_request_that_loads_the_pool(stack: &Stack) -> (TcpStream, u32) {
    let mut waiting = TcpStream::connect(stack.api()).unwrap();
    let body = serde_json::json!({
        "model": "double",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    })
    .to_string();
    write!(
        waiting,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stack.wait_for("the pool to load", || {
        stack.pool_status("m")["state"] == "loading" && stack.recorded_engine_pid("m").is_some()
    });
    (waiting, stack.recorded_engine_pid("m").unwrap())
}

#[test]
fn a_load_whose_only_waiting_request_leaves_is_cancelled_and_its_slow_loading_engine_double_is_gone()
 {
    // The engine double takes a minute to load its model (a large model's load): the client
    // gives up long before.
    let stack = served_on_demand(&["--load-ms", "60000"], 120_000, "");
    let (waiting, pid) = queue_a_request_that_loads_the_pool(&stack);
    assert!(e2e::process_alive(pid));
    drop(waiting);
    stack.wait_for("the load to be cancelled", || {
        stack.pool_status("m")["state"] == "unloaded"
    });
    stack.wait_for("the loading engine to be gone", || !e2e::process_alive(pid));
    assert_eq!(stack.recorded_engine_pid("m"), None);
    assert_eq!(
        shim_metric(&stack, "pool_managerd_loads_cancelled_total"),
        1.0
    );
    assert_eq!(
        shim_metric(&stack, "pool_managerd_unloads_total{reason=\"cancelled\"}"),
        1.0
    );
}

#[test]
fn a_load_whose_waiting_request_leaves_is_finished_when_the_pool_says_so() {
    let stack = served_on_demand(
        &["--load-ms", "1500"],
        60_000,
        "abandoned_load = \"finish\"",
    );
    let (waiting, pid) = queue_a_request_that_loads_the_pool(&stack);
    drop(waiting);
    stack.wait_for("the load to finish", || {
        stack.pool_status("m")["state"] == "ready"
    });
    assert_eq!(
        stack.recorded_engine_pid("m"),
        Some(pid),
        "the same engine, loaded"
    );
    assert_eq!(
        shim_metric(&stack, "pool_managerd_loads_cancelled_total"),
        0.0
    );
}

#[test]
fn an_operators_load_through_orchestratord_is_kept_when_a_request_that_wanted_it_leaves() {
    let stack = served_on_demand(&["--load-ms", "1500"], 60_000, "");
    let operator = |pool: &str, action: &str| {
        http::request_with_headers(
            &stack.api(),
            "POST",
            &format!("/v2/pools/{pool}/{action}"),
            &[("content-type", "application/json")],
            None,
            Duration::from_secs(10),
        )
        .unwrap()
    };
    // A request asks for the load and leaves; the operator asked too, so the load goes on.
    let (waiting, pid) = queue_a_request_that_loads_the_pool(&stack);
    let loading = operator("m", "load");
    assert_eq!(loading.status, 202, "{}", loading.text());
    drop(waiting);
    stack.wait_for("the load to finish", || {
        stack.pool_status("m")["state"] == "ready"
    });
    assert_eq!(stack.recorded_engine_pid("m"), Some(pid));
    assert_eq!(
        shim_metric(&stack, "pool_managerd_loads_cancelled_total"),
        0.0
    );

    let unloading = operator("m", "unload");
    assert_eq!(unloading.status, 202, "{}", unloading.text());
    stack.wait_for("the unload", || {
        stack.pool_status("m")["state"] == "unloaded"
    });
    stack.wait_for("the engine to be gone", || !e2e::process_alive(pid));
    let unknown = operator("nope", "load");
    assert_eq!(unknown.status, 404, "{}", unknown.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_for_waiting_requests_is_withdrawn_when_its_connection_closes_but_an_operators_is_not()
 {
    // The engine double takes a minute to load (a large model's load).
    let stack = on_demand(60_000, &["--load-ms", "60000"]);
    let watcher = stack.client("watch").await;
    let mut mirror = watcher.subscribe().await.unwrap();
    let pool = PoolId::from("m");

    let asker = stack.client("orchestrator").await;
    asker.load_for_waiting_requests(&pool).await.unwrap();
    state_is(&mut mirror, PoolState::Loading).await;
    stack.wait_for("the engine to start", || {
        stack.recorded_engine_pid("m").is_some()
    });
    let pid = stack.recorded_engine_pid("m").unwrap();
    asker.close();
    state_is(&mut mirror, PoolState::Unloaded).await;
    stack.wait_for("the loading engine to be gone", || !e2e::process_alive(pid));

    let operator = stack.client("operator").await;
    operator.load(&pool).await.unwrap();
    state_is(&mut mirror, PoolState::Loading).await;
    operator.close();
    // A check that something does not happen: give the controller time to act on the close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        watcher.pool_status(&pool).await.unwrap().state,
        PoolState::Loading,
        "an operator's load is finished whoever is still connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_and_its_withdrawal_sent_back_to_back_reach_the_pool_in_that_order() {
    let stack = on_demand(60_000, &["--load-ms", "60000"]);
    let client = stack.client("orchestrator").await;
    let pool = PoolId::from("m");
    for round in 1..=10 {
        // Both frames leave together: if the withdrawal overtook the load, the load would run
        // on with nobody waiting for it.
        let (loaded, withdrawn) = tokio::join!(
            client.load_for_waiting_requests(&pool),
            client.cancel_load(&pool)
        );
        loaded.unwrap();
        withdrawn.unwrap();
        stack.wait_for(&format!("round {round}'s load cancelled"), || {
            shim_metric(&stack, "pool_managerd_loads_cancelled_total") == f64::from(round)
        });
        stack.wait_for("no engine left", || {
            stack.recorded_engine_pid("m").is_none()
        });
    }
}
