//! orchestratord under load in front of a real llama.cpp `llama-server` with far fewer slots than
//! streams, so requests wait in orchestratord's queue and go to the engine the instant a slot
//! frees. llama-server closes the connection after every streamed response although it advertises
//! `Keep-Alive`: a stream sent on a pooled connection met that close (most were sent again; about
//! one run in 15 had one that got nothing for the 30 s stall limit), so orchestratord now opens a
//! new connection for every llama-server stream. Every stream
//! must end in `[DONE]` with all its tokens: none may be refused (the queue is sized for the load)
//! and none may break (HTTP 200, then an error event). The model is a generated tiny GGUF (no
//! model can be downloaded here), hence `tiny_model` in the names; engine and daemons are real.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code; a panic is the failure report"
)]

use e2e::http;
use e2e::real_engine::{API_KEY, llama_pool, make_model, stack_with};
use e2e::temp_dir;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Engine slots: the load is 4x and 16x this.
const SLOTS: u32 = 16;
const MAX_TOKENS: u32 = 8;
/// Per read; a stream that waits in the queue gets keep-alive comments meanwhile.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How the streams of one round ended.
#[derive(Debug, Default)]
struct Outcome {
    /// `[DONE]` after exactly `MAX_TOKENS` content chunks and a `length` finish.
    complete: u32,
    /// Not 200.
    refused: Vec<String>,
    /// 200, then an error event, a short stream or no `[DONE]`.
    broken: Vec<String>,
}

/// One streamed chat through orchestratord at `api`, read to its end.
fn stream_once(api: &str, model: &str, outcome: &Mutex<Outcome>) {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the river."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let auth = format!("Bearer {API_KEY}");
    let opened = http::open(
        api,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &auth)],
        Some(("application/json", body.as_bytes())),
        READ_TIMEOUT,
    );
    let started = std::time::Instant::now();
    let (mut reader, status, head) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let failed = format!("after {:?}: {error}", started.elapsed());
            outcome.lock().unwrap().refused.push(failed);
            return;
        }
    };
    if status != 200 {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        outcome
            .lock()
            .unwrap()
            .refused
            .push(format!("{head}{body}"));
        return;
    }
    let mut content_chunks = 0;
    let mut finish_reason = None;
    let mut trouble = None;
    let mut done = false;
    while let Some(data) = http::next_sse_data(&mut reader) {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if chunk.get("error").is_some() || chunk.is_null() {
            trouble = Some(data);
            break;
        }
        if let Some(choice) = chunk["choices"].get(0) {
            if choice["delta"]["content"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
            {
                content_chunks += 1;
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish_reason = Some(reason.to_owned());
            }
        }
    }
    let mut outcome = outcome.lock().unwrap();
    if done && content_chunks == MAX_TOKENS && finish_reason.as_deref() == Some("length") {
        outcome.complete += 1;
    } else {
        outcome.broken.push(format!(
            "{} content chunks, finish {finish_reason:?}, [DONE] {done}, {}",
            content_chunks,
            trouble.unwrap_or_default()
        ));
    }
}

/// `clients` threads, each sending `per_client` streams one after the other.
fn load(api: &str, model: &str, clients: u32, per_client: u32) -> Outcome {
    let outcome = Mutex::new(Outcome::default());
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                for _ in 0..per_client {
                    stream_once(api, model, &outcome);
                }
            });
        }
    });
    outcome.into_inner().unwrap()
}

/// The last `lines` lines of the pool's engine log (pool-managerd keeps it in its state
/// directory).
fn engine_log_tail(stack: &e2e::stack::Stack, pool: &str, lines: usize) -> String {
    let path = stack.path().join("state/logs").join(format!("{pool}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| format!("{path:?}: {error}"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn tiny_model_64_and_256_concurrent_streams_on_16_real_llama_server_slots_never_break() {
    let dir = temp_dir();
    let model = make_model(&dir.path().join("tiny.gguf"), &[]);
    let pools = [
        llama_pool("tcp", "tiny-tcp", &model, "tcp", SLOTS, 256),
        llama_pool("unix", "tiny-unix", &model, "unix", SLOTS, 256),
    ]
    .concat();
    // Nothing is refused: room for every stream in the queue, and time for all of them.
    let stack = stack_with(
        dir,
        &pools,
        "[admission]\ncapacity = 1024\nqueue_deadline_ms = 600000\n",
    );
    let api = stack.api();
    let rounds = [(64, 18), (256, 5)];
    for (clients, per_client) in rounds {
        for model in ["tiny-tcp", "tiny-unix"] {
            let started = Instant::now();
            let outcome = load(&api, model, clients, per_client);
            eprintln!(
                "{model}: {clients} concurrent streams x {per_client}: {} complete, {} refused, \
                 {} broken in {:?}",
                outcome.complete,
                outcome.refused.len(),
                outcome.broken.len(),
                started.elapsed()
            );
            // On a failure, say what the engine saw.
            let pool = model.trim_start_matches("tiny-");
            assert!(
                outcome.refused.is_empty() && outcome.broken.is_empty(),
                "{model} at {clients} concurrent: refused {:?}\nbroken {:?}\norchestratord: {}\n\
                 llama-server's slots: {}\nits log's end:\n{}",
                outcome.refused.iter().take(3).collect::<Vec<_>>(),
                outcome.broken.iter().take(3).collect::<Vec<_>>(),
                stack.orchestrator().stderr(),
                stack.engine_get(pool, "/slots"),
                engine_log_tail(&stack, pool, 80),
            );
            assert_eq!(outcome.complete, clients * per_client);
        }
    }
    // Every stream's generation ran exactly once: a request sent again on a fresh connection was
    // one the engine never started.
    let streams: u32 = rounds.iter().map(|(clients, each)| clients * each).sum();
    for pool in ["tcp", "unix"] {
        assert_eq!(
            stack.engine_tokens_predicted(pool),
            u64::from(streams * MAX_TOKENS),
            "{pool}: tokens generated by llama-server"
        );
        stack.wait_for_leases(pool, 0);
        assert_eq!(stack.busy_slots(pool), 0, "{pool}: a slot still busy");
    }
}
