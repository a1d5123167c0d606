//! A simulated Microsoft Entra ID and managed-identity host on its own port,
//! so credential flows can be tested offline against the wire formats the
//! Azure SDKs see:
//!
//! | Route | Stands for |
//! |---|---|
//! | `GET /msi/token` (`X-IDENTITY-HEADER`) | Container Apps / App Service `IDENTITY_ENDPOINT` |
//! | `GET /metadata/identity/oauth2/token` (`Metadata: true`) | VM IMDS (`169.254.169.254`) |
//! | `POST /{tenant}/oauth2/v2.0/token` | client credentials: secret, federated assertion or certificate assertion |
//! | `GET /{tenant}/discovery/v2.0/keys`, `/{tenant}/discovery/keys` | the tenant's JWKS |
//! | `GET /{tenant}/v2.0/.well-known/openid-configuration` | OpenID metadata |
//! | `POST /_sim/mint` | a client token for tests (body: a [`ClientToken`]) |
//!
//! Tokens are RS256 JWTs signed with the committed test keys ([`SigningKey`]),
//! v1-shaped as managed identities issue them (`iss` `https://sts.windows.net/{tid}/`,
//! `appid`, `oid`, `tid`). Lifetimes are settable down to one second.
//! Failures are switchable at run time: any status on the token routes, a
//! key rotation, a new `X-IDENTITY-HEADER`, a rotated federated assertion.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::azure::{unix_now, uuid};
use crate::body::SimBody;
pub use crate::jwt::SigningKey;
use crate::server::SimError;

/// The simulated tenant's id.
pub const SIM_TENANT_ID: &str = "9c1c4e5a-7d0b-4c6e-9a43-5e1f2b3c4d5e";
/// The Azure OpenAI resource (`aud` of data-plane tokens).
pub const COGNITIVE_SERVICES_RESOURCE: &str = "https://cognitiveservices.azure.com";
/// Client id of the system-assigned managed identity.
pub const SYSTEM_IDENTITY_CLIENT_ID: &str = "1a2b3c4d-0000-4000-8000-5157e3a55160";
/// `X-IDENTITY-HEADER` value expected unless configured otherwise.
pub const DEFAULT_IDENTITY_HEADER: &str = "sim-identity-header";
/// The `client_assertion_type` of a federated or certificate assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Start-up settings of the identity host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The tenant served; other tenants get `AADSTS90002`. Default [`SIM_TENANT_ID`].
    pub tenant_id: String,
    /// Lifetime of issued tokens in seconds. Default 3599, as Entra's `expires_in`.
    pub token_lifetime_secs: u64,
    /// The expected `X-IDENTITY-HEADER`. Default [`DEFAULT_IDENTITY_HEADER`].
    pub identity_header: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            tenant_id: SIM_TENANT_ID.to_owned(),
            token_lifetime_secs: 3599,
            identity_header: DEFAULT_IDENTITY_HEADER.to_owned(),
        }
    }
}

/// Claims of a client token minted for tests with [`IdentityHandle::mint`].
///
/// Defaults: the simulated tenant, audience [`COGNITIVE_SERVICES_RESOURCE`],
/// a v1 token (as `azure_ad_token_provider` obtains), valid for an hour,
/// signed with the current key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientToken {
    /// `tid`, and the tenant in `iss`.
    pub tenant_id: String,
    /// `aud`.
    pub audience: String,
    /// `appid` (v1) or `azp` (v2).
    pub app_id: String,
    /// `oid` and `sub`.
    pub object_id: String,
    /// 1 or 2: the issuer form and the claim naming the app.
    pub version: u8,
    /// Seconds from now to `exp`; negative for an expired token.
    pub expires_in_secs: i64,
    /// Seconds from now to `nbf` (positive: not yet valid).
    pub not_before_in_secs: i64,
    /// Overrides the issuer derived from the tenant and version.
    pub issuer: Option<String>,
    /// The signing key; `None` uses the host's current key.
    pub key: Option<SigningKey>,
}

