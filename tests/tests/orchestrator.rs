//! orchestratord end to end: pool-managerd supervising test engine doubles (fake llama-servers,
//! no model or GPU needed), orchestratord in front, clients speaking OpenAI's HTTP API.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::stack::{Stack, double_pool};
use e2e::{DaemonBuilder, binary, http, temp_dir};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// One managed pool `p` serving model `double` with `slots` slots (the engine double with
/// `engine_flags`), orchestratord configured by `orchestrator_toml`.
fn stack(slots: u32, engine_flags: &[&str], orchestrator_toml: &str) -> Stack {
    Stack::builder()
        .pool(&double_pool("p", "double", slots, engine_flags))
        .orchestrator(orchestrator_toml)
        .start()
}

/// Waits until the engine double of pool `p` counts one generation cancelled and none running.
fn wait_for_engine_cancel(stack: &Stack) {
    let engine = stack.endpoint("p");
    stack.wait_for("the engine to see its request closed", || {
        let stats = http::get(&engine, "/control/stats", WAIT).unwrap().json();
        stats["cancelled"] == 1 && stats["active"] == 0
    });
}

/// A JSON POST; returns the connection positioned after the response head, the status and the
/// head.
fn post(
    addr: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (BufReader<http::Stream>, u16, String) {
    let body = body.to_string();
    http::open(
        addr,
        "POST",
        path,
        headers,
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap()
}

/// Sends a chat completion request (`Connection: close`) and returns the raw connection, for
/// tests that look at how the reply's bytes arrive.
fn send_chat(addr: &str, body: &str) -> http::Stream {
    http::send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap()
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "double",
        "messages": [{"role": "user", "content": "say something nice"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[test]
fn a_streamed_chat_arrives_chunk_by_chunk_with_usage_and_done() {
    let stack = stack(2, &["--token-delay-ms", "30"], "");
    let (mut reader, status, head) =
        post(&stack.api(), "/v1/chat/completions", &chat(8, true), &[]);
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("x-correlation-id:"),
        "{head}"
    );
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(data) = http::next_sse_data(&mut reader) {
        if data == "[DONE]" {
            arrivals.push(Instant::now());
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            continue;
        }
        arrivals.push(Instant::now());
        if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(content);
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    assert_eq!(finish.as_deref(), Some("length"));
    let usage = usage.expect("a usage chunk before [DONE]");
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(usage["prompt_tokens"], 3);
    assert_eq!(text.split_whitespace().count(), 8, "{text}");
    // Not buffered: 8 tokens 30 ms apart are spread over well over 100 ms.
    let spread = arrivals.last().unwrap().duration_since(arrivals[0]);
    assert!(spread >= Duration::from_millis(120), "{spread:?}");
    let status = stack.pool_status("p");
    assert_eq!(status["active_leases"], 0, "{status}");
    let metrics = http::get(&stack.api(), "/metrics", WAIT).unwrap().text();
    for line in [
        "orchestratord_tokens_out_total 8",
        "orchestratord_tokens_in_total 3",
        "orchestratord_in_flight 0",
        "orchestratord_sidecar_connected 1",
        "orchestratord_time_to_first_token_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[test]
fn non_streaming_chat_and_completions_carry_usage_and_finish_reason() {
    let stack = stack(2, &[], "");
    let (mut reader, status, _) = post(&stack.api(), "/v1/chat/completions", &chat(5, false), &[]);
    assert_eq!(status, 200);
    let mut body = String::new();
    reader.read_to_string(&mut body).unwrap();
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens"], 5);
    assert_eq!(reply["usage"]["total_tokens"], 8);
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 5, "{content}");

    let request = json!({"model": "double", "prompt": "one two", "max_tokens": 4});
    let (mut reader, status, _) = post(&stack.api(), "/v1/completions", &request, &[]);
    assert_eq!(status, 200);
    let mut body = String::new();
    reader.read_to_string(&mut body).unwrap();
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "text_completion");
    assert_eq!(reply["usage"]["prompt_tokens"], 2);
    assert_eq!(reply["usage"]["completion_tokens"], 4);
}

#[test]
fn bad_input_gets_a_clear_error_in_openai_shape_and_is_never_queued() {
    let stack = stack(1, &[], "[body_limits]\ngeneration_bytes = 4096\n");
    let addr = stack.api();
    let models = http::get(&addr, "/v1/models", WAIT).unwrap().json();
    assert_eq!(models["data"][0]["id"], "double");

    let cases = [
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "double", "messages": []}),
            400,
            "invalid_params",
        ),
        (
            json!({"model": "double", "messages": [{"role":"user","content":"x"}], "max_tokens": "ten"}),
            400,
            "invalid_params",
        ),
        (
            json!({"model": "double", "messages": [{"role":"user","content": "x".repeat(5000)}]}),
            413,
            "invalid_params",
        ),
    ];
    for (body, expected, code) in cases {
        let (mut reader, status, head) = post(&addr, "/v1/chat/completions", &body, &[]);
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        assert_eq!(status, expected, "{head}{text}");
        if !code.is_empty() {
            let reply: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(reply["error"]["code"], code, "{text}");
            assert!(reply["error"]["message"].is_string());
        }
    }
    let mut raw = TcpStream::connect(&addr).unwrap();
    write!(raw, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{{bad}}").unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("invalid JSON"), "{text}");
    assert_eq!(stack.pool_status("p")["active_leases"], 0);
}

#[test]
fn api_keys_guard_everything_but_the_open_paths() {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, "# operators\nsecret-key-number-one\n").unwrap();
    let stack = stack(
        1,
        &[],
        &format!("api_keys_file = {:?}\n", key_file.display().to_string()),
    );
    let addr = stack.api();
    assert_eq!(http::get(&addr, "/livez", WAIT).unwrap().status, 200);
    assert_eq!(http::get(&addr, "/v1/models", WAIT).unwrap().status, 401);
    let (_, status, _) = post(
        &addr,
        "/v1/chat/completions",
        &chat(2, false),
        &[("Authorization", "Bearer wrong-key-wrong-key")],
    );
    assert_eq!(status, 401);
    let (_, status, _) = post(
        &addr,
        "/v1/chat/completions",
        &chat(2, false),
        &[("Authorization", "Bearer secret-key-number-one")],
    );
    assert_eq!(status, 200);
}

/// The engine double's `/control/{what}` (`stats`: counters; `last-request`: its headers).
fn engine_control(stack: &Stack, what: &str) -> Value {
    let engine = stack.endpoint("p");
    http::get(&engine, &format!("/control/{what}"), WAIT)
        .unwrap()
        .json()
}

#[test]
fn bad_input_on_every_endpoint_gets_a_clear_error_in_its_apis_shape_and_is_never_queued() {
    let stack = stack(
        1,
        &[],
        "[body_limits]\ngeneration_bytes = 4096\nembeddings_bytes = 8192\n",
    );
    let addr = stack.api();
    let big = "x".repeat(9000);
    // (path, a valid body for model "double" or "nope", whether its API is Anthropic's)
    let endpoints: [(&str, Value, bool); 10] = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}]}),
            false,
        ),
        ("/v1/completions", json!({"prompt": "x"}), false),
        ("/v1/embeddings", json!({"input": ["x"]}), false),
        (
            "/v1/rerank",
            json!({"query": "x", "documents": ["a"]}),
            false,
        ),
        (
            "/v1/reranking",
            json!({"query": "x", "documents": ["a"]}),
            false,
        ),
        ("/v1/responses", json!({"input": "x"}), false),
        ("/v1/responses/input_tokens", json!({"input": "x"}), false),
        (
            "/v1/chat/completions/input_tokens",
            json!({"messages": [{"role": "user"}]}),
            false,
        ),
        (
            "/v1/messages",
            json!({"max_tokens": 4, "messages": [{"role": "user"}]}),
            true,
        ),
        (
            "/v1/messages/count_tokens",
            json!({"messages": [{"role": "user"}]}),
            true,
        ),
    ];
    for (path, valid, anthropic) in endpoints {
        let with = |model: Value| {
            let mut body = valid.clone();
            body["model"] = model;
            body.to_string()
        };
        let cases: [(String, u16); 5] = [
            ("{\"model\": ".to_owned(), 400),
            (valid.to_string(), 400),
            (with(json!("nope")), 404),
            (with(json!(3)), 400),
            (with(json!(big)), 413),
        ];
        for (body, expected) in cases {
            let reply = http::request_with_headers(
                &addr,
                "POST",
                path,
                &[],
                Some(("application/json", body.as_bytes())),
                WAIT,
            )
            .unwrap();
            let error: Value = serde_json::from_slice(&reply.body)
                .unwrap_or_else(|_| panic!("{path}: not JSON: {}", reply.text()));
            assert_eq!(reply.status, expected, "{path} {body:.60}: {error}");
            if anthropic {
                assert_eq!(error["type"], "error", "{path}: {error}");
                assert!(error["error"]["type"].is_string(), "{path}: {error}");
            } else {
                assert!(error["error"]["type"].is_string(), "{path}: {error}");
                assert!(error["error"]["code"].is_string(), "{path}: {error}");
            }
            let message = error["error"]["message"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{path}: {error}");
        }
    }
    // A model that is served, on an API its pool does not serve: 404 before any queueing.
    let (mut reader, status, _) = post(
        &addr,
        "/v1/embeddings",
        &json!({"model": "double", "input": "x"}),
        &[],
    );
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(status, 404, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "endpoint_not_served", "{text}");
    let stats = engine_control(&stack, "stats");
    assert_eq!(stats["completed"], 0, "{stats}");
    let last = engine_control(&stack, "last-request");
    assert_eq!(last["headers"], Value::Null, "nothing reached the engine");
    assert_eq!(stack.pool_status("p")["active_leases"], 0);
}

