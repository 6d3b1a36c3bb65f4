//! Keys with names, limits and usage, end to end: each of a key's limits (concurrency, requests
//! and tokens per minute, models) refuses that key with its own error while another key is
//! served; usage per key equals what the engine reported; a key file reloaded on SIGHUP applies
//! at once; the one-key-per-line form still loads. pool-managerd supervises engine doubles (fake
//! llama-servers); orchestratord runs for real.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::stack::{Stack, double_pool};
use e2e::{http, temp_dir};
use serde_json::{Value, json};
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

const KEYS: &str = "\
# name  role       key                          limits
conc    inference  sk-conc-0123456789abcdef     concurrency=1
rate    inference  sk-rate-0123456789abcdef     rpm=2
tok     inference  sk-tok-0123456789abcdefgh    tpm=20
pick    inference  sk-pick-0123456789abcdef     models=double
etl     inference  sk-etl-0123456789abcdefgh    class=batch
free    inference  sk-free-0123456789abcdef
ops     admin      sk-ops-0123456789abcdefgh
sk-legacy-0123456789abcdef
";

fn stack(keys: &Path) -> Stack {
    Stack::builder()
        .pool(&double_pool("p", "double", 4, &["--token-delay-ms", "20"]))
        .pool(&double_pool("q", "other", 1, &[]))
        .orchestrator(&format!(
            "api_keys_file = {:?}\n",
            keys.display().to_string()
        ))
        .start()
}

fn chat(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "say something nice"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// A chat request with `key`; the connection after the head, the status and the head.
fn open(addr: &str, key: &str, body: &Value) -> (BufReader<http::Stream>, u16, String) {
    let auth = format!("Bearer {key}");
    let body = body.to_string();
    http::open(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", auth.as_str())],
        Some(("application/json", body.as_bytes())),
        WAIT,
    )
    .unwrap()
}

/// A whole (non-streaming) chat: status, head and JSON body.
fn whole(addr: &str, key: &str, model: &str, max_tokens: u32) -> (u16, String, Value) {
    let (mut reader, status, head) = open(addr, key, &chat(model, max_tokens, false));
    let mut body = String::new();
    std::io::Read::read_to_string(&mut reader, &mut body).unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|_| json!({"raw": body}));
    (status, head, json)
}

/// A stream read to its end: content chunks, the usage chunk, and whether `[DONE]` came.
fn read_stream(mut reader: BufReader<http::Stream>) -> (usize, Option<Value>, bool) {
    let (mut tokens, mut usage) = (0, None);
    while let Some(data) = http::next_sse_data(&mut reader) {
        if data == "[DONE]" {
            return (tokens, usage, true);
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"].clone());
        }
        if chunk["choices"][0]["delta"]["content"].is_string() {
            tokens += 1;
        }
    }
    (tokens, usage, false)
}

/// Asserts a 429 that names `limit` and says when to retry; the Retry-After in seconds.
fn assert_limited(status: u16, head: &str, body: &Value, limit: &str) -> u64 {
    assert_eq!(status, 429, "{head}\n{body}");
    assert_eq!(body["error"]["code"], "key_limit_exceeded", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(limit), "{message} does not name {limit}");
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("retry-after")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Retry-After: {head}"))
}

fn get(addr: &str, key: &str, path: &str) -> http::Reply {
    let auth = format!("Bearer {key}");
    http::request_with_headers(
        addr,
        "GET",
        path,
        &[("Authorization", auth.as_str())],
        None,
        WAIT,
    )
    .unwrap()
}

