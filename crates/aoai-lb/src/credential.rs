//! Backend credentials: Microsoft Entra ID access tokens for instances that
//! do not take keys (`disableLocalAuth`), fetched, cached and refreshed in
//! the background.
//!
//! One [`TokenCache`] per distinct credential (type, identity, tenant,
//! secret, scope), shared by every instance configured with it. Its task
//! fetches a token at start and then shortly before each expiry:
//!
//! - refresh at `expires − 5 min`, or at half the lifetime when that is
//!   later (short tokens) or when the token lives 2 h or more (managed
//!   identities, as MSAL does);
//! - on failure, retry after 1 s, doubling to 30 s, with jitter; the
//!   current token stays in use while it is valid;
//! - requests never wait for a fetch, except the very first ones (before
//!   any fetch has completed) and a replay after a backend 401
//!   ([`TokenCache::refresh_after_401`]);
//! - errors are logged once per change of state, never per request, and
//!   never with a token;
//! - `aoai_lb_token_refreshes_total`, `aoai_lb_token_refresh_failures_total`
//!   and `aoai_lb_token_expires_in_seconds`, each labelled `credential`.
//!
//! Where a token comes from ([`Source`]), as the Azure SDKs decide it:
//!
//! | `auth.type` | Source |
//! |---|---|
//! | `managed_identity` | `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` (Container Apps, App Service) when both are set, else IMDS at `AZURE_POD_IDENTITY_AUTHORITY_HOST` or `http://169.254.169.254` |
//! | `workload_identity` | `POST {authority}/{AZURE_TENANT_ID}/oauth2/v2.0/token` with the file `AZURE_FEDERATED_TOKEN_FILE` as client assertion, re-read on every fetch |
//! | `client_secret` | the same token endpoint with a client secret |
//! | `client_certificate` | the same token endpoint with a PS256 assertion signed by the certificate's key ([`crate::client_cert`]); the PEM file is read again on every fetch |
//!
//! The authority is `AZURE_AUTHORITY_HOST` or `https://login.microsoftonline.com`;
//! plain `http://` is accepted only for a loopback host.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::secret::Secret;
use crate::upstream::UpstreamClient;

/// The scope of Azure OpenAI data-plane tokens.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// The public-cloud Entra ID authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The Azure Instance Metadata Service.
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";

/// Longest wait for one token fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token endpoint answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;
/// First retry delay after a failed fetch; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay after failed fetches.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A forced refresh (after a backend 401) at most this often per credential:
/// a principal without the role gets 401 on every request, and fresh tokens
/// do not change that.
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// An instance's Entra credential as configured (`auth` of an instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialConfig {
    /// A system-assigned identity, or the user-assigned one with this client id.
    ManagedIdentity {
        /// Client id of a user-assigned identity; `None`: system-assigned.
        client_id: Option<String>,
    },
    /// AKS workload identity; unset fields come from `AZURE_CLIENT_ID` and
    /// `AZURE_TENANT_ID`.
    WorkloadIdentity {
        /// Overrides `AZURE_CLIENT_ID`.
        client_id: Option<String>,
        /// Overrides `AZURE_TENANT_ID`.
        tenant_id: Option<String>,
    },
    /// An app registration with a client secret.
    ClientSecret {
        /// Directory (tenant) id or domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The secret value; never printed.
        client_secret: Secret,
    },
    /// An app registration with a certificate: a PEM file holding the
    /// certificate and its unencrypted RSA private key.
    ClientCertificate {
        /// Directory (tenant) id or domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The PEM file; read again on every fetch, so a renewed
        /// certificate written over it is picked up at the next refresh.
        certificate_path: PathBuf,
    },
}

impl CredentialConfig {
    /// The `type` name in the document.
    pub fn type_name(&self) -> &'static str {
        match self {
            CredentialConfig::ManagedIdentity { .. } => "managed_identity",
            CredentialConfig::WorkloadIdentity { .. } => "workload_identity",
            CredentialConfig::ClientSecret { .. } => "client_secret",
            CredentialConfig::ClientCertificate { .. } => "client_certificate",
        }
    }
}

