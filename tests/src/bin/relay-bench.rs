//! `relay-bench`: what orchestratord's streaming relay costs. The same streaming load — N
//! concurrent `POST /v1/chat/completions` streams of T tokens — is sent once straight to the
//! engine and once through orchestratord, in one run, alternating paths round by round so that
//! machine noise hits both alike; it prints time to first token (p50/p99) and tokens/s of each
//! path, the TTFT orchestratord adds, the relayed throughput as a share of the direct one, and
//! the CPU each process spent per relayed chunk.
//!
//! It starts its own stack from the same target directory: pool-managerd supervising one managed
//! pool whose engine is `test-engine-double` (a FAKE engine: no model, filler words at a fixed
//! pace, `--token-delay-ms` between two tokens of a stream) or, with `--llama-server` and
//! `--gguf`, llama.cpp's real `llama-server` (optionally pinned to `--gpus`), listening on TCP, so
//! that the direct path reaches the very engine orchestratord relays from; then orchestratord in
//! front. Daemons
//! log at `warn` so that logging does not distort the figures.
//!
//! Per stream it measures TTFT (request sent to the first `data:` chunk with content), content
//! chunks and total time; per round the wall time (first request sent to last stream ended), the
//! on-CPU time of each process (`/proc/PID/task/*/schedstat`, taken once the stack is idle again,
//! so end-of-stream work counts) and, through orchestratord, the deltas of its own `/metrics`
//! histograms (queue wait, Acquire round trip, TTFT as it sees it), which split the added TTFT.
//! Before each round it waits until no lease is held and the engine runs nothing.
//!
//! Every stream is checked: exactly T content chunks, a `finish_reason`, a usage chunk with
//! `completion_tokens` = T, and `data: [DONE]` last. Any failure makes the exit status non-zero.

use clap::Parser;
use e2e::sidecar::{
    kill_recorded_engines, operator_status, sidecar_command, socket_path, state_dir,
};
use e2e::{Daemon, DaemonBuilder, Signal, binary, http, temp_dir};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const POOL: &str = "bench";
const MODEL: &str = "double";
/// How long start-up and the idle wait between rounds may take.
const WAIT: Duration = Duration::from_secs(30);
/// Quiet time before each measured round, after the previous one has fully wound down.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Parser)]
#[command(
    about = "Benchmark orchestratord's streaming relay: the same streaming load straight to the \
             engine (the test engine double, a fake engine) and through orchestratord"
)]
struct Args {
    /// Concurrent streams per round and path.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    streams: u32,
    /// Tokens per stream (`max_tokens`).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tokens: u32,
    /// The engine double's pause between two tokens of a stream (0: as fast as it goes).
    #[arg(long, default_value_t = 5)]
    token_delay_ms: u64,
    /// Measured rounds per path, after one warm-up round each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Run this llama.cpp `llama-server` on `--gguf` instead of the engine double (a REAL engine;
    /// `--token-delay-ms` does not apply: it generates as fast as it can).
    #[arg(long, requires = "gguf")]
    llama_server: Option<PathBuf>,
    /// The model llama-server loads; its training context must hold the prompt (~60 tokens with
    /// llama-server's default chat template) plus `--tokens`, e.g.
    /// `scripts/make-tiny-model.py tiny.gguf --ctx 1024`.
    #[arg(long, requires = "llama_server")]
    gguf: Option<PathBuf>,
    /// Pin the pool to these GPUs (`gpus`, i.e. CUDA_VISIBLE_DEVICES) and offload every layer
    /// (`-ngl 99`); needs a CUDA build of llama-server.
    #[arg(long, requires = "llama_server")]
    gpus: Option<String>,
    /// The engine kind the double's pool declares: `llamacpp` (orchestratord opens a new
    /// connection for every stream, since llama-server closes each after its answer) or `openai`
    /// (an engine that keeps connections: orchestratord reuses pooled ones).
    #[arg(long, default_value = "llamacpp", value_parser = ["llamacpp", "openai"], conflicts_with = "llama_server")]
    engine_kind: String,
}

