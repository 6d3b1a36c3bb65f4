//! pool-managerd's configuration: the TOML file, validated into typed values before anything
//! starts. A config that fails validation names the file and the offending setting, and nothing
//! is bound, spawned or probed.
//!
//! ```toml
//! [server]
//! socket = "/run/pool-managerd/pool.sock"   # --socket and $POOL_MANAGERD_SOCKET override it
//! allowed_uids = [1000]                     # default: this process's uid and root
//! allowed_gids = [990]                      # matched against the peer's primary gid
//! admin_uids = []                           # who may drain/reload/restart; default as allowed_uids
//! socket_group = "pool-clients"             # group owning the socket and its directory
//! max_leased_slots_per_uid = 4096           # slots one uid's leases may hold at once
//! lease_ttl_ms = 30000                      # a lease not renewed this long expires; 0: never
//! otlp_endpoint = "http://127.0.0.1:4318"   # OTLP/HTTP collector for spans; default: no spans
//!
//! [memory]                                  # for on-demand pools (`load = "on-demand"`)
//! host_budget_bytes = 68719476736           # pools without gpus; default 3/4 of MemTotal
//! gpu_reserve_bytes = 1073741824            # kept free per GPU (budget: total minus this)
//! min_residency_ms = 30000                  # a fresh load is not evicted before this
//!
//! [debug_http]
//! listen = "127.0.0.1:9200"                 # "off" disables the shim
//! token_file = "/etc/pool-managerd/token"   # required for a non-loopback address
//! orchestrator_metrics_url = "http://127.0.0.1:8080/metrics"   # live figures on /status
//!
//! [[pool]]
//! id = "tiny"
//! model = "tiny-llama"
//! engine = "llamacpp"                        # or "openai"
//! endpoint = "http://127.0.0.1:8081"         # or a Unix socket path
//! slots = 4
//! endpoints = ["chat_completions", "models"] # the APIs it serves; default: by engine kind
//! [pool.probe]
//! interval_ms = 1000
//! timeout_ms = 1000
//! failure_threshold = 3
//! success_threshold = 1
//! ```
//!
//! A managed engine (`command = [...]`) may be loaded only when wanted:
//!
//! ```toml
//! load = "on-demand"        # default "always": started with pool-managerd, never unloaded
//! idle_unload_ms = 300000   # on-demand only: unload after this long without a lease; 0 = never
//! abandoned_load = "cancel" # on-demand only: give a load up once no client waits for it
//!                           # ("finish": let it load; the idle time unloads it later)
//! ```
//!
//! An on-demand pool starts Unloaded (no engine; an engine a previous run left is still adopted)
//! and loads on `Load` (any allowed peer: a demand from orchestratord, or `pool-managerd load`).
//! `load = "on-demand"` on an external endpoint and `idle_unload_ms` on an `always` pool are
//! refused, not ignored: both would promise something pool-managerd cannot do.

use crate::status_page::MetricsUrl;
use daemon_support::http_server::HttpLimits;
use daemon_support::trace_export::OtlpEndpoint;
use pool_ipc::codec::{DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_BYTES_CEILING};
use pool_ipc::registry::{ApiEndpoint, Endpoint, EngineKind, PoolId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_DEBUG_LISTEN: &str = "127.0.0.1:9200";
pub const MAX_SLOTS: u32 = 1024;
/// Four pools of the largest size a pool may have ([`MAX_SLOTS`]), or sixty-four of sixteen
/// slots: more than one client (orchestratord) of a single host drives in practice, so the cap
/// never throttles it there, while it bounds what any one uid can take on a socket several uids
/// share (set it lower there; a host with more slots than this sets it higher).
pub const DEFAULT_MAX_LEASED_SLOTS_PER_UID: u32 = 4 * MAX_SLOTS;
/// Long enough that a busy client is never close to losing a lease (it renews every 10 s, so two
/// renewals in a row may be late), short enough that a frozen client's slots come back within
/// half a minute.
pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
/// The shortest TTL accepted (tests use short ones; renewals go out every third of it).
pub const MIN_LEASE_TTL_MS: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    debug_http: RawDebugHttp,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
}

