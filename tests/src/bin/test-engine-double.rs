//! `test-engine-double`: a TEST DOUBLE of llama.cpp's `llama-server` for fault-injection tests.
//!
//! It is not an inference engine: it loads no model and computes nothing. It answers the control
//! endpoints a supervisor probes (`/health`, `/props`, `/slots`) and the generation endpoints a router
//! forwards to (`/completion`, `/v1/completions`, `/v1/chat/completions`) with llama-server's shapes,
//! status codes and streaming framing, generating filler words from a fixed list. It misbehaves on
//! request: a loading phase (`--load-ms`, `--never-ready`), a slow `/health` (`--health-delay-ms`),
//! slow tokens (`--token-delay-ms`), a socket that accepts and never answers (`--hang`) or closes at
//! once (`--refuse`), and a crash with a chosen exit code, on a timer (`--exit-after-ms`) or mid-stream
//! (`--crash-after-tokens`). `--model FILE` may carry the same knobs as JSON, so a supervisor that only
//! passes a model path can still choose the fault. Tests gate generation deterministically with
//! `POST /control/hold` / `POST /control/release`, read counters from `GET /control/stats` and the
//! last generation request's headers from `GET /control/last-request`, and write a line of their
//! choosing to the engine's log with `POST /control/log`.
//!
//! Layout: `Args` (flags) + `Knobs` (the model file) → `Profile` (the immutable behaviour of this
//! run) → `Engine` (the profile plus the little mutable state: busy slots, counters, the hold gate)
//! → `router` (every HTTP route, in one place) → `run` (serve, hang or refuse on an already-bound
//! listener until shutdown).
//!
//! Invariants: at most `slots` generations hold a [`Generation`] at once (extra requests wait, as in
//! llama-server); every generation ends in exactly one counter, `completed` or `cancelled`, because
//! the guard's `Drop` does the counting; a request error is answered before any stream byte, and once
//! SSE headers are out the status never changes.
//!
//! Contract with the harness (`e2e::Daemon`), which must not break: exactly one stdout line,
//! `READY listen=<address>`, printed only once the listener is bound; everything else goes to stderr.
//! SIGTERM/SIGINT exit 0 promptly (also mid-stream) and remove the socket file; the injected crashes
//! deliberately do not, because a crashed engine leaves its socket behind. A bad `--model` file exits
//! with status 3 before binding.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{Listener, ListenerExt as _};
use clap::Parser;
use hyper::body::Frame;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

const ABOUT: &str = "TEST DOUBLE of llama.cpp's llama-server, for fault-injection tests. \
It is a fake engine, not an inference engine: it loads no model, and its generation endpoints \
produce filler words from a fixed list.";

/// The fake vocabulary: token `i` of a generation is `WORDS[i % len]`, its id is that index.
const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "silver", "owls", "sing", "under", "quiet", "northern", "stars",
];

/// Tokens generated when the request sets no limit.
const DEFAULT_N_PREDICT: u64 = 16;

/// Exit status for an unusable `--model` file.
const MODEL_FILE_EXIT: u8 = 3;

/// How long a token-count crash waits after handing its last token to the HTTP layer, so that the
/// client sees exactly N tokens and then a dead connection (a real crash has flushed what it wrote).
const CRASH_FLUSH_GRACE: Duration = Duration::from_millis(25);

