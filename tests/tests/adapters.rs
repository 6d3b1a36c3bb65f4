//! orchestratord's engine adapters against the real test engine double, over TCP and Unix sockets:
//! exact tokens and finish reasons for both stream dialects, usage, and every failure the adapters
//! type (worker reset, decode timeout, engine rejection, cancellation), plus the connection rules: a
//! dropped stream closes its engine connection; a stale pooled connection, or one the engine closed
//! while idle, is retried unseen; a request the engine may have worked on is never sent twice;
//! streams to llama-server never take a pooled connection (scripted engines on loopback play the
//! closes).
//!
//! Needs `cargo build --workspace --bins` first (the engine double is another binary). Waits poll the
//! engine's `/control/stats`; there are no fixed sleeps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::Daemon;
use orchestratord::adapters::{
    AdapterError, EngineClients, EngineEvent, EngineRequest, EngineRoute, EngineStream,
    WholeRequest,
};
use pool_ipc::registry::{Endpoint, EngineKind};
use serde_json::{Value, json};

/// Generous: only the stall and cancellation tests rely on a limit firing.
const STALL: Duration = Duration::from_secs(10);

/// The double's filler words: token `i` is `" " + WORDS[i]`.
const WORDS: &[&str] = &["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy"];

fn endpoint(listen: &str) -> Endpoint {
    if listen.starts_with('/') {
        Endpoint::Unix {
            path: listen.to_owned(),
        }
    } else {
        Endpoint::Http {
            authority: listen.to_owned(),
        }
    }
}

fn request(engine: &Daemon, route: EngineRoute, body: &Value) -> EngineRequest {
    EngineRequest::new(
        endpoint(engine.ready("listen")),
        EngineKind::Llamacpp,
        route,
        Bytes::from(body.to_string()),
    )
}

fn words(n: usize) -> Vec<String> {
    WORDS[..n].iter().map(|word| format!(" {word}")).collect()
}

/// One `Chunk` as the tests look at it.
#[derive(Debug)]
struct Chunk {
    raw: Value,
    text: Option<String>,
    tokens: u32,
}

/// Reads a stream to its end; panics on an error or a stream without `Done`.
async fn collect(stream: &mut EngineStream) -> (Vec<Chunk>, EngineEvent) {
    let mut chunks = Vec::new();
    loop {
        match stream.next().await {
            Some(Ok(EngineEvent::Chunk {
                frame,
                data,
                token_text,
                tokens,
                ..
            })) => chunks.push(Chunk {
                raw: {
                    let expected = format!("data: {}\n\n", String::from_utf8_lossy(&data));
                    assert_eq!(
                        &frame[..],
                        expected.as_bytes(),
                        "a frame is its event as sent"
                    );
                    serde_json::from_slice(&data)
                        .unwrap_or_else(|e| panic!("a chunk's data bytes are its JSON: {e}"))
                },
                text: token_text,
                tokens,
            }),
            Some(Ok(done @ EngineEvent::Done { .. })) => {
                assert!(stream.next().await.is_none(), "nothing may follow Done");
                return (chunks, done);
            }
            Some(Err(error)) => panic!("stream failed after {} chunks: {error:?}", chunks.len()),
            None => panic!("stream ended without Done after {} chunks", chunks.len()),
        }
    }
}

fn token_texts(chunks: &[Chunk]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|chunk| chunk.text.clone())
        .collect()
}

fn token_count(chunks: &[Chunk]) -> u32 {
    chunks.iter().map(|chunk| chunk.tokens).sum()
}

/// The engine's `/control/stats`, polled until `done` holds (5 s at most).
async fn wait_for_stats(engine: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let addr = engine.ready("listen").to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let probe = addr.clone();
        let stats = tokio::task::spawn_blocking(move || {
            e2e::http::get(&probe, "/control/stats", Duration::from_secs(2))
        })
        .await
        .unwrap_or_else(|e| panic!("the stats probe panicked: {e}"))
        .unwrap_or_else(|e| panic!("GET /control/stats: {e}"))
        .json();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "{what}: stats stayed {stats}");
        // Polling interval; also lets the client's connection tasks run in between.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Both transports the adapters speak: a TCP port and a Unix socket in `dir`.
