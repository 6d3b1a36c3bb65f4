//! The test engine double against its contract (the llama-server shapes the supervisor and the router
//! rely on, streaming framing included, and each injected fault), and the harness's own READY /
//! failure handling.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic is the failure report"
)]

use std::io::{self, ErrorKind, Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{Daemon, Signal, binary, http, start_engine_double, temp_dir};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `GET path` until it answers `status`, returning that reply; panics after `TIMEOUT`.
fn wait_for_status(addr: &str, path: &str, status: u16) -> http::Reply {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = http::get(addr, path, TIMEOUT).unwrap();
        if reply.status == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {} ({}), not {status}",
            reply.status,
            reply.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn health_is_503_while_loading_then_200_over_tcp() {
    let spawned = Instant::now();
    let engine = start_engine_double(&["--listen", "127.0.0.1:0", "--load-ms", "300"]);
    let addr = engine.ready("listen");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_ne!(addr, "127.0.0.1:0", "READY must carry the bound port");

    let loading = http::get(addr, "/health", TIMEOUT).unwrap();
    assert_eq!(loading.status, 503, "{}", loading.text());
    assert_eq!(
        loading.json(),
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    );
    let props_while_loading = http::get(addr, "/props", TIMEOUT).unwrap();
    assert_eq!(props_while_loading.status, 503);

    let ok = wait_for_status(addr, "/health", 200);
    assert!(spawned.elapsed() >= Duration::from_millis(300));
    assert_eq!(ok.json(), json!({"status": "ok"}));
    assert_eq!(ok.header("content-type"), Some("application/json"));
}

#[test]
fn props_and_slots_describe_the_engine_over_a_unix_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let engine = start_engine_double(&[
        "--listen".as_ref(),
        socket.as_os_str(),
        "--slots".as_ref(),
        "3".as_ref(),
        "--model-alias".as_ref(),
        "tiny".as_ref(),
    ]);
    assert_eq!(engine.ready_path("listen"), socket);
    assert!(engine.ready_line().starts_with("READY listen=/tmp/pm"));
    let addr = engine.ready("listen");

    let health = http::get(addr, "/health", TIMEOUT).unwrap();
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );

    let props = http::get(addr, "/props", TIMEOUT).unwrap();
    assert_eq!(props.status, 200);
    let props = props.json();
    assert_eq!(props["total_slots"], 3);
    assert_eq!(props["model_alias"], "tiny");
    assert_eq!(props["default_generation_settings"]["n_ctx"], 256);
    assert!(
        props["build_info"]
            .as_str()
            .unwrap()
            .starts_with("test-engine-double ")
    );

    let slots = http::get(addr, "/slots", TIMEOUT).unwrap();
    assert_eq!(slots.status, 200);
    assert_eq!(
        slots.json(),
        json!([
            {"id": 0, "is_processing": false},
            {"id": 1, "is_processing": false},
            {"id": 2, "is_processing": false},
        ])
    );

    let missing = http::get(addr, "/no-such-route", TIMEOUT).unwrap();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], 404);
}

#[test]
fn props_defaults_to_four_slots_and_the_test_double_alias() {
    let engine = start_engine_double::<&str>(&[]);
    let props = http::get(engine.ready("listen"), "/props", TIMEOUT)
        .unwrap()
        .json();
    assert_eq!(props["total_slots"], 4);
    assert_eq!(props["model_alias"], "test-double");
}

fn assert_never_answers(addr: &str) {
    let asked = Instant::now();
    let err = http::get(addr, "/health", Duration::from_millis(500)).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "expected a read timeout (connection accepted, no answer, not closed), got {err:?}"
    );
    assert!(asked.elapsed() >= Duration::from_millis(450));
}

#[test]
fn hang_accepts_connections_but_never_answers() {
    let engine = start_engine_double(&["--hang"]);
    assert_never_answers(engine.ready("listen"));

    let dir = temp_dir();
    let socket = dir.path().join("hang.sock");
    let engine = start_engine_double(&["--hang".as_ref(), "--listen".as_ref(), socket.as_os_str()]);
    assert_never_answers(engine.ready("listen"));
}