#[test]
fn each_key_limit_refuses_its_key_with_429_and_retry_after_while_another_key_is_served() {
    let dir = temp_dir();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let stack = stack(&keys);
    let addr = stack.api();

    // Concurrency: one stream at a time.
    let (reader, status, _) = open(&addr, "sk-conc-0123456789abcdef", &chat("double", 30, true));
    assert_eq!(status, 200);
    let running = std::thread::spawn(move || read_stream(reader));
    stack.wait_for_leases("p", 1);
    let (status, head, body) = whole(&addr, "sk-conc-0123456789abcdef", "double", 2);
    assert_limited(status, &head, &body, "1 concurrent requests");
    let (status, _, body) = whole(&addr, "sk-free-0123456789abcdef", "double", 2);
    assert_eq!(status, 200, "{body}");
    assert!(
        running.join().unwrap().2,
        "the running stream did not end with [DONE]"
    );
    let (status, _, body) = whole(&addr, "sk-conc-0123456789abcdef", "double", 2);
    assert_eq!(status, 200, "the finished stream still counts: {body}");

    // Requests per minute.
    for _ in 0..2 {
        let (status, _, body) = whole(&addr, "sk-rate-0123456789abcdef", "double", 1);
        assert_eq!(status, 200, "{body}");
    }
    let (status, head, body) = whole(&addr, "sk-rate-0123456789abcdef", "double", 1);
    let wait = assert_limited(status, &head, &body, "2 requests per minute");
    assert!((20..=60).contains(&wait), "Retry-After {wait}");
    let (status, _, body) = whole(&addr, "sk-free-0123456789abcdef", "double", 1);
    assert_eq!(status, 200, "{body}");

    // Tokens per minute, from the engine's usage: one request spends more than the minute's 20.
    let (reader, status, _) = open(
        &addr,
        "sk-tok-0123456789abcdefgh",
        &chat("double", 25, true),
    );
    assert_eq!(status, 200);
    let (tokens, usage, done) = read_stream(reader);
    assert_eq!((tokens, done), (25, true));
    let usage = usage.expect("a usage chunk");
    let (status, head, body) = whole(&addr, "sk-tok-0123456789abcdefgh", "double", 1);
    let wait = assert_limited(status, &head, &body, "20 tokens per minute");
    assert!(
        wait >= 10,
        "Retry-After {wait} for a budget overspent by at least 5 tokens"
    );
    let (status, _, body) = whole(&addr, "sk-free-0123456789abcdef", "double", 1);
    assert_eq!(status, 200, "{body}");

    // Models.
    let (status, _, body) = whole(&addr, "sk-pick-0123456789abcdef", "other", 1);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
    let (status, _, body) = whole(&addr, "sk-pick-0123456789abcdef", "double", 1);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = whole(&addr, "sk-free-0123456789abcdef", "other", 1);
    assert_eq!(status, 200, "{body}");

    // The one-key-per-line form still loads (no name, no limits, no usage).
    let (status, _, body) = whole(&addr, "sk-legacy-0123456789abcdef", "double", 1);
    assert_eq!(status, 200, "{body}");

    // Usage: only for an admin key; tokens as the engine reported them.
    assert_eq!(
        get(&addr, "sk-free-0123456789abcdef", "/v2/usage").status,
        403
    );
    let reply = get(&addr, "sk-ops-0123456789abcdefgh", "/v2/usage");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let usage_now = reply.json();
    let tok = &usage_now["keys"]["tok"];
    assert_eq!(tok["requests"], 1, "{usage_now}");
    assert_eq!(tok["prompt_tokens"], usage["prompt_tokens"], "{usage_now}");
    assert_eq!(
        tok["completion_tokens"], usage["completion_tokens"],
        "{usage_now}"
    );
    assert_eq!(tok["refusals"]["tpm"], 1, "{usage_now}");
    assert_eq!(usage_now["keys"]["conc"]["refusals"]["concurrency"], 1);
    assert_eq!(usage_now["keys"]["rate"]["refusals"]["rpm"], 1);
    assert_eq!(usage_now["keys"]["rate"]["requests"], 2);
    assert_eq!(usage_now["keys"]["pick"]["refusals"]["models"], 1);
    assert_eq!(usage_now["keys"]["free"]["requests"], 4);
    assert!(
        usage_now["keys"]
            .get("sk-legacy-0123456789abcdef")
            .is_none()
    );
    let text = usage_now.to_string();
    assert!(!text.contains("sk-"), "a key's secret in the usage: {text}");

    // Per-key series: on the admin view only, never the secret.
    let open_metrics = http::get(&addr, "/metrics", WAIT).unwrap().text();
    assert!(
        !open_metrics.contains("orchestratord_key_"),
        "{open_metrics}"
    );
    let admin = get(&addr, "sk-ops-0123456789abcdefgh", "/v2/admin/metrics");
    assert_eq!(admin.status, 200);
    let admin = admin.text();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(
        admin.contains(&format!(
            "orchestratord_key_completion_tokens_total{{key=\"tok\"}} {completion}"
        )),
        "{admin}"
    );
    assert!(
        admin.contains("orchestratord_key_refusals_total{key=\"rate\",limit=\"rpm\"} 1"),
        "{admin}"
    );
    assert!(!admin.contains("sk-"), "a secret in the metrics");
    assert_eq!(
        get(&addr, "sk-free-0123456789abcdef", "/v2/admin/metrics").status,
        403
    );
}