impl Default for ClientToken {
    fn default() -> Self {
        Self {
            tenant_id: SIM_TENANT_ID.to_owned(),
            audience: COGNITIVE_SERVICES_RESOURCE.to_owned(),
            app_id: "0c0ffee0-0000-4000-8000-00000000c11e".to_owned(),
            object_id: "0b1ec700-0000-4000-8000-00000000c11e".to_owned(),
            version: 1,
            expires_in_secs: 3600,
            not_before_in_secs: 0,
            issuer: None,
            key: None,
        }
    }
}

/// Counts of requests per route, for "how many token fetches" assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IdentityCounts {
    /// `GET /msi/token` requests (any outcome).
    pub msi: u64,
    /// IMDS requests (any outcome).
    pub imds: u64,
    /// `POST /{tenant}/oauth2/v2.0/token` requests (any outcome).
    pub aad: u64,
    /// JWKS requests.
    pub jwks: u64,
    /// Tokens issued on any route (mints excluded).
    pub issued: u64,
}

struct State {
    cfg: IdentityConfig,
    lifetime_secs: AtomicU64,
    identity_header: Mutex<String>,
    current: Mutex<SigningKey>,
    published: Mutex<Vec<SigningKey>>,
    /// Status answered by the token routes, with how many times (None = until cleared).
    failure: Mutex<Option<(u16, Option<u32>)>>,
    secrets: Mutex<HashMap<String, String>>,
    assertions: Mutex<HashMap<String, String>>,
    /// Certificate credentials: client id → (RSAPublicKey DER, `x5t#S256`).
    certificates: Mutex<HashMap<String, (Vec<u8>, String)>>,
    user_assigned: Mutex<Vec<String>>,
    /// Milliseconds every token route waits before answering.
    delay_ms: AtomicU64,
    msi: AtomicU64,
    imds: AtomicU64,
    aad: AtomicU64,
    jwks: AtomicU64,
    issued: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running identity host. Cheap to clone; [`IdentityHandle::stop`] stops it.
#[derive(Clone)]
pub struct IdentityHandle {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for IdentityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl IdentityHandle {
    /// `http://127.0.0.1:PORT`: the authority host (`AZURE_AUTHORITY_HOST`)
    /// and the IMDS base (`AZURE_POD_IDENTITY_AUTHORITY_HOST`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `IDENTITY_ENDPOINT` of a Container App: `{url}/msi/token`.
    pub fn identity_endpoint(&self) -> String {
        format!("{}/msi/token", self.url())
    }

    /// The JWKS address of the tenant.
    pub fn jwks_url(&self) -> String {
        format!(
            "{}/{}/discovery/v2.0/keys",
            self.url(),
            self.state.cfg.tenant_id
        )
    }

    /// The tenant served.
    pub fn tenant_id(&self) -> &str {
        &self.state.cfg.tenant_id
    }

    /// The `X-IDENTITY-HEADER` currently expected.
    pub fn identity_header(&self) -> String {
        lock(&self.state.identity_header).clone()
    }

    /// Expect a new `X-IDENTITY-HEADER` (the platform rotates it).
    pub fn set_identity_header(&self, value: impl Into<String>) {
        *lock(&self.state.identity_header) = value.into();
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state
            .lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::Relaxed);
    }

    /// Register an app registration with a client secret.
    pub fn add_client_secret(&self, client_id: impl Into<String>, secret: impl Into<String>) {
        lock(&self.state.secrets).insert(client_id.into(), secret.into());
    }

    /// Accept exactly `assertion` (the projected service-account token) as
    /// `client_assertion` for `client_id`; an older one gets `AADSTS700024`.
    pub fn set_federated_assertion(
        &self,
        client_id: impl Into<String>,
        assertion: impl Into<String>,
    ) {
        lock(&self.state.assertions).insert(client_id.into(), assertion.into());
    }

    /// Register an app registration with a certificate credential: its
    /// RSA public key (PKCS#1 `RSAPublicKey` DER) and the certificate's
    /// `x5t#S256` thumbprint. The token endpoint then takes a PS256 (or
    /// RS256) `client_assertion` signed with that key, naming that
    /// thumbprint, for this tenant's token endpoint, with `iss` = `sub` =
    /// the client id and at most 10 minutes between `nbf` and `exp`.
    pub fn add_client_certificate(
        &self,
        client_id: impl Into<String>,
        public_key_der: Vec<u8>,
        x5t_s256: impl Into<String>,
    ) {
        lock(&self.state.certificates).insert(client_id.into(), (public_key_der, x5t_s256.into()));
    }