#[test]
fn health_delay_slows_health_but_it_still_answers() {
    let engine = start_engine_double(&["--health-delay-ms", "300"]);
    let asked = Instant::now();
    let health = http::get(engine.ready("listen"), "/health", TIMEOUT).unwrap();
    assert_eq!(health.status, 200);
    assert!(asked.elapsed() >= Duration::from_millis(300));
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket_file() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let mut engine = start_engine_double(&["--listen".as_ref(), socket.as_os_str()]);
    assert!(socket.exists());

    engine.kill_with(Signal::SIGTERM);
    let status = engine.wait_exit(TIMEOUT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}: {}", engine.stderr());
    assert!(!socket.exists(), "socket file left behind");
    // The exit can be seen before the harness's reader thread has taken the last stderr line.
    assert!(
        engine.wait_for_stderr("SIGTERM", TIMEOUT),
        "{}",
        engine.stderr()
    );
}

#[test]
fn sigint_also_exits_zero() {
    let mut engine = start_engine_double::<&str>(&[]);
    engine.kill_with(Signal::SIGINT);
    let status = engine.wait_exit(TIMEOUT).expect("no exit after SIGINT");
    assert!(status.success(), "{status}");
}

#[test]
fn injected_crash_exits_with_the_chosen_code_and_leaves_the_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    let mut engine = start_engine_double(&[
        "--listen".as_ref(),
        socket.as_os_str(),
        "--exit-after-ms".as_ref(),
        "200".as_ref(),
        "--exit-code".as_ref(),
        "7".as_ref(),
    ]);
    let status = engine.wait_exit(TIMEOUT).expect("the crash did not happen");
    assert_eq!(status.code(), Some(7), "{}", engine.stderr());
    assert!(socket.exists(), "a crash must not clean up its socket");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = temp_dir();
    let socket = dir.path().join("engine.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let engine = start_engine_double(&["--listen".as_ref(), socket.as_os_str()]);
    let health = http::get(engine.ready("listen"), "/health", TIMEOUT).unwrap();
    assert_eq!(health.status, 200);
}

