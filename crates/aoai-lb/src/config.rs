//! The configuration document: parsing, defaults and validation.
//!
//! The document is the seed app's `OPENAI_INSTANCES` JSON,
//! `{"instances":[{"name","url","api_key"}]}`, plus optional extensions
//! (priority, weight, deployments, timeouts, cooldown, circuit breaker,
//! limits). Every way a document can be wrong ends in one [`ConfigError`]
//! whose `Display` is a single line that starts with the path of the field
//! at fault (`instances[1].url: ...`) and never contains a key.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::credential::{CredentialConfig, DEFAULT_SCOPE, TokenAuth};
use crate::entra::EntraConfig;
use crate::secret::Secret;

/// A configuration problem, reported as `field: reason` on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Path of the offending field, e.g. `instances[1].url`; `(document)`
    /// when the JSON itself is unreadable.
    pub field: String,
    /// What is wrong, without echoing any secret.
    pub reason: String,
    /// The text is not JSON at all (a syntax error or a truncated
    /// document), as opposed to JSON with a wrong field. The caller knows
    /// where the text came from and says so: "OPENAI_INSTANCES is not
    /// valid JSON" helps more than a field path that only says where the
    /// parser stopped.
    pub not_json: bool,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: one_line(field.into()),
            reason: one_line(reason.into()),
            not_json: false,
        }
    }

    /// One line: `{source} is not valid JSON: ... at line L column C` when
    /// the text does not parse (`source` is `OPENAI_INSTANCES` or
    /// `configuration file /path`), else `invalid configuration: field: reason`.
    pub fn describe(&self, source: &str) -> String {
        if self.not_json {
            format!("{source} is not valid JSON: {}", self.reason)
        } else {
            format!("invalid configuration: {self}")
        }
    }
}

/// Escapes control characters, so that a field name or value quoted from
/// the document can neither break the one-line rule nor forge log lines.
fn one_line(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Default cap on a buffered request body: 32 MiB.
///
/// Bodies are kept in memory so that they can be replayed on another
/// instance; Azure's own limit for audio uploads is 25 MB.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// At least one instance, names unique.
    pub instances: Vec<InstanceConfig>,
    pub timeouts: Timeouts,
    /// Largest request body accepted (413 above it). Default 32 MiB.
    pub max_request_body_bytes: usize,
    pub cooldown: CooldownConfig,
    pub circuit_breaker: BreakerConfig,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    /// Validation of clients' Entra ID tokens; `None` without an `entra`
    /// block (a JWT bearer is then just an unknown key).
    pub entra: Option<EntraConfig>,
    /// First 16 hex digits of the SHA-256 of the document's bytes, as
    /// `sha256sum` prints them: tells which document is in use without
    /// showing it. Empty for a configuration not read from text.
    pub digest: String,
    /// Named clients with their keys (as SHA-256) and limits; empty when
    /// the document has none. See [`crate::clients`].
    pub clients: Vec<ClientConfig>,
    /// State shared with other replicas through Redis; `None` (no `redis`
    /// block) keeps every replica on its own. See [`crate::shared`].
    pub redis: Option<crate::shared::RedisConfig>,
    /// How instances are chosen (`routing`).
    pub routing: RoutingConfig,
}

/// The `routing` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Steer by each lane's predicted rate-limit room ([`crate::steer`]).
    /// Default `true`; `false` restores plain priority + least-loaded
    /// selection.
    pub rate_limit_aware: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            rate_limit_aware: true,
        }
    }
}

/// One `clients[]` entry, validated. Holds key hashes, never a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Unique; goes into logs, metric labels and the admin output.
    pub name: String,
    /// SHA-256 of each of its keys (may be empty when it lists Entra ID
    /// principals).
    pub key_hashes: Vec<[u8; 32]>,
    /// `appid`/`azp` values of Entra ID tokens served as this client,
    /// lower-case GUIDs; empty = none.
    pub entra_app_ids: Vec<String>,
    /// `oid` values of Entra ID tokens served as this client, lower-case
    /// GUIDs; empty = none.
    pub entra_object_ids: Vec<String>,
    /// Client-facing deployment names it may use; `None` = every one.
    pub deployments: Option<std::collections::BTreeSet<String>>,
    /// Requests per sliding 60 s; `None` = unlimited.
    pub rpm: Option<u64>,
    /// Tokens per sliding 60 s; `None` = unlimited.
    pub tpm: Option<u64>,
    /// Instance priority groups it may use; `None` = every group.
    pub priorities: Option<std::collections::BTreeSet<u32>>,
    /// Tokens per UTC day or calendar month; `None` = unlimited.
    pub token_quota: Option<TokenQuota>,
    /// Output tokens assumed for admission when a request sets no
    /// `max_tokens`/`max_completion_tokens`. Default 4096.
    pub default_max_tokens: u64,
}

/// A token quota over a calendar period (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenQuota {
    /// Tokens allowed per period.
    pub tokens: u64,
    /// The period, which rolls over at 00:00 UTC.
    pub period: QuotaPeriod,
}

/// The period of a [`TokenQuota`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    /// A UTC day.
    Day,
    /// A calendar month (UTC).
    Month,
}

/// One Azure OpenAI resource (or anything that speaks its API).
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Unique; used in logs, metrics labels and the admin output.
    pub name: String,
    /// Base URL, `http` or `https`, without a trailing slash. A path prefix
    /// is kept and the request path is appended to it.
    pub url: url::Url,
    /// How the gateway authenticates to the instance: its key (`api_key`,
    /// the default) or an Entra ID token (`auth`).
    pub credential: BackendCredential,
    /// Lower is preferred. Default 1.
    pub priority: u32,
    /// Share of traffic within a priority group. Positive, default 1.
    pub weight: f64,
    /// Which client-facing deployment names this instance serves and under
    /// which name. `None` serves every name unchanged.
    pub deployments: Option<DeploymentMap>,
}