#[derive(Debug, Parser)]
#[command(name = "test-engine-double", version, about = ABOUT, long_about = ABOUT)]
struct Args {
    /// Where to listen: HOST:PORT (port 0 picks a free port) or, when it starts with '/', a Unix
    /// socket path (a stale socket file there is removed first).
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_listen)]
    listen: ListenAddr,

    /// Fake model file. If given it must exist and hold a JSON object of knob overrides (snake_case
    /// names of these flags, e.g. {"load_ms":500,"never_ready":true}); they win over the flags.
    /// Its file stem is the model alias. A missing or non-JSON file exits with status 3.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,

    /// Model alias reported by /props and in OpenAI replies [default: the --model file stem, else
    /// "test-double"].
    #[arg(long)]
    model_alias: Option<String>,

    /// Number of parallel slots: reported by /props and /slots, and enforced (at most this many
    /// generations run at once; extra requests wait, as in llama-server).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,

    /// Context size reported by /props (default_generation_settings.n_ctx). A prompt of this many
    /// words or more is refused with 400 exceed_context_size_error; generation stops when it is full.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    ctx: u32,

    /// Pretend to load the model for this long after the listener is bound: every API route answers
    /// 503 "Loading model" until then, as llama-server does.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    load_ms: u64,

    /// Never finish loading: /health (and every API route) answers 503 forever.
    #[arg(long)]
    never_ready: bool,

    /// Delay every /health answer by this long (a slow but alive engine).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    health_delay_ms: u64,

    /// Sleep this long between two generated tokens.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    token_delay_ms: u64,

    /// Close the connection after every streamed response (`Connection: close`), as llama-server
    /// does: a client then needs a new connection for each stream.
    #[arg(long)]
    close_after_stream: bool,

    /// Crash injection: exit the whole process with --exit-code right after the Nth generated token
    /// (counted across all requests), mid-stream, without any cleanup.
    #[arg(long, value_name = "N")]
    crash_after_tokens: Option<u64>,

    /// Accept connections but never answer anything; each socket is held until the client closes it.
    #[arg(long, conflicts_with = "refuse")]
    hang: bool,

    /// Accept connections and close them at once, without reading or answering anything.
    #[arg(long)]
    refuse: bool,

    /// Crash injection: exit the process this long after start, without any cleanup.
    #[arg(long, value_name = "MS")]
    exit_after_ms: Option<u64>,

    /// Exit code of the injected crashes (--exit-after-ms, --crash-after-tokens).
    #[arg(long, default_value_t = 1, value_name = "CODE")]
    exit_code: i32,
}

#[derive(Debug, Clone)]
enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn parse_listen(value: &str) -> Result<ListenAddr, String> {
    if value.starts_with('/') {
        return Ok(ListenAddr::Unix(PathBuf::from(value)));
    }
    value
        .parse()
        .map(ListenAddr::Tcp)
        .map_err(|e| format!("expected HOST:PORT or an absolute socket path: {e}"))
}

/// Knob overrides read from the `--model` file. Unknown keys are refused, so a typo in a test's
/// fault profile fails at startup instead of silently testing the happy path.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Knobs {
    slots: Option<u32>,
    ctx: Option<u32>,
    load_ms: Option<u64>,
    never_ready: Option<bool>,
    health_delay_ms: Option<u64>,
    token_delay_ms: Option<u64>,
    crash_after_tokens: Option<u64>,
    hang: Option<bool>,
    refuse: Option<bool>,
    exit_after_ms: Option<u64>,
    exit_code: Option<i32>,
}

impl Knobs {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| {
            format!(
                "model file {} is not a JSON object of test-engine-double knobs",
                path.display()
            )
        })
    }

    /// Writes every override into `args`, which then describes the whole run.
    fn apply(self, args: &mut Args) -> anyhow::Result<()> {
        let override_with = |target: &mut u64, value: Option<u64>| {
            if let Some(value) = value {
                *target = value;
            }
        };
        if let Some(slots) = self.slots {
            if slots == 0 {
                bail!("\"slots\" must be at least 1");
            }
            args.slots = slots;
        }
        if let Some(ctx) = self.ctx {
            if ctx == 0 {
                bail!("\"ctx\" must be at least 1");
            }
            args.ctx = ctx;
        }
        override_with(&mut args.load_ms, self.load_ms);
        override_with(&mut args.health_delay_ms, self.health_delay_ms);
        override_with(&mut args.token_delay_ms, self.token_delay_ms);
        args.never_ready = self.never_ready.unwrap_or(args.never_ready);
        args.crash_after_tokens = self.crash_after_tokens.or(args.crash_after_tokens);
        args.exit_after_ms = self.exit_after_ms.or(args.exit_after_ms);
        args.exit_code = self.exit_code.unwrap_or(args.exit_code);
        // The file decides the connection mode outright: one of them set there replaces the flags'.
        if self.hang.is_some() || self.refuse.is_some() {
            args.hang = self.hang.unwrap_or(false);
            args.refuse = self.refuse.unwrap_or(false);
        }
        if args.hang && args.refuse {
            bail!("\"hang\" and \"refuse\" cannot both be set");
        }
        Ok(())
    }
}

/// Reads the `--model` file, if one was named, into `args`; sets the default alias from its stem.
fn resolve_model(args: &mut Args) -> anyhow::Result<()> {
    let Some(path) = args.model.clone() else {
        return Ok(());
    };
    Knobs::read(&path)?
        .apply(args)
        .with_context(|| format!("model file {}", path.display()))?;
    if args.model_alias.is_none() {
        args.model_alias = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned());
    }
    Ok(())
}

