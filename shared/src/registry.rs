//! Value types of the pool registry, shared by pool-managerd (the only writer) and its clients.
//!
//! These are plain data: no behaviour that mutates a registry lives here. Invariant every
//! [`PoolSnapshot`] a server publishes must keep: `slots_free <= slots_total`, and
//! `slots_total - slots_free` is the number of slots held by live leases on the pool (a lease
//! holds as many slots as its request makes the engine run sequences at once).

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A pool's identifier from the sidecar's config (`[A-Za-z0-9._-]`, 1–64 characters).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PoolId(pub String);

impl PoolId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for PoolId {
    fn from(id: &str) -> PoolId {
        PoolId(id.to_owned())
    }
}

/// A lease's identifier, unique across sidecar restarts with overwhelming probability.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A lease's proof of ownership: 16 bytes pool-managerd computes when it grants the lease and
/// tells only the connection that took it. Re-asserting a lease (after a reconnect) needs it, so
/// nobody can take over a lease by its id. Never logged or shown: `Debug` prints no bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Encode, Decode)]
pub struct LeaseSecret(pub [u8; 16]);

impl fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseSecret(..)")
    }
}

/// Which API the engine behind a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// llama.cpp's `llama-server`: /health, /props, /slots, native /completion and OpenAI routes.
    Llamacpp,
    /// Any OpenAI-compatible server (vLLM, llama-cpp-python, ...).
    Openai,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Openai => "openai",
        }
    }
}

/// An HTTP API of an engine, by what clients call: orchestratord routes a request only to pools
/// whose engine serves its API.
///
/// Append-only like every wire enum (bincode encodes the variant index); `name` is what the
/// sidecar's config and the JSON views use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ApiEndpoint {
    /// POST /v1/chat/completions
    ChatCompletions,
    /// POST /v1/completions (and llama.cpp's native /completion)
    Completions,
    /// POST /v1/embeddings
    Embeddings,
    /// POST /v1/rerank (llama.cpp: also /v1/reranking)
    Rerank,
    /// POST /v1/messages (Anthropic Messages API)
    Messages,
    /// POST /v1/messages/count_tokens
    MessagesCountTokens,
    /// POST /v1/responses
    Responses,
    /// POST /v1/responses/input_tokens
    ResponsesInputTokens,
    /// POST /v1/chat/completions/input_tokens
    ChatCompletionsInputTokens,
    /// GET /v1/models
    Models,
}

impl ApiEndpoint {
    pub const ALL: [ApiEndpoint; 10] = [
        ApiEndpoint::ChatCompletions,
        ApiEndpoint::Completions,
        ApiEndpoint::Embeddings,
        ApiEndpoint::Rerank,
        ApiEndpoint::Messages,
        ApiEndpoint::MessagesCountTokens,
        ApiEndpoint::Responses,
        ApiEndpoint::ResponsesInputTokens,
        ApiEndpoint::ChatCompletionsInputTokens,
        ApiEndpoint::Models,
    ];