    /// Assign a user-assigned managed identity (by client id) to the host.
    pub fn add_user_assigned_identity(&self, client_id: impl Into<String>) {
        lock(&self.state.user_assigned).push(client_id.into());
    }

    /// The token routes answer `status` (`count` times, or until
    /// [`IdentityHandle::recover`] when `None`). JWKS keeps working.
    pub fn fail(&self, status: u16, count: Option<u32>) {
        *lock(&self.state.failure) = Some((status, count));
    }

    /// Every token route waits this long before answering (a slow
    /// endpoint, to show who waits for a fetch).
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Undo [`IdentityHandle::fail`].
    pub fn recover(&self) {
        *lock(&self.state.failure) = None;
    }

    /// Key rotation: the secondary key signs from now on and is the only one
    /// published (tokens signed with the primary key no longer verify).
    pub fn rotate_keys(&self) {
        *lock(&self.state.current) = SigningKey::Secondary;
        *lock(&self.state.published) = vec![SigningKey::Secondary];
    }

    /// Request counts so far.
    pub fn counts(&self) -> IdentityCounts {
        let s = &self.state;
        IdentityCounts {
            msi: s.msi.load(Ordering::Relaxed),
            imds: s.imds.load(Ordering::Relaxed),
            aad: s.aad.load(Ordering::Relaxed),
            jwks: s.jwks.load(Ordering::Relaxed),
            issued: s.issued.load(Ordering::Relaxed),
        }
    }

    /// A signed client token with these claims.
    pub fn mint(&self, t: &ClientToken) -> String {
        let key = t.key.unwrap_or_else(|| *lock(&self.state.current));
        mint(t, key)
    }

    /// The object id the host gives a client id (stable, GUID-shaped).
    pub fn object_id_of(client_id: &str) -> String {
        object_id(client_id)
    }