fn listen_addresses(dir: &tempfile::TempDir) -> [String; 2] {
    [
        "127.0.0.1:0".to_owned(),
        dir.path().join("engine.sock").display().to_string(),
    ]
}

#[tokio::test]
async fn native_completion_streams_exact_tokens_then_a_length_finish_over_tcp_and_unix() {
    let dir = e2e::temp_dir();
    for listen in listen_addresses(&dir) {
        let engine = e2e::start_engine_double(&["--listen", &listen]);
        let clients = EngineClients::default();
        let body = json!({"prompt": "say five words", "n_predict": 5, "stream": true});
        let mut stream = clients
            .stream(
                request(&engine, EngineRoute::Completion, &body),
                STALL,
                "c-native",
            )
            .await
            .unwrap_or_else(|e| panic!("{listen}: {e:?}"));
        let (chunks, done) = collect(&mut stream).await;

        assert_eq!(token_texts(&chunks), words(5), "{listen}");
        assert!(chunks.iter().all(|chunk| chunk.tokens == 1), "{chunks:?}");
        assert_eq!(chunks[0].raw["content"], " the");
        let EngineEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            terminator,
            ..
        } = done
        else {
            unreachable!()
        };
        assert_eq!(finish_reason, "length");
        assert_eq!((prompt_tokens, completion_tokens), (Some(3), Some(5)));
        let final_event: Value = serde_json::from_slice(
            terminator
                .strip_prefix(b"data: ")
                .and_then(|rest| rest.strip_suffix(b"\n\n"))
                .expect("the stop event, framed as sent"),
        )
        .expect("the stop event is JSON");
        assert_eq!(final_event["stop"], true);
        assert_eq!(final_event["tokens_predicted"], 5);
    }
}

