//! Starting a real `pool-managerd` for a test: a config file written from [`PoolSpec`]s, the
//! socket in a short temp dir, the debug shim on an ephemeral loopback port.

use crate::{Daemon, DaemonBuilder, binary};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One `[[pool]]` of the generated config.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub id: String,
    pub model: String,
    pub engine: &'static str,
    pub endpoint: String,
    pub slots: u32,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub failure_threshold: u32,
    /// The pool's `endpoints` key (API names); `None` leaves it out: the engine kind's defaults.
    pub endpoints: Option<Vec<&'static str>>,
}

impl PoolSpec {
    /// A llama.cpp pool probed every 50 ms, Unhealthy after 2 failed probes.
    pub fn new(id: &str, endpoint: &str, slots: u32) -> PoolSpec {
        PoolSpec {
            id: id.to_owned(),
            model: format!("{id}-model"),
            engine: "llamacpp",
            endpoint: endpoint_of(endpoint),
            slots,
            probe_interval_ms: 50,
            probe_timeout_ms: 500,
            failure_threshold: 2,
            endpoints: None,
        }
    }
}

/// `127.0.0.1:PORT` (as printed by the engine double) becomes `http://127.0.0.1:PORT`.
fn endpoint_of(listen: &str) -> String {
    if listen.starts_with('/') || listen.starts_with("http://") {
        listen.to_owned()
    } else {
        format!("http://{listen}")
    }
}

impl PoolSpec {
    /// The pool's `[[pool]]` table.
    pub fn toml(&self) -> String {
        let mut text = format!(
            "\n[[pool]]\nid = {:?}\nmodel = {:?}\nengine = {:?}\nendpoint = {:?}\nslots = {}\n",
            self.id, self.model, self.engine, self.endpoint, self.slots,
        );
        if let Some(endpoints) = &self.endpoints {
            let _ = writeln!(text, "endpoints = {endpoints:?}");
        }
        let _ = write!(
            text,
            "[pool.probe]\ninterval_ms = {}\ntimeout_ms = {}\nfailure_threshold = {}\n",
            self.probe_interval_ms, self.probe_timeout_ms, self.failure_threshold
        );
        text
    }
}

/// Writes `dir/config.toml` with `server_extra` lines in `[server]` and the pools.
pub fn write_config(dir: &Path, server_extra: &str, pools: &[PoolSpec]) -> PathBuf {
    let mut text = format!("[server]\n{server_extra}\n");
    for pool in pools {
        text.push_str(&pool.toml());
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// The socket path the tests use under `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("run").join("pool.sock")
}

/// `pool-managerd status POOL --json` on the socket under `dir`: the pool's whole view, with
/// its engine's address (the tokenless shim leaves that out).
pub fn operator_status(dir: &Path, pool: &str) -> Result<serde_json::Value, String> {
    let output = std::process::Command::new(binary("pool-managerd"))
        .args(["status", pool, "--json", "--socket"])
        .arg(socket_path(dir))
        .output()
        .map_err(|e| format!("cannot run pool-managerd status: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "pool-managerd status {pool}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("pool-managerd status {pool} --json: {e}"))
}

/// Where the daemon under `dir` keeps engine records and logs.
pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// The daemon command for `config`, socket under `dir`, shim on an ephemeral port.
pub fn sidecar_command(dir: &Path, config: &Path) -> DaemonBuilder {
    DaemonBuilder::new(binary("pool-managerd"))
        .name("pool-managerd")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket_path(dir))
        .arg("--debug-listen")
        .arg("127.0.0.1:0")
        .arg("--state-dir")
        .arg(state_dir(dir))
        .env("RUST_LOG", "info,pool_sidecar=debug")
        .env_remove("POOL_MANAGERD_SOCKET")
}

/// Starts pool-managerd and waits for `READY socket=… debug_http=…`.
pub fn start_sidecar(dir: &Path, config: &Path) -> Sidecar {
    Sidecar {
        daemon: sidecar_command(dir, config).start(),
        state_dir: state_dir(dir),
    }
}

/// A running pool-managerd. Engines it runs outlive a SIGKILLed pool-managerd by design (it
/// adopts them when it comes back), so dropping this stops it cleanly (SIGTERM: it stops its
/// engines), and then kills, by process group, any engine its records still name — checking
/// each pid's start time, so a recycled pid is never touched.
pub struct Sidecar {
    daemon: Daemon,
    state_dir: PathBuf,
}

impl Sidecar {
    /// Wraps a pool-managerd started with a customised [`sidecar_command`] under `dir`.
    pub fn from_daemon(daemon: Daemon, dir: &Path) -> Sidecar {
        Sidecar {
            daemon,
            state_dir: state_dir(dir),
        }
    }

    /// Starts pool-managerd again on the same socket and state (after the test killed it), so
    /// it adopts the engines its predecessor left; nothing is cleaned up in between.
    pub fn restart(&mut self, dir: &Path, config: &Path) {
        // The caller stopped or killed it: wait until it is gone (reaped), as systemd does
        // before it starts the service again.
        self.daemon.wait_exit(std::time::Duration::from_secs(15));
        self.daemon = sidecar_command(dir, config).start();
    }
}

impl std::ops::Deref for Sidecar {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if self.daemon.try_wait().is_none() {
            self.daemon.kill_with(nix::sys::signal::Signal::SIGTERM);
            self.daemon.wait_exit(std::time::Duration::from_secs(15));
        }
        kill_recorded_engines(&self.state_dir);
    }
}

