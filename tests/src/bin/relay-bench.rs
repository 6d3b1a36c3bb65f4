//! `relay-bench`: what orchestratord's streaming relay costs. The same streaming load — N
//! concurrent `POST /v1/chat/completions` streams of T tokens — is sent once straight to the
//! engine and once through orchestratord, in one run, alternating paths round by round so that
//! machine noise hits both alike; it prints time to first token (p50/p99) and tokens/s of each
//! path, the TTFT orchestratord adds, the relayed throughput as a share of the direct one, and
//! the CPU each process spent per relayed chunk.
//!
//! It starts its own stack from the same target directory (the tests' `e2e::stack`):
//! pool-managerd supervising `--pools` managed pools whose engines are `test-engine-double` (a
//! FAKE engine: no model, filler words at a fixed pace, `--token-delay-ms` between two tokens of
//! a stream) or, with `--llama-server` and `--gguf`, llama.cpp's real `llama-server` (optionally
//! pinned to `--gpus`), listening on TCP, so that the direct path reaches the very engines
//! orchestratord relays from; then orchestratord in front. Daemons log at `warn` so that logging
//! does not distort the figures. Streams are spread evenly over the pools (the direct path sends
//! stream `i` to engine `i % pools`; orchestratord places them itself), so thousands of streams
//! (scale mode: e.g. `--streams 5000 --pools 5`) fit pools of at most 1,024 slots; the bench
//! raises its open-file limit to the hard limit for itself and the daemons it starts.
//!
//! Per stream it measures TTFT (request sent to the first `data:` chunk with content), content
//! chunks and total time; per round the wall time (first request sent to last stream ended), the
//! on-CPU time of each process (`/proc/PID/task/*/schedstat`, taken once the stack is idle again,
//! so end-of-stream work counts) and, through orchestratord, the deltas of its own `/metrics`
//! histograms (queue wait, Acquire round trip, TTFT as it sees it), which split the added TTFT;
//! and the daemons' resident memory, sampled every 10 ms, whose peak against the fresh daemons'
//! gives the memory per open stream.
//! Before each round it waits until no lease is held and the engine runs nothing.
//!
//! Every stream is checked: exactly T content chunks, a `finish_reason`, a usage chunk with
//! `completion_tokens` = T, and `data: [DONE]` last. Any failure on the direct or orchestrated path
//! makes the exit status non-zero.
//!
//! Peers in the same run: with `--vllm-router PATH` (the `vllm-router` launcher of PyPI's
//! `vllm-router`, e.g. installed by `scripts/bench-peers.sh`) it also starts two vllm-routers in
//! front of the same engines (every engine a `--worker-urls` entry; one `--policy round_robin`, one
//! with its default policy), each measured like orchestratord (its process's CPU and peak RSS) and
//! each one more path in the alternating rotation, with its own keep-alive client. A failed stream
//! through a peer is counted against that path in the table, not fatal. `--plot FILE.svg` writes the
//! TTFT CDF of every path and the relaying process's CPU per chunk of every path as an SVG.

use clap::Parser;
use daemon_support::errors::error_chain;
use e2e::binary;
use e2e::stack::Stack;
use e2e::vllm_router::VllmRouter;
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

/// Pools are named `bench-0`, `bench-1`, …
const POOL: &str = "bench";
/// pool-managerd's largest pool (`config::MAX_SLOTS`): more streams need more pools.
const MAX_SLOTS_PER_POOL: u32 = 1024;
const MODEL: &str = "double";
/// How long start-up and the idle wait between rounds may take.
const WAIT: Duration = Duration::from_secs(30);
/// Quiet time before each measured round, after the previous one has fully wound down.
const SETTLE: Duration = Duration::from_millis(100);

/// One vllm-router `--vllm-router` starts.
struct Peer {
    /// The path's name in the tables and the plot.
    name: &'static str,
    /// Its column in the per-round table.
    short: &'static str,
    /// Its `--policy`; `None`: the router's default (`cache_aware` in 0.1.17).
    policy: Option<&'static str>,
}

const PEERS: [Peer; 2] = [
    Peer {
        name: "vllm-rr",
        short: "vr-rr",
        policy: Some("round_robin"),
    },
    Peer {
        name: "vllm-default",
        short: "vr-def",
        policy: None,
    },
];

#[derive(Parser)]
#[command(
    about = "Benchmark orchestratord's streaming relay: the same streaming load straight to the \
             engine (the test engine double, a fake engine) and through orchestratord"
)]
struct Args {
    /// Concurrent streams per round and path, spread evenly over the pools. At most 20,000:
    /// every stream holds four loopback TCP connection ends (client, orchestratord both ways,
    /// engine) and the direct path two more, against Linux's ~28,000 ephemeral ports.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    streams: u32,
    /// Pools, each with its own engine and `ceil(streams / pools)` slots (at least 64, at most
    /// 1,024 per pool).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pools: u32,
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
    /// The engine kind the double's pool declares: `llamacpp` (the double closes the connection
    /// after every streamed response, as llama-server does, so every path opens a new connection
    /// per stream) or `openai` (an engine that keeps connections: every path reuses pooled ones).
    #[arg(long, default_value = "llamacpp", value_parser = ["llamacpp", "openai"], conflicts_with = "llama_server")]
    engine_kind: String,
    /// Also send the load through vllm-router: this `vllm-router` executable (PyPI
    /// `vllm-router`; `scripts/bench-peers.sh` installs 0.1.17), started twice on loopback in front
    /// of the same engines, with `--policy round_robin` and with its default policy.
    #[arg(long)]
    vllm_router: Option<PathBuf>,
    /// Write an SVG plot to this file: the TTFT CDF of every path, and the CPU per chunk of every
    /// path's relaying process.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl Args {
    fn real_engine(&self) -> Option<(&Path, &Path)> {
        Some((self.llama_server.as_deref()?, self.gguf.as_deref()?))
    }
}

