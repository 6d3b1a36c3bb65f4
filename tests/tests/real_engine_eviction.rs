//! More models than memory with real llama-server engines: three on-demand pools of generated
//! GGUF models behind orchestratord, under a host budget that fits two of their measured
//! footprints. Phase one (a generous budget) loads each once, so pool-managerd measures and keeps
//! its footprint; phase two restarts pool-managerd with the tight budget: the measurements
//! survive the restart, and requests for A, B, C in turn make C's load evict A, the least
//! recently used, with every request answered and the engine processes matching the states.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::{llama_pool, make_model, stack_with};
use e2e::{http, temp_dir};
use serde_json::{Value, json};
use std::time::Duration;

fn pools(dir: &std::path::Path) -> String {
    ["a", "b", "c"]
        .iter()
        .map(|id| {
            let model = make_model(
                &dir.join(format!("{id}.gguf")),
                &["--width", "256", "--layers", "4"],
            );
            llama_pool(id, &format!("m-{id}"), &model, "unix", 1, 512).replace(
                "[pool.probe]",
                "load = \"on-demand\"\nidle_unload_ms = 600000\n[pool.probe]",
            )
        })
        .collect()
}

fn ask(stack: &e2e::stack::Stack, model: &str) -> Value {
    let auth = stack.auth();
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let body = body.to_string();
    let reply = http::request_with_headers(
        &stack.api(),
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(("application/json", body.as_bytes())),
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{model}: {}", reply.text());
    reply.json()
}

fn state(stack: &e2e::stack::Stack, pool: &str) -> String {
    stack.pool_status(pool)["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn requests_for_three_models_that_fit_two_at_a_time_evict_the_least_recently_used() {
    let dir = temp_dir();
    let pools = pools(dir.path());
    let budget_line =
        |bytes: u64| format!("[memory]\nhost_budget_bytes = {bytes}\nmin_residency_ms = 0\n");
    let mut stack = stack_with(dir, &format!("{}{pools}", budget_line(1 << 40)), "");
    for model in ["m-a", "m-b", "m-c"] {
        ask(&stack, model);
    }
    let kept = std::fs::read_to_string(stack.path().join("state/footprints.json")).unwrap();
    let kept: Value = serde_json::from_str(&kept).unwrap();
    let footprints: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|pool| kept[pool]["bytes"].as_u64().expect("measured"))
        .collect();
    let largest = footprints.iter().copied().max().unwrap();
    let smallest = footprints.iter().copied().min().unwrap();
    eprintln!("measured footprints: {footprints:?}");
    // Two of any three fit; three never do.
    let budget = 2 * largest + smallest / 2;
    assert!(
        3 * smallest > budget,
        "the models differ too much: {footprints:?}"
    );

    // Phase two: the tight budget, after a restart (which stops every engine).
    std::fs::write(&stack.config, format!("{}{pools}", budget_line(budget))).unwrap();
    stack.sidecar.kill_with(e2e::Signal::SIGTERM);
    stack.restart_sidecar();
    stack.wait_for("every pool unloaded after the restart", || {
        ["a", "b", "c"].iter().all(|pool| {
            http::get(
                stack.sidecar.ready("debug_http"),
                &format!("/pools/{pool}/status"),
                Duration::from_secs(5),
            )
            .map(|reply| reply.json()["state"] == "unloaded")
            .unwrap_or(false)
        })
    });
    stack.wait_for("orchestratord reconnected", || {
        http::get(&stack.api(), "/readyz", Duration::from_secs(5))
            .is_ok_and(|reply| reply.status == 200)
    });
    ask(&stack, "m-a");
    ask(&stack, "m-b");
    let a_pid = stack.engine_pid("a");
    assert!(e2e::process_alive(a_pid));
    ask(&stack, "m-c");
    stack.wait_for("a unloaded", || state(&stack, "a") == "unloaded");
    assert_eq!(state(&stack, "b"), "ready");
    assert_eq!(state(&stack, "c"), "ready");
    stack.wait_for("a's llama-server gone", || !e2e::process_alive(a_pid));
    assert!(e2e::process_alive(stack.engine_pid("b")) && e2e::process_alive(stack.engine_pid("c")));
    // A again: B is now the least recently used.
    ask(&stack, "m-a");
    stack.wait_for("b unloaded", || state(&stack, "b") == "unloaded");
    assert_eq!(state(&stack, "c"), "ready");
}
