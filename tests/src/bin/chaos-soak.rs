//! `chaos-soak`: the whole product under faults, bounded in time, on loopback and Unix sockets
//! only. It owns the soak's load, its fault schedule and its final accounting; the stack itself
//! comes from the shared builder ([`e2e::stack`]).
//!
//! The stack: pool-managerd supervising `--pools` managed pools of one model, each running
//! `test-engine-double` (a FAKE engine: filler words, `--token-delay-ms` between two tokens) with
//! `--slots` slots, restarted quickly and without limit when it dies; orchestratord in front with
//! room to queue every client, a 2 s stall limit (which also cuts off a client that stops reading)
//! and 2 s keep-alives.
//!
//! The load: `--concurrency` clients, each running streamed `POST /v1/chat/completions` one after
//! another until `--duration-secs` have passed, so that about that many streams are always in
//! flight. Most read their stream to the end; some drop the connection on purpose (after a few
//! events, or after a random time whatever the request is doing then: queued, placed, streaming);
//! some are slow readers (a small receive buffer, long answers, a stall after the first event).
//! A client refused with an HTTP error waits a second or so before its next request.
//! Every stream is classified: completed (`[DONE]` after content whose count matches the usage
//! chunk), failed with a typed error (an HTTP error status with a JSON error code, or an SSE error
//! event with one), dropped by the client, cut off (a slow reader whose connection the server
//! closed after it stalled), or broken: anything else (a stream that ends without `[DONE]` or an
//! error, a malformed frame, an answer without a code, no end within the per-request bound).
//!
//! The faults, from a seeded RNG (`--seed`; printed), one at a time at random intervals: SIGKILL
//! a pool's engine, SIGSTOP one for a few seconds (then SIGCONT), SIGKILL pool-managerd and start
//! it again on its socket and state (it adopts the engines that survived; orchestratord
//! reconnects by itself). Processes are signalled by pid, an engine only while its recorded start
//! time still matches, never by name.
//!
//! At the end: faults stop, the clients finish (bounded), and the soak checks that no lease is
//! left (pool-managerd's shim), that orchestratord's in-flight gauge is back at 0, that no engine
//! process of the stack runs besides the pools' current engines (and none once the stack is
//! stopped), and prints the daemons' RSS before and after. Exit status 1 when a stream broke or
//! anything leaked.