    /// Stop listening; open connections end.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

/// Starts an identity host on `addr` (port 0 for an ephemeral one).
///
/// # Errors
/// [`SimError::Bind`] when the address cannot be bound.
pub async fn start_identity_on(
    addr: SocketAddr,
    cfg: IdentityConfig,
) -> Result<IdentityHandle, SimError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let state = Arc::new(State {
        lifetime_secs: AtomicU64::new(cfg.token_lifetime_secs.max(1)),
        identity_header: Mutex::new(cfg.identity_header.clone()),
        current: Mutex::new(SigningKey::Primary),
        // Only the primary key is published until a rotation.
        published: Mutex::new(vec![SigningKey::Primary]),
        failure: Mutex::new(None),
        secrets: Mutex::new(HashMap::new()),
        assertions: Mutex::new(HashMap::new()),
        certificates: Mutex::new(HashMap::new()),
        user_assigned: Mutex::new(Vec::new()),
        delay_ms: AtomicU64::new(0),
        msi: AtomicU64::new(0),
        imds: AtomicU64::new(0),
        aad: AtomicU64::new(0),
        jwks: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        cfg,
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(accept_loop(state.clone(), listener, shutdown.clone()));
    Ok(IdentityHandle {
        state,
        addr: local,
        shutdown,
    })
}

/// Starts an identity host on an ephemeral port of 127.0.0.1.
///
/// # Errors
/// [`SimError::Bind`] when no port can be bound.
pub async fn start_identity(cfg: IdentityConfig) -> Result<IdentityHandle, SimError> {
    start_identity_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
}

async fn accept_loop(state: Arc<State>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn object_id(client_id: &str) -> String {
    let h = Sha256::digest(client_id.as_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn mint(t: &ClientToken, key: SigningKey) -> String {
    let now = unix_now() as i64;
    let issuer = t.issuer.clone().unwrap_or_else(|| {
        if t.version == 2 {
            format!("https://login.microsoftonline.com/{}/v2.0", t.tenant_id)
        } else {
            format!("https://sts.windows.net/{}/", t.tenant_id)
        }
    });
    let mut claims = serde_json::json!({
        "aud": t.audience,
        "iss": issuer,
        "iat": now,
        "nbf": now + t.not_before_in_secs,
        "exp": now + t.expires_in_secs,
        "oid": t.object_id,
        "sub": t.object_id,
        "tid": t.tenant_id,
        "ver": if t.version == 2 { "2.0" } else { "1.0" },
        "uti": uuid(),
    });
    let app_claim = if t.version == 2 { "azp" } else { "appid" };
    claims[app_claim] = serde_json::Value::from(t.app_id.as_str());
    crate::jwt::sign(key, &claims).unwrap_or_default()
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut r = Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, crate::service::JSON);
    r
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The failure to answer on a token route, if one is armed (and counts it).
fn take_failure(state: &State) -> Option<u16> {
    let mut f = lock(&state.failure);
    let (status, count) = (*f)?;
    match count {
        None => {}
        Some(0) => {
            *f = None;
            return None;
        }
        Some(1) => *f = None,
        Some(n) => *f = Some((status, Some(n - 1))),
    }
    Some(status)
}

fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response<SimBody> {
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description} Trace ID: {} Correlation ID: {} Timestamp: 2026-01-01 00:00:00Z", uuid(), uuid()),
        "error_codes": [code],
        "timestamp": "2026-01-01 00:00:00Z",
        "trace_id": uuid(),
        "correlation_id": uuid(),
    });
    reply(status, body.to_string())
}

/// A v1 access token for `client_id` and `resource`; returns it with its lifetime.
fn issue(state: &State, client_id: &str, resource: &str) -> (String, u64) {
    let lifetime = state.lifetime_secs.load(Ordering::Relaxed);
    let t = ClientToken {
        tenant_id: state.cfg.tenant_id.clone(),
        audience: resource.to_owned(),
        app_id: client_id.to_owned(),
        object_id: object_id(client_id),
        version: 1,
        expires_in_secs: i64::try_from(lifetime).unwrap_or(3599),
        not_before_in_secs: 0,
        issuer: None,
        key: None,
    };
    let key = *lock(&state.current);
    state.issued.fetch_add(1, Ordering::Relaxed);
    (mint(&t, key), lifetime)
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, "{}")),
    };
    let path = parts.uri.path().to_owned();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 && (path.ends_with("/token") || path.starts_with("/msi/")) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let tenant = &state.cfg.tenant_id;
    Ok(match (&parts.method, segs.as_slice()) {
        (&Method::GET, ["msi", "token"]) => msi(&state, &parts),
        (&Method::GET, ["metadata", "identity", "oauth2", "token"]) => imds(&state, &parts),
        (&Method::POST, [t, "oauth2", "v2.0", "token"]) => {
            state.aad.fetch_add(1, Ordering::Relaxed);
            if *t != tenant {
                aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90002,
                    &format!("Tenant '{t}' not found."),
                )
            } else {
                aad_token(&state, &body)
            }
        }
        (&Method::GET, [t, "discovery", "v2.0", "keys"] | [t, "discovery", "keys"]) => {
            state.jwks.fetch_add(1, Ordering::Relaxed);
            if *t != tenant {
                aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_tenant",
                    90002,
                    &format!("Tenant '{t}' not found."),
                )
            } else {
                let issuer = format!("https://login.microsoftonline.com/{tenant}/v2.0");
                let keys: Vec<serde_json::Value> = lock(&state.published)
                    .iter()
                    .map(|k| crate::jwt::jwk(*k, &issuer))
                    .collect();
                reply(
                    StatusCode::OK,
                    serde_json::json!({ "keys": keys }).to_string(),
                )
            }
        }
        (&Method::GET, [t, "v2.0", ".well-known", "openid-configuration"]) if *t == tenant => {
            let host = parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            reply(
                StatusCode::OK,
                serde_json::json!({
                    "issuer": format!("https://login.microsoftonline.com/{tenant}/v2.0"),
                    "jwks_uri": format!("http://{host}/{tenant}/discovery/v2.0/keys"),
                    "token_endpoint": format!("http://{host}/{tenant}/oauth2/v2.0/token"),
                    "id_token_signing_alg_values_supported": ["RS256"],
                })
                .to_string(),
            )
        }
        (&Method::POST, ["_sim", "mint"]) => {
            let de = &mut serde_json::Deserializer::from_slice(&body);
            match serde_path_to_error::deserialize::<_, ClientToken>(de) {
                Ok(t) => {
                    let key = t.key.unwrap_or_else(|| *lock(&state.current));
                    reply(
                        StatusCode::OK,
                        serde_json::json!({ "token": mint(&t, key) }).to_string(),
                    )
                }
                Err(e) => reply(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": format!("{}: {}", e.path(), e.inner()) })
                        .to_string(),
                ),
            }
        }
        (&Method::POST, ["_sim", "rotate"]) => {
            *lock(&state.current) = SigningKey::Secondary;
            *lock(&state.published) = vec![SigningKey::Secondary];
            reply(StatusCode::OK, r#"{"rotated":true}"#)
        }
        _ => reply(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    })
}