impl Args {
    fn real_engine(&self) -> Option<(&Path, &Path)> {
        Some((self.llama_server.as_deref()?, self.gguf.as_deref()?))
    }
}

/// The processes under test. Dropping it stops them: orchestratord, then pool-managerd cleanly
/// (which stops its engine), then whatever engine its records still name (engines outlive a
/// killed pool-managerd by design, so a SIGKILL alone would leave one behind).
struct Stack {
    dir: tempfile::TempDir,
    sidecar: Daemon,
    orchestrator: Option<Daemon>,
    shim: String,
    /// `127.0.0.1:PORT` of the engine.
    engine: String,
    slots: u32,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut orchestrator) = self.orchestrator.take() {
            stop(&mut orchestrator);
        }
        stop(&mut self.sidecar);
        kill_recorded_engines(&state_dir(self.dir.path()));
    }
}

fn stop(daemon: &mut Daemon) {
    if daemon.try_wait().is_none() {
        daemon.kill_with(Signal::SIGTERM);
        let _ = daemon.wait_exit(Duration::from_secs(10));
    }
}

/// The engine's pid from pool-managerd's engine record, while it has one.
fn engine_pid(dir: &Path) -> Option<u32> {
    let record = state_dir(dir).join("engines").join(format!("{POOL}.json"));
    let text = std::fs::read_to_string(record).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
}

/// The `[[pool]]` running the engine double (writes its empty knob file into `dir`).
fn double_pool(
    args: &Args,
    dir: &tempfile::TempDir,
    slots: u32,
    ctx: u32,
) -> Result<String, String> {
    let model = dir.path().join("model.json");
    std::fs::write(&model, "{}").map_err(|e| format!("cannot write {}: {e}", model.display()))?;
    Ok(format!(
        r#"[[pool]]
id = "{POOL}"
model = "{MODEL}"
engine = "{kind}"
slots = {slots}
health_path = "/health"
command = [{engine:?}, "--listen", "{{host}}:{{port}}", "--slots", "{slots}", "--ctx", "{ctx}", "--token-delay-ms", "{delay}", "--model", "{{model}}"]
model_path = {model:?}
listen = "tcp"
env = {{ RUST_LOG = "warn" }}
startup_timeout_ms = 10000
stop_grace_ms = 1000
"#,
        engine = binary("test-engine-double").display().to_string(),
        model = model.display().to_string(),
        delay = args.token_delay_ms,
        kind = args.engine_kind,
    ))
}