use clap::Parser;
use e2e::sidecar::{recorded_engine, start_ticks};
use e2e::stack::{Stack, double_pool};
use e2e::{binary, http};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MODEL: &str = "chaos";
/// orchestratord's stall limit: an engine silent this long mid-stream fails the stream, and a
/// client that reads nothing for this long is cut off.
const DECODE_STALL: Duration = Duration::from_secs(2);
/// How long a request may wait in orchestratord's queue.
const QUEUE_DEADLINE: Duration = Duration::from_secs(60);
/// How long a slow reader stops reading after its first event (well past the stall limit).
const SLOW_STALL: Duration = Duration::from_secs(15);
/// A slow reader's socket receive buffer (the kernel doubles it), so that its window closes soon.
const SLOW_RECV_BUFFER: u32 = 4096;
/// The most a stream may take, queueing included, before it counts as hung (broken).
const REQUEST_BOUND: Duration = Duration::from_secs(150);
/// How long the end-of-run checks wait for the stack to settle (leases back, pools ready).
const SETTLE: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(
    about = "Chaos soak: concurrent streams through orchestratord over engine-double pools while \
             engines and pool-managerd are killed and stopped; fails on a broken stream or a leak"
)]
struct Args {
    /// Seconds of load and faults (the drain and the checks come after).
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Streams kept in flight.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: u32,
    /// Pools of the one model.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pools: u32,
    /// Slots per pool.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    slots: u32,
    /// The engine double's pause between two tokens of a stream.
    #[arg(long, default_value_t = 25)]
    token_delay_ms: u64,
    /// Mean pause between two faults (each pause is drawn from half to one and a half times it).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..))]
    fault_every_ms: u64,
    /// The RNG seed of the faults and the clients' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_nanos() as u64)
    });
    println!(
        "chaos-soak: seed {seed}, {} s, {} concurrent streams, {} pools x {} slots \
         (test engine double, {} ms/token)",
        args.duration_secs, args.concurrency, args.pools, args.slots, args.token_delay_ms
    );
    let mut stack = start_stack(&args);
    let api: SocketAddr = match stack.api().parse() {
        Ok(api) => api,
        Err(error) => {
            eprintln!(
                "chaos-soak: orchestratord's address {}: {error}",
                stack.api()
            );
            return ExitCode::FAILURE;
        }
    };
    let pools: Vec<String> = (0..args.pools).map(|i| format!("p{i}")).collect();
    let rss_before = (
        rss_kib(stack.orchestrator().pid()),
        rss_kib(stack.sidecar.pid()),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chaos-soak: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration_secs);
    let (tally, faults) = std::thread::scope(|scope| {
        let chaos = scope.spawn(|| {
            let mut chaos = Chaos {
                stack: &mut stack,
                pools: &pools,
                rng: StdRng::seed_from_u64(seed),
                started,
                counts: FaultCounts::default(),
                stopped: Vec::new(),
            };
            chaos.run(until, args.fault_every_ms);
            chaos.counts
        });
        let tally = runtime.block_on(load(api, &args, seed, until));
        let faults = chaos
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (tally, faults)
    });
    let clients_done = started.elapsed();
    let checks = Checks::take(&stack, &pools);
    let rss_after = (
        rss_kib(stack.orchestrator().pid()),
        rss_kib(stack.sidecar.pid()),
    );
    let hwm = peak_rss_kib(stack.orchestrator().pid());
    let dir = stack.path().to_owned();
    drop(stack);
    // A SIGKILLed engine may take a moment to die.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after_stop = stack_engines(&dir).len();
    while after_stop > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after_stop = stack_engines(&dir).len();
    }
    let report = Report {
        tally,
        faults,
        checks,
        after_stop,
        rss_before,
        rss_after,
        orchestrator_peak: hwm,
        clients_done,
    };
    report.print();
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The stack: `--pools` engine-double pools of [`MODEL`] that restart quickly and without limit,
/// and orchestratord with room for every client.
fn start_stack(args: &Args) -> Stack {
    let delay = args.token_delay_ms.to_string();
    let flags = ["--token-delay-ms", &delay, "--ctx", "8192"];
    let mut builder = Stack::builder();
    for i in 0..args.pools {
        let pool = double_pool(&format!("p{i}"), MODEL, args.slots, &flags);
        builder = builder.pool(&format!(
            "{pool}[pool.restart]\ninitial_ms = 200\nmax_ms = 2000\nmax_restarts = 100000\n\
             window_ms = 60000\nreset_after_ms = 10000\n"
        ));
    }
    builder
        .orchestrator(&format!(
            "[admission]\ncapacity = {}\nqueue_deadline_ms = {}\n\
             [streaming]\ndecode_stall_ms = {}\nkeepalive_ms = 2000\n",
            (args.concurrency * 2).max(1024),
            QUEUE_DEADLINE.as_millis(),
            DECODE_STALL.as_millis(),
        ))
        .startup(Duration::from_secs(30))
        .start()
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Default)]
struct FaultCounts {
    engine_kills: u32,
    engine_stops: u32,
    sidecar_restarts: u32,
    /// Faults skipped because the chosen pool had no live engine at that moment.
    skipped: u32,
}

struct Chaos<'a> {
    stack: &'a mut Stack,
    pools: &'a [String],
    rng: StdRng,
    started: Instant,
    counts: FaultCounts,
    /// Engines stopped now, continued when their time comes.
    stopped: Vec<Stopped>,
}

