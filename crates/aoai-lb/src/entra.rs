//! Client side of Microsoft Entra ID: validating the bearer tokens clients
//! send (`AzureOpenAI(azure_ad_token_provider=…)`), with the tenant's key
//! set cached.
//!
//! Enabled by the optional top-level `entra` block. A bearer token that is
//! a JWT is then checked, in this order:
//!
//! 1. `alg` is RS256 and the signature verifies with the tenant's key named
//!    by `kid`, from `{authority}/{tenant}/discovery/v2.0/keys`;
//! 2. `exp` (required) and `nbf`, with 60 s of clock skew;
//! 3. `tid` is the configured tenant;
//! 4. `iss` is one of the accepted issuers (by default the tenant's v1
//!    `https://sts.windows.net/{tenant}/` and v2
//!    `https://login.microsoftonline.com/{tenant}/v2.0`);
//! 5. `aud` (a string or a list) names an accepted audience (by default
//!    `https://cognitiveservices.azure.com`, what the Azure OpenAI SDKs ask
//!    for).
//!
//! The key set is fetched at start, refreshed hourly, and fetched again at
//! most once per 5 minutes when a token names a `kid` it does not hold (a
//! key rotation); the last good set stays in use when a fetch fails.
//!
//! A valid token yields a [`Principal`] (`oid`, `appid`/`azp`); which client
//! it is, or whether any principal is accepted, is decided by the caller.
//! Every rejection carries a [`TokenRejection`] whose text names the reason
//! in words and never echoes the token.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::jwt::{self, JwtError, KeySet};
use crate::upstream::UpstreamClient;

/// The default accepted audience: the Azure OpenAI resource.
pub const DEFAULT_AUDIENCE: &str = "https://cognitiveservices.azure.com";
/// Clock skew allowed on `exp` and `nbf`.
pub const CLOCK_SKEW_SECS: i64 = 60;
/// How often the key set is refreshed.
pub const JWKS_REFRESH: Duration = Duration::from_secs(3600);
/// Fetches for an unknown `kid` happen at most this often.
pub const JWKS_MISS_INTERVAL: Duration = Duration::from_secs(300);
/// While no key set could be loaded, requests fetch at most this often.
pub const JWKS_EMPTY_INTERVAL: Duration = Duration::from_secs(10);
/// Largest key set read.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest wait for one key set fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);

/// The validated `entra` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraConfig {
    /// The tenant (directory) id, a GUID: tokens must carry it in `tid`.
    pub tenant_id: String,
    /// Accepted `aud` values. Default [`DEFAULT_AUDIENCE`].
    pub audiences: Vec<String>,
    /// Accepted `iss` values. Default: the tenant's v1 and v2 issuers.
    pub issuers: Vec<String>,
    /// Accept a valid token whose principal matches no client (as client
    /// `default`). Default false: such a token gets 401.
    pub allow_any_principal: bool,
}

impl EntraConfig {
    /// The tenant's v1 and v2 issuers.
    pub fn default_issuers(tenant: &str) -> Vec<String> {
        vec![
            format!("https://sts.windows.net/{tenant}/"),
            format!("https://login.microsoftonline.com/{tenant}/v2.0"),
        ]
    }
}

/// Whether `s` is a GUID (`8-4-4-4-12` hex digits).
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `oid`: the user or service principal.
    pub object_id: Option<String>,
    /// `appid` (v1) or `azp` (v2): the client application.
    pub app_id: Option<String>,
}

/// Why a client token was refused. `Display` is the reason in words, as the
/// 401 body says it; it never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not a well-formed JWS.
    #[error("token is malformed")]
    Malformed,
    /// `alg` other than RS256.
    #[error("token algorithm not accepted (RS256 only)")]
    Algorithm,
    /// No key of the tenant has the token's `kid`.
    #[error("token signing key is unknown")]
    UnknownKey,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    Signature,
    /// Past `exp` (plus skew), or no `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf` (minus skew).
    #[error("token not yet valid")]
    NotYetValid,
    /// `tid` is another tenant.
    #[error("tenant not accepted")]
    Tenant,
    /// `iss` is not accepted.
    #[error("issuer not accepted")]
    Issuer,
    /// `aud` is not accepted.
    #[error("audience not accepted")]
    Audience,
    /// Valid, but no client is configured for this principal.
    #[error("no client is configured for this principal")]
    UnknownPrincipal,
}

impl TokenRejection {
    /// A low-cardinality label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "token_malformed",
            TokenRejection::Algorithm => "token_algorithm",
            TokenRejection::UnknownKey => "token_unknown_key",
            TokenRejection::Signature => "token_signature",
            TokenRejection::Expired => "token_expired",
            TokenRejection::NotYetValid => "token_not_yet_valid",
            TokenRejection::Tenant => "token_tenant",
            TokenRejection::Issuer => "token_issuer",
            TokenRejection::Audience => "token_audience",
            TokenRejection::UnknownPrincipal => "token_unknown_principal",
        }
    }
}