/// The client id a managed-identity request names, checked against the
/// identities assigned to the host.
fn managed_client_id(state: &State, q: &HashMap<String, String>) -> Option<String> {
    match q.get("client_id") {
        None => Some(SYSTEM_IDENTITY_CLIENT_ID.to_owned()),
        Some(id) if lock(&state.user_assigned).iter().any(|u| u == id) => Some(id.clone()),
        Some(_) => None,
    }
}

fn msi(state: &State, parts: &http::request::Parts) -> Response<SimBody> {
    state.msi.fetch_add(1, Ordering::Relaxed);
    let expected = lock(&state.identity_header).clone();
    if parts
        .headers
        .get("x-identity-header")
        .is_none_or(|v| v.as_bytes() != expected.as_bytes())
    {
        // What Container Apps answers to a missing or stale header.
        return reply(StatusCode::FORBIDDEN, Bytes::new());
    }
    if let Some(status) = take_failure(state) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return reply(
            status,
            serde_json::json!({"statusCode": status.as_u16(), "message": "An unexpected error occured while fetching the AAD Token.", "correlationId": uuid()}).to_string(),
        );
    }
    let q = query_map(parts.uri.query());
    let (Some("2019-08-01"), Some(resource)) =
        (q.get("api-version").map(String::as_str), q.get("resource"))
    else {
        return reply(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"statusCode": 400, "message": "Invalid request: api-version 2019-08-01 and resource are required.", "correlationId": uuid()}).to_string(),
        );
    };
    let Some(client_id) = managed_client_id(state, &q) else {
        return reply(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"statusCode": 400, "message": "Unable to load the proper Managed Identity.", "correlationId": uuid()}).to_string(),
        );
    };
    let (token, lifetime) = issue(state, &client_id, resource);
    reply(
        StatusCode::OK,
        serde_json::json!({
            "access_token": token,
            "expires_on": (unix_now() + lifetime).to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        })
        .to_string(),
    )
}

fn imds(state: &State, parts: &http::request::Parts) -> Response<SimBody> {
    state.imds.fetch_add(1, Ordering::Relaxed);
    if parts
        .headers
        .get("metadata")
        .is_none_or(|v| v.as_bytes() != b"true")
    {
        return reply(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#,
        );
    }
    if let Some(status) = take_failure(state) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return reply(
            status,
            r#"{"error":"unknown","error_description":"IMDS is temporarily unavailable"}"#,
        );
    }
    let q = query_map(parts.uri.query());
    let Some(resource) = q.get("resource").filter(|_| q.contains_key("api-version")) else {
        return reply(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"Required query variable 'resource' is missing"}"#,
        );
    };
    let Some(client_id) = managed_client_id(state, &q) else {
        return reply(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        );
    };
    let (token, lifetime) = issue(state, &client_id, resource);
    let now = unix_now();
    reply(
        StatusCode::OK,
        serde_json::json!({
            "access_token": token,
            "refresh_token": "",
            "expires_in": lifetime.to_string(),
            "expires_on": (now + lifetime).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        })
        .to_string(),
    )
}

