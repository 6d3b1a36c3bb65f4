//! orchestratord's configuration: a TOML file, overridden by flags and environment (see
//! `main.rs`), validated before anything binds. A non-loopback listener without API keys is
//! refused: an inference endpoint open to the network is an operator's mistake, not a default.
//! Headers the operator allows to be forwarded to engines can never be credentials.

use crate::admission::{AdmissionConfig, FullPolicy};
use crate::keys::KeyRing;
use crate::sessions::SessionPolicy;
use axum::http::HeaderName;
use daemon_support::http_server::HttpLimits;
use daemon_support::trace_export::OtlpEndpoint;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    /// pool-managerd's socket.
    pub socket: Option<PathBuf>,
    /// The API keys, one per line: `<name> <role> <key>` or a bare key (see `keys`).
    pub api_keys_file: Option<PathBuf>,
    /// Paths reachable without a key (default: /livez, /readyz, /metrics).
    pub open_paths: Option<Vec<String>>,
    /// The body limit of the native API and control requests (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    /// More client headers to forward to engines (besides trace context and API versions).
    pub forward_headers: Option<Vec<String>>,
    /// Balancers whose `X-Forwarded-For` names the client (addresses or CIDR ranges; default
    /// none: the peer is the client). See `client_address`.
    pub trusted_proxies: Option<Vec<String>>,
    /// An OTLP/HTTP collector's base URL (`http://host:4318`): requests' spans go there.
    /// Absent: no spans are made.
    pub otlp_endpoint: Option<String>,
    #[serde(default)]
    pub body_limits: RawBodyLimits,
    #[serde(default)]
    pub non_streaming: RawNonStreaming,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub tasks: RawTasks,
    #[serde(default)]
    pub admission: RawAdmission,
    #[serde(default)]
    pub streaming: RawStreaming,
    #[serde(default)]
    pub sessions: RawSessions,
}

/// Body limits of the OpenAI and Anthropic endpoints, by family.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBodyLimits {
    /// Chat, completions, messages, responses and the token counters (default 32 MiB: long
    /// chats, images sent inline).
    pub generation_bytes: Option<usize>,
    /// Embeddings and rerank (default 64 MiB: large batches).
    pub embeddings_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTasks {
    /// A native task whose events nobody has read for this long (since it was created or its
    /// last reader left) is cancelled (default 30 s).
    pub unattended_grace_ms: Option<u64>,
}

/// Limits on clients' connections: they bound reading requests and idle connections, never the
/// answer (a request waiting for a slot or streaming keeps its connection).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Connections served at once, all clients together (behind a load balancer every client has
    /// one address); more wait in the kernel's backlog. Default 10,000, and never more than three
    /// quarters of the file descriptor limit.
    pub max_connections: Option<usize>,
    /// A request head must arrive within this, and so must the next one on an idle keep-alive
    /// connection (default 10 s).
    pub header_timeout_ms: Option<u64>,
    /// A request body must arrive within this (default 60 s): 408 otherwise.
    pub body_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNonStreaming {
    /// A non-streaming request's engine answer must be whole within this (default 10 min); the
    /// stall limit does not apply, since an engine sends nothing until it is done.
    pub answer_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// A session idle this long is forgotten, and so is the pool placement kept it on (default
    /// 30 min).
    pub ttl_ms: Option<u64>,
    /// Turns per session; 0 or absent: unlimited.
    pub max_turns: Option<u32>,
    /// Prompt plus generated tokens per session; 0 or absent: unlimited.
    pub max_tokens: Option<u64>,
    /// Sessions remembered at once (default 10,000); the least recently used are forgotten first.
    pub max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    pub capacity: Option<usize>,
    pub full_policy: Option<FullPolicy>,
    pub batch_max_wait_ms: Option<u64>,
    /// How long a request may wait in the queue unless it says otherwise.
    pub queue_deadline_ms: Option<u64>,
    /// How many times a request whose engine failed before its answer began (connection refused
    /// or reset, a 5xx, its lease revoked) is placed again on another ready pool of its model
    /// (default 2; 0: never).
    pub max_retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStreaming {
    /// An engine silent this long mid-stream is a DECODE_TIMEOUT.
    pub decode_stall_ms: Option<u64>,
    /// A `: keep-alive` comment is sent on streams idle this long (queued, prefilling).
    pub keepalive_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub socket: Option<PathBuf>,
    pub api_keys: KeyRing,
    pub open_paths: Vec<String>,
    pub body_limits: BodyLimits,
    pub forward_headers: Vec<HeaderName>,
    pub trusted_proxies: Vec<IpNet>,
    pub admission: AdmissionConfig,
    pub queue_deadline: Duration,
    /// Placements on another pool after an engine failed before the answer began.
    pub max_retries: u32,
    pub decode_stall: Duration,
    pub answer_timeout: Duration,
    pub keepalive: Duration,
    pub sessions: SessionPolicy,
    pub http: HttpLimits,
    pub body_timeout: Duration,
    pub unattended_grace: Duration,
    /// Where spans go; `None`: none are made.
    pub otlp_endpoint: Option<OtlpEndpoint>,
}

/// How large a request body may be, by endpoint family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    pub native: usize,
    pub generation: usize,
    pub embeddings: usize,
}

