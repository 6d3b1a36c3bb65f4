//! The real engines for end-to-end tests: llama.cpp's `llama-server` (built from the
//! llama-cpp-python sdist by `scripts/build-llama-server.sh`), a Python with the official `openai`
//! SDK and llama-cpp-python's server (`scripts/python-env.sh test`), and tiny GGUF models generated
//! by `scripts/make-tiny-model.py` — the one stand-in, since no model can be downloaded here.
//!
//! Also the one tool the tests take from elsewhere: Prometheus's `promtool` ([`promtool`]).
//!
//! `scripts/test.sh` exports `POOL_TEST_LLAMA_SERVER`, `POOL_TEST_PYTHON` and `POOL_TEST_PROMTOOL`. When they are unset
//! (a bare `cargo test`), the scripts are run once per test binary to find or build them (both
//! cache outside the repository; a cold build takes several minutes and says so on stderr).
//!
//! [`stack`] puts the product in front of them (the shared [`Stack`]): pool-managerd running the
//! pools of a TOML snippet ([`llama_pool`] writes one for llama-server) and orchestratord with one
//! API key ([`API_KEY`]).

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a panic with the failing call is the report"
)]

use crate::http;
pub use crate::stack::{Stack, WAIT, http_address, prometheus_value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tempfile::TempDir;

/// The repository's root (the parent of this package).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", env!("CARGO_MANIFEST_DIR")))
        .to_path_buf()
}

/// Runs `scripts/<script> <args>` and returns the last line of its stdout (the path it prints).
fn script_output(script: &str, args: &[&str]) -> PathBuf {
    let path = repo_root().join("scripts").join(script);
    eprintln!(
        "running {} {} (cached after the first run)",
        path.display(),
        args.join(" ")
    );
    let output = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        output.status.success(),
        "{} {} failed ({})",
        path.display(),
        args.join(" "),
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim();
    assert!(!last.is_empty(), "{} printed no path", path.display());
    PathBuf::from(last)
}

/// An executable named by `var`, or found by running `script`.
fn tool(var: &str, find: impl FnOnce() -> PathBuf) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => find(),
    };
    assert!(
        path.is_file(),
        "{} (from ${var} or its script) is not a file",
        path.display()
    );
    path
}

/// The real llama.cpp `llama-server` binary.
pub fn llama_server() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        tool("POOL_TEST_LLAMA_SERVER", || {
            script_output("build-llama-server.sh", &[])
        })
    })
}

/// A Python interpreter with gguf, numpy, openai, httpx and llama-cpp-python[server].
pub fn python() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        tool("POOL_TEST_PYTHON", || {
            script_output("python-env.sh", &["test"])
                .join("bin")
                .join("python")
        })
    })
}

/// Prometheus's `promtool` (`scripts/promtool.sh`: extracted from Debian's package, cached).
pub fn promtool() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| tool("POOL_TEST_PROMTOOL", || script_output("promtool.sh", &[])))
}

/// Writes a generated LLaMA GGUF to `out` (`scripts/make-tiny-model.py out args…`).
pub fn make_model(out: &Path, args: &[&str]) -> PathBuf {
    let script = repo_root().join("scripts").join("make-tiny-model.py");
    let output = Command::new(python())
        .arg(&script)
        .arg(out)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "make-tiny-model.py {} {} failed: {}",
        out.display(),
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    out.to_path_buf()
}

/// How long engines may take to load (llama-cpp-python's server imports for a few seconds; a
/// busy 2-core CI machine is slower).
pub const STARTUP: Duration = Duration::from_secs(90);
pub const API_KEY: &str = "real-engine-test-key-0123456789";

/// A `[[pool]]` running llama-server on `model_path`, listening on TCP or a Unix socket.
pub fn llama_pool(
    id: &str,
    model: &str,
    model_path: &Path,
    listen: &str,
    parallel: u32,
    ctx: u32,
) -> String {
    LlamaPool {
        id,
        model,
        model_path,
        listen,
        parallel,
        ctx,
        flags: &[],
        endpoints: &[],
    }
    .toml()
}