/// What this run of the double does; fixed at start.
#[derive(Debug)]
struct Profile {
    /// When the pretend model load started (just after binding, as in llama-server, whose HTTP
    /// server is up while the model loads).
    started: Instant,
    /// `None`: the load never finishes.
    load: Option<Duration>,
    health_delay: Duration,
    token_delay: Duration,
    slots: u32,
    n_ctx: u32,
    model_alias: String,
    crash_after_tokens: Option<u64>,
    exit_code: i32,
    close_after_stream: bool,
}

impl Profile {
    fn is_loading(&self) -> bool {
        self.load.is_none_or(|load| self.started.elapsed() < load)
    }

    /// llama-server answers every API route with 503 while the model loads.
    fn ensure_loaded(&self) -> Result<(), EngineError> {
        if self.is_loading() {
            Err(EngineError::Loading)
        } else {
            Ok(())
        }
    }
}

/// Counters and slot occupancy. Behind a std mutex: every update is a few integer writes with no
/// `.await` while locked, and the handlers that read it are synchronous.
#[derive(Debug)]
struct Counters {
    busy: Vec<bool>,
    active: u64,
    completed: u64,
    cancelled: u64,
    tokens: u64,
    /// The headers of the last generation request (names lower-cased), for tests of what a
    /// gateway forwards.
    last_headers: Value,
}

/// The profile plus the run's mutable state, shared by every handler.
#[derive(Debug)]
struct Engine {
    profile: Profile,
    /// One permit per slot; FIFO, so waiting requests are admitted in arrival order.
    admission: Arc<Semaphore>,
    counters: Mutex<Counters>,
    /// `true` while tests hold generation: no new token is produced until it is `false` again.
    hold: watch::Sender<bool>,
    /// Set once a token-count crash is under way, so no other generation emits past the crash point.
    crashing: AtomicBool,
    next_id: AtomicU64,
}

impl Engine {
    fn new(profile: Profile) -> Self {
        let slots = usize::try_from(profile.slots).unwrap_or(usize::MAX);
        Self {
            admission: Arc::new(Semaphore::new(slots)),
            counters: Mutex::new(Counters {
                busy: vec![false; slots],
                active: 0,
                completed: 0,
                cancelled: 0,
                tokens: 0,
                last_headers: Value::Null,
            }),
            hold: watch::Sender::new(false),
            crashing: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            profile,
        }
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        // Counters are plain integers updated in one step; a panic elsewhere leaves them usable.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remember_headers(&self, headers: &HeaderMap) {
        let seen: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(name, value)| {
                let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), Value::String(text))
            })
            .collect();
        self.counters().last_headers = Value::Object(seen);
    }

    /// Waits for a free slot (in arrival order) and claims it for one generation.
    async fn admit(self: &Arc<Self>) -> Result<Generation, EngineError> {
        let permit = Arc::clone(&self.admission)
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Internal("the slot queue is closed"))?;
        let mut counters = self.counters();
        let slot = counters
            .busy
            .iter()
            .position(|busy| !busy)
            .ok_or(EngineError::Internal("a slot permit without a free slot"))?;
        counters.busy[slot] = true;
        counters.active += 1;
        drop(counters);
        Ok(Generation {
            engine: Arc::clone(self),
            slot,
            admitted: Instant::now(),
            completed: false,
            _permit: permit,
        })
    }

    /// Waits until token `index` of a generation may be produced: the token delay (between tokens,
    /// so not before the first), then for as long as tests hold generation. Never returns once a
    /// token-count crash is under way.
    async fn pace(&self, index: u64) {
        if index > 0 && !self.profile.token_delay.is_zero() {
            tokio::time::sleep(self.profile.token_delay).await;
        }
        let mut hold = self.hold.subscribe();
        // The engine owns the sender, so this cannot fail while `self` lives.
        let _ = hold.wait_for(|held| !*held).await;
        if self.crashing.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    /// Counts one token handed to a client; crashes the process if it was the `--crash-after-tokens`th.
    async fn delivered(&self) {
        let total = {
            let mut counters = self.counters();
            counters.tokens += 1;
            counters.tokens
        };
        if self.profile.crash_after_tokens == Some(total) {
            self.crashing.store(true, Ordering::SeqCst);
            tokio::time::sleep(CRASH_FLUSH_GRACE).await;
            tracing::warn!(
                tokens = total,
                code = self.profile.exit_code,
                "injected crash after tokens: exiting now"
            );
            std::process::exit(self.profile.exit_code);
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// One admitted generation, holding its slot. Dropping it frees the slot and counts the outcome:
/// `completed` if [`Generation::complete`] was called, else `cancelled` (the client went away, or the
/// handler was dropped), so every generation is counted exactly once.
#[derive(Debug)]
struct Generation {
    engine: Arc<Engine>,
    slot: usize,
    admitted: Instant,
    completed: bool,
    /// Released after `Drop::drop` has marked the slot free, so a newly admitted request always finds
    /// one.
    _permit: OwnedSemaphorePermit,
}

impl Generation {
    fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let mut counters = self.engine.counters();
        if let Some(busy) = counters.busy.get_mut(self.slot) {
            *busy = false;
        }
        counters.active = counters.active.saturating_sub(1);
        if self.completed {
            counters.completed += 1;
        } else {
            counters.cancelled += 1;
        }
    }
}

/// The errors this double answers with, in llama-server's error envelope.
#[derive(Debug)]
enum EngineError {
    Loading,
    NotFound,
    InvalidRequest(String),
    ExceedContext { n_prompt_tokens: u64, n_ctx: u32 },
    Internal(&'static str),
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        let (status, message, kind, extra) = match self {
            Self::Loading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Loading model".to_owned(),
                "unavailable_error",
                Map::new(),
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "File Not Found".to_owned(),
                "not_found_error",
                Map::new(),
            ),
            Self::InvalidRequest(message) => (
                StatusCode::BAD_REQUEST,
                message,
                "invalid_request_error",
                Map::new(),
            ),
            Self::ExceedContext {
                n_prompt_tokens,
                n_ctx,
            } => {
                let mut extra = Map::new();
                extra.insert("n_prompt_tokens".to_owned(), json!(n_prompt_tokens));
                extra.insert("n_ctx".to_owned(), json!(n_ctx));
                (
                    StatusCode::BAD_REQUEST,
                    "the request exceeds the available context size, try increasing it".to_owned(),
                    "exceed_context_size_error",
                    extra,
                )
            }
            Self::Internal(message) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                message.to_owned(),
                "server_error",
                Map::new(),
            ),
        };
        let mut error = Map::new();
        error.insert("code".to_owned(), json!(status.as_u16()));
        error.insert("message".to_owned(), json!(message));
        error.insert("type".to_owned(), json!(kind));
        error.extend(extra);
        (status, axum::Json(json!({ "error": error }))).into_response()
    }
}