impl BodyLimits {
    /// The limit for a request to `path`.
    pub fn for_path(&self, path: &str) -> usize {
        match path {
            "/v1/embeddings" | "/v1/rerank" | "/v1/reranking" => self.embeddings,
            path if path.starts_with("/v1/") => self.generation,
            _ => self.native,
        }
    }
}

/// Headers that carry credentials, describe the connection (hop-by-hop) or change the body's
/// encoding: never forwarded to an engine.
const NEVER_FORWARDED: [&str; 16] = [
    "authorization",
    "x-api-key",
    "cookie",
    "proxy-authorization",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
];

impl RawConfig {
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "config",
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen {listen_text:?} is not an ip:port address"))
        })?;
        let api_keys = match &self.api_keys_file {
            None => KeyRing::default(),
            Some(path) => KeyRing::read(path)?,
        };
        if !listen.ip().is_loopback() && api_keys.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {listen} (not a loopback address) without API keys: set api_keys_file"
            )));
        }
        let forward_headers = self
            .forward_headers
            .unwrap_or_default()
            .iter()
            .map(|name| forwardable(name))
            .collect::<Result<Vec<_>, _>>()?;
        let trusted_proxies = self
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|range| trusted_range(range))
            .collect::<Result<Vec<_>, _>>()?;
        let otlp_endpoint = self
            .otlp_endpoint
            .as_deref()
            .map(OtlpEndpoint::parse)
            .transpose()
            .map_err(|error| ConfigError::Invalid(format!("otlp_endpoint: {error}")))?;
        let limit = |name: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(ConfigError::Invalid(format!("{name} must be positive"))),
            value => Ok(value.unwrap_or(default)),
        };
        let body_limits = BodyLimits {
            native: limit("max_body_bytes", self.max_body_bytes, 1024 * 1024)?,
            generation: limit(
                "body_limits.generation_bytes",
                self.body_limits.generation_bytes,
                32 * 1024 * 1024,
            )?,
            embeddings: limit(
                "body_limits.embeddings_bytes",
                self.body_limits.embeddings_bytes,
                64 * 1024 * 1024,
            )?,
        };
        let defaults = AdmissionConfig::default();
        let admission = AdmissionConfig {
            capacity: self.admission.capacity.unwrap_or(defaults.capacity),
            full_policy: self.admission.full_policy.unwrap_or(defaults.full_policy),
            batch_max_wait: self
                .admission
                .batch_max_wait_ms
                .map_or(defaults.batch_max_wait, Duration::from_millis),
        };
        let day = 24 * 60 * 60 * 1000;
        let millis = |name: &str, value: Option<u64>, default: u64| match value {
            Some(value) if value == 0 || value > day => Err(ConfigError::Invalid(format!(
                "{name} must be between 1 and {day}, got {value}"
            ))),
            value => Ok(Duration::from_millis(value.unwrap_or(default))),
        };
        Ok(Config {
            listen,
            otlp_endpoint,
            socket: self.socket,
            api_keys,
            open_paths: self
                .open_paths
                .unwrap_or_else(|| ["/livez", "/readyz", "/metrics"].map(String::from).to_vec()),
            body_limits,
            forward_headers,
            trusted_proxies,
            admission,
            queue_deadline: millis(
                "admission.queue_deadline_ms",
                self.admission.queue_deadline_ms,
                60_000,
            )?,
            max_retries: self.admission.max_retries.unwrap_or(2),
            decode_stall: millis(
                "streaming.decode_stall_ms",
                self.streaming.decode_stall_ms,
                30_000,
            )?,
            answer_timeout: millis(
                "non_streaming.answer_timeout_ms",
                self.non_streaming.answer_timeout_ms,
                600_000,
            )?,
            keepalive: millis(
                "streaming.keepalive_ms",
                self.streaming.keepalive_ms,
                10_000,
            )?,
            http: HttpLimits::within_fd_limit(
                match self.http.max_connections {
                    Some(0) => {
                        return Err(ConfigError::Invalid(
                            "http.max_connections must be positive".into(),
                        ));
                    }
                    value => value.unwrap_or(10_000),
                },
                millis(
                    "http.header_timeout_ms",
                    self.http.header_timeout_ms,
                    10_000,
                )?,
                // A client that stops reading is cut off after the stall limit, as a silent
                // engine is.
                millis(
                    "streaming.decode_stall_ms",
                    self.streaming.decode_stall_ms,
                    30_000,
                )?,
            ),
            body_timeout: millis("http.body_timeout_ms", self.http.body_timeout_ms, 60_000)?,
            unattended_grace: millis(
                "tasks.unattended_grace_ms",
                self.tasks.unattended_grace_ms,
                30_000,
            )?,
            sessions: SessionPolicy {
                ttl: millis("sessions.ttl_ms", self.sessions.ttl_ms, 1_800_000)?,
                max_turns: self.sessions.max_turns.unwrap_or(0),
                max_sessions: std::num::NonZeroUsize::new(
                    self.sessions.max_sessions.unwrap_or(10_000),
                )
                .ok_or_else(|| {
                    ConfigError::Invalid("sessions.max_sessions must be positive".into())
                })?,
                max_tokens: self.sessions.max_tokens.unwrap_or(0),
            },
        })
    }
}