impl InstanceConfig {
    /// The backend deployment name for a client-facing `name`, or `None`
    /// when this instance does not serve it.
    pub fn backend_deployment<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match &self.deployments {
            None => Some(name),
            Some(map) => map.0.get(name).map(String::as_str),
        }
    }
}

/// The gateway's credential for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCredential {
    /// Sent upstream as `api-key`; never printed.
    ApiKey(Secret),
    /// An Entra ID access token, sent as `Authorization: Bearer`.
    Entra(TokenAuth),
}

/// Client-facing deployment name → this instance's deployment name
/// (`.0`), and the limits configured for an upstream deployment of this
/// instance (`.1`, keyed by the upstream name; see [`crate::lane`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeploymentMap(
    pub BTreeMap<String, String>,
    pub BTreeMap<String, crate::lane::LaneLimits>,
);

impl DeploymentMap {
    /// The configured limits of upstream deployment `upstream` (none set:
    /// all `None`).
    pub fn limits(&self, upstream: &str) -> crate::lane::LaneLimits {
        self.1.get(upstream).copied().unwrap_or_default()
    }
}

/// Upstream timeouts. Each is its own phase; there is no total deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake. Default 10 s.
    pub connect: Duration,
    /// From sending the request to receiving response headers. Default
    /// 600 s: a non-streaming completion can take minutes.
    pub response_headers: Duration,
    /// Longest silence between two body chunks once the response has
    /// started. Default 120 s.
    pub stream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            response_headers: Duration::from_secs(600),
            stream_idle: Duration::from_secs(120),
        }
    }
}

/// How long an instance is skipped after a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownConfig {
    /// Used when a 429 names no delay (no `retry-after-ms`, `retry-after`
    /// or `x-ratelimit-reset-*`). Default 10 s, as Azure's own samples.
    pub default_ms: u64,
    /// Upper bound on any cooldown. Default 1 h: a quota exhausted for a
    /// day is still re-probed hourly.
    pub max_ms: u64,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        Self {
            default_ms: 10_000,
            max_ms: 3_600_000,
        }
    }
}

/// Circuit breaker for 5xx, timeouts and connection failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 3.
    pub failure_threshold: u32,
    /// First open period; doubles on each failed probe. Default 5 s.
    pub open_ms: u64,
    /// Longest open period. Default 60 s.
    pub max_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_ms: 5_000,
            max_open_ms: 60_000,
        }
    }
}

/// Limits on the client-facing listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Open client connections beyond this are closed at once. Default 20,000.
    pub max_connections: usize,
    /// Time a new connection has to deliver its first complete request
    /// head (slowloris). Default 10 s.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit idle, or take to send the
    /// head of a later request, before it is closed. Default 120 s: longer
    /// than the idle expiry of common client pools (httpx 5 s, Node 4 s,
    /// Go 90 s), so the client closes first and never sends a request on a
    /// connection the gateway is closing. Never shorter than
    /// `header_read_timeout`.
    pub keep_alive_timeout: Duration,
    /// Most request headers accepted. Default 100.
    pub max_headers: usize,
    /// After SIGTERM, how long the listener keeps accepting while `/readyz`
    /// already answers 503, so load balancers stop routing here before
    /// connections are refused. Default 1 s; 0 stops accepting at once.
    pub drain_delay: Duration,
    /// Time in-flight requests get to finish once the listener has stopped
    /// accepting. Default 30 s.
    pub shutdown_grace: Duration,
    /// The server for HTTP/1 clients (`server.http1`): `relay`, the lean
    /// one of [`crate::relay`] (the default), or `hyper`, hyper's server as
    /// before. HTTP/2 clients and WebSocket handshakes are served by hyper
    /// either way.
    pub http1: crate::relay::Http1Server,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(120),
            max_headers: 100,
            drain_delay: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            http1: crate::relay::Http1Server::Relay,
        }
    }
}

/// The upstream HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// PEM file of extra CA certificates trusted besides the webpki roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Idle pooled connections are closed after this. Default 50 s, below
    /// the usual 60 s+ server keep-alive so a reused connection is never
    /// one the server is closing.
    pub pool_idle_timeout: Duration,
    /// Connections kept per instance for reuse. Default 256. For HTTP/1
    /// instances this is per worker thread ([`crate::pool`]).
    pub pool_max_idle_per_host: usize,
    /// The client for HTTP/1 instances (`upstream.http1`): `relay`, the lean
    /// one of [`crate::relay::client`] (the default), or `hyper`, hyper's
    /// HTTP/1 client as before. Instances that answer h2 by ALPN, and
    /// WebSocket handshakes, use hyper either way.
    pub http1: crate::relay::Http1Server,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            pool_idle_timeout: Duration::from_secs(50),
            pool_max_idle_per_host: 256,
            http1: crate::relay::Http1Server::Relay,
        }
    }
}

// ---- The document as written -------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    instances: Vec<RawInstance>,
    #[serde(default)]
    timeouts: RawTimeouts,
    max_request_body_bytes: Option<u64>,
    #[serde(default)]
    cooldown: RawCooldown,
    #[serde(default)]
    circuit_breaker: RawBreaker,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    entra: Option<RawEntra>,
    #[serde(default)]
    clients: Vec<crate::clients::RawClient>,
    redis: Option<crate::shared::config::RawRedis>,
    #[serde(default)]
    routing: RawRouting,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    rate_limit_aware: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: String,
    url: String,
    api_key: Option<Secret>,
    auth: Option<RawAuth>,
    priority: Option<u32>,
    weight: Option<f64>,
    /// A list of names, or a map whose values are a name or a lane
    /// object; read by hand ([`deployment_map`]) so that every mistake
    /// names its own field.
    deployments: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntra {
    tenant_id: String,
    audiences: Option<Vec<String>>,
    issuers: Option<Vec<String>>,
    #[serde(default)]
    allow_any_principal: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(rename = "type")]
    kind: String,
    client_id: Option<String>,
    tenant_id: Option<String>,
    client_secret: Option<Secret>,
    certificate_path: Option<String>,
    scope: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_ms: Option<u64>,
    response_headers_ms: Option<u64>,
    stream_idle_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCooldown {
    default_ms: Option<u64>,
    max_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: Option<u32>,
    open_ms: Option<u64>,
    max_open_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_connections: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    keep_alive_timeout_ms: Option<u64>,
    max_headers: Option<usize>,
    drain_delay_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    http1: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    extra_ca_file: Option<PathBuf>,
    pool_idle_timeout_ms: Option<u64>,
    pool_max_idle_per_host: Option<usize>,
    http1: Option<String>,
}

