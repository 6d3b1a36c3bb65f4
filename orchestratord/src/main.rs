//! `orchestratord` (skeleton): connects to pool-managerd, keeps a live mirror of its registry
//! and logs every change. The HTTP front door (admission, placement, streaming) is built on this
//! mirror in a later step; until then this binary serves no requests.

use clap::Parser;
use pool_ipc::client::{ClientConfig, ConnectionState, PoolClient};
use pool_ipc::socket_path::resolve_socket_path;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "orchestratord",
    version,
    about = "LLM request orchestrator (skeleton: follows pool-managerd's registry, serves no HTTP yet)"
)]
struct Args {
    /// pool-managerd's socket (default: $POOL_MANAGERD_SOCKET, /run/pool-managerd/pool.sock for
    /// root, $XDG_RUNTIME_DIR/pool-managerd/pool.sock otherwise).
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let socket = match resolve_socket_path(args.socket) {
        Ok(socket) => socket,
        Err(error) => {
            eprintln!("orchestratord: {error}");
            return ExitCode::from(2);
        }
    };
    let client = PoolClient::start(ClientConfig::new(socket, "orchestratord"));
    let mut state = client.connection_state();
    loop {
        let connected = state
            .wait_for(|state| matches!(state, ConnectionState::Connected { .. }))
            .await
            .is_ok();
        if !connected {
            return ExitCode::from(1);
        }
        match client.subscribe().await {
            Ok(mut mirror) => {
                tracing::info!("following pool-managerd's registry");
                loop {
                    tokio::select! {
                        changed = mirror.changed() => if changed.is_err() { break },
                        _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                    }
                    let mirror = mirror.borrow_and_update();
                    for pool in &mirror.snapshot.pools {
                        tracing::info!(epoch = mirror.snapshot.epoch, connected = mirror.connected, pool = %pool.pool_id, state = %pool.state, slots_free = pool.slots_free, slots_total = pool.slots_total, "pool");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "subscribe failed; retrying on the next connection")
            }
        }
    }
}