#[test]
fn anthropic_keys_request_ids_and_forwarded_headers_reach_the_engine_but_credentials_never() {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, "secret-key-number-one\n").unwrap();
    let stack = stack(
        1,
        &[],
        &format!(
            "api_keys_file = {:?}\nforward_headers = [\"X-Tenant\"]\n",
            key_file.display().to_string()
        ),
    );
    let addr = stack.api();
    let (mut reader, status, head) = post(
        &addr,
        "/v1/chat/completions",
        &chat(2, false),
        &[
            ("x-api-key", "secret-key-number-one"),
            ("X-Request-Id", "req-123"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("anthropic-version", "2023-06-01"),
            ("X-Tenant", "blue"),
            ("X-Not-Forwarded", "no"),
        ],
    );
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(status, 200, "{head}{text}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-correlation-id: req-123"), "{head}");
    assert!(head.contains("x-request-id: req-123"), "{head}");
    let seen = &engine_control(&stack, "last-request")["headers"];
    assert_eq!(seen["x-correlation-id"], "req-123", "{seen}");
    assert_eq!(
        seen["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(seen["x-tenant"], "blue");
    for never in [
        "x-api-key",
        "authorization",
        "x-not-forwarded",
        "x-request-id",
    ] {
        assert!(
            seen.get(never).is_none(),
            "{never} reached the engine: {seen}"
        );
    }
    // A wrong key on Anthropic's API is a 401 in Anthropic's shape.
    let (mut reader, status, _) = post(
        &addr,
        "/v1/messages",
        &json!({"model": "double", "max_tokens": 4, "messages": [{"role": "user"}]}),
        &[("x-api-key", "not-the-key-at-all")],
    );
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(status, 401, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let stack = stack(
        1,
        &["--token-delay-ms", "200"],
        "[admission]\ncapacity = 1\nfull_policy = \"reject\"\n",
    );
    let addr = stack.api();
    // One request holds the only slot, one waits in the queue; the third finds it full.
    let holder = std::thread::spawn({
        let addr = addr.clone();
        move || post(&addr, "/v1/chat/completions", &chat(10, true), &[])
    });
    stack.wait_for_leases("p", 1);
    let queued = std::thread::spawn({
        let addr = addr.clone();
        move || post(&addr, "/v1/chat/completions", &chat(1, false), &[])
    });
    stack.wait_for("the second request to queue", || {
        http::get(&addr, "/metrics", WAIT)
            .unwrap()
            .text()
            .contains("orchestratord_queue_depth{class=\"interactive\"} 1")
    });
    let (mut reader, status, head) = post(&addr, "/v1/chat/completions", &chat(1, false), &[]);
    let mut body = String::new();
    let _ = reader.read_to_string(&mut body);
    assert_eq!(status, 429, "{head}{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["error"]["type"], "rate_limit_error");
    drop(holder.join().unwrap());
    let (_, status, _) = queued.join().unwrap();
    assert_eq!(
        status, 200,
        "the queued request was served once the slot came back"
    );
}

#[test]
fn a_client_that_leaves_mid_stream_frees_the_engine_and_the_slot() {
    let stack = stack(1, &["--token-delay-ms", "50"], "");
    let (mut reader, status, _) = post(&stack.api(), "/v1/chat/completions", &chat(200, true), &[]);
    assert_eq!(status, 200);
    assert!(http::next_sse_data(&mut reader).is_some());
    assert_eq!(stack.pool_status("p")["active_leases"], 1);
    let left = Instant::now();
    drop(reader);
    while stack.pool_status("p")["active_leases"] != 0 {
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "the lease was not released"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("slot free {:?} after the client left", left.elapsed());
    wait_for_engine_cancel(&stack);
    let _ = stack.path();
}

/// The native task API's events for `task`, in order, until the stream ends.
fn task_events(addr: &str, task: &str) -> Vec<(String, Value)> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET /v2/tasks/{task}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut events = Vec::new();
    let mut name = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            return events;
        }
        if let Some(event) = line.strip_prefix("event: ") {
            name = Some(event.trim_end().to_owned());
        } else if let Some(data) = line.strip_prefix("data: ")
            && let Some(name) = name.take()
        {
            events.push((name, serde_json::from_str(data.trim_end()).unwrap()));
        }
    }
}

fn submit(addr: &str, body: &Value) -> (u16, Value) {
    let (mut reader, status, _) = post(addr, "/v2/tasks", body, &[]);
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn a_native_task_streams_started_tokens_metrics_then_end() {
    let stack = stack(2, &[], "");
    let addr = stack.api();
    let (status, accepted) = submit(
        &addr,
        &json!({"model": "double", "prompt": "hello there", "max_tokens": 6}),
    );
    assert_eq!(status, 202, "{accepted}");
    let task = accepted["task_id"].as_str().unwrap().to_owned();
    assert!(accepted["queue_position"].is_u64());
    assert!(accepted["predicted_start_ms"].is_u64());
    assert_eq!(
        accepted["streams"]["events"],
        format!("/v2/tasks/{task}/events")
    );
    let events = task_events(&addr, &task);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "started", "token", "token", "token", "token", "token", "token", "metrics", "end"
        ]
    );
    for (index, (_, token)) in events[1..7].iter().enumerate() {
        assert_eq!(token["i"], index);
        assert!(token["t"].is_string());
    }
    assert_eq!(events[8].1["tokens_out"], 6);
    assert!(events[8].1["decode_ms"].is_u64());
    assert_eq!(events[7].1["prompt_tokens"], 2);
    assert!(
        !events[0].1.to_string().contains(".sock"),
        "no engine address reaches clients"
    );
    let status = http::get(&addr, &format!("/v2/tasks/{task}"), WAIT)
        .unwrap()
        .json();
    assert_eq!(status["state"], "done");
    // A second reader sees the same, complete history.
    assert_eq!(task_events(&addr, &task).len(), 9);
    assert_eq!(stack.pool_status("p")["active_leases"], 0);
}

