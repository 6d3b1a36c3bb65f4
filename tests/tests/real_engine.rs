//! The product against real engines: pool-managerd starts and supervises real llama.cpp
//! `llama-server` processes (one pool on TCP, one on a Unix socket) and llama-cpp-python's
//! OpenAI-compatible server; orchestratord serves them to the official `openai` Python SDK and to
//! curl. Only the model is a stand-in (nothing can be downloaded here, and there is no GPU): each
//! test generates a tiny random-weight LLaMA GGUF with `scripts/make-tiny-model.py`, which llama.cpp
//! loads and runs for real — hence `tiny_model` in every test name. Answers are checked against
//! what the engine itself reports for the same request; none of these tests can pass with the test
//! engine double (no GGUF loading, no `/slots` of a real server, no byte-identical answers).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::real_engine::{API_KEY, Stack, WAIT, http_address, llama_pool, make_model, python, stack};
use e2e::{http, temp_dir};
use serde_json::{Value, json};
use std::io::BufReader;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn cases_checked(output: &Output) -> usize {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    last.strip_prefix("cases=")
        .unwrap_or_else(|| panic!("no cases= line: {stdout}"))
        .parse()
        .unwrap()
}

/// `curl ARGS` (a real curl), returning stdout.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        output.status.success(),
        "curl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// curl arguments that reach an engine at `endpoint` (TCP or Unix socket) at `path`.
fn engine_curl_target(endpoint: &str, path: &str) -> Vec<String> {
    if endpoint.starts_with('/') {
        vec![
            "--unix-socket".into(),
            endpoint.into(),
            format!("http://engine{path}"),
        ]
    } else {
        vec![format!("{}{path}", endpoint.trim_end_matches('/'))]
    }
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// A streamed chat request through orchestratord; the reader is positioned at the first SSE byte.
fn open_stream(api: &str, model: &str, max_tokens: u32) -> BufReader<http::Stream> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the river."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let auth = format!("Bearer {API_KEY}");
    let (reader, status, head) = http::open(
        api,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth)],
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap();
    assert_eq!(status, 200, "stream refused: {head}");
    reader
}

/// What a whole streamed chat said: content chunks, the finish reason, the usage, whether it
/// ended in `[DONE]`.
#[derive(Default)]
struct Streamed {
    content_chunks: u32,
    finish_reason: Option<String>,
    usage: Option<Value>,
    done: bool,
}

impl Streamed {
    /// Takes in one `data:` payload.
    fn take(&mut self, data: &str) {
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "stream failed: {chunk}");
        if let Some(choice) = chunk["choices"].get(0) {
            if choice["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                self.content_chunks += 1;
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                self.finish_reason = Some(reason.to_owned());
            }
        } else if !chunk["usage"].is_null() {
            self.usage = Some(chunk["usage"].clone());
        }
    }

    /// Reads the rest of the stream.
    fn read_rest(mut self, mut reader: BufReader<http::Stream>) -> Streamed {
        while !self.done {
            match http::next_sse_data(&mut reader) {
                Some(data) => self.take(&data),
                None => break,
            }
        }
        self
    }
}

fn read_stream(reader: BufReader<http::Stream>) -> Streamed {
    Streamed::default().read_rest(reader)
}