#[tokio::test]
async fn chat_completion_streams_exact_tokens_then_a_length_finish_over_tcp_and_unix() {
    let dir = e2e::temp_dir();
    for listen in listen_addresses(&dir) {
        let engine = e2e::start_engine_double(&["--listen", &listen]);
        let clients = EngineClients::default();
        let body = json!({
            "model": "test-double",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 4,
            "stream": true,
        });
        let mut stream = clients
            .stream(
                request(&engine, EngineRoute::ChatCompletions, &body),
                STALL,
                "c-chat",
            )
            .await
            .unwrap_or_else(|e| panic!("{listen}: {e:?}"));
        let (chunks, done) = collect(&mut stream).await;

        assert_eq!(token_texts(&chunks), words(4), "{listen}");
        assert_eq!(token_count(&chunks), 4);
        // Four token chunks, then the finish chunk (no token), relayed as it came.
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[4].tokens, 0);
        assert_eq!(chunks[4].raw["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[0].raw["object"], "chat.completion.chunk");
        assert_eq!(
            done,
            EngineEvent::Done {
                finish_reason: "length".to_owned(),
                prompt_tokens: None,
                completion_tokens: None,
                usage_frame: None,
                terminator: Bytes::from_static(b"data: [DONE]\n\n"),
            }
        );
    }
}

#[tokio::test]
async fn chat_usage_is_reported_on_done_and_its_chunk_is_not_relayed_as_a_token_chunk() {
    let dir = e2e::temp_dir();
    let [_, socket] = listen_addresses(&dir);
    let engine = e2e::start_engine_double(&["--listen", &socket]);
    let clients = EngineClients::default();
    let body = json!({
        "model": "test-double",
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": 6,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut stream = clients
        .stream(
            request(&engine, EngineRoute::ChatCompletions, &body),
            STALL,
            "c-usage",
        )
        .await
        .unwrap();
    let (chunks, done) = collect(&mut stream).await;

    assert_eq!(token_count(&chunks), 6);
    assert!(
        chunks.iter().all(|chunk| chunk.raw["choices"]
            .as_array()
            .is_some_and(|c| !c.is_empty())),
        "the usage chunk must not be yielded as a Chunk: {chunks:?}"
    );
    let EngineEvent::Done {
        finish_reason,
        prompt_tokens,
        completion_tokens,
        usage_frame,
        ..
    } = done
    else {
        unreachable!()
    };
    assert_eq!(finish_reason, "length");
    assert_eq!((prompt_tokens, completion_tokens), (Some(3), Some(6)));
    let usage_frame = usage_frame.expect("the usage chunk");
    let usage: Value = serde_json::from_slice(
        usage_frame
            .strip_prefix(b"data: ")
            .and_then(|rest| rest.strip_suffix(b"\n\n"))
            .expect("the usage chunk, framed as sent"),
    )
    .unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 9);
}

#[tokio::test]
async fn text_completion_from_an_openai_engine_streams_exact_tokens_over_tcp() {
    let engine = e2e::start_engine_double::<&str>(&[]);
    let clients = EngineClients::default();
    let mut engine_request = request(
        &engine,
        EngineRoute::Completions,
        &json!({"model": "m", "prompt": "a b", "max_tokens": 3, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    engine_request.kind = EngineKind::Openai;
    let mut stream = clients
        .stream(engine_request, STALL, "c-text")
        .await
        .unwrap();
    let (chunks, done) = collect(&mut stream).await;

    assert_eq!(token_texts(&chunks), words(3));
    assert_eq!(token_count(&chunks), 3);
    assert_eq!(chunks[0].raw["object"], "text_completion");
    let EngineEvent::Done {
        finish_reason,
        prompt_tokens,
        completion_tokens,
        ..
    } = done
    else {
        unreachable!()
    };
    assert_eq!(finish_reason, "length");
    assert_eq!((prompt_tokens, completion_tokens), (Some(2), Some(3)));
}

#[tokio::test]
async fn a_native_route_to_an_openai_engine_is_refused_without_sending_anything() {
    let clients = EngineClients::default();
    let mut engine_request = EngineRequest::new(
        endpoint("/nonexistent/engine.sock"),
        EngineKind::Openai,
        EngineRoute::Completion,
        Bytes::from_static(b"{}"),
    );
    engine_request.kind = EngineKind::Openai;
    let error = clients
        .stream(engine_request, STALL, "c-route")
        .await
        .expect_err("refused");
    assert_eq!(
        error,
        AdapterError::UnsupportedRoute {
            kind: EngineKind::Openai,
            route: EngineRoute::Completion,
        }
    );
    assert_eq!(clients.unsent_retries(), 0);
}

#[tokio::test]
async fn an_engine_that_crashes_mid_stream_is_a_worker_reset_after_the_tokens_it_sent() {
    let mut engine = e2e::start_engine_double(&["--crash-after-tokens", "3", "--exit-code", "9"]);
    let clients = EngineClients::default();
    let body = json!({"prompt": "go", "n_predict": 10, "stream": true});
    let mut stream = clients
        .stream(
            request(&engine, EngineRoute::Completion, &body),
            STALL,
            "c-crash",
        )
        .await
        .unwrap();
    let mut texts = Vec::new();
    let error = loop {
        match stream.next().await {
            Some(Ok(EngineEvent::Chunk { token_text, .. })) => texts.extend(token_text),
            Some(Ok(done)) => panic!("the stream finished despite the crash: {done:?}"),
            Some(Err(error)) => break error,
            None => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(texts, words(3));
    assert!(
        matches!(error, AdapterError::WorkerReset { .. }),
        "{error:?}"
    );
    assert!(stream.next().await.is_none(), "nothing after an error");
    let status = engine
        .wait_exit(Duration::from_secs(5))
        .expect("the engine exits");
    assert_eq!(status.code(), Some(9));
}

#[tokio::test]
async fn an_engine_silent_past_the_stall_limit_is_a_decode_timeout() {
    let engine = e2e::start_engine_double(&["--token-delay-ms", "500"]);
    let clients = EngineClients::default();
    let stall = Duration::from_millis(100);
    let body = json!({"prompt": "go", "n_predict": 5, "stream": true});
    let mut stream = clients
        .stream(
            request(&engine, EngineRoute::Completion, &body),
            stall,
            "c-stall",
        )
        .await
        .unwrap();
    // The first token comes at once; the second only after 500 ms.
    assert!(matches!(
        stream.next().await,
        Some(Ok(EngineEvent::Chunk { .. }))
    ));
    let waited = Instant::now();
    let outcome = stream.next().await;
    let waited = waited.elapsed();
    assert_eq!(
        outcome,
        Some(Err(AdapterError::DecodeTimeout { after: stall }))
    );
    assert!(
        waited >= stall && waited < Duration::from_millis(450),
        "{waited:?}"
    );
    assert!(stream.next().await.is_none());
    wait_for_stats(&engine, "the abandoned generation is cancelled", |stats| {
        stats["cancelled"] == 1 && stats["active"] == 0
    })
    .await;
}

#[tokio::test]
async fn an_engine_that_never_answers_is_a_decode_timeout_at_the_head_limit() {
    let engine = e2e::start_engine_double(&["--hang"]);
    let clients = EngineClients::default();
    let head_limit = Duration::from_millis(100);
    let engine_request = request(
        &engine,
        EngineRoute::Completion,
        &json!({"prompt": "go", "stream": true}),
    )
    .with_head_limit(head_limit);
    let error = clients
        .stream(engine_request, STALL, "c-hang")
        .await
        .expect_err("no answer");
    assert_eq!(error, AdapterError::DecodeTimeout { after: head_limit });
}

#[tokio::test]
async fn a_prompt_too_long_is_rejected_with_the_engines_own_json_body() {
    let engine = e2e::start_engine_double(&["--ctx", "8"]);
    let clients = EngineClients::default();
    let body =
        json!({"prompt": "one two three four five six seven eight nine ten", "stream": true});
    let error = clients
        .stream(
            request(&engine, EngineRoute::Completion, &body),
            STALL,
            "c-long",
        )
        .await
        .expect_err("rejected");
    let AdapterError::EngineRejected { status, body } = error else {
        panic!("expected EngineRejected, got {error:?}");
    };
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).expect("the engine's JSON body");
    assert_eq!(body["error"]["type"], "exceed_context_size_error");
    assert_eq!(body["error"]["n_prompt_tokens"], 10);
}

#[tokio::test]
async fn an_engine_that_is_not_there_is_a_worker_reset_after_one_fresh_connect() {
    let dir = e2e::temp_dir();
    let missing = dir.path().join("missing.sock").display().to_string();
    let clients = EngineClients::default();
    let engine_request = EngineRequest::new(
        endpoint(&missing),
        EngineKind::Llamacpp,
        EngineRoute::Completion,
        Bytes::from_static(b"{\"prompt\":\"x\",\"stream\":true}"),
    );
    let error = clients
        .stream(engine_request, STALL, "c-missing")
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(error, AdapterError::WorkerReset { .. }),
        "{error:?}"
    );
    // A failed connect wrote nothing, so it was tried exactly once more.
    assert_eq!(clients.unsent_retries(), 1);
}

#[tokio::test]
async fn dropping_the_stream_mid_way_cancels_the_generation_in_the_engine() {
    let dir = e2e::temp_dir();
    for listen in listen_addresses(&dir) {
        let engine = e2e::start_engine_double(&["--listen", &listen, "--token-delay-ms", "20"]);
        let clients = EngineClients::default();
        let body = json!({"prompt": "go", "n_predict": 200, "stream": true});
        let mut stream = clients
            .stream(
                request(&engine, EngineRoute::Completion, &body),
                STALL,
                "c-drop",
            )
            .await
            .unwrap();
        for _ in 0..2 {
            assert!(matches!(
                stream.next().await,
                Some(Ok(EngineEvent::Chunk { .. }))
            ));
        }
        drop(stream);
        let stats = wait_for_stats(&engine, "the engine sees its client leave", |stats| {
            stats["cancelled"] == 1 && stats["active"] == 0
        })
        .await;
        assert_eq!(stats["completed"], 0, "{listen}: {stats}");
    }
}

#[tokio::test]
async fn closing_the_clients_cancels_a_running_stream_and_ends_every_connection_task() {
    let engine = e2e::start_engine_double(&["--token-delay-ms", "20"]);
    let clients = EngineClients::default();
    let body = json!({"prompt": "go", "n_predict": 200, "stream": true});
    let mut stream = clients
        .stream(
            request(&engine, EngineRoute::Completion, &body),
            STALL,
            "c-close",
        )
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(EngineEvent::Chunk { .. }))
    ));
    let reader = async {
        let outcome = stream.next().await;
        drop(stream);
        outcome
    };
    let (outcome, ()) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(reader, clients.close())
    })
    .await
    .expect("close returns once the stream is dropped");
    assert_eq!(outcome, Some(Err(AdapterError::Cancelled)));
    wait_for_stats(
        &engine,
        "the engine sees the cancelled stream leave",
        |stats| stats["cancelled"] == 1 && stats["active"] == 0,
    )
    .await;
    let after = EngineRequest::new(
        endpoint(engine.ready("listen")),
        EngineKind::Llamacpp,
        EngineRoute::Completion,
        Bytes::from(body.to_string()),
    );
    assert_eq!(
        clients.stream(after, STALL, "c-after").await.err(),
        Some(AdapterError::Cancelled)
    );
}