#[test]
fn a_regular_file_at_the_socket_path_is_not_deleted() {
    let dir = temp_dir();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();

    let run = Daemon::run_to_exit(
        binary("test-engine-double"),
        &["--listen".as_ref(), path.as_os_str()],
        TIMEOUT,
    );
    assert!(!run.status.success());
    assert!(run.stderr.contains("is not a socket"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn help_says_it_is_a_test_double() {
    let run = Daemon::run_to_exit(binary("test-engine-double"), &["--help"], TIMEOUT);
    assert!(run.status.success());
    assert!(run.stdout.contains("TEST DOUBLE"), "{}", run.stdout);
    assert!(
        run.stdout.contains("not an inference engine"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_daemon_that_exits_before_ready_fails_fast_with_its_stderr() {
    let started = Instant::now();
    let panic = std::panic::catch_unwind(|| start_engine_double(&["--listen", "nonsense"]))
        .expect_err("start must fail");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("before printing READY"), "{message}");
    assert!(
        message.contains("expected HOST:PORT"),
        "stderr missing: {message}"
    );
    assert!(started.elapsed() < TIMEOUT);
}

// ---- generation endpoints, streaming, and the fault knobs around them ----

/// A streamed HTTP reply read from a raw socket as it arrives: the head, then one SSE `data:` payload
/// at a time. The harness's `http` client reads to EOF, which would hide whether events are flushed
/// one by one. Raw bytes are kept in `raw` between reads, so a read timeout loses nothing.
struct EventStream {
    stream: http::Stream,
    raw: Vec<u8>,
    /// De-chunked body bytes not yet split into events.
    body: Vec<u8>,
    status: u16,
    head: String,
    /// The terminating zero-size chunk arrived: the server ended the stream on purpose.
    finished: bool,
    /// The socket reached EOF or was reset.
    closed: bool,
}

impl EventStream {
    /// Connects and sends `POST path` with a JSON body, without reading anything.
    fn send(addr: &str, path: &str, body: &Value) -> Self {
        let mut stream = http::connect(addr, TIMEOUT).unwrap();
        let body = serde_json::to_vec(body).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
        stream.flush().unwrap();
        Self {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            status: 0,
            head: String::new(),
            finished: false,
            closed: false,
        }
    }

    /// Sends the request and reads the reply head; panics unless it is a 200 event stream.
    fn open(addr: &str, path: &str, body: &Value) -> Self {
        let mut events = Self::send(addr, path, body);
        events.read_head().unwrap();
        assert_eq!(events.status, 200, "{}", events.head);
        let head = events.head.to_ascii_lowercase();
        assert!(
            head.contains("content-type: text/event-stream"),
            "{}",
            events.head
        );
        assert!(
            head.contains("transfer-encoding: chunked"),
            "{}",
            events.head
        );
        events
    }

    fn set_read_timeout(&self, timeout: Duration) {
        match &self.stream {
            http::Stream::Tcp(s) => s.set_read_timeout(Some(timeout)).unwrap(),
            http::Stream::Unix(s) => s.set_read_timeout(Some(timeout)).unwrap(),
        }
    }

    /// Reads once from the socket into `raw`; a reset counts as the connection closing.
    fn fill(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => self.closed = true,
            Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => self.closed = true,
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Reads the status line and headers. A timeout (`WouldBlock`/`TimedOut`) means no head yet.
    fn read_head(&mut self) -> io::Result<()> {
        loop {
            if let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                self.head = String::from_utf8(self.raw[..end].to_vec()).unwrap();
                self.raw.drain(..end + 4);
                self.status = self
                    .head
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
                return Ok(());
            }
            if self.closed {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "closed before a head",
                ));
            }
            self.fill()?;
        }
    }

    /// Moves every complete chunk from `raw` into `body`.
    fn dechunk(&mut self) {
        while !self.finished {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = std::str::from_utf8(&self.raw[..eol]).unwrap();
            let size = usize::from_str_radix(size_text.trim(), 16).unwrap();
            if size == 0 {
                self.finished = true;
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next `data:` payload; `Ok(None)` once the stream has ended (see [`Self::ended_cleanly`]);
    /// an error of kind `WouldBlock`/`TimedOut` if nothing arrived within the read timeout.
    fn next(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let event = String::from_utf8(self.body[..end].to_vec()).unwrap();
                self.body.drain(..end + 2);
                let payload = event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"));
                return Ok(Some(payload.to_owned()));
            }
            if self.finished || self.closed {
                return Ok(None);
            }
            self.fill()?;
            self.dechunk();
        }
    }

    /// The next payload as JSON; panics at the end of the stream.
    fn next_json(&mut self) -> Value {
        let payload = self
            .next()
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended early"));
        serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{e}: {payload:?}"))
    }

    /// Every remaining payload, to the end of the stream.
    fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next().unwrap()).collect()
    }

    /// Whether the server ended the chunked body properly (a crash or refusal just closes it).
    fn ended_cleanly(&self) -> bool {
        self.finished && self.body.is_empty()
    }
}

/// The double's fake vocabulary, in order; generation `i`'s token is `WORDS[i % 18]`.
const WORDS: [&str; 18] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "silver", "owls", "sing", "under", "quiet", "northern", "stars",
];

/// The text of the first `n` generated tokens, each with its leading space.
fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!(" {}", WORDS[i % WORDS.len()]))
        .collect()
}

