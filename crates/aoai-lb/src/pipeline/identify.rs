//! Phase 1: who is asking.
//!
//! Finds the client whose key the request presents (see
//! [`crate::clients`] and [`crate::auth`]). A request that names no known
//! client is answered 401 before its body is read and before any instance
//! is contacted. In unauthenticated mode every request is client
//! `default`.

use crate::error::ProxyError;
use crate::state::GatewayState;

use super::RequestCtx;

/// Sets [`RequestCtx::client`].
///
/// # Errors
/// [`ProxyError::Unauthorized`] when no header carries a known key.
pub fn identify(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let client = gw.clients.identify(&ctx.parts.headers)?;
    ctx.record.client = Some(client.name.clone());
    ctx.client = Some(client);
    Ok(())
}