#[tokio::test]
async fn a_stale_pooled_connection_after_an_engine_restart_is_retried_on_a_fresh_one() {
    let dir = e2e::temp_dir();
    let socket = dir.path().join("engine.sock").display().to_string();
    // An OpenAI-compatible engine keeps a streamed response's connection (llama-server does
    // not, so its streams never use pooled connections).
    let body = json!({
        "model": "test-double",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 2,
        "stream": true,
    });
    let openai = |engine: &Daemon| {
        EngineRequest::new(
            endpoint(engine.ready("listen")),
            EngineKind::Openai,
            EngineRoute::ChatCompletions,
            Bytes::from(body.to_string()),
        )
    };
    let clients = EngineClients::default();

    let first = e2e::start_engine_double(&["--listen", &socket]);
    let mut stream = clients.stream(openai(&first), STALL, "c-1").await.unwrap();
    collect(&mut stream).await;
    drop(stream);
    // The connection is back in the pool once hyper's tasks have run; this runtime has one thread.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }

    // Restarted while this test's runtime is blocked, so the pooled connection has not yet noticed
    // that its engine is gone: the next request is handed that stale connection.
    drop(first);
    let second = e2e::start_engine_double(&["--listen", &socket]);

    let mut stream = clients
        .stream(openai(&second), STALL, "c-2")
        .await
        .expect("a stale pooled connection is not the caller's error");
    let (chunks, _) = collect(&mut stream).await;
    assert_eq!(token_texts(&chunks), words(2));
    assert_eq!(
        clients.unsent_retries(),
        1,
        "the request came back unsent from the stale connection and was sent once more"
    );
    let stats = wait_for_stats(&second, "one completed generation", |stats| {
        stats["completed"] == 1
    })
    .await;
    assert_eq!(stats["cancelled"], 0, "{stats}");
}