/// Kills the process group of every engine recorded under `state_dir` that is still the
/// recorded process.
/// The pid and start time (clock ticks after boot, `/proc/PID/stat` field 22) that
/// pool-managerd's engine record names for `pool`, while it has one; `dir` is the test's
/// directory (the records are under its state directory).
pub fn recorded_engine(dir: &Path, pool: &str) -> Option<(i32, u64)> {
    let path = state_dir(dir).join("engines").join(format!("{pool}.json"));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let pid = i32::try_from(record["pid"].as_u64()?).ok()?;
    Some((pid, record["start_ticks"].as_u64()?))
}

pub fn kill_recorded_engines(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("engines")) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let (Some(pid), Some(ticks)) = (record["pid"].as_u64(), record["start_ticks"].as_u64())
        else {
            continue;
        };
        if start_ticks(pid) == Some(ticks)
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The start time (clock ticks after boot) of process `pid` (a zombie too), as `/proc` says.
pub fn start_ticks(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A client of the pool-managerd whose socket is under `dir`, named `name` in its logs.
pub async fn connect_client(dir: &Path, name: &str) -> pool_ipc::client::PoolClient {
    let config = pool_ipc::client::ClientConfig::new(socket_path(dir), name);
    pool_ipc::client::PoolClient::connect(config)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "cannot connect to pool-managerd under {}: {error}",
                dir.display()
            )
        })
}

/// Waits (at most 15 s) until pool `pool` in a registry mirror satisfies `check`; returns it
/// then. Panics with the whole mirror when it never does.
pub async fn wait_for_pool(
    mirror: &mut tokio::sync::watch::Receiver<pool_ipc::client::RegistryMirror>,
    pool: &str,
    what: &str,
    check: impl Fn(&pool_ipc::registry::PoolSnapshot) -> bool,
) -> pool_ipc::registry::PoolSnapshot {
    let pool = &pool_ipc::registry::PoolId::from(pool);
    let reached = {
        let wait = mirror.wait_for(|m| m.snapshot.pool(pool).is_some_and(&check));
        tokio::time::timeout(std::time::Duration::from_secs(15), wait)
            .await
            .is_ok()
    };
    let mirror = mirror.borrow();
    assert!(
        reached,
        "timed out waiting for: {what}; mirror: {:?}",
        *mirror
    );
    mirror
        .snapshot
        .pool(pool)
        .cloned()
        .unwrap_or_else(|| panic!("pool {pool} vanished"))
}
