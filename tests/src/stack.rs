//! The product as tests run it: pool-managerd with the pools of a test (engine doubles from
//! [`double_pool`], real llama-servers from `real_engine::llama_pool`, or any `[[pool]]` TOML)
//! and orchestratord in front of it, started by one [`StackBuilder`] and waited for until every
//! pool is ready in orchestratord's own view. Tests of pool-managerd alone leave orchestratord
//! out ([`StackBuilder::without_orchestrator`]) and wait for the pool states they expect
//! themselves. Tests share this one builder instead of keeping their own copies of it.

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a panic with the failing call is the report"
)]

use crate::sidecar::{
    Sidecar, connect_client, operator_status, recorded_engine, sidecar_command, socket_path,
};
use crate::{Daemon, DaemonBuilder, binary, http, temp_dir};
use pool_ipc::client::PoolClient;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a stack's helpers wait for an answer or a condition.
pub const WAIT: Duration = Duration::from_secs(30);

/// The TOML of one managed pool running `test-engine-double` (a fake engine) on a Unix socket,
/// with `slots` slots and `flags` for the double, probed every 100 ms.
pub fn double_pool(id: &str, model: &str, slots: u32, flags: &[&str]) -> String {
    let flags: String = flags.iter().map(|flag| format!(", {flag:?}")).collect();
    format!(
        r#"
[[pool]]
id = "{id}"
model = "{model}"
engine = "llamacpp"
command = [{engine:?}, "--listen", "{{socket}}", "--slots", "{slots}", "--model", "{{model}}"{flags}]
model_path = "{{dir}}/double-model.json"
listen = "unix"
startup_timeout_ms = 5000
stop_grace_ms = 500
[pool.probe]
interval_ms = 100
"#,
        engine = binary("test-engine-double").display().to_string(),
    )
}

/// What a [`Stack`] starts with.
#[derive(Debug, Default)]
pub struct StackBuilder {
    pools: String,
    sidecar_server: String,
    orchestrator_toml: String,
    api_key: Option<String>,
    startup: Option<Duration>,
    log_filter: Option<String>,
    env: Vec<(String, String)>,
    orchestrator_args: Vec<String>,
    listen: Option<String>,
    without_orchestrator: bool,
    engines: Vec<Daemon>,
}

impl StackBuilder {
    /// More of pool-managerd's config: a `[[pool]]` (e.g. from [`double_pool`]) or other tables.
    /// `{dir}` stands for the stack's directory.
    pub fn pool(mut self, toml: &str) -> StackBuilder {
        self.pools.push_str(toml);
        self
    }

    /// Lines for pool-managerd's `[server]` table.
    pub fn sidecar_server(mut self, toml: &str) -> StackBuilder {
        self.sidecar_server.push_str(toml);
        self.sidecar_server.push('\n');
        self
    }

    /// orchestratord's config file (TOML).
    pub fn orchestrator(mut self, toml: &str) -> StackBuilder {
        self.orchestrator_toml.push_str(toml);
        self.orchestrator_toml.push('\n');
        self
    }

    /// orchestratord's one API key (a key file of one bare key); the stack's helpers send it.
    pub fn api_key(mut self, key: &str) -> StackBuilder {
        self.api_key = Some(key.to_owned());
        self
    }

    /// pool-managerd alone: no orchestratord, and no wait for the pools.
    pub fn without_orchestrator(mut self) -> StackBuilder {
        self.without_orchestrator = true;
        self
    }

    /// An engine the test started itself (for a pool with an `endpoint`): the stack keeps it
    /// running and stops it last.
    pub fn engine(mut self, engine: Daemon) -> StackBuilder {
        self.engines.push(engine);
        self
    }
    /// orchestratord's listen address (default `127.0.0.1:0`), e.g. `127.0.0.2:0` for a second
    /// host on a loopback alias.
    pub fn listen(mut self, address: &str) -> StackBuilder {
        self.listen = Some(address.to_owned());
        self
    }

    /// More command-line arguments for orchestratord (`--log-format json`).
    pub fn orchestrator_args(mut self, args: &[&str]) -> StackBuilder {
        self.orchestrator_args
            .extend(args.iter().map(|arg| (*arg).to_owned()));
        self
    }