    /// The snake_case name used in configs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ApiEndpoint::ChatCompletions => "chat_completions",
            ApiEndpoint::Completions => "completions",
            ApiEndpoint::Embeddings => "embeddings",
            ApiEndpoint::Rerank => "rerank",
            ApiEndpoint::Messages => "messages",
            ApiEndpoint::MessagesCountTokens => "messages_count_tokens",
            ApiEndpoint::Responses => "responses",
            ApiEndpoint::ResponsesInputTokens => "responses_input_tokens",
            ApiEndpoint::ChatCompletionsInputTokens => "chat_completions_input_tokens",
            ApiEndpoint::Models => "models",
        }
    }

    pub fn from_name(name: &str) -> Option<ApiEndpoint> {
        ApiEndpoint::ALL.into_iter().find(|api| api.name() == name)
    }

    /// The OpenAI-style path clients call.
    pub fn path(self) -> &'static str {
        match self {
            ApiEndpoint::ChatCompletions => "/v1/chat/completions",
            ApiEndpoint::Completions => "/v1/completions",
            ApiEndpoint::Embeddings => "/v1/embeddings",
            ApiEndpoint::Rerank => "/v1/rerank",
            ApiEndpoint::Messages => "/v1/messages",
            ApiEndpoint::MessagesCountTokens => "/v1/messages/count_tokens",
            ApiEndpoint::Responses => "/v1/responses",
            ApiEndpoint::ResponsesInputTokens => "/v1/responses/input_tokens",
            ApiEndpoint::ChatCompletionsInputTokens => "/v1/chat/completions/input_tokens",
            ApiEndpoint::Models => "/v1/models",
        }
    }

    /// What an engine of `kind` serves when its pool does not say, sorted. llama-server serves
    /// embeddings only when started with `--embeddings` (and then nothing else), and rerank only
    /// with `--reranking`, so a pool that runs it that way must list them itself; an
    /// OpenAI-compatible server is assumed to serve only the long-standing text APIs.
    pub fn defaults(kind: EngineKind) -> Vec<ApiEndpoint> {
        match kind {
            EngineKind::Llamacpp => ApiEndpoint::ALL
                .into_iter()
                .filter(|api| !matches!(api, ApiEndpoint::Embeddings | ApiEndpoint::Rerank))
                .collect(),
            EngineKind::Openai => vec![
                ApiEndpoint::ChatCompletions,
                ApiEndpoint::Completions,
                ApiEndpoint::Models,
            ],
        }
    }
}

impl fmt::Display for ApiEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an engine listens: plain HTTP over TCP, or HTTP over a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `host:port` of an `http://` URL.
    Http { authority: String },
    /// Absolute path of a Unix socket.
    Unix { path: String },
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} is neither an http:// URL nor an absolute Unix socket path")]
    Unrecognised(String),
    #[error(
        "endpoint {0:?}: https is not supported for local engines; use http:// or a socket path"
    )]
    Https(String),
    #[error("endpoint {0:?} has no host:port")]
    MissingAuthority(String),
    #[error("endpoint {0:?}: a base path is not supported; give only scheme, host and port")]
    HasPath(String),
}

impl Endpoint {
    /// Parses `http://host:port` or an absolute socket path such as `/run/engines/a.sock`.
    pub fn parse(text: &str) -> Result<Endpoint, EndpointError> {
        if text.starts_with('/') {
            return Ok(Endpoint::Unix {
                path: text.to_owned(),
            });
        }
        if text.starts_with("https://") {
            return Err(EndpointError::Https(text.to_owned()));
        }
        let Some(rest) = text.strip_prefix("http://") else {
            return Err(EndpointError::Unrecognised(text.to_owned()));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(EndpointError::HasPath(text.to_owned()));
        }
        if authority.is_empty() || !authority.contains(':') {
            return Err(EndpointError::MissingAuthority(text.to_owned()));
        }
        Ok(Endpoint::Http {
            authority: authority.to_owned(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Http { authority } => write!(f, "http://{authority}"),
            Endpoint::Unix { path } => f.write_str(path),
        }
    }
}

/// The lifecycle state of a pool (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    /// Configured, not yet known to be healthy.
    Starting,
    /// Healthy and taking new leases.
    Ready,
    /// Failing its probes: no new leases, existing leases revoked.
    Unhealthy,
    /// Taking no new leases; waiting for the live ones to end.
    Draining,
    /// Deliberately stopped.
    Stopped,
    /// Waiting to restart the engine at the given time (Unix epoch, milliseconds).
    BackingOff { until_unix_ms: u64 },
    /// Restarted too often; needs an operator.
    Failed,
    /// An on-demand pool with no engine: configured, takes no leases, loads on `Request::Load`.
    Unloaded,
    /// An on-demand pool's engine is being started (a demand or an operator asked for it);
    /// Ready once it passes its readiness check.
    Loading,
}

impl PoolState {
    pub fn name(self) -> &'static str {
        match self {
            PoolState::Starting => "starting",
            PoolState::Ready => "ready",
            PoolState::Unhealthy => "unhealthy",
            PoolState::Draining => "draining",
            PoolState::Stopped => "stopped",
            PoolState::BackingOff { .. } => "backing_off",
            PoolState::Failed => "failed",
            PoolState::Unloaded => "unloaded",
            PoolState::Loading => "loading",
        }
    }
}