#[test]
fn tiny_model_openai_sdk_and_curl_through_real_llama_servers_on_tcp_and_unix_socket() {
    let dir = temp_dir();
    let a = make_model(
        &dir.path().join("a.gguf"),
        &["--seed", "1", "--ctx", "1024"],
    );
    let b = make_model(
        &dir.path().join("b.gguf"),
        &["--seed", "2", "--ctx", "1024"],
    );
    let pools = llama_pool("tcp", "tiny-a", &a, "tcp", 2, 1024)
        + &llama_pool("uds", "tiny-b", &b, "unix", 2, 1024);
    let stack = stack(dir, &pools);
    let tcp = stack.endpoint("tcp");
    let uds = stack.endpoint("uds");
    assert!(tcp.starts_with("http://127.0.0.1:"), "{tcp}");
    assert!(uds.ends_with(".sock"), "{uds}");
    // Really llama.cpp, with the model pool-managerd was told to load, and its slots learnt from it.
    for (pool, model) in [("tcp", &a), ("uds", &b)] {
        let props = stack.engine_get(pool, "/props");
        assert_eq!(props["model_path"], model.display().to_string(), "{props}");
        assert_eq!(props["total_slots"], 2, "{props}");
        assert_eq!(stack.pool_status(pool)["slots_total"], 2);
    }

    // The official SDK: every API, streaming and not, against what the engine answers itself.
    let output = stack.python(&[
        "compare",
        "--pool",
        &format!("tiny-a={tcp}"),
        "--pool",
        &format!("tiny-b={uds}"),
        "--max-tokens",
        "12",
    ]);
    // 2 pools x 2 APIs x (1 plain + 2 streamed + 2 stop) + the error checks.
    assert_eq!(cases_checked(&output), 21);

    // curl: a streamed chat on the Unix-socket pool, the way the README shows it.
    let api = stack.api();
    let auth = format!("Authorization: Bearer {API_KEY}");
    let body = json!({"model": "tiny-b", "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 9, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let streamed = curl(&[
        "-N",
        &format!("http://{api}/v1/chat/completions"),
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
    ]);
    let events = sse_data(&streamed);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{streamed}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 9, "{streamed}");
    assert_eq!(
        chunks
            .iter()
            .filter_map(|c| c["choices"].get(0)?["finish_reason"].as_str())
            .collect::<Vec<_>>(),
        ["length"]
    );
    // The same request straight to llama-server over its Unix socket gives the same text and usage.
    let direct: Value = serde_json::from_str(&curl(
        &[
            &["-H", "Content-Type: application/json", "-d"][..],
            &[body.replace("\"stream\":true", "\"stream\":false").as_str()],
            &engine_curl_target(&uds, "/v1/chat/completions")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()[..],
        ]
        .concat(),
    ))
    .unwrap();
    assert_eq!(direct["choices"][0]["message"]["content"], content.as_str());
    assert_eq!(direct["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(direct["usage"]["completion_tokens"], 9);

    // curl: a plain completion on the TCP pool, compared with the engine's own answer.
    let body =
        json!({"model": "tiny-a", "prompt": "the old house", "max_tokens": 7, "temperature": 0})
            .to_string();
    let ours: Value = serde_json::from_str(&curl(&[
        &format!("http://{api}/v1/completions"),
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
    ]))
    .unwrap();
    let target = engine_curl_target(&tcp, "/v1/completions");
    let direct: Value = serde_json::from_str(&curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &target[0],
    ]))
    .unwrap();
    assert_eq!(ours["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(ours["choices"][0]["finish_reason"], "length");
    // The engine's own answer (how much of the prompt its cache held may differ between the two).
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(ours["usage"][field], direct["usage"][field], "{field}");
    }
    assert_eq!(ours["usage"]["completion_tokens"], 7);
    assert_eq!(ours["model"], "tiny-a");

    // Nothing held afterwards: every lease back, every slot idle.
    for pool in ["tcp", "uds"] {
        stack.wait_for_leases(pool, 0);
        assert_eq!(stack.busy_slots(pool), 0, "{pool}: a slot still busy");
    }
}