/// A token credential with its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// Where tokens come from.
    pub credential: CredentialConfig,
    /// The scope asked for; default [`DEFAULT_SCOPE`].
    pub scope: String,
}

/// The Azure identity environment variables the credentials read, captured
/// once (the process environment by default; tests pass their own).
#[derive(Clone, Default)]
pub struct AzureEnv {
    vars: BTreeMap<String, String>,
}

/// The variables [`AzureEnv::from_process`] captures.
pub const AZURE_ENV_VARS: [&str; 7] = [
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
];

impl AzureEnv {
    /// The [`AZURE_ENV_VARS`] of this process.
    pub fn from_process() -> Self {
        Self::from_pairs(
            AZURE_ENV_VARS
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
        )
    }

    /// An environment with exactly these variables.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value; empty counts as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }
}

impl std::fmt::Debug for AzureEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: IDENTITY_HEADER is a secret.
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// Where one credential's tokens come from, resolved against the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Container Apps / App Service: `GET {endpoint}?api-version=2019-08-01`
    /// with `X-IDENTITY-HEADER`.
    AppService {
        /// `IDENTITY_ENDPOINT`.
        endpoint: String,
        /// `IDENTITY_HEADER`.
        header: Secret,
        /// A user-assigned identity.
        client_id: Option<String>,
    },
    /// IMDS: `GET {base}/metadata/identity/oauth2/token` with `Metadata: true`.
    Imds {
        /// `http://169.254.169.254` or `AZURE_POD_IDENTITY_AUTHORITY_HOST`.
        base: String,
        /// A user-assigned identity.
        client_id: Option<String>,
    },
    /// Entra ID client credentials at `token_url`.
    Entra {
        /// `{authority}/{tenant}/oauth2/v2.0/token`.
        token_url: String,
        /// Application (client) id.
        client_id: String,
        /// A secret, or the file holding a federated assertion.
        proof: Proof,
    },
}

/// How a client proves itself to the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// `client_secret`.
    Secret(Secret),
    /// `client_assertion` read from this file on every fetch.
    AssertionFile(PathBuf),
    /// `client_assertion` signed with the certificate key in this PEM file,
    /// read on every fetch.
    Certificate(PathBuf),
}

/// Resolves `auth` against `env`.
///
/// # Errors
/// A one-line reason naming the missing or bad variable or field.
pub fn resolve(auth: &TokenAuth, env: &AzureEnv) -> Result<Source, String> {
    match &auth.credential {
        CredentialConfig::ManagedIdentity { client_id } => {
            if let (Some(endpoint), Some(h)) =
                (env.get("IDENTITY_ENDPOINT"), env.get("IDENTITY_HEADER"))
            {
                let u = url::Url::parse(endpoint)
                    .map_err(|e| format!("IDENTITY_ENDPOINT is not a URL ({e})"))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err("IDENTITY_ENDPOINT must be an http(s) URL".to_owned());
                }
                return Ok(Source::AppService {
                    endpoint: endpoint.to_owned(),
                    header: Secret::new(h),
                    client_id: client_id.clone(),
                });
            }
            let base = env
                .get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
                .unwrap_or(DEFAULT_IMDS)
                .trim_end_matches('/')
                .to_owned();
            url::Url::parse(&base)
                .map_err(|e| format!("AZURE_POD_IDENTITY_AUTHORITY_HOST is not a URL ({e})"))?;
            Ok(Source::Imds {
                base,
                client_id: client_id.clone(),
            })
        }
        CredentialConfig::WorkloadIdentity {
            client_id,
            tenant_id,
        } => {
            let file = env.get("AZURE_FEDERATED_TOKEN_FILE").ok_or(
                "AZURE_FEDERATED_TOKEN_FILE is not set (is the pod labelled azure.workload.identity/use: \"true\"?)",
            )?;
            let client_id = match client_id {
                Some(c) => c.clone(),
                None => env
                    .get("AZURE_CLIENT_ID")
                    .ok_or("AZURE_CLIENT_ID is not set and auth.client_id is not given")?
                    .to_owned(),
            };
            let tenant_id = match tenant_id {
                Some(t) => t.clone(),
                None => env
                    .get("AZURE_TENANT_ID")
                    .ok_or("AZURE_TENANT_ID is not set and auth.tenant_id is not given")?
                    .to_owned(),
            };
            Ok(Source::Entra {
                token_url: token_url(env, &tenant_id)?,
                client_id,
                proof: Proof::AssertionFile(PathBuf::from(file)),
            })
        }
        CredentialConfig::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
        } => Ok(Source::Entra {
            token_url: token_url(env, tenant_id)?,
            client_id: client_id.clone(),
            proof: Proof::Secret(client_secret.clone()),
        }),
        CredentialConfig::ClientCertificate {
            tenant_id,
            client_id,
            certificate_path,
        } => {
            // Checked once here so a bad file stops start-up (or a reload)
            // with one line, instead of only failing every fetch.
            let pem = std::fs::read(certificate_path).map_err(|e| {
                format!(
                    "certificate_path {}: cannot read ({})",
                    certificate_path.display(),
                    e.kind()
                )
            })?;
            crate::client_cert::CertificateKey::from_pem(&pem)
                .map_err(|e| format!("certificate_path {}: {e}", certificate_path.display()))?;
            Ok(Source::Entra {
                token_url: token_url(env, tenant_id)?,
                client_id: client_id.clone(),
                proof: Proof::Certificate(certificate_path.clone()),
            })
        }
    }
}

