//! Phase 1: who is asking.
//!
//! Finds the client whose key the request presents (see
//! [`crate::clients`] and [`crate::auth`]). A request that names no known
//! client is answered 401 before its body is read and before any instance
//! is contacted. In unauthenticated mode every request is client
//! `default`.
//!
//! With an `entra` block, a bearer token that is a JWT is validated as a
//! Microsoft Entra ID token ([`crate::entra`]) instead of being looked up
//! as a key; a refused token is answered 401 naming the reason, unless an
//! `api-key` header carries a known key. A valid token is served as the
//! named client listing its principal (`entra_object_ids`, then
//! `entra_app_ids`), with that client's permissions, limits and usage
//! accounting; a token matching no client is served as client `default`
//! when `allow_any_principal` is set, else refused ("no client is
//! configured for this principal").

use std::sync::Arc;

use crate::clients::Client;
use crate::entra::{self, Principal, TokenRejection};
use crate::error::ProxyError;
use crate::state::GatewayState;

use super::RequestCtx;

/// Sets [`RequestCtx::client`].
///
/// # Errors
/// [`ProxyError::Unauthorized`] when no header carries a known key;
/// [`ProxyError::InvalidToken`] when an Entra ID token is refused.
pub async fn identify(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let client = match (&gw.entra, entra::bearer_jwt(&ctx.parts.headers)) {
        (Some(validator), Some(token)) => match validator
            .validate(token)
            .await
            .and_then(|principal| principal_client(gw, &principal))
        {
            Ok(client) => client,
            // A known key in `api-key` next to a refused token (or a valid
            // token no client lists) still identifies the client.
            Err(rejection) => match ctx.parts.headers.get("api-key") {
                Some(_) => gw
                    .clients
                    .identify(&ctx.parts.headers)
                    .map_err(|_| ProxyError::InvalidToken(rejection))?,
                None => return Err(ProxyError::InvalidToken(rejection)),
            },
        },
        _ => gw.clients.identify(&ctx.parts.headers)?,
    };
    ctx.record.client = Some(client.name.clone());
    ctx.client = Some(client);
    Ok(())
}

/// The client a validated principal acts as: the one listing its `oid`,
/// else the one listing its `appid`/`azp` ([`crate::clients::Clients::for_principal`]);
/// failing both, client `default` under `allow_any_principal`.
///
/// # Errors
/// [`TokenRejection::UnknownPrincipal`] (a 401): a token of the right
/// tenant is not by itself a permission to spend the backends' quota.
fn principal_client(
    gw: &GatewayState,
    principal: &Principal,
) -> Result<Arc<Client>, TokenRejection> {
    if let Some(c) = gw.clients.for_principal(principal) {
        return Ok(c);
    }
    let any = gw
        .entra
        .as_ref()
        .is_some_and(|v| v.config.allow_any_principal);
    any.then(|| gw.clients.default_client())
        .flatten()
        .ok_or(TokenRejection::UnknownPrincipal)
}