/// How much memory on-demand pools may take, per device, and how eviction behaves.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    /// The host's RAM for pools without `gpus` (default three quarters of MemTotal).
    host_budget_bytes: Option<u64>,
    /// Each GPU's budget, absolute; default: NVML's total minus `gpu_reserve_bytes`.
    gpu_budget_bytes: Option<u64>,
    /// Kept free on each GPU (default 1 GiB: the driver's context, other processes).
    gpu_reserve_bytes: Option<u64>,
    /// A pool loaded less than this ago is not evicted (default 30 s: no swap storms).
    min_residency_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    socket: Option<PathBuf>,
    allowed_uids: Option<Vec<u32>>,
    #[serde(default)]
    allowed_gids: Vec<u32>,
    admin_uids: Option<Vec<u32>>,
    #[serde(default)]
    admin_gids: Vec<u32>,
    socket_group: Option<GroupSpec>,
    max_frame_bytes: Option<u32>,
    state_dir: Option<PathBuf>,
    /// Where `reload` may load models from (absolute directories). Default: the directories of
    /// the configured pools' model files.
    model_dirs: Option<Vec<PathBuf>>,
    /// The most slots the leases of one uid may hold at once, over every pool and connection.
    max_leased_slots_per_uid: Option<u32>,
    /// A lease its holder does not renew for this long is taken back; 0: leases never expire.
    lease_ttl_ms: Option<u64>,
    /// An OTLP/HTTP collector's base URL (`http://host:4318`): spans go there. Absent: no spans.
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GroupSpec {
    Id(u32),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebugHttp {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    /// Connections served at once (default 64; at most 3/4 of the file descriptor limit).
    max_connections: Option<usize>,
    /// A request head, and the next one on an idle keep-alive connection, must arrive within
    /// this (default 10 s).
    header_timeout_ms: Option<u64>,
    /// A request body's next bytes must arrive within this (default 10 s).
    body_timeout_ms: Option<u64>,
    /// orchestratord's `/metrics` (`http://host:port/metrics`), for the status page's live
    /// figures; absent: the page shows the pool side only.
    orchestrator_metrics_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    id: String,
    model: String,
    engine: EngineKind,
    /// An engine somebody else runs.
    endpoint: Option<String>,
    /// An engine pool-managerd runs: argv with `{model}`, `{host}`, `{port}`, `{socket}`, `{slots}`.
    command: Option<Vec<String>>,
    /// What `{model}` expands to (a model file); required with `command`.
    model_path: Option<String>,
    /// Default: `unix` for llamacpp engines, `tcp` for openai ones.
    listen: Option<ListenKind>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    /// Exported to the engine as CUDA_VISIBLE_DEVICES, e.g. "0" or "0,1".
    gpus: Option<String>,
    slots: Option<u32>,
    /// The APIs the engine serves, by name; replaces the engine kind's default list.
    endpoints: Option<Vec<String>>,
    startup_timeout_ms: Option<u64>,
    stop_grace_ms: Option<u64>,
    health_path: Option<String>,
    #[serde(default)]
    probe: ProbePolicy,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    reload: ReloadPolicy,
    /// When the engine runs: "always" (default) or "on-demand".
    load: Option<LoadKind>,
    /// On-demand pools: unload after this long without a lease (default 300000; 0 = never).
    idle_unload_ms: Option<u64>,
    /// On-demand pools: what becomes of a load once no client waits for it (default cancel).
    abandoned_load: Option<AbandonedLoad>,
}

/// The `load` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum LoadKind {
    Always,
    OnDemand,
}

/// The default idle time before an on-demand pool is unloaded: long enough that a conversation's
/// next turn finds the model loaded, short enough to give the memory back within minutes.
pub const DEFAULT_IDLE_UNLOAD_MS: u64 = 300_000;

/// When a managed engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPolicy {
    /// Started with pool-managerd (or the pool), restarted whenever it fails; never unloaded.
    Always,
    /// Started on a `Load` request; unloaded after `idle_unload` without a lease (`None`: never).
    OnDemand {
        idle_unload: Option<Duration>,
        abandoned: AbandonedLoad,
    },
}

/// What becomes of an on-demand pool's load once every client that asked for it has withdrawn
/// (`Request::CancelLoad`: its waiting requests went away) and no operator asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AbandonedLoad {
    /// Stop the starting engine and give its memory back at once (the default: a load nobody
    /// waits for may be keeping a wanted one from the device).
    #[default]
    Cancel,
    /// Let it finish; its idle time unloads it later if nobody comes.
    Finish,
}

impl LoadPolicy {
    /// How long an on-demand pool may go without a lease before it is unloaded; `None` for an
    /// always-loaded pool and for an on-demand one never unloaded for idleness.
    pub fn idle_unload(&self) -> Option<Duration> {
        match self {
            LoadPolicy::OnDemand { idle_unload, .. } => *idle_unload,
            LoadPolicy::Always => None,
        }
    }
}

/// How a managed engine listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenKind {
    /// A free port on 127.0.0.1, chosen at every start: any local user can connect to it.
    Tcp,
    /// A socket `<runtime dir>/engines/<pool>.sock` (llama-server: `--host` ending in `.sock`),
    /// in a directory only pool-managerd and the socket group can enter. The default for
    /// llama.cpp engines.
    Unix,
}

/// When and how often a managed engine is restarted (CrashLoopBackOff shape).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    /// Each delay is spread by up to this fraction either way.
    pub jitter: f64,
    /// A run this long resets the delay to `initial_ms`.
    pub reset_after_ms: u64,
    /// More restarts than this within `window_ms` put the pool in Failed.
    pub max_restarts: u32,
    pub window_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            initial_ms: 1_000,
            max_ms: 300_000,
            multiplier: 2.0,
            jitter: 0.1,
            reset_after_ms: 600_000,
            max_restarts: 5,
            window_ms: 600_000,
        }
    }
}

/// How a reload swaps models.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadStrategy {
    /// Start the new engine beside the old one and swap when it is ready (needs room for both).
    #[default]
    Overlap,
    /// Drain and stop the old engine first, then start the new one.
    DrainFirst,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadPolicy {
    pub strategy: ReloadStrategy,
    /// How long the old engine may keep serving its leases after a swap (or before a
    /// drain-first stop), in milliseconds; default 60 s.
    pub drain_deadline_ms: Option<u64>,
}

impl ReloadPolicy {
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_millis(self.drain_deadline_ms.unwrap_or(60_000))
    }
}

/// How a pool's engine is probed, and how many answers in a row change its state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbePolicy {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that turn a Ready pool Unhealthy (a slow engine is not a dead one).
    pub failure_threshold: u32,
    /// Consecutive successes that turn an Unhealthy pool Ready again.
    pub success_threshold: u32,
    /// Consecutive probes without any answer (timeout, refused) after which a managed engine
    /// is restarted. An answer of any status, even 503, proves it alive.
    pub liveness_failure_threshold: u32,
}