/// The authority: `AZURE_AUTHORITY_HOST` or [`DEFAULT_AUTHORITY`], https
/// only except on a loopback host (how tests reach a simulator).
///
/// # Errors
/// A reason naming `AZURE_AUTHORITY_HOST`.
pub fn authority(env: &AzureEnv) -> Result<String, String> {
    let text = env.get("AZURE_AUTHORITY_HOST").unwrap_or(DEFAULT_AUTHORITY);
    let u =
        url::Url::parse(text).map_err(|e| format!("AZURE_AUTHORITY_HOST is not a URL ({e})"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(&u) => {}
        "http" => {
            return Err(
                "AZURE_AUTHORITY_HOST must use https (plain http only for a loopback address)"
                    .to_owned(),
            );
        }
        other => {
            return Err(format!(
                "AZURE_AUTHORITY_HOST: unsupported scheme {other:?}"
            ));
        }
    }
    // The webhook writes a trailing slash; paths are joined after it.
    Ok(text.trim_end_matches('/').to_owned())
}

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// A tenant goes into a URL path: a GUID or a domain name, nothing else.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn token_url(env: &AzureEnv, tenant: &str) -> Result<String, String> {
    if !valid_tenant(tenant) {
        return Err("the tenant id must be a GUID or a domain name".to_owned());
    }
    Ok(format!("{}/{tenant}/oauth2/v2.0/token", authority(env)?))
}

/// `https://cognitiveservices.azure.com/.default` → the bare resource, as
/// the managed-identity endpoints want it.
fn resource_of(scope: &str) -> &str {
    scope.strip_suffix("/.default").unwrap_or(scope)
}

/// The `credential` metric label: type and client id (never a secret),
/// plus the scope when it is not the default one.
pub fn label(auth: &TokenAuth, env: &AzureEnv) -> String {
    let who = match &auth.credential {
        CredentialConfig::ManagedIdentity { client_id } => {
            client_id.clone().unwrap_or_else(|| "system".to_owned())
        }
        CredentialConfig::WorkloadIdentity { client_id, .. } => client_id
            .clone()
            .or_else(|| env.get("AZURE_CLIENT_ID").map(str::to_owned))
            .unwrap_or_default(),
        CredentialConfig::ClientSecret { client_id, .. }
        | CredentialConfig::ClientCertificate { client_id, .. } => client_id.clone(),
    };
    let mut l = format!("{}:{who}", auth.credential.type_name());
    if auth.scope != DEFAULT_SCOPE {
        l.push(':');
        l.push_str(&auth.scope);
    }
    l
}

/// One access token as the cache holds it.
pub struct Token {
    /// `Bearer <token>`, marked sensitive.
    pub header: HeaderValue,
    /// Unix ms after which the token must not be sent.
    pub usable_until_ms: u64,
    /// Unix ms of `exp`.
    pub expires_at_ms: u64,
    /// Counts fetched tokens; a replay after a 401 needs a newer one.
    pub generation: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The state of a credential, for the admin output and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// No fetch has completed yet.
    Pending,
    /// The last fetch succeeded.
    Ok,
    /// The last fetch failed.
    Failing,
}