    /// Both daemons' `RUST_LOG` (benchmarks run them at `warn`, so that logging does not
    /// distort their figures).
    pub fn log_filter(mut self, filter: &str) -> StackBuilder {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// An environment variable for both daemons.
    pub fn env(mut self, key: &str, value: &str) -> StackBuilder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long the pools may take to become ready (default 15 s).
    pub fn startup(mut self, within: Duration) -> StackBuilder {
        self.startup = Some(within);
        self
    }

    /// Starts both daemons in a fresh temporary directory and returns once orchestratord sees
    /// every pool ready.
    pub fn start(self) -> Stack {
        self.start_in(temp_dir())
    }

    /// [`start`](Self::start) in `dir` (which may hold models the pools name).
    pub fn start_in(self, dir: TempDir) -> Stack {
        let path = dir.path();
        std::fs::write(path.join("double-model.json"), "{}").unwrap();
        let pools = self.pools.replace("{dir}", &path.display().to_string());
        let config = path.join("config.toml");
        let server = if self.sidecar_server.is_empty() {
            String::new()
        } else {
            format!("[server]\n{}", self.sidecar_server)
        };
        std::fs::write(&config, format!("{server}{pools}")).unwrap();
        let mut sidecar = sidecar_command(path, &config);
        if let Some(filter) = &self.log_filter {
            sidecar = sidecar.env("RUST_LOG", filter);
        }
        for (key, value) in &self.env {
            sidecar = sidecar.env(key, value);
        }
        let sidecar = Sidecar::from_daemon(sidecar.start(), path);
        if self.without_orchestrator {
            return Stack {
                orchestrator: None,
                sidecar,
                engines: self.engines,
                config,
                api_key: None,
                dir,
            };
        }
        let mut orchestrator = DaemonBuilder::new(binary("orchestratord"))
            .name("orchestratord")
            .arg("--listen")
            .arg(self.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--socket")
            .arg(socket_path(path));
        if let Some(filter) = &self.log_filter {
            orchestrator = orchestrator.env("RUST_LOG", filter);
        }
        for (key, value) in &self.env {
            orchestrator = orchestrator.env(key, value);
        }
        orchestrator = orchestrator.args(&self.orchestrator_args);
        if let Some(key) = &self.api_key {
            let keys = path.join("api-keys");
            std::fs::write(&keys, format!("{key}\n")).unwrap();
            orchestrator = orchestrator.arg("--api-keys-file").arg(keys);
        }
        if !self.orchestrator_toml.is_empty() {
            let toml = path.join("orchestratord.toml");
            std::fs::write(&toml, &self.orchestrator_toml).unwrap();
            orchestrator = orchestrator.arg("--config").arg(toml);
        }
        let stack = Stack {
            orchestrator: Some(orchestrator.start()),
            sidecar,
            engines: self.engines,
            config,
            api_key: self.api_key,
            dir,
        };
        stack.wait_all_ready(self.startup.unwrap_or(Duration::from_secs(15)));
        stack
    }
}

/// pool-managerd and orchestratord, running; dropping it stops both and every engine.
pub struct Stack {
    orchestrator: Option<Daemon>,
    pub sidecar: Sidecar,
    /// Engines the test started itself, stopped after pool-managerd.
    pub engines: Vec<Daemon>,
    /// pool-managerd's config file.
    pub config: PathBuf,
    api_key: Option<String>,
    /// Last: dropped after the daemons, whose cleanup reads the state directory inside it.
    pub dir: TempDir,
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// The running orchestratord (panics for a stack without one).
    pub fn orchestrator(&self) -> &Daemon {
        self.orchestrator
            .as_ref()
            .unwrap_or_else(|| panic!("this stack runs no orchestratord"))
    }

    /// The running orchestratord, to wait for or restart (panics for a stack without one).
    pub fn orchestrator_mut(&mut self) -> &mut Daemon {
        self.orchestrator
            .as_mut()
            .unwrap_or_else(|| panic!("this stack runs no orchestratord"))
    }

    /// orchestratord's address (`127.0.0.1:PORT`).
    pub fn api(&self) -> String {
        self.orchestrator().ready("listen").to_owned()
    }

    /// pool-managerd's debug shim address.
    pub fn shim(&self) -> String {
        self.sidecar.ready("debug_http").to_owned()
    }

    /// A new client of pool-managerd's socket, named `name` in its logs.
    pub async fn client(&self, name: &str) -> PoolClient {
        connect_client(self.path(), name).await
    }

    /// Starts pool-managerd again on the same socket, state and config, after the test killed
    /// it: it adopts the engines its predecessor left.
    pub fn restart_sidecar(&mut self) {
        let dir = self.dir.path().to_owned();
        self.sidecar.restart(&dir, &self.config);
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `Authorization` header of the stack's key, if it has one.
    pub fn auth(&self) -> Vec<(&'static str, String)> {
        self.api_key
            .iter()
            .map(|key| ("Authorization", format!("Bearer {key}")))
            .collect()
    }

    /// A GET to orchestratord with the stack's key, whatever its status.
    pub fn get_reply(&self, path: &str) -> http::Reply {
        let auth = self.auth();
        let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http::request_with_headers(&self.api(), "GET", path, &headers, None, WAIT).unwrap()
    }

    /// A GET to orchestratord that must answer 200; its JSON.
    pub fn get(&self, path: &str) -> Value {
        let reply = self.get_reply(path);
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
        reply.json()
    }

    /// Waits until orchestratord lists every pool of pool-managerd's config as ready or unloaded
    /// (on demand) (or, when
    /// its pool list needs a key the stack does not know, until it reports ready).
    fn wait_all_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let reply = self.get_reply("/v2/pools");
            let ready = match reply.status {
                200 => {
                    let pools = reply.json();
                    let all = pools["pools"].as_array().cloned().unwrap_or_default();
                    // An on-demand pool waits, unloaded, for its first request.
                    !all.is_empty()
                        && all
                            .iter()
                            .all(|pool| pool["ready"] == true || pool["state"] == "unloaded")
                }
                401 => http::get(&self.api(), "/readyz", WAIT).unwrap().status == 200,
                _ => false,
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pools never ready: {}\n{}",
                reply.text(),
                self.sidecar.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pool's status from pool-managerd's debug shim.
    pub fn pool_status(&self, pool: &str) -> Value {
        http::get(
            self.sidecar.ready("debug_http"),
            &format!("/pools/{pool}/status"),
            WAIT,
        )
        .unwrap()
        .json()
    }

    /// [`pool_status`](Self::pool_status) from a shim that wants `token`.
    pub fn pool_status_with(&self, token: &str, pool: &str) -> Value {
        let auth = format!("Bearer {token}");
        http::request_with_headers(
            self.sidecar.ready("debug_http"),
            "GET",
            &format!("/pools/{pool}/status"),
            &[("Authorization", auth.as_str())],
            None,
            WAIT,
        )
        .unwrap()
        .json()
    }

    /// The engine's address as pool-managerd reports it to the socket's peers (`http://…` or a
    /// socket path).
    pub fn endpoint(&self, pool: &str) -> String {
        let status = operator_status(self.path(), pool).unwrap();
        status["endpoint"]
            .as_str()
            .unwrap_or_else(|| panic!("no endpoint in {status}"))
            .to_owned()
    }

    /// A GET straight to the pool's engine that must answer 200; its JSON.
    pub fn engine_get(&self, pool: &str, path: &str) -> Value {
        let reply = http::get(&http_address(&self.endpoint(pool)), path, WAIT).unwrap();
        assert_eq!(reply.status, 200, "engine GET {path}: {}", reply.text());
        reply.json()
    }

    /// One of orchestratord's Prometheus values (a counter's `_total`, a histogram's `_count`).
    pub fn metric(&self, name: &str) -> f64 {
        let reply = http::get(&self.api(), "/metrics", WAIT).unwrap();
        prometheus_value(&reply.text(), name)
    }

    /// The pid pool-managerd recorded for the pool's engine.
    pub fn engine_pid(&self, pool: &str) -> i32 {
        let pid = self
            .recorded_engine_pid(pool)
            .unwrap_or_else(|| panic!("no engine recorded for pool {pool}"));
        i32::try_from(pid).unwrap()
    }

    /// The pid in the pool's engine record, if there is one.
    pub fn recorded_engine_pid(&self, pool: &str) -> Option<u32> {
        let (pid, _) = recorded_engine(self.path(), pool)?;
        u32::try_from(pid).ok()
    }

    /// Polls `done` every few milliseconds until it holds; panics after [`WAIT`].
    pub fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until pool-managerd shows `leases` live leases on `pool`.
    pub fn wait_for_leases(&self, pool: &str, leases: u64) {
        self.wait_for(&format!("{leases} leases on {pool}"), || {
            self.pool_status(pool)["active_leases"] == leases
        });
    }

    /// Runs `pool-managerd ARGS --socket …` (an operator command) and asserts it succeeded.
    pub fn operator(&self, args: &[&str]) {
        let output = Command::new(binary("pool-managerd"))
            .args(args)
            .arg("--socket")
            .arg(socket_path(self.path()))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pool-managerd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Where a pool's engine listens, as pool-managerd reports it (`http://127.0.0.1:PORT` or a
/// socket path), turned into an address [`crate::http`] connects to.
pub fn http_address(endpoint: &str) -> String {
    endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/')
        .to_owned()
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub fn prometheus_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}
