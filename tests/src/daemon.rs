//! Child processes under test: spawning, the `READY` handshake, output capture, signals and reaping.
//!
//! Protocol with the binaries: a daemon prints one stdout line `READY key=value key=value…` once it is
//! serving (values contain no spaces); everything else it logs goes to stderr. The harness reads both
//! pipes on background threads for the daemon's whole life, so a chatty daemon never blocks on a full
//! pipe, and echoes every line to the test's stderr prefixed with `[name pid]` (shown by libtest for a
//! failed test, or always with `-- --nocapture`).
//!
//! Invariant: the `Child` is wrapped in a [`Daemon`] before anything can panic; `Drop` then SIGKILLs
//! (by pid) and reaps it. A pid is signalled only while its process is unreaped, so it cannot have been
//! reused by another process.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long [`DaemonBuilder::start`] waits for `READY` unless told otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// After a process exits, how long to wait for its pipes to reach EOF (a grandchild that inherited
/// them can hold them open) before reporting what was collected so far.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Environment variables never inherited by a child: a test runner started by systemd must not hand
/// its socket-activation or notify settings to the daemons under test.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// What the reader threads have collected. A std mutex: it is only touched by plain threads and by
/// synchronous test code, never held across an `.await`.
#[derive(Debug, Default)]
struct CaptureState {
    stdout: String,
    stderr: String,
    /// The first stdout line starting with `READY `.
    ready_line: Option<String>,
    stdout_eof: bool,
    stderr_eof: bool,
}

#[derive(Debug, Default)]
struct Capture {
    state: Mutex<CaptureState>,
    changed: Condvar,
}

impl Capture {
    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        // A reader thread that panicked mid-append leaves usable text behind; keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `done` holds or `deadline` passes; returns whether `done` held.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&CaptureState) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Pipe {
    Stdout,
    Stderr,
}

/// Reads `pipe` line by line until EOF, appending to `capture` and echoing to the test's stderr.
fn pump(reader: impl Read, pipe: Pipe, label: String, capture: Arc<Capture>) {
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\n', '\r']);
        match pipe {
            Pipe::Stdout => eprintln!("[{label} stdout] {line}"),
            Pipe::Stderr => eprintln!("[{label}] {line}"),
        }
        let mut state = capture.lock();
        match pipe {
            Pipe::Stdout => {
                if state.ready_line.is_none() && line.starts_with("READY ") {
                    state.ready_line = Some(line.to_owned());
                }
                state.stdout.push_str(line);
                state.stdout.push('\n');
            }
            Pipe::Stderr => {
                state.stderr.push_str(line);
                state.stderr.push('\n');
            }
        }
        drop(state);
        capture.changed.notify_all();
    }
    let mut state = capture.lock();
    match pipe {
        Pipe::Stdout => state.stdout_eof = true,
        Pipe::Stderr => state.stderr_eof = true,
    }
    drop(state);
    capture.changed.notify_all();
}

/// How to start a daemon or a short CLI run. Obtain with [`DaemonBuilder::new`] or [`Daemon::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct DaemonBuilder {
    program: PathBuf,
    name: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    current_dir: Option<PathBuf>,
    ready_timeout: Duration,
}