/// An engine this soak stopped with SIGSTOP.
struct Stopped {
    pid: i32,
    ticks: u64,
    until: Instant,
}

impl Stopped {
    /// SIGCONT, unless pool-managerd has killed it meanwhile: a pid whose start time changed is
    /// someone else's.
    fn resume(self) {
        if start_ticks(self.pid as u64) == Some(self.ticks) {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        }
    }
}

impl Chaos<'_> {
    /// Injects faults until `until`, one at a time, though a stopped engine stays stopped while
    /// later faults come; leaves every engine running (continued).
    fn run(&mut self, until: Instant, every_ms: u64) {
        loop {
            let pause =
                Duration::from_millis(self.rng.random_range(every_ms / 2..=every_ms * 3 / 2));
            let next = Instant::now() + pause;
            if next >= until {
                break;
            }
            self.continue_until(next);
            match self.rng.random_range(0..6) {
                0..=2 => self.kill_engine(),
                3 | 4 => self.stop_engine(),
                _ => self.restart_sidecar(),
            }
        }
        for stopped in std::mem::take(&mut self.stopped) {
            stopped.resume();
        }
    }

    /// Sleeps until `when`, continuing each stopped engine when its time comes.
    fn continue_until(&mut self, when: Instant) {
        loop {
            let now = Instant::now();
            let (due, waiting) = std::mem::take(&mut self.stopped)
                .into_iter()
                .partition(|stopped| stopped.until <= now);
            self.stopped = waiting;
            for stopped in due {
                stopped.resume();
            }
            if now >= when {
                return;
            }
            let wake = self
                .stopped
                .iter()
                .map(|stopped| stopped.until)
                .fold(when, Instant::min);
            std::thread::sleep(wake.saturating_duration_since(now));
        }
    }

    fn log(&self, what: &str) {
        println!("  {:>6.1} s  {what}", self.started.elapsed().as_secs_f64());
    }

    /// A random pool and its engine's pid and start time, while the engine is alive.
    fn engine(&mut self) -> Option<(String, i32, u64)> {
        let pool = self.pools[self.rng.random_range(0..self.pools.len())].clone();
        match recorded_engine(self.stack.path(), &pool) {
            Some((pid, ticks)) if start_ticks(pid as u64) == Some(ticks) => {
                Some((pool, pid, ticks))
            }
            _ => {
                self.counts.skipped += 1;
                self.log(&format!("{pool}: no live engine, fault skipped"));
                None
            }
        }
    }

    fn kill_engine(&mut self) {
        let Some((pool, pid, _)) = self.engine() else {
            return;
        };
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            self.counts.engine_kills += 1;
            self.log(&format!("SIGKILL engine of {pool} (pid {pid})"));
        }
    }

    fn stop_engine(&mut self) {
        let Some((pool, pid, ticks)) = self.engine() else {
            return;
        };
        if self.stopped.iter().any(|stopped| stopped.pid == pid) {
            return;
        }
        let pause = Duration::from_millis(self.rng.random_range(1000..=4000));
        if kill(Pid::from_raw(pid), Signal::SIGSTOP).is_err() {
            return;
        }
        self.counts.engine_stops += 1;
        self.log(&format!(
            "SIGSTOP engine of {pool} (pid {pid}) for {:.1} s",
            pause.as_secs_f64()
        ));
        self.stopped.push(Stopped {
            pid,
            ticks,
            until: Instant::now() + pause,
        });
    }

    fn restart_sidecar(&mut self) {
        let down = Duration::from_millis(self.rng.random_range(0..=2000));
        let pid = self.stack.sidecar.pid();
        self.stack.sidecar.kill_with(Signal::SIGKILL);
        self.counts.sidecar_restarts += 1;
        self.log(&format!(
            "SIGKILL pool-managerd (pid {pid}), restart in {:.1} s",
            down.as_secs_f64()
        ));
        std::thread::sleep(down);
        let stack = &mut *self.stack;
        stack.restart_sidecar();
        self.log(&format!(
            "pool-managerd is back (pid {})",
            self.stack.sidecar.pid()
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Reads its stream to the end.
    Reader,
    /// Drops the connection after this many events.
    Dropper(u32),
    /// Drops the connection this long after sending, whatever the request is doing then (in
    /// the queue, waiting for its engine, streaming).
    Impatient(Duration),
    /// Stops reading for [`SLOW_STALL`] after its first event.
    Slow,
}

#[derive(Debug)]
enum Outcome {
    Completed,
    /// An error code (an HTTP error status's or an SSE error event's).
    Typed(String),
    Dropped,
    CutOff,
    Broken(String),
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    completed: u64,
    typed: BTreeMap<String, u64>,
    dropped: u64,
    cut_off: u64,
    slow_readers: u64,
    broken: u64,
    /// The first few broken streams' stories.
    broken_examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, client: Client, outcome: Outcome) {
        self.requests += 1;
        if client == Client::Slow {
            self.slow_readers += 1;
        }
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Typed(code) => *self.typed.entry(code).or_default() += 1,
            Outcome::Dropped => self.dropped += 1,
            Outcome::CutOff => self.cut_off += 1,
            Outcome::Broken(story) => {
                self.broken += 1;
                if self.broken_examples.len() < 10 {
                    self.broken_examples.push(format!("{client:?}: {story}"));
                }
            }
        }
    }
}

