//! From `pool-managerd serve`'s flags to a running daemon: the umask, the configuration with the
//! command line's overrides, the sockets ([`listeners`](crate::listeners)), the state directory
//! and the engines' socket directory, the signal handlers (SIGHUP rereads the config), then
//! [`daemon::run`](crate::daemon::run) until SIGTERM/SIGINT. Everything that can fail does so
//! before any pool starts, with a message for the operator.

use crate::cli::ServeArgs;
use crate::config::{Config, parse_listen};
use crate::daemon::run;
use crate::ipc::socket::prepare_engine_directory;
use crate::listeners;
use crate::supervisor::EnginePaths;
use daemon_support::systemd::{self, DaemonSignal, InheritedSockets, NotifyState, StopSignals};
use std::io::Write;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Runs the daemon until it is asked to stop; `Err` is the message it could not start with.
pub fn serve(
    args: ServeArgs,
    runtime: &tokio::runtime::Runtime,
    inherited: InheritedSockets,
) -> Result<(), String> {
    // As pool-managerd.service's UMask=0007, when started by hand too: what it and its engines
    // create (engine sockets above all) is never open to other users, and the socket group
    // keeps read and write.
    nix::sys::stat::umask(nix::sys::stat::Mode::S_IRWXO);
    let config = load_config(&args)?;

    let _guard = runtime.enter();
    let served = listeners::open(&args, &config, inherited)?;

    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.server.state_dir.clone())
        .or_else(default_state_dir)
        .ok_or("no state directory: pass --state-dir or set server.state_dir")?;
    let mut paths = EnginePaths::under(&state_dir);
    if let Some(dir) = served.socket_path.parent() {
        paths.socket_dir = dir.join("engines");
    }
    prepare_engine_directory(&paths.socket_dir, config.server.socket_group)
        .map_err(|error| error.to_string())?;

    let shutdown = CancellationToken::new();
    let signals = StopSignals::install()
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let (reload_requests, reloads) = mpsc::unbounded_channel();
    runtime.spawn(handle_signals(
        signals,
        shutdown.clone(),
        reload_requests,
        args.config.clone(),
    ));
    let socket_shown = served.socket_path.display().to_string();
    let debug_addr = served.debug_addr;
    runtime.block_on(run(
        config,
        served.listeners,
        paths,
        shutdown,
        reloads,
        move || {
            let mut stdout = std::io::stdout();
            let _ = writeln!(
                stdout,
                "READY socket={socket_shown} debug_http={debug_addr}"
            );
            let _ = stdout.flush();
            systemd::notify(&[NotifyState::Ready]);
        },
    ));
    drop(served.socket_file);
    Ok(())
}

/// The configuration file with `--debug-listen` applied (and its exposure checked).
fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = Config::load(&args.config).map_err(|error| error.to_string())?;
    if let Some(listen) = &args.debug_listen {
        config.debug_http.listen = match listen.as_str() {
            "off" => None,
            text => Some(parse_listen(text)?),
        };
        config.debug_http.check_exposure()?;
    }
    Ok(config)
}

/// Where state lives without --state-dir or server.state_dir.
pub(crate) fn default_state_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/var/lib/pool-managerd"));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
        })?;
    Some(base.join("pool-managerd"))
}

/// SIGTERM/SIGINT stop the daemon; SIGHUP rereads the config file and hands it to the daemon,
/// which applies the pool changes (RELOADING=1 now, READY=1 once applied).
async fn handle_signals(
    mut signals: StopSignals,
    shutdown: CancellationToken,
    reloads: mpsc::UnboundedSender<Result<Config, String>>,
    config_path: PathBuf,
) {
    loop {
        match signals.next().await {
            DaemonSignal::Stop => return shutdown.cancel(),
            DaemonSignal::Reload => {
                systemd::notify_reloading();
                tracing::info!(config = %config_path.display(), "rereading the configuration");
                let reread = Config::load(&config_path).map_err(|error| error.to_string());
                if reloads.send(reread).is_err() {
                    return;
                }
            }
        }
    }
}