#[test]
fn cancelling_a_running_task_ends_it_with_one_error_and_frees_the_slot() {
    let stack = stack(1, &["--token-delay-ms", "50"], "");
    let addr = stack.api();
    let (_, accepted) = submit(
        &addr,
        &json!({"model": "double", "prompt": "go", "max_tokens": 500}),
    );
    let task = accepted["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    while http::get(&addr, &format!("/v2/tasks/{task}"), WAIT)
        .unwrap()
        .json()["tokens_out"]
        == 0
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let cancelled = Instant::now();
    let (_, status, _) = post(&addr, &format!("/v2/tasks/{task}/cancel"), &json!({}), &[]);
    assert_eq!(status, 202);
    let events = task_events(&addr, &task);
    let (last, error) = events.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(error["code"], "CANCELLED");
    assert_eq!(events.iter().filter(|(n, _)| n == "error").count(), 1);
    while stack.pool_status("p")["active_leases"] != 0 {
        assert!(
            cancelled.elapsed() < Duration::from_secs(1),
            "the slot did not come back"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "slot free {:?} after the cancel request",
        cancelled.elapsed()
    );
    wait_for_engine_cancel(&stack);
    assert_eq!(
        http::get(&addr, &format!("/v2/tasks/{task}"), WAIT)
            .unwrap()
            .json()["state"],
        "cancelled"
    );
    let missing = http::get(&addr, "/v2/tasks/t-nope/events", WAIT).unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "TASK_NOT_FOUND");
    let (status, invalid) = submit(
        &addr,
        &json!({"model": "double", "prompt": "", "max_tokens": 3}),
    );
    assert_eq!(status, 400);
    assert_eq!(invalid["code"], "INVALID_PARAMS");
}

#[test]
fn interactive_tasks_overtake_batch_ones_and_batch_ones_still_finish() {
    let stack = stack(
        1,
        &["--token-delay-ms", "20"],
        "[admission]\ncapacity = 8\nbatch_max_wait_ms = 60000\n",
    );
    let addr = stack.api();
    let task = |priority: &str, tokens: u32| {
        let (status, accepted) = submit(
            &addr,
            &json!({"model": "double", "prompt": "x", "max_tokens": tokens, "priority": priority}),
        );
        assert_eq!(status, 202, "{accepted}");
        accepted["task_id"].as_str().unwrap().to_owned()
    };
    let first = task("interactive", 20);
    let batch = [task("batch", 2), task("batch", 2)];
    let interactive = task("interactive", 2);
    let started_at = |id: &str| {
        let events = task_events(&addr, id);
        assert_eq!(events.last().unwrap().0, "end", "{events:?}");
        events
    };
    let _ = started_at(&first);
    let done_order: Vec<String> = {
        // Completion order follows start order on a single slot.
        let mut finished = Vec::new();
        let deadline = Instant::now() + WAIT;
        while finished.len() < 3 {
            for id in batch.iter().chain(std::iter::once(&interactive)) {
                if !finished.contains(id)
                    && http::get(&addr, &format!("/v2/tasks/{id}"), WAIT)
                        .unwrap()
                        .json()["state"]
                        == "done"
                {
                    finished.push(id.clone());
                }
            }
            assert!(Instant::now() < deadline, "not all tasks finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        finished
    };
    assert_eq!(
        done_order[0], interactive,
        "the interactive task went first: {done_order:?}"
    );
    for id in &batch {
        assert_eq!(started_at(id).last().unwrap().0, "end");
    }
}

#[test]
fn drop_lru_sheds_the_oldest_batch_task_with_its_own_error() {
    let stack = stack(
        1,
        &["--token-delay-ms", "20"],
        "[admission]\ncapacity = 1\nfull_policy = \"drop-lru\"\n",
    );
    let addr = stack.api();
    let (_, holder) = submit(
        &addr,
        &json!({"model": "double", "prompt": "x", "max_tokens": 30}),
    );
    stack.wait_for_leases("p", 1);
    let (_, victim) = submit(
        &addr,
        &json!({"model": "double", "prompt": "x", "max_tokens": 2, "priority": "batch"}),
    );
    let (status, newcomer) = submit(
        &addr,
        &json!({"model": "double", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(status, 202);
    let victim_events = task_events(&addr, victim["task_id"].as_str().unwrap());
    assert_eq!(victim_events.len(), 1, "{victim_events:?}");
    assert_eq!(victim_events[0].0, "error");
    assert_eq!(victim_events[0].1["code"], "QUEUE_FULL_DROP_LRU");
    assert_eq!(
        task_events(&addr, newcomer["task_id"].as_str().unwrap())
            .last()
            .unwrap()
            .0,
        "end"
    );
    assert_eq!(
        task_events(&addr, holder["task_id"].as_str().unwrap())
            .last()
            .unwrap()
            .0,
        "end"
    );
}

#[test]
fn pools_are_listed_without_engine_addresses_and_drain_is_forwarded() {
    let stack = stack(1, &[], "");
    let addr = stack.api();
    let pools = http::get(&addr, "/v2/pools", WAIT).unwrap();
    assert_eq!(pools.status, 200);
    let text = pools.text();
    assert!(
        !text.contains(".sock") && !text.contains("endpoint"),
        "{text}"
    );
    let health = http::get(&addr, "/v2/pools/p/health", WAIT).unwrap().json();
    assert_eq!(health["ready"], true);
    assert_eq!(
        http::get(&addr, "/v2/pools/zz/health", WAIT)
            .unwrap()
            .status,
        404
    );
    let caps = http::get(&addr, "/v2/meta/capabilities", WAIT)
        .unwrap()
        .json();
    assert_eq!(caps["api_version"], "2");
    let (_, status, _) = post(&addr, "/v2/pools/zz/drain", &json!({}), &[]);
    assert_eq!(status, 404);
    let (_, status, _) = post(
        &addr,
        "/v2/pools/p/drain",
        &json!({"deadline_ms": 1000}),
        &[],
    );
    assert_eq!(status, 202);
    let deadline = Instant::now() + WAIT;
    while stack.pool_status("p")["state"] != "stopped" {
        assert!(Instant::now() < deadline, "{}", stack.pool_status("p"));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(http::get(&addr, "/readyz", WAIT).unwrap().status, 503);
}

#[test]
fn requests_for_a_drained_model_get_pool_unready_at_once_even_those_already_queued() {
    let stack = stack(1, &["--token-delay-ms", "20"], "");
    let addr = stack.api();
    let holder = std::thread::spawn({
        let addr = addr.clone();
        move || http::read_chat_stream(post(&addr, "/v1/chat/completions", &chat(30, true), &[]).0)
    });
    stack.wait_for_leases("p", 1);
    // Queued behind the holder (the only slot), with a long deadline.
    let queued = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let (mut reader, status, head) =
                post(&addr, "/v1/chat/completions", &chat(5, false), &[]);
            let mut body = String::new();
            reader.read_to_string(&mut body).unwrap();
            (status, head, body)
        }
    });
    let deadline = Instant::now() + WAIT;
    while !http::get(&addr, "/metrics", WAIT)
        .unwrap()
        .text()
        .contains("orchestratord_queue_depth{class=\"interactive\"} 1")
    {
        assert!(Instant::now() < deadline, "the request never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, status, _) = post(
        &addr,
        "/v2/pools/p/drain",
        &json!({"deadline_ms": 10000}),
        &[],
    );
    assert_eq!(status, 202);
    // The running stream finishes on the draining pool; then the pool stops and the queued
    // request is answered at once instead of waiting out its 60 s queue deadline.
    assert_eq!(holder.join().unwrap(), (30, true));
    let (status, head, body) = queued.join().unwrap();
    assert_eq!(status, 503, "{head}{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(body["error"]["code"], "pool_unready", "{body}");
    assert_eq!(stack.pool_status("p")["state"], "stopped");
    // New requests too, without queueing.
    let asked = Instant::now();
    let (_, status, _) = post(&addr, "/v1/chat/completions", &chat(5, false), &[]);
    assert_eq!(status, 503);
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert_eq!(stack.pool_status("p")["active_leases"], 0);
}

#[test]
fn session_budgets_are_enforced_and_a_deleted_session_starts_afresh() {
    let stack = stack(1, &[], "[sessions]\nmax_turns = 2\n");
    let addr = stack.api();
    let turn = || {
        submit(
            &addr,
            &json!({"model": "double", "prompt": "a b", "max_tokens": 3, "session_id": "s1"}),
        )
    };
    for _ in 0..2 {
        let (status, accepted) = turn();
        assert_eq!(status, 202, "{accepted}");
        let events = task_events(&addr, accepted["task_id"].as_str().unwrap());
        assert_eq!(events.last().unwrap().0, "end");
    }
    let (status, refused) = turn();
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["code"], "SESSION_BUDGET_EXCEEDED");
    let session = http::get(&addr, "/v2/sessions/s1", WAIT).unwrap().json();
    assert_eq!(session["turns"], 2);
    assert_eq!(
        session["tokens_used"], 10,
        "2 turns × (2 prompt + 3 generated)"
    );
    let deleted = http::request(&addr, "DELETE", "/v2/sessions/s1", None, WAIT).unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(
        http::get(&addr, "/v2/sessions/s1", WAIT).unwrap().status,
        404
    );
    assert_eq!(turn().0, 202);
}

#[test]
fn a_sidecar_restart_mid_load_keeps_streams_running_and_leaks_no_lease() {
    let mut stack = stack(2, &["--token-delay-ms", "20"], "");
    let addr = stack.api();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (reader, status, _) = post(&addr, "/v1/chat/completions", &chat(80, true), &[]);
                assert_eq!(status, 200);
                http::read_chat_stream(reader)
            })
        })
        .collect();
    stack.wait_for_leases("p", 2);

    stack.sidecar.kill_with(e2e::Signal::SIGKILL);
    // Once orchestratord has noticed (readyz says so), new requests are refused at once; a request
    // admitted in the instant before it noticed would wait in the queue instead, by design.
    let deadline = Instant::now() + WAIT;
    while http::get(&addr, "/readyz", WAIT).unwrap().status != 503 {
        assert!(
            Instant::now() < deadline,
            "orchestratord never noticed the sidecar was gone"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    loop {
        let (mut reader, status, head) = post(&addr, "/v1/chat/completions", &chat(1, false), &[]);
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        if status == 503 {
            assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
            assert!(body.contains("pool_unavailable"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never refused while the sidecar was down: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let config = stack.path().join("config.toml");
    let dir = stack.path().to_owned();
    stack.sidecar.restart(&dir, &config);
    for stream in streams {
        let (chunks, done) = stream.join().unwrap();
        assert!(done, "a running stream broke off");
        assert_eq!(chunks, 80);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, status, _) = post(&addr, "/v1/chat/completions", &chat(1, false), &[]);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests never succeeded again ({status})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = stack.pool_status("p");
    assert_eq!(status["active_leases"], 0, "a lease leaked: {status}");
    assert_eq!(
        status["restarts"], 0,
        "the engine was adopted, not restarted"
    );
}

#[test]
fn a_client_that_leaves_while_queued_is_never_served_and_counters_agree() {
    let stack = stack(1, &["--token-delay-ms", "20"], "");
    let addr = stack.api();
    let holder = std::thread::spawn({
        let addr = addr.clone();
        move || http::read_chat_stream(post(&addr, "/v1/chat/completions", &chat(30, true), &[]).0)
    });
    stack.wait_for_leases("p", 1);
    // Queued behind the holder, then gone.
    let queued = send_chat(&addr, &chat(5, false).to_string());
    let metrics = |name: &str| -> String {
        http::get(&addr, "/metrics", WAIT)
            .unwrap()
            .text()
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    let deadline = Instant::now() + WAIT;
    while !metrics("orchestratord_queue_depth{class=\"interactive\"}").ends_with(" 1") {
        assert!(Instant::now() < deadline, "the request never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(queued);
    assert!(holder.join().unwrap().1);
    let engine = stack.endpoint("p");
    // A check that something does not happen: nothing to poll for, so give it time to.
    std::thread::sleep(Duration::from_millis(300));
    let stats = http::get(&engine, "/control/stats", WAIT).unwrap().json();
    assert_eq!(
        stats["completed"], 1,
        "the departed client's request reached the engine: {stats}"
    );
    assert_eq!(stack.pool_status("p")["active_leases"], 0);
    assert!(metrics("orchestratord_queue_depth{class=\"interactive\"}").ends_with(" 0"));
}

#[test]
fn sigterm_lets_running_streams_finish_then_exits_cleanly() {
    let mut stack = stack(1, &["--token-delay-ms", "20"], "");
    let addr = stack.api();
    let (reader, status, _) = post(&addr, "/v1/chat/completions", &chat(40, true), &[]);
    assert_eq!(status, 200);
    let stream = std::thread::spawn(move || http::read_chat_stream(reader));
    stack.wait_for_leases("p", 1);
    stack.orchestrator().kill_with(e2e::Signal::SIGTERM);
    assert_eq!(
        stream.join().unwrap(),
        (40, true),
        "the running stream was cut off"
    );
    let status = stack
        .orchestrator_mut()
        .wait_exit(WAIT)
        .expect("orchestratord did not exit");
    assert_eq!(status.code(), Some(0));
    let deadline = Instant::now() + WAIT;
    while stack.pool_status("p")["active_leases"] != 0 {
        assert!(Instant::now() < deadline, "a lease outlived orchestratord");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_engine_dying_mid_stream_ends_the_stream_with_one_worker_reset_error() {
    let stack = stack(1, &["--crash-after-tokens", "3", "--exit-code", "9"], "");
    let (mut reader, status, _) = post(&stack.api(), "/v1/chat/completions", &chat(20, true), &[]);
    assert_eq!(status, 200);
    let mut payloads = Vec::new();
    while let Some(data) = http::next_sse_data(&mut reader) {
        payloads.push(data);
    }
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "worker_reset", "{payloads:?}");
    assert!(
        !payloads.iter().any(|p| p == "[DONE]"),
        "no [DONE] after an error"
    );
    assert!(
        !last.to_string().contains(".sock"),
        "no engine detail reaches clients: {last}"
    );
    let deadline = Instant::now() + WAIT;
    while stack.pool_status("p")["active_leases"] != 0 {
        assert!(Instant::now() < deadline, "the lease was not returned");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pools `a` and `b` of model `double`, one slot each; an idle request goes to `a` (ties go to
/// the lowest id).
fn two_pools(a_flags: &[&str]) -> Stack {
    Stack::builder()
        .pool(&double_pool("a", "double", 1, a_flags))
        .pool(&double_pool("b", "double", 1, &[]))
        .start()
}

/// Holds generation on pool `pool`'s engine double: requests reach it and get no token.
fn hold_engine(stack: &Stack, pool: &str) {
    let reply = http::request(&stack.endpoint(pool), "POST", "/control/hold", None, WAIT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Waits until `pool`'s engine runs one request (held before its first token), then SIGKILLs it.
fn kill_engine_once_it_holds_a_request(stack: &Stack, pool: &str) {
    let engine = stack.endpoint(pool);
    stack.wait_for("the request to reach the held engine", || {
        http::get(&engine, "/control/stats", WAIT).unwrap().json()["active"] == 1
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stack.engine_pid(pool)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// The sum of `orchestratord_engine_retries_total` over its reasons.
fn engine_retries(stack: &Stack) -> f64 {
    let text = http::get(&stack.api(), "/metrics", WAIT).unwrap().text();
    text.lines()
        .filter(|line| line.starts_with("orchestratord_engine_retries_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_stream_whose_engine_dies_before_its_first_token_is_answered_by_the_other_pool_through_the_sdk()
{
    let stack = two_pools(&[]);
    hold_engine(&stack, "a");
    let sdk = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
stream = client.chat.completions.create(
    model="double", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
"#;
    let api = format!("http://{}/v1", stack.api());
    let client = std::thread::spawn(move || {
        std::process::Command::new(e2e::real_engine::python())
            .args(["-c", sdk, &api])
            .output()
            .unwrap()
    });
    kill_engine_once_it_holds_a_request(&stack, "a");
    let output = client.join().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK saw a failure: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stack.orchestrator().stderr()
    );
    assert_eq!(stdout.split_whitespace().count(), 4, "{stdout}");
    let b = http::get(&stack.endpoint("b"), "/control/stats", WAIT)
        .unwrap()
        .json();
    assert_eq!(b["completed"], 1, "pool b answered it: {b}");
    assert_eq!(engine_retries(&stack), 1.0);
    stack.wait_for_leases("b", 0);
}

#[test]
fn a_whole_answer_whose_engine_dies_before_answering_comes_from_the_other_pool_and_says_so() {
    let stack = two_pools(&[]);
    hold_engine(&stack, "a");
    let client = std::thread::spawn({
        let api = stack.api();
        move || http::post_json(&api, "/v1/chat/completions", &chat(3, false), WAIT).unwrap()
    });
    kill_engine_once_it_holds_a_request(&stack, "a");
    let reply = client.join().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-engine-retries"), Some("1"));
    assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
}

#[test]
fn a_stream_whose_engine_dies_after_its_first_token_ends_with_one_error_and_is_not_retried() {
    let stack = two_pools(&["--crash-after-tokens", "2", "--exit-code", "9"]);
    let (mut reader, status, head) =
        post(&stack.api(), "/v1/chat/completions", &chat(20, true), &[]);
    assert_eq!(status, 200);
    assert!(
        !head.to_ascii_lowercase().contains("x-engine-retries"),
        "{head}"
    );
    let mut payloads = Vec::new();
    while let Some(data) = http::next_sse_data(&mut reader) {
        payloads.push(data);
    }
    let (last, relayed) = payloads.split_last().unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["code"], "worker_reset", "{payloads:?}");
    assert_eq!(
        relayed
            .iter()
            .filter(|data| {
                let chunk: Value = serde_json::from_str(data).unwrap();
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|text| !text.is_empty())
            })
            .count(),
        2,
        "the tokens before the crash, then the error: {payloads:?}"
    );
    assert!(!payloads.iter().any(|data| data == "[DONE]"));
    let b = http::get(&stack.endpoint("b"), "/control/stats", WAIT)
        .unwrap()
        .json();
    assert_eq!(b["completed"], 0, "nothing was sent to pool b: {b}");
    assert_eq!(engine_retries(&stack), 0.0);
}

/// Pools `ids` of model `double`, one slot each, and orchestratord configured by `orchestrator`.
fn pools_of_double(ids: &[&str], orchestrator: &str) -> Stack {
    ids.iter()
        .fold(Stack::builder(), |builder, id| {
            builder.pool(&double_pool(id, "double", 1, &[]))
        })
        .orchestrator(orchestrator)
        .start()
}

/// A streamed chat sent on its own thread; its whole reply (the SSE body read to its end) comes
/// through the returned channel.
fn stream_in_background(stack: &Stack) -> std::sync::mpsc::Receiver<http::Reply> {
    let api = stack.api();
    let (sender, reply) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let answer = http::post_json(&api, "/v1/chat/completions", &chat(4, true), WAIT);
        let _ = sender.send(answer.unwrap());
    });
    reply
}

/// The error of a stream that failed before its first token: its only SSE `data:`, an OpenAI
/// error object.
fn stream_error(reply: &http::Reply) -> Value {
    let text = reply.text();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 1, "one error and nothing else: {text}");
    serde_json::from_str::<Value>(data[0]).unwrap()["error"].clone()
}

/// What `pool`'s engine double ran: its `/control/stats`.
fn engine_stats(stack: &Stack, pool: &str) -> Value {
    http::get(&stack.endpoint(pool), "/control/stats", WAIT)
        .unwrap()
        .json()
}

#[test]
fn with_max_retries_0_a_stream_whose_engine_dies_before_its_first_token_gets_a_worker_reset_and_no_other_pool_runs_it()
 {
    let stack = pools_of_double(&["a", "b"], "[admission]\nmax_retries = 0\n");
    hold_engine(&stack, "a");
    let client = stream_in_background(&stack);
    kill_engine_once_it_holds_a_request(&stack, "a");
    let reply = client.recv_timeout(WAIT).unwrap();
    assert_eq!(reply.status, 200, "the stream had begun: {}", reply.text());
    let error = stream_error(&reply);
    assert_eq!(error["code"], "worker_reset", "{error}");
    assert_eq!(error["type"], "server_error", "{error}");
    let b = engine_stats(&stack, "b");
    assert_eq!(b["completed"], 0, "pool b served nothing: {b}");
    assert_eq!(b["active"], 0, "pool b served nothing: {b}");
    assert_eq!(b["tokens"], 0, "pool b served nothing: {b}");
    assert_eq!(engine_retries(&stack), 0.0);
}

#[test]
fn with_max_retries_1_a_request_whose_engines_all_die_before_answering_is_sent_exactly_twice() {
    let pools = ["a", "b", "c"];
    let stack = pools_of_double(&pools, "[admission]\nmax_retries = 1\n");
    for pool in pools {
        hold_engine(&stack, pool);
    }
    // The pool, not yet killed, whose held engine has the request.
    let holding = |killed: &[&str]| {
        pools
            .iter()
            .copied()
            .filter(|pool| !killed.contains(pool))
            .find(|pool| {
                http::get(&stack.endpoint(pool), "/control/stats", WAIT)
                    .is_ok_and(|reply| reply.json()["active"] == 1)
            })
    };
    let client = stream_in_background(&stack);
    let mut killed: Vec<&str> = Vec::new();
    // The first attempt and the one retry each meet a held engine, which is killed.
    for attempt in 1..=2 {
        let mut found = None;
        stack.wait_for(&format!("attempt {attempt} to reach an engine"), || {
            found = holding(&killed);
            found.is_some()
        });
        let pool = found.unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(stack.engine_pid(pool)),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(pool);
    }
    // Now the client gets its error, unless a third attempt reaches the last pool's held engine.
    let mut reply = None;
    stack.wait_for("the client's answer or a third attempt", || {
        if let Some(third) = holding(&killed) {
            panic!("a third attempt reached pool {third}");
        }
        reply = client.try_recv().ok();
        reply.is_some()
    });
    let reply = reply.unwrap();
    let error = stream_error(&reply);
    assert_eq!(error["code"], "worker_reset", "{error}");
    let spared = pools.iter().find(|pool| !killed.contains(pool)).unwrap();
    let third = engine_stats(&stack, spared);
    assert_eq!(third["active"], 0, "no third attempt: {third}");
    assert_eq!(third["completed"], 0, "no third attempt: {third}");
    assert_eq!(engine_retries(&stack), 1.0, "one retry: two attempts");
}

/// Reads a streamed chat to its end: its content tokens, its finish reason, when its first token
/// came, and whether `[DONE]` ended it.
fn read_stream(mut reader: BufReader<http::Stream>) -> (usize, Option<String>, Instant, bool) {
    let mut tokens = 0;
    let mut finish = None;
    let mut first_token = None;
    let mut done = false;
    while let Some(data) = http::next_sse_data(&mut reader) {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty())
        {
            tokens += 1;
            first_token.get_or_insert_with(Instant::now);
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    (tokens, finish, first_token.unwrap(), done)
}

#[test]
fn a_request_queued_far_longer_than_the_head_body_and_stall_timeouts_still_gets_its_whole_answer() {
    // Every limit on a client's connection is short: a request head (and an idle keep-alive
    // wait) 200 ms, a body 200 ms, the stall limit 400 ms (also how long the kernel lets sent
    // bytes go unread). None of them is meant to cut a request waiting for a slot.
    let longest = Duration::from_millis(400);
    let stack = stack(
        1,
        &["--token-delay-ms", "100"],
        "[http]\nheader_timeout_ms = 200\nbody_timeout_ms = 200\n\
         [streaming]\ndecode_stall_ms = 400\nkeepalive_ms = 100\n",
    );
    let addr = stack.api();
    // The only slot is busy for about 2 s: 20 tokens 100 ms apart, each within the stall limit.
    let (blocker, status, head) = post(&addr, "/v1/chat/completions", &chat(20, true), &[]);
    assert_eq!(status, 200, "{head}");
    let blocker = std::thread::spawn(move || read_stream(blocker));
    let sent = Instant::now();
    // A stream (it gets keep-alive comments while it waits) and a whole answer (its connection
    // carries nothing at all while it waits) queue behind it.
    let streamed = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let (reader, status, head) = post(&addr, "/v1/chat/completions", &chat(6, true), &[]);
            assert_eq!(status, 200, "{head}");
            read_stream(reader)
        }
    });
    let whole = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let reply =
                http::post_json(&addr, "/v1/chat/completions", &chat(5, false), WAIT).unwrap();
            (reply, Instant::now())
        }
    });
    stack.wait_for("both to queue", || {
        http::get(&addr, "/metrics", WAIT)
            .unwrap()
            .text()
            .contains("orchestratord_queue_depth{class=\"interactive\"} 2")
    });

    let (tokens, finish, _, done) = blocker.join().unwrap();
    assert_eq!(
        (tokens, finish.as_deref(), done),
        (20, Some("length"), true)
    );
    let (tokens, finish, first_token, done) = streamed.join().unwrap();
    assert_eq!((tokens, finish.as_deref(), done), (6, Some("length"), true));
    let waited = first_token.duration_since(sent);
    assert!(
        waited > longest * 2,
        "the stream waited {waited:?}, not well past every timeout"
    );
    let (reply, answered) = whole.join().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["usage"]["completion_tokens"], 5);
    let waited = answered.duration_since(sent);
    assert!(
        waited > longest * 2,
        "the whole answer waited {waited:?}, not well past every timeout"
    );
    assert_eq!(stack.metric("orchestratord_in_flight"), 0.0);
}

#[test]
fn a_stalled_engine_is_a_decode_timeout_and_long_waits_get_keep_alives() {
    let stack = stack(
        1,
        &["--token-delay-ms", "400"],
        "[streaming]\ndecode_stall_ms = 150\nkeepalive_ms = 50\n",
    );
    // The second request queues behind the first for a while: keep-alive comments flow.
    let first = std::thread::spawn({
        let addr = stack.api();
        move || {
            let (mut reader, _, _) = post(&addr, "/v1/chat/completions", &chat(3, true), &[]);
            let mut payloads = Vec::new();
            while let Some(data) = http::next_sse_data(&mut reader) {
                payloads.push(data);
            }
            payloads
        }
    });
    let payloads = first.join().unwrap();
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "decode_timeout", "{payloads:?}");

    let stack = stack_with_hold();
    let (mut reader, status, _) = post(&stack.api(), "/v1/chat/completions", &chat(1, true), &[]);
    assert_eq!(status, 200);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut seen = line.clone();
    while !seen.contains(": keep-alive") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
}

/// A stack whose only slot is held by a long stream, with a 50 ms keep-alive interval.
fn stack_with_hold() -> Stack {
    let stack = stack(
        1,
        &["--token-delay-ms", "100"],
        "[streaming]\nkeepalive_ms = 50\n",
    );
    let addr = stack.api();
    std::thread::spawn(move || {
        http::read_chat_stream(post(&addr, "/v1/chat/completions", &chat(30, true), &[]).0)
    });
    stack.wait_for_leases("p", 1);
    stack
}

#[test]
fn a_public_listener_without_api_keys_is_refused_at_start() {
    let run = DaemonBuilder::new(binary("orchestratord"))
        .args(["--listen", "0.0.0.0:0", "--socket", "/tmp/none.sock"])
        .run_to_exit(WAIT);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("without API keys"), "{}", run.stderr);
}

#[test]
fn sighup_rereads_the_api_keys_without_a_restart() {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, "first-key-first-key\n").unwrap();
    let stack = stack(
        1,
        &[],
        &format!("api_keys_file = {:?}\n", key_file.display().to_string()),
    );
    let addr = stack.api();
    let with_key = |key: &str| {
        post(
            &addr,
            "/v1/chat/completions",
            &chat(1, false),
            &[("Authorization", &format!("Bearer {key}"))],
        )
        .1
    };
    assert_eq!(with_key("first-key-first-key"), 200);
    std::fs::write(&key_file, "second-key-second-key\n").unwrap();
    let pid = stack.orchestrator().pid();
    stack.orchestrator().kill_with(e2e::Signal::SIGHUP);
    assert!(
        stack
            .orchestrator()
            .wait_for_stderr("configuration reloaded", WAIT),
        "{}",
        stack.orchestrator().stderr()
    );
    assert_eq!(with_key("first-key-first-key"), 401);
    assert_eq!(with_key("second-key-second-key"), 200);
    assert_eq!(stack.orchestrator().pid(), pid);
}

#[test]
fn only_an_admin_key_drains_reloads_loads_or_unloads_and_native_posts_must_say_json() {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(
        &key_file,
        "# name role key\nalice inference alice-key-0123456789\nops admin ops-key-0123456789abc\nlegacy-key-0123456789\n",
    )
    .unwrap();
    let stack = stack(
        1,
        &[],
        &format!("api_keys_file = {:?}\n", key_file.display().to_string()),
    );
    let addr = stack.api();
    let operate = |action: &str, key: &str, content_type: &str| {
        let auth = format!("Bearer {key}");
        http::request_with_headers(
            &addr,
            "POST",
            &format!("/v2/pools/p/{action}"),
            &[("Authorization", auth.as_str())],
            Some((content_type, b"{\"deadline_ms\": 1000}")),
            WAIT,
        )
        .unwrap()
    };
    let drain = |key: &str, content_type: &str| operate("drain", key, content_type);
    for key in ["alice-key-0123456789", "legacy-key-0123456789"] {
        for action in ["drain", "reload", "load", "unload"] {
            let reply = operate(action, key, "application/json");
            assert_eq!(reply.status, 403, "{action}: {}", reply.text());
            assert_eq!(reply.json()["code"], "FORBIDDEN");
        }
    }
    assert_eq!(
        stack.pool_status("p")["state"],
        "ready",
        "an inference key changed nothing"
    );
    // A cross-site form can only send text/plain: refused before anything else.
    let reply = drain("ops-key-0123456789abc", "text/plain");
    assert_eq!(reply.status, 415, "{}", reply.text());
    assert_eq!(stack.pool_status("p")["state"], "ready");
    // Inference keys still do inference; the admin key drains.
    let (_, status, _) = post(
        &addr,
        "/v1/chat/completions",
        &chat(2, false),
        &[("Authorization", "Bearer alice-key-0123456789")],
    );
    assert_eq!(status, 200);
    let reply = drain("ops-key-0123456789abc", "application/json");
    assert_eq!(reply.status, 202, "{}", reply.text());
}

#[test]
fn a_web_page_cannot_make_a_keyless_loopback_orchestratord_run_inference() {
    let stack = stack(1, &[], "");
    let addr = stack.api();
    let body = chat(2, false).to_string();
    let send = |path: &str, content_type: Option<&str>| {
        let reply = http::post_typed(&addr, path, content_type, body.as_bytes(), WAIT).unwrap();
        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        (reply.status, json, reply.text())
    };
    // What a cross-site form or a "simple" fetch can send without a preflight, and no type at all.
    let simple = [
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ];
    let openai_paths = [
        "/v1/chat/completions",
        "/v1/chat/completions/input_tokens",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/reranking",
        "/v1/responses",
        "/v1/responses/input_tokens",
    ];
    for content_type in simple {
        for path in openai_paths {
            let (status, error, text) = send(path, content_type);
            assert_eq!(status, 415, "{path} {content_type:?}: {text}");
            assert_eq!(error["error"]["type"], "invalid_request_error", "{text}");
            assert_eq!(error["error"]["code"], "unsupported_media_type", "{text}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("Content-Type: application/json"),
                "{message}"
            );
        }
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let (status, error, text) = send(path, content_type);
            assert_eq!(status, 415, "{path} {content_type:?}: {text}");
            assert_eq!(error["type"], "error", "Anthropic's shape: {text}");
            assert_eq!(error["error"]["type"], "invalid_request_error", "{text}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("Content-Type: application/json"),
                "{message}"
            );
        }
    }
    let engine = http::get(&stack.endpoint("p"), "/control/stats", WAIT)
        .unwrap()
        .json();
    assert_eq!(engine["completed"], 0, "the engine ran nothing: {engine}");
    assert_eq!(engine["tokens"], 0, "the engine ran nothing: {engine}");
    // JSON, with parameters or as a +json type, is served.
    for content_type in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/vnd.api+json",
    ] {
        let (status, reply, text) = send("/v1/chat/completions", Some(content_type));
        assert_eq!(status, 200, "{content_type}: {text}");
        assert_eq!(reply["usage"]["completion_tokens"], 2, "{text}");
    }
}

#[test]
fn sessions_are_their_creators_and_client_chosen_ids_cannot_grow_the_store() {
    let keys = temp_dir();
    let key_file = keys.path().join("keys");
    std::fs::write(
        &key_file,
        "alice inference alice-key-0123456789\nmallory inference mallory-key-0123456789\n",
    )
    .unwrap();
    let stack = stack(
        2,
        &[],
        &format!(
            "api_keys_file = {:?}\n[sessions]\nmax_sessions = 50\n",
            key_file.display().to_string()
        ),
    );
    let addr = stack.api();
    let as_key = |key: &str, method: &str, path: &str, body: Option<&Value>| {
        let auth = format!("Bearer {key}");
        let body = body.map(Value::to_string);
        http::request_with_headers(
            &addr,
            method,
            path,
            &[("Authorization", auth.as_str())],
            body.as_deref()
                .map(|text| ("application/json", text.as_bytes())),
            WAIT,
        )
        .unwrap()
    };
    let task = |model: &str, session: &str| json!({"model": model, "prompt": "a b", "max_tokens": 1, "session_id": session});
    let alice = "alice-key-0123456789";
    let mallory = "mallory-key-0123456789";
    let created = as_key(alice, "POST", "/v2/tasks", Some(&task("double", "alices")));
    assert_eq!(created.status, 202, "{}", created.text());
    assert_eq!(
        as_key(alice, "GET", "/v2/sessions/alices", None).status,
        200
    );
    // Another key can neither read, delete nor use it.
    assert_eq!(
        as_key(mallory, "GET", "/v2/sessions/alices", None).status,
        404
    );
    assert_eq!(
        as_key(mallory, "DELETE", "/v2/sessions/alices", None).status,
        404
    );
    let used = as_key(
        mallory,
        "POST",
        "/v2/tasks",
        Some(&task("double", "alices")),
    );
    assert_eq!(used.status, 400, "{}", used.text());
    assert_eq!(
        as_key(alice, "GET", "/v2/sessions/alices", None).status,
        200
    );

    // Refused requests leave no session behind; admitted ones are bounded by max_sessions.
    let sessions = || {
        let metrics = http::get(&addr, "/metrics", WAIT).unwrap().text();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("orchestratord_sessions "))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no orchestratord_sessions: {metrics}"))
    };
    for i in 0..500 {
        let refused = as_key(
            mallory,
            "POST",
            "/v2/tasks",
            Some(&task("nope", &format!("x-{i}"))),
        );
        assert_eq!(refused.status, 404);
    }
    assert_eq!(sessions(), 1, "only alice's");
    for i in 0..120 {
        let accepted = as_key(
            mallory,
            "POST",
            "/v2/tasks",
            Some(&task("double", &format!("y-{i}"))),
        );
        assert_eq!(accepted.status, 202, "{}", accepted.text());
    }
    assert_eq!(sessions(), 50);
}

#[test]
fn a_revoked_lease_ends_its_stream_at_once_with_a_typed_error() {
    let stack = stack(
        1,
        &["--token-delay-ms", "50"],
        "[streaming]\ndecode_stall_ms = 60000\n",
    );
    let addr = stack.api();
    let (mut reader, status, head) = post(&addr, "/v1/chat/completions", &chat(400, true), &[]);
    assert_eq!(status, 200, "{head}");
    for _ in 0..3 {
        assert!(http::next_sse_data(&mut reader).is_some());
    }
    // A frozen engine: its probes fail, pool-managerd marks it unhealthy and revokes the lease.
    // Without acting on that, the stream would wait for the 60 s stall limit.
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(e2e::sidecar::state_dir(stack.path()).join("engines/p.json"))
            .unwrap(),
    )
    .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(record["pid"].as_i64().unwrap()).unwrap());
    nix::sys::signal::kill(pid, e2e::Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let mut last = None;
    while let Some(data) = http::next_sse_data(&mut reader) {
        last = Some(data);
    }
    let ended = frozen.elapsed();
    let _ = nix::sys::signal::kill(pid, e2e::Signal::SIGCONT);
    let last: Value = serde_json::from_str(&last.unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "lease_revoked", "{last}");
    assert!(
        ended < Duration::from_secs(15),
        "the stream ended {ended:?} after the freeze"
    );
    eprintln!("a revoked lease ended its stream {ended:?} after the engine froze");
}

#[test]
fn a_frozen_orchestratord_loses_its_leases_after_the_lease_ttl() {
    let stack = Stack::builder()
        .pool(&double_pool("p", "double", 1, &["--token-delay-ms", "50"]))
        .sidecar_server("lease_ttl_ms = 1000")
        .start();
    let addr = stack.api();
    std::thread::spawn(move || {
        http::read_chat_stream(post(&addr, "/v1/chat/completions", &chat(400, true), &[]).0)
    });
    stack.wait_for_leases("p", 1);
    // Frozen whole, its connection to pool-managerd left open: nothing renews the lease.
    stack.orchestrator().kill_with(e2e::Signal::SIGSTOP);
    let frozen = Instant::now();
    stack.wait_for_leases("p", 0);
    let expired_after = frozen.elapsed();
    stack.orchestrator().kill_with(e2e::Signal::SIGCONT);
    let metrics = http::get(stack.sidecar.ready("debug_http"), "/metrics", WAIT)
        .unwrap()
        .text();
    assert!(
        metrics.contains("pool_managerd_leases_ended_total{reason=\"expired\"} 1"),
        "{metrics}"
    );
    eprintln!("a frozen orchestratord's lease expired {expired_after:?} after the freeze");
}

#[test]
fn a_task_nobody_reads_is_cancelled_after_the_grace_and_frees_its_slot() {
    let stack = stack(
        1,
        &["--token-delay-ms", "50"],
        "[tasks]\nunattended_grace_ms = 500\n",
    );
    let addr = stack.api();
    let (status, accepted) = submit(
        &addr,
        &json!({"model": "double", "prompt": "a b", "max_tokens": 400}),
    );
    assert_eq!(status, 202, "{accepted}");
    let task = accepted["task_id"].as_str().unwrap().to_owned();
    stack.wait_for_leases("p", 1);
    // 400 tokens at 50 ms would take 20 s; nobody reads, so it ends after the 500 ms grace.
    let started = Instant::now();
    stack.wait_for_leases("p", 0);
    let freed = started.elapsed();
    let status = http::get(&addr, &format!("/v2/tasks/{task}"), WAIT)
        .unwrap()
        .json();
    assert_eq!(status["state"], "cancelled", "{status}");
    assert!(freed < Duration::from_secs(5), "slot freed after {freed:?}");
    // A task that is read runs to its end.
    let (_, accepted) = submit(
        &addr,
        &json!({"model": "double", "prompt": "a b", "max_tokens": 30}),
    );
    let events = task_events(&addr, accepted["task_id"].as_str().unwrap());
    assert_eq!(events.last().unwrap().0, "end", "{events:?}");
}

#[test]
fn a_client_that_stops_reading_a_stream_is_cut_off_and_its_slot_comes_back() {
    let stack = stack(
        1,
        &["--ctx", "4000000", "--token-delay-ms", "0"],
        "[streaming]\ndecode_stall_ms = 2000\n",
    );
    // A stream far larger than the sockets' buffers, from a client that never reads it.
    let body = r#"{"model":"double","messages":[{"role":"user","content":"go"}],"max_tokens":2000000,"stream":true}"#;
    let client = send_chat(&stack.api(), body);
    stack.wait_for_leases("p", 1);
    let stopped_reading = Instant::now();
    // A check that something does not happen (the stream is not cut early): give it time to.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        stack.pool_status("p")["active_leases"],
        1,
        "a 2,000,000-token stream is still running a second later"
    );
    // The buffers fill, the client's window stays shut, and after the stall limit the kernel
    // drops the connection (TCP_USER_TIMEOUT): the stream ends and its slot comes back.
    let deadline = stopped_reading + Duration::from_secs(60);
    while stack.pool_status("p")["active_leases"] != 0 {
        assert!(
            Instant::now() < deadline,
            "a client that stopped reading still holds its slot after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the slot came back {:?} after the client stopped reading",
        stopped_reading.elapsed()
    );
    drop(client);
}

#[test]
fn a_burst_of_200_streams_on_a_50_slot_pool_never_overbooks_and_every_stream_is_served() {
    let stack = stack(
        50,
        &["--token-delay-ms", "20"],
        "[admission]\ncapacity = 256\nqueue_deadline_ms = 60000\n",
    );
    let addr = stack.api();
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let (outcomes, most_leases) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let leases = stack.pool_status("p")["active_leases"].as_u64().unwrap();
                most = most.max(leases);
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        });
        let streams: Vec<_> = (0..200)
            .map(|_| {
                scope.spawn(|| {
                    let (reader, status, head) =
                        post(&addr, "/v1/chat/completions", &chat(8, true), &[]);
                    assert_eq!(status, 200, "{head}");
                    http::read_chat_stream(reader)
                })
            })
            .collect();
        let outcomes: Vec<(usize, bool)> = streams
            .into_iter()
            .map(|stream| stream.join().unwrap())
            .collect();
        sampling.store(false, std::sync::atomic::Ordering::SeqCst);
        (outcomes, sampler.join().unwrap())
    });
    assert!(
        outcomes.iter().all(|outcome| *outcome == (8, true)),
        "every stream whole: {outcomes:?}"
    );
    assert!(most_leases <= 50, "{most_leases} leases on 50 slots");
    assert_eq!(most_leases, 50, "the burst filled the pool");
    assert_eq!(
        stack.metric("orchestratord_dispatch_seconds_count"),
        200.0,
        "one Acquire per stream: the mirror less the slots reserved by Acquires in flight never promised a slot twice"
    );
    stack.wait_for_leases("p", 0);
}

