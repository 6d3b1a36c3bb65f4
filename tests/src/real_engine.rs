//! The real engines for end-to-end tests: llama.cpp's `llama-server` (built from the
//! llama-cpp-python sdist by `scripts/build-llama-server.sh`), a Python with the official `openai`
//! SDK and llama-cpp-python's server (`scripts/python-env.sh test`), and tiny GGUF models generated
//! by `scripts/make-tiny-model.py` — the one stand-in, since no model can be downloaded here.
//!
//! `scripts/test.sh` exports `POOL_TEST_LLAMA_SERVER` and `POOL_TEST_PYTHON`. When they are unset
//! (a bare `cargo test`), the scripts are run once per test binary to find or build them (both
//! cache outside the repository; a cold build takes several minutes and says so on stderr).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

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