/// Runs `--concurrency` clients until `until`, then waits for their last streams.
async fn load(api: SocketAddr, args: &Args, seed: u64, until: Instant) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let tally = Arc::clone(&tally);
        let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(i) + 1).wrapping_mul(0x9E37_79B9));
        clients.spawn(async move {
            // Spread the first requests over a second rather than one burst.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
            while Instant::now() < until {
                let client = match rng.random_range(0..100) {
                    0..=1 => Client::Slow,
                    2..=9 => Client::Dropper(rng.random_range(1..=20)),
                    10..=14 => {
                        Client::Impatient(Duration::from_millis(rng.random_range(50..=3000)))
                    }
                    _ => Client::Reader,
                };
                let max_tokens = match client {
                    Client::Slow => rng.random_range(800..=1200),
                    _ => rng.random_range(10..=80),
                };
                let (bound, late) = match client {
                    Client::Impatient(patience) => (patience, Outcome::Dropped),
                    _ => (
                        REQUEST_BOUND,
                        Outcome::Broken(format!("no end within {} s", REQUEST_BOUND.as_secs())),
                    ),
                };
                let outcome = tokio::time::timeout(bound, stream(api, client, max_tokens))
                    .await
                    .unwrap_or(late);
                // A refused request is retried after a pause, as a client honouring
                // Retry-After does, rather than at once.
                let refused = matches!(&outcome, Outcome::Typed(code) if code.starts_with("HTTP"));
                tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(client, outcome);
                if refused {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(500..=1500))).await;
                }
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        if let Err(error) = joined {
            eprintln!("chaos-soak: a client task failed: {error}");
        }
    }
    std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner))
}