type Shared = State<Arc<Engine>>;

/// Every route the double serves. New endpoints are added here.
fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .route("/completion", post(native_completion))
        .route("/v1/completions", post(text_completion))
        .route("/v1/chat/completions", post(chat_completion))
        .route("/control/hold", post(hold))
        .route("/control/release", post(release))
        .route("/control/stats", get(stats))
        .route("/control/last-request", get(last_request))
        .route("/control/log", post(log_line))
        .fallback(not_found)
        .with_state(engine)
}

async fn health(State(engine): Shared) -> Result<axum::Json<Value>, EngineError> {
    let profile = &engine.profile;
    if !profile.health_delay.is_zero() {
        tokio::time::sleep(profile.health_delay).await;
    }
    profile.ensure_loaded()?;
    Ok(axum::Json(json!({ "status": "ok" })))
}

async fn props(State(engine): Shared) -> Result<axum::Json<Value>, EngineError> {
    let profile = &engine.profile;
    profile.ensure_loaded()?;
    Ok(axum::Json(json!({
        "total_slots": profile.slots,
        "model_alias": profile.model_alias,
        "build_info": concat!("test-engine-double ", env!("CARGO_PKG_VERSION")),
        "default_generation_settings": { "n_ctx": profile.n_ctx },
    })))
}

async fn slots(State(engine): Shared) -> Result<axum::Json<Value>, EngineError> {
    engine.profile.ensure_loaded()?;
    let slots: Vec<Value> = engine
        .counters()
        .busy
        .iter()
        .enumerate()
        .map(|(id, busy)| json!({ "id": id, "is_processing": busy }))
        .collect();
    Ok(axum::Json(Value::Array(slots)))
}

/// Test control, not llama-server: answers even while "loading".
async fn hold(State(engine): Shared) -> axum::Json<Value> {
    engine.hold.send_replace(true);
    axum::Json(json!({ "held": true }))
}

/// Test control, not llama-server: writes the request body as one line of the engine's log
/// (its stderr, which pool-managerd sends to the pool's log file).
async fn log_line(body: String) -> axum::Json<Value> {
    let line = body.trim_end().to_owned();
    tracing::info!("{line}");
    axum::Json(json!({ "logged": line }))
}