/// The `[[pool]]` running llama-server on `gguf`: `slots` sequences of `ctx` tokens each.
fn llama_server_pool(args: &Args, server: &Path, gguf: &Path, slots: u32, ctx: u32) -> String {
    let offload = match &args.gpus {
        Some(gpus) => format!(", \"-ngl\", \"99\"]\ngpus = {gpus:?}"),
        None => "]".to_owned(),
    };
    format!(
        r#"[[pool]]
id = "{POOL}"
model = "{MODEL}"
engine = "llamacpp"
command = [{server:?}, "-m", "{{model}}", "--host", "{{host}}", "--port", "{{port}}", "--alias", "{MODEL}", "-np", "{slots}", "-c", "{total}", "--threads", "{threads}"{offload}
model_path = {gguf:?}
listen = "tcp"
startup_timeout_ms = 60000
stop_grace_ms = 3000
"#,
        server = server.display().to_string(),
        gguf = gguf.display().to_string(),
        total = u64::from(slots) * u64::from(ctx),
        threads = engine_threads(),
    )
}

/// llama-server's compute threads: half the cores, so that the relay and the client keep theirs
/// (llama.cpp's threads spin while they wait for each other, and a preempted one stalls them all,
/// so an engine sharing every core with the relay would measure the contention, not the relay).
fn engine_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn start_stack(args: &Args) -> Result<Stack, String> {
    let dir = temp_dir();
    let slots = args.streams.max(64);
    // Room for the prompt and every requested token: both engines stop at a full context.
    let ctx = args.tokens.saturating_add(128).max(256);
    let config = if let Some((server, gguf)) = args.real_engine() {
        llama_server_pool(args, server, gguf, slots, ctx)
    } else {
        double_pool(args, &dir, slots, ctx)?
    };
    let config_path = dir.path().join("pool-managerd.toml");
    std::fs::write(&config_path, config)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let sidecar = sidecar_command(dir.path(), &config_path)
        .env("RUST_LOG", "warn")
        .start();
    let shim = sidecar.ready("debug_http").to_owned();
    let mut stack = Stack {
        dir,
        sidecar,
        orchestrator: None,
        shim,
        engine: String::new(),
        slots,
    };

    let deadline = Instant::now() + WAIT;
    loop {
        let reply = http::get(&stack.shim, &format!("/pools/{POOL}/status"), WAIT)
            .map_err(|e| format!("pool-managerd's shim: {e}"))?;
        let status: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if status["ready"] == true && status["slots_total"] == slots {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("the engine never became ready: {status}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Not in the tokenless shim's view: from `pool-managerd status`, as the socket's peers see it.
    let status = operator_status(stack.dir.path(), POOL)?;
    let endpoint = status["endpoint"].as_str().unwrap_or_default();
    stack.engine = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("the engine's endpoint is not http://host:port: {endpoint:?}"))?
        .trim_end_matches('/')
        .to_owned();

    let orchestrator_config = stack.dir.path().join("orchestratord.toml");
    std::fs::write(
        &orchestrator_config,
        format!("[admission]\ncapacity = {}\n", (slots * 2).max(256)),
    )
    .map_err(|e| format!("cannot write {}: {e}", orchestrator_config.display()))?;
    let orchestrator = DaemonBuilder::new(binary("orchestratord"))
        .name("orchestratord")
        .arg("--config")
        .arg(&orchestrator_config)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--socket")
        .arg(socket_path(stack.dir.path()))
        .env("RUST_LOG", "warn")
        .start();
    let listen = orchestrator.ready("listen").to_owned();
    stack.orchestrator = Some(orchestrator);
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = http::get(&listen, "/readyz", WAIT)
            .map_err(|e| format!("orchestratord's /readyz: {e}"))?;
        if reply.status == 200 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "orchestratord never became ready: {}",
                reply.text()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(stack)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stack = match start_stack(&args) {
        Ok(stack) => stack,
        Err(error) => {
            eprintln!("relay-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(bench(&args, &stack)),
        Err(error) => Err(format!("cannot start the runtime: {error}")),
    };
    drop(stack);
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("relay-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client with TCP_NODELAY (without it Nagle's algorithm against the
/// peer's delayed ACK would add ~40 ms to requests on a reused connection).
fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Orchestrated,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Orchestrated => "orchestrated",
        }
    }
}

/// One path under test: its own client (so connection pools never mix) and its URL.
struct Target {
    route: Route,
    client: HttpClient,
    uri: Uri,
}

/// What one stream saw.
#[derive(Debug, Default)]
struct StreamOutcome {
    ttft: Option<Duration>,
    tokens: u64,
    /// Every `data:` event, `[DONE]` included.
    events: u64,
    finish_reason: Option<String>,
    usage_completion_tokens: Option<u64>,
    done: bool,
    total: Duration,
}

/// The fields of a chat completion chunk this benchmark checks; everything else is ignored.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: u64,
}

impl StreamOutcome {
    fn on_data(&mut self, payload: &[u8], since_sent: Duration) -> Result<(), String> {
        self.events += 1;
        if self.done {
            return Err("data after [DONE]".to_owned());
        }
        if payload == b"[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Chunk = serde_json::from_slice(payload).map_err(|e| {
            format!(
                "chunk is not JSON ({e}): {}",
                String::from_utf8_lossy(payload)
            )
        })?;
        if chunk.error.is_some() {
            return Err(format!(
                "error event after {} tokens: {}",
                self.tokens,
                String::from_utf8_lossy(payload)
            ));
        }
        for choice in chunk.choices {
            if choice
                .delta
                .and_then(|delta| delta.content)
                .is_some_and(|content| !content.is_empty())
            {
                self.tokens += 1;
                self.ttft.get_or_insert(since_sent);
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
        if let Some(usage) = chunk.usage {
            self.usage_completion_tokens = Some(usage.completion_tokens);
        }
        Ok(())
    }

    /// Why this stream is not a correct one of `tokens` tokens, if it is not.
    fn check(&self, tokens: u64) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.tokens != tokens {
            problems.push(format!("{} content chunks, not {tokens}", self.tokens));
        }
        if self.finish_reason.is_none() {
            problems.push("no finish_reason".to_owned());
        }
        if self.usage_completion_tokens != Some(tokens) {
            problems.push(format!(
                "usage.completion_tokens {:?}, not {tokens}",
                self.usage_completion_tokens
            ));
        }
        if !self.done {
            problems.push("no [DONE]".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join(", "))
        }
    }
}

/// Incremental SSE framing: `field: value` lines ending in `\n` or `\r\n`, an event ends at a
/// blank line, `data` lines of one event joined with `\n`, comments and other fields ignored.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The payload of the next complete event that has data, if one is buffered.
    fn next_data(&mut self) -> Option<Vec<u8>> {
        let mut start = 0;
        let mut found = None;
        while let Some(offset) = self.buffer[start..].iter().position(|&b| b == b'\n') {
            let end = start + offset;
            let line = &self.buffer[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            start = end + 1;
            if line.is_empty() {
                if self.has_data {
                    self.has_data = false;
                    found = Some(std::mem::take(&mut self.data));
                    break;
                }
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
        self.buffer.drain(..start);
        found
    }
}

async fn one_stream(
    client: HttpClient,
    uri: Uri,
    body: Bytes,
    tokens: u64,
) -> Result<StreamOutcome, String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let sent = Instant::now();
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    if status != hyper::StatusCode::OK {
        let text = body
            .collect()
            .await
            .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(format!("HTTP {status}: {text}"));
    }
    let mut parser = SseParser::default();
    let mut outcome = StreamOutcome::default();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| format!("stream broke after {} tokens: {e}", outcome.tokens))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at = sent.elapsed();
        parser.push(&data);
        while let Some(payload) = parser.next_data() {
            outcome.on_data(&payload, at)?;
        }
    }
    outcome.total = sent.elapsed();
    outcome.check(tokens)?;
    Ok(outcome)
}

/// CPU time (ns) of every process under test and of this one.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    orchestrator: u64,
    engine: u64,
    sidecar: u64,
    client: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pids {
    orchestrator: u32,
    engine: u32,
    sidecar: u32,
    client: u32,
}

/// On-CPU time of all of `pid`'s live threads, in ns (`/proc/PID/task/*/schedstat`, first field).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

impl Cpu {
    fn now(pids: Pids) -> Cpu {
        Cpu {
            orchestrator: cpu_ns(pids.orchestrator),
            engine: cpu_ns(pids.engine),
            sidecar: cpu_ns(pids.sidecar),
            client: cpu_ns(pids.client),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            orchestrator: self.orchestrator.saturating_sub(before.orchestrator),
            engine: self.engine.saturating_sub(before.engine),
            sidecar: self.sidecar.saturating_sub(before.sidecar),
            client: self.client.saturating_sub(before.client),
        }
    }
}

/// One round of one path.
struct Round {
    route: Route,
    ttft_ms: Vec<f64>,
    total_ms: Vec<f64>,
    tokens: u64,
    events: u64,
    wall: Duration,
    cpu: Cpu,
    /// orchestratord's metrics over the round (orchestrated rounds only).
    inside: Inside,
}

impl Round {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
}

/// Nearest-rank percentile of `values` (ms); NaN when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0u32), |(s, c), v| (s + v, c + 1));
    sum / f64::from(count)
}

