//! More models than memory with real llama-server engines: three on-demand pools of generated
//! GGUF models behind orchestratord, under a host budget that fits two of their measured
//! footprints. Phase one (a generous budget) loads each once, so pool-managerd measures and keeps
//! its footprint; phase two restarts pool-managerd with the tight budget: the measurements
//! survive the restart, and requests for A, B, C in turn make C's load evict A, the least
//! recently used, with every request answered and the engine processes matching the states.
//! Phase three restarts it with room for one model and a short idle time: a request for C while
//! a long stream runs on A waits (A is drained, never cut), is served right after A's stream
//! ends and A is unloaded; then C's idle time unloads it and the next request loads it again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::{llama_pool, make_model, stack_with};
use e2e::{http, temp_dir};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The three pools, unloaded after `idle_ms` without a lease.
fn pools(dir: &std::path::Path, idle_ms: u64) -> String {
    ["a", "b", "c"]
        .iter()
        .map(|id| {
            // Big enough that a stream of STREAM_TOKENS takes seconds on a CI machine.
            let model = make_model(
                &dir.join(format!("{id}.gguf")),
                &["--width", "384", "--layers", "6", "--ctx", "2048"],
            );
            llama_pool(id, &format!("m-{id}"), &model, "unix", 1, 2048).replace(
                "[pool.probe]",
                &format!("load = \"on-demand\"\nidle_unload_ms = {idle_ms}\n[pool.probe]"),
            )
        })
        .collect()
}

/// A whole-answer chat request for `model` (at most `max_tokens`) with the test key; the reply.
fn chat_reply(api: &str, model: &str, max_tokens: Option<u32>) -> http::Reply {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    if let Some(max_tokens) = max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    http::request_with_headers(
        api,
        "POST",
        "/v1/chat/completions",
        &[(
            "Authorization",
            &format!("Bearer {}", e2e::real_engine::API_KEY),
        )],
        Some(("application/json", body.to_string().as_bytes())),
        Duration::from_secs(120),
    )
    .unwrap()
}

