//! Phase 1: who is asking.
//!
//! Checks the client's credential headers (see [`crate::auth`]) and
//! records which configured client they belong to. A request that names
//! no known client is answered 401 before its body is read and before any
//! instance is contacted.

use crate::auth;
use crate::error::ProxyError;
use crate::state::GatewayState;

use super::RequestCtx;

/// Authenticates the request and sets [`RequestCtx::client`].
///
/// # Errors
/// [`ProxyError::Unauthorized`] when no header carries a valid key.
pub fn identify(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    auth::authenticate(gw.client_key.as_ref(), &ctx.parts.headers)
}