/// A `[[pool]]` running llama-server, with more engine flags and the APIs it serves.
#[derive(Debug, Clone, Copy)]
pub struct LlamaPool<'a> {
    pub id: &'a str,
    /// The model id clients ask for (and llama-server's `--alias`).
    pub model: &'a str,
    pub model_path: &'a Path,
    /// `tcp` or `unix`.
    pub listen: &'a str,
    /// Slots (`-np`); the context is `parallel * ctx`.
    pub parallel: u32,
    pub ctx: u32,
    /// More llama-server flags (`--embeddings`, `--reranking`, ...).
    pub flags: &'a [&'a str],
    /// The pool's `endpoints` (APIs); empty for the engine kind's default.
    pub endpoints: &'a [&'a str],
}

impl LlamaPool<'_> {
    pub fn toml(&self) -> String {
        let host = if self.listen == "unix" {
            "{socket}"
        } else {
            "{host}"
        };
        let flags: String = self
            .flags
            .iter()
            .map(|flag| format!(", {flag:?}"))
            .collect();
        let endpoints = if self.endpoints.is_empty() {
            String::new()
        } else {
            format!("endpoints = {:?}\n", self.endpoints)
        };
        format!(
            r#"
[[pool]]
id = "{id}"
model = "{model}"
engine = "llamacpp"
command = [{server:?}, "-m", "{{model}}", "--host", "{host}", "--port", "{{port}}", "--alias", "{model}",
           "-np", "{parallel}", "-c", "{total_ctx}", "--threads", "1", "--metrics"{flags}]
model_path = {model_path:?}
listen = "{listen}"
{endpoints}startup_timeout_ms = 60000
stop_grace_ms = 3000
[pool.probe]
interval_ms = 200
[pool.reload]
drain_deadline_ms = 30000
"#,
            id = self.id,
            model = self.model,
            listen = self.listen,
            parallel = self.parallel,
            server = llama_server().display().to_string(),
            total_ctx = self.parallel * self.ctx,
            model_path = self.model_path.display().to_string(),
        )
    }
}

/// pool-managerd with `pools` (TOML), orchestratord in front of it with one API key
/// ([`API_KEY`]); returns once every pool is Ready in orchestratord's view.
pub fn stack(dir: TempDir, pools: &str) -> Stack {
    stack_with(dir, pools, "")
}

/// [`stack`], with `orchestratord_config` (TOML; empty for none) as orchestratord's config file.
pub fn stack_with(dir: TempDir, pools: &str, orchestratord_config: &str) -> Stack {
    Stack::builder()
        .pool(pools)
        .orchestrator(orchestratord_config)
        .api_key(API_KEY)
        .startup(STARTUP)
        .start_in(dir)
}

/// What only real llama-servers answer (their metrics, slots) and the Python SDK checks.
impl Stack {
    /// llama-server's own count of the tokens it generated (`llamacpp:tokens_predicted_total`).
    pub fn engine_tokens_predicted(&self, pool: &str) -> u64 {
        self.engine_metric(pool, "llamacpp:tokens_predicted_total") as u64
    }

    /// One of llama-server's own Prometheus values (pools run it with `--metrics`).
    pub fn engine_metric(&self, pool: &str, name: &str) -> f64 {
        let reply = http::get(&http_address(&self.endpoint(pool)), "/metrics", WAIT).unwrap();
        prometheus_value(&reply.text(), name)
    }

    /// How many of the engine's slots are processing (llama-server's `GET /slots`).
    pub fn busy_slots(&self, pool: &str) -> usize {
        self.engine_get(pool, "/slots")
            .as_array()
            .unwrap()
            .iter()
            .filter(|slot| slot["is_processing"] == true)
            .count()
    }

    pub fn python(&self, args: &[&str]) -> Output {
        let script = repo_root().join("tests/python/openai_sdk_check.py");
        let api = format!("http://{}/v1", self.api());
        let output = Command::new(python())
            .arg(&script)
            .args(args)
            .args(["--api", &api, "--key", API_KEY])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        assert!(
            output.status.success(),
            "{} {} failed: {}\n{}",
            script.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            self.orchestrator().stderr()
        );
        output
    }
}