impl From<JwtError> for TokenRejection {
    fn from(e: JwtError) -> Self {
        match e {
            JwtError::Malformed => TokenRejection::Malformed,
            JwtError::Algorithm => TokenRejection::Algorithm,
            JwtError::UnknownKey => TokenRejection::UnknownKey,
            JwtError::Signature => TokenRejection::Signature,
        }
    }
}

/// The bearer token of a request if it is a JWT (a client key is not).
pub fn bearer_jwt(headers: &HeaderMap) -> Option<&str> {
    headers.get_all(header::AUTHORIZATION).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let scheme = v.get(..7)?;
        if !scheme.eq_ignore_ascii_case("bearer ") {
            return None;
        }
        let t = v[7..].trim();
        jwt::looks_like_jwt(t).then_some(t)
    })
}

/// Checks the claims of a token whose signature verified, at Unix time `now`.
///
/// # Errors
/// The first failed check, in the order of the module documentation.
pub fn check_claims(
    cfg: &EntraConfig,
    claims: &serde_json::Map<String, serde_json::Value>,
    now: i64,
) -> Result<Principal, TokenRejection> {
    let int = |k: &str| claims.get(k).and_then(serde_json::Value::as_i64);
    let text = |k: &str| claims.get(k).and_then(serde_json::Value::as_str);
    match int("exp") {
        Some(exp) if now < exp + CLOCK_SKEW_SECS => {}
        _ => return Err(TokenRejection::Expired),
    }
    if int("nbf").is_some_and(|nbf| now + CLOCK_SKEW_SECS < nbf) {
        return Err(TokenRejection::NotYetValid);
    }
    if text("tid") != Some(cfg.tenant_id.as_str()) {
        return Err(TokenRejection::Tenant);
    }
    if !text("iss").is_some_and(|i| cfg.issuers.iter().any(|a| a == i)) {
        return Err(TokenRejection::Issuer);
    }
    let accepted = |a: &str| cfg.audiences.iter().any(|x| x == a);
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => accepted(a),
        Some(serde_json::Value::Array(list)) => {
            list.iter().filter_map(|a| a.as_str()).any(accepted)
        }
        _ => false,
    };
    if !aud_ok {
        return Err(TokenRejection::Audience);
    }
    Ok(Principal {
        object_id: text("oid").map(str::to_owned),
        app_id: text("appid").or_else(|| text("azp")).map(str::to_owned),
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Validates client tokens against the tenant's cached key set.
pub struct EntraValidator {
    /// The `entra` block.
    pub config: EntraConfig,
    jwks_url: String,
    client: UpstreamClient,
    keys: ArcSwap<KeySet>,
    /// When the last fetch for an unknown `kid` happened.
    last_miss_fetch: std::sync::Mutex<Option<Instant>>,
    /// When the last fetch for a request found no key set at all happened.
    last_empty_fetch: std::sync::Mutex<Option<Instant>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    _stop: DropGuard,
}

impl std::fmt::Debug for EntraValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraValidator")
            .field("config", &self.config)
            .field("jwks_url", &self.jwks_url)
            .finish_non_exhaustive()
    }
}

