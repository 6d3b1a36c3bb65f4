//! One engine process: launching it from the command template, waiting for it, stopping it.
//!
//! The engine runs in its own process group (so stopping it reaches everything it started, and
//! a sidecar killed by systemd with KillMode=process leaves it running for adoption), with
//! stdout/stderr appended to its log file — never a pipe to the sidecar, which would break the
//! engine the moment the sidecar died. Its environment is the sidecar's minus systemd's
//! socket-activation and notify variables, plus the pool's `env` and `CUDA_VISIBLE_DEVICES`.

use super::record::process_start_ticks;
use crate::config::{ListenKind, ManagedEngine};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use pool_ipc::registry::Endpoint;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Variables a child must never inherit from a socket-activated sidecar.
const SYSTEMD_VARIABLES: [&str; 6] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

/// How long a SIGKILLed engine may take to go.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How often an adopted engine (not our child: no wait status) is checked for having exited.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// A command line with its placeholders filled in, and where the engine will listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub argv: Vec<String>,
    pub endpoint: Endpoint,
}

/// Fills in `{model}`, `{host}`, `{port}`, `{socket}`, `{slots}`. `generation` makes socket
/// paths of engines that overlap during a reload distinct.
pub fn plan_launch(
    pool: &str,
    engine: &ManagedEngine,
    model_path: &str,
    slots: Option<u32>,
    socket_dir: &Path,
    generation: u64,
) -> Result<Launch, String> {
    let (host, port, socket, endpoint) = match engine.listen {
        ListenKind::Tcp => {
            let port = free_port()?;
            let endpoint = Endpoint::Http {
                authority: format!("127.0.0.1:{port}"),
            };
            (
                "127.0.0.1".to_owned(),
                port.to_string(),
                String::new(),
                endpoint,
            )
        }
        ListenKind::Unix => {
            let name = if generation == 0 {
                format!("{pool}.sock")
            } else {
                format!("{pool}.{generation}.sock")
            };
            let path = socket_dir.join(name).display().to_string();
            let endpoint = Endpoint::Unix { path: path.clone() };
            (path.clone(), "0".to_owned(), path, endpoint)
        }
    };
    let slots = slots.map(|n| n.to_string()).unwrap_or_default();
    let argv = engine
        .command
        .iter()
        .map(|argument| {
            argument
                .replace("{model}", model_path)
                .replace("{host}", &host)
                .replace("{port}", &port)
                .replace("{socket}", &socket)
                .replace("{slots}", &slots)
        })
        .collect();
    Ok(Launch { argv, endpoint })
}

/// A port free right now on 127.0.0.1. The engine binds it a moment later, so another process
/// may take it in between: the engine then exits at once (restarted like any other failure, on a
/// new port), or, if the other process answers the probes, [`port_served_by`] tells it apart.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|error| format!("cannot find a free port: {error}"))
}