impl Default for ProbePolicy {
    fn default() -> ProbePolicy {
        ProbePolicy {
            interval_ms: 1000,
            timeout_ms: 1000,
            failure_threshold: 3,
            success_threshold: 1,
            liveness_failure_threshold: 3,
        }
    }
}

impl ProbePolicy {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub debug_http: DebugHttpConfig,
    pub memory: MemoryConfig,
    pub pools: Vec<PoolConfig>,
}

/// The `[memory]` table: what on-demand pools may take and how long a load stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// `None`: three quarters of the host's MemTotal.
    pub host_budget_bytes: Option<u64>,
    /// `None`: each GPU's total minus `gpu_reserve_bytes`.
    pub gpu_budget_bytes: Option<u64>,
    pub gpu_reserve_bytes: u64,
    pub min_residency: Duration,
}

/// Who may talk to the socket, and how it is laid out on disk.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: Option<PathBuf>,
    pub access: AccessPolicy,
    pub socket_group: Option<u32>,
    pub max_frame_bytes: u32,
    /// Engine records (for adoption), engine logs and engine sockets live here.
    pub state_dir: Option<PathBuf>,
    pub model_dirs: ModelDirs,
    /// The per-peer lease cap, in slots, counted per uid (more connections do not get around it).
    pub max_leased_slots_per_uid: u32,
    /// `None`: leases never expire.
    pub lease_ttl_ms: Option<u64>,
    /// Where spans go; `None`: none are made.
    pub otlp_endpoint: Option<OtlpEndpoint>,
}

/// The directories a reload may load a model from, canonical (symbolic links resolved), so that
/// an admin request cannot make an engine open an arbitrary file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDirs(Vec<PathBuf>);

impl ModelDirs {
    /// Directories as given: absolute ones, resolved where they exist.
    fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Result<ModelDirs, String> {
        let mut canonical = Vec::new();
        for dir in dirs {
            if !dir.is_absolute() {
                return Err(format!(
                    "server.model_dirs: {} is not an absolute path",
                    dir.display()
                ));
            }
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            if !canonical.contains(&dir) {
                canonical.push(dir);
            }
        }
        Ok(ModelDirs(canonical))
    }

    /// `model` resolved, if it is a file inside one of the directories; why not otherwise.
    pub fn admit(&self, model: &str) -> Result<PathBuf, String> {
        let resolved =
            std::fs::canonicalize(model).map_err(|error| format!("model {model:?}: {error}"))?;
        if !resolved.is_file() {
            return Err(format!("model {model:?} is not a file"));
        }
        if self.0.iter().any(|dir| resolved.starts_with(dir)) {
            Ok(resolved)
        } else {
            let dirs: Vec<String> = self.0.iter().map(|dir| dir.display().to_string()).collect();
            Err(format!(
                "model {model:?} is outside server.model_dirs ({})",
                dirs.join(", ")
            ))
        }
    }
}

/// The SO_PEERCRED allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
}

impl AccessPolicy {
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid)
    }

    pub fn admits_admin(&self, uid: u32, gid: u32) -> bool {
        self.admin_uids.contains(&uid) || self.admin_gids.contains(&gid)
    }
}

#[derive(Debug, Clone)]
pub struct DebugHttpConfig {
    /// `None`: the shim is off.
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
    pub limits: HttpLimits,
    /// orchestratord's `/metrics`, read for the status page (`status_page`).
    pub orchestrator_metrics: Option<MetricsUrl>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub id: PoolId,
    /// The model id clients ask for.
    pub model: String,
    pub engine: EngineKind,
    pub source: EngineSource,
    /// From the config; a managed llama.cpp engine may leave it to the engine (`/props`).
    pub slots: Option<u32>,
    pub health_path: String,
    pub probe: ProbePolicy,
    /// The APIs the engine serves, sorted and without duplicates (never empty): the `endpoints`
    /// key, or [`ApiEndpoint::defaults`] for the engine kind.
    pub api_endpoints: Vec<ApiEndpoint>,
    /// When the engine runs; always [`LoadPolicy::Always`] for an external engine. Not part of
    /// an engine's fingerprint: when an engine runs does not change how it runs, so an engine a
    /// previous run left is adopted across a change of `load`.
    pub load: LoadPolicy,
}

/// Who runs the pool's engine.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineSource {
    External { endpoint: Endpoint },
    Managed(ManagedEngine),
}

/// An engine pool-managerd starts and supervises.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagedEngine {
    pub model_path: String,
    pub command: Vec<String>,
    pub listen: ListenKind,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub gpus: Option<String>,
    pub startup_timeout_ms: u64,
    pub stop_grace_ms: u64,
    pub restart: RestartPolicy,
    pub reload: ReloadPolicy,
}

impl ManagedEngine {
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }

    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }
}

impl PoolConfig {
    /// Where the registry first shows the engine: the configured endpoint, or for a managed
    /// engine a placeholder until it is started.
    pub fn initial_endpoint(&self) -> Endpoint {
        match &self.source {
            EngineSource::External { endpoint } => endpoint.clone(),
            EngineSource::Managed(_) => Endpoint::Http {
                authority: "127.0.0.1:0".to_owned(),
            },
        }
    }