/// One streamed chat completion on its own connection, classified.
async fn stream(api: SocketAddr, client: Client, max_tokens: u32) -> Outcome {
    let socket = match tokio::net::TcpSocket::new_v4() {
        Ok(socket) => socket,
        Err(error) => return Outcome::Broken(format!("no socket: {error}")),
    };
    if client == Client::Slow
        && let Err(error) = socket.set_recv_buffer_size(SLOW_RECV_BUFFER)
    {
        return Outcome::Broken(format!("cannot shrink the receive buffer: {error}"));
    }
    let tcp = match socket.connect(api).await {
        Ok(tcp) => tcp,
        Err(error) => return Outcome::Broken(format!("connect: {error}")),
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await {
            Ok(pair) => pair,
            Err(error) => return Outcome::Broken(format!("handshake: {error}")),
        };
    // Dropped with this function's future, which closes the connection.
    let connection = AbortOnDrop(tokio::spawn(connection));
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let request = Request::post("/v1/chat/completions")
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())));
    let request = match request {
        Ok(request) => request,
        Err(error) => return Outcome::Broken(format!("request: {error}")),
    };
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => return Outcome::Broken(format!("no response head: {error}")),
    };
    let outcome = if response.status().is_success() {
        read_stream(response, client).await
    } else {
        error_answer(response).await
    };
    drop(connection);
    outcome
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A non-2xx answer: typed when its JSON body carries an error code.
async fn error_answer(response: Response<Incoming>) -> Outcome {
    let status = response.status().as_u16();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return Outcome::Broken(format!("HTTP {status}, body cut: {error}")),
    };
    match serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|value| error_code(&value))
    {
        Some(code) => Outcome::Typed(format!("HTTP {status} {code}")),
        None => Outcome::Broken(format!(
            "HTTP {status} without an error code: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// The code of an OpenAI-shaped error body (`{"error": {"code": …}}`), a string or an engine's
/// number.
fn error_code(value: &Value) -> Option<String> {
    match &value.get("error")?.get("code")? {
        Value::String(code) => Some(code.clone()),
        Value::Number(code) => Some(format!("engine {code}")),
        _ => None,
    }
}

/// What a stream has shown so far.
#[derive(Debug, Default)]
struct Seen {
    events: u32,
    content: u64,
    usage: Option<u64>,
    finish: bool,
    done: bool,
    error: Option<String>,
}

impl Seen {
    /// Takes one SSE `data:` payload; `Err` for a malformed or misplaced one.
    fn data(&mut self, payload: &str) -> Result<(), String> {
        if self.done || self.error.is_some() {
            return Err(format!("data after the end: {payload}"));
        }
        self.events += 1;
        if payload == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Value =
            serde_json::from_str(payload).map_err(|e| format!("not JSON ({e}): {payload}"))?;
        if chunk.get("error").is_some() {
            let code =
                error_code(&chunk).ok_or_else(|| format!("error without a code: {payload}"))?;
            self.error = Some(code);
            return Ok(());
        }
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            self.usage = Some(tokens);
        }
        let choices = chunk["choices"]
            .as_array()
            .ok_or_else(|| format!("a chunk without choices: {payload}"))?;
        for choice in choices {
            if choice["delta"]["content"]
                .as_str()
                .is_some_and(|content| !content.is_empty())
            {
                self.content += 1;
            }
            if choice["finish_reason"].is_string() {
                self.finish = true;
            }
        }
        Ok(())
    }
}

/// Reads a 200 answer's SSE stream as `client` does and classifies it.
async fn read_stream(response: Response<Incoming>, client: Client) -> Outcome {
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    let mut seen = Seen::default();
    let mut stalled = false;
    let ended = loop {
        let frame = match body.frame().await {
            None => break None,
            Some(Err(error)) => break Some(error.to_string()),
            Some(Ok(frame)) => frame,
        };
        let Ok(bytes) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Ok(event) = std::str::from_utf8(&event) else {
                return Outcome::Broken("an event that is not UTF-8".into());
            };
            for line in event.lines() {
                if let Some(payload) = line.strip_prefix("data:") {
                    if let Err(story) = seen.data(payload.trim_start()) {
                        return Outcome::Broken(story);
                    }
                } else if !line.is_empty() && !line.starts_with(':') && !line.starts_with("event:")
                {
                    return Outcome::Broken(format!("not an SSE line: {line:?}"));
                }
            }
            if seen.done || seen.error.is_some() {
                continue;
            }
            match client {
                Client::Dropper(after) if seen.events >= after => return Outcome::Dropped,
                Client::Slow if seen.events >= 1 && !stalled => {
                    stalled = true;
                    tokio::time::sleep(SLOW_STALL).await;
                }
                _ => {}
            }
        }
    };
    let partial = !buffer.iter().all(u8::is_ascii_whitespace);
    if partial && (seen.done || seen.error.is_some()) {
        return Outcome::Broken(format!(
            "bytes after the end: {}",
            String::from_utf8_lossy(&buffer)
        ));
    }
    if let Some(code) = seen.error {
        return Outcome::Typed(format!("SSE {code}"));
    }
    if seen.done {
        return match seen.usage {
            Some(tokens) if tokens == seen.content && seen.finish => Outcome::Completed,
            usage => Outcome::Broken(format!(
                "[DONE] after {} content chunks, usage {usage:?}, finish_reason seen: {}",
                seen.content, seen.finish
            )),
        };
    }
    // A connection the server aborted may end mid-event.
    if stalled {
        return Outcome::CutOff;
    }
    Outcome::Broken(format!(
        "ended after {} events without [DONE] or an error ({}){}",
        seen.events,
        ended.as_deref().unwrap_or("clean end of body"),
        if partial { ", mid-event" } else { "" }
    ))
}

// ---------------------------------------------------------------------------------------------
// End-of-run checks

struct Checks {
    /// Sum of the pools' `active_leases` once the clients are done (after waiting for 0).
    leases: u64,
    /// orchestratord's `orchestratord_in_flight` (after waiting for 0).
    in_flight: f64,
    /// orchestratord's `orchestratord_queue_depth`, all classes (after waiting for 0).
    queued: f64,
    /// Engine processes of the stack that are no pool's current engine.
    stray_engines: Vec<u32>,
    /// Pools not ready at the end (after waiting).
    unready: Vec<String>,
}

impl Checks {
    fn take(stack: &Stack, pools: &[String]) -> Checks {
        let deadline = Instant::now() + SETTLE;
        let leases = || -> u64 {
            pools
                .iter()
                .map(|pool| {
                    let status = stack.pool_status(pool);
                    status["active_leases"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("no active_leases in {pool}'s status: {status}"))
                })
                .sum()
        };
        let mut held = leases();
        while held > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            held = leases();
        }
        let mut in_flight = stack.metric("orchestratord_in_flight");
        while in_flight != 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            in_flight = stack.metric("orchestratord_in_flight");
        }
        let mut queued = queue_depth(stack);
        while queued != 0.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            queued = queue_depth(stack);
        }
        let unready = || -> Vec<String> {
            pools
                .iter()
                .filter(|pool| stack.pool_status(pool)["ready"] != true)
                .cloned()
                .collect()
        };
        let mut not_ready = unready();
        while !not_ready.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            not_ready = unready();
        }
        // A stray engine is one that stays: pool-managerd may be between an engine's death and
        // its record, so the scan is repeated until it is clean or the deadline passes.
        let strays = || -> Vec<u32> {
            let current: Vec<u32> = pools
                .iter()
                .filter_map(|pool| recorded_engine(stack.path(), pool))
                .filter_map(|(pid, _)| u32::try_from(pid).ok())
                .collect();
            stack_engines(stack.path())
                .into_iter()
                .filter(|pid| !current.contains(pid))
                .collect()
        };
        let mut stray_engines = strays();
        while !stray_engines.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            stray_engines = strays();
        }
        Checks {
            leases: held,
            in_flight,
            queued,
            stray_engines,
            unready: not_ready,
        }
    }
}

