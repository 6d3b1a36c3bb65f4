//! The whole API surface through orchestratord against real llama.cpp `llama-server` engines,
//! compared with the same requests sent straight to the engine: tool calls (streaming and not),
//! logprobs, JSON-schema output, seeds, `n = 2`, embeddings, rerank, Anthropic Messages and token
//! counting, the Responses API and both input-token counters, driven by the official `openai` and
//! `anthropic` SDKs (`tests/python/api_surface_check.py`). Also: engine errors keep their status and
//! message in the API's shape, non-streaming requests move the metrics, and an `n = 2` request
//! holds two slots so a waiting request reaches the engine only when they are really free.
//!
//! The models are generated (nothing can be downloaded here; `scripts/make-tiny-model.py`: a
//! Hermes/ChatML chat template whose tiny model is wired to open a tool call when offered tools, a
//! plain model for embeddings, a Qwen3-style model with a classifier head for rerank), hence
//! `tiny_model` in the names; the engines and daemons are real.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::http;
use e2e::real_engine::{API_KEY, LlamaPool, Stack, make_model, python, repo_root, stack};
use e2e::temp_dir;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn post(stack: &Stack, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let reply = http::request_with_headers(
        &stack.api(),
        "POST",
        path,
        &all,
        Some(("application/json", body.to_string().as_bytes())),
        Duration::from_secs(120),
    )
    .unwrap();
    let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, json)
}

#[test]
fn tiny_models_every_api_through_orchestratord_answers_as_the_real_llama_server_does() {
    let dir = temp_dir();
    let hermes = make_model(
        &dir.path().join("hermes.gguf"),
        &["--chat-template", "hermes", "--ctx", "2048"],
    );
    let embd = make_model(&dir.path().join("embd.gguf"), &["--seed", "3"]);
    let rerank = make_model(&dir.path().join("rerank.gguf"), &["--rerank"]);
    let chat_endpoints = [
        "chat_completions",
        "completions",
        "messages",
        "messages_count_tokens",
        "responses",
        "responses_input_tokens",
        "chat_completions_input_tokens",
        "models",
        // Listed, but the engine was not started with --embeddings: its own 501 must come back.
        "embeddings",
    ];
    let pools = [
        LlamaPool {
            id: "chat",
            model: "tiny-hermes",
            model_path: &hermes,
            listen: "tcp",
            parallel: 4,
            ctx: 2048,
            flags: &[],
            endpoints: &chat_endpoints,
        },
        LlamaPool {
            id: "embd",
            model: "tiny-embd",
            model_path: &embd,
            listen: "unix",
            parallel: 2,
            ctx: 256,
            flags: &["--embeddings", "--pooling", "mean"],
            endpoints: &["embeddings"],
        },
        LlamaPool {
            id: "rerank",
            model: "tiny-rerank",
            model_path: &rerank,
            listen: "tcp",
            parallel: 2,
            ctx: 256,
            flags: &["--reranking"],
            endpoints: &["rerank"],
        },
    ]
    .map(|pool| pool.toml())
    .concat();
    let stack = stack(dir, &pools);

    // Every case, through orchestratord and straight to the engine, with the official SDKs.
    let script = repo_root().join("tests/python/api_surface_check.py");
    let gateway = format!("http://{}", stack.api());
    let output = Command::new(python())
        .arg(&script)
        .arg("compare")
        .args(["--gateway", &gateway, "--key", API_KEY])
        .args([
            "--model",
            "tiny-hermes",
            "--engine",
            &stack.endpoint("chat"),
        ])
        .args(["--embeddings-model", "tiny-embd"])
        .args(["--embeddings-engine", &stack.endpoint("embd")])
        .args(["--rerank-model", "tiny-rerank"])
        .args(["--rerank-engine", &stack.endpoint("rerank")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "api_surface_check failed:\n{stdout}\n{}\norchestratord: {}",
        String::from_utf8_lossy(&output.stderr),
        stack.orchestrator().stderr()
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(results.len(), 17, "{stdout}");
    assert!(
        results.iter().all(|case| case["result"] == "pass"),
        "every case runs and passes: {stdout}"
    );

    // A non-streaming request moves the metrics as a streaming one does.
    let tokens_in = stack.metric("orchestratord_tokens_in_total");
    let tokens_out = stack.metric("orchestratord_tokens_out_total");
    let finished = stack.metric("orchestratord_request_duration_seconds_count");
    let request = json!({
        "model": "tiny-hermes",
        "messages": [{"role": "user", "content": "Tell me about the river."}],
        "max_tokens": 7,
        "temperature": 0,
    });
    let (status, answer) = post(&stack, "/v1/chat/completions", &[], &request);
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usage"];
    let prompt = usage["prompt_tokens"].as_f64().unwrap();
    assert_eq!(usage["completion_tokens"], 7);
    assert_eq!(
        stack.metric("orchestratord_tokens_in_total") - tokens_in,
        prompt
    );
    assert_eq!(
        stack.metric("orchestratord_tokens_out_total") - tokens_out,
        7.0
    );
    assert_eq!(
        stack.metric("orchestratord_request_duration_seconds_count") - finished,
        1.0
    );
    assert_eq!(stack.metric("orchestratord_in_flight"), 0.0);

    // Engine errors keep their status and message, in the shape of the API asked.
    let (status, error) = post(
        &stack,
        "/v1/embeddings",
        &[],
        &json!({"model": "tiny-hermes", "input": "the river"}),
    );
    assert_eq!(status, 501, "{error}");
    assert_eq!(error["error"]["type"], "not_supported_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--embeddings"),
        "{error}"
    );
    let long = "river ".repeat(3000);
    let (status, error) = post(
        &stack,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        &json!({"model": "tiny-hermes", "max_tokens": 8,
                "messages": [{"role": "user", "content": long}]}),
    );
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "the engine's own message: {error}"
    );
    // An API no pool of the model serves is a 404 before any queueing.
    let (status, error) = post(
        &stack,
        "/v1/rerank",
        &[],
        &json!({"model": "tiny-embd", "query": "q", "documents": ["a"]}),
    );
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["code"], "endpoint_not_served", "{error}");
    for pool in ["chat", "embd", "rerank"] {
        stack.wait_for_leases(pool, 0);
    }
}

