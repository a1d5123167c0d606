//! Phase 1: who is asking.
//!
//! Checks the client's credential headers (see [`crate::auth`]) and
//! records which configured client they belong to. A request that names
//! no known client is answered 401 before its body is read and before any
//! instance is contacted.
//!
//! With an `entra` block, a bearer token that is a JWT is validated as a
//! Microsoft Entra ID token ([`crate::entra`]) instead of being compared
//! with the keys; a refused token is answered 401 naming the reason, unless
//! an `api-key` header carries a valid key. A valid token's principal is
//! accepted when `allow_any_principal` is set, else refused ("no client is
//! configured for this principal"): mapping principals to named clients
//! (`entra_app_ids`, `entra_object_ids`) plugs in at [`principal_client`].

use crate::auth;
use crate::entra::{self, Principal, TokenRejection};
use crate::error::ProxyError;
use crate::state::GatewayState;

use super::RequestCtx;

/// Authenticates the request and sets [`RequestCtx::client`].
///
/// # Errors
/// [`ProxyError::Unauthorized`] when no header carries a valid key;
/// [`ProxyError::InvalidToken`] when an Entra ID token is refused.
pub async fn identify(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    if let Some(validator) = &gw.entra
        && let Some(token) = entra::bearer_jwt(&ctx.parts.headers)
    {
        return match validator.validate(token).await {
            Ok(principal) => principal_client(gw, &principal),
            Err(rejection) => match &gw.client_key {
                // A valid key next to a bad token still identifies the client.
                Some(key) if auth::authenticate(Some(key), &ctx.parts.headers).is_ok() => Ok(()),
                _ => Err(ProxyError::InvalidToken(rejection)),
            },
        };
    }
    auth::authenticate(gw.client_key.as_ref(), &ctx.parts.headers)
}

/// The client a validated principal acts as. Until named clients list
/// Entra principals, a principal is accepted only with
/// `allow_any_principal`.
///
/// # Errors
/// [`TokenRejection::UnknownPrincipal`] as a 401.
fn principal_client(gw: &GatewayState, principal: &Principal) -> Result<(), ProxyError> {
    let _ = principal;
    match &gw.entra {
        Some(v) if v.config.allow_any_principal => Ok(()),
        _ => Err(ProxyError::InvalidToken(TokenRejection::UnknownPrincipal)),
    }
}