impl DaemonBuilder {
    /// A builder for `program`; its display name defaults to the file name.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        let program = program.into();
        let name = program.file_name().map_or_else(
            || program.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Self {
            program,
            name,
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            current_dir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }

    /// The name used in echoed output and panic messages (useful with several instances).
    /// Runs the daemon under `wrapper` (e.g. `prlimit --nofile=128 --`, `unshare -n`), which must
    /// exec the daemon so that the pid the harness holds stays the daemon's.
    pub fn wrapped<S: AsRef<OsStr>>(
        mut self,
        wrapper: impl Into<PathBuf>,
        wrapper_args: &[S],
    ) -> Self {
        let mut args: Vec<OsString> = wrapper_args
            .iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        args.push(self.program.into_os_string());
        args.append(&mut self.args);
        self.program = wrapper.into();
        self.args = args;
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one environment variable; the rest of the test's environment is inherited (minus
    /// systemd's socket-activation variables).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env_remove.push(key.as_ref().to_owned());
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// How long [`start`](Self::start) waits for the `READY` line (default 20 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Spawns the daemon and waits for its `READY` line. Panics, with the daemon's stderr, if it exits
    /// first or the ready timeout passes (the process is then killed and reaped).
    pub fn start(self) -> Daemon {
        let ready_timeout = self.ready_timeout;
        let mut daemon = self.spawn();
        daemon.await_ready(ready_timeout);
        daemon
    }

    /// Spawns a program that prints no `READY` line (a third-party daemon such as HAProxy); the
    /// caller waits for it to serve in its own way. Stopped like any [`Daemon`] when dropped.
    pub fn start_unannounced(self) -> Daemon {
        self.spawn()
    }

    /// Runs the program to completion and returns its status and output. Panics, with the output so
    /// far, if it is still running after `timeout` (it is then killed and reaped). Needs no `READY`.
    pub fn run_to_exit(self, timeout: Duration) -> RunOutput {
        let mut daemon = self.spawn();
        let Some(status) = daemon.wait_exit(timeout) else {
            daemon.fail(&format!("still running after {timeout:?}"));
        };
        daemon
            .capture
            .wait_until(Instant::now() + PIPE_DRAIN_GRACE, |s| {
                s.stdout_eof && s.stderr_eof
            });
        RunOutput {
            status,
            stdout: daemon.stdout(),
            stderr: daemon.stderr(),
        }
    }

    fn spawn(self) -> Daemon {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for key in SCRUBBED_ENV {
            command.env_remove(key);
        }
        for key in &self.env_remove {
            command.env_remove(key);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.program.display()));
        // Wrapped at once, so that any panic below still kills and reaps the child.
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut daemon = Daemon {
            name: self.name,
            pid: child.id(),
            child,
            capture: Arc::new(Capture::default()),
            ready_line: String::new(),
            ready: Vec::new(),
            exit: None,
        };
        let label = format!("{} {}", daemon.name, daemon.pid);
        for (reader, pipe) in [
            (
                stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
                Pipe::Stdout,
            ),
            (
                stderr.map(|s| Box::new(s) as Box<dyn Read + Send>),
                Pipe::Stderr,
            ),
        ] {
            let Some(reader) = reader else {
                daemon.fail(&format!("{pipe:?} was not piped"));
            };
            let capture = Arc::clone(&daemon.capture);
            let label = label.clone();
            // Detached on purpose: it ends at the pipe's EOF, which a grandchild may delay past the
            // daemon's own exit; joining it in `Drop` could hang a test.
            std::thread::Builder::new()
                .name(format!("{label} {pipe:?}"))
                .spawn(move || pump(reader, pipe, label, capture))
                .unwrap_or_else(|e| daemon.fail(&format!("cannot spawn a reader thread: {e}")));
        }
        daemon
    }
}

/// The result of [`DaemonBuilder::run_to_exit`] / [`Daemon::run_to_exit`].
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running child process under test. Dropping it SIGKILLs (by pid) and reaps the process if it is
/// still running.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    pid: u32,
    child: Child,
    capture: Arc<Capture>,
    ready_line: String,
    /// The `key=value` pairs of the READY line, in order.
    ready: Vec<(String, String)>,
    /// Set once the child has been reaped; after that its pid must not be signalled.
    exit: Option<ExitStatus>,
}

impl Daemon {
    pub fn builder(program: impl Into<PathBuf>) -> DaemonBuilder {
        DaemonBuilder::new(program)
    }

