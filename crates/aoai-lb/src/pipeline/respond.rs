//! Phase 5: the response head to the client.
//!
//! Passes the instance's status and headers on (minus hop-by-hop), adds
//! the gateway request id, fills the access record from the head and wraps
//! the body so that it streams through with accounting ([`crate::stream`],
//! ending in the account phase). A WebSocket handshake becomes a tunnel.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, Response, StatusCode, header};
use http_body_util::Full;

use crate::affinity::{self, Sniff};
use crate::backend::{Backend, InFlight};
use crate::error::ProxyError;
use crate::log::{AccessRecord, InstanceName, rfc3339_ms};
use crate::pool::UpstreamBody;
use crate::rewrite;
use crate::send::Sent;
use crate::state::GatewayState;
use crate::stream::{ProxyBody, Tracked, full_body};

use super::account::Account;
use super::{GATEWAY_REQUEST_ID, RequestCtx};
use crate::usage::meter::Meter;

static APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");

enum Either {
    Stream(UpstreamBody),
    Full(Full<Bytes>),
}

/// Builds the client's response from what the instance sent.
///
/// # Errors
/// [`ProxyError::Internal`] for a protocol switch the client did not ask
/// for.
pub fn respond(
    gw: &GatewayState,
    ctx: &mut RequestCtx,
    sent: Sent,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut rparts, body, slot, backend) = match sent {
        Sent::Failed(e) => return Err(e),
        Sent::Stream { response, slot } if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let Some(client) = ctx.client_upgrade.take() else {
                return Err(ProxyError::Internal);
            };
            count_response(ctx, slot.backend(), response.status().as_u16());
            return Ok(tunnel(response, slot, client, ctx.take_record(), ctx.start));
        }
        Sent::Stream { response, slot } => {
            let (p, b) = response.into_parts();
            let backend = Arc::clone(slot.backend());
            (p, Either::Stream(b), Some(slot), backend)
        }
        Sent::Buffered {
            parts,
            body,
            backend,
        } => (parts, Either::Full(Full::new(body)), None, backend),
    };
    let creation = affinity::is_creation(&ctx.parts.method, ctx.parts.uri.path());
    let mut rec = ctx.take_record();
    rewrite::strip_hop_by_hop(&mut rparts.headers, false);
    rparts
        .headers
        .insert(GATEWAY_REQUEST_ID.clone(), rec.request_id.clone());
    rec.status = rparts.status.as_u16();
    rec.apim_request_id = rparts.headers.get(&APIM_REQUEST_ID).cloned();
    rec.streamed = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    rec.instance = Some(InstanceName(Arc::clone(&backend)));
    count_response(ctx, &backend, rec.status);
    if let Some(client) = &ctx.client {
        super::admit::rate_headers(gw, client, &mut rparts.headers);
    }
    crate::metrics::global().overhead.record(
        ctx.start
            .elapsed()
            .saturating_sub(ctx.upstream_wait)
            .as_secs_f64(),
    );

    let streamed = rec.streamed;
    let mut account = Account::new(gw, ctx, rec, slot);
    if let Some(plan) = ctx.usage
        && rparts.status.is_success()
    {
        let model = ctx.route.deployment.as_deref().unwrap_or("");
        let meter = Meter::new(plan.endpoint, streamed, plan.strip, model, ctx.body.clone());
        if meter.strips() {
            // One event will be removed: the instance's length is wrong.
            rparts.headers.remove(header::CONTENT_LENGTH);
        }
        account.meter = Some(Box::new(meter));
    }
    let idle = Some(gw.config.timeouts.stream_idle);
    let body: ProxyBody = match body {
        Either::Stream(b) if creation && rparts.status.is_success() => {
            let b = Sniff::new(
                b,
                Arc::clone(&gw.affinity),
                backend.index,
                gw.clock.now_ms(),
            )
            .shared(gw.shared.clone(), backend.name());
            ProxyBody::boxed(Tracked::new(b, idle, account))
        }
        Either::Stream(b) => ProxyBody::Upstream(Box::new(Tracked::new(b, idle, account))),
        Either::Full(b) => ProxyBody::boxed(Tracked::new(b, None, account)),
    };
    Ok(Response::from_parts(rparts, body))
}

/// `aoai_lb_requests_total{instance, code, client}`.
fn count_response(ctx: &RequestCtx, backend: &Backend, status: u16) {
    if let Some(client) = &ctx.client {
        client.count_response(backend, status);
    }
}

/// Joins the client's and the instance's upgraded connections and copies
/// bytes both ways until either side closes. The access record is written
/// when the tunnel ends; the in-flight slot is held until then.
fn tunnel(
    mut response: Response<UpstreamBody>,
    slot: InFlight,
    client: hyper::upgrade::OnUpgrade,
    mut rec: AccessRecord,
    start: Instant,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(GATEWAY_REQUEST_ID.clone(), rec.request_id.clone());
    rec.status = parts.status.as_u16();
    rec.apim_request_id = parts.headers.get(&APIM_REQUEST_ID).cloned();
    rec.instance = Some(InstanceName(Arc::clone(slot.backend())));
    rec.streamed = true;
    tokio::spawn(async move {
        let mut error = None;
        let mut bytes = 0;
        match (client.await, upstream.await) {
            (Ok(c), Ok(u)) => {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut u = hyper_util::rt::TokioIo::new(u);
                match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    Ok((up, down)) => bytes = up + down,
                    Err(_) => error = Some("tunnel_aborted"),
                }
            }
            _ => error = Some("upgrade_failed"),
        }
        rec.bytes = bytes;
        rec.error = error;
        rec.total_ms = crate::log::ms(start.elapsed());
        rec.timestamp = rfc3339_ms(SystemTime::now());
        rec.emit();
        drop(slot);
    });
    Response::from_parts(parts, full_body(Bytes::new()))
}