#[derive(Clone)]
struct Snapshot {
    token: Option<Arc<Token>>,
    state: TokenState,
    last_error: Option<Arc<str>>,
    /// Bumped on every completed fetch, success or not.
    fetches: u64,
}

/// Why a fetch failed. `Display` never contains a token or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The endpoint answered with an error status.
    #[error("{endpoint} answered HTTP {status}{detail}")]
    Status {
        /// Which kind of endpoint.
        endpoint: &'static str,
        /// The status.
        status: u16,
        /// `: error (AADSTS…)` or the managed-identity message, when given.
        detail: String,
    },
    /// No answer (connection refused, reset, timeout).
    #[error("cannot reach the {endpoint}: {reason}")]
    Unreachable {
        /// Which kind of endpoint.
        endpoint: &'static str,
        /// Why.
        reason: String,
    },
    /// A 200 without a usable token.
    #[error("the {0} answered without a usable access_token")]
    BadAnswer(&'static str),
    /// The federated token file could not be read.
    #[error("cannot read AZURE_FEDERATED_TOKEN_FILE {path}: {reason}")]
    AssertionFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The certificate file could not be read or used to sign.
    #[error("cannot use the certificate file {path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// Why (never key material).
        reason: String,
    },
}

struct CacheMetrics {
    refreshes: metrics::Counter,
    failures: metrics::Counter,
    expires_in: metrics::Gauge,
}

/// The token cache of one credential; see the module documentation.
pub struct TokenCache {
    /// The `credential` label (type and client id).
    pub label: String,
    /// Names of the instances using it, for log lines.
    pub instances: Vec<String>,
    source: Source,
    scope: String,
    client: UpstreamClient,
    tx: watch::Sender<Snapshot>,
    wake: Notify,
    next_generation: AtomicU64,
    /// Unix ms of the last forced refresh.
    last_forced_ms: AtomicU64,
    metrics: OnceLock<CacheMetrics>,
    log_state: Mutex<Option<Arc<str>>>,
    _stop: DropGuard,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("label", &self.label)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When to refresh a token of `lifetime`: 5 minutes before expiry, or at
/// half-life when that is later (short tokens) or when the token lives 2 h
/// or more (as MSAL does for managed identities).
pub fn refresh_after(lifetime: Duration) -> Duration {
    let half = lifetime / 2;
    if lifetime >= Duration::from_secs(7200) {
        return half;
    }
    lifetime.saturating_sub(Duration::from_secs(300)).max(half)
}

/// How long before `exp` a token stops being sent: a tenth of its
/// lifetime, at most 30 s, so it cannot expire on the way.
fn send_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(30))
}