fn stats(addr: &str) -> Value {
    let reply = http::get(addr, "/control/stats", TIMEOUT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Polls `/control/stats` until `done` holds, returning them; panics after `TIMEOUT`.
fn wait_for_stats(addr: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stats = stats(addr);
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "stats never matched: {stats}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn processing(addr: &str) -> Vec<bool> {
    let slots = http::get(addr, "/slots", TIMEOUT).unwrap().json();
    slots
        .as_array()
        .unwrap()
        .iter()
        .map(|slot| slot["is_processing"].as_bool().unwrap())
        .collect()
}

fn control(addr: &str, action: &str) {
    let reply = http::request(addr, "POST", &format!("/control/{action}"), None, TIMEOUT).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

fn assert_times_out(result: io::Result<impl std::fmt::Debug>) {
    match result {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected nothing to arrive (a read timeout), got {other:?}"),
    }
}

fn write_model(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn a_streamed_completion_arrives_token_by_token_and_ends_without_done() {
    let engine = start_engine_double(&["--token-delay-ms", "50"]);
    let addr = engine.ready("listen");
    let body = json!({"prompt": "one two  three", "n_predict": 8, "stream": true});
    let mut events = EventStream::open(addr, "/completion", &body);

    let mut arrivals = Vec::new();
    for (i, word) in WORDS.iter().enumerate().take(8) {
        let event = events.next_json();
        arrivals.push(Instant::now());
        assert_eq!(
            event,
            json!({"content": format!(" {word}"), "tokens": [i], "stop": false, "index": 0})
        );
    }
    // The server spreads 8 tokens over 7 gaps of 50 ms = 350 ms; a buffered reply would deliver
    // them all at once. The margin absorbs this test thread being descheduled on a busy machine
    // (two events then share one read), so no per-gap bound is asserted.
    let spread = arrivals[7] - arrivals[0];
    assert!(spread >= Duration::from_millis(200), "{spread:?}");

    let last = events.next_json();
    assert_eq!(last["content"], "");
    assert_eq!(last["stop"], true);
    assert_eq!(last["stop_type"], "limit");
    assert_eq!(last["tokens_predicted"], 8);
    assert_eq!(last["tokens_evaluated"], 3);
    assert!(
        last["timings"]["predicted_ms"].as_f64().unwrap() >= 350.0,
        "{last}"
    );
    assert!(last["timings"]["prompt_ms"].is_number(), "{last}");
    assert_eq!(
        events.rest(),
        Vec::<String>::new(),
        "no [DONE] on /completion"
    );
    assert!(events.ended_cleanly());

    assert_eq!(
        stats(addr),
        json!({"active": 0, "completed": 1, "cancelled": 0, "tokens": 8})
    );
}

#[test]
fn non_streaming_replies_carry_every_word_and_the_counts() {
    let engine = start_engine_double(&["--model-alias", "tiny"]);
    let addr = engine.ready("listen");

    let native =
        http::post_json(addr, "/completion", &json!({"prompt": "a b c d"}), TIMEOUT).unwrap();
    assert_eq!(native.status, 200, "{}", native.text());
    assert_eq!(native.header("content-type"), Some("application/json"));
    let native = native.json();
    assert_eq!(native["content"], words(16), "default n_predict is 16");
    assert_eq!(native["stop"], true);
    assert_eq!(native["stop_type"], "limit");
    assert_eq!(native["tokens_predicted"], 16);
    assert_eq!(native["tokens_evaluated"], 4);

    let body = json!({"model": "whatever", "prompt": ["a b", "c"], "max_tokens": 3});
    let text = http::post_json(addr, "/v1/completions", &body, TIMEOUT)
        .unwrap()
        .json();
    assert_eq!(text["object"], "text_completion");
    assert!(text["id"].as_str().unwrap().starts_with("cmpl-"), "{text}");
    assert_eq!(text["model"], "tiny");
    assert_eq!(text["choices"][0]["text"], words(3));
    assert_eq!(text["choices"][0]["finish_reason"], "length");
    assert_eq!(
        text["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );

    let body = json!({
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there you"}]},
        ],
        "max_tokens": 2,
    });
    let chat = http::post_json(addr, "/v1/chat/completions", &body, TIMEOUT)
        .unwrap()
        .json();
    assert_eq!(chat["object"], "chat.completion");
    assert!(
        chat["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{chat}"
    );
    assert_eq!(
        chat["choices"][0]["message"],
        json!({"role": "assistant", "content": words(2)})
    );
    assert_eq!(chat["choices"][0]["finish_reason"], "length");
    assert_eq!(
        chat["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    );
    assert_eq!(
        stats(addr),
        json!({"active": 0, "completed": 3, "cancelled": 0, "tokens": 21})
    );
}

#[test]
fn the_openai_chat_stream_ends_with_usage_then_done() {
    let engine = start_engine_double::<&str>(&[]);
    let addr = engine.ready("listen");
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": "count to four please"},
        ],
        "max_tokens": 4,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut events = EventStream::open(addr, "/v1/chat/completions", &body);
    let mut id = None;
    for (i, word) in WORDS.iter().enumerate().take(4) {
        let chunk = events.next_json();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk["created"].is_u64());
        assert_eq!(chunk["model"], "test-double");
        let chunk_id = chunk["id"].as_str().unwrap().to_owned();
        assert_eq!(id.get_or_insert_with(|| chunk_id.clone()), &chunk_id);
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["delta"]["content"], format!(" {word}"));
        assert_eq!(choice["finish_reason"], Value::Null);
        if i == 0 {
            assert_eq!(choice["delta"]["role"], "assistant");
        }
    }
    let finish = events.next_json();
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{finish}");
    assert_eq!(finish["choices"][0]["delta"], json!({}));

    let usage = events.next_json();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    );
    assert_eq!(events.rest(), vec!["[DONE]".to_owned()]);
    assert!(events.ended_cleanly());
}

#[test]
fn the_openai_text_stream_without_usage_ends_with_done() {
    let engine = start_engine_double::<&str>(&[]);
    let addr = engine.ready("listen");
    let body = json!({"prompt": "x y", "max_tokens": 2, "stream": true});
    let mut events = EventStream::open(addr, "/v1/completions", &body);
    for word in WORDS.iter().take(2) {
        let chunk = events.next_json();
        assert_eq!(chunk["object"], "text_completion");
        assert!(
            chunk["id"].as_str().unwrap().starts_with("cmpl-"),
            "{chunk}"
        );
        assert_eq!(chunk["choices"][0]["text"], format!(" {word}"));
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    let finish = events.next_json();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(
        events.rest(),
        vec!["[DONE]".to_owned()],
        "no usage chunk unless asked"
    );
}

#[test]
fn malformed_json_is_a_400_invalid_request_error_on_every_endpoint() {
    let engine = start_engine_double::<&str>(&[]);
    let addr = engine.ready("listen");
    for path in ["/completion", "/v1/completions", "/v1/chat/completions"] {
        let body: &[u8] = b"{\"prompt\": ";
        let reply = http::request(
            addr,
            "POST",
            path,
            Some(("application/json", body)),
            TIMEOUT,
        )
        .unwrap();
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        let error = &reply.json()["error"];
        assert_eq!(error["code"], 400);
        assert_eq!(error["type"], "invalid_request_error");
        assert!(
            error["message"].as_str().unwrap().contains("JSON"),
            "{error}"
        );
    }
    let missing = http::post_json(addr, "/v1/chat/completions", &json!({}), TIMEOUT).unwrap();
    assert_eq!(missing.status, 400);
    assert_eq!(missing.json()["error"]["type"], "invalid_request_error");
    assert_eq!(
        stats(addr),
        json!({"active": 0, "completed": 0, "cancelled": 0, "tokens": 0})
    );
}

#[test]
fn a_prompt_that_fills_the_context_is_refused_before_any_stream_byte() {
    let engine = start_engine_double(&["--ctx", "8"]);
    let addr = engine.ready("listen");
    let props = http::get(addr, "/props", TIMEOUT).unwrap().json();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 8);

    let body = json!({"prompt": "1 2 3 4 5 6 7 8 9", "stream": true});
    let reply = http::post_json(addr, "/completion", &body, TIMEOUT).unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()["error"]["type"],
        "exceed_context_size_error",
        "{}",
        reply.text()
    );

    // A generation stops when the context is full: 5 prompt words leave room for 3 tokens.
    let body = json!({"prompt": "1 2 3 4 5", "n_predict": 100});
    let reply = http::post_json(addr, "/completion", &body, TIMEOUT)
        .unwrap()
        .json();
    assert_eq!(reply["tokens_predicted"], 3);
}

#[test]
fn slots_bound_concurrent_generations_and_extra_requests_wait() {
    let engine = start_engine_double(&["--slots", "2"]);
    let addr = engine.ready("listen");
    control(addr, "hold");
    let body = json!({"prompt": "p", "n_predict": 3, "stream": true});

    // Admitted requests get their head at once, then wait for the held first token.
    let mut first = EventStream::open(addr, "/completion", &body);
    let mut second = EventStream::open(addr, "/completion", &body);
    wait_for_stats(addr, |s| s["active"] == 2);
    assert_eq!(processing(addr), vec![true, true]);

    let mut third = EventStream::send(addr, "/completion", &body);
    third.set_read_timeout(Duration::from_millis(300));
    assert_times_out(third.read_head());
    assert_eq!(
        stats(addr)["active"],
        2,
        "the third request must wait for a slot"
    );

    control(addr, "release");
    for events in [&mut first, &mut second] {
        assert_eq!(events.rest().len(), 4, "3 tokens and the final event");
        assert!(events.ended_cleanly());
    }
    third.set_read_timeout(TIMEOUT);
    third.read_head().unwrap();
    assert_eq!(third.status, 200);
    assert_eq!(third.rest().len(), 4);
    assert_eq!(
        wait_for_stats(addr, |s| s["completed"] == 3),
        json!({"active": 0, "completed": 3, "cancelled": 0, "tokens": 9})
    );
    assert_eq!(processing(addr), vec![false, false]);
}

#[test]
fn hold_pauses_every_new_token_until_release() {
    let engine = start_engine_double(&["--token-delay-ms", "100"]);
    let addr = engine.ready("listen");
    control(addr, "hold");
    let body = json!({"prompt": "p", "n_predict": 4, "stream": true});
    let mut events = EventStream::open(addr, "/completion", &body);
    events.set_read_timeout(Duration::from_millis(300));
    assert_times_out(events.next());
    assert_eq!(
        stats(addr),
        json!({"active": 1, "completed": 0, "cancelled": 0, "tokens": 0})
    );
    assert_eq!(processing(addr), vec![true, false, false, false]);

    control(addr, "release");
    events.set_read_timeout(TIMEOUT);
    assert_eq!(events.next_json()["content"], " the");

    // Held again mid-stream: the generation stops at its next token.
    control(addr, "hold");
    let paused_at = stats(addr)["tokens"].as_u64().unwrap();
    assert!(paused_at < 4, "hold arrived after the whole generation");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        stats(addr)["tokens"],
        paused_at,
        "a token was produced while held"
    );

    control(addr, "release");
    let rest = events.rest();
    // Whatever token the hold caught, 3 tokens and the final event are still unread.
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(events.ended_cleanly());
    assert_eq!(
        stats(addr),
        json!({"active": 0, "completed": 1, "cancelled": 0, "tokens": 4})
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_is_counted_as_cancelled() {
    let engine = start_engine_double(&["--token-delay-ms", "20"]);
    let addr = engine.ready("listen");
    let body = json!({"prompt": "p", "n_predict": 200, "stream": true});
    let mut events = EventStream::open(addr, "/completion", &body);
    events.next_json();
    events.next_json();
    drop(events);

    let stats = wait_for_stats(addr, |s| s["cancelled"] == 1);
    assert_eq!(stats["active"], 0, "{stats}");
    assert_eq!(stats["completed"], 0, "{stats}");
    assert!(stats["tokens"].as_u64().unwrap() < 200, "{stats}");
    assert_eq!(processing(addr), vec![false; 4]);
}

#[test]
fn a_client_that_leaves_while_held_is_cancelled_and_frees_its_slot() {
    let engine = start_engine_double(&["--slots", "1"]);
    let addr = engine.ready("listen");
    control(addr, "hold");
    let body = json!({"prompt": "p", "stream": true});
    let events = EventStream::open(addr, "/v1/completions", &body);
    wait_for_stats(addr, |s| s["active"] == 1);
    drop(events);

    wait_for_stats(addr, |s| s["cancelled"] == 1 && s["active"] == 0);
    assert_eq!(processing(addr), vec![false]);
    control(addr, "release");
    let reply = http::post_json(addr, "/completion", &json!({"prompt": "p"}), TIMEOUT).unwrap();
    assert_eq!(reply.status, 200, "the freed slot serves the next request");
}

#[test]
fn crash_after_tokens_exits_mid_stream_with_the_exit_code() {
    let mut engine = start_engine_double(&["--crash-after-tokens", "3", "--exit-code", "9"]);
    let addr = engine.ready("listen").to_owned();

    // Tokens count across requests: 2 here, so the stream below gets exactly one.
    let body = json!({"prompt": "p", "n_predict": 2});
    let reply = http::post_json(&addr, "/completion", &body, TIMEOUT).unwrap();
    assert_eq!(reply.json()["tokens_predicted"], 2);

    let body = json!({"prompt": "p", "n_predict": 10, "stream": true});
    let mut events = EventStream::open(&addr, "/completion", &body);
    assert_eq!(events.next_json()["content"], " the");
    assert_eq!(events.rest(), Vec::<String>::new());
    assert!(
        !events.ended_cleanly(),
        "a crash must not end the stream properly"
    );

    let status = engine.wait_exit(TIMEOUT).expect("the crash did not happen");
    assert_eq!(status.code(), Some(9), "{}", engine.stderr());
}

#[test]
fn refuse_accepts_connections_and_closes_them_unanswered() {
    let engine = start_engine_double(&["--refuse"]);
    let asked = Instant::now();
    let err = http::get(engine.ready("listen"), "/health", TIMEOUT).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "expected a closed connection, got {err:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "closed, not timed out"
    );
}

#[test]
fn a_model_file_with_never_ready_keeps_health_at_503() {
    let dir = temp_dir();
    let model = write_model(dir.path(), "stuck.json", r#"{"never_ready": true}"#);
    let engine = start_engine_double(&["--model".as_ref(), model.as_os_str()]);
    let addr = engine.ready("listen");
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let health = http::get(addr, "/health", TIMEOUT).unwrap();
        assert_eq!(health.status, 503, "{}", health.text());
        assert_eq!(health.json()["error"]["message"], "Loading model");
        std::thread::sleep(Duration::from_millis(50));
    }
    let generation = http::post_json(addr, "/completion", &json!({"prompt": "p"}), TIMEOUT);
    assert_eq!(generation.unwrap().status, 503);
    assert_eq!(
        stats(addr)["tokens"],
        0,
        "test control answers while loading"
    );
}

#[test]
fn model_file_knobs_override_the_flags_and_its_stem_is_the_alias() {
    let dir = temp_dir();
    let model = write_model(
        dir.path(),
        "tiny-llama.json",
        r#"{"crash_after_tokens": 2, "exit_code": 5, "slots": 2}"#,
    );
    let mut engine = start_engine_double(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--exit-code".as_ref(),
        "9".as_ref(),
    ]);
    let addr = engine.ready("listen").to_owned();
    let props = http::get(&addr, "/props", TIMEOUT).unwrap().json();
    assert_eq!(props["model_alias"], "tiny-llama");
    assert_eq!(props["total_slots"], 2);
    assert!(
        props["build_info"]
            .as_str()
            .unwrap()
            .starts_with("test-engine-double ")
    );

    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let mut events = EventStream::open(&addr, "/v1/chat/completions", &body);
    assert_eq!(events.rest().len(), 2, "two tokens, then the crash");
    assert!(!events.ended_cleanly());
    let status = engine.wait_exit(TIMEOUT).expect("the crash did not happen");
    assert_eq!(status.code(), Some(5), "{}", engine.stderr());
}

#[test]
fn a_missing_or_non_json_model_file_exits_with_status_3() {
    let dir = temp_dir();
    let missing = dir.path().join("absent.gguf");
    let garbage = write_model(dir.path(), "model.gguf", "GGUF\u{3}not json");
    let typo = write_model(dir.path(), "typo.json", r#"{"load_msec": 5}"#);
    for path in [&missing, &garbage, &typo] {
        let run = Daemon::run_to_exit(
            binary("test-engine-double"),
            &["--model".as_ref(), path.as_os_str()],
            TIMEOUT,
        );
        assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
        assert!(
            run.stderr.contains(path.to_str().unwrap()),
            "the message must name the path: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "no READY: {}", run.stdout);
    }
}

#[test]
fn sigterm_mid_stream_exits_zero_promptly() {
    let mut engine = start_engine_double(&["--token-delay-ms", "50"]);
    let addr = engine.ready("listen").to_owned();
    let body = json!({"prompt": "p", "n_predict": 100, "stream": true});
    let mut events = EventStream::open(&addr, "/completion", &body);
    events.next_json();

    let signalled = Instant::now();
    engine.kill_with(Signal::SIGTERM);
    let status = engine.wait_exit(TIMEOUT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}: {}", engine.stderr());
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "{:?}",
        signalled.elapsed()
    );
    events.rest();
    assert!(!events.ended_cleanly());
}

/// `--close-after-stream`: like llama-server, the double says `Connection: close` on a streamed
/// response and closes the connection after it; without the flag the connection stays open.
#[test]
fn close_after_stream_ends_the_connection_after_each_streamed_response() {
    for close in [true, false] {
        let flags: &[&str] = if close {
            &["--close-after-stream"]
        } else {
            &[]
        };
        let engine = start_engine_double(flags);
        let addr = engine.ready("listen");
        wait_for_status(addr, "/health", 200);
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true}"#;
        let mut connection = std::net::TcpStream::connect(addr).unwrap();
        write!(
            connection,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        connection.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        let closed = loop {
            match connection.read(&mut buffer) {
                Ok(0) => break true,
                Ok(read) => seen.extend_from_slice(&buffer[..read]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break false,
                Err(error) => panic!("{error}"),
            }
            if !close && String::from_utf8_lossy(&seen).contains("\r\n0\r\n\r\n") {
                break false;
            }
        };
        let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
        assert!(text.contains("data: [done]"), "{text}");
        assert_eq!(text.contains("connection: close"), close, "{text}");
        assert_eq!(closed, close, "connection closed after the stream: {text}");
    }
}