    pub fn managed(&self) -> Option<&ManagedEngine> {
        match &self.source {
            EngineSource::Managed(engine) => Some(engine),
            EngineSource::External { .. } => None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_owned(),
            message: error.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let explicit_model_dirs = raw.server.model_dirs.clone();
        let mut server = validate_server(raw.server).map_err(invalid)?;
        let debug_http = validate_debug_http(raw.debug_http).map_err(invalid)?;
        let memory = MemoryConfig {
            host_budget_bytes: raw.memory.host_budget_bytes,
            gpu_budget_bytes: raw.memory.gpu_budget_bytes,
            gpu_reserve_bytes: raw.memory.gpu_reserve_bytes.unwrap_or(1024 * 1024 * 1024),
            min_residency: Duration::from_millis(raw.memory.min_residency_ms.unwrap_or(30_000)),
        };
        let mut seen = HashSet::new();
        let mut pools = Vec::with_capacity(raw.pools.len());
        for raw_pool in raw.pools {
            let pool = validate_pool(raw_pool).map_err(invalid)?;
            if !seen.insert(pool.id.clone()) {
                return Err(invalid(format!(
                    "pool {:?} is declared twice",
                    pool.id.as_str()
                )));
            }
            pools.push(pool);
        }
        let model_dirs = match explicit_model_dirs {
            Some(dirs) => dirs,
            None => pools
                .iter()
                .filter_map(|pool| pool.managed())
                .filter_map(|managed| {
                    Path::new(&managed.model_path)
                        .parent()
                        .map(Path::to_path_buf)
                })
                .filter(|dir| dir.is_absolute())
                .collect(),
        };
        server.model_dirs = ModelDirs::new(model_dirs).map_err(invalid)?;
        Ok(Config {
            server,
            debug_http,
            memory,
            pools,
        })
    }
}

fn validate_server(raw: RawServer) -> Result<ServerConfig, String> {
    let own_uid = nix::unistd::geteuid().as_raw();
    let default_uids = if own_uid == 0 {
        vec![0]
    } else {
        vec![own_uid, 0]
    };
    let allowed_uids = raw.allowed_uids.unwrap_or_else(|| default_uids.clone());
    let admin_uids = raw.admin_uids.unwrap_or(default_uids);
    let socket_group = match raw.socket_group {
        None => None,
        Some(GroupSpec::Id(gid)) => Some(gid),
        Some(GroupSpec::Name(name)) => match nix::unistd::Group::from_name(&name) {
            Ok(Some(group)) => Some(group.gid.as_raw()),
            Ok(None) => return Err(format!("server.socket_group: no group named {name:?}")),
            Err(error) => return Err(format!("server.socket_group {name:?}: {error}")),
        },
    };
    let max_frame_bytes = raw.max_frame_bytes.unwrap_or(DEFAULT_MAX_FRAME_BYTES);
    if !(1024..=MAX_FRAME_BYTES_CEILING).contains(&max_frame_bytes) {
        return Err(format!(
            "server.max_frame_bytes must be between 1024 and {MAX_FRAME_BYTES_CEILING}, got {max_frame_bytes}"
        ));
    }
    let max_leased_slots_per_uid = raw
        .max_leased_slots_per_uid
        .unwrap_or(DEFAULT_MAX_LEASED_SLOTS_PER_UID);
    if max_leased_slots_per_uid == 0 {
        return Err("server.max_leased_slots_per_uid must be at least 1".into());
    }
    let lease_ttl_ms = match raw.lease_ttl_ms.unwrap_or(DEFAULT_LEASE_TTL_MS) {
        0 => None,
        ms if (MIN_LEASE_TTL_MS..=86_400_000).contains(&ms) => Some(ms),
        ms => {
            return Err(format!(
                "server.lease_ttl_ms must be 0 (leases never expire) or between {MIN_LEASE_TTL_MS} and 86400000, got {ms}"
            ));
        }
    };
    let otlp_endpoint = raw
        .otlp_endpoint
        .as_deref()
        .map(OtlpEndpoint::parse)
        .transpose()
        .map_err(|error| format!("server.otlp_endpoint: {error}"))?;
    Ok(ServerConfig {
        socket: raw.socket,
        otlp_endpoint,
        access: AccessPolicy {
            allowed_uids,
            allowed_gids: raw.allowed_gids,
            admin_uids,
            admin_gids: raw.admin_gids,
        },
        socket_group,
        max_frame_bytes,
        model_dirs: ModelDirs::default(),
        state_dir: raw.state_dir,
        max_leased_slots_per_uid,
        lease_ttl_ms,
    })
}

fn validate_debug_http(raw: RawDebugHttp) -> Result<DebugHttpConfig, String> {
    let token = match raw.token_file {
        None => None,
        Some(path) => Some(read_token(&path)?),
    };
    let listen = match raw.listen.as_deref() {
        Some("off") => None,
        Some(text) => Some(parse_listen(text)?),
        None => Some(parse_listen(DEFAULT_DEBUG_LISTEN)?),
    };
    let max_connections = match raw.max_connections {
        Some(0) => return Err("debug_http.max_connections must be positive".into()),
        value => value.unwrap_or(64),
    };
    let header_timeout = match raw.header_timeout_ms {
        Some(ms) if !(1..=86_400_000).contains(&ms) => {
            return Err(format!(
                "debug_http.header_timeout_ms must be between 1 and 86400000, got {ms}"
            ));
        }
        value => Duration::from_millis(value.unwrap_or(10_000)),
    };
    let body_timeout = match raw.body_timeout_ms {
        Some(ms) if !(1..=86_400_000).contains(&ms) => {
            return Err(format!(
                "debug_http.body_timeout_ms must be between 1 and 86400000, got {ms}"
            ));
        }
        value => Duration::from_millis(value.unwrap_or(10_000)),
    };
    let orchestrator_metrics = raw
        .orchestrator_metrics_url
        .as_deref()
        .map(MetricsUrl::parse)
        .transpose()?;
    let config = DebugHttpConfig {
        listen,
        token,
        orchestrator_metrics,
        limits: HttpLimits::within_fd_limit(
            max_connections,
            header_timeout,
            Duration::from_secs(30),
        )
        .with_body_timeout(body_timeout),
    };
    config.check_exposure()?;
    Ok(config)
}

impl DebugHttpConfig {
    /// A shim reachable from other hosts must demand a token.
    pub fn check_exposure(&self) -> Result<(), String> {
        match self.listen {
            Some(addr) => self.check_exposure_of(addr),
            None => Ok(()),
        }
    }