/// `(sum, count)` of a histogram: running totals from orchestratord's `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    sum: f64,
    count: f64,
}

impl Totals {
    fn since(self, before: Totals) -> Totals {
        Totals {
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    fn add(self, other: Totals) -> Totals {
        Totals {
            sum: self.sum + other.sum,
            count: self.count + other.count,
        }
    }

    fn mean_ms(self) -> f64 {
        self.sum / self.count * 1e3
    }
}

/// The histograms of orchestratord's own metrics that split its added time to first token.
#[derive(Debug, Default, Clone, Copy)]
struct Inside {
    /// Admission to a granted lease.
    queue_wait: Totals,
    /// One Acquire round trip to pool-managerd.
    dispatch: Totals,
    /// Request received to first token relayed.
    ttft: Totals,
}

impl Inside {
    fn since(self, before: Inside) -> Inside {
        Inside {
            queue_wait: self.queue_wait.since(before.queue_wait),
            dispatch: self.dispatch.since(before.dispatch),
            ttft: self.ttft.since(before.ttft),
        }
    }

    fn add(self, other: Inside) -> Inside {
        Inside {
            queue_wait: self.queue_wait.add(other.queue_wait),
            dispatch: self.dispatch.add(other.dispatch),
            ttft: self.ttft.add(other.ttft),
        }
    }
}

/// The totals of histogram `name` over all its label sets in Prometheus/OpenMetrics text (zero
/// when absent).
fn histogram(text: &str, name: &str) -> Totals {
    let mut totals = Totals::default();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let metric = key.split('{').next().unwrap_or(key);
        match metric.strip_prefix(name) {
            Some("_sum") => totals.sum += value,
            Some("_count") => totals.count += value,
            _ => {}
        }
    }
    totals
}

/// Control-plane reads between rounds.
struct Control {
    client: HttpClient,
    status: Uri,
    /// The engine's view of its running generations: the double's `/control/stats`, or
    /// llama-server's `/slots`.
    stats: Uri,
    real_engine: bool,
    metrics: Uri,
}

impl Control {
    async fn get(&self, uri: &Uri) -> Result<Value, String> {
        let body = self.get_bytes(uri).await?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {uri}: not JSON: {e}"))
    }