/// The engine double writes a stream's finish chunk, usage chunk and `[DONE]` one by one; they
/// reach the client in one write, the lease released and confirmed before it (the finish chunk,
/// which carries no token, waits for the terminator), so a raw client reading as bytes arrive
/// never sees the finish chunk without the terminator. (Before, they went out as they came, and
/// the release's round trip to pool-managerd came between the last two.)
#[test]
fn a_streams_finish_chunk_usage_and_done_reach_the_client_in_one_write() {
    let stack = stack(1, &["--token-delay-ms", "20"], "");
    let body = r#"{"model":"double","messages":[{"role":"user","content":"go"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
    for _ in 0..5 {
        let mut client = send_chat(&stack.api(), body);
        let mut reads = Vec::new();
        let mut buffer = [0u8; 65536];
        loop {
            let read = client.read(&mut buffer).unwrap();
            if read == 0 {
                break;
            }
            reads.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
        }
        let finish = reads
            .iter()
            .position(|read| read.contains(r#""finish_reason":"length""#))
            .unwrap_or_else(|| panic!("no finish chunk in {reads:?}"));
        assert!(
            reads[finish].contains("data: [DONE]") && reads[finish].contains(r#""usage""#),
            "the finish chunk came without the usage chunk and [DONE]: {reads:#?}"
        );
    }
    stack.wait_for_leases("p", 0);
}

/// The engine answers a stream's head at once and its first token later (held, as during a
/// prefill): the client gets the head and the first chunk in one write, not the head alone first.
#[test]
fn a_streams_head_waits_for_its_first_chunk_and_both_reach_the_client_in_one_write() {
    let stack = stack(1, &[], "");
    hold_engine(&stack, "p");
    let body = r#"{"model":"double","messages":[{"role":"user","content":"go"}],"max_tokens":2,"stream":true}"#;
    let mut client = send_chat(&stack.api(), body);
    let engine = stack.endpoint("p");
    stack.wait_for("the request to reach the held engine", || {
        http::get(&engine, "/control/stats", WAIT).unwrap().json()["active"] == 1
    });
    let reader = std::thread::spawn(move || {
        let mut buffer = [0u8; 65536];
        let read = client.read(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..read]).into_owned()
    });
    // A check that something does not happen (the head is not sent alone): give it time to.
    std::thread::sleep(Duration::from_millis(300));
    let reply = http::request(&engine, "POST", "/control/release", None, WAIT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let first_read = reader.join().unwrap();
    assert!(
        first_read.starts_with("HTTP/1.1 200") && first_read.contains("data: {"),
        "the head came without the first chunk: {first_read:?}"
    );
    stack.wait_for_leases("p", 0);
}

/// A stream still queued after the keep-alive interval gets its response head then, alone, and
/// its first keep-alive comment one interval later — the head does not wait for a first frame
/// while the request is queued (which would double the silence a client sees).
#[test]
fn a_queued_streams_head_leaves_after_one_keepalive_interval_not_with_the_first_keepalive() {
    let stack = stack(
        1,
        &["--token-delay-ms", "100"],
        "[streaming]\nkeepalive_ms = 1000\n",
    );
    let addr = stack.api();
    let holder = std::thread::spawn(move || {
        http::read_chat_stream(post(&addr, "/v1/chat/completions", &chat(40, true), &[]).0)
    });
    stack.wait_for_leases("p", 1);
    let body = r#"{"model":"double","messages":[{"role":"user","content":"go"}],"max_tokens":1,"stream":true}"#;
    let mut client = send_chat(&stack.api(), body);
    let mut buffer = [0u8; 65536];
    let read = client.read(&mut buffer).unwrap();
    let first_read = String::from_utf8_lossy(&buffer[..read]).into_owned();
    assert!(
        first_read.starts_with("HTTP/1.1 200") && !first_read.contains(": keep-alive"),
        "the head of a queued stream came with its first keep-alive: {first_read:?}"
    );
    holder.join().unwrap();
    drop(client);
    stack.wait_for_leases("p", 0);
}
