//! Phase 3: may this client have this now.
//!
//! Checks the identified client's permissions and limits before any
//! instance is contacted, and reserves what the request may cost against
//! them. The reservation is kept in [`RequestCtx::reservation`] and
//! settled with the real usage by the account phase.

use crate::error::ProxyError;
use crate::state::GatewayState;

use super::RequestCtx;

/// Refuses a deployment the client may not use.
///
/// # Errors
/// 403 when the client's `deployments` do not list the request's.
pub fn permit(_gw: &GatewayState, _ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    Ok(())
}

/// Admits the request against the client's limits.
///
/// # Errors
/// 403 over the token quota, 429 over the RPM or TPM.
pub fn admit(_gw: &GatewayState, _ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    Ok(())
}