    /// orchestratord's own view of the requests so far, from its `/metrics`.
    async fn inside(&self) -> Result<Inside, String> {
        let body = self.get_bytes(&self.metrics).await?;
        let text = String::from_utf8_lossy(&body);
        Ok(Inside {
            queue_wait: histogram(&text, "orchestratord_queue_wait_seconds"),
            dispatch: histogram(&text, "orchestratord_dispatch_seconds"),
            ttft: histogram(&text, "orchestratord_time_to_first_token_seconds"),
        })
    }

    async fn get_bytes(&self, uri: &Uri) -> Result<Bytes, String> {
        let request = Request::builder()
            .uri(uri.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?
            .to_bytes();
        Ok(body)
    }

    /// Waits until no lease is held and the engine runs no generation, so that a round never
    /// starts while the previous one's releases are still in flight.
    async fn wait_idle(&self, slots: u32) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.get(&self.status).await?;
            let stats = self.get(&self.stats).await?;
            let engine_idle = if self.real_engine {
                stats
                    .as_array()
                    .is_some_and(|slots| slots.iter().all(|slot| slot["is_processing"] == false))
            } else {
                stats["active"] == 0
            };
            if status["active_leases"] == 0 && status["slots_free"] == slots && engine_idle {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the stack never went idle between rounds: {status} {stats}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn run_round(target: &Target, args: &Args, body: &Bytes, pids: Pids) -> (Round, Vec<String>) {
    let cpu_before = Cpu::now(pids);
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..args.streams {
        streams.spawn(one_stream(
            target.client.clone(),
            target.uri.clone(),
            body.clone(),
            u64::from(args.tokens),
        ));
    }
    let mut round = Round {
        route: target.route,
        ttft_ms: Vec::new(),
        total_ms: Vec::new(),
        tokens: 0,
        events: 0,
        wall: Duration::ZERO,
        cpu: Cpu::default(),
        inside: Inside::default(),
    };
    let mut failures = Vec::new();
    while let Some(joined) = streams.join_next().await {
        match joined {
            Ok(Ok(outcome)) => {
                if let Some(ttft) = outcome.ttft {
                    round.ttft_ms.push(ttft.as_secs_f64() * 1e3);
                }
                round.total_ms.push(outcome.total.as_secs_f64() * 1e3);
                round.tokens += outcome.tokens;
                round.events += outcome.events;
            }
            Ok(Err(error)) => failures.push(format!("{}: {error}", target.route.name())),
            Err(error) => failures.push(format!("{}: task failed: {error}", target.route.name())),
        }
    }
    round.wall = started.elapsed();
    // The CPU snapshot is taken by the caller once the stack is idle again, so the relay's
    // end-of-stream work (lease release) is counted too.
    round.cpu = cpu_before;
    (round, failures)
}

async fn bench(args: &Args, stack: &Stack) -> Result<bool, String> {
    let orchestrator = stack
        .orchestrator
        .as_ref()
        .ok_or("orchestratord is not running")?;
    let pids = Pids {
        orchestrator: orchestrator.pid(),
        engine: engine_pid(stack.dir.path()).unwrap_or(0),
        sidecar: stack.sidecar.pid(),
        client: std::process::id(),
    };
    let uri = |authority: &str, path: &str| -> Result<Uri, String> {
        format!("http://{authority}{path}")
            .parse()
            .map_err(|e| format!("bad URL http://{authority}{path}: {e}"))
    };
    let targets = [
        Target {
            route: Route::Direct,
            client: client(),
            uri: uri(&stack.engine, "/v1/chat/completions")?,
        },
        Target {
            route: Route::Orchestrated,
            client: client(),
            uri: uri(orchestrator.ready("listen"), "/v1/chat/completions")?,
        },
    ];
    let control = Control {
        client: client(),
        status: uri(&stack.shim, &format!("/pools/{POOL}/status"))?,
        stats: uri(
            &stack.engine,
            if args.real_engine().is_some() {
                "/slots"
            } else {
                "/control/stats"
            },
        )?,
        real_engine: args.real_engine().is_some(),
        metrics: uri(orchestrator.ready("listen"), "/metrics")?,
    };
    let body = Bytes::from(
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "say something nice"}],
            "max_tokens": args.tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string(),
    );

    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "relay-bench: {} concurrent streams x {} tokens, POST /v1/chat/completions \
         (stream, include_usage), straight to the engine vs through orchestratord",
        args.streams, args.tokens
    );
    match args.real_engine() {
        Some((server, gguf)) => println!(
            "engine: llama.cpp llama-server {} on {}, {} threads{}, {} slots, TCP {}",
            server.display(),
            gguf.display(),
            engine_threads(),
            match &args.gpus {
                Some(gpus) => format!(", GPUs {gpus} (-ngl 99)"),
                None => ", CPU".to_owned(),
            },
            stack.slots,
            stack.engine
        ),
        None => println!(
            "engine: test-engine-double, a FAKE engine (no model; filler words), {} ms between two \
             tokens of a stream{}, {} slots, TCP {}, declared `{}` ({})",
            args.token_delay_ms,
            match args.token_delay_ms {
                0 => " (as fast as it goes)".to_owned(),
                d => format!(" (~{:.0} tokens/s per stream)", 1000.0 / d as f64),
            },
            stack.slots,
            stack.engine,
            args.engine_kind,
            if args.engine_kind == "openai" {
                "orchestratord reuses kept-alive engine connections"
            } else {
                "orchestratord opens a new engine connection per stream, as for llama-server"
            }
        ),
    }
    println!(
        "orchestrated: orchestratord {} -> pool-managerd lease -> the same engine; \
         daemons at RUST_LOG=warn",
        orchestrator.ready("listen")
    );
    println!(
        "client: one keep-alive hyper-util client per path, TCP_NODELAY, tokio multi-thread \
         runtime ({workers} workers); {} cores; 1 warm-up round per path, then {} measured \
         rounds, alternating paths",
        workers, args.rounds
    );
    println!();