impl TokenCache {
    /// A cache for `source` used by `instances`. Its refresh task starts at
    /// once; outside a Tokio runtime there is none and the cache stays
    /// pending (only unit tests build a gateway there).
    pub fn new(
        label: String,
        instances: Vec<String>,
        source: Source,
        scope: String,
        client: UpstreamClient,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(Snapshot {
            token: None,
            state: TokenState::Pending,
            last_error: None,
            fetches: 0,
        });
        let stop = CancellationToken::new();
        let cache = Arc::new(Self {
            label,
            instances,
            source,
            scope,
            client,
            tx,
            wake: Notify::new(),
            next_generation: AtomicU64::new(1),
            last_forced_ms: AtomicU64::new(0),
            metrics: OnceLock::new(),
            log_state: Mutex::new(None),
            _stop: stop.clone().drop_guard(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresh_loop(Arc::downgrade(&cache), stop));
        }
        cache
    }

    fn metrics(&self) -> &CacheMetrics {
        self.metrics.get_or_init(|| CacheMetrics {
            refreshes: metrics::counter!("aoai_lb_token_refreshes_total", "credential" => self.label.clone()),
            failures: metrics::counter!("aoai_lb_token_refresh_failures_total", "credential" => self.label.clone()),
            expires_in: metrics::gauge!("aoai_lb_token_expires_in_seconds", "credential" => self.label.clone()),
        })
    }

    /// The token to send now, if one is valid.
    pub fn current(&self) -> Option<Arc<Token>> {
        let now = unix_ms();
        self.tx
            .borrow()
            .token
            .as_ref()
            .filter(|t| now < t.usable_until_ms)
            .cloned()
    }

    /// The credential's state.
    pub fn state(&self) -> TokenState {
        self.tx.borrow().state
    }

    /// The last fetch error, if the last fetch failed.
    pub fn last_error(&self) -> Option<Arc<str>> {
        let s = self.tx.borrow();
        (s.state == TokenState::Failing)
            .then(|| s.last_error.clone())
            .flatten()
    }

    /// Seconds until the current token expires (0 without one).
    pub fn expires_in_secs(&self) -> u64 {
        let now = unix_ms();
        self.tx
            .borrow()
            .token
            .as_ref()
            .map_or(0, |t| t.expires_at_ms.saturating_sub(now) / 1000)
    }

    /// Whether an instance using this credential can take a request: it
    /// has a valid token, or the first fetch is still under way (the first
    /// requests wait for it).
    pub fn usable(&self) -> bool {
        self.state() == TokenState::Pending || self.current().is_some()
    }

    /// Why an instance using this credential is unavailable, if it is.
    pub fn unavailable_reason(&self) -> Option<String> {
        if self.usable() {
            return None;
        }
        Some(match self.last_error() {
            Some(e) => format!("no valid Entra ID token ({}): {e}", self.label),
            None => format!("no valid Entra ID token ({})", self.label),
        })
    }

    /// The token to send. Waits (up to `wait`) only while the first fetch
    /// is under way; `None` when there is no valid token.
    pub async fn bearer(&self, wait: Duration) -> Option<Arc<Token>> {
        if let Some(t) = self.current() {
            return Some(t);
        }
        let mut rx = self.tx.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.state != TokenState::Pending)).await;
        self.current()
    }

    /// After a backend answered 401 to `sent`: a newer token, fetching one
    /// (waiting up to `wait`) unless another request already did. `None`
    /// when no different token can be had, or a forced refresh ran less
    /// than 10 s ago (then the 401 is not about token age).
    pub async fn refresh_after_401(&self, sent: &Token, wait: Duration) -> Option<Arc<Token>> {
        if let Some(t) = self.current()
            && t.generation > sent.generation
        {
            return (t.header != sent.header).then_some(t);
        }
        let now = unix_ms();
        let last = self.last_forced_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FORCED_REFRESH_INTERVAL.as_millis() as u64
            || self
                .last_forced_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let mut rx = self.tx.subscribe();
        let before = rx.borrow_and_update().fetches;
        self.wake.notify_one();
        let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.fetches > before)).await;
        self.current()
            .filter(|t| t.generation > sent.generation && t.header != sent.header)
    }

    fn store_ok(&self, token: String, expires_at_ms: u64) -> Result<Duration, FetchError> {
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| FetchError::BadAnswer("token endpoint"))?;
        header.set_sensitive(true);
        let now = unix_ms();
        let lifetime = Duration::from_millis(expires_at_ms.saturating_sub(now));
        let usable_until_ms =
            expires_at_ms.saturating_sub(send_margin(lifetime).as_millis() as u64);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let was = self.tx.borrow().state;
        self.tx.send_modify(|s| {
            s.token = Some(Arc::new(Token {
                header,
                usable_until_ms,
                expires_at_ms,
                generation,
            }));
            s.state = TokenState::Ok;
            s.last_error = None;
            s.fetches += 1;
        });
        let m = self.metrics();
        m.refreshes.increment(1);
        m.expires_in.set(lifetime.as_secs_f64());
        let refresh_in = refresh_after(lifetime);
        if was != TokenState::Ok {
            *lock(&self.log_state) = None;
            tracing::info!(
                credential = %self.label,
                instances = %self.instances.join(","),
                expires_in_s = lifetime.as_secs(),
                "Entra ID token acquired; the instances using it are available"
            );
        } else {
            tracing::debug!(credential = %self.label, expires_in_s = lifetime.as_secs(), "Entra ID token refreshed");
        }
        Ok(refresh_in)
    }

    fn store_err(&self, e: &FetchError) {
        let text: Arc<str> = Arc::from(e.to_string());
        self.tx.send_modify(|s| {
            s.state = TokenState::Failing;
            s.last_error = Some(text.clone());
            s.fetches += 1;
        });
        self.metrics().failures.increment(1);
        let mut logged = lock(&self.log_state);
        if logged.as_deref() == Some(&*text) {
            return;
        }
        *logged = Some(text.clone());
        match self.current() {
            Some(_) => tracing::warn!(
                credential = %self.label,
                instances = %self.instances.join(","),
                error = %text,
                valid_for_s = self.expires_in_secs(),
                "Entra ID token refresh failed; still using the current token while it is valid, retrying with backoff"
            ),
            None => tracing::error!(
                credential = %self.label,
                instances = %self.instances.join(","),
                error = %text,
                "no Entra ID token: these instances are unavailable until a token arrives; retrying with backoff"
            ),
        }
    }

    /// One fetch from the source: the token and its expiry (Unix ms).
    async fn fetch(&self) -> Result<(String, u64), FetchError> {
        let resource = resource_of(&self.scope);
        let (req, endpoint) = match &self.source {
            Source::AppService {
                endpoint,
                header,
                client_id,
            } => {
                let mut u = format!(
                    "{endpoint}{}api-version=2019-08-01&resource={}",
                    if endpoint.contains('?') { '&' } else { '?' },
                    enc(resource)
                );
                if let Some(c) = client_id {
                    u.push_str("&client_id=");
                    u.push_str(&enc(c));
                }
                let mut h = HeaderValue::from_str(header.expose()).map_err(|_| {
                    FetchError::BadAnswer("managed identity endpoint (bad IDENTITY_HEADER)")
                })?;
                h.set_sensitive(true);
                let req = Request::builder()
                    .method(Method::GET)
                    .uri(u)
                    .header("x-identity-header", h)
                    .body(Full::new(Bytes::new()));
                (req, "managed identity endpoint")
            }
            Source::Imds { base, client_id } => {
                let mut u = format!(
                    "{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
                    enc(resource)
                );
                if let Some(c) = client_id {
                    u.push_str("&client_id=");
                    u.push_str(&enc(c));
                }
                let req = Request::builder()
                    .method(Method::GET)
                    .uri(u)
                    .header("metadata", "true")
                    .body(Full::new(Bytes::new()));
                (req, "IMDS")
            }
            Source::Entra {
                token_url,
                client_id,
                proof,
            } => {
                // Re-read on every fetch: the kubelet rotates the file.
                let assertion = match proof {
                    Proof::Secret(_) => None,
                    Proof::AssertionFile(path) => {
                        Some(tokio::fs::read_to_string(path).await.map_err(|e| {
                            FetchError::AssertionFile {
                                path: path.display().to_string(),
                                reason: e.kind().to_string(),
                            }
                        })?)
                    }
                    Proof::Certificate(path) => {
                        let failed = |reason: String| FetchError::Certificate {
                            path: path.display().to_string(),
                            reason,
                        };
                        let pem = tokio::fs::read(path)
                            .await
                            .map_err(|e| failed(e.kind().to_string()))?;
                        let key = crate::client_cert::CertificateKey::from_pem(&pem)
                            .map_err(|e| failed(e.to_string()))?;
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        Some(
                            key.assertion(client_id, token_url, now)
                                .map_err(|e| failed(e.to_string()))?,
                        )
                    }
                };
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", client_id)
                    .append_pair("scope", &self.scope);
                match (proof, &assertion) {
                    (Proof::Secret(s), _) => {
                        form.append_pair("client_secret", s.expose());
                    }
                    (Proof::AssertionFile(_) | Proof::Certificate(_), a) => {
                        form.append_pair(
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        )
                        .append_pair("client_assertion", a.as_deref().unwrap_or("").trim());
                    }
                }
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(token_url.as_str())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(form.finish())));
                (req, "token endpoint")
            }
        };
        let req = req.map_err(|_| FetchError::BadAnswer(endpoint))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| FetchError::Unreachable {
                endpoint,
                reason: connect_reason(&e),
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_TOKEN_BODY)
            .collect()
            .await
            .map_err(|_| FetchError::Unreachable {
                endpoint,
                reason: "the answer broke off or was too large".to_owned(),
            })?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                endpoint,
                status: status.as_u16(),
                detail: error_detail(&json),
            });
        }
        parse_token(&json, unix_ms()).ok_or(FetchError::BadAnswer(endpoint))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A connection error in words, without the URL (which can hold a query).
fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind().to_string();
        }
        src = s.source();
    }
    if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "the connection broke before an answer".to_owned()
    }
}

/// `: invalid_client (AADSTS7000215)` from an Entra error, or the message
/// of a managed-identity error; never the description (it can be long) nor
/// anything token-like.
fn error_detail(j: &serde_json::Value) -> String {
    let error = j.get("error").and_then(|e| e.as_str());
    let code = j
        .get("error_codes")
        .and_then(|c| c.get(0))
        .and_then(serde_json::Value::as_u64);
    let message = j.get("message").and_then(|m| m.as_str());
    match (error, code, message) {
        (Some(e), Some(c), _) => format!(": {e} (AADSTS{c})"),
        (Some(e), None, _) => format!(": {e}"),
        (None, _, Some(m)) if m.len() <= 200 => format!(": {m}"),
        _ => String::new(),
    }
}

/// A number or a string of digits (managed identities send strings).
fn num(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The token and its expiry (Unix ms) from a token answer: `expires_on`
/// (epoch seconds, number or string), else `now + expires_in`, else the
/// JWT's `exp`, else one hour.
fn parse_token(j: &serde_json::Value, now_ms: u64) -> Option<(String, u64)> {
    let token = j.get("access_token")?.as_str()?.to_owned();
    if token.is_empty() {
        return None;
    }
    let expires_at_ms = num(j.get("expires_on"))
        .map(|s| s.saturating_mul(1000))
        .or_else(|| num(j.get("expires_in")).map(|s| now_ms + s.saturating_mul(1000)))
        .or_else(|| crate::jwt::unverified_exp(&token).map(|s| s.saturating_mul(1000)))
        .unwrap_or(now_ms + 3_600_000);
    Some((token, expires_at_ms))
}

async fn refresh_loop(cache: Weak<TokenCache>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(c) = cache.upgrade() else { return };
        let fetched = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(FETCH_TIMEOUT, c.fetch()) => r,
        };
        let result = fetched.unwrap_or_else(|_| {
            Err(FetchError::Unreachable {
                endpoint: "token endpoint",
                reason: "no answer within 30 s".to_owned(),
            })
        });
        let wait = match result.and_then(|(t, exp)| c.store_ok(t, exp)) {
            Ok(refresh_in) => {
                backoff = MIN_BACKOFF;
                // Up to 10 % earlier, so replicas started together spread out.
                refresh_in.mul_f64(1.0 - 0.1 * fastrand::f64())
            }
            Err(e) => {
                c.store_err(&e);
                let w = backoff.mul_f64(0.8 + 0.4 * fastrand::f64());
                backoff = (backoff * 2).min(MAX_BACKOFF);
                w
            }
        };
        let woken = async {
            c.wake.notified().await;
        };
        let stopped = stop.clone();
        tokio::select! {
            () = stopped.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = woken => {}
        }
        drop(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_five_minutes_ahead_or_at_half_life() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(s(3599)), s(3299));
        assert_eq!(refresh_after(s(86_400)), s(43_200));
        assert_eq!(refresh_after(s(7200)), s(3600));
        assert_eq!(refresh_after(s(6)), s(3));
        assert_eq!(refresh_after(s(500)), s(250));
    }

    #[test]
    fn reads_expiry_as_number_or_string_or_from_the_token() {
        let now = 1_000_000;
        let j = serde_json::json!({"access_token": "t", "expires_on": "1700"});
        assert_eq!(parse_token(&j, now), Some(("t".into(), 1_700_000)));
        let j = serde_json::json!({"access_token": "t", "expires_in": 60});
        assert_eq!(parse_token(&j, now), Some(("t".into(), 1_060_000)));
        let j = serde_json::json!({"access_token": "t", "expires_in": "60"});
        assert_eq!(parse_token(&j, now), Some(("t".into(), 1_060_000)));
        let j = serde_json::json!({"access_token": "t"});
        assert_eq!(parse_token(&j, now), Some(("t".into(), 4_600_000)));
        assert_eq!(
            parse_token(&serde_json::json!({"access_token": ""}), now),
            None
        );
        assert_eq!(parse_token(&serde_json::json!({}), now), None);
    }

    #[test]
    fn error_details_name_the_code_and_never_the_description() {
        let j = serde_json::json!({"error":"invalid_client","error_description":"AADSTS7000215: secret","error_codes":[7000215]});
        assert_eq!(error_detail(&j), ": invalid_client (AADSTS7000215)");
        let j = serde_json::json!({"statusCode":400,"message":"Unable to load the proper Managed Identity."});
        assert_eq!(
            error_detail(&j),
            ": Unable to load the proper Managed Identity."
        );
        assert_eq!(error_detail(&serde_json::Value::Null), "");
    }

    fn mi() -> TokenAuth {
        TokenAuth {
            credential: CredentialConfig::ManagedIdentity { client_id: None },
            scope: DEFAULT_SCOPE.to_owned(),
        }
    }

    #[test]
    fn managed_identity_prefers_the_identity_endpoint_then_imds() {
        let env = AzureEnv::from_pairs([
            ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
            ("IDENTITY_HEADER", "h"),
        ]);
        assert!(matches!(
            resolve(&mi(), &env),
            Ok(Source::AppService { .. })
        ));
        let env = AzureEnv::from_pairs([("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token")]);
        assert_eq!(
            resolve(&mi(), &env),
            Ok(Source::Imds {
                base: DEFAULT_IMDS.into(),
                client_id: None
            })
        );
        let env =
            AzureEnv::from_pairs([("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9/")]);
        assert!(
            matches!(resolve(&mi(), &env), Ok(Source::Imds { base, .. }) if base == "http://127.0.0.1:9")
        );
    }

    #[test]
    fn the_authority_is_https_except_on_loopback() {
        let a = |v: &str| authority(&AzureEnv::from_pairs([("AZURE_AUTHORITY_HOST", v)]));
        assert_eq!(authority(&AzureEnv::default()).unwrap(), DEFAULT_AUTHORITY);
        assert_eq!(
            a("https://login.microsoftonline.us/").unwrap(),
            "https://login.microsoftonline.us"
        );
        assert!(a("http://127.0.0.1:8080").is_ok());
        assert!(a("http://[::1]:8080").is_ok());
        assert!(a("http://localhost:8080").is_ok());
        assert!(a("http://login.example.com").is_err());
        assert!(a("http://10.0.0.1").is_err());
    }

    #[test]
    fn workload_identity_needs_its_variables() {
        let wi = TokenAuth {
            credential: CredentialConfig::WorkloadIdentity {
                client_id: None,
                tenant_id: None,
            },
            scope: DEFAULT_SCOPE.to_owned(),
        };
        let e = resolve(&wi, &AzureEnv::default()).unwrap_err();
        assert!(e.contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
        let env = AzureEnv::from_pairs([
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t/../x"),
        ]);
        assert!(resolve(&wi, &env).unwrap_err().contains("tenant"));
        let env = AzureEnv::from_pairs([
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ]);
        assert_eq!(
            resolve(&wi, &env),
            Ok(Source::Entra {
                token_url: "https://login.microsoftonline.com/t/oauth2/v2.0/token".into(),
                client_id: "c".into(),
                proof: Proof::AssertionFile("/var/run/token".into()),
            })
        );
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let env = AzureEnv::from_pairs([("IDENTITY_HEADER", "very-secret-header")]);
        assert!(!format!("{env:?}").contains("very-secret-header"));
        let src = resolve(
            &TokenAuth {
                credential: CredentialConfig::ClientSecret {
                    tenant_id: "t".into(),
                    client_id: "c".into(),
                    client_secret: Secret::new("very-secret-value"),
                },
                scope: DEFAULT_SCOPE.into(),
            },
            &AzureEnv::default(),
        )
        .unwrap();
        assert!(!format!("{src:?}").contains("very-secret-value"));
    }
}
