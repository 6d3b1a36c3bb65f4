//! `dispatch-bench`: measures pool-managerd's dispatch check three ways in one run, interleaved
//! in rounds so that machine noise hits all three alike:
//!   1. `CanDispatch` over the Unix socket (pool-ipc client, one call in flight),
//!   2. `Acquire` + `Release` over the socket (two round trips: a real reservation),
//!   3. `GET /pools/{id}/status` on the HTTP debug shim (keep-alive, JSON decoded),
//!
//! beside a floor (a raw blocking Unix-socket ping-pong), then the calls per second of 8 concurrent callers pipelining on one socket connection.
//!
//! Without `--socket` it starts its own pool-managerd and a test engine double (a fake engine:
//! only the sidecar is measured) from the same target directory.

use clap::Parser;
use e2e::sidecar::{PoolSpec, sidecar_command, socket_path, write_config};
use e2e::{Daemon, start_engine_double, temp_dir};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pool_ipc::client::{ClientConfig, PoolClient};
use pool_ipc::registry::{AcquireTarget, PoolId, ReleaseOutcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Benchmark pool-managerd's dispatch check: socket vs HTTP/JSON")]
struct Args {
    /// A running pool-managerd's socket; without it the benchmark starts its own.
    #[arg(long, requires = "shim")]
    socket: Option<PathBuf>,
    /// The running daemon's debug shim, host:port.
    #[arg(long)]
    shim: Option<String>,
    /// The pool to check (must be ready with a free slot).
    #[arg(long, default_value = "bench")]
    pool: String,
    /// Measured calls per method.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Seconds of the 8-caller pipelined throughput run.
    #[arg(long, default_value_t = 3)]
    throughput_secs: u64,
    /// Tokio worker threads of the benchmark client (0: current-thread runtime).
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
}

type Shim = Client<HttpConnector, Empty<bytes::Bytes>>;

struct Own {
    _dir: tempfile::TempDir,
    _engine: Daemon,
    _sidecar: Daemon,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut own = None;
    let (socket, shim) = match (&args.socket, &args.shim) {
        (Some(socket), Some(shim)) => (socket.clone(), shim.clone()),
        _ => {
            let dir = temp_dir();
            let engine = start_engine_double(&["--slots", "64"]);
            let config = write_config(
                dir.path(),
                "",
                &[PoolSpec {
                    probe_interval_ms: 1000,
                    ..PoolSpec::new(&args.pool, engine.ready("listen"), 64)
                }],
            );
            let sidecar = sidecar_command(dir.path(), &config)
                .env("RUST_LOG", "warn")
                .start();
            let shim = sidecar.ready("debug_http").to_owned();
            let socket = socket_path(dir.path());
            own = Some(Own {
                _dir: dir,
                _engine: engine,
                _sidecar: sidecar,
            });
            (socket, shim)
        }
    };
    let runtime = if args.client_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()
    };
    let result = match runtime {
        Ok(runtime) => runtime.block_on(bench(&args, socket, shim)),
        Err(error) => Err(format!("cannot start the runtime: {error}")),
    };
    drop(own);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dispatch-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
        sorted.get(rank).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    }
}

/// The machine's floor for one request/reply on a Unix socket: two threads bouncing 16 bytes
/// with blocking reads, no runtime, no codec. It moves with the machine's load, so the
/// benchmark measures it in the same rounds as everything else.
struct PingPong {
    near: std::os::unix::net::UnixStream,
    _echo: std::thread::JoinHandle<()>,
}

impl PingPong {
    fn start() -> std::io::Result<PingPong> {
        use std::io::{Read, Write};
        let (near, mut far) = std::os::unix::net::UnixStream::pair()?;
        let echo = std::thread::spawn(move || {
            let mut message = [0u8; 16];
            while far.read_exact(&mut message).is_ok() {
                if far.write_all(&message).is_err() {
                    return;
                }
            }
        });
        Ok(PingPong { near, _echo: echo })
    }

    fn round_trip(&mut self) -> std::io::Result<Duration> {
        use std::io::{Read, Write};
        let mut message = [7u8; 16];
        let start = Instant::now();
        self.near.write_all(&message)?;
        self.near.read_exact(&mut message)?;
        Ok(start.elapsed())
    }
}