/// Reads one whole request (the head, then Content-Length bytes of body) from `socket` for a
/// scripted engine, leaving what follows it in `buffer`; `false` if the connection ended first.
async fn read_request(socket: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt as _;
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    buffer.drain(..head_end + length);
    true
}

/// A scripted HTTP/1.1 engine on 127.0.0.1: answers the first request on every connection with a
/// small keep-alive JSON answer; on the second request of a connection it reads the request whole,
/// waits `close_after`, and closes without a byte of answer. Counts the requests it read whole.
async fn closing_engine(close_after: Duration) -> (String, std::sync::Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind the scripted engine: {e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .to_string();
    let received = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                for turn in 0.. {
                    if !read_request(&mut socket, &mut buffer).await {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    if turn == 0 {
                        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                      Content-Length: 11\r\n\r\n{\"ok\":true}";
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    } else {
                        tokio::time::sleep(close_after).await;
                        return;
                    }
                }
            });
        }
    });
    (address, received)
}

fn whole_request(address: &str) -> WholeRequest {
    WholeRequest {
        endpoint: endpoint(address),
        path: "/v1/embeddings",
        body: Bytes::from_static(br#"{"model":"m","input":"x"}"#),
        headers: hyper::HeaderMap::new(),
    }
}

#[tokio::test]
async fn a_request_met_by_the_close_of_an_idle_pooled_connection_is_sent_again_on_a_fresh_one() {
    let (address, received) = closing_engine(Duration::ZERO).await;
    let clients = EngineClients::default();
    let first = clients
        .whole(&whole_request(&address), STALL, "c-1")
        .await
        .unwrap();
    assert_eq!(&first.body[..], br#"{"ok":true}"#);
    // The second request goes out on the pooled connection, which the engine closes at once: it
    // never worked on it, so it is sent again, on a fresh connection, and answered there.
    let second = clients
        .whole(&whole_request(&address), STALL, "c-2")
        .await
        .expect("an idle connection's close is not the caller's error");
    assert_eq!(&second.body[..], br#"{"ok":true}"#);
    assert_eq!(clients.unsent_retries(), 1);
    assert_eq!(received.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_request_the_engine_read_and_worked_on_before_closing_is_never_sent_again() {
    let (address, received) = closing_engine(Duration::from_millis(300)).await;
    let clients = EngineClients::default();
    clients
        .whole(&whole_request(&address), STALL, "c-1")
        .await
        .unwrap();
    // The engine reads the second request, "works" for 300 ms, then closes without answering: it
    // may have acted on it, so the failure is the caller's and the request ran once.
    let failed = clients.whole(&whole_request(&address), STALL, "c-2").await;
    assert!(
        matches!(failed, Err(AdapterError::WorkerReset { .. })),
        "{failed:?}"
    );
    assert_eq!(clients.unsent_retries(), 0);
    assert_eq!(received.load(Ordering::SeqCst), 2);
}

/// A scripted engine on 127.0.0.1 that streams the way llama-server's cpp-httplib does: each
/// request gets a chunked SSE answer (one token, a `length` finish, `[DONE]`) with `Keep-Alive`
/// advertised; after the terminator it takes `close_after` (a busy host), half-closes, reads and
/// discards whatever arrives for 100 ms, and closes. Counts connections and requests read whole.
async fn stream_then_close_engine(
    close_after: Duration,
) -> (
    String,
    std::sync::Arc<AtomicUsize>,
    std::sync::Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind the scripted engine: {e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .to_string();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let (opened, read) = (
        std::sync::Arc::clone(&connections),
        std::sync::Arc::clone(&requests),
    );
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            opened.fetch_add(1, Ordering::SeqCst);
            let read = std::sync::Arc::clone(&read);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                if !read_request(&mut socket, &mut buffer).await {
                    return;
                }
                read.fetch_add(1, Ordering::SeqCst);
                let events = [
                    r#"data: {"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#,
                    r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
                    "data: [DONE]",
                ];
                let mut answer = String::from(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                     Keep-Alive: timeout=5, max=100\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                for event in events {
                    let chunk = format!("{event}\n\n");
                    answer.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
                }
                answer.push_str("0\r\n\r\n");
                if socket.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(close_after).await;
                if socket.shutdown().await.is_err() {
                    return;
                }
                let drain = async {
                    let mut chunk = [0u8; 4096];
                    while matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {}
                };
                let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
            });
        }
    });
    (address, connections, requests)
}

#[tokio::test]
async fn streams_to_llama_server_never_go_on_a_connection_it_is_about_to_close() {
    let (address, connections, requests) =
        stream_then_close_engine(Duration::from_millis(20)).await;
    let clients = EngineClients::default();
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": true,
    });
    // Each stream is sent the instant the previous one ended, as a queued request is when a slot
    // frees: a pooled connection would be one the engine is about to close.
    for n in 0..3 {
        let request = EngineRequest::new(
            endpoint(&address),
            EngineKind::Llamacpp,
            EngineRoute::ChatCompletions,
            Bytes::from(body.to_string()),
        );
        let mut stream = clients
            .stream(request, STALL, &format!("c-{n}"))
            .await
            .unwrap_or_else(|e| panic!("stream {n}: {e:?}"));
        let (chunks, _) = collect(&mut stream).await;
        assert_eq!(token_texts(&chunks), words(1));
    }
    assert_eq!(requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "one new connection per stream"
    );
    assert_eq!(
        clients.unsent_retries(),
        0,
        "no stream met a connection the engine was closing"
    );
}
