//! Phase 4: to an instance and back.
//!
//! Prepares the request headers ([`crate::rewrite`]) and tries instances
//! with failover ([`crate::send`], which asks [`crate::select`] for each
//! candidate), or asks every instance at once for a list that is merged.
//! Every attempt is appended to the access record.

use crate::affinity;
use crate::error::ProxyError;
use crate::rewrite;
use crate::send::{self, Outgoing, Sent};
use crate::state::GatewayState;

use super::RequestCtx;

/// Sends the request; returns the answer to pass on.
///
/// # Errors
/// The gateway's own answer when no instance gave a usable one.
pub async fn forward(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<Sent, ProxyError> {
    // Upgrade headers go up only when the client connection can really
    // be upgraded (HTTP/1.1); HTTP/2 forbids them.
    rewrite::prepare_request_headers(
        &mut ctx.parts.headers,
        &ctx.record.request_id,
        ctx.client_upgrade.is_some(),
    );
    // Steering estimates the request's tokens from the body parsed once
    // per request (admission may have parsed it already).
    if send::steered_deployment(gw, &ctx.route).is_some() {
        ctx.parse_caps();
    }
    let out = Outgoing {
        method: &ctx.parts.method,
        path: ctx.parts.uri.path(),
        query: ctx.parts.uri.query(),
        headers: &ctx.parts.headers,
        route: &ctx.route,
        body: &ctx.body,
        caps: ctx.caps.as_ref().and_then(Option::as_ref),
        websocket: ctx.client_upgrade.is_some(),
        excluded: ctx.client.as_ref().map(|c| c.excluded).unwrap_or_default(),
        trace: ctx.record.trace.as_ref(),
    };
    // If the client goes away while instances are tried, hyper drops
    // this future; the context then still writes the access record.
    ctx.awaiting_upstream = true;
    let attempts = &mut ctx.record.attempts;
    let skipped = &mut ctx.record.skipped;
    let wait = &mut ctx.upstream_wait;
    let merged = if affinity::is_mergeable_list(out.method, out.path) {
        send::merged_list(gw, &out, attempts, wait).await
    } else {
        None
    };
    let sent = match merged {
        Some(sent) => sent,
        None => send::failover(gw, &out, attempts, skipped, wait).await,
    };
    ctx.awaiting_upstream = false;
    match sent {
        Sent::Failed(e) => Err(e),
        sent => Ok(sent),
    }
}
