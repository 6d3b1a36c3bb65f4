//! More models than memory: three on-demand pools whose footprints (estimated from their GGUF
//! headers, then measured: the engine's anonymous memory plus the model file) fit two at a time in
//! the host budget. The engines are the engine double (a fake engine: it maps no model, so the
//! model files the generator writes count through the file size the footprint includes).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::make_model;
use e2e::sidecar::wait_for_pool;
use e2e::stack::{Stack, StackBuilder};
use e2e::{binary, temp_dir};
use pool_ipc::client::{ClientError, RegistryMirror};
use pool_ipc::error_code::ErrorCode;
use pool_ipc::registry::{AcquireTarget, PoolId, PoolState, ReleaseOutcome};
use std::path::{Path, PathBuf};
use tokio::sync::watch;

const MIB: u64 = 1024 * 1024;

/// An on-demand pool `id` whose model file is `model` (the engine double ignores it) and whose
/// command gives the engine `extra` arguments.
fn pool(id: &str, model: &Path, extra: &str) -> String {
    format!(
        r#"
[[pool]]
id = "{id}"
model = "m-{id}"
engine = "llamacpp"
command = [{engine:?}, "--listen", "{{socket}}", "--slots", "1"{extra}]
model_path = {model:?}
listen = "unix"
load = "on-demand"
idle_unload_ms = 600000
startup_timeout_ms = 5000
stop_grace_ms = 500
[pool.probe]
interval_ms = 100
"#,
        engine = binary("test-engine-double").display().to_string(),
        model = model.display().to_string(),
    )
}

/// pool-managerd alone (no orchestratord) with on-demand pools a, b and c whose engines take
/// `extra` arguments, on ~50 MB models each (F32, 8 layers of width 384) written into `dir`,
/// under a host budget of 130 MiB: two fit, three do not. Returns the builder (for more pools)
/// and the model files.
fn three_pools(dir: &tempfile::TempDir, extra: &str) -> (StackBuilder, Vec<PathBuf>) {
    let models: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            make_model(
                &dir.path().join(format!("{id}.gguf")),
                &["--width", "384", "--layers", "8", "--seed", "7"],
            )
        })
        .collect();
    let mut builder = Stack::builder().without_orchestrator().pool(&format!(
        "[memory]\nhost_budget_bytes = {}\nmin_residency_ms = 0\n",
        130 * MIB
    ));
    for (id, model) in ["a", "b", "c"].iter().zip(&models) {
        builder = builder.pool(&pool(id, model, extra));
    }
    (builder, models)
}