#[test]
fn tiny_model_n2_holds_two_slots_and_a_waiting_request_reaches_the_engine_only_when_they_are_free()
{
    let dir = temp_dir();
    // Wide enough to generate for seconds (~100 tokens/s a choice on one core).
    let wide = make_model(
        &dir.path().join("wide.gguf"),
        &["--width", "512", "--layers", "8", "--ctx", "2048"],
    );
    let pool = LlamaPool {
        id: "two",
        model: "tiny-wide",
        model_path: &wide,
        listen: "tcp",
        parallel: 2,
        ctx: 2048,
        flags: &[],
        endpoints: &[],
    };
    let stack = stack(dir, &pool.toml());
    let chat = |n: u32, max_tokens: u32| {
        json!({
            "model": "tiny-wide",
            "messages": [{"role": "user", "content": "Tell me about the river."}],
            "max_tokens": max_tokens,
            "n": n,
            "temperature": 0,
        })
    };
    let (status, error) = post(&stack, "/v1/chat/completions", &[], &chat(3, 4));
    assert_eq!(status, 400, "n beyond the pool's slots: {error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{error}"
    );

    std::thread::scope(|scope| {
        let both = scope.spawn(|| post(&stack, "/v1/chat/completions", &[], &chat(2, 300)));
        stack.wait_for("n = 2 running on both engine slots", || {
            stack.busy_slots("two") == 2
        });
        assert_eq!(stack.pool_status("two")["active_leases"], 2);
        let waiting = scope.spawn(|| post(&stack, "/v1/chat/completions", &[], &chat(1, 20)));
        // While n = 2 runs, the waiting request holds no lease, so the engine never has a request
        // it must defer for want of a slot; the registry's count covers what the engine runs (read
        // before and after the engine, since the two cannot be read at one instant).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut saw_waiting = false;
        while !both.is_finished() {
            assert!(Instant::now() < deadline, "n = 2 never finished");
            let leased_before = stack.pool_status("two")["active_leases"].as_u64().unwrap();
            let busy = stack.busy_slots("two") as u64;
            let deferred = stack.engine_metric("two", "llamacpp:requests_deferred");
            let leased_after = stack.pool_status("two")["active_leases"].as_u64().unwrap();
            assert!(leased_before <= 2 && leased_after <= 2);
            assert_eq!(
                deferred, 0.0,
                "the engine had to queue a request for want of a slot"
            );
            assert!(
                leased_before.max(leased_after) >= busy,
                "registry says {leased_before}/{leased_after} leased while the engine runs {busy}"
            );
            saw_waiting |= busy == 2 && leased_after == 2 && !waiting.is_finished();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(saw_waiting, "the second request waited behind n = 2");
        let (status, answer) = both.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"].as_array().unwrap().len(), 2);
        let (status, answer) = waiting.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "length");
    });
    stack.wait_for_leases("two", 0);
}
