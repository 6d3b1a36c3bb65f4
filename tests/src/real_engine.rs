//! The real engines for end-to-end tests: llama.cpp's `llama-server` (built from the
//! llama-cpp-python sdist by `scripts/build-llama-server.sh`), a Python with the official `openai`
//! SDK and llama-cpp-python's server (`scripts/python-env.sh test`), and tiny GGUF models generated
//! by `scripts/make-tiny-model.py` — the one stand-in, since no model can be downloaded here.
//!
//! `scripts/test.sh` exports `POOL_TEST_LLAMA_SERVER` and `POOL_TEST_PYTHON`. When they are unset
//! (a bare `cargo test`), the scripts are run once per test binary to find or build them (both
//! cache outside the repository; a cold build takes several minutes and says so on stderr).
//!
//! [`Stack`] is the product in front of them: pool-managerd running the pools of a TOML snippet
//! ([`llama_pool`] writes one for llama-server) and orchestratord with one API key ([`API_KEY`]).

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a panic with the failing call is the report"
)]

use crate::sidecar::{Sidecar, socket_path, start_sidecar, state_dir};
use crate::{Daemon, DaemonBuilder, binary, http};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
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

/// Where a pool's engine listens, as pool-managerd reports it (`http://127.0.0.1:PORT` or a
/// socket path), turned into an address [`crate::http`] connects to.
pub fn http_address(endpoint: &str) -> String {
    endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/')
        .to_owned()
}

pub const WAIT: Duration = Duration::from_secs(30);
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

pub struct Stack {
    pub orchestrator: Daemon,
    pub sidecar: Sidecar,
    /// Last: dropped after the daemons, whose cleanup reads the state directory inside it.
    pub dir: TempDir,
}

/// pool-managerd with `pools` (TOML), orchestratord in front of it with one API key; returns once
/// every pool is Ready in orchestratord's view.
pub fn stack(dir: TempDir, pools: &str) -> Stack {
    stack_with(dir, pools, "")
}

/// [`stack`], with `orchestratord_config` (TOML; empty for none) as orchestratord's config file.
pub fn stack_with(dir: TempDir, pools: &str, orchestratord_config: &str) -> Stack {
    let config = dir.path().join("config.toml");
    std::fs::write(&config, pools).unwrap();
    let sidecar = start_sidecar(dir.path(), &config);
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{API_KEY}\n")).unwrap();
    let mut orchestrator = DaemonBuilder::new(binary("orchestratord"))
        .name("orchestratord")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--socket")
        .arg(socket_path(dir.path()))
        .arg("--api-keys-file")
        .arg(&keys);
    if !orchestratord_config.is_empty() {
        let path = dir.path().join("orchestratord.toml");
        std::fs::write(&path, orchestratord_config).unwrap();
        orchestrator = orchestrator.arg("--config").arg(path);
    }
    let orchestrator = orchestrator.start();
    let stack = Stack {
        orchestrator,
        sidecar,
        dir,
    };
    let deadline = Instant::now() + STARTUP;
    loop {
        let pools = stack.get("/v2/pools");
        let all = pools["pools"].as_array().unwrap();
        if !all.is_empty() && all.iter().all(|pool| pool["ready"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "pools never ready: {pools}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stack
}

impl Stack {
    pub fn api(&self) -> String {
        self.orchestrator.ready("listen").to_owned()
    }

    pub fn get(&self, path: &str) -> Value {
        let auth = format!("Bearer {API_KEY}");
        let reply = http::request_with_headers(
            &self.api(),
            "GET",
            path,
            &[("Authorization", &auth)],
            None,
            WAIT,
        )
        .unwrap();
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
        reply.json()
    }

    pub fn pool_status(&self, pool: &str) -> Value {
        http::get(
            self.sidecar.ready("debug_http"),
            &format!("/pools/{pool}/status"),
            WAIT,
        )
        .unwrap()
        .json()
    }

    /// The engine's address as pool-managerd reports it (`http://…` or a socket path).
    pub fn endpoint(&self, pool: &str) -> String {
        self.pool_status(pool)["endpoint"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn engine_get(&self, pool: &str, path: &str) -> Value {
        let reply = http::get(&http_address(&self.endpoint(pool)), path, WAIT).unwrap();
        assert_eq!(reply.status, 200, "engine GET {path}: {}", reply.text());
        reply.json()
    }

    /// llama-server's own count of the tokens it generated (`llamacpp:tokens_predicted_total`).
    pub fn engine_tokens_predicted(&self, pool: &str) -> u64 {
        self.engine_metric(pool, "llamacpp:tokens_predicted_total") as u64
    }

    /// One of llama-server's own Prometheus values (pools run it with `--metrics`).
    pub fn engine_metric(&self, pool: &str, name: &str) -> f64 {
        let reply = http::get(&http_address(&self.endpoint(pool)), "/metrics", WAIT).unwrap();
        prometheus_value(&reply.text(), name)
    }

    /// One of orchestratord's Prometheus values (a counter's `_total`, a histogram's `_count`).
    pub fn metric(&self, name: &str) -> f64 {
        let reply = http::get(&self.api(), "/metrics", WAIT).unwrap();
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

    /// The pid pool-managerd recorded for the pool's engine.
    pub fn engine_pid(&self, pool: &str) -> i32 {
        let record = state_dir(self.dir.path())
            .join("engines")
            .join(format!("{pool}.json"));
        let text = std::fs::read_to_string(&record).unwrap();
        let record: Value = serde_json::from_str(&text).unwrap();
        i32::try_from(record["pid"].as_i64().unwrap()).unwrap()
    }

    pub fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_leases(&self, pool: &str, leases: u64) {
        self.wait_for(&format!("{leases} leases on {pool}"), || {
            self.pool_status(pool)["active_leases"] == leases
        });
    }

    /// Runs `pool-managerd ARGS --socket …` (an operator command) and asserts it succeeded.
    pub fn operator(&self, args: &[&str]) {
        let output = Command::new(binary("pool-managerd"))
            .args(args)
            .arg("--socket")
            .arg(socket_path(self.dir.path()))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pool-managerd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
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
            self.orchestrator.stderr()
        );
        output
    }
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub fn prometheus_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}
