//! Phase 2: what is asked for.
//!
//! Classifies the path ([`crate::route`]), takes the client side of a
//! WebSocket upgrade, reads the body into memory up to the cap (so it can
//! be replayed on another instance) and, only where routing needs it,
//! reads the deployment from the body's `model` or the query. A request
//! for a deployment no instance serves is answered 404 here.

use bytes::Bytes;
use http::Method;

use crate::affinity;
use crate::error::ProxyError;
use crate::rewrite;
use crate::route::{self, Scope};
use crate::send;
use crate::state::GatewayState;

use super::RequestCtx;

/// Sets [`RequestCtx::route`], [`RequestCtx::body`] and
/// [`RequestCtx::client_upgrade`].
///
/// # Errors
/// 400 for a path or body that cannot be routed safely, 413 over the body
/// cap, 404 when no instance serves the deployment.
pub async fn classify(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let parts = &mut ctx.parts;
    let mut route =
        route::classify(&parts.method, parts.uri.path()).map_err(ProxyError::BadRequest)?;
    if rewrite::is_websocket_upgrade(&parts.headers) {
        ctx.client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    }

    let incoming = ctx.incoming.take();
    ctx.body = match incoming {
        _ if parts.method == Method::GET || parts.method == Method::HEAD => Bytes::new(),
        None => Bytes::new(),
        Some(body) => {
            send::read_body(body, &parts.headers, gw.config.max_request_body_bytes).await?
        }
    };
    let body = &ctx.body;
    match route.scope {
        Scope::BodyModel if route::body_is_json(&parts.headers) => {
            route::apply_body_model(&mut route, body).map_err(ProxyError::BadRequest)?;
        }
        Scope::BodyModel => route.scope = Scope::Any,
        Scope::QueryDeployment => {
            route::apply_query_deployment(&mut route, parts.uri.query())
                .map_err(ProxyError::BadRequest)?;
        }
        Scope::PathDeployment | Scope::Any => {}
    }
    // A body naming a stored object (a batch's `input_file_id`, ...)
    // pins the request to the instance holding it. Only bodies that
    // route nowhere else are parsed for it.
    if route.scope == Scope::Any
        && route.affinity_key.is_none()
        && parts.method == Method::POST
        && route::body_is_json(&parts.headers)
    {
        route.affinity_key = affinity::body_reference(body);
    }
    ctx.record.deployment.clone_from(&route.deployment);
    ctx.route = route;
    Ok(())
}

/// 404 when the request names a deployment that no instance serves.
///
/// # Errors
/// [`ProxyError::DeploymentNotFound`].
pub fn deployment_exists(gw: &GatewayState, ctx: &RequestCtx) -> Result<(), ProxyError> {
    match ctx.route.deployment.as_deref() {
        Some(dep)
            if !gw
                .backends
                .iter()
                .any(|b| b.config.backend_deployment(dep).is_some()) =>
        {
            Err(ProxyError::DeploymentNotFound)
        }
        _ => Ok(()),
    }
}