impl Config {
    /// Parses and validates a JSON document. A client's `key_env` is read
    /// from the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first field at fault.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::from_json_env(text, &|k| std::env::var(k).ok())
    }

    /// [`Config::from_json`] with `env` looking up environment variables.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first field at fault.
    pub fn from_json_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawDocument = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = if path.is_empty() || path == "." {
                "(document)".to_owned()
            } else {
                path
            };
            if inner.is_syntax() || inner.is_eof() {
                // serde_json's message ends with "at line L column C"; the
                // path says which part was being read when it broke.
                let mut err = ConfigError::new(field.clone(), inner.to_string());
                // serde_path_to_error marks a key it never finished reading
                // as `?`; that part says nothing.
                let within = field.trim_end_matches(".?");
                if field != "(document)" && !within.is_empty() && within != "?" {
                    err.reason = one_line(format!("{} (while reading {within})", err.reason));
                }
                err.field = "(document)".to_owned();
                err.not_json = true;
                return err;
            }
            // Never echo what was written under a key field: a mistyped key
            // is still a key.
            let reason = if field.contains("api_key")
                || field.contains("key")
                || field.contains("client_secret")
                || field.contains("password")
            {
                format!("must be a string ({})", position(&inner))
            } else {
                inner.to_string()
            };
            ConfigError::new(field, reason)
        })?;
        let mut config = raw.validate(env)?;
        config.digest = digest(text.as_bytes());
        Ok(config)
    }
}

/// First 16 hex digits of the SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bytes);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn position(e: &serde_json::Error) -> String {
    format!("line {} column {}", e.line(), e.column())
}

impl RawDocument {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        if self.instances.is_empty() {
            return Err(ConfigError::new(
                "instances",
                "at least one instance is required",
            ));
        }
        let mut names = HashSet::new();
        let mut instances = Vec::with_capacity(self.instances.len());
        for (i, raw) in self.instances.into_iter().enumerate() {
            let at = |f: &str| format!("instances[{i}].{f}");
            if raw.name.trim().is_empty() {
                return Err(ConfigError::new(at("name"), "must not be empty"));
            }
            if !names.insert(raw.name.clone()) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate instance name {:?}", raw.name),
                ));
            }
            let url = parse_base_url(&raw.url).map_err(|r| ConfigError::new(at("url"), r))?;
            let credential = backend_credential(raw.api_key, raw.auth)
                .map_err(|(f, r)| ConfigError::new(at(&f), r))?;
            let weight = raw.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight > 0.0) {
                return Err(ConfigError::new(
                    at("weight"),
                    format!("must be a positive number, got {weight}"),
                ));
            }
            let deployments = match raw.deployments {
                None => None,
                Some(d) => Some(deployment_map(d).map_err(|r| {
                    ConfigError::new(format!("instances[{i}].deployments{}", r.0), r.1)
                })?),
            };
            instances.push(InstanceConfig {
                name: raw.name,
                url,
                credential,
                priority: raw.priority.unwrap_or(1),
                weight,
                deployments,
            });
        }

        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect: positive_ms("timeouts.connect_ms", self.timeouts.connect_ms, d.connect)?,
            response_headers: positive_ms(
                "timeouts.response_headers_ms",
                self.timeouts.response_headers_ms,
                d.response_headers,
            )?,
            stream_idle: positive_ms(
                "timeouts.stream_idle_ms",
                self.timeouts.stream_idle_ms,
                d.stream_idle,
            )?,
        };

        let max_request_body_bytes = match self.max_request_body_bytes {
            None => DEFAULT_MAX_REQUEST_BODY_BYTES,
            Some(0) => {
                return Err(ConfigError::new(
                    "max_request_body_bytes",
                    "must be greater than 0",
                ));
            }
            Some(n) => usize::try_from(n)
                .map_err(|_| ConfigError::new("max_request_body_bytes", "too large"))?,
        };

        let dc = CooldownConfig::default();
        let cooldown = CooldownConfig {
            default_ms: self.cooldown.default_ms.unwrap_or(dc.default_ms),
            max_ms: self.cooldown.max_ms.unwrap_or(dc.max_ms),
        };
        if cooldown.max_ms == 0 {
            return Err(ConfigError::new(
                "cooldown.max_ms",
                "must be greater than 0",
            ));
        }
        if cooldown.default_ms > cooldown.max_ms {
            return Err(ConfigError::new(
                "cooldown.default_ms",
                "must not exceed cooldown.max_ms",
            ));
        }

        let db = BreakerConfig::default();
        let circuit_breaker = BreakerConfig {
            failure_threshold: self
                .circuit_breaker
                .failure_threshold
                .unwrap_or(db.failure_threshold),
            open_ms: self.circuit_breaker.open_ms.unwrap_or(db.open_ms),
            max_open_ms: self.circuit_breaker.max_open_ms.unwrap_or(db.max_open_ms),
        };
        if circuit_breaker.failure_threshold == 0 {
            return Err(ConfigError::new(
                "circuit_breaker.failure_threshold",
                "must be at least 1",
            ));
        }
        if circuit_breaker.open_ms == 0 {
            return Err(ConfigError::new(
                "circuit_breaker.open_ms",
                "must be greater than 0",
            ));
        }
        if circuit_breaker.max_open_ms < circuit_breaker.open_ms {
            return Err(ConfigError::new(
                "circuit_breaker.max_open_ms",
                "must be at least circuit_breaker.open_ms",
            ));
        }

        let ds = ServerConfig::default();
        let server = ServerConfig {
            max_connections: nonzero(
                "server.max_connections",
                self.server.max_connections,
                ds.max_connections,
            )?,
            header_read_timeout: positive_ms(
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
                ds.header_read_timeout,
            )?,
            keep_alive_timeout: positive_ms(
                "server.keep_alive_timeout_ms",
                self.server.keep_alive_timeout_ms,
                ds.keep_alive_timeout,
            )?,
            max_headers: nonzero(
                "server.max_headers",
                self.server.max_headers,
                ds.max_headers,
            )?,
            drain_delay: match self.server.drain_delay_ms {
                None => ds.drain_delay,
                Some(ms) => Duration::from_millis(ms),
            },
            shutdown_grace: match self.server.shutdown_grace_ms {
                None => ds.shutdown_grace,
                Some(ms) => Duration::from_millis(ms),
            },
            http1: match self.server.http1.as_deref() {
                None => ds.http1,
                Some(s) => crate::relay::Http1Server::parse(s).ok_or_else(|| {
                    ConfigError::new("server.http1", "must be \"relay\" or \"hyper\"")
                })?,
            },
        };

        let du = UpstreamConfig::default();
        let upstream = UpstreamConfig {
            extra_ca_file: self.upstream.extra_ca_file,
            pool_idle_timeout: match self.upstream.pool_idle_timeout_ms {
                None => du.pool_idle_timeout,
                Some(ms) => Duration::from_millis(ms),
            },
            pool_max_idle_per_host: self
                .upstream
                .pool_max_idle_per_host
                .unwrap_or(du.pool_max_idle_per_host),
            http1: match self.upstream.http1.as_deref() {
                None => du.http1,
                Some(s) => crate::relay::Http1Server::parse(s).ok_or_else(|| {
                    ConfigError::new("upstream.http1", "must be \"relay\" or \"hyper\"")
                })?,
            },
        };

        let entra = match self.entra {
            None => None,
            Some(e) => Some(entra_config(e)?),
        };
        let clients = crate::clients::validate(self.clients, &instances, env)?;
        // Principals are only ever seen in validated tokens: listing them
        // without an `entra` block would silently never match.
        if entra.is_none()
            && let Some((i, c)) = clients
                .iter()
                .enumerate()
                .find(|(_, c)| !c.entra_app_ids.is_empty() || !c.entra_object_ids.is_empty())
        {
            let field = if c.entra_app_ids.is_empty() {
                "entra_object_ids"
            } else {
                "entra_app_ids"
            };
            return Err(ConfigError::new(
                format!("clients[{i}].{field}"),
                "needs the top-level entra block (tenant_id), which validates the tokens",
            ));
        }
        let redis = self.redis.map(|r| r.validate(env)).transpose()?;

        Ok(Config {
            clients,
            redis,
            instances,
            timeouts,
            max_request_body_bytes,
            cooldown,
            circuit_breaker,
            server,
            upstream,
            entra,
            digest: String::new(),
            routing: RoutingConfig {
                rate_limit_aware: self
                    .routing
                    .rate_limit_aware
                    .unwrap_or(RoutingConfig::default().rate_limit_aware),
            },
        })
    }
}