    let mut rounds: Vec<(u32, Round)> = Vec::new();
    let mut failures = Vec::new();
    let mut checked = 0u64;
    println!(
        "{:<6} {:<13} {:>9} {:>9} {:>9} {:>11} {:>10}   {:>26}",
        "round",
        "path",
        "TTFT p50",
        "TTFT p99",
        "TTFT max",
        "stream p50",
        "tokens/s",
        "CPU ms in the round"
    );
    println!(
        "{:<6} {:<13} {:>9} {:>9} {:>9} {:>11} {:>10}   {:>7} {:>7} {:>7} {:>7}",
        "", "", "ms", "ms", "ms", "ms", "", "orchd", "engine", "pool-m", "client"
    );
    for index in 0..=args.rounds {
        let order = if index % 2 == 0 {
            [&targets[0], &targets[1]]
        } else {
            [&targets[1], &targets[0]]
        };
        for target in order {
            control.wait_idle(stack.slots).await?;
            let inside_before = control.inside().await?;
            tokio::time::sleep(SETTLE).await;
            let (mut round, failed) = run_round(target, args, &body, pids).await;
            control.wait_idle(stack.slots).await?;
            round.cpu = Cpu::now(pids).since(round.cpu);
            if target.route == Route::Orchestrated {
                round.inside = control.inside().await?.since(inside_before);
            }
            checked += u64::from(args.streams);
            failures.extend(failed);
            let label = if index == 0 {
                "warm".to_owned()
            } else {
                index.to_string()
            };
            println!(
                "{label:<6} {:<13} {:>9.2} {:>9.2} {:>9.2} {:>11.1} {:>10.0}   {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
                round.route.name(),
                percentile(&round.ttft_ms, 50.0),
                percentile(&round.ttft_ms, 99.0),
                percentile(&round.ttft_ms, 100.0),
                percentile(&round.total_ms, 50.0),
                round.tokens_per_s(),
                round.cpu.orchestrator as f64 / 1e6,
                round.cpu.engine as f64 / 1e6,
                round.cpu.sidecar as f64 / 1e6,
                round.cpu.client as f64 / 1e6,
            );
            if index > 0 {
                rounds.push((index, round));
            }
        }
    }