async fn state_is(mirror: &mut watch::Receiver<RegistryMirror>, pool: &str, state: PoolState) {
    wait_for_pool(mirror, pool, state.name(), |status| status.state == state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_evicts_the_least_recently_used_idle_pool_waits_for_a_busy_one_and_refuses_what_never_fits()
 {
    let dir = temp_dir();
    let (builder, models) = three_pools(&dir, "");
    // The same model with a context whose KV cache alone is larger than the budget (never
    // started: the engine double takes no -c).
    let huge = pool("huge", &models[0], r#", "-c", "4000000""#);
    let stack = builder.pool(&huge).start_in(dir);
    let client = stack.client("demand").await;
    let mut mirror = client.subscribe().await.unwrap();
    let id = |name: &str| PoolId::from(name);

    client.load(&id("a")).await.unwrap();
    state_is(&mut mirror, "a", PoolState::Ready).await;
    client.load(&id("b")).await.unwrap();
    state_is(&mut mirror, "b", PoolState::Ready).await;
    let a_pid = stack.recorded_engine_pid("a").unwrap();

    // c does not fit beside both: a, the least recently used idle pool, is unloaded first.
    client.load(&id("c")).await.unwrap();
    state_is(&mut mirror, "c", PoolState::Ready).await;
    state_is(&mut mirror, "a", PoolState::Unloaded).await;
    assert_eq!(
        client.pool_status(&id("b")).await.unwrap().state,
        PoolState::Ready
    );
    stack.wait_for("a's engine to be gone", || !e2e::process_alive(a_pid));

    // b and c both busy: a's load waits, and neither is touched while its lease runs.
    let on_b = client
        .acquire(AcquireTarget::Pool(id("b")), "b", None, 1)
        .await
        .unwrap();
    let on_c = client
        .acquire(AcquireTarget::Pool(id("c")), "c", None, 1)
        .await
        .unwrap();
    client.load(&id("a")).await.unwrap();
    let b_state = wait_for_pool(&mut mirror, "b", "b drained for a", |status| {
        status.state == PoolState::Draining
    })
    .await;
    assert_eq!(b_state.active_leases(), 1, "b's stream keeps running");
    assert_eq!(
        client.pool_status(&id("a")).await.unwrap().state,
        PoolState::Unloaded,
        "a waits for room"
    );
    on_b.release(ReleaseOutcome::Completed).await.unwrap();
    state_is(&mut mirror, "b", PoolState::Unloaded).await;
    state_is(&mut mirror, "a", PoolState::Ready).await;
    assert_eq!(
        client.pool_status(&id("c")).await.unwrap().state,
        PoolState::Ready
    );
    on_c.release(ReleaseOutcome::Completed).await.unwrap();

    // A pool larger than the whole budget is refused, naming its footprint and the budget.
    let refused = client.load(&id("huge")).await.unwrap_err();
    match &refused {
        ClientError::Remote(error) => {
            assert_eq!(error.code, ErrorCode::NoCapacity);
            assert!(
                error.message.contains("budget of 136314880 bytes"),
                "{}",
                error.message
            );
        }
        other => panic!("{other}"),
    }

    // Operators see the budget, what is held and the evictions.
    let metrics = e2e::http::get(
        &stack.shim(),
        "/metrics",
        std::time::Duration::from_secs(10),
    )
    .unwrap()
    .text();
    assert!(
        metrics.contains("pool_managerd_evictions_total 2"),
        "a evicted, b drained: {metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "pool_managerd_memory_budget_bytes{{device=\"host\"}} {}",
            130 * MIB
        )),
        "{metrics}"
    );
    assert!(metrics.contains("pool_managerd_pool_footprint_bytes{pool=\"a\"}"));

    // The status table shows each pool's footprint and the device's budget and holders.
    let memory = client.memory().await.unwrap();
    let footprint = |pool: &str| {
        memory
            .pools
            .iter()
            .find(|each| each.pool.as_str() == pool)
            .unwrap()
            .clone()
    };
    for pool in ["a", "b", "c"] {
        assert!(footprint(pool).measured, "{memory:?}");
        assert_eq!(footprint(pool).device, "host");
    }
    assert!(!footprint("huge").measured, "never loaded: estimated");
    assert!(footprint("huge").footprint_bytes.unwrap() > 130 * MIB);
    assert_eq!(memory.devices.len(), 1, "{memory:?}");
    assert_eq!(memory.devices[0].budget_bytes, 130 * MIB);
    assert_eq!(
        memory.devices[0].held_bytes,
        footprint("a").footprint_bytes.unwrap() + footprint("c").footprint_bytes.unwrap(),
        "a and c are loaded"
    );
    let status = std::process::Command::new(binary("pool-managerd"))
        .args(["status", "--socket"])
        .arg(e2e::sidecar::socket_path(stack.path()))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    let header = table.lines().find(|line| line.starts_with("POOL")).unwrap();
    let row_a = table.lines().find(|line| line.starts_with("a ")).unwrap();
    assert_eq!(
        header.find("FOOTPRINT"),
        row_a.find(" MiB on host").map(|at| at - 4),
        "{table}"
    );
    assert!(
        table.contains("Memory budgets:\n  host ")
            && table.contains("of 130.0 MiB held  pools: a, b, c, huge"),
        "{table}"
    );

    // Footprints measured after each load are kept in the state directory.
    let kept = std::fs::read_to_string(stack.path().join("state/footprints.json")).unwrap();
    for pool in ["\"a\"", "\"b\"", "\"c\""] {
        assert!(kept.contains(pool), "{kept}");
    }
}

#[test]
fn a_request_for_a_model_that_can_never_fit_is_refused_with_its_footprint_and_the_budget() {
    let dir = temp_dir();
    let model = make_model(&dir.path().join("m.gguf"), &[]);
    // Its KV cache alone, for the context its command gives, is far above the budget.
    let huge = pool("huge", &model, r#", "-c", "4000000""#);
    let stack = Stack::builder()
        .pool(&format!("[memory]\nhost_budget_bytes = {}\n", 64 * MIB))
        .pool(&huge)
        .start_in(dir);
    let body = serde_json::json!({
        "model": "m-huge",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    });
    for attempt in [
        "the first request asks for a load",
        "the next is refused at admission",
    ] {
        let reply = e2e::http::post_json(
            &stack.api(),
            "/v1/chat/completions",
            &body,
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(reply.status, 507, "{attempt}: {}", reply.text());
        let error = reply.json();
        assert_eq!(error["error"]["code"], "model_too_large", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("m-huge") && message.contains("budget of 67108864 bytes"),
            "{message}"
        );
    }
    assert_eq!(stack.pool_status("huge")["state"], "unloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_asked_for_at_once_never_run_more_engines_than_the_budget_holds() {
    let dir = temp_dir();
    // Half a second of loading: long enough that all three asks arrive before any engine
    // reports Loading.
    let (builder, _) = three_pools(&dir, r#", "--load-ms", "500""#);
    let stack = builder.start_in(dir);
    let client = stack.client("demand").await;
    let id = |name: &str| PoolId::from(name);
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let (a, b, c) = tokio::join!(client.load(&a), client.load(&b), client.load(&c));
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let running = || {
        ["a", "b", "c"]
            .iter()
            .filter(|pool| {
                stack
                    .recorded_engine_pid(pool)
                    .is_some_and(e2e::process_alive)
            })
            .count()
    };
    let mut most = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while client.pool_status(&id("c")).await.unwrap().state != PoolState::Ready {
        most = most.max(running());
        assert!(std::time::Instant::now() < deadline, "c never loaded");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    most = most.max(running());
    assert_eq!(most, 2, "two fit at a time, three never ran at once");
}