/// The `entra` block with its defaults.
fn entra_config(raw: RawEntra) -> Result<EntraConfig, ConfigError> {
    let tenant = raw.tenant_id.trim().to_ascii_lowercase();
    if !crate::entra::is_guid(&tenant) {
        return Err(ConfigError::new(
            "entra.tenant_id",
            "must be the tenant's GUID (tokens carry it in tid), not a domain name",
        ));
    }
    let list = |field: &str, v: Option<Vec<String>>, default: Vec<String>| {
        let v = v.unwrap_or(default);
        if v.is_empty() || v.iter().any(|s| s.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("entra.{field}"),
                "must be a non-empty list of non-empty strings",
            ));
        }
        Ok(v)
    };
    Ok(EntraConfig {
        audiences: list(
            "audiences",
            raw.audiences,
            vec![crate::entra::DEFAULT_AUDIENCE.to_owned()],
        )?,
        issuers: list(
            "issuers",
            raw.issuers,
            EntraConfig::default_issuers(&tenant),
        )?,
        tenant_id: tenant,
        allow_any_principal: raw.allow_any_principal,
    })
}

/// The instance's credential from `api_key` and `auth`. On error, the
/// field under the instance and the reason (never the value).
fn backend_credential(
    api_key: Option<Secret>,
    auth: Option<RawAuth>,
) -> Result<BackendCredential, (String, String)> {
    let err = |f: &str, r: &str| Err((f.to_owned(), r.to_owned()));
    let key_only = match &auth {
        None => true,
        Some(a) if a.kind == "api_key" => {
            if a.client_id.is_some()
                || a.tenant_id.is_some()
                || a.client_secret.is_some()
                || a.certificate_path.is_some()
                || a.scope.is_some()
            {
                return err(
                    "auth",
                    "type api_key takes no other field; the key goes in api_key",
                );
            }
            true
        }
        Some(_) => false,
    };
    let auth = match auth {
        Some(a) if !key_only => a,
        _ => {
            return match api_key {
                None => err(
                    "api_key",
                    "required (or set auth to an Entra ID credential)",
                ),
                Some(k) if k.is_empty() => err("api_key", "must not be empty"),
                Some(k) => Ok(BackendCredential::ApiKey(k)),
            };
        }
    };
    let nonempty = |f: &str, v: Option<String>| -> Result<Option<String>, (String, String)> {
        match v {
            Some(s) if s.trim().is_empty() => {
                Err((format!("auth.{f}"), "must not be empty".to_owned()))
            }
            other => Ok(other.map(|s| s.trim().to_owned())),
        }
    };
    let client_id = nonempty("client_id", auth.client_id)?;
    let tenant_id = nonempty("tenant_id", auth.tenant_id)?;
    if let Some(t) = &tenant_id
        && !crate::credential::valid_tenant(t)
    {
        return err("auth.tenant_id", "must be a GUID or a domain name");
    }
    let scope = nonempty("scope", auth.scope)?.unwrap_or_else(|| DEFAULT_SCOPE.to_owned());
    if url::Url::parse(&scope).is_err() {
        return err(
            "auth.scope",
            "must be a URI such as https://cognitiveservices.azure.com/.default",
        );
    }
    let only = |what: &str, present: &[(&str, bool)]| -> Result<(), (String, String)> {
        match present.iter().find(|(_, p)| *p) {
            Some((f, _)) => Err((format!("auth.{f}"), format!("not used by type {what}"))),
            None => Ok(()),
        }
    };
    if api_key.is_some() {
        return err(
            "api_key",
            "must not be set together with an Entra ID auth (choose one credential)",
        );
    }
    let credential = match auth.kind.as_str() {
        "managed_identity" => {
            only(
                "managed_identity",
                &[
                    ("tenant_id", tenant_id.is_some()),
                    ("client_secret", auth.client_secret.is_some()),
                    ("certificate_path", auth.certificate_path.is_some()),
                ],
            )?;
            CredentialConfig::ManagedIdentity { client_id }
        }
        "workload_identity" => {
            only(
                "workload_identity",
                &[
                    ("client_secret", auth.client_secret.is_some()),
                    ("certificate_path", auth.certificate_path.is_some()),
                ],
            )?;
            CredentialConfig::WorkloadIdentity {
                client_id,
                tenant_id,
            }
        }
        "client_secret" => {
            let Some(tenant_id) = tenant_id else {
                return err("auth.tenant_id", "required with type client_secret");
            };
            let Some(client_id) = client_id else {
                return err("auth.client_id", "required with type client_secret");
            };
            let Some(client_secret) = auth.client_secret.filter(|s| !s.is_empty()) else {
                return err("auth.client_secret", "required with type client_secret");
            };
            only(
                "client_secret",
                &[("certificate_path", auth.certificate_path.is_some())],
            )?;
            CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            }
        }
        "client_certificate" => {
            let Some(tenant_id) = tenant_id else {
                return err("auth.tenant_id", "required with type client_certificate");
            };
            let Some(client_id) = client_id else {
                return err("auth.client_id", "required with type client_certificate");
            };
            only(
                "client_certificate",
                &[("client_secret", auth.client_secret.is_some())],
            )?;
            let Some(path) = nonempty("certificate_path", auth.certificate_path)? else {
                return err(
                    "auth.certificate_path",
                    "required with type client_certificate (a PEM file with the certificate and its private key)",
                );
            };
            CredentialConfig::ClientCertificate {
                tenant_id,
                client_id,
                certificate_path: std::path::PathBuf::from(path),
            }
        }
        other => {
            return Err((
                "auth.type".to_owned(),
                format!(
                    "unknown type {other:?} (expected api_key, managed_identity, workload_identity, client_secret or client_certificate)"
                ),
            ));
        }
    };
    Ok(BackendCredential::Entra(TokenAuth { credential, scope }))
}

