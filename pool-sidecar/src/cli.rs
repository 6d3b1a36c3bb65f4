//! The command line: `pool-managerd [serve]` runs the daemon; `status`, `drain`, `reload`,
//! `restart`, `load` and `unload` are operator commands that talk to a running daemon over its
//! socket; `logs` reads a pool's engine log file.
//!
//! Exit codes: 0 success; 1 the daemon answered with an error (e.g. unknown pool), or the log
//! cannot be read; 2 the daemon could not be reached or the command line / config is wrong.

use crate::config::Config;
use crate::startup::default_state_dir;
use crate::status_view::{PoolStatusView, RegistryView, render_gpus, render_memory, render_table};
use crate::supervisor::EnginePaths;
use crate::supervisor::log::{FOLLOW_POLL, LogTail};
use clap::{Args, Parser, Subcommand};
use daemon_support::logging::LogFormat;
use pool_ipc::client::{ClientConfig, ClientError, PoolClient};
use pool_ipc::registry::{MemoryReport, PoolId};
use pool_ipc::socket_path::resolve_socket_path;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/pool-managerd/config.toml";

#[derive(Debug, Parser)]
#[command(
    name = "pool-managerd",
    version,
    about = "Pool registry and engine sidecar for LLM inference hosts",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// The Unix socket (default: $POOL_MANAGERD_SOCKET, /run/pool-managerd/pool.sock for root,
    /// $XDG_RUNTIME_DIR/pool-managerd/pool.sock otherwise).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The pool configuration (TOML).
    #[arg(long, env = "POOL_MANAGERD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The Unix socket; overrides the config's server.socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Address of the HTTP debug shim (ip:port, port 0 for any, or "off"); overrides the config.
    #[arg(long)]
    pub debug_listen: Option<String>,
    /// Where engine records (for adoption) and engine logs live; overrides server.state_dir
    /// (default /var/lib/pool-managerd for root, $XDG_STATE_HOME/pool-managerd otherwise).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no command is given).
    Serve(ServeArgs),
    /// Show the pools of a running pool-managerd.
    Status {
        /// Only this pool.
        pool: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Stop giving out leases on a pool, then stop its engine when they end (or at the deadline).
    Drain {
        pool: String,
        #[arg(long, default_value_t = 60)]
        deadline_secs: u64,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Bring a new model up on a pool and swap to it.
    Reload {
        pool: String,
        model: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Restart a pool's engine (also clears a Failed pool).
    Restart {
        pool: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Load an on-demand pool's engine now (returns once the load is under way).
    Load {
        pool: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Stop giving out leases on an on-demand pool, then unload its engine when they end (or at
    /// its drain deadline).
    Unload {
        pool: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print the last lines of a pool's engine log (`<state dir>/logs/<pool>.log`), and with
    /// `-f` every line written after them, across rotations, until interrupted. Reads the file
    /// itself: run it as a user who may (root, or pool-managerd's user).
    Logs {
        pool: String,
        /// Follow the log.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// The daemon's state directory (default: its config's server.state_dir, else
        /// /var/lib/pool-managerd for root, $XDG_STATE_HOME/pool-managerd otherwise).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The daemon's config, read for server.state_dir when --state-dir is not given.
        #[arg(long, env = "POOL_MANAGERD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

/// Runs an operator command against a running daemon.
pub async fn run_command(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(_) => return ExitCode::from(2),
        Command::Logs {
            pool,
            follow,
            lines,
            state_dir,
            config,
        } => return logs(&pool, follow, lines, state_dir, &config).await,
        Command::Status { pool, json, socket } => status(socket, pool, json).await,
        Command::Drain {
            pool,
            deadline_secs,
            socket,
        } => {
            let deadline = Duration::from_secs(deadline_secs);
            admin(socket, |client| async move {
                client.drain(&PoolId(pool), deadline).await
            })
            .await
        }
        Command::Reload {
            pool,
            model,
            socket,
        } => {
            admin(socket, |client| async move {
                client.reload(&PoolId(pool), &model).await
            })
            .await
        }
        Command::Restart { pool, socket } => {
            admin(socket, |client| async move {
                client.restart(&PoolId(pool)).await
            })
            .await
        }
        Command::Load { pool, socket } => {
            admin(
                socket,
                |client| async move { client.load(&PoolId(pool)).await },
            )
            .await
        }
        Command::Unload { pool, socket } => {
            admin(socket, |client| async move {
                client.unload(&PoolId(pool)).await
            })
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pool-managerd: {error}");
            match error {
                ClientError::Remote(_) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

async fn connect(socket: SocketArgs) -> Result<PoolClient, ClientError> {
    let path = resolve_socket_path(socket.socket).map_err(|error| ClientError::Connect {
        path: PathBuf::new(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, error.to_string()),
    })?;
    PoolClient::connect(ClientConfig::new(path, "pool-managerd-cli")).await
}

async fn status(socket: SocketArgs, pool: Option<String>, json: bool) -> Result<(), ClientError> {
    let client = connect(socket).await?;
    let text = match pool {
        Some(pool) => {
            let memory = memory_or_none(&client).await;
            let view = PoolStatusView::from(&client.pool_status(&PoolId(pool)).await?)
                .with_memory(&memory);
            if json {
                to_json(&view)
            } else {
                render_table(&[view])
            }
        }
        None => {
            let memory = memory_or_none(&client).await;
            let view = RegistryView::from(&client.snapshot().await?).with_memory(&memory);
            let gpus = client.gpus().await?;
            if json {
                to_json(&serde_json::json!({
                    "epoch": view.epoch,
                    "pools": view.pools,
                    "memory": memory.devices,
                    "gpus": gpus,
                }))
            } else {
                format!(
                    "registry epoch {}, {} pools\n{}\n{}{}",
                    view.epoch,
                    view.pools.len(),
                    render_table(&view.pools),
                    render_memory(&memory),
                    render_gpus(&gpus)
                )
            }
        }
    };
    print!("{text}");
    client.close();
    Ok(())
}

/// The memory budgets and footprints, or none (said on stderr) if pool-managerd cannot tell
/// right now: the rest of the status is still worth printing.
async fn memory_or_none(client: &PoolClient) -> MemoryReport {
    client.memory().await.unwrap_or_else(|error| {
        eprintln!("memory budgets unavailable: {error}");
        MemoryReport::default()
    })
}

fn to_json(value: &impl serde::Serialize) -> String {
    match serde_json::to_string_pretty(value) {
        Ok(text) => text + "\n",
        Err(error) => format!("{{\"error\":\"cannot render JSON: {error}\"}}\n"),
    }
}

async fn admin<F, Fut>(socket: SocketArgs, operation: F) -> Result<(), ClientError>
where
    F: FnOnce(PoolClient) -> Fut,
    Fut: std::future::Future<Output = Result<(), ClientError>>,
{
    let client = connect(socket).await?;
    operation(client.clone()).await?;
    println!("accepted");
    client.close();
    Ok(())
}

/// `pool-managerd logs`: see [`Command::Logs`].
async fn logs(
    pool: &str,
    follow: bool,
    lines: usize,
    state_dir: Option<PathBuf>,
    config: &Path,
) -> ExitCode {
    if pool.is_empty()
        || pool.starts_with('.')
        || !pool
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        eprintln!("pool-managerd: {pool:?} is not a pool id");
        return ExitCode::from(2);
    }
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => match configured_state_dir(config) {
            Ok(dir) => dir,
            Err(message) => {
                eprintln!("pool-managerd: {message}");
                return ExitCode::from(2);
            }
        },
    };
    let path = EnginePaths::under(&state_dir).log(pool);
    let (mut tail, last) = match LogTail::open(&path, lines) {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("pool-managerd: cannot read {}: {error}", path.display());
            return ExitCode::from(1);
        }
    };
    if print_lines(&last).is_err() || !follow {
        return ExitCode::SUCCESS;
    }
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        match tail.read_new() {
            Ok(new) => {
                // A closed stdout (`| head`) ends the command quietly.
                if print_lines(&new).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Err(error) => {
                eprintln!("pool-managerd: cannot read {}: {error}", path.display());
                return ExitCode::from(1);
            }
        }
    }
}

fn print_lines(lines: &[String]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        writeln!(stdout, "{line}")?;
    }
    stdout.flush()
}

/// The state directory a daemon started with `config` uses (without --state-dir).
fn configured_state_dir(config: &Path) -> Result<PathBuf, String> {
    let from_config = if config.exists() {
        Config::load(config)
            .map_err(|error| error.to_string())?
            .server
            .state_dir
    } else {
        None
    };
    from_config
        .or_else(default_state_dir)
        .ok_or_else(|| "no state directory: pass --state-dir".to_owned())
}
