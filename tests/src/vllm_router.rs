//! vllm-router (PyPI `vllm-router`: a Rust router, `vllm_router_rs`, run in-process by a Python
//! launcher) as a peer that `relay-bench` measures against: started on loopback in front of the
//! bench's engines, answering once `/readiness` says every worker is healthy, and SIGKILLed (by
//! the pid we spawned) and reaped when dropped — also when the bench fails half-way.
//!
//! What it needs from a worker (0.1.17, read off a probe worker): `GET /health` answering 200,
//! at start-up and then every `--health-check-interval-secs` (60 s). It forwards
//! `POST /v1/chat/completions` with the body re-serialised and its own defaults added
//! (`logprobs`, `skip_special_tokens`, `separate_reasoning`, …), so the worker must accept
//! unknown fields.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One running vllm-router process.
#[derive(Debug)]
pub struct VllmRouter {
    child: Child,
    /// Set once the child has been reaped; after that its pid must not be signalled.
    reaped: bool,
    /// `127.0.0.1:PORT` it serves the OpenAI API on.
    addr: String,
    /// Its stdout and stderr.
    log: PathBuf,
}

/// A port free on loopback right now (bound and released: another process may take it before the
/// router binds it, in which case the router exits and [`VllmRouter::start`] reports its log).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

/// The last `lines` lines of `path` (for error messages).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl VllmRouter {
    /// Starts `program` (the `vllm-router` launcher) on loopback in front of `workers`
    /// (`http://host:port` each), with `--policy policy` or, for `None`, its default policy;
    /// logging at `warning` (like the daemons under test at `warn`) into `log_dir/NAME.log`. Waits
    /// up to `timeout` until it answers `GET /readiness` with 200.
    pub fn start(
        program: &Path,
        name: &str,
        policy: Option<&str>,
        workers: &[String],
        log_dir: &Path,
        timeout: Duration,
    ) -> Result<VllmRouter, String> {
        let port = free_port()?;
        let prometheus_port = free_port()?;
        let log = log_dir.join(format!("{name}.log"));
        let stdout =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--prometheus-port", &prometheus_port.to_string()])
            .arg("--worker-urls")
            .args(workers)
            .args(["--log-level", "warning"]);
        if let Some(policy) = policy {
            command.args(["--policy", policy]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        // Owned from here on: any early return below kills and reaps it.
        let mut router = VllmRouter {
            child,
            reaped: false,
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = router.child.try_wait() {
                router.reaped = true;
                return Err(format!(
                    "{name} ({}) exited ({status}) before it was ready; its log {}:\n{}",
                    program.display(),
                    router.log.display(),
                    tail(&router.log, 20)
                ));
            }
            let ready = crate::http::get(&router.addr, "/readiness", Duration::from_secs(1))
                .is_ok_and(|reply| reply.status == 200);
            if ready {
                return Ok(router);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name} did not answer GET /readiness with 200 within {timeout:?}; its log {}:\n{}",
                    router.log.display(),
                    tail(&router.log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:PORT` of its OpenAI API.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it is still running (reaping it if it has exited).
    pub fn running(&mut self) -> bool {
        if !self.reaped && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
        }
        !self.reaped
    }
}

impl Drop for VllmRouter {
    /// SIGKILL by pid unless already reaped, then reap. Never panics.
    fn drop(&mut self) {
        if !self.running() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // ESRCH cannot happen for an unreaped child; any error is left to `wait` below.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}