#[test]
fn tiny_model_client_closing_mid_stream_frees_the_llama_server_slot_and_the_lease() {
    let dir = temp_dir();
    // Wider and deeper than the tiny default, so a stream lasts seconds (~500 tokens/s here).
    let model = make_model(
        &dir.path().join("wide.gguf"),
        &["--width", "256", "--layers", "4", "--ctx", "4096"],
    );
    let stack = stack(dir, &llama_pool("p", "wide", &model, "unix", 2, 4096));
    let engine = stack.endpoint("p");

    // A raw client: read a few chunks, see the slot and the lease taken, vanish.
    let mut reader = open_stream(&stack.api(), "wide", 3000);
    for _ in 0..5 {
        assert!(http::next_sse_data(&mut reader).is_some());
    }
    assert_eq!(stack.busy_slots("p"), 1);
    assert_eq!(stack.pool_status("p")["active_leases"], 1);
    drop(reader);
    let closed = Instant::now();
    stack.wait_for("llama-server to stop generating", || {
        stack.busy_slots("p") == 0
    });
    let idle_after = closed.elapsed();
    stack.wait_for_leases("p", 0);
    let generated = stack.engine_tokens_predicted("p");
    assert!(
        (5..3000).contains(&generated),
        "llama-server generated {generated} of the 3000 tokens asked"
    );
    eprintln!("raw client: slot idle {idle_after:?} after close; {generated} tokens generated");

    // The same with the official SDK closing its stream.
    let output = stack.python(&["close-mid-stream", "--model", "wide", "--engine", &engine]);
    assert_eq!(cases_checked(&output), 1);
    stack.wait_for_leases("p", 0);
    let by_sdk_client = stack.engine_tokens_predicted("p") - generated;
    assert!(
        (5..3000).contains(&by_sdk_client),
        "llama-server generated {by_sdk_client} of the 3000 tokens asked"
    );

    // Both slots serve again: two full streams at once.
    let first = open_stream(&stack.api(), "wide", 40);
    let second = open_stream(&stack.api(), "wide", 40);
    for streamed in [read_stream(first), read_stream(second)] {
        assert!(streamed.done);
        assert_eq!(streamed.content_chunks, 40);
        assert_eq!(streamed.usage.unwrap()["completion_tokens"], 40);
    }
    stack.wait_for_leases("p", 0);
    let metrics = http::get(&stack.api(), "/metrics", WAIT).unwrap().text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orchestratord_cancellations_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// A completion's text through orchestratord (temperature 0: the model decides it alone).
fn complete(stack: &Stack, model: &str) -> String {
    let output = curl(&[
        &format!("http://{}/v1/completions", stack.api()),
        "-H",
        &format!("Authorization: Bearer {API_KEY}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &json!({"model": model, "prompt": "the river", "max_tokens": 10, "temperature": 0})
            .to_string(),
    ]);
    let answer: Value = serde_json::from_str(&output).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 10, "{answer}");
    answer["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[test]
fn tiny_models_reload_and_drain_a_real_llama_server_while_it_streams() {
    let dir = temp_dir();
    // Streams of thousands of tokens last seconds at this size (~500-1500 tokens/s here).
    let args = ["--width", "256", "--layers", "4", "--ctx", "4096"];
    let first = make_model(
        &dir.path().join("first.gguf"),
        &[&["--seed", "1"], &args[..]].concat(),
    );
    let second = make_model(
        &dir.path().join("second.gguf"),
        &[&["--seed", "2"], &args[..]].concat(),
    );
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not really a model").unwrap();
    let stack = stack(dir, &llama_pool("r", "m", &first, "tcp", 2, 4096));
    let text_first = complete(&stack, "m");
    let first_pid = stack.engine_pid("r");

    // Reload while a stream runs on the old engine: the stream finishes there, whole.
    let mut running = open_stream(&stack.api(), "m", 3000);
    let mut streamed = Streamed::default();
    streamed.take(&http::next_sse_data(&mut running).unwrap());
    stack.operator(&["reload", "r", second.to_str().unwrap()]);
    stack.wait_for("the engine on the second model", || {
        stack.engine_pid("r") != first_pid
            && stack.pool_status("r")["ready"] == true
            && stack.engine_get("r", "/props")["model_path"] == second.display().to_string()
    });
    // The swap happened under the running stream: its lease is still held, its engine alive.
    assert_eq!(stack.pool_status("r")["active_leases"], 1);
    assert!(e2e::process_alive(first_pid));
    let text_second = complete(&stack, "m");
    assert_ne!(text_first, text_second, "the reload changed nothing");
    let streamed = streamed.read_rest(running);
    assert!(streamed.done, "the stream across the reload broke");
    assert_eq!(streamed.content_chunks, 3000);
    assert_eq!(streamed.finish_reason.as_deref(), Some("length"));
    stack.wait_for("the old llama-server to exit", || {
        !e2e::process_alive(first_pid)
    });
    stack.wait_for_leases("r", 0);

    // A reload to a file llama.cpp cannot load rolls back: the second model serves on.
    let second_pid = stack.engine_pid("r");
    assert_eq!(stack.pool_status("r")["last_error"], Value::Null);
    stack.operator(&["reload", "r", broken.to_str().unwrap()]);
    stack.wait_for("the failed reload to be reported", || {
        !stack.pool_status("r")["last_error"].is_null()
    });
    let reported = stack.pool_status("r")["last_error"].to_string();
    assert!(
        reported.contains("broken.gguf") && reported.contains("still serving"),
        "{reported}"
    );
    assert_eq!(stack.engine_pid("r"), second_pid);
    assert_eq!(stack.pool_status("r")["ready"], true);
    assert_eq!(complete(&stack, "m"), text_second);

    // Drain while a stream runs: it finishes, then the engine stops and the model is gone.
    let mut running = open_stream(&stack.api(), "m", 2000);
    let mut streamed = Streamed::default();
    streamed.take(&http::next_sse_data(&mut running).unwrap());
    stack.operator(&["drain", "r"]);
    stack.wait_for("the pool to drain", || {
        stack.pool_status("r")["state"] == "draining"
    });
    assert_eq!(
        stack.pool_status("r")["active_leases"],
        1,
        "the stream ended before the drain"
    );
    let streamed = streamed.read_rest(running);
    assert!(streamed.done);
    assert_eq!(streamed.content_chunks, 2000);
    stack.wait_for("the drained pool to stop", || {
        stack.pool_status("r")["state"] == "stopped"
    });
    stack.wait_for("the drained llama-server to exit", || {
        !e2e::process_alive(second_pid)
    });
    // Nothing will serve the model until an operator acts: a clear 503 at once, not a wait.
    let asked = Instant::now();
    let refused = curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{}/v1/completions", stack.api()),
        "-H",
        &format!("Authorization: Bearer {API_KEY}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"model":"m","prompt":"x","max_tokens":2}"#,
    ]);
    let (body, status) = refused.rsplit_once('\n').unwrap();
    assert_eq!(status, "503", "{refused}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "pool_unready", "{body}");
    assert!(asked.elapsed() < Duration::from_secs(5));
}

#[test]
fn tiny_model_openai_engine_kind_against_llama_cpp_python_server() {
    let dir = temp_dir();
    let model = make_model(
        &dir.path().join("tiny.gguf"),
        &["--seed", "3", "--ctx", "1024"],
    );
    let pools = format!(
        r#"
[[pool]]
id = "py"
model = "tiny-py"
engine = "openai"
command = [{python:?}, "-m", "llama_cpp.server", "--model", "{{model}}", "--model_alias", "tiny-py",
           "--host", "{{host}}", "--port", "{{port}}", "--n_ctx", "1024", "--n_threads", "1",
           "--interrupt_requests", "False", "--verbose", "False"]
model_path = {model:?}
listen = "tcp"
slots = 1
startup_timeout_ms = 60000
stop_grace_ms = 3000
[pool.probe]
interval_ms = 200
"#,
        python = python().display().to_string(),
        model = model.display().to_string(),
    );
    let stack = stack(dir, &pools);
    let endpoint = stack.endpoint("py");
    // llama-cpp-python's server, not llama-server: OpenAI endpoints only.
    let models = stack.engine_get("py", "/v1/models");
    assert_eq!(models["data"][0]["id"], "tiny-py", "{models}");
    assert_eq!(
        http::get(&http_address(&endpoint), "/props", WAIT)
            .unwrap()
            .status,
        404
    );
    let output = stack.python(&[
        "compare",
        "--pool",
        &format!("tiny-py={endpoint}"),
        "--max-tokens",
        "8",
        "--no-stream-usage",
    ]);
    assert_eq!(cases_checked(&output), 11);
    stack.wait_for_leases("py", 0);
}