fn positive_ms(
    field: &str,
    value: Option<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

fn nonzero(field: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(n) => Ok(n),
    }
}

/// Checks a backend base URL and normalises it (no trailing slash).
fn parse_base_url(text: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(text.trim()).map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, got {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs; keys belong in `api_key`.
        return Err("must not carry credentials; use api_key".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query string or fragment".to_owned());
    }
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(&trimmed);
    Ok(url)
}

/// Turns either form of `deployments` into a map. On error, returns the
/// path suffix (`["gpt-4o"]`, `["gpt-4o"].tpm` or `[2]`) and the reason.
///
/// A map value is a deployment name or a lane object
/// `{"name": "...", "tpm": N, "rpm": N}` (`tpm`, `rpm` optional positive
/// integers). Two client names may share an upstream deployment (one
/// lane), but not with different limits.
fn deployment_map(raw: serde_json::Value) -> Result<DeploymentMap, (String, String)> {
    use serde_json::Value;
    // Azure deployment names are letters, digits, `-`, `_` and `.`; every
    // name must also go into a URL path segment as is.
    let valid = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let mut map = BTreeMap::new();
    let mut lanes: BTreeMap<String, crate::lane::LaneLimits> = BTreeMap::new();
    match raw {
        Value::Array(names) => {
            for (i, name) in names.into_iter().enumerate() {
                let Value::String(name) = name else {
                    return Err((format!("[{i}]"), "must be a deployment name".to_owned()));
                };
                if !valid(&name) {
                    return Err((
                        format!("[{i}]"),
                        format!("invalid deployment name {name:?}"),
                    ));
                }
                map.insert(name.clone(), name);
            }
        }
        Value::Object(m) => {
            for (client, value) in m {
                let at = format!("[{client:?}]");
                if !valid(&client) {
                    return Err((at, format!("invalid deployment name {client:?}")));
                }
                let (backend, limits) = match value {
                    Value::String(s) => (s, None),
                    Value::Object(o) => {
                        let (name, limits) =
                            lane_entry(o).map_err(|(f, r)| (format!("{at}{f}"), r))?;
                        (name, Some(limits))
                    }
                    _ => {
                        return Err((
                            at,
                            "must be a deployment name or an object {\"name\", \"tpm\", \"rpm\"}"
                                .to_owned(),
                        ));
                    }
                };
                if !valid(&backend) {
                    let field = if limits.is_some() {
                        format!("{at}.name")
                    } else {
                        at
                    };
                    return Err((field, format!("invalid deployment name {backend:?}")));
                }
                if let Some(l) = limits {
                    if lanes.get(&backend).is_some_and(|prev| *prev != l) {
                        return Err((
                            at,
                            format!("limits differ from another entry for deployment {backend:?}"),
                        ));
                    }
                    lanes.insert(backend.clone(), l);
                }
                map.insert(client, backend);
            }
        }
        _ => {
            return Err((
                String::new(),
                "must be a list of deployment names or a map of client-facing name to deployment"
                    .to_owned(),
            ));
        }
    }
    if map.is_empty() {
        return Err((
            String::new(),
            "must name at least one deployment (omit the field to serve every name)".to_owned(),
        ));
    }
    Ok(DeploymentMap(map, lanes))
}

/// A lane object `{"name", "tpm", "rpm"}`. On error, the field suffix
/// (`.tpm`) and the reason.
fn lane_entry(
    o: serde_json::Map<String, serde_json::Value>,
) -> Result<(String, crate::lane::LaneLimits), (String, String)> {
    let mut name = None;
    let mut limits = crate::lane::LaneLimits::default();
    for (k, v) in o {
        match k.as_str() {
            "name" => match v {
                serde_json::Value::String(s) => name = Some(s),
                _ => return Err((".name".to_owned(), "must be a deployment name".to_owned())),
            },
            "tpm" | "rpm" => {
                let n = v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    (
                        format!(".{k}"),
                        format!("must be a positive integer, got {v}"),
                    )
                })?;
                if k == "tpm" {
                    limits.tpm = Some(n);
                } else {
                    limits.rpm = Some(n);
                }
            }
            other => {
                return Err((
                    format!(".{}", one_line(other.to_owned())),
                    "unknown field, expected one of `name`, `tpm`, `rpm`".to_owned(),
                ));
            }
        }
    }
    let name = name.ok_or_else(|| (".name".to_owned(), "missing field `name`".to_owned()))?;
    Ok((name, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(doc: &str) -> String {
        Config::from_json(doc).unwrap_err().to_string()
    }

    const ONE: &str =
        r#"{"instances":[{"name":"a","url":"https://a.example.com/","api_key":"k1"}]}"#;

    #[test]
    fn accepts_the_seed_document_with_defaults() {
        let c = Config::from_json(ONE).unwrap();
        assert_eq!(c.instances.len(), 1);
        let i = &c.instances[0];
        assert_eq!(i.url.as_str(), "https://a.example.com/");
        assert_eq!(i.priority, 1);
        assert!((i.weight - 1.0).abs() < f64::EPSILON);
        assert!(i.deployments.is_none());
        assert_eq!(i.backend_deployment("anything"), Some("anything"));
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.max_request_body_bytes, DEFAULT_MAX_REQUEST_BODY_BYTES);
    }

    #[test]
    fn keeps_a_path_prefix_without_trailing_slash() {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"https://apim.example.com/aoai/","api_key":"k"}]}"#,
        )
        .unwrap();
        assert_eq!(c.instances[0].url.path(), "/aoai");
    }

    #[test]
    fn names_the_field_of_a_bad_url() {
        let e = err(
            r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"},{"name":"b","url":"not a url","api_key":"k"}]}"#,
        );
        assert!(e.starts_with("instances[1].url: "), "{e}");
    }

    #[test]
    fn rejects_unknown_fields_by_name() {
        let e = err(
            r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k","wieght":2}]}"#,
        );
        assert!(e.starts_with("instances[0]"), "{e}");
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn rejects_missing_url_and_key() {
        assert!(err(r#"{"instances":[{"name":"a","api_key":"k"}]}"#).contains("url"));
        assert!(
            err(r#"{"instances":[{"name":"a","url":"https://a.example.com"}]}"#)
                .contains("api_key")
        );
    }

    #[test]
    fn rejects_duplicate_names_empty_lists_and_bad_weights() {
        let dup = r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"},{"name":"a","url":"https://b.example.com","api_key":"k"}]}"#;
        assert!(err(dup).starts_with("instances[1].name: duplicate"));
        assert!(err(r#"{"instances":[]}"#).starts_with("instances: "));
        for w in ["0", "-1", "0.0"] {
            let doc = format!(
                r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k","weight":{w}}}]}}"#
            );
            assert!(err(&doc).starts_with("instances[0].weight: "), "{w}");
        }
    }

    #[test]
    fn reports_invalid_json_on_one_line() {
        let e = err("{\"instances\": [");
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with("(document)") || e.starts_with("instances"),
            "{e}"
        );
    }

    #[test]
    fn tells_invalid_json_from_a_wrong_field_and_says_where() {
        let doc =
            "{\"instances\":[{\"name\":\"a\",\"url\":\"https://a.example.com\",\"api_key\":\"k\"}";
        let e = Config::from_json(doc).unwrap_err();
        assert!(e.not_json, "{e:?}");
        let line = e.describe("OPENAI_INSTANCES");
        assert!(
            line.starts_with("OPENAI_INSTANCES is not valid JSON: "),
            "{line}"
        );
        assert!(line.contains("line 1 column"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        let e = Config::from_json("{\"instances\":[{\"name\":\"a\",}]}").unwrap_err();
        assert!(e.not_json, "{e:?}");
        assert_eq!(
            e.describe("x"),
            "x is not valid JSON: trailing comma at line 1 column 27 (while reading instances[0])"
        );
        // Valid JSON with a bad field is not a syntax problem.
        let e = Config::from_json(r#"{"instances":[]}"#).unwrap_err();
        assert!(!e.not_json);
        assert_eq!(
            e.describe("OPENAI_INSTANCES"),
            "invalid configuration: instances: at least one instance is required"
        );
    }

    #[test]
    fn never_echoes_a_key_of_the_wrong_type() {
        let e = err(
            r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":123456789}]}"#,
        );
        assert!(e.starts_with("instances[0].api_key: "), "{e}");
        assert!(!e.contains("123456789"), "{e}");
    }

    #[test]
    fn rejects_urls_with_credentials_or_odd_schemes() {
        for url in [
            "ftp://a.example.com",
            "https://user:pw@a.example.com",
            "https://a.example.com/?x=1",
        ] {
            let doc = format!(r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"k"}}]}}"#);
            let e = err(&doc);
            assert!(e.starts_with("instances[0].url: "), "{e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn rejects_deployment_names_that_cannot_go_in_a_url() {
        for name in [
            "my deployment",
            "a/b",
            "..",
            "caf\\u00e9",
            "x\\u0001",
            "a%2F",
        ] {
            let doc = format!(
                r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k","deployments":{{"gpt-4o":"{name}"}}}}]}}"#
            );
            let e = err(&doc);
            assert!(e.starts_with("instances[0].deployments"), "{name}: {e}");
            let doc = format!(
                r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k","deployments":["{name}"]}}]}}"#
            );
            assert!(
                err(&doc).starts_with("instances[0].deployments[0]"),
                "{name}"
            );
        }
    }

    #[test]
    fn keeps_errors_on_one_line_whatever_the_document_holds() {
        let e = err("{\"i\\nstances\":[]}");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("i\\nstances"), "{e}");
    }

    fn auth_err(auth: &str, key: bool) -> String {
        let key = if key { r#","api_key":"k""# } else { "" };
        err(&format!(
            r#"{{"instances":[{{"name":"a","url":"https://a.example.com"{key},"auth":{auth}}}]}}"#
        ))
    }

    fn auth_ok(auth: &str) -> BackendCredential {
        let doc = format!(
            r#"{{"instances":[{{"name":"a","url":"https://a.example.com","auth":{auth}}}]}}"#
        );
        Config::from_json(&doc).unwrap().instances[0]
            .credential
            .clone()
    }

    #[test]
    fn reads_the_entra_block_with_its_defaults() {
        let t = "9C1C4E5A-7D0B-4C6E-9A43-5E1F2B3C4D5E";
        let doc = format!(
            r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k"}}],"entra":{{"tenant_id":"{t}"}}}}"#
        );
        let e = Config::from_json(&doc).unwrap().entra.unwrap();
        let t = t.to_ascii_lowercase();
        assert_eq!(e.tenant_id, t);
        assert_eq!(e.audiences, ["https://cognitiveservices.azure.com"]);
        assert_eq!(e.issuers, EntraConfig::default_issuers(&t));
        assert!(!e.allow_any_principal);
        let bad = r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"}],"entra":{"tenant_id":"contoso.onmicrosoft.com"}}"#;
        assert!(err(bad).starts_with("entra.tenant_id: "));
        let bad = format!(
            r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k"}}],"entra":{{"tenant_id":"{t}","audiences":[]}}}}"#
        );
        assert!(err(&bad).starts_with("entra.audiences: "));
    }

    #[test]
    fn reads_every_auth_type() {
        assert_eq!(
            auth_ok(r#"{"type":"managed_identity"}"#),
            BackendCredential::Entra(TokenAuth {
                credential: CredentialConfig::ManagedIdentity { client_id: None },
                scope: DEFAULT_SCOPE.into()
            })
        );
        assert_eq!(
            auth_ok(
                r#"{"type":"managed_identity","client_id":"c","scope":"https://ai.azure.com/.default"}"#
            ),
            BackendCredential::Entra(TokenAuth {
                credential: CredentialConfig::ManagedIdentity {
                    client_id: Some("c".into())
                },
                scope: "https://ai.azure.com/.default".into()
            })
        );
        assert!(matches!(
            auth_ok(r#"{"type":"workload_identity"}"#),
            BackendCredential::Entra(TokenAuth {
                credential: CredentialConfig::WorkloadIdentity { .. },
                ..
            })
        ));
        assert!(matches!(
            auth_ok(
                r#"{"type":"client_secret","tenant_id":"t","client_id":"c","client_secret":"s"}"#
            ),
            BackendCredential::Entra(TokenAuth {
                credential: CredentialConfig::ClientSecret { .. },
                ..
            })
        ));
        assert_eq!(
            auth_ok(
                r#"{"type":"client_certificate","tenant_id":"t","client_id":"c","certificate_path":"/certs/sp.pem"}"#
            ),
            BackendCredential::Entra(TokenAuth {
                credential: CredentialConfig::ClientCertificate {
                    tenant_id: "t".into(),
                    client_id: "c".into(),
                    certificate_path: "/certs/sp.pem".into()
                },
                scope: DEFAULT_SCOPE.into()
            })
        );
        let doc = r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k","auth":{"type":"api_key"}}]}"#;
        assert_eq!(
            Config::from_json(doc).unwrap().instances[0].credential,
            BackendCredential::ApiKey(Secret::new("k"))
        );
    }

    #[test]
    fn names_the_auth_field_at_fault_without_echoing_secrets() {
        assert!(
            auth_err(r#"{"type":"managed_identity"}"#, true)
                .starts_with("instances[0].api_key: must not be set together")
        );
        assert!(
            auth_err(r#"{"type":"magic"}"#, false)
                .starts_with("instances[0].auth.type: unknown type")
        );
        assert!(
            auth_err(
                r#"{"type":"client_secret","client_id":"c","client_secret":"s"}"#,
                false
            )
            .starts_with("instances[0].auth.tenant_id: required")
        );
        assert!(
            auth_err(
                r#"{"type":"managed_identity","client_secret":"hush-123"}"#,
                false
            )
            .starts_with("instances[0].auth.client_secret: not used")
        );
        let e = auth_err(
            r#"{"type":"client_secret","tenant_id":"t","client_id":"c","client_secret":98765}"#,
            false,
        );
        assert!(e.starts_with("instances[0].auth.client_secret: "), "{e}");
        assert!(!e.contains("98765"), "{e}");
        assert!(
            auth_err(r#"{"type":"api_key"}"#, false).starts_with("instances[0].api_key: required")
        );
        assert!(
            auth_err(r#"{"type":"workload_identity","tenant_id":"a/b"}"#, false)
                .starts_with("instances[0].auth.tenant_id")
        );
        assert!(auth_err(r#"{"type":"managed_identity","scpoe":"x"}"#, false).contains("scpoe"));
        assert!(
            auth_err(
                r#"{"type":"client_certificate","tenant_id":"t","client_id":"c"}"#,
                false
            )
            .starts_with("instances[0].auth.certificate_path: required")
        );
        assert!(
            auth_err(
                r#"{"type":"client_certificate","tenant_id":"t","client_id":"c","certificate_path":"/p","client_secret":"s"}"#,
                false
            )
            .starts_with("instances[0].auth.client_secret: not used")
        );
    }

    #[test]
    fn reads_both_forms_of_deployments() {
        let doc = r#"{"instances":[
            {"name":"a","url":"https://a.example.com","api_key":"k","deployments":["gpt-4o"]},
            {"name":"b","url":"https://b.example.com","api_key":"k","deployments":{"gpt-4o":"gpt-4o-ptu"}}]}"#;
        let c = Config::from_json(doc).unwrap();
        assert_eq!(c.instances[0].backend_deployment("gpt-4o"), Some("gpt-4o"));
        assert_eq!(c.instances[0].backend_deployment("other"), None);
        assert_eq!(
            c.instances[1].backend_deployment("gpt-4o"),
            Some("gpt-4o-ptu")
        );
    }

    #[test]
    fn reads_lane_objects_next_to_plain_names() {
        let doc = r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k","deployments":{
            "gpt-4o":{"name":"gpt-4o-ptu","tpm":300000,"rpm":1800},
            "gpt-4o-2":{"name":"gpt-4o-ptu","tpm":300000,"rpm":1800},
            "mini":"gpt-4o-mini",
            "emb":{"name":"text-embedding-3-small"}}}],
            "routing":{"rate_limit_aware":false}}"#;
        let c = Config::from_json(doc).unwrap();
        let d = c.instances[0].deployments.as_ref().unwrap();
        assert_eq!(
            c.instances[0].backend_deployment("gpt-4o"),
            Some("gpt-4o-ptu")
        );
        assert_eq!(
            c.instances[0].backend_deployment("mini"),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            d.limits("gpt-4o-ptu"),
            crate::lane::LaneLimits {
                tpm: Some(300_000),
                rpm: Some(1800)
            }
        );
        assert_eq!(d.limits("gpt-4o-mini"), crate::lane::LaneLimits::default());
        assert_eq!(
            d.limits("text-embedding-3-small"),
            crate::lane::LaneLimits::default()
        );
        assert!(!c.routing.rate_limit_aware);
        assert!(Config::from_json(ONE).unwrap().routing.rate_limit_aware);
    }

    #[test]
    fn names_the_field_of_a_bad_lane_value() {
        let cases = [
            (
                r#"{"gpt-4o":{"name":"x","tpm":-5}}"#,
                r#"instances[0].deployments["gpt-4o"].tpm: "#,
            ),
            (
                r#"{"gpt-4o":{"name":"x","tpm":0}}"#,
                r#"instances[0].deployments["gpt-4o"].tpm: "#,
            ),
            (
                r#"{"gpt-4o":{"name":"x","rpm":"many"}}"#,
                r#"instances[0].deployments["gpt-4o"].rpm: "#,
            ),
            (
                r#"{"gpt-4o":{"name":"x","rpm":1.5}}"#,
                r#"instances[0].deployments["gpt-4o"].rpm: "#,
            ),
            (
                r#"{"gpt-4o":{"tpm":5}}"#,
                r#"instances[0].deployments["gpt-4o"].name: "#,
            ),
            (
                r#"{"gpt-4o":{"name":"a b"}}"#,
                r#"instances[0].deployments["gpt-4o"].name: "#,
            ),
            (
                r#"{"gpt-4o":{"name":"x","tpms":5}}"#,
                r#"instances[0].deployments["gpt-4o"].tpms: "#,
            ),
            (r#"{"gpt-4o":5}"#, r#"instances[0].deployments["gpt-4o"]: "#),
            (r#"[5]"#, r#"instances[0].deployments[0]: "#),
            (r#""gpt-4o""#, r#"instances[0].deployments: "#),
            (
                r#"{"a":{"name":"x","tpm":5},"b":{"name":"x","tpm":6}}"#,
                r#"instances[0].deployments["b"]: "#,
            ),
        ];
        for (deps, want) in cases {
            let doc = format!(
                r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k","deployments":{deps}}}]}}"#
            );
            let e = err(&doc);
            assert!(e.starts_with(want), "{deps}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = err(
            r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"}],"routing":{"rate_limit_aware":"yes"}}"#,
        );
        assert!(e.starts_with("routing.rate_limit_aware: "), "{e}");
    }

    #[test]
    fn reads_every_extension_field() {
        let doc = r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k","priority":2,"weight":0.5}],
            "timeouts":{"connect_ms":1,"response_headers_ms":2,"stream_idle_ms":3},
            "max_request_body_bytes":1024,
            "cooldown":{"default_ms":5,"max_ms":6},
            "circuit_breaker":{"failure_threshold":2,"open_ms":7,"max_open_ms":8},
            "server":{"max_connections":9,"header_read_timeout_ms":10,"keep_alive_timeout_ms":15,"max_headers":11,"drain_delay_ms":0,"shutdown_grace_ms":12},
            "upstream":{"pool_idle_timeout_ms":13,"pool_max_idle_per_host":14}}"#;
        let c = Config::from_json(doc).unwrap();
        assert_eq!(c.instances[0].priority, 2);
        assert_eq!(c.timeouts.stream_idle, Duration::from_millis(3));
        assert_eq!(c.max_request_body_bytes, 1024);
        assert_eq!(c.cooldown.max_ms, 6);
        assert_eq!(c.circuit_breaker.max_open_ms, 8);
        assert_eq!(c.server.max_headers, 11);
        assert_eq!(c.server.drain_delay, Duration::ZERO);
        assert_eq!(c.server.keep_alive_timeout, Duration::from_millis(15));
        assert_eq!(c.upstream.pool_max_idle_per_host, 14);
    }
}