/// The configuration a running orchestratord serves with; SIGHUP replaces it. Readers take a
/// snapshot (`get`) and keep it for the request, so one request never sees two configurations.
#[derive(Debug)]
pub struct LiveConfig {
    current: std::sync::RwLock<std::sync::Arc<Config>>,
}

impl LiveConfig {
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig {
            current: std::sync::RwLock::new(std::sync::Arc::new(config)),
        }
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        // Replaced whole under the lock, so a poisoned lock still holds a whole config.
        std::sync::Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub fn replace(&self, config: Config) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = std::sync::Arc::new(config);
    }
}

/// A trusted balancer's address or CIDR range (`127.0.0.1`, `10.0.0.0/8`, `::1`).
fn trusted_range(text: &str) -> Result<IpNet, ConfigError> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::Invalid(format!(
                "trusted_proxies: {text:?} is neither an address nor a CIDR range"
            ))
        })
}

/// A header name an operator asked to forward: valid, and not a credential or connection header.
fn forwardable(name: &str) -> Result<HeaderName, ConfigError> {
    let header = HeaderName::try_from(name.trim()).map_err(|_| {
        ConfigError::Invalid(format!("forward_headers: {name:?} is not a header name"))
    })?;
    if NEVER_FORWARDED.contains(&header.as_str()) {
        return Err(ConfigError::Invalid(format!(
            "forward_headers: {name:?} is never forwarded to engines (credentials, connection and encoding headers stay here)"
        )));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_listener_without_keys_is_refused() {
        let raw = RawConfig {
            listen: Some("0.0.0.0:8080".into()),
            ..RawConfig::default()
        };
        let error = raw.validate().unwrap_err().to_string();
        assert!(error.contains("without API keys"), "{error}");
    }

    #[test]
    fn credentials_can_never_be_forwarded_and_limits_follow_the_endpoint_family() {
        for name in [
            "Authorization",
            "x-api-key",
            "Cookie",
            "TE",
            "Accept-Encoding",
            "not a header",
        ] {
            let raw = RawConfig {
                forward_headers: Some(vec![name.into()]),
                ..RawConfig::default()
            };
            assert!(raw.validate().is_err(), "{name}");
        }
        let raw = RawConfig {
            forward_headers: Some(vec!["X-Tenant".into()]),
            ..RawConfig::default()
        };
        let config = raw.validate().unwrap();
        assert_eq!(
            config.forward_headers,
            [HeaderName::from_static("x-tenant")]
        );
        let limits = config.body_limits;
        assert_eq!(limits.for_path("/v1/embeddings"), 64 * 1024 * 1024);
        assert_eq!(limits.for_path("/v1/messages"), 32 * 1024 * 1024);
        assert_eq!(limits.for_path("/v2/tasks"), 1024 * 1024);
    }

    #[test]
    fn an_otlp_endpoint_must_be_an_http_url_and_is_absent_by_default() {
        assert_eq!(RawConfig::default().validate().unwrap().otlp_endpoint, None);
        let raw = |endpoint: &str| RawConfig {
            otlp_endpoint: Some(endpoint.into()),
            ..RawConfig::default()
        };
        let config = raw("http://127.0.0.1:4318").validate().unwrap();
        assert_eq!(
            config.otlp_endpoint.unwrap().traces_url().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        let error = raw("127.0.0.1:4318").validate().unwrap_err().to_string();
        assert!(error.starts_with("otlp_endpoint: "), "{error}");
    }

    #[test]
    fn defaults_are_loopback_and_open_health_paths() {
        let config = RawConfig::default().validate().unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(config.open_paths.contains(&"/livez".to_owned()));
        assert!(config.api_keys.is_empty());
    }
}