async fn release(State(engine): Shared) -> axum::Json<Value> {
    engine.hold.send_replace(false);
    axum::Json(json!({ "held": false }))
}

async fn stats(State(engine): Shared) -> axum::Json<Value> {
    let counters = engine.counters();
    axum::Json(json!({
        "active": counters.active,
        "completed": counters.completed,
        "cancelled": counters.cancelled,
        "tokens": counters.tokens,
    }))
}

/// The headers of the last generation request (names lower-cased), `null` before the first.
async fn last_request(State(engine): Shared) -> axum::Json<Value> {
    axum::Json(json!({"headers": engine.counters().last_headers}))
}

async fn not_found() -> EngineError {
    EngineError::NotFound
}

async fn native_completion(
    State(engine): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, EngineError> {
    generate(engine, Api::Native, &headers, &body).await
}

async fn text_completion(
    State(engine): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, EngineError> {
    generate(engine, Api::Text, &headers, &body).await
}

async fn chat_completion(
    State(engine): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, EngineError> {
    generate(engine, Api::Chat, &headers, &body).await
}

/// Which generation endpoint a request came in on; decides the request fields and reply shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// llama-server's `POST /completion`.
    Native,
    /// OpenAI `POST /v1/completions`.
    Text,
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
}

/// A validated generation request.
#[derive(Debug)]
struct GenRequest {
    api: Api,
    stream: bool,
    include_usage: bool,
    /// Prompt size: whitespace-separated words (token ids count one each).
    prompt_tokens: u64,
    /// Tokens to generate, already capped by the free context.
    n_predict: u64,
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest(message.into())
}

fn words(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
}

/// A completion prompt: a string, or an array of strings and token ids.
fn prompt_tokens(prompt: Option<&Value>) -> Result<u64, EngineError> {
    match prompt {
        Some(Value::String(text)) => Ok(words(text)),
        Some(Value::Array(parts)) => parts.iter().try_fold(0u64, |sum, part| match part {
            Value::String(text) => Ok(sum.saturating_add(words(text))),
            Value::Number(_) => Ok(sum.saturating_add(1)),
            _ => Err(invalid(
                "\"prompt\" must be a string or an array of strings and token ids",
            )),
        }),
        Some(_) => Err(invalid(
            "\"prompt\" must be a string or an array of strings and token ids",
        )),
        None => Err(invalid("\"prompt\" must be provided")),
    }
}

/// Chat prompt size: the words of every message's content (a string, or text parts).
fn message_tokens(messages: Option<&Value>) -> Result<u64, EngineError> {
    let Some(Value::Array(messages)) = messages else {
        return Err(invalid("\"messages\" must be provided as an array"));
    };
    let mut total = 0u64;
    for message in messages {
        let Value::Object(message) = message else {
            return Err(invalid("every message must be an object"));
        };
        match message.get("content") {
            Some(Value::String(text)) => total = total.saturating_add(words(text)),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        total = total.saturating_add(words(text));
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => return Err(invalid("a message's \"content\" must be a string or parts")),
        }
    }
    Ok(total)
}

impl GenRequest {
    fn parse(api: Api, body: &[u8], n_ctx: u32) -> Result<Self, EngineError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| invalid(format!("invalid JSON body: {e}")))?;
        let Value::Object(request) = value else {
            return Err(invalid("the request body must be a JSON object"));
        };
        let stream = match request.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err(invalid("\"stream\" must be a boolean")),
        };
        let include_usage = stream
            && request
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let prompt_tokens = match api {
            Api::Native | Api::Text => prompt_tokens(request.get("prompt"))?,
            Api::Chat => message_tokens(request.get("messages"))?,
        };
        let limit_keys: &[&str] = match api {
            Api::Native => &["n_predict"],
            Api::Text => &["max_tokens"],
            Api::Chat => &["max_completion_tokens", "max_tokens"],
        };
        let limit = limit_keys
            .iter()
            .find_map(|key| request.get(*key).filter(|v| !v.is_null()).map(|v| (key, v)));
        let n_ctx64 = u64::from(n_ctx);
        if prompt_tokens >= n_ctx64 {
            return Err(EngineError::ExceedContext {
                n_prompt_tokens: prompt_tokens,
                n_ctx,
            });
        }
        let free = n_ctx64 - prompt_tokens;
        let n_predict = match limit {
            None => DEFAULT_N_PREDICT,
            Some((key, value)) => match value.as_i64() {
                // llama-server's -1: generate until the context is full.
                Some(n) if n < 0 => free,
                Some(n) => n.unsigned_abs(),
                None => return Err(invalid(format!("\"{key}\" must be an integer"))),
            },
        };
        Ok(Self {
            api,
            stream,
            include_usage,
            prompt_tokens,
            n_predict: n_predict.min(free),
        })
    }
}