/// Entra ID's checks of a certificate credential's client assertion, with
/// its error codes: AADSTS700027 for a signature or certificate it cannot
/// match, AADSTS700024 for the time range, AADSTS700021/700023 for the
/// claims.
fn check_certificate_assertion(
    state: &State,
    client_id: &str,
    assertion: &str,
) -> Result<(), Response<SimBody>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let Some((public_key, thumbprint)) = lock(&state.certificates).get(client_id).cloned() else {
        return Err(aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        ));
    };
    let bad_signature = || {
        aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        )
    };
    let json = |p: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    };
    let mut parts = assertion.trim().split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad_signature());
    };
    let (Some(header), Some(claims), Ok(sig)) = (json(h), json(c), URL_SAFE_NO_PAD.decode(sig))
    else {
        return Err(bad_signature());
    };
    let alg: &dyn ring::signature::VerificationAlgorithm = match header["alg"].as_str() {
        Some("PS256") => &ring::signature::RSA_PSS_2048_8192_SHA256,
        Some("RS256") => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        _ => return Err(bad_signature()),
    };
    let named = header["x5t#S256"].as_str().or(header["x5t"].as_str());
    if named != Some(thumbprint.as_str()) {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700027,
            "Client assertion contains an invalid signature. The key was not found.",
        ));
    }
    let input = &assertion.trim()[..h.len() + 1 + c.len()];
    if ring::signature::UnparsedPublicKey::new(alg, &public_key)
        .verify(input.as_bytes(), &sig)
        .is_err()
    {
        return Err(bad_signature());
    }
    let aud_path = format!("/{}/oauth2/v2.0/token", state.cfg.tenant_id);
    if !claims["aud"]
        .as_str()
        .is_some_and(|a| a.ends_with(&aud_path))
    {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700021,
            "Client assertion audience claim does not match Realm issuer.",
        ));
    }
    if claims["iss"].as_str() != Some(client_id) || claims["sub"].as_str() != Some(client_id) {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700023,
            "Client assertion issuer and subject must be the client id.",
        ));
    }
    let now = unix_now();
    let (Some(nbf), Some(exp)) = (claims["nbf"].as_u64(), claims["exp"].as_u64()) else {
        return Err(bad_signature());
    };
    if nbf > now + 300 || exp <= now || exp.saturating_sub(nbf) > 600 {
        return Err(aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    Ok(())
}

fn aad_token(state: &State, body: &[u8]) -> Response<SimBody> {
    if let Some(status) = take_failure(state) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return aad_error(
            status,
            "temporarily_unavailable",
            50196,
            "The server is temporarily unavailable.",
        );
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let get = |k: &str| form.get(k).map(String::as_str);
    if get("grant_type") != Some("client_credentials") {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let Some(client_id) = get("client_id") else {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    let Some(resource) = get("scope").and_then(|s| s.strip_suffix("/.default")) else {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
        );
    };
    match (
        get("client_secret"),
        get("client_assertion_type"),
        get("client_assertion"),
    ) {
        (Some(secret), None, None) => match lock(&state.secrets).get(client_id) {
            None => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    700016,
                    &format!(
                        "Application with identifier '{client_id}' was not found in the directory."
                    ),
                );
            }
            Some(s) if s != secret => {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                );
            }
            Some(_) => {}
        },
        (None, Some(JWT_BEARER), Some(assertion))
            if lock(&state.certificates).contains_key(client_id) =>
        {
            if let Err(refused) = check_certificate_assertion(state, client_id, assertion) {
                return refused;
            }
        }
        (None, Some(JWT_BEARER), Some(assertion)) => match lock(&state.assertions).get(client_id) {
            None => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    700016,
                    &format!(
                        "Application with identifier '{client_id}' was not found in the directory."
                    ),
                );
            }
            Some(a) if a != assertion => {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    700024,
                    "Client assertion is not within its valid time range.",
                );
            }
            Some(_) => {}
        },
        _ => {
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
        }
    }
    let (token, lifetime) = issue(state, client_id, resource);
    reply(
        StatusCode::OK,
        serde_json::json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        })
        .to_string(),
    )
}