    /// Spawns `program` with `args` and extra `env` and waits (20 s) for its `READY` line.
    pub fn start<S: AsRef<OsStr>>(
        program: impl Into<PathBuf>,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Self {
        env.iter()
            .fold(DaemonBuilder::new(program).args(args), |b, (k, v)| {
                b.env(k, v)
            })
            .start()
    }

    /// Runs `program` with `args` to completion (a short CLI invocation); panics after `timeout`.
    pub fn run_to_exit<S: AsRef<OsStr>>(
        program: impl Into<PathBuf>,
        args: &[S],
        timeout: Duration,
    ) -> RunOutput {
        DaemonBuilder::new(program).args(args).run_to_exit(timeout)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The whole `READY …` line.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// The value of `key` in the READY line; panics if the line has no such key.
    pub fn ready(&self, key: &str) -> &str {
        self.try_ready(key).unwrap_or_else(|| {
            panic!(
                "{}: READY line has no `{key}=`: {:?}",
                self.name, self.ready_line
            )
        })
    }

    pub fn try_ready(&self, key: &str) -> Option<&str> {
        self.ready
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` in the READY line as a path (e.g. a socket); panics if missing.
    pub fn ready_path(&self, key: &str) -> &Path {
        Path::new(self.ready(key))
    }

    /// Everything the daemon wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.capture.lock().stdout.clone()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.capture.lock().stderr.clone()
    }

    /// Waits until the collected stdout contains `needle`; returns whether it did within `timeout`.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> bool {
        self.capture
            .wait_until(Instant::now() + timeout, |s| s.stdout.contains(needle))
    }

    /// Waits until the collected stderr contains `needle`; returns whether it did within `timeout`.
    /// For "the daemon logged X" checks without sleeping.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        self.capture
            .wait_until(Instant::now() + timeout, |s| s.stderr.contains(needle))
    }

    /// Sends `signal` to the daemon's pid. Panics if the process was already reaped (its pid may
    /// belong to someone else by now) or the signal cannot be sent.
    pub fn kill_with(&self, signal: Signal) {
        if let Some(status) = self.exit {
            panic!(
                "{} (pid {}) already exited ({status}); not sending {signal}",
                self.name, self.pid
            );
        }
        let pid = i32::try_from(self.pid)
            .unwrap_or_else(|_| panic!("pid {} does not fit a pid_t", self.pid));
        kill(Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("sending {signal} to {} (pid {pid}): {e}", self.name));
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {} (pid {}): {e}", self.name, self.pid));
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
        }
    }

    fn await_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let line = loop {
            // Short slices, so that an exit is noticed even while a grandchild holds stdout open.
            let slice = (Instant::now() + Duration::from_millis(20)).min(deadline);
            if self.capture.wait_until(slice, |s| s.ready_line.is_some()) {
                break self.capture.lock().ready_line.clone().unwrap_or_default();
            }
            if let Some(status) = self.try_wait() {
                self.capture
                    .wait_until(Instant::now() + PIPE_DRAIN_GRACE, |s| {
                        s.stdout_eof && s.stderr_eof
                    });
                // READY may have been the last thing it printed before exiting.
                if let Some(line) = self.capture.lock().ready_line.clone() {
                    break line;
                }
                self.fail(&format!("exited ({status}) before printing READY"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!("printed no READY line within {timeout:?}"));
            }
        };
        self.ready = parse_ready(&line);
        self.ready_line = line;
    }

    /// Kills and reaps the process if it still runs, then panics with everything it printed.
    fn fail(&mut self, reason: &str) -> ! {
        self.stop();
        self.capture
            .wait_until(Instant::now() + PIPE_DRAIN_GRACE, |s| {
                s.stdout_eof && s.stderr_eof
            });
        let state = self.capture.lock();
        panic!(
            "{} (pid {}) {reason}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
            self.name, self.pid, state.stdout, state.stderr
        );
    }

    /// SIGKILL by pid unless already reaped, then reap. Never panics (it runs in `Drop`).
    fn stop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exit = Some(status);
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            // ESRCH cannot happen for an unreaped child; any error is left to `wait` below.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `READY a=1 b=/x.sock` → `[("a","1"), ("b","/x.sock")]`; words without `=` are ignored.
fn parse_ready(line: &str) -> Vec<(String, String)> {
    line.strip_prefix("READY ")
        .unwrap_or(line)
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_ready;

    #[test]
    fn ready_line_pairs_are_parsed_in_order() {
        let pairs = parse_ready("READY listen=127.0.0.1:4 socket=/tmp/pm1/a.sock junk");
        assert_eq!(
            pairs,
            vec![
                ("listen".to_owned(), "127.0.0.1:4".to_owned()),
                ("socket".to_owned(), "/tmp/pm1/a.sock".to_owned()),
            ]
        );
    }
}