impl fmt::Display for PoolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One pool as the registry last published it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub pool_id: PoolId,
    pub model: String,
    pub engine: EngineKind,
    pub endpoint: Endpoint,
    pub state: PoolState,
    /// The engine answered its last liveness probe.
    pub live: bool,
    pub slots_total: u32,
    pub slots_free: u32,
    pub engine_version: Option<String>,
    pub last_error: Option<String>,
    pub restarts: u32,
    /// When the engine was last probed (Unix epoch, milliseconds).
    pub last_probe_unix_ms: Option<u64>,
    /// The APIs the pool's engine serves: sorted, without duplicates.
    pub api_endpoints: Vec<ApiEndpoint>,
}

impl PoolSnapshot {
    /// Slots held by live leases (a lease of several slots counts each), not the lease count.
    pub fn active_leases(&self) -> u32 {
        self.slots_total.saturating_sub(self.slots_free)
    }

    /// Whether the pool's engine serves `api`.
    pub fn serves(&self, api: ApiEndpoint) -> bool {
        // Not a binary search: a snapshot from a peer is not trusted to be sorted.
        self.api_endpoints.contains(&api)
    }

    /// Whether a new one-slot lease could be granted right now (advisory: `Acquire` decides;
    /// a larger lease needs `slots_free` of at least its size).
    pub fn is_dispatchable(&self) -> bool {
        self.state == PoolState::Ready && self.slots_free > 0
    }
}

/// The whole registry at one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct RegistrySnapshot {
    pub epoch: u64,
    pub pools: Vec<PoolSnapshot>,
}

impl RegistrySnapshot {
    pub fn pool(&self, id: &PoolId) -> Option<&PoolSnapshot> {
        self.pools.iter().find(|pool| &pool.pool_id == id)
    }
}

/// The answer to `CanDispatch`: advisory, from the sidecar's last published state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct DispatchCheck {
    pub dispatchable: bool,
    pub state: PoolState,
    pub slots_free: u32,
}

/// What `Acquire` reserves slots on.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcquireTarget {
    /// Exactly this pool.
    Pool(PoolId),
    /// The least loaded ready pool serving this model that has the slots free.
    Model(String),
}

/// A granted lease: `slots` slots of one pool, held by the connection that took it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub pool: PoolId,
    pub model: String,
    pub engine: EngineKind,
    pub endpoint: Endpoint,
    /// How many slots the lease holds (at least 1).
    pub slots: u32,
    /// Proves the lease is this client's when it re-asserts it after a reconnect
    /// ([`crate::wire::HeldLease`]); never serialised to JSON.
    #[serde(skip)]
    pub secret: LeaseSecret,
    /// The registry epoch whose snapshot (and events) first show this lease: a client placing
    /// from a mirror counts the lease's slots as taken until its mirror reaches this epoch (the
    /// answer to an Acquire may arrive before the event that publishes it).
    pub registry_epoch: u64,
}

/// One GPU of the host, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}

/// The host's GPUs; empty (with `driver` unset) on a host without an NVIDIA driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct GpuInventory {
    pub driver: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

/// Where the memory of managed pools goes (the answer to `Request::Memory`): each device's
/// budget and what the pools loaded on it hold, and each managed pool's footprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct MemoryReport {
    pub devices: Vec<DeviceMemory>,
    pub pools: Vec<PoolFootprint>,
}

/// One device's memory budget for pools.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// `host` (CPU pools' RAM) or `gpu<N>` (NVML index N).
    pub device: String,
    pub budget_bytes: u64,
    /// The footprints of the pools loaded, loading or unloading on it.
    pub held_bytes: u64,
}

