//! `lease-holder`: a pool-managerd client process for tests that kill clients. It connects,
//! takes one lease of `--slots` slots (default 1) on `--pool`, prints `READY lease=<id>`, and
//! holds it until it is killed.

use clap::Parser;
use pool_ipc::client::{ClientConfig, PoolClient};
use pool_ipc::registry::{AcquireTarget, PoolId};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Test helper: holds one lease on a pool until killed")]
struct Args {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    pool: String,
    #[arg(long, default_value_t = 1)]
    slots: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let client = match PoolClient::connect(ClientConfig::new(&args.socket, "lease-holder")).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("lease-holder: {error}");
            return ExitCode::from(2);
        }
    };
    let guard = match client
        .acquire(
            AcquireTarget::Pool(PoolId(args.pool)),
            "held",
            None,
            args.slots,
        )
        .await
    {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("lease-holder: {error}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "READY lease={}", guard.lease().id);
    let _ = stdout.flush();
    std::future::pending::<()>().await;
    drop(guard);
    ExitCode::SUCCESS
}