    let of = |route: Route| -> Vec<&Round> {
        rounds
            .iter()
            .filter(|(_, round)| round.route == route)
            .map(|(_, round)| round)
            .collect()
    };
    let direct = of(Route::Direct);
    let relayed = of(Route::Orchestrated);
    println!();
    println!(
        "summary over {} measured rounds ({} streams per path; TTFT pooled over the rounds, \
         tokens/s and CPU averaged per round)",
        args.rounds,
        u64::from(args.rounds) * u64::from(args.streams)
    );
    println!(
        "{:<13} {:>9} {:>9} {:>10} {:>18} {:>18} {:>18}",
        "path",
        "TTFT p50",
        "TTFT p99",
        "tokens/s",
        "orchd CPU/chunk",
        "engine CPU/chunk",
        "client CPU/chunk"
    );
    for (route, set) in [(Route::Direct, &direct), (Route::Orchestrated, &relayed)] {
        let ttft: Vec<f64> = set.iter().flat_map(|r| r.ttft_ms.iter().copied()).collect();
        let events: u64 = set.iter().map(|r| r.events).sum();
        let per_chunk = |pick: fn(&Cpu) -> u64| {
            set.iter().map(|r| pick(&r.cpu)).sum::<u64>() as f64 / 1e3 / events as f64
        };
        println!(
            "{:<13} {:>6.2} ms {:>6.2} ms {:>10.0} {:>15.1} us {:>15.1} us {:>15.1} us",
            route.name(),
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            mean(set.iter().map(|r| r.tokens_per_s())),
            per_chunk(|c| c.orchestrator),
            per_chunk(|c| c.engine),
            per_chunk(|c| c.client),
        );
    }
    // Rounds are pushed in pairs, so the n-th direct and the n-th orchestrated round are
    // neighbours in time.
    let added = |p: f64| -> f64 {
        let per_round: Vec<f64> = direct
            .iter()
            .zip(&relayed)
            .map(|(d, o)| percentile(&o.ttft_ms, p) - percentile(&d.ttft_ms, p))
            .collect();
        median(&per_round)
    };
    let added_p50 = added(50.0);
    let added_p99 = added(99.0);
    let ratio = 100.0 * mean(relayed.iter().map(|r| r.tokens_per_s()))
        / mean(direct.iter().map(|r| r.tokens_per_s()));
    let relayed_events: u64 = relayed.iter().map(|r| r.events).sum();
    let relay_cpu_us = relayed.iter().map(|r| r.cpu.orchestrator).sum::<u64>() as f64
        / 1e3
        / relayed_events as f64;
    let inside = relayed
        .iter()
        .fold(Inside::default(), |total, round| total.add(round.inside));
    let mean_ttft = |set: &[&Round]| mean(set.iter().flat_map(|r| r.ttft_ms.iter().copied()));
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!();
    println!(
        "added TTFT (orchestrated - direct, per round, median of {} rounds): p50 {added_p50:+.2} ms \
         (target <= 1 ms: {}), p99 {added_p99:+.2} ms (target <= 5 ms: {})",
        args.rounds,
        verdict(added_p50 <= 1.0),
        verdict(added_p99 <= 5.0)
    );
    println!(
        "relayed throughput: {ratio:.1}% of direct (target >= 95%: {})",
        verdict(ratio >= 95.0)
    );
    println!(
        "orchestratord CPU: {relay_cpu_us:.1} us per relayed data: event (all its CPU in the \
         orchestrated rounds / {} events, {} per stream: {} tokens + finish + usage + [DONE]; \
         per-request work included)",
        relayed_events,
        relayed_events / (u64::from(args.rounds) * u64::from(args.streams)).max(1),
        args.tokens
    );
    println!(
        "where it goes (means per request over the orchestrated rounds): client TTFT direct \
         {:.2} ms, orchestrated {:.2} ms; orchestratord's /metrics: TTFT as it sees it {:.2} ms, \
         queue wait (admission to lease) {:.2} ms, one Acquire round trip {:.3} ms",
        mean_ttft(&direct),
        mean_ttft(&relayed),
        inside.ttft.mean_ms(),
        inside.queue_wait.mean_ms(),
        inside.dispatch.mean_ms(),
    );
    if failures.is_empty() {
        println!(
            "correctness: all {checked} streams (warm-up included) had exactly {} content chunks, \
             a finish_reason, usage.completion_tokens = {} and [DONE] last: OK",
            args.tokens, args.tokens
        );
        Ok(true)
    } else {
        println!(
            "correctness: {} of {checked} streams FAILED; first ones:",
            failures.len()
        );
        for failure in failures.iter().take(10) {
            println!("  {failure}");
        }
        Ok(false)
    }
}
