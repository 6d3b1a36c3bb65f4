//! What both daemons need from systemd, and nothing when they run without it: listening sockets
//! passed in by socket activation (LISTEN_FDS / LISTEN_PID, matched by LISTEN_FDNAMES), and
//! sd_notify state (READY=1, STATUS=, WATCHDOG=1, STOPPING=1). Without NOTIFY_SOCKET the
//! notifications are no-ops; without LISTEN_FDS no socket is inherited and the daemon binds its
//! own. The children a daemon starts never see these variables (its supervisor removes them).

use listenfd::ListenFd;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use sd_notify::NotifyState;

#[derive(Debug, thiserror::Error)]
#[error("inherited socket {name:?} is not a {expected}: {source}")]
pub struct InheritError {
    name: String,
    expected: &'static str,
    source: std::io::Error,
}

/// The sockets systemd passed in, by name.
pub struct InheritedSockets {
    fds: ListenFd,
    names: Vec<String>,
}

impl InheritedSockets {
    /// Reads the environment; call it early, before the daemon starts threads.
    pub fn from_env() -> InheritedSockets {
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|names| names.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        InheritedSockets {
            fds: ListenFd::from_env(),
            names,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fds.len() == 0
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|known| known == name)
    }

    /// The Unix listening socket named `name`, if systemd passed one.
    pub fn take_unix(&mut self, name: &str) -> Result<Option<UnixListener>, InheritError> {
        let Some(index) = self.index(name) else {
            return Ok(None);
        };
        self.fds
            .take_unix_listener(index)
            .map_err(|source| InheritError {
                name: name.to_owned(),
                expected: "Unix stream listener",
                source,
            })
    }

    /// The TCP listening socket named `name`, if systemd passed one.
    pub fn take_tcp(&mut self, name: &str) -> Result<Option<TcpListener>, InheritError> {
        let Some(index) = self.index(name) else {
            return Ok(None);
        };
        self.fds
            .take_tcp_listener(index)
            .map_err(|source| InheritError {
                name: name.to_owned(),
                expected: "TCP listener",
                source,
            })
    }

    /// Names passed in that this daemon does not know (worth a warning: a unit typo).
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Sends `states` to the service manager, if there is one; failures are logged, not fatal.
pub fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// With WatchdogSec= set, sends WATCHDOG=1 at half the interval until `stop` — each time only
/// once `alive()` has answered `true` within that half interval. A daemon whose core task is
/// dead or stuck therefore stops feeding the watchdog, says so in its log, and systemd restarts it
/// when the interval runs out (a timer alone would keep a broken daemon looking alive).
pub async fn keep_watchdog_fed<F, Fut>(stop: CancellationToken, alive: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let half = Duration::from_micros(usec / 2);
    let mut ticker = tokio::time::interval(half);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {
                match tokio::time::timeout(half, alive()).await {
                    Ok(true) => notify(&[NotifyState::Watchdog]),
                    Ok(false) => tracing::error!("a core task is dead: not feeding the watchdog"),
                    Err(_) => tracing::error!(
                        "a core task did not answer within {half:?}: not feeding the watchdog"
                    ),
                }
            }
        }
    }
}

/// Watches a core task (one the daemon cannot work without): if it panics, says so and ends the
/// process at once (exit status 70), so that systemd restarts the daemon instead of leaving one
/// that looks alive and answers 503 for ever. Returns what the task returned otherwise.
pub async fn core_task<T>(name: &'static str, task: tokio::task::JoinHandle<T>) -> Option<T> {
    match task.await {
        Ok(value) => Some(value),
        Err(error) if error.is_panic() => {
            tracing::error!(task = name, %error, "a core task panicked; exiting so the daemon is restarted");
            eprintln!("{name} panicked ({error}); exiting so the daemon is restarted");
            std::process::exit(70);
        }
        Err(_) => None,
    }
}

/// The environment variable of [`injected_fault`]: `<core task name>=panic` or `=hang`.
pub const CORE_TASK_FAULT_ENV: &str = "DAEMON_TEST_CORE_TASK_FAULT";

/// A fault a test asks a core task to have as it starts, so that the daemon's handling of a dead
/// or stuck core task can be tested on the real binary (nothing a peer sends can make a core task
/// panic). Debug builds only: release builds compile this to nothing. With
/// `DAEMON_TEST_CORE_TASK_FAULT="the scheduler=panic"` the task named so panics; with `=hang` it
/// never gets past this point (it stops answering, as a deadlocked task would).
#[cfg(debug_assertions)]
pub async fn injected_fault(name: &str) {
    let Ok(fault) = std::env::var(CORE_TASK_FAULT_ENV) else {
        return;
    };
    match fault.split_once('=') {
        Some((task, "panic")) if task == name => {
            panic!("{name}: fault injected by {CORE_TASK_FAULT_ENV}")
        }
        Some((task, "hang")) if task == name => {
            tracing::warn!(
                task = name,
                "hanging: fault injected by {CORE_TASK_FAULT_ENV}"
            );
            std::future::pending::<()>().await;
        }
        _ => {}
    }
}

/// Release builds: no fault can be injected.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn injected_fault(_name: &str) {}

/// The signals a daemon acts on. Registered when constructed, so a signal that arrives while
/// the daemon is still starting is not lost (the default action would kill it instead).
pub struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Must run inside a tokio runtime.
    pub fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal: SIGTERM or SIGINT ask the daemon to stop, SIGHUP to reload.
    pub async fn next(&mut self) -> DaemonSignal {
        tokio::select! {
            _ = self.terminate.recv() => {
                tracing::info!("SIGTERM received");
                DaemonSignal::Stop
            }
            _ = self.interrupt.recv() => {
                tracing::info!("SIGINT received");
                DaemonSignal::Stop
            }
            _ = self.hangup.recv() => {
                tracing::info!("SIGHUP received");
                DaemonSignal::Reload
            }
        }
    }
}

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSignal {
    Stop,
    Reload,
}

/// RELOADING=1 with the MONOTONIC_USEC= systemd wants beside it.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(error) => {
            tracing::warn!(%error, "cannot read the monotonic clock");
            notify(&[NotifyState::Reloading]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the copy of this test binary that runs the panicking task.
    const CHILD: &str = "DAEMON_SUPPORT_CORE_TASK_PANIC_CHILD";

    #[test]
    fn a_panicked_core_task_ends_the_process_with_status_70_and_names_the_task() {
        if std::env::var_os(CHILD).is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let task = tokio::spawn(async { panic!("injected") });
                core_task("the scheduler", task).await;
            });
            // Reached only if the panic did not end the process: the parent sees status 0.
            std::process::exit(0);
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "systemd::tests::a_panicked_core_task_ends_the_process_with_status_70_and_names_the_task",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(70), "{stderr}");
        assert!(stderr.contains("the scheduler panicked"), "{stderr}");
    }

    #[test]
    fn a_core_task_that_ends_normally_gives_back_its_value() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let value =
            runtime.block_on(async { core_task("the registry", tokio::spawn(async { 7 })).await });
        assert_eq!(value, Some(7));
    }
}
