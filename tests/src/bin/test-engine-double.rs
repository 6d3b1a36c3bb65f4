//! `test-engine-double`: a TEST DOUBLE of llama.cpp's `llama-server` for fault-injection tests.
//!
//! It is not an inference engine: it loads no model and computes nothing. It answers the control
//! endpoints a supervisor probes (`/health`, `/props`, `/slots`) with llama-server's shapes and status
//! codes, and it misbehaves on request: a loading phase (`--load-ms`), a slow `/health`
//! (`--health-delay-ms`), a socket that accepts and never answers (`--hang`), and a crash with a chosen
//! exit code (`--exit-after-ms`, `--exit-code`).
//!
//! Layout, so that later endpoints slot in without reshaping it: `Args` (flags) → `Profile` (the
//! immutable behaviour of this run) → `router` (every HTTP route, in one place) → `run` (serve or hang
//! on an already-bound listener until shutdown). Streaming endpoints (`/completion`,
//! `/v1/chat/completions`) belong in `router` as more routes over the same `Profile`.
//!
//! Contract with the harness (`e2e::Daemon`), which must not break: exactly one stdout line,
//! `READY listen=<address>`, printed only once the listener is bound; everything else goes to stderr.
//! SIGTERM/SIGINT exit 0 and remove the socket file; the injected crash deliberately does not, because
//! a crashed engine leaves its socket behind.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::{Listener, ListenerExt as _};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;

const ABOUT: &str = "TEST DOUBLE of llama.cpp's llama-server, for fault-injection tests. \
It is a fake engine, not an inference engine: it loads no model and generates nothing.";

/// Context size reported by `/props`; matches the tiny generated test model's training context.
const N_CTX: u32 = 256;

#[derive(Debug, Parser)]
#[command(name = "test-engine-double", version, about = ABOUT, long_about = ABOUT)]
struct Args {
    /// Where to listen: HOST:PORT (port 0 picks a free port) or, when it starts with '/', a Unix
    /// socket path (a stale socket file there is removed first).
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_listen)]
    listen: ListenAddr,

    /// Number of parallel slots reported by /props and /slots.
    #[arg(long, default_value_t = 4)]
    slots: u32,

    /// Model alias reported by /props.
    #[arg(long, default_value = "test-double")]
    model_alias: String,

    /// Pretend to load the model for this long after the listener is bound: every route answers 503
    /// "Loading model" until then, as llama-server does.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    load_ms: u64,

    /// Delay every /health answer by this long (a slow but alive engine).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    health_delay_ms: u64,

    /// Accept connections but never answer anything; each socket is held until the client closes it.
    #[arg(long)]
    hang: bool,

    /// Crash injection: exit the process this long after start, without any cleanup.
    #[arg(long, value_name = "MS")]
    exit_after_ms: Option<u64>,

    /// Exit code for --exit-after-ms.
    #[arg(
        long,
        default_value_t = 1,
        requires = "exit_after_ms",
        value_name = "CODE"
    )]
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

/// What this run of the double does; fixed at start, shared read-only by every handler.
#[derive(Debug)]
struct Profile {
    /// When the pretend model load started (just after binding, as in llama-server, whose HTTP
    /// server is up while the model loads).
    started: Instant,
    load: Duration,
    health_delay: Duration,
    slots: u32,
    model_alias: String,
}

impl Profile {
    fn is_loading(&self) -> bool {
        self.started.elapsed() < self.load
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

/// The errors this double answers with, in llama-server's error envelope.
#[derive(Debug)]
enum EngineError {
    Loading,
    NotFound,
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        let (status, message, kind) = match self {
            Self::Loading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Loading model",
                "unavailable_error",
            ),
            Self::NotFound => (StatusCode::NOT_FOUND, "File Not Found", "not_found_error"),
        };
        let body = json!({
            "error": { "code": status.as_u16(), "message": message, "type": kind }
        });
        (status, axum::Json(body)).into_response()
    }
}

type Shared = State<Arc<Profile>>;

/// Every route the double serves. New endpoints are added here.
fn router(profile: Arc<Profile>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .fallback(not_found)
        .with_state(profile)
}

async fn health(State(profile): Shared) -> Result<axum::Json<Value>, EngineError> {
    if !profile.health_delay.is_zero() {
        tokio::time::sleep(profile.health_delay).await;
    }
    profile.ensure_loaded()?;
    Ok(axum::Json(json!({ "status": "ok" })))
}

async fn props(State(profile): Shared) -> Result<axum::Json<Value>, EngineError> {
    profile.ensure_loaded()?;
    Ok(axum::Json(json!({
        "total_slots": profile.slots,
        "model_alias": profile.model_alias,
        "build_info": concat!("test-engine-double ", env!("CARGO_PKG_VERSION")),
        "default_generation_settings": { "n_ctx": N_CTX },
    })))
}

async fn slots(State(profile): Shared) -> Result<axum::Json<Value>, EngineError> {
    profile.ensure_loaded()?;
    let slots: Vec<Value> = (0..profile.slots)
        .map(|id| json!({ "id": id, "is_processing": false }))
        .collect();
    Ok(axum::Json(Value::Array(slots)))
}

async fn not_found() -> EngineError {
    EngineError::NotFound
}

/// How the double treats accepted connections.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Serve,
    Hang,
}

/// Serves (or hangs on) an already-bound listener. Returns only if serving fails; the caller races it
/// against shutdown and drops it. Connections still open then end with the runtime, which `main`
/// drops right after: the double does not drain (llama-server also exits within milliseconds).
async fn run<L>(listener: L, profile: Arc<Profile>, mode: Mode) -> anyhow::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    match mode {
        Mode::Serve => axum::serve(listener, router(profile))
            .await
            .context("HTTP server failed"),
        Mode::Hang => hold_connections(listener).await,
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
    let profile = Arc::new(Profile {
        started: Instant::now(),
        load: Duration::from_millis(args.load_ms),
        health_delay: Duration::from_millis(args.health_delay_ms),
        slots: args.slots,
        model_alias: args.model_alias,
    });
    let mode = if args.hang { Mode::Hang } else { Mode::Serve };
    let addr = bound.display_addr()?;
    tracing::info!(
        listen = %addr,
        ?mode,
        slots = profile.slots,
        load_ms = args.load_ms,
        health_delay_ms = args.health_delay_ms,
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
            until_stopped(run(listener, profile, mode), signals, crash).await
        }
        Bound::Unix(listener, path) => {
            let result = until_stopped(run(listener, profile, mode), signals, crash).await;
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove socket file");
            }
            result
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // stderr is read by the test harness, not a terminal.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

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
