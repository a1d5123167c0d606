//! Who may call an instance: its key, or an Entra ID bearer token, as Azure
//! OpenAI decides it, including the resource setting `disableLocalAuth`.
//!
//! | Request carries | Local auth on | Local auth disabled |
//! |---|---|---|
//! | the instance key (`api-key`, or realtime `?api-key=`) | accepted | 403 `AuthenticationTypeDisabled` |
//! | `Authorization: Bearer <instance key>` | accepted (the seed's clients) | 401, Entra body |
//! | a valid token (signature, `exp`/`nbf`, `aud`, `tid`) | accepted | accepted |
//! | a valid token whose principal holds no role | 401 `PermissionDenied` | same |
//! | a bad, expired or wrong-audience token, or nothing | 401 (Entra body for a token) | 401, Entra body |
//!
//! Azure answers token failures with its own body shape,
//! `{"statusCode":401,"message":…}`, unlike every other error.

use http::{HeaderMap, StatusCode, header};

use crate::azure;
use crate::identity::{COGNITIVE_SERVICES_RESOURCE, SIM_TENANT_ID};
use crate::jwt::SigningKey;
use crate::server::Instance;
use crate::service::{Reply, query_param};

/// 401 for a missing, invalid, expired or wrong-audience token.
pub const TOKEN_UNAUTHORIZED: &str = r#"{"statusCode":401,"message":"Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}"#;

/// 403 for a key on a resource with local authentication disabled.
pub const AUTHENTICATION_TYPE_DISABLED: &str = r#"{"error":{"code":"AuthenticationTypeDisabled","message":"Key based authentication is disabled for this resource."}}"#;

/// 401 for a valid token whose principal lacks the data-plane role.
pub const PERMISSION_DENIED: &str = r#"{"error":{"code":"PermissionDenied","message":"Principal does not have access to API/Operation."}}"#;

/// Decides whether the request may proceed; the error is the complete reply.
pub(crate) fn check(
    inst: &Instance,
    headers: &HeaderMap,
    query: Option<&str>,
    realtime: bool,
) -> Result<(), Reply> {
    let key = inst.cfg.api_key.as_bytes();
    let api_key = headers.get("api-key").map(|v| v.as_bytes());
    let query_key = if realtime {
        query_param(query, "api-key").map(str::as_bytes)
    } else {
        None
    };
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
    });
    if inst.cfg.local_auth_disabled {
        if api_key.is_some() || query_key.is_some() {
            return Err(Reply::json(
                StatusCode::FORBIDDEN,
                AUTHENTICATION_TYPE_DISABLED,
            ));
        }
        return match bearer {
            Some(token) => token_ok(inst, token),
            None => Err(token_unauthorized()),
        };
    }
    if api_key == Some(key) || query_key == Some(key) {
        return Ok(());
    }
    match bearer {
        Some(token) if token == key => Ok(()),
        Some(token) if looks_like_jwt(token) => token_ok(inst, token),
        _ => Err(Reply::json(StatusCode::UNAUTHORIZED, azure::UNAUTHORIZED)),
    }
}

fn token_unauthorized() -> Reply {
    Reply::json(StatusCode::UNAUTHORIZED, TOKEN_UNAUTHORIZED)
}

fn looks_like_jwt(token: &[u8]) -> bool {
    token.starts_with(b"eyJ") && token.iter().filter(|&&c| c == b'.').count() == 2
}

/// Signature against the tenant's keys, `exp`/`nbf` (no skew: Azure's is
/// small and tests set lifetimes in seconds), `aud`, `tid`, then the role.
fn token_ok(inst: &Instance, token: &[u8]) -> Result<(), Reply> {
    let token = std::str::from_utf8(token).map_err(|_| token_unauthorized())?;
    let claims = crate::jwt::verify(token, &[SigningKey::Primary, SigningKey::Secondary])
        .map_err(|_| token_unauthorized())?;
    let now = azure::unix_now() as i64;
    let num = |k: &str| claims.get(k).and_then(serde_json::Value::as_i64);
    let text = |k: &str| claims.get(k).and_then(serde_json::Value::as_str);
    let fresh = num("exp").is_some_and(|exp| exp > now) && num("nbf").is_none_or(|nbf| nbf <= now);
    let audience =
        text("aud").is_some_and(|a| a.trim_end_matches('/') == COGNITIVE_SERVICES_RESOURCE);
    if !fresh || !audience || text("tid") != Some(SIM_TENANT_ID) {
        return Err(token_unauthorized());
    }
    if let Some(allowed) = &inst.cfg.entra_principals {
        let holds_role = [text("oid"), text("appid"), text("azp")]
            .into_iter()
            .flatten()
            .any(|id| allowed.iter().any(|a| a == id));
        if !holds_role {
            return Err(Reply::json(StatusCode::UNAUTHORIZED, PERMISSION_DENIED));
        }
    }
    Ok(())
}