    /// The same rule for the address a shim really serves on (a socket systemd handed over
    /// included).
    pub fn check_exposure_of(&self, addr: SocketAddr) -> Result<(), String> {
        if addr.ip().is_loopback() || self.token.is_some() {
            Ok(())
        } else {
            Err(format!(
                "the debug HTTP shim would serve on {addr}, not a loopback address, without a token; set debug_http.token_file"
            ))
        }
    }
}

pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("debug_http.listen {text:?} is not an ip:port address (or \"off\")"))
}

fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("debug_http.token_file {}: {error}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        return Err(format!(
            "debug_http.token_file {}: the token must be at least 16 characters",
            path.display()
        ));
    }
    Ok(token)
}

fn valid_pool_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

fn validate_pool(raw: RawPool) -> Result<PoolConfig, String> {
    if !valid_pool_id(&raw.id) {
        return Err(format!(
            "pool id {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
            raw.id
        ));
    }
    let context = |message: String| format!("pool {:?}: {message}", raw.id);
    if raw.model.trim().is_empty() {
        return Err(context("model must not be empty".into()));
    }
    if let Some(slots) = raw.slots
        && !(1..=MAX_SLOTS).contains(&slots)
    {
        return Err(context(format!(
            "slots must be between 1 and {MAX_SLOTS}, got {slots}"
        )));
    }
    let load = match (raw.load.unwrap_or(LoadKind::Always), raw.idle_unload_ms) {
        (LoadKind::Always, Some(_)) => {
            return Err(context(
                "idle_unload_ms applies only to load = \"on-demand\" pools (an \"always\" pool is never unloaded)".into(),
            ));
        }
        (LoadKind::Always, None) if raw.abandoned_load.is_some() => {
            return Err(context(
                "abandoned_load applies only to load = \"on-demand\" pools (an \"always\" pool is never loaded on demand)".into(),
            ));
        }
        (LoadKind::Always, None) => LoadPolicy::Always,
        (LoadKind::OnDemand, Some(ms)) if ms > 24 * 60 * 60 * 1000 => {
            return Err(context(format!(
                "idle_unload_ms must be at most 86400000 (24 h; 0 = never), got {ms}"
            )));
        }
        (LoadKind::OnDemand, idle) => {
            let ms = idle.unwrap_or(DEFAULT_IDLE_UNLOAD_MS);
            LoadPolicy::OnDemand {
                idle_unload: (ms > 0).then(|| Duration::from_millis(ms)),
                abandoned: raw.abandoned_load.unwrap_or_default(),
            }
        }
    };
    let source = match (raw.endpoint, raw.command) {
        (Some(_), Some(_)) => {
            return Err(context(
                "give either endpoint (an engine running elsewhere) or command (an engine pool-managerd runs), not both".into(),
            ));
        }
        (None, None) => {
            return Err(context(
                "needs endpoint (an engine running elsewhere) or command (an engine pool-managerd runs)".into(),
            ));
        }
        (Some(endpoint), None) => {
            if load != LoadPolicy::Always {
                return Err(context(
                    "load = \"on-demand\" needs an engine pool-managerd runs (command), not an external endpoint".into(),
                ));
            }
            if raw.slots.is_none() {
                return Err(context("slots is required for an external endpoint".into()));
            }
            let endpoint =
                Endpoint::parse(&endpoint).map_err(|error| context(error.to_string()))?;
            EngineSource::External { endpoint }
        }
        (None, Some(command)) => {
            if command
                .first()
                .is_none_or(|program| program.trim().is_empty())
            {
                return Err(context("command must name a program".into()));
            }
            let Some(model_path) = raw.model_path else {
                return Err(context("model_path is required with command".into()));
            };
            if raw.slots.is_none() && raw.engine == EngineKind::Openai {
                return Err(context(
                    "slots is required for an openai engine (only llama.cpp reports its slots)"
                        .into(),
                ));
            }
            check_placeholders(&command).map_err(context)?;
            if raw.slots.is_none() && command.iter().any(|argument| argument.contains("{slots}")) {
                return Err(context(
                    "the command uses {slots} but slots is not set".into(),
                ));
            }
            let restart = raw.restart;
            let day_ms = 24 * 60 * 60 * 1000;
            let too_long = [
                ("startup_timeout_ms", raw.startup_timeout_ms.unwrap_or(0)),
                ("stop_grace_ms", raw.stop_grace_ms.unwrap_or(0)),
                ("restart.max_ms", restart.max_ms),
                ("restart.reset_after_ms", restart.reset_after_ms),
                ("restart.window_ms", restart.window_ms),
                (
                    "reload.drain_deadline_ms",
                    raw.reload.drain_deadline_ms.unwrap_or(0),
                ),
            ]
            .into_iter()
            .find(|(_, value)| *value > day_ms);
            if let Some((name, value)) = too_long {
                return Err(context(format!(
                    "{name} must be at most {day_ms} (24 h), got {value}"
                )));
            }
            if restart.initial_ms == 0
                || restart.max_ms < restart.initial_ms
                || restart.multiplier < 1.0
                || !(0.0..1.0).contains(&restart.jitter)
                || restart.window_ms == 0
            {
                return Err(context(
                    "restart needs 0 < initial_ms <= max_ms, multiplier >= 1, 0 <= jitter < 1, window_ms > 0".into(),
                ));
            }
            let listen = raw.listen.unwrap_or(match raw.engine {
                EngineKind::Llamacpp => ListenKind::Unix,
                EngineKind::Openai => ListenKind::Tcp,
            });
            check_listen_placeholders(&command, listen).map_err(context)?;
            EngineSource::Managed(ManagedEngine {
                model_path,
                command,
                listen,
                env: raw.env,
                working_dir: raw.working_dir,
                gpus: raw.gpus,
                startup_timeout_ms: raw.startup_timeout_ms.unwrap_or(120_000),
                stop_grace_ms: raw.stop_grace_ms.unwrap_or(10_000),
                restart,
                reload: raw.reload,
            })
        }
    };
    let api_endpoints = match raw.endpoints {
        None => ApiEndpoint::defaults(raw.engine),
        Some(names) => parse_api_endpoints(&names).map_err(context)?,
    };
    let health_path = raw.health_path.unwrap_or_else(|| match raw.engine {
        EngineKind::Llamacpp => "/health".to_owned(),
        EngineKind::Openai => "/v1/models".to_owned(),
    });
    if !health_path.starts_with('/') {
        return Err(context(format!(
            "health_path {health_path:?} must start with '/'"
        )));
    }
    let probe = raw.probe;
    let probe_range = 10..=3_600_000;
    if !probe_range.contains(&probe.interval_ms) || !probe_range.contains(&probe.timeout_ms) {
        return Err(context(
            "probe.interval_ms and probe.timeout_ms must be between 10 and 3600000".into(),
        ));
    }
    if probe.failure_threshold == 0
        || probe.success_threshold == 0
        || probe.liveness_failure_threshold == 0
    {
        return Err(context("probe thresholds must be at least 1".into()));
    }
    Ok(PoolConfig {
        id: PoolId(raw.id),
        model: raw.model,
        engine: raw.engine,
        source,
        slots: raw.slots,
        health_path,
        probe,
        api_endpoints,
        load,
    })
}