/// The stack under test ([`e2e::stack::Stack`]: dropping it stops orchestratord, pool-managerd
/// and every engine) and what the bench needs to reach past it.
struct Bench {
    stack: Stack,
    /// `127.0.0.1:PORT` of each pool's engine, in pool order.
    engines: Vec<String>,
    /// Each pool's engine's pid.
    engine_pids: Vec<u32>,
    slots_per_pool: u32,
}

fn pool_id(index: u32) -> String {
    format!("{POOL}-{index}")
}

/// The `[[pool]]` running the engine double on TCP (so that the direct path reaches the very
/// engine orchestratord relays from). Declared `llamacpp`, the double closes the connection after
/// every streamed response as llama-server does, so every path (direct, orchestratord, a peer
/// router) needs a new connection per stream; declared `openai`, it keeps them.
fn double_pool(args: &Args, id: &str, slots: u32, ctx: u32) -> String {
    let close = if args.engine_kind == "llamacpp" {
        r#", "--close-after-stream""#
    } else {
        ""
    };
    format!(
        r#"[[pool]]
id = "{id}"
model = "{MODEL}"
engine = "{kind}"
slots = {slots}
health_path = "/health"
command = [{engine:?}, "--listen", "{{host}}:{{port}}", "--slots", "{slots}", "--ctx", "{ctx}", "--token-delay-ms", "{delay}", "--model", "{{model}}"{close}]
model_path = "{{dir}}/double-model.json"
listen = "tcp"
env = {{ RUST_LOG = "warn" }}
startup_timeout_ms = 10000
stop_grace_ms = 1000
"#,
        engine = binary("test-engine-double").display().to_string(),
        delay = args.token_delay_ms,
        kind = args.engine_kind,
    )
}

/// The `[[pool]]` running llama-server on `gguf`: `slots` sequences of `ctx` tokens each.
fn llama_server_pool(
    args: &Args,
    id: &str,
    (server, gguf): (&Path, &Path),
    slots: u32,
    ctx: u32,
) -> String {
    let offload = match &args.gpus {
        Some(gpus) => format!(", \"-ngl\", \"99\"]\ngpus = {gpus:?}"),
        None => "]".to_owned(),
    };
    format!(
        r#"[[pool]]
id = "{id}"
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
        threads = engine_threads(args.pools),
    )
}

/// llama-server's compute threads: half the cores, shared by the pools, so that the relay and
/// the client keep theirs (llama.cpp's threads spin while they wait for each other, and a
/// preempted one stalls them all, so an engine sharing every core with the relay would measure
/// the contention, not the relay).
fn engine_threads(pools: u32) -> usize {
    let half = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    (half / usize::try_from(pools).unwrap_or(1).max(1)).max(1)
}

/// Raises this process's open-file limit to its hard limit (the daemons it starts inherit it):
/// every stream holds a client socket here, two in orchestratord and one in the engine. Returns
/// the limit now in force.
fn raise_fd_limit() -> Result<u64, String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| format!("cannot raise the open-file limit to {hard}: {e}"))?;
    }
    Ok(hard)
}

fn start_stack(args: &Args) -> Result<Bench, String> {
    let slots_per_pool = args.streams.div_ceil(args.pools).max(64);
    if slots_per_pool > MAX_SLOTS_PER_POOL {
        return Err(format!(
            "{} streams over {} pools need {slots_per_pool} slots per pool, more than a pool may \
             have ({MAX_SLOTS_PER_POOL}): add pools (--pools)",
            args.streams, args.pools
        ));
    }
    // Room for the prompt and every requested token: both engines stop at a full context.
    let ctx = args.tokens.saturating_add(128).max(256);
    let mut builder = Stack::builder()
        .log_filter("warn")
        .startup(WAIT)
        // The bench's one uid holds every slot at once.
        .sidecar_server(&format!(
            "max_leased_slots_per_uid = {}",
            slots_per_pool * args.pools
        ))
        .orchestrator(&format!(
            "[admission]\ncapacity = {}\n",
            (args.streams * 2).max(256)
        ));
    for index in 0..args.pools {
        let id = pool_id(index);
        builder = builder.pool(&match args.real_engine() {
            Some(engine) => llama_server_pool(args, &id, engine, slots_per_pool, ctx),
            None => double_pool(args, &id, slots_per_pool, ctx),
        });
    }
    let stack = builder.start();
    let mut engines = Vec::new();
    let mut engine_pids = Vec::new();
    for index in 0..args.pools {
        let id = pool_id(index);
        let endpoint = stack.endpoint(&id);
        let address = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| format!("the engine's endpoint is not http://host:port: {endpoint:?}"))?
            .trim_end_matches('/')
            .to_owned();
        engines.push(address);
        engine_pids.push(
            stack
                .recorded_engine_pid(&id)
                .ok_or_else(|| format!("no engine recorded for pool {id}"))?,
        );
    }
    Ok(Bench {
        stack,
        engines,
        engine_pids,
        slots_per_pool,
    })
}

/// The vllm-routers of `--vllm-router`, in [`PEERS`] order, and the directory of their logs.
struct Peers {
    routers: Vec<VllmRouter>,
    /// Their stdout and stderr; shown when a stream through one fails, removed on drop, after
    /// the routers (fields drop in order).
    _logs: tempfile::TempDir,
}