/// Whether the listener on TCP `port` belongs to the process group `pgid` (the engine and what it
/// started): a process that took the engine's port must never be mistaken for the engine.
pub fn port_served_by(port: u16, pgid: u32) -> Result<bool, String> {
    let unreadable = |error: procfs::ProcError| format!("cannot read the socket tables: {error}");
    let mut entries = procfs::net::tcp().map_err(unreadable)?;
    entries.extend(procfs::net::tcp6().map_err(unreadable)?);
    let listeners: Vec<u64> = entries
        .iter()
        .filter(|entry| {
            entry.local_address.port() == port && entry.state == procfs::net::TcpState::Listen
        })
        .map(|entry| entry.inode)
        .collect();
    if listeners.is_empty() {
        return Ok(false);
    }
    let processes = procfs::process::all_processes()
        .map_err(|error| format!("cannot list processes: {error}"))?;
    let in_group = processes.filter_map(Result::ok).filter(|process| {
        process
            .stat()
            .is_ok_and(|stat| u32::try_from(stat.pgrp).is_ok_and(|group| group == pgid))
    });
    for process in in_group {
        let Ok(fds) = process.fd() else { continue };
        let owns_listener = fds.filter_map(Result::ok).any(|fd| {
            matches!(fd.target, procfs::process::FDTarget::Socket(inode) if listeners.contains(&inode))
        });
        if owns_listener {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A running engine, started by us or adopted from a previous sidecar.
#[derive(Debug)]
pub struct EngineProcess {
    pub pid: u32,
    pub start_ticks: u64,
    /// `None` for an adopted engine: it is not our child, so init reaps it.
    child: Option<tokio::process::Child>,
}

pub fn spawn(
    launch: &Launch,
    engine: &ManagedEngine,
    log_path: &Path,
) -> Result<EngineProcess, String> {
    let Some((program, arguments)) = launch.argv.split_first() else {
        return Err("empty command".to_owned());
    };
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create log dir {}: {error}", dir.display()))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|error| format!("cannot open engine log {}: {error}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|error| format!("cannot open engine log {}: {error}", log_path.display()))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    for variable in SYSTEMD_VARIABLES {
        command.env_remove(variable);
    }
    command.envs(&engine.env);
    if let Some(gpus) = &engine.gpus {
        command.env("CUDA_VISIBLE_DEVICES", gpus);
    }
    if let Some(dir) = &engine.working_dir {
        command.current_dir(dir);
    }
    let child = command
        .spawn()
        .map_err(|error| format!("cannot start {program:?}: {error}"))?;
    let pid = child
        .id()
        .ok_or_else(|| "the engine exited before its pid was known".to_owned())?;
    Ok(EngineProcess {
        pid,
        start_ticks: process_start_ticks(pid).unwrap_or(0),
        child: Some(child),
    })
}

impl EngineProcess {
    pub fn adopted(pid: u32, start_ticks: u64) -> EngineProcess {
        EngineProcess {
            pid,
            start_ticks,
            child: None,
        }
    }

    fn group(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    fn signal_group(&self, signal: Signal) {
        if let Err(errno) = killpg(self.group(), signal)
            && errno != nix::errno::Errno::ESRCH
        {
            tracing::warn!(pid = self.pid, %signal, %errno, "cannot signal the engine's process group");
        }
    }

    /// Waits until the engine exits; says how. Cancel-safe.
    pub async fn wait_exit(&mut self) -> String {
        match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(error) => format!("cannot wait for the engine: {error}"),
            },
            None => {
                while process_start_ticks(self.pid) == Some(self.start_ticks) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                "the adopted engine exited".to_owned()
            }
        }
    }

    /// SIGTERM to the whole group, `grace` to exit, then SIGKILL. Reaps our own child.
    pub async fn stop(&mut self, grace: Duration) -> String {
        self.signal_group(Signal::SIGTERM);
        let reason = match tokio::time::timeout(grace, self.wait_exit()).await {
            Ok(reason) => reason,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    grace_ms = grace.as_millis() as u64,
                    "engine ignored SIGTERM; killing it"
                );
                self.signal_group(Signal::SIGKILL);
                // A process stuck in the kernel (a wedged GPU driver) may not die even now:
                // report it rather than wait forever.
                match tokio::time::timeout(KILL_WAIT, self.wait_exit()).await {
                    Ok(reason) => reason,
                    Err(_) => {
                        tracing::error!(
                            pid = self.pid,
                            "engine did not exit after SIGKILL; leaving it"
                        );
                        format!("did not exit {} s after SIGKILL", KILL_WAIT.as_secs())
                    }
                }
            }
        };
        // Anything the engine started and left behind goes with it.
        self.signal_group(Signal::SIGKILL);
        reason
    }

    /// After an unexpected exit: make sure nothing of the engine's group is left.
    pub fn kill_leftovers(&self) {
        self.signal_group(Signal::SIGKILL);
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!(
            "killed by signal {}",
            Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string())
        ),
        _ => format!("ended ({status})"),
    }
}

/// Between why an engine failed and the last lines of its log in a pool's `last_error`.
pub const LOG_TAIL_MARKER: &str = "; last output: ";

/// The last few lines of an engine's log, for the reason shown when it dies.
pub fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    // The 4 KiB window may start inside a UTF-8 character.
    let text = String::from_utf8_lossy(&bytes);
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_served_by_the_process_group_holding_its_listener_and_by_no_other() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let own_group = u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap();
        assert_eq!(port_served_by(port, own_group), Ok(true));
        let other_group = own_group.wrapping_add(1_000_000);
        assert_eq!(port_served_by(port, other_group), Ok(false));
        drop(listener);
        assert_eq!(
            port_served_by(port, own_group),
            Ok(false),
            "nobody listens now"
        );
    }
    use crate::config::{ReloadPolicy, RestartPolicy};

    fn engine(listen: ListenKind) -> ManagedEngine {
        ManagedEngine {
            model_path: "/m/tiny.gguf".into(),
            command: vec![
                "llama-server".into(),
                "-m".into(),
                "{model}".into(),
                "--host".into(),
                "{host}".into(),
                "--port".into(),
                "{port}".into(),
                "-np".into(),
                "{slots}".into(),
            ],
            listen,
            env: Default::default(),
            working_dir: None,
            gpus: None,
            startup_timeout_ms: 1000,
            stop_grace_ms: 1000,
            restart: RestartPolicy::default(),
            reload: ReloadPolicy::default(),
        }
    }

    #[test]
    fn placeholders_fill_in_for_a_unix_socket_engine() {
        let launch = plan_launch(
            "a",
            &engine(ListenKind::Unix),
            "/m/x.gguf",
            Some(4),
            Path::new("/run/pm/engines"),
            0,
        )
        .unwrap();
        assert_eq!(
            launch.argv,
            [
                "llama-server",
                "-m",
                "/m/x.gguf",
                "--host",
                "/run/pm/engines/a.sock",
                "--port",
                "0",
                "-np",
                "4"
            ]
        );
        assert_eq!(
            launch.endpoint,
            Endpoint::Unix {
                path: "/run/pm/engines/a.sock".into()
            }
        );
    }

    #[test]
    fn a_tcp_engine_gets_a_port_of_its_own() {
        let launch = plan_launch(
            "a",
            &engine(ListenKind::Tcp),
            "/m",
            None,
            Path::new("/x"),
            3,
        )
        .unwrap();
        let Endpoint::Http { authority } = &launch.endpoint else {
            panic!("{:?}", launch.endpoint)
        };
        assert!(authority.starts_with("127.0.0.1:"));
        assert_eq!(launch.argv[4], "127.0.0.1");
        assert_eq!(format!("127.0.0.1:{}", launch.argv[6]), *authority);
        assert_eq!(launch.argv[8], "");
    }
}