/// The `endpoints` key: known API names, at least one; duplicates are harmless and dropped.
fn parse_api_endpoints(names: &[String]) -> Result<Vec<ApiEndpoint>, String> {
    let accepted = || ApiEndpoint::ALL.map(ApiEndpoint::name).join(", ");
    if names.is_empty() {
        return Err(format!(
            "endpoints must name at least one API (accepted: {})",
            accepted()
        ));
    }
    let mut apis = names
        .iter()
        .map(|name| {
            ApiEndpoint::from_name(name).ok_or_else(|| {
                format!("endpoints: unknown API {name:?} (accepted: {})", accepted())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    apis.sort_unstable();
    apis.dedup();
    Ok(apis)
}

const PLACEHOLDERS: [&str; 5] = ["{model}", "{host}", "{port}", "{socket}", "{slots}"];

/// The command must tell the engine where to listen: `{host}` or `{socket}` for a Unix socket
/// (llama-server takes a `--host` ending in `.sock`), `{port}` for TCP. Otherwise the engine would
/// listen somewhere pool-managerd never probes.
fn check_listen_placeholders(command: &[String], listen: ListenKind) -> Result<(), String> {
    let uses = |placeholder: &str| {
        command
            .iter()
            .any(|argument| argument.contains(placeholder))
    };
    match listen {
        ListenKind::Unix if !uses("{host}") && !uses("{socket}") => Err(
            "the engine listens on a Unix socket (listen = \"unix\", the default for llamacpp) but its command has no {socket} or {host}: pass it, e.g. \"--host\", \"{socket}\", or set listen = \"tcp\"".into(),
        ),
        ListenKind::Tcp if !uses("{port}") => Err(
            "the engine listens on TCP (listen = \"tcp\") but its command has no {port}".into(),
        ),
        ListenKind::Unix | ListenKind::Tcp => Ok(()),
    }
}

/// Every `{…}` in the command must be a known placeholder, so a typo fails at start-up.
fn check_placeholders(command: &[String]) -> Result<(), String> {
    for argument in command {
        let mut rest = argument.as_str();
        while let Some(start) = rest.find('{') {
            let Some(end) = rest[start..].find('}') else {
                return Err(format!(
                    "command argument {argument:?} has an unclosed '{{'"
                ));
            };
            let placeholder = &rest[start..start + end + 1];
            if !PLACEHOLDERS.contains(&placeholder) {
                return Err(format!(
                    "command argument {argument:?}: unknown placeholder {placeholder} (known: {})",
                    PLACEHOLDERS.join(" ")
                ));
            }
            rest = &rest[start + end + 1..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const ONE_POOL: &str = r#"
        [[pool]]
        id = "tiny"
        model = "tiny-llama"
        engine = "llamacpp"
        endpoint = "http://127.0.0.1:8081"
        slots = 4
    "#;

    #[test]
    fn a_minimal_config_gets_safe_defaults() {
        let config = parse(ONE_POOL).unwrap();
        assert_eq!(config.pools.len(), 1);
        assert_eq!(config.pools[0].health_path, "/health");
        assert_eq!(config.pools[0].probe, ProbePolicy::default());
        assert!(config.server.access.allowed_uids.contains(&0));
        assert_eq!(
            config.debug_http.listen,
            Some("127.0.0.1:9200".parse().unwrap())
        );
    }

    #[test]
    fn errors_name_the_offending_setting() {
        let error = parse(&ONE_POOL.replace("slots = 4", "slots = 0")).unwrap_err();
        assert!(
            error.to_string().contains("pool \"tiny\": slots must be"),
            "{error}"
        );
        let error = parse(&ONE_POOL.replace("llamacpp", "tgi")).unwrap_err();
        assert!(
            error.to_string().contains("unknown variant `tgi`"),
            "{error}"
        );
        let error = parse(&format!("{ONE_POOL}\nbogus = 1")).unwrap_err();
        assert!(error.to_string().contains("bogus"), "{error}");
        let error = parse(&format!("{ONE_POOL}{ONE_POOL}")).unwrap_err();
        assert!(error.to_string().contains("declared twice"), "{error}");
        let error = parse(&ONE_POOL.replace("http://127.0.0.1:8081", "engine.sock")).unwrap_err();
        assert!(
            error.to_string().contains("neither an http:// URL"),
            "{error}"
        );
    }

    #[test]
    fn leases_are_capped_per_uid_and_expire_by_default_and_both_can_be_set() {
        let defaults = parse(ONE_POOL).unwrap().server;
        assert_eq!(
            (defaults.max_leased_slots_per_uid, defaults.lease_ttl_ms),
            (DEFAULT_MAX_LEASED_SLOTS_PER_UID, Some(DEFAULT_LEASE_TTL_MS))
        );
        let set = |lines: &str| parse(&format!("[server]\n{lines}\n{ONE_POOL}"));
        let server = set("max_leased_slots_per_uid = 8\nlease_ttl_ms = 500")
            .unwrap()
            .server;
        assert_eq!(
            (server.max_leased_slots_per_uid, server.lease_ttl_ms),
            (8, Some(500))
        );
        assert_eq!(set("lease_ttl_ms = 0").unwrap().server.lease_ttl_ms, None);
        for bad in ["lease_ttl_ms = 99", "max_leased_slots_per_uid = 0"] {
            let error = set(bad).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(error.contains(&format!("server.{key}")), "{error}");
        }
    }

    #[test]
    fn spans_are_off_by_default_and_an_otlp_endpoint_must_be_an_http_url() {
        assert_eq!(parse(ONE_POOL).unwrap().server.otlp_endpoint, None);
        let set = |line: &str| parse(&format!("[server]\n{line}\n{ONE_POOL}"));
        let server = set("otlp_endpoint = \"http://127.0.0.1:4318\"")
            .unwrap()
            .server;
        assert_eq!(
            server.otlp_endpoint.unwrap().traces_url().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        let error = set("otlp_endpoint = \"https://collector:4318\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.otlp_endpoint"), "{error}");
    }

    #[test]
    fn a_public_shim_without_a_token_is_refused() {
        let text = format!("[debug_http]\nlisten = \"0.0.0.0:9200\"\n{ONE_POOL}");
        let error = parse(&text).unwrap_err();
        assert!(error.to_string().contains("token_file"), "{error}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../../systemd/pool-managerd.example.toml");
        let config = parse(example).unwrap();
        assert_eq!(config.pools.len(), 4);
        assert!(config.pools[0].managed().is_some());
        assert_eq!(
            config.pools[0].api_endpoints,
            ApiEndpoint::defaults(EngineKind::Llamacpp)
        );
        assert_eq!(config.pools[3].api_endpoints, vec![ApiEndpoint::Embeddings]);
    }

    const MANAGED: &str = r#"
        [[pool]]
        id = "llm"
        model = "tiny"
        engine = "llamacpp"
        command = ["llama-server", "-m", "{model}", "--host", "{host}", "--port", "{port}"]
        model_path = "/models/tiny.gguf"
    "#;

    #[test]
    fn pools_load_always_by_default_and_on_demand_pools_unload_after_five_idle_minutes() {
        let engine = |text: &str| parse(text).unwrap().pools[0].load;
        assert_eq!(engine(MANAGED), LoadPolicy::Always);
        let on_demand = format!("{MANAGED}\n        load = \"on-demand\"");
        assert_eq!(
            engine(&on_demand),
            LoadPolicy::OnDemand {
                idle_unload: Some(Duration::from_millis(DEFAULT_IDLE_UNLOAD_MS)),
                abandoned: AbandonedLoad::Cancel,
            }
        );
        assert_eq!(
            engine(&format!("{on_demand}\n        idle_unload_ms = 300")),
            LoadPolicy::OnDemand {
                idle_unload: Some(Duration::from_millis(300)),
                abandoned: AbandonedLoad::Cancel,
            }
        );
        assert_eq!(
            engine(&format!("{on_demand}\n        idle_unload_ms = 0")),
            LoadPolicy::OnDemand {
                idle_unload: None,
                abandoned: AbandonedLoad::Cancel,
            },
            "0: never unloaded for idleness"
        );
        assert_eq!(
            engine(&format!("{on_demand}\n        abandoned_load = \"finish\"")),
            LoadPolicy::OnDemand {
                idle_unload: Some(Duration::from_millis(DEFAULT_IDLE_UNLOAD_MS)),
                abandoned: AbandonedLoad::Finish,
            },
        );
    }

    #[test]
    fn load_settings_that_cannot_be_honoured_are_refused_not_ignored() {
        let error = parse(&format!("{MANAGED}\n        idle_unload_ms = 300"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("idle_unload_ms applies only to"), "{error}");
        let error = parse(&format!("{MANAGED}\n        abandoned_load = \"finish\""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("abandoned_load applies only to"), "{error}");
        let error = parse(&format!("{ONE_POOL}\n        load = \"on-demand\""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not an external endpoint"), "{error}");
        let error = parse(&format!("{MANAGED}\n        load = \"sometimes\""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown variant `sometimes`"), "{error}");
    }

    #[test]
    fn engines_listen_on_unix_sockets_unless_tcp_is_asked_for_and_the_command_must_say_where() {
        let openai = MANAGED.replace("\"llamacpp\"", "\"openai\"\n        slots = 1");
        let engine = parse(&openai).unwrap().pools[0].managed().unwrap().clone();
        assert_eq!(
            engine.listen,
            ListenKind::Tcp,
            "OpenAI-compatible servers: TCP"
        );
        let tcp = format!("{MANAGED}        listen = \"tcp\"\n");
        let engine = parse(&tcp).unwrap().pools[0].managed().unwrap().clone();
        assert_eq!(engine.listen, ListenKind::Tcp);
        let port_only = MANAGED.replace("\"--host\", \"{host}\", ", "");
        let error = parse(&port_only).unwrap_err().to_string();
        assert!(error.contains("no {socket} or {host}"), "{error}");
        let socket_only = format!(
            "{}        listen = \"tcp\"\n",
            MANAGED.replace("\"--port\", \"{port}\"", "\"--x\", \"{socket}\"")
        );
        let error = parse(&socket_only).unwrap_err().to_string();
        assert!(error.contains("has no {port}"), "{error}");
    }

    #[test]
    fn a_managed_pool_gets_supervision_defaults() {
        let config = parse(MANAGED).unwrap();
        let engine = config.pools[0].managed().unwrap();
        assert_eq!(
            engine.listen,
            ListenKind::Unix,
            "llama.cpp engines get a Unix socket"
        );
        assert_eq!(engine.restart, RestartPolicy::default());
        assert_eq!(engine.startup_timeout_ms, 120_000);
        assert_eq!(
            config.pools[0].slots, None,
            "llama.cpp reports its own slots"
        );
    }

    #[test]
    fn managed_pool_mistakes_are_named() {
        let cases = [
            (
                MANAGED.replace("{port}", "{prot}"),
                "unknown placeholder {prot}",
            ),
            (
                MANAGED.replace("model_path = \"/models/tiny.gguf\"", ""),
                "model_path is required",
            ),
            (
                MANAGED.replace("\"{port}\"]", "\"{port}\", \"-np\", \"{slots}\"]"),
                "uses {slots} but slots is not set",
            ),
            (
                MANAGED.replace("llamacpp", "openai"),
                "slots is required for an openai engine",
            ),
            (
                format!("{MANAGED}endpoint = \"http://127.0.0.1:1\"\n"),
                "not both",
            ),
            (
                format!("{MANAGED}[pool.restart]\nmultiplier = 0.5\n"),
                "multiplier >= 1",
            ),
        ];
        for (text, needle) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(needle), "{needle:?} not in {error}");
        }
    }

    #[test]
    fn a_pool_without_endpoints_serves_its_engine_kinds_defaults() {
        let config = parse(ONE_POOL).unwrap();
        assert_eq!(
            config.pools[0].api_endpoints,
            ApiEndpoint::defaults(EngineKind::Llamacpp)
        );
        let config = parse(&ONE_POOL.replace("llamacpp", "openai")).unwrap();
        assert_eq!(
            config.pools[0].api_endpoints,
            ApiEndpoint::defaults(EngineKind::Openai)
        );
    }

    #[test]
    fn endpoints_replace_the_defaults_sorted_and_deduplicated() {
        let text =
            format!("{ONE_POOL}endpoints = [\"models\", \"embeddings\", \"models\", \"rerank\"]\n");
        let config = parse(&text).unwrap();
        assert_eq!(
            config.pools[0].api_endpoints,
            vec![
                ApiEndpoint::Embeddings,
                ApiEndpoint::Rerank,
                ApiEndpoint::Models
            ]
        );
    }

    #[test]
    fn an_empty_or_unknown_endpoint_is_named_with_the_pool_and_the_accepted_names() {
        let error = parse(&format!("{ONE_POOL}endpoints = []\n"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("pool \"tiny\": endpoints must name at least one API"),
            "{error}"
        );
        assert!(
            error.contains("chat_completions, completions, embeddings"),
            "{error}"
        );
        let error = parse(&format!(
            "{ONE_POOL}endpoints = [\"chat_completions\", \"embedding\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("pool \"tiny\": endpoints: unknown API \"embedding\""),
            "{error}"
        );
        for api in ApiEndpoint::ALL {
            assert!(
                error.contains(api.name()),
                "{} missing from {error}",
                api.name()
            );
        }
    }

    #[test]
    fn a_pool_whose_endpoints_change_is_a_changed_pool() {
        // The reload compares whole pool configs: a change of endpoints alone must show.
        let before = parse(ONE_POOL).unwrap();
        let after = parse(&format!("{ONE_POOL}endpoints = [\"embeddings\"]\n")).unwrap();
        assert_ne!(before.pools[0], after.pools[0]);
        let same = parse(&format!(
            "{ONE_POOL}endpoints = {:?}\n",
            ApiEndpoint::defaults(EngineKind::Llamacpp)
                .iter()
                .map(|api| api.name())
                .collect::<Vec<_>>()
        ))
        .unwrap();
        assert_eq!(
            before.pools[0], same.pools[0],
            "the defaults spelled out are no change"
        );
    }

    #[test]
    fn the_shim_can_be_turned_off() {
        let text = format!("[debug_http]\nlisten = \"off\"\n{ONE_POOL}");
        assert_eq!(parse(&text).unwrap().debug_http.listen, None);
    }
}