#[test]
fn a_key_file_reloaded_on_sighup_applies_at_once_and_keeps_usage() {
    let dir = temp_dir();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let stack = stack(&keys);
    let addr = stack.api();
    let (status, _, _) = whole(&addr, "sk-rate-0123456789abcdef", "double", 1);
    assert_eq!(status, 200);

    let (reader, status, _) = open(&addr, "sk-conc-0123456789abcdef", &chat("double", 40, true));
    assert_eq!(status, 200);
    let running = std::thread::spawn(move || read_stream(reader));
    stack.wait_for_leases("p", 1);
    let (status, head, body) = whole(&addr, "sk-conc-0123456789abcdef", "double", 1);
    assert_limited(status, &head, &body, "1 concurrent requests");

    let reloaded = KEYS
        .replace("concurrency=1", "concurrency=2")
        .replace("free    inference  sk-free-0123456789abcdef\n", "")
        + "new inference sk-new-0123456789abcdefgh rpm=1\n";
    std::fs::write(&keys, reloaded).unwrap();
    stack.orchestrator().kill_with(e2e::Signal::SIGHUP);
    assert!(
        stack
            .orchestrator()
            .wait_for_stderr("configuration reloaded", WAIT),
        "no reload: {}",
        stack.orchestrator().stderr()
    );

    let (status, _, body) = whole(&addr, "sk-conc-0123456789abcdef", "double", 1);
    assert_eq!(status, 200, "the raised concurrency did not apply: {body}");
    assert!(
        running.join().unwrap().2,
        "the running stream did not end with [DONE]"
    );
    let (status, _, _) = whole(&addr, "sk-new-0123456789abcdefgh", "double", 1);
    assert_eq!(status, 200, "the added key was refused");
    let (status, head, body) = whole(&addr, "sk-new-0123456789abcdefgh", "double", 1);
    assert_limited(status, &head, &body, "1 requests per minute");
    let (status, _, _) = whole(&addr, "sk-free-0123456789abcdef", "double", 1);
    assert_eq!(status, 401, "the removed key still works");
    let usage = get(&addr, "sk-ops-0123456789abcdefgh", "/v2/usage").json();
    assert_eq!(
        usage["keys"]["rate"]["requests"], 1,
        "usage lost in the reload: {usage}"
    );
    assert_eq!(usage["keys"]["conc"]["requests"], 2, "{usage}");
    assert_eq!(usage["keys"]["new"]["requests"], 1, "{usage}");
}

#[test]
fn a_batch_keys_requests_queue_as_batch() {
    let dir = temp_dir();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let stack = Stack::builder()
        .pool(&double_pool("p", "double", 1, &[]))
        .orchestrator(&format!(
            "api_keys_file = {:?}\n",
            keys.display().to_string()
        ))
        .start();
    let addr = stack.api();
    let engine = stack.endpoint("p");
    let hold = http::request(&engine, "POST", "/control/hold", None, WAIT).unwrap();
    assert_eq!(hold.status, 200);
    let first = {
        let addr = addr.clone();
        std::thread::spawn(move || whole(&addr, "sk-free-0123456789abcdef", "double", 1).0)
    };
    stack.wait_for_leases("p", 1);
    let queued = {
        let addr = addr.clone();
        std::thread::spawn(move || whole(&addr, "sk-etl-0123456789abcdefgh", "double", 1).0)
    };
    let depth = |class: &str| {
        let metrics = http::get(&addr, "/metrics", WAIT).unwrap().text();
        e2e::stack::prometheus_value(
            &metrics,
            &format!("orchestratord_queue_depth{{class=\"{class}\"}}"),
        )
    };
    stack.wait_for("the batch key's request in the batch queue", || {
        depth("batch") == 1.0
    });
    assert_eq!(depth("interactive"), 0.0);
    let release = http::request(&engine, "POST", "/control/release", None, WAIT).unwrap();
    assert_eq!(release.status, 200);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(queued.join().unwrap(), 200);
}
