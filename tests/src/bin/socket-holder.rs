//! `socket-holder`: plays systemd's part for tests of socket activation across restarts. It
//! binds a Unix socket and a TCP socket (loopback unless `--tcp` says otherwise: tests bind
//! anything else only inside a network namespace of their own) once, hands both to a child as
//! LISTEN_FDS (fds 3 and 4, named by LISTEN_FDNAMES) and, like `Restart=always`, starts the child
//! again whenever it exits, on the same sockets; with `--once` it exits with the child's status
//! instead. Prints `READY socket=… tcp=…` once, then `CHILD pid=N` for every child it starts.
//! Stops (and stops its child) on SIGTERM.

use clap::Parser;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::dup2;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Test helper: holds listening sockets and restarts a child on them")]
struct Args {
    /// The Unix socket to bind (passed first, as fd 3).
    #[arg(long)]
    unix: PathBuf,
    /// Names for the two sockets, as LISTEN_FDNAMES.
    #[arg(long, default_value = "ipc:debug-http")]
    names: String,
    /// The TCP address to bind (passed second, as fd 4).
    #[arg(long, default_value = "127.0.0.1:0")]
    tcp: String,
    /// Start the child once and exit with its status, instead of restarting it.
    #[arg(long)]
    once: bool,
    /// The child's command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("socket-holder: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // Claim fds 3 and 4 first (the lowest free ones at start-up), then move the sockets there.
    let mut slots = Vec::new();
    for expected in [3, 4] {
        let placeholder = std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?,
        );
        if placeholder.as_raw_fd() != expected {
            return Err(format!(
                "fd {expected} is taken; cannot pass sockets as LISTEN_FDS"
            ));
        }
        slots.push(placeholder);
    }
    let _ = std::fs::remove_file(&args.unix);
    let unix = std::os::unix::net::UnixListener::bind(&args.unix)
        .map_err(|e| format!("bind {}: {e}", args.unix.display()))?;
    let tcp = std::net::TcpListener::bind(&args.tcp)
        .map_err(|e| format!("bind tcp {}: {e}", args.tcp))?;
    let tcp_addr = tcp.local_addr().map_err(|e| e.to_string())?;
    // The child inherits exactly fds 3 and 4: the sockets, without close-on-exec.
    dup2(&unix, &mut slots[0]).map_err(|e| format!("dup2: {e}"))?;
    dup2(&tcp, &mut slots[1]).map_err(|e| format!("dup2: {e}"))?;
    for slot in &slots {
        fcntl(slot, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| format!("fcntl: {e}"))?;
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "READY socket={} tcp={tcp_addr}",
        args.unix.display()
    );
    let _ = stdout.flush();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _signals = signal_hook_flag(&stop)?;
    let Some((program, rest)) = args.command.split_first() else {
        return Err("no command".into());
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut child = std::process::Command::new(program)
            .args(rest)
            .env("LISTEN_FDS", "2")
            .env_remove("LISTEN_PID")
            .env("LISTEN_FDNAMES", &args.names)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let _ = writeln!(stdout, "CHILD pid={}", child.id());
        let _ = stdout.flush();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if args.once {
                    let _ = std::fs::remove_file(&args.unix);
                    return match status.code() {
                        Some(0) => Ok(()),
                        code => Err(format!("the child exited with {code:?}")),
                    };
                }
                break;
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let _ = child.wait();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(&args.unix);
    Ok(())
}

/// Sets `stop` on SIGTERM or SIGINT. Uses signal handlers (reset to the default in the child at
/// exec), not a blocked mask, which the child would inherit and then ignore SIGTERM.
fn signal_hook_flag(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<tokio::runtime::Runtime, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let stop = std::sync::Arc::clone(stop);
    let (mut terminate, mut interrupt) = {
        let _guard = runtime.enter();
        (
            signal(SignalKind::terminate()).map_err(|e| format!("signal: {e}"))?,
            signal(SignalKind::interrupt()).map_err(|e| format!("signal: {e}"))?,
        )
    };
    runtime.spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(runtime)
}