/// Four tokens from `model`, which must answer.
fn ask(stack: &e2e::stack::Stack, model: &str) -> Value {
    let reply = chat_reply(&stack.api(), model, Some(4));
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
    let pools = pools(dir.path(), 600_000);
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
    restart_with(&mut stack, &format!("{}{pools}", budget_line(budget)));
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

    // Phase three: room for one model, unloaded after 1.5 s idle.
    let one = largest + smallest / 2;
    let idle_ms = 1_500;
    let short_idle = pools_with_idle(&pools, idle_ms);
    restart_with(&mut stack, &format!("{}{short_idle}", budget_line(one)));
    let (mut stream, status, _) = http::open(
        &stack.api(),
        "POST",
        "/v1/chat/completions",
        &[(
            "Authorization",
            &format!("Bearer {}", e2e::real_engine::API_KEY),
        )],
        Some((
            "application/json",
            json!({"model": "m-a", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": STREAM_TOKENS, "stream": true})
            .to_string()
            .as_bytes(),
        )),
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(status, 200);
    let first = http::next_sse_data(&mut stream).expect("A's stream starts");
    assert!(!first.starts_with("[DONE]"), "{first}");
    let a_pid = stack.engine_pid("a");
    let a_stream = std::thread::spawn(move || {
        let mut chunks = 1;
        let mut finish = None;
        while let Some(data) = http::next_sse_data(&mut stream) {
            if data == "[DONE]" {
                return (chunks, finish, Instant::now());
            }
            let event: Value = serde_json::from_str(&data).unwrap();
            if let Some(reason) = event["choices"][0]["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
            chunks += 1;
        }
        panic!("A's stream broke off after {chunks} chunks");
    });
    let c_request = std::thread::spawn({
        let stack_api = stack.api();
        move || (chat_reply(&stack_api, "m-c", Some(4)), Instant::now())
    });
    // C does not fit beside A, and A is busy: A is drained (no new leases) while its stream
    // runs on, and C waits.
    stack.wait_for("A drained for C", || state(&stack, "a") == "draining");
    assert!(
        !a_stream.is_finished(),
        "A's stream ended before C's load was decided"
    );
    assert_eq!(state(&stack, "c"), "unloaded", "C waits for room");
    assert!(e2e::process_alive(a_pid));
    let (chunks, finish, a_ended) = a_stream.join().unwrap();
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "A's stream finished whole"
    );
    assert!(
        chunks >= STREAM_TOKENS,
        "{chunks} chunks for {STREAM_TOKENS} tokens"
    );
    let (c_reply, c_answered) = c_request.join().unwrap();
    assert_eq!(c_reply.status, 200, "{}", c_reply.text());
    assert!(c_answered > a_ended, "C was served after A's stream ended");
    assert_eq!(state(&stack, "a"), "unloaded");
    stack.wait_for("A's llama-server gone", || !e2e::process_alive(a_pid));
    eprintln!(
        "C answered {:?} after A's stream ended",
        c_answered.duration_since(a_ended)
    );

    // C's idle time unloads it; the next request loads it again.
    let c_pid = stack.engine_pid("c");
    stack.wait_for("C unloaded for idleness", || {
        state(&stack, "c") == "unloaded"
    });
    assert!(!e2e::process_alive(c_pid));
    assert_eq!(ask(&stack, "m-c")["model"], "m-c");
    assert_eq!(state(&stack, "c"), "ready");
    let metrics = http::get(
        stack.sidecar.ready("debug_http"),
        "/metrics",
        Duration::from_secs(5),
    )
    .unwrap()
    .text();
    assert!(
        metrics.contains("pool_managerd_unloads_total{reason=\"idle\"} 1"),
        "{metrics}"
    );
}

/// Tokens of the long stream on A (the pools' context is 2048).
const STREAM_TOKENS: usize = 1_500;

/// The pools' config with another idle time.
fn pools_with_idle(pools: &str, idle_ms: u64) -> String {
    pools.replace(
        "idle_unload_ms = 600000",
        &format!("idle_unload_ms = {idle_ms}"),
    )
}

/// Restarts pool-managerd with `config` (a clean stop stops every engine) and waits until every
/// pool is unloaded and orchestratord is connected again.
fn restart_with(stack: &mut e2e::stack::Stack, config: &str) {
    std::fs::write(&stack.config, config).unwrap();
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
}

#[test]
fn a_load_of_a_corrupt_gguf_answers_at_once_with_a_typed_503_and_the_next_load_waits_out_its_backoff()
 {
    let dir = temp_dir();
    let model = make_model(
        &dir.path().join("a.gguf"),
        &["--width", "64", "--layers", "1"],
    );
    // Cut in half: the header promises tensors the file does not have.
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let pool = llama_pool("a", "m-a", &model, "unix", 1, 256).replace(
        "[pool.probe]",
        "load = \"on-demand\"\nidle_unload_ms = 600000\n[pool.probe]",
    );
    let stack = stack_with(dir, &pool, "[admission]\nqueue_deadline_ms = 60000\n");
    let started = Instant::now();
    let reply = chat_reply(&stack.api(), "m-a", None);
    assert_eq!(reply.status, 503, "{}", reply.text());
    let error = reply.json();
    assert_eq!(error["error"]["code"], "model_load_failed", "{error}");
    assert!(reply.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered after {:?}, not at the 60 s queue deadline",
        started.elapsed()
    );
    // Nobody waits for the retry: the load is given up, and says why.
    stack.wait_for("the failed load given up", || {
        stack.pool_status("a")["state"] == "unloaded"
    });
    let status = stack.pool_status("a");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("exited")),
        "{status}"
    );

    // The next request's load waits out the failed one's backoff (like a restart), then fails
    // again and is answered at once.
    let api = stack.api();
    let again = std::thread::spawn(move || chat_reply(&api, "m-a", None));
    stack.wait_for("the next load backing off", || {
        stack.pool_status("a")["state"] == "backing_off"
    });
    let reply = again.join().unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "model_load_failed");
}