impl EntraValidator {
    /// A validator fetching keys from `{authority}/{tenant}/discovery/v2.0/keys`;
    /// its hourly refresh task starts at once (inside a Tokio runtime).
    pub fn new(config: EntraConfig, authority: &str, client: UpstreamClient) -> Arc<Self> {
        let jwks_url = format!("{authority}/{}/discovery/v2.0/keys", config.tenant_id);
        let stop = CancellationToken::new();
        let v = Arc::new(Self {
            config,
            jwks_url,
            client,
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_miss_fetch: std::sync::Mutex::new(None),
            last_empty_fetch: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            _stop: stop.clone().drop_guard(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresh_loop(Arc::downgrade(&v), stop));
        }
        v
    }

    /// The key set's address.
    pub fn jwks_url(&self) -> &str {
        &self.jwks_url
    }

    /// Validates `token`; see the module documentation.
    ///
    /// # Errors
    /// Why the token is refused.
    pub async fn validate(&self, token: &str) -> Result<Principal, TokenRejection> {
        let decoded = jwt::decode(token)?;
        let kid = decoded.kid.clone().unwrap_or_default();
        if !self.keys.load().has(&kid) {
            self.fetch_for_unknown_kid(&kid).await;
        }
        self.keys.load().verify(&decoded)?;
        check_claims(&self.config, &decoded.claims, unix_now())
    }

    /// A fetch for a `kid` the set lacks: at most once per
    /// [`JWKS_MISS_INTERVAL`] once a set is loaded (a rotation), at most
    /// once per [`JWKS_EMPTY_INTERVAL`] while none could be loaded yet.
    /// Concurrent requests share one fetch.
    async fn fetch_for_unknown_kid(&self, kid: &str) {
        let _one = self.fetching.lock().await;
        let keys = self.keys.load();
        if keys.has(kid) {
            return;
        }
        let (gate, interval) = if keys.is_empty() {
            (&self.last_empty_fetch, JWKS_EMPTY_INTERVAL)
        } else {
            (&self.last_miss_fetch, JWKS_MISS_INTERVAL)
        };
        {
            let mut last = gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _ = self.fetch().await;
    }

    /// Fetches the key set and swaps it in; the old one stays on failure.
    async fn fetch(&self) -> Result<usize, String> {
        let req = Request::get(self.jwks_url.as_str())
            .body(Full::new(Bytes::new()))
            .map_err(|_| "bad key set URL".to_owned())?;
        let resp = tokio::time::timeout(JWKS_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
            .map_err(|_| "cannot reach the key set endpoint".to_owned())?;
        if resp.status() != StatusCode::OK {
            return Err(format!(
                "key set endpoint answered HTTP {}",
                resp.status().as_u16()
            ));
        }
        let body = tokio::time::timeout(
            JWKS_TIMEOUT,
            Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| "key set body too slow".to_owned())?
        .map_err(|_| "key set body broke off or is too large".to_owned())?
        .to_bytes();
        let set = KeySet::parse(&body).map_err(|_| "not a JSON Web Key Set".to_owned())?;
        if set.is_empty() {
            return Err("the key set holds no RSA signing key".to_owned());
        }
        let n = set.len();
        self.keys.store(Arc::new(set));
        Ok(n)
    }
}

async fn refresh_loop(v: std::sync::Weak<EntraValidator>, stop: CancellationToken) {
    let mut failing: Option<String> = None;
    loop {
        let Some(val) = v.upgrade() else { return };
        let fetched = {
            let _one = val.fetching.lock().await;
            val.fetch().await
        };
        let wait = match fetched {
            Ok(n) => {
                if failing.take().is_some() {
                    tracing::info!(keys = n, "Entra ID key set fetched again");
                }
                JWKS_REFRESH
            }
            Err(e) => {
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, url = %val.jwks_url, "cannot fetch the Entra ID key set; keeping the last one, retrying in 60 s");
                    failing = Some(e);
                }
                Duration::from_secs(60)
            }
        };
        drop(val);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "9c1c4e5a-7d0b-4c6e-9a43-5e1f2b3c4d5e";

    fn cfg() -> EntraConfig {
        EntraConfig {
            tenant_id: TENANT.into(),
            audiences: vec![DEFAULT_AUDIENCE.into()],
            issuers: EntraConfig::default_issuers(TENANT),
            allow_any_principal: false,
        }
    }

    fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn good(now: i64) -> serde_json::Value {
        serde_json::json!({
            "exp": now + 600, "nbf": now - 10, "tid": TENANT,
            "iss": format!("https://sts.windows.net/{TENANT}/"),
            "aud": DEFAULT_AUDIENCE, "oid": "o", "appid": "a",
        })
    }

    #[test]
    fn accepts_a_valid_v1_or_v2_token_and_names_its_principal() {
        let now = 1_700_000_000;
        assert_eq!(
            check_claims(&cfg(), &claims(good(now)), now),
            Ok(Principal {
                object_id: Some("o".into()),
                app_id: Some("a".into())
            })
        );
        let mut v2 = good(now);
        v2["iss"] = format!("https://login.microsoftonline.com/{TENANT}/v2.0").into();
        v2["aud"] = serde_json::json!(["api://other", DEFAULT_AUDIENCE]);
        v2.as_object_mut().unwrap().remove("appid");
        v2["azp"] = "z".into();
        assert_eq!(
            check_claims(&cfg(), &claims(v2), now)
                .unwrap()
                .app_id
                .as_deref(),
            Some("z")
        );
    }

    #[test]
    fn refuses_each_bad_claim_with_its_reason() {
        let now = 1_700_000_000;
        let bad = |k: &str, v: serde_json::Value| {
            let mut c = good(now);
            c[k] = v;
            check_claims(&cfg(), &claims(c), now).unwrap_err()
        };
        assert_eq!(bad("exp", (now - 61).into()), TokenRejection::Expired);
        assert_eq!(bad("exp", serde_json::Value::Null), TokenRejection::Expired);
        assert_eq!(bad("nbf", (now + 61).into()), TokenRejection::NotYetValid);
        assert_eq!(
            bad("tid", "11111111-1111-1111-1111-111111111111".into()),
            TokenRejection::Tenant
        );
        assert_eq!(
            bad("iss", "https://evil.example/".into()),
            TokenRejection::Issuer
        );
        assert_eq!(
            bad("aud", "https://management.azure.com".into()),
            TokenRejection::Audience
        );
        // Within the skew: still fine.
        assert!(
            check_claims(
                &cfg(),
                &claims({
                    let mut c = good(now);
                    c["exp"] = (now - 30).into();
                    c
                }),
                now
            )
            .is_ok()
        );
        assert_eq!(TokenRejection::Expired.to_string(), "token expired");
        assert_eq!(
            TokenRejection::Audience.to_string(),
            "audience not accepted"
        );
    }

    #[test]
    fn recognises_guids_and_jwt_bearers() {
        assert!(is_guid(TENANT));
        assert!(!is_guid("contoso.onmicrosoft.com"));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer my-key".parse().unwrap());
        assert_eq!(bearer_jwt(&h), None);
        h.insert("authorization", "Bearer eyJa.b.c".parse().unwrap());
        assert_eq!(bearer_jwt(&h), Some("eyJa.b.c"));
    }
}