async fn bench(args: &Args, socket: PathBuf, shim: String) -> Result<(), String> {
    let client = PoolClient::connect(ClientConfig::new(&socket, "dispatch-bench"))
        .await
        .map_err(|e| e.to_string())?;
    let pool = PoolId(args.pool.clone());
    let check = client
        .can_dispatch(&pool)
        .await
        .map_err(|e| e.to_string())?;
    if !check.dispatchable {
        return Err(format!("pool {pool} is not dispatchable: {check:?}"));
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Shim = Client::builder(TokioExecutor::new()).build(connector);
    let status_uri: hyper::Uri = format!("http://{shim}/pools/{pool}/status")
        .parse()
        .map_err(|e| format!("bad shim address: {e}"))?;

    let mut floor = PingPong::start().map_err(|e| format!("floor: {e}"))?;
    let mut floor_samples = Samples::default();
    let mut can_dispatch = Samples::default();
    let mut acquire_release = Samples::default();
    let mut http_status = Samples::default();
    let round = 1000.min(args.iterations);
    let rounds = args.iterations.div_ceil(round) + 1; // the first round is warm-up
    for index in 0..rounds {
        let warm_up = index == 0;
        for _ in 0..round {
            let elapsed = floor.round_trip().map_err(|e| format!("floor: {e}"))?;
            if !warm_up {
                floor_samples.0.push(elapsed);
            }
        }
        for _ in 0..round {
            let start = Instant::now();
            let check = client
                .can_dispatch(&pool)
                .await
                .map_err(|e| e.to_string())?;
            let elapsed = start.elapsed();
            std::hint::black_box(check);
            if !warm_up {
                can_dispatch.0.push(elapsed);
            }
        }
        for task in 0..round {
            let start = Instant::now();
            let guard = client
                .acquire(
                    AcquireTarget::Pool(pool.clone()),
                    format!("bench-{task}"),
                    None,
                    1,
                )
                .await
                .map_err(|e| e.to_string())?;
            guard
                .release(ReleaseOutcome::Completed)
                .await
                .map_err(|e| e.to_string())?;
            if !warm_up {
                acquire_release.0.push(start.elapsed());
            }
        }
        for _ in 0..round {
            let start = Instant::now();
            let response = http
                .get(status_uri.clone())
                .await
                .map_err(|e| format!("shim: {e}"))?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("shim body: {e}"))?
                .to_bytes();
            let status: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("shim JSON: {e}"))?;
            let elapsed = start.elapsed();
            if status["ready"] != serde_json::Value::Bool(true) {
                return Err(format!("shim says the pool is not ready: {status}"));
            }
            if !warm_up {
                http_status.0.push(elapsed);
            }
        }
    }

    println!(
        "dispatch check, {} calls each, one in flight, interleaved in rounds of {round} (client runtime: {})",
        can_dispatch.0.len(),
        if args.client_threads == 0 {
            "current-thread".to_owned()
        } else {
            format!("{} workers", args.client_threads)
        }
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "method", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, samples) in [
        ("floor: raw Unix-socket ping-pong", &floor_samples),
        ("socket CanDispatch", &can_dispatch),
        ("socket Acquire+Release", &acquire_release),
        ("HTTP/JSON GET /pools/{id}/status", &http_status),
    ] {
        println!(
            "{name:<34} {:>9.1} {:>9.1} {:>9.1}",
            samples.percentile(50.0),
            samples.percentile(99.0),
            samples.percentile(99.9)
        );
    }
    println!(
        "ratio HTTP/socket CanDispatch: p50 {:.1}x, p99 {:.1}x",
        http_status.percentile(50.0) / can_dispatch.percentile(50.0),
        http_status.percentile(99.0) / can_dispatch.percentile(99.0)
    );

    println!(
        "CanDispatch above the floor: p50 +{:.1} us",
        can_dispatch.percentile(50.0) - floor_samples.percentile(50.0)
    );

    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.throughput_secs);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        let calls = Arc::clone(&calls);
        let pool = pool.clone();
        callers.spawn(async move {
            while Instant::now() < deadline {
                client
                    .can_dispatch(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                calls.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
    }
    let started = Instant::now();
    while let Some(joined) = callers.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    let total = calls.load(Ordering::Relaxed);
    println!(
        "8 concurrent callers pipelining CanDispatch on one connection: {:.0} calls/s ({total} calls in {:.2} s)",
        total as f64 / started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    client.close();
    Ok(())
}