/// Starts one vllm-router per [`PEERS`] entry in front of every engine, when `--vllm-router` is
/// given (none otherwise).
fn start_peers(args: &Args, bench: &Bench) -> Result<Peers, String> {
    let logs = tempfile::Builder::new()
        .prefix("relay-bench-peers")
        .tempdir()
        .map_err(|e| format!("cannot create a directory for the routers' logs: {e}"))?;
    let mut routers = Vec::new();
    if let Some(program) = &args.vllm_router {
        let workers: Vec<String> = bench
            .engines
            .iter()
            .map(|engine| format!("http://{engine}"))
            .collect();
        for peer in &PEERS {
            routers.push(VllmRouter::start(
                program,
                peer.name,
                peer.policy,
                &workers,
                logs.path(),
                WAIT,
            )?);
        }
    }
    Ok(Peers {
        routers,
        _logs: logs,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fd_limit = match raise_fd_limit() {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("relay-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stack = match start_stack(&args) {
        Ok(stack) => stack,
        Err(error) => {
            eprintln!("relay-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Each router is killed and reaped when dropped: on every return below, before the stack.
    let peers = match start_peers(&args, &stack) {
        Ok(peers) => peers,
        Err(error) => {
            eprintln!("relay-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(bench(&args, &stack, &peers, fd_limit)),
        Err(error) => Err(format!("cannot start the runtime: {error}")),
    };
    drop(peers);
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
/// peer's delayed ACK would add ~40 ms to requests on a reused connection). Idle connections are dropped after 5 s, below orchestratord's 10 s idle limit
/// (`http.header_timeout_ms`) as a client must keep it (httpx's default is 5 s): otherwise a
/// request sent on a connection just as the server closes it for idleness meets a reset (seen
/// here at 5,000 streams, where one path idles through two rounds of the others).
fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(connector)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Orchestrated,
    /// Through the vllm-router of [`PEERS`]`[i]`.
    Peer(usize),
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Orchestrated => "orchestrated",
            Route::Peer(index) => PEERS.get(index).map_or("peer", |peer| peer.name),
        }
    }

    /// Whether a failed stream on this path fails the bench (a peer's failures are only counted).
    fn ours(self) -> bool {
        !matches!(self, Route::Peer(_))
    }
}

/// One path under test: its own client (so connection pools never mix) and its URLs (the
/// direct path has one per engine; stream `i` goes to `uris[i % len]`).
struct Target {
    route: Route,
    client: HttpClient,
    uris: Vec<Uri>,
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
        .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
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
    /// The vllm-routers, in [`PEERS`] order (0 without `--vllm-router`).
    peers: [u64; PEERS.len()],
}

#[derive(Debug, Clone)]
struct Pids {
    orchestrator: u32,
    engines: Vec<u32>,
    sidecar: u32,
    client: u32,
    /// The vllm-routers, in [`PEERS`] order; empty without `--vllm-router`.
    peers: Vec<u32>,
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
    fn now(pids: &Pids) -> Cpu {
        let mut peers = [0; PEERS.len()];
        for (slot, &pid) in peers.iter_mut().zip(&pids.peers) {
            *slot = cpu_ns(pid);
        }
        Cpu {
            orchestrator: cpu_ns(pids.orchestrator),
            engine: pids.engines.iter().map(|&pid| cpu_ns(pid)).sum(),
            sidecar: cpu_ns(pids.sidecar),
            client: cpu_ns(pids.client),
            peers,
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        let mut peers = self.peers;
        for (now, then) in peers.iter_mut().zip(before.peers) {
            *now = now.saturating_sub(then);
        }
        Cpu {
            orchestrator: self.orchestrator.saturating_sub(before.orchestrator),
            engine: self.engine.saturating_sub(before.engine),
            sidecar: self.sidecar.saturating_sub(before.sidecar),
            client: self.client.saturating_sub(before.client),
            peers,
        }
    }
}

/// Resident memory (`VmRSS`, bytes) of `pid`; 0 once it is gone.
fn rss_bytes(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Resident memory of the two daemons and of the vllm-routers.
#[derive(Debug, Default, Clone, Copy)]
struct Rss {
    orchestrator: u64,
    sidecar: u64,
    /// The vllm-routers, in [`PEERS`] order (0 without `--vllm-router`).
    peers: [u64; PEERS.len()],
}

impl Rss {
    fn now(pids: &Pids) -> Rss {
        let mut peers = [0; PEERS.len()];
        for (slot, &pid) in peers.iter_mut().zip(&pids.peers) {
            *slot = rss_bytes(pid);
        }
        Rss {
            orchestrator: rss_bytes(pids.orchestrator),
            sidecar: rss_bytes(pids.sidecar),
            peers,
        }
    }

    fn max(self, other: Rss) -> Rss {
        let mut peers = self.peers;
        for (mine, theirs) in peers.iter_mut().zip(other.peers) {
            *mine = (*mine).max(theirs);
        }
        Rss {
            orchestrator: self.orchestrator.max(other.orchestrator),
            sidecar: self.sidecar.max(other.sidecar),
            peers,
        }
    }

    /// The resident memory of the process that relays `route` (none for the direct path).
    fn relay(&self, route: Route) -> Option<u64> {
        match route {
            Route::Direct => None,
            Route::Orchestrated => Some(self.orchestrator),
            Route::Peer(index) => self.peers.get(index).copied(),
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// One round of one path.
struct Round {
    route: Route,
    ttft_ms: Vec<f64>,
    total_ms: Vec<f64>,
    tokens: u64,
    events: u64,
    wall: Duration,
    cpu: Cpu,
    /// The daemons' memory at its highest during the round (sampled every 10 ms while streams
    /// run).
    rss_peak: Rss,
    /// orchestratord's metrics over the round (orchestrated rounds only).
    inside: Inside,
}

impl Round {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }

    /// The CPU (ns) of the process that relays this round's path: orchestratord, or the
    /// vllm-router; none for the direct path.
    fn relay_cpu(&self) -> Option<u64> {
        match self.route {
            Route::Direct => None,
            Route::Orchestrated => Some(self.cpu.orchestrator),
            Route::Peer(index) => self.cpu.peers.get(index).copied(),
        }
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
    /// Each pool's status on pool-managerd's shim.
    status: Vec<Uri>,
    /// Each engine's view of its running generations: the double's `/control/stats`, or
    /// llama-server's `/slots`.
    stats: Vec<Uri>,
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

    /// Waits until no lease is held and no engine runs a generation, so that a round never
    /// starts while the previous one's releases are still in flight.
    async fn wait_idle(&self, slots: u32) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        'poll: loop {
            for (status, stats) in self.status.iter().zip(&self.stats) {
                let status = self.get(status).await?;
                let stats = self.get(stats).await?;
                let engine_idle = if self.real_engine {
                    stats.as_array().is_some_and(|slots| {
                        slots.iter().all(|slot| slot["is_processing"] == false)
                    })
                } else {
                    stats["active"] == 0
                };
                let idle =
                    status["active_leases"] == 0 && status["slots_free"] == slots && engine_idle;
                if !idle {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "the stack never went idle between rounds: {status} {stats}"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue 'poll;
                }
            }
            return Ok(());
        }
    }
}

async fn run_round(
    target: &Target,
    args: &Args,
    body: &Bytes,
    pids: &Pids,
) -> (Round, Vec<String>) {
    let cpu_before = Cpu::now(pids);
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for (_, uri) in (0..args.streams).zip(target.uris.iter().cycle()) {
        streams.spawn(one_stream(
            target.client.clone(),
            uri.clone(),
            body.clone(),
            u64::from(args.tokens),
        ));
    }
    let sampled = pids.clone();
    let (stop_sampling, mut sampling_stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = Rss::default();
        loop {
            peak = peak.max(Rss::now(&sampled));
            tokio::select! {
                _ = &mut sampling_stopped => return peak,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    });
    let mut round = Round {
        route: target.route,
        ttft_ms: Vec::new(),
        total_ms: Vec::new(),
        tokens: 0,
        events: 0,
        wall: Duration::ZERO,
        cpu: Cpu::default(),
        rss_peak: Rss::default(),
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
    let _ = stop_sampling.send(());
    round.rss_peak = sampler.await.unwrap_or_default();
    // The CPU snapshot is taken by the caller once the stack is idle again, so the relay's
    // end-of-stream work (lease release) is counted too.
    round.cpu = cpu_before;
    (round, failures)
}

async fn bench(args: &Args, bench: &Bench, peers: &Peers, fd_limit: u64) -> Result<bool, String> {
    let stack = &bench.stack;
    let orchestrator = stack.orchestrator();
    let api = stack.api();
    let shim = stack.shim();
    let pids = Pids {
        orchestrator: orchestrator.pid(),
        engines: bench.engine_pids.clone(),
        sidecar: stack.sidecar.pid(),
        client: std::process::id(),
        peers: peers.routers.iter().map(VllmRouter::pid).collect(),
    };
    let uri = |authority: &str, path: &str| -> Result<Uri, String> {
        format!("http://{authority}{path}")
            .parse()
            .map_err(|e| format!("bad URL http://{authority}{path}: {e}"))
    };
    let stats_path = if args.real_engine().is_some() {
        "/slots"
    } else {
        "/control/stats"
    };
    let mut targets = vec![
        Target {
            route: Route::Direct,
            client: client(),
            uris: bench
                .engines
                .iter()
                .map(|engine| uri(engine, "/v1/chat/completions"))
                .collect::<Result<_, _>>()?,
        },
        Target {
            route: Route::Orchestrated,
            client: client(),
            uris: vec![uri(&api, "/v1/chat/completions")?],
        },
    ];
    for (index, router) in peers.routers.iter().enumerate() {
        targets.push(Target {
            route: Route::Peer(index),
            client: client(),
            uris: vec![uri(router.addr(), "/v1/chat/completions")?],
        });
    }
    let control = Control {
        client: client(),
        status: (0..args.pools)
            .map(|index| uri(&shim, &format!("/pools/{}/status", pool_id(index))))
            .collect::<Result<_, _>>()?,
        stats: bench
            .engines
            .iter()
            .map(|engine| uri(engine, stats_path))
            .collect::<Result<_, _>>()?,
        real_engine: args.real_engine().is_some(),
        metrics: uri(&api, "/metrics")?,
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
        "relay-bench: {} concurrent streams x {} tokens over {} pool(s), POST \
         /v1/chat/completions (stream, include_usage), straight to the engines vs through \
         orchestratord{}",
        args.streams,
        args.tokens,
        args.pools,
        if peers.routers.is_empty() {
            ""
        } else {
            " vs through vllm-router"
        }
    );
    let engines = bench.engines.join(" ");
    match args.real_engine() {
        Some((server, gguf)) => println!(
            "engine: llama.cpp llama-server {} on {}, {} threads{}, {} slots, TCP {}",
            server.display(),
            gguf.display(),
            engine_threads(args.pools),
            match &args.gpus {
                Some(gpus) => format!(", GPUs {gpus} (-ngl 99)"),
                None => ", CPU".to_owned(),
            },
            bench.slots_per_pool,
            engines
        ),
        None => println!(
            "engine: test-engine-double, a FAKE engine (no model; filler words), {} ms between two \
             tokens of a stream{}, {} slots per pool, TCP {}, declared `{}` ({})",
            args.token_delay_ms,
            match args.token_delay_ms {
                0 => " (as fast as it goes)".to_owned(),
                d => format!(" (~{:.0} tokens/s per stream)", 1000.0 / d as f64),
            },
            bench.slots_per_pool,
            engines,
            args.engine_kind,
            if args.engine_kind == "openai" {
                "it keeps connections alive: every path reuses pooled engine connections"
            } else {
                "it closes the connection after every stream, as llama-server does: every path \
                 opens a new engine connection per stream"
            }
        ),
    }
    println!(
        "orchestrated: orchestratord {api} -> pool-managerd lease -> the same engines; daemons \
         at RUST_LOG=warn; open-file limit raised to {fd_limit} (this bench and the daemons it \
         starts)"
    );
    if let Some(program) = &args.vllm_router {
        for (router, peer) in peers.routers.iter().zip(&PEERS) {
            println!(
                "{}: vllm-router {} (pid {}) at {} -> the same engines (--worker-urls, all of them), \
                 {}, --log-level warning",
                peer.name,
                program.display(),
                router.pid(),
                router.addr(),
                match peer.policy {
                    Some(policy) => format!("--policy {policy}"),
                    None => "its default policy (cache_aware in 0.1.17)".to_owned(),
                },
            );
        }
    }
    println!(
        "client: one keep-alive hyper-util client per path, TCP_NODELAY, tokio multi-thread \
         runtime ({workers} workers); {} cores; 1 warm-up round per path, then {} measured \
         rounds, {}",
        workers,
        args.rounds,
        if targets.len() == 2 {
            "alternating paths".to_owned()
        } else {
            format!(
                "the {} paths in a rotating order (each round starts one path later)",
                targets.len()
            )
        }
    );
    println!();

    let rss_fresh = Rss::now(&pids);
    let mut rounds: Vec<(u32, Round)> = Vec::new();
    let mut failures = Vec::new();
    // Failed streams per path (in `targets` order), warm-up included.
    let mut errors = vec![0u64; targets.len()];
    let mut checked = 0u64;
    let peer_count = peers.routers.len();
    let peer_headers = || PEERS.iter().take(peer_count).map(|peer| peer.short);
    let cpu_width = 8 * (4 + peer_count) - 1;
    let rss_width = 8 * (2 + peer_count) - 1;
    println!(
        "{:<6} {:<13} {:>9} {:>9} {:>9} {:>11} {:>10}   {:>cpu_width$}   {:>rss_width$}",
        "round",
        "path",
        "TTFT p50",
        "TTFT p99",
        "TTFT max",
        "stream p50",
        "tokens/s",
        "CPU ms in the round",
        "peak RSS MiB"
    );
    let mut units = format!(
        "{:<6} {:<13} {:>9} {:>9} {:>9} {:>11} {:>10}  ",
        "", "", "ms", "ms", "ms", "ms", ""
    );
    for column in ["orchd", "engine", "pool-m", "client"]
        .into_iter()
        .chain(peer_headers())
    {
        units.push_str(&format!(" {column:>7}"));
    }
    units.push_str("  ");
    for column in ["orchd", "pool-m"].into_iter().chain(peer_headers()) {
        units.push_str(&format!(" {column:>7}"));
    }
    println!("{units}");
    let paths = targets.len();
    for index in 0..=args.rounds {
        // Each round starts one path later: with two paths, they alternate.
        for position in (0..paths).map(|k| (k + index as usize) % paths) {
            let target = &targets[position];
            control.wait_idle(bench.slots_per_pool).await?;
            let inside_before = control.inside().await?;
            tokio::time::sleep(SETTLE).await;
            let (mut round, failed) = run_round(target, args, &body, &pids).await;
            control.wait_idle(bench.slots_per_pool).await?;
            round.cpu = Cpu::now(&pids).since(round.cpu);
            if target.route == Route::Orchestrated {
                round.inside = control.inside().await?.since(inside_before);
            }
            checked += u64::from(args.streams);
            errors[position] += failed.len() as u64;
            failures.extend(failed.into_iter().map(|failure| (target.route, failure)));
            let label = if index == 0 {
                "warm".to_owned()
            } else {
                index.to_string()
            };
            let mut row = format!(
                "{label:<6} {:<13} {:>9.2} {:>9.2} {:>9.2} {:>11.1} {:>10.0}  ",
                round.route.name(),
                percentile(&round.ttft_ms, 50.0),
                percentile(&round.ttft_ms, 99.0),
                percentile(&round.ttft_ms, 100.0),
                percentile(&round.total_ms, 50.0),
                round.tokens_per_s(),
            );
            let cpu = &round.cpu;
            for ns in [cpu.orchestrator, cpu.engine, cpu.sidecar, cpu.client]
                .into_iter()
                .chain(cpu.peers.into_iter().take(peer_count))
            {
                row.push_str(&format!(" {:>7.1}", ns as f64 / 1e6));
            }
            row.push_str("  ");
            let rss = &round.rss_peak;
            for bytes in [rss.orchestrator, rss.sidecar]
                .into_iter()
                .chain(rss.peers.into_iter().take(peer_count))
            {
                row.push_str(&format!(" {:>7.1}", bytes as f64 / MIB));
            }
            println!("{row}");
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
    // Each path's n-th measured round ran in the same rotation as the n-th direct one: the
    // per-round differences pair neighbours in time.
    let added_per_round = |set: &[&Round], p: f64| -> Vec<f64> {
        direct
            .iter()
            .zip(set)
            .map(|(d, o)| percentile(&o.ttft_ms, p) - percentile(&d.ttft_ms, p))
            .collect()
    };
    let added = |set: &[&Round], p: f64| median(&added_per_round(set, p));
    let per_chunk = |set: &[&Round], pick: &dyn Fn(&Round) -> Option<u64>| -> Option<f64> {
        let events: u64 = set.iter().map(|r| r.events).sum();
        let ns: Option<u64> = set.iter().map(|r| pick(r)).sum();
        ns.map(|ns| ns as f64 / 1e3 / events as f64)
    };
    let peak_rss = |set: &[&Round]| {
        set.iter()
            .fold(Rss::default(), |peak, r| peak.max(r.rss_peak))
    };
    let ms = |value: Option<f64>, unit: &str| -> String {
        value.map_or_else(|| "-".to_owned(), |v| format!("{v:+.2} {unit}"))
    };
    let us = |value: Option<f64>| -> String {
        value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} us"))
    };
    let mib = |value: Option<u64>| -> String {
        value.map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v as f64 / MIB))
    };
    println!();
    println!(
        "summary over {} measured rounds ({} streams per path; TTFT pooled over the rounds; added \
         TTFT: the path's percentile minus the direct path's in the same round, median over the \
         rounds; tokens/s and CPU averaged per round; relay: the process the path goes through, \
         orchestratord or the vllm-router, whose resident memory the RSS columns show; errors: failed streams, warm-up included)",
        args.rounds,
        u64::from(args.rounds) * u64::from(args.streams)
    );
    println!(
        "{:<13} {:>9} {:>9} {:>10} {:>10} {:>9} {:>15} {:>16} {:>16} {:>10} {:>10} {:>9}",
        "path",
        "TTFT p50",
        "TTFT p99",
        "added p50",
        "added p99",
        "tokens/s",
        "relay CPU/chunk",
        "engine CPU/chunk",
        "client CPU/chunk",
        "RSS fresh",
        "RSS peak",
        "errors"
    );
    println!(
        "{:<13} {:>9} {:>9} {:>10} {:>10} {:>9} {:>15} {:>16} {:>16} {:>10} {:>10} {:>9}",
        "", "", "", "", "", "", "", "", "", "MiB", "MiB", ""
    );
    let mut plotted = Vec::new();
    for (target, failed) in targets.iter().zip(&errors) {
        let set = of(target.route);
        let ttft: Vec<f64> = set.iter().flat_map(|r| r.ttft_ms.iter().copied()).collect();
        let relay_us = per_chunk(&set, &Round::relay_cpu);
        let (added_p50, added_p99) = match target.route {
            Route::Direct => (None, None),
            _ => (Some(added(&set, 50.0)), Some(added(&set, 99.0))),
        };
        println!(
            "{:<13} {:>6.2} ms {:>6.2} ms {:>10} {:>10} {:>9.0} {:>15} {:>16} {:>16} {:>10} {:>10} {:>9}",
            target.route.name(),
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            ms(added_p50, "ms"),
            ms(added_p99, "ms"),
            mean(set.iter().map(|r| r.tokens_per_s())),
            us(relay_us),
            us(per_chunk(&set, &|r| Some(r.cpu.engine))),
            us(per_chunk(&set, &|r| Some(r.cpu.client))),
            mib(rss_fresh.relay(target.route)),
            mib(peak_rss(&set).relay(target.route)),
            format!(
                "{failed}/{}",
                u64::from(args.streams) * u64::from(args.rounds + 1)
            ),
        );
        plotted.push(PlotPath {
            route: target.route,
            ttft_ms: ttft,
            relay_us,
            sidecar_us: match target.route {
                Route::Orchestrated => per_chunk(&set, &|r| Some(r.cpu.sidecar)),
                _ => None,
            },
        });
    }
    let added_p50 = added(&relayed, 50.0);
    let added_p99 = added(&relayed, 99.0);
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
    // Against the daemons as they started, before any request: what stays allocated after a
    // round (allocator caches, connection pools) counts against the streams too.
    let peak = peak_rss(&relayed);
    let per_stream_kib = |pick: fn(&Rss) -> u64| -> f64 {
        pick(&peak).saturating_sub(pick(&rss_fresh)) as f64 / 1024.0 / f64::from(args.streams)
    };
    let orchestrator_kib = per_stream_kib(|r| r.orchestrator);
    println!(
        "memory: orchestratord {:.1} MiB fresh, {:.1} MiB at most with {} streams open: {:.1} KiB \
         per open stream ((peak - fresh) / streams; target <= 24 KiB: {}); pool-managerd {:.1} \
         MiB fresh, {:.1} MiB at most ({:.2} KiB per lease)",
        rss_fresh.orchestrator as f64 / MIB,
        peak.orchestrator as f64 / MIB,
        args.streams,
        orchestrator_kib,
        verdict(orchestrator_kib <= 24.0),
        rss_fresh.sidecar as f64 / MIB,
        peak.sidecar as f64 / MIB,
        per_stream_kib(|r| r.sidecar),
    );
    let sidecar_per_chunk = per_chunk(&relayed, &|r| Some(r.cpu.sidecar)).unwrap_or(f64::NAN);
    println!(
        "pool-managerd CPU: {:.1} us per request (all its CPU in the orchestrated rounds / \
         requests; {sidecar_per_chunk:.1} us per relayed data: event)",
        relayed.iter().map(|r| r.cpu.sidecar).sum::<u64>() as f64
            / 1e3
            / (u64::from(args.rounds) * u64::from(args.streams)) as f64
    );
    if peer_count > 0 {
        println!();
        println!(
            "against vllm-router, same run (paired by round; ratio: orchestrated's figure / the \
             peer's; orchestrated relay CPU = orchestratord alone, + pool-managerd in brackets)"
        );
        let ours_p50 = added_per_round(&relayed, 50.0);
        let ours_p99 = added_per_round(&relayed, 99.0);
        let ours_cpu: Vec<f64> = relayed
            .iter()
            .map(|r| r.cpu.orchestrator as f64 / r.events as f64)
            .collect();
        let lower =
            |ours: &[f64], theirs: &[f64]| ours.iter().zip(theirs).filter(|(o, t)| o < t).count();
        for index in 0..peer_count {
            let route = Route::Peer(index);
            let set = of(route);
            if set.iter().all(|r| r.ttft_ms.is_empty()) {
                println!(
                    "  vs {:<13} no stream through it succeeded in the measured rounds",
                    route.name()
                );
                continue;
            }
            let theirs_p50 = added_per_round(&set, 50.0);
            let theirs_p99 = added_per_round(&set, 99.0);
            let theirs_cpu: Vec<f64> = set
                .iter()
                .map(|r| r.relay_cpu().unwrap_or(0) as f64 / r.events as f64)
                .collect();
            let peer_us = per_chunk(&set, &Round::relay_cpu).unwrap_or(f64::NAN);
            let peer_tps = mean(set.iter().map(|r| r.tokens_per_s()));
            println!(
                "  vs {:<13} added TTFT p50 {added_p50:+.2} vs {:+.2} ms (orchestrated lower in {} \
                 of {} rounds), p99 {added_p99:+.2} vs {:+.2} ms (lower in {} of {}); relay CPU \
                 per chunk {relay_cpu_us:.1} ({:.1}) vs {peer_us:.1} us = {:.2}x ({:.2}x) (lower \
                 in {} of {}); peak RSS {:.1} vs {:.1} MiB; tokens/s {:.1}% of the peer's",
                route.name(),
                median(&theirs_p50),
                lower(&ours_p50, &theirs_p50),
                ours_p50.len().min(theirs_p50.len()),
                median(&theirs_p99),
                lower(&ours_p99, &theirs_p99),
                ours_p99.len().min(theirs_p99.len()),
                relay_cpu_us + sidecar_per_chunk,
                relay_cpu_us / peer_us,
                (relay_cpu_us + sidecar_per_chunk) / peer_us,
                lower(&ours_cpu, &theirs_cpu),
                ours_cpu.len().min(theirs_cpu.len()),
                peak.orchestrator as f64 / MIB,
                peak_rss(&set).relay(route).unwrap_or(0) as f64 / MIB,
                100.0 * mean(relayed.iter().map(|r| r.tokens_per_s())) / peer_tps,
            );
        }
    }
    let range = |values: &[f64], decimals: usize| -> String {
        let finite = || values.iter().copied().filter(|v| v.is_finite());
        let low = finite().fold(f64::INFINITY, f64::min);
        let high = finite().fold(f64::NEG_INFINITY, f64::max);
        if low > high {
            "-".to_owned()
        } else {
            format!("{low:.decimals$}..{high:.decimals$}")
        }
    };
    let direct_p50: Vec<f64> = direct
        .iter()
        .map(|r| percentile(&r.ttft_ms, 50.0))
        .collect();
    let direct_p99: Vec<f64> = direct
        .iter()
        .map(|r| percentile(&r.ttft_ms, 99.0))
        .collect();
    let direct_tps: Vec<f64> = direct.iter().map(|r| r.tokens_per_s()).collect();
    println!();
    println!(
        "spread over the {} measured rounds (min..max): the engine's own (direct path) TTFT p50 {} \
         ms, p99 {} ms, tokens/s {}",
        args.rounds,
        range(&direct_p50, 2),
        range(&direct_p99, 2),
        range(&direct_tps, 0)
    );
    for target in targets.iter().filter(|t| t.route != Route::Direct) {
        let set = of(target.route);
        let cpu: Vec<f64> = set
            .iter()
            .map(|r| r.relay_cpu().unwrap_or(0) as f64 / 1e3 / r.events as f64)
            .collect();
        println!(
            "  {:<13} added TTFT p50 {} ms, p99 {} ms; relay CPU per chunk {} us",
            target.route.name(),
            range(&added_per_round(&set, 50.0), 2),
            range(&added_per_round(&set, 99.0), 2),
            range(&cpu, 1)
        );
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "relay-bench: {} streams x {} tokens, {}, {} pool(s), {} measured rounds per path",
            args.streams,
            args.tokens,
            match args.real_engine() {
                Some(_) => "llama-server".to_owned(),
                None => format!("engine double at {} ms/token", args.token_delay_ms),
            },
            args.pools,
            args.rounds
        );
        let engine_us = per_chunk(&direct, &|r| Some(r.cpu.engine)).unwrap_or(f64::NAN);
        write_plot(path, &title, &plotted, engine_us)?;
        println!("plot: {}", path.display());
    }
    let fatal = failures.iter().filter(|(route, _)| route.ours()).count();
    if failures.is_empty() {
        println!(
            "correctness: all {checked} streams (warm-up included) had exactly {} content chunks, \
             a finish_reason, usage.completion_tokens = {} and [DONE] last: OK",
            args.tokens, args.tokens
        );
    } else {
        println!(
            "correctness: {} of {checked} streams FAILED ({fatal} direct or through \
             orchestratord, which fail the run; the rest through vllm-router, counted in the \
             table); first ones per path:",
            failures.len()
        );
        for target in &targets {
            for (_, failure) in failures
                .iter()
                .filter(|(route, _)| *route == target.route)
                .take(5)
            {
                // Each failure already names its path.
                println!("  {failure}");
            }
        }
        for (index, router) in peers.routers.iter().enumerate() {
            if failures
                .iter()
                .any(|(route, _)| *route == Route::Peer(index))
            {
                let log = std::fs::read_to_string(router.log()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                println!(
                    "  {} log, last lines:\n{}",
                    Route::Peer(index).name(),
                    lines[lines.len().saturating_sub(10)..].join("\n")
                );
            }
        }
    }
    Ok(fatal == 0)
}

/// What the plot shows of one path.
struct PlotPath {
    route: Route,
    /// Every stream's TTFT over the measured rounds.
    ttft_ms: Vec<f64>,
    /// Its relaying process's CPU per chunk (none for the direct path).
    relay_us: Option<f64>,
    /// pool-managerd's CPU per chunk, stacked on orchestratord's bar (orchestrated path only).
    sidecar_us: Option<f64>,
}

/// Most points one path's CDF is drawn with (keeps the SVG small).
const CDF_POINTS: usize = 200;

/// The empirical CDF of `sorted` as line points: a step per value, or, for more values than
/// [`CDF_POINTS`], that many evenly spaced quantiles (the same curve at the plot's resolution).
fn cdf_points(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n <= CDF_POINTS {
        return sorted
            .iter()
            .enumerate()
            .flat_map(|(k, &v)| [(v, k as f64 / n as f64), (v, (k + 1) as f64 / n as f64)])
            .collect();
    }
    let mut points = vec![(sorted[0], 0.0)];
    for step in 1..=CDF_POINTS {
        // The value a `step / CDF_POINTS` share of the way through (1-based rank).
        let rank = (step * n).div_ceil(CDF_POINTS);
        points.push((sorted[rank - 1], rank as f64 / n as f64));
    }
    points
}

fn route_color(route: Route) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match route {
        Route::Direct => RGBColor(60, 60, 60),
        Route::Orchestrated => RGBColor(31, 119, 180),
        Route::Peer(0) => RGBColor(214, 39, 40),
        Route::Peer(_) => RGBColor(255, 127, 14),
    }
}

/// Writes the SVG: left, the TTFT CDF of every path; right, the CPU per chunk of every path's
/// relaying process (pool-managerd's share stacked on orchestratord's), next to the engine's own
/// CPU per chunk on the direct path for scale.
fn write_plot(path: &Path, title: &str, paths: &[PlotPath], engine_us: f64) -> Result<(), String> {
    draw_plot(path, title, paths, engine_us)
        .map_err(|e| format!("cannot write the plot {}: {e}", path.display()))
}

fn draw_plot(
    path: &Path,
    title: &str,
    paths: &[PlotPath],
    engine_us: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(640);

    let x_max = paths
        .iter()
        .flat_map(|p| p.ttft_ms.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.05;
    let mut cdf = ChartBuilder::on(&left)
        .caption(
            "TTFT CDF per path (every stream of the measured rounds)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    cdf.configure_mesh()
        .max_light_lines(2)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_desc("time to first token, ms")
        .y_desc("fraction of streams")
        .draw()?;
    for path in paths {
        let mut sorted: Vec<f64> = path
            .ttft_ms
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        sorted.sort_by(f64::total_cmp);
        let color = route_color(path.route);
        cdf.draw_series(LineSeries::new(cdf_points(&sorted), color.stroke_width(2)))?
            .label(path.route.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    cdf.configure_series_labels()
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // Bars: each relaying path, then the engine on the direct path.
    let mut bars: Vec<(String, f64, f64, RGBColor)> = paths
        .iter()
        .filter_map(|p| {
            Some((
                match p.route {
                    Route::Orchestrated => "orchestratord (+pool-m)".to_owned(),
                    route => route.name().to_owned(),
                },
                p.relay_us?,
                p.sidecar_us.unwrap_or(0.0),
                route_color(p.route),
            ))
        })
        .collect();
    bars.push((
        "engine (direct)".to_owned(),
        engine_us,
        0.0,
        RGBColor(140, 140, 140),
    ));
    let y_max = bars
        .iter()
        .map(|(_, relay, extra, _)| relay + extra)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.2;
    let labels: Vec<String> = bars.iter().map(|(name, ..)| name.clone()).collect();
    // `(0..n).into_segmented()` has n + 1 segments: one per bar is 0..len - 1.
    let last = i32::try_from(bars.len().saturating_sub(1).max(1))?;
    let mut cpu = ChartBuilder::on(&right)
        .caption(
            "relaying process CPU per chunk (light: pool-managerd)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..y_max)?;
    cpu.configure_mesh()
        .max_light_lines(2)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|value| match value {
            SegmentValue::CenterOf(index) => usize::try_from(*index)
                .ok()
                .and_then(|index| labels.get(index))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("us of CPU per data: event")
        .draw()?;
    let sidecar_color = RGBColor(158, 202, 225);
    for (index, (_, relay, extra, color)) in bars.iter().enumerate() {
        let index = i32::try_from(index)?;
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(index), 0.0),
                (SegmentValue::Exact(index + 1), *relay),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 14, 14);
        cpu.draw_series(std::iter::once(bar))?;
        if *extra > 0.0 {
            let mut stacked = Rectangle::new(
                [
                    (SegmentValue::Exact(index), *relay),
                    (SegmentValue::Exact(index + 1), relay + extra),
                ],
                sidecar_color.filled(),
            );
            stacked.set_margin(0, 0, 14, 14);
            cpu.draw_series(std::iter::once(stacked))?;
        }
        let text = if *extra > 0.0 {
            format!("{relay:.1} + {extra:.1}")
        } else {
            format!("{relay:.1}")
        };
        cpu.draw_series(std::iter::once(Text::new(
            text,
            (SegmentValue::CenterOf(index), relay + extra + y_max * 0.02),
            ("sans-serif", 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))?;
    }
    root.present()?;
    Ok(())
}