/// The sum of orchestratord's `orchestratord_queue_depth` samples (one per request class).
fn queue_depth(stack: &Stack) -> f64 {
    let metrics = http::get(&stack.api(), "/metrics", Duration::from_secs(10))
        .unwrap_or_else(|error| panic!("orchestratord's /metrics: {error}"))
        .text();
    metrics
        .lines()
        .filter(|line| line.starts_with("orchestratord_queue_depth{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Live `test-engine-double` processes started for the stack under `dir` (their command line
/// names a path in it; a zombie has neither an `exe` link nor a command line, so it is not one).
fn stack_engines(dir: &Path) -> Vec<u32> {
    let engine = binary("test-engine-double");
    let dir = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let exe = std::fs::read_link(proc.join("exe")).ok();
            let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
            exe.as_deref() == Some(engine.as_path())
                && String::from_utf8_lossy(&cmdline).contains(&dir)
        })
        .collect()
}

/// A `/proc/PID/status` value in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

struct Report {
    tally: Tally,
    faults: FaultCounts,
    checks: Checks,
    after_stop: usize,
    rss_before: (Option<u64>, Option<u64>),
    rss_after: (Option<u64>, Option<u64>),
    orchestrator_peak: Option<u64>,
    clients_done: Duration,
}

impl Report {
    fn passed(&self) -> bool {
        self.tally.broken == 0
            && self.checks.leases == 0
            && self.checks.in_flight == 0.0
            && self.checks.queued == 0.0
            && self.checks.stray_engines.is_empty()
            && self.after_stop == 0
    }

    fn print(&self) {
        let t = &self.tally;
        let f = &self.faults;
        let c = &self.checks;
        let typed: u64 = t.typed.values().sum();
        let mib = |kib: Option<u64>| {
            kib.map_or("?".to_owned(), |kib| {
                format!("{:.1} MiB", kib as f64 / 1024.0)
            })
        };
        println!();
        println!(
            "faults: {} engine SIGKILL, {} engine SIGSTOP (1-4 s), {} pool-managerd SIGKILL + restart, {} skipped (no live engine)",
            f.engine_kills, f.engine_stops, f.sidecar_restarts, f.skipped
        );
        println!(
            "last stream ended {:.1} s after the start",
            self.clients_done.as_secs_f64()
        );
        println!("{:<38}{:>8}", "requests", t.requests);
        println!("{:<38}{:>8}", "  completed ([DONE])", t.completed);
        println!("{:<38}{:>8}", "  failed with a typed error", typed);
        for (code, count) in &t.typed {
            println!("{:<38}{:>8}", format!("    {code}"), count);
        }
        println!("{:<38}{:>8}", "  dropped by the client", t.dropped);
        println!(
            "{:<38}{:>8}   (of {} slow readers)",
            "  cut off (slow reader)", t.cut_off, t.slow_readers
        );
        println!("{:<38}{:>8}   (must be 0)", "  broken", t.broken);
        for story in &t.broken_examples {
            println!("      {story}");
        }
        println!("{:<38}{:>8}   (must be 0)", "leases leaked", c.leases);
        println!(
            "{:<38}{:>8}   (must be 0)",
            "orchestratord_in_flight at the end", c.in_flight
        );
        println!(
            "{:<38}{:>8}   (must be 0)",
            "orchestratord_queue_depth at the end", c.queued
        );
        println!(
            "{:<38}{:>8}   (must be 0) {:?}",
            "engine processes leaked",
            c.stray_engines.len(),
            c.stray_engines
        );
        println!(
            "{:<38}{:>8}   (must be 0)",
            "engine processes after stack stop", self.after_stop
        );
        if !c.unready.is_empty() {
            println!("pools not ready at the end: {:?}", c.unready);
        }
        println!(
            "RSS orchestratord: {} before, {} after (peak {})",
            mib(self.rss_before.0),
            mib(self.rss_after.0),
            mib(self.orchestrator_peak)
        );
        println!(
            "RSS pool-managerd: {} before (first incarnation), {} after (incarnation {})",
            mib(self.rss_before.1),
            mib(self.rss_after.1),
            f.sidecar_restarts + 1
        );
        println!("{}", if self.passed() { "PASS" } else { "FAIL" });
    }
}