/// One managed pool's footprint on its device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct PoolFootprint {
    pub pool: PoolId,
    /// As in [`DeviceMemory::device`].
    pub device: String,
    /// `None`: unknown (never measured, and the model's header gave no estimate).
    pub footprint_bytes: Option<u64>,
    /// Measured after a load of this model (else estimated from the model's GGUF header).
    pub measured: bool,
}

/// How the work done under a lease ended (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    Completed,
    Cancelled,
    Failed,
}

impl ReleaseOutcome {
    pub fn name(self) -> &'static str {
        match self {
            ReleaseOutcome::Completed => "completed",
            ReleaseOutcome::Cancelled => "cancelled",
            ReleaseOutcome::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_http_and_socket_paths() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8081"),
            Ok(Endpoint::Http {
                authority: "127.0.0.1:8081".into()
            })
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:8081/"),
            Ok(Endpoint::Http {
                authority: "[::1]:8081".into()
            })
        );
        assert_eq!(
            Endpoint::parse("/run/engines/a.sock"),
            Ok(Endpoint::Unix {
                path: "/run/engines/a.sock".into()
            })
        );
    }

    #[test]
    fn every_api_endpoint_is_listed_once_and_named_as_serde_names_it() {
        // Exhaustive on purpose: a variant appended without joining ALL fails to compile here.
        let listed = |api: ApiEndpoint| match api {
            ApiEndpoint::ChatCompletions
            | ApiEndpoint::Completions
            | ApiEndpoint::Embeddings
            | ApiEndpoint::Rerank
            | ApiEndpoint::Messages
            | ApiEndpoint::MessagesCountTokens
            | ApiEndpoint::Responses
            | ApiEndpoint::ResponsesInputTokens
            | ApiEndpoint::ChatCompletionsInputTokens
            | ApiEndpoint::Models => ApiEndpoint::ALL.iter().filter(|a| **a == api).count(),
        };
        for api in ApiEndpoint::ALL {
            assert_eq!(listed(api), 1, "{api:?}");
            assert_eq!(ApiEndpoint::from_name(api.name()), Some(api));
            assert_eq!(
                serde_json::to_string(&api).unwrap(),
                format!("\"{}\"", api.name())
            );
            assert!(api.path().starts_with("/v1/"), "{api:?}");
        }
        let mut sorted = ApiEndpoint::ALL.to_vec();
        sorted.sort();
        assert_eq!(
            sorted,
            ApiEndpoint::ALL,
            "ALL is in declaration (wire) order"
        );
        assert_eq!(ApiEndpoint::from_name("Embeddings"), None);
        assert_eq!(ApiEndpoint::from_name("/v1/embeddings"), None);
    }

    #[test]
    fn llama_server_serves_embeddings_and_rerank_only_when_a_pool_says_so() {
        let llamacpp = ApiEndpoint::defaults(EngineKind::Llamacpp);
        assert_eq!(llamacpp.len(), 8);
        assert!(!llamacpp.contains(&ApiEndpoint::Embeddings));
        assert!(!llamacpp.contains(&ApiEndpoint::Rerank));
        assert!(llamacpp.contains(&ApiEndpoint::Messages));
        assert_eq!(
            ApiEndpoint::defaults(EngineKind::Openai),
            vec![
                ApiEndpoint::ChatCompletions,
                ApiEndpoint::Completions,
                ApiEndpoint::Models
            ]
        );
        for kind in [EngineKind::Llamacpp, EngineKind::Openai] {
            let defaults = ApiEndpoint::defaults(kind);
            assert!(defaults.is_sorted(), "{kind:?}");
        }
    }

    #[test]
    fn endpoint_refuses_what_it_cannot_reach() {
        assert!(matches!(
            Endpoint::parse("https://x:1"),
            Err(EndpointError::Https(_))
        ));
        assert!(matches!(
            Endpoint::parse("http://x:1/v1"),
            Err(EndpointError::HasPath(_))
        ));
        assert!(matches!(
            Endpoint::parse("http://x"),
            Err(EndpointError::MissingAuthority(_))
        ));
        assert!(matches!(
            Endpoint::parse("engine.sock"),
            Err(EndpointError::Unrecognised(_))
        ));
    }
}