/// Token `index` of every generation: (token id, text with its leading space).
fn token(index: u64) -> (usize, String) {
    let len = u64::try_from(WORDS.len()).unwrap_or(1);
    let id = usize::try_from(index % len).unwrap_or(0);
    (id, format!(" {}", WORDS.get(id).copied().unwrap_or("tok")))
}

/// Per-reply values shared by all events of one generation.
#[derive(Debug)]
struct Reply {
    request: GenRequest,
    id: String,
    created: u64,
    model: String,
}

/// Prompt and generation times, in llama-server's `timings` shape.
#[derive(Debug, Clone, Copy)]
struct Timings {
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Timings {
    fn to_json(self, reply: &Reply, predicted: u64) -> Value {
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1000.0;
        let first = self.first_token.unwrap_or_else(Instant::now);
        json!({
            "prompt_n": reply.request.prompt_tokens,
            "prompt_ms": ms(self.admitted, first),
            "predicted_n": predicted,
            "predicted_ms": ms(first, Instant::now()),
        })
    }
}

impl Reply {
    fn new(engine: &Engine, request: GenRequest) -> Self {
        let prefix = if request.api == Api::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Self {
            id: format!("{prefix}-{}", engine.next_id()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            model: engine.profile.model_alias.clone(),
            request,
        }
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.request.api, stream) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Text | Api::Native, _) => "text_completion",
        }
    }

    fn usage(&self, predicted: u64) -> Value {
        json!({
            "prompt_tokens": self.request.prompt_tokens,
            "completion_tokens": predicted,
            "total_tokens": self.request.prompt_tokens + predicted,
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The stream event carrying token `index`.
    fn token_event(&self, index: u64, id: usize, text: &str) -> Value {
        match self.request.api {
            Api::Native => json!({ "content": text, "tokens": [id], "stop": false, "index": 0 }),
            Api::Text => self.chunk(json!([{ "index": 0, "text": text, "finish_reason": null }])),
            Api::Chat => {
                let delta = if index == 0 {
                    json!({ "role": "assistant", "content": text })
                } else {
                    json!({ "content": text })
                };
                self.chunk(json!([{ "index": 0, "delta": delta, "finish_reason": null }]))
            }
        }
    }

    /// The `data:` payloads that close a successful stream.
    fn closing_events(&self, predicted: u64, timings: Timings) -> Vec<String> {
        match self.request.api {
            // No `[DONE]` on llama-server's native endpoint.
            Api::Native => vec![
                json!({
                    "content": "",
                    "stop": true,
                    "stop_type": "limit",
                    "tokens_predicted": predicted,
                    "tokens_evaluated": self.request.prompt_tokens,
                    "timings": timings.to_json(self, predicted),
                })
                .to_string(),
            ],
            Api::Text | Api::Chat => {
                let last = if self.request.api == Api::Chat {
                    json!([{ "index": 0, "delta": {}, "finish_reason": "length" }])
                } else {
                    json!([{ "index": 0, "text": "", "finish_reason": "length" }])
                };
                let mut events = vec![self.chunk(last).to_string()];
                if self.request.include_usage {
                    let mut usage = self.chunk(json!([]));
                    usage["usage"] = self.usage(predicted);
                    events.push(usage.to_string());
                }
                events.push("[DONE]".to_owned());
                events
            }
        }
    }

    /// The whole reply of a non-streaming request.
    fn complete(&self, content: &str, predicted: u64, timings: Timings) -> Value {
        match self.request.api {
            Api::Native => json!({
                "content": content,
                "stop": true,
                "stop_type": "limit",
                "tokens_predicted": predicted,
                "tokens_evaluated": self.request.prompt_tokens,
                "timings": timings.to_json(self, predicted),
            }),
            Api::Text | Api::Chat => {
                let choice = if self.request.api == Api::Chat {
                    json!({
                        "index": 0,
                        "message": { "role": "assistant", "content": content },
                        "finish_reason": "length",
                    })
                } else {
                    json!({
                        "index": 0,
                        "text": content,
                        "logprobs": null,
                        "finish_reason": "length",
                    })
                };
                json!({
                    "id": self.id,
                    "object": self.object(false),
                    "created": self.created,
                    "model": self.model,
                    "choices": [choice],
                    "usage": self.usage(predicted),
                })
            }
        }
    }
}

/// Validates, waits for a slot, then streams or answers in one piece. Every error is answered before
/// any stream byte.
async fn generate(
    engine: Arc<Engine>,
    api: Api,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, EngineError> {
    engine.remember_headers(headers);
    engine.profile.ensure_loaded()?;
    let request = GenRequest::parse(api, body, engine.profile.n_ctx)?;
    let generation = engine.admit().await?;
    let reply = Reply::new(&engine, request);
    if reply.request.stream {
        // Capacity 1: the producer runs at most one event ahead of what the HTTP layer has taken,
        // so a token is produced only when the previous one is on its way to the client.
        let (tx, rx) = mpsc::channel(1);
        let close_after = engine.profile.close_after_stream;
        // Detached on purpose: it ends with its stream (or when its client goes away), and at
        // shutdown `main` drops the runtime, which ends it mid-token.
        tokio::spawn(stream_tokens(engine, generation, reply, tx));
        let mut response = Response::new(Body::new(ChannelBody(rx)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if close_after {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    } else {
        Ok(axum::Json(complete_tokens(&engine, generation, &reply).await).into_response())
    }
}

fn sse(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// Produces one streamed generation into `tx`. A failed send means the client went away (the HTTP
/// layer dropped the body): the generation ends there and its guard counts it as cancelled.
async fn stream_tokens(
    engine: Arc<Engine>,
    generation: Generation,
    reply: Reply,
    tx: mpsc::Sender<Bytes>,
) {
    let mut timings = Timings {
        admitted: generation.admitted,
        first_token: None,
    };
    for index in 0..reply.request.n_predict {
        tokio::select! {
            // A client that leaves while the stream waits (delay, hold) is noticed without a send.
            () = tx.closed() => return,
            () = engine.pace(index) => {}
        }
        let (id, text) = token(index);
        let event = reply.token_event(index, id, &text).to_string();
        if tx.send(sse(&event)).await.is_err() {
            return;
        }
        timings.first_token.get_or_insert_with(Instant::now);
        engine.delivered().await;
    }
    for event in reply.closing_events(reply.request.n_predict, timings) {
        if tx.send(sse(&event)).await.is_err() {
            return;
        }
    }
    generation.complete();
}

/// Produces one generation in full, for a non-streaming request.
async fn complete_tokens(engine: &Engine, generation: Generation, reply: &Reply) -> Value {
    let mut timings = Timings {
        admitted: generation.admitted,
        first_token: None,
    };
    let mut content = String::new();
    for index in 0..reply.request.n_predict {
        engine.pace(index).await;
        content.push_str(&token(index).1);
        timings.first_token.get_or_insert_with(Instant::now);
        engine.delivered().await;
    }
    generation.complete();
    reply.complete(&content, reply.request.n_predict, timings)
}

/// A response body fed by a channel: every event is sent to the client as soon as it is produced,
/// and dropping the body (the client went away) makes the producer's next send fail.
#[derive(Debug)]
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// How the double treats accepted connections.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Serve,
    Hang,
    Refuse,
}

/// Serves (or hangs on, or refuses) an already-bound listener. Returns only if serving fails; the
/// caller races it against shutdown and drops it. Connections still open then end with the runtime,
/// which `main` drops right after: the double does not drain (llama-server also exits within
/// milliseconds).
async fn run<L>(listener: L, engine: Arc<Engine>, mode: Mode) -> anyhow::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    match mode {
        Mode::Serve => axum::serve(listener, router(engine))
            .await
            .context("HTTP server failed"),
        Mode::Hang => hold_connections(listener).await,
        Mode::Refuse => refuse_connections(listener).await,
    }
}

/// Accepts connections and reads (discarding) until each client closes; never writes a byte.
async fn hold_connections<L: Listener>(mut listener: L) -> anyhow::Result<()> {
    // Owns every held connection: dropping this future (at shutdown) closes them all.
    let mut held = JoinSet::new();
    loop {
        let (mut io, _) = listener.accept().await;
        held.spawn(async move {
            let mut sink = [0u8; 4096];
            while let Ok(n) = io.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        while held.try_join_next().is_some() {}
    }
}

/// Accepts connections and closes each at once, reading and writing nothing.
async fn refuse_connections<L: Listener>(mut listener: L) -> anyhow::Result<()> {
    loop {
        let (io, _) = listener.accept().await;
        drop(io);
    }
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    async fn bind(addr: &ListenAddr) -> anyhow::Result<Self> {
        match addr {
            ListenAddr::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                Ok(Self::Tcp(listener))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("binding {}", path.display()))?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    fn display_addr(&self) -> anyhow::Result<String> {
        match self {
            Self::Tcp(listener) => Ok(listener.local_addr()?.to_string()),
            Self::Unix(_, path) => Ok(path.display().to_string()),
        }
    }
}

/// Removes a socket file left by an earlier run; refuses to delete anything that is not a socket.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
}

/// SIGTERM and SIGINT handlers, installed eagerly (before READY) so an early signal is never missed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// An injected crash: the process exits with `code` at `at`.
#[derive(Debug, Clone, Copy)]
struct Crash {
    at: tokio::time::Instant,
    code: i32,
}

/// Resolves with the exit code when the injected crash is due; never, if none was asked for.
async fn crash_due(crash: Option<Crash>) -> i32 {
    match crash {
        Some(crash) => {
            tokio::time::sleep_until(crash.at).await;
            crash.code
        }
        None => std::future::pending().await,
    }
}

/// Runs `served` until it fails, a stop signal arrives (Ok), or the injected crash is due (the
/// process exits on the spot, skipping all cleanup, like a real crash).
async fn until_stopped(
    served: impl Future<Output = anyhow::Result<()>>,
    mut signals: Signals,
    crash: Option<Crash>,
) -> anyhow::Result<()> {
    tokio::select! {
        result = served => result,
        name = signals.recv() => {
            tracing::info!(signal = name, "shutting down");
            Ok(())
        }
        code = crash_due(crash) => {
            tracing::warn!(code, "injected crash: exiting now");
            std::process::exit(code)
        }
    }
}

fn announce_ready(addr: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "READY listen={addr}").context("writing READY line")?;
    stdout.flush().context("flushing READY line")
}

/// `args` already has the `--model` file's overrides applied.
async fn serve(args: Args) -> anyhow::Result<()> {
    // The crash deadline counts from process start, not from READY.
    // A delay too far in the future to represent means "never".
    let crash = args.exit_after_ms.and_then(|ms| {
        Some(Crash {
            at: tokio::time::Instant::now().checked_add(Duration::from_millis(ms))?,
            code: args.exit_code,
        })
    });
    let signals = Signals::install()?;
    let bound = Bound::bind(&args.listen).await?;
    let engine = Arc::new(Engine::new(Profile {
        started: Instant::now(),
        load: (!args.never_ready).then(|| Duration::from_millis(args.load_ms)),
        health_delay: Duration::from_millis(args.health_delay_ms),
        token_delay: Duration::from_millis(args.token_delay_ms),
        slots: args.slots,
        n_ctx: args.ctx,
        model_alias: args.model_alias.unwrap_or_else(|| "test-double".to_owned()),
        crash_after_tokens: args.crash_after_tokens,
        exit_code: args.exit_code,
        close_after_stream: args.close_after_stream,
    }));
    let mode = match (args.hang, args.refuse) {
        (_, true) => Mode::Refuse,
        (true, false) => Mode::Hang,
        (false, false) => Mode::Serve,
    };
    let addr = bound.display_addr()?;
    tracing::info!(
        listen = %addr,
        ?mode,
        model = ?args.model,
        model_alias = %engine.profile.model_alias,
        slots = args.slots,
        ctx = args.ctx,
        load_ms = args.load_ms,
        never_ready = args.never_ready,
        health_delay_ms = args.health_delay_ms,
        token_delay_ms = args.token_delay_ms,
        crash_after_tokens = ?args.crash_after_tokens,
        exit_after_ms = ?args.exit_after_ms,
        exit_code = args.exit_code,
        "test engine double listening"
    );
    announce_ready(&addr)?;

    match bound {
        Bound::Tcp(listener) => {
            let listener = listener.tap_io(|stream| {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(error = %e, "failed to set TCP_NODELAY");
                }
            });
            until_stopped(run(listener, engine, mode), signals, crash).await
        }
        Bound::Unix(listener, path) => {
            let result = until_stopped(run(listener, engine, mode), signals, crash).await;
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove socket file");
            }
            result
        }
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // stderr is read by the test harness, not a terminal.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    if let Err(e) = resolve_model(&mut args) {
        tracing::error!("{e:#}");
        return ExitCode::from(MODEL_FILE_EXIT);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
