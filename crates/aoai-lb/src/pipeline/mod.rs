//! The request pipeline: one client request through every phase, in
//! order, over one [`RequestCtx`].
//!
//! | # | phase      | module       | may answer itself with           |
//! |---|------------|--------------|----------------------------------|
//! | 1 | identify   | [`identify`] | 401                              |
//! | 2 | classify   | [`classify`] | 400, 404, 413                    |
//! | 3 | admit      | [`admit`]    | 403, 429 (the client's limits)   |
//! | 4 | forward    | [`forward`]  | 429 (all cooling), 502, 504      |
//! | 5 | respond    | [`respond`]  | —                                |
//! | 6 | account    | [`account`]  | — (runs when the body ends)      |
//!
//! Each phase is a function over the context; [`run`] calls them in this
//! order and stops at the first error, which [`account::reject`] answers
//! and logs. Lower-level modules (`auth`, `route`, `rewrite`, `select`,
//! `send`, `stream`, `log`) know nothing of the pipeline, so no module
//! cycle runs through it.
//!
//! Where later work plugs in:
//! - identify: another way to recognise a client (a JWT principal) only
//!   has to produce a [`crate::clients::Client`];
//! - admit: the reservation taken here is settled by the account phase;
//! - account: [`account::UsageMeter`] reads the token usage from the body
//!   on its way out and hands the figures to the account phase.

pub mod account;
pub mod admit;
pub mod classify;
pub mod forward;
pub mod identify;
pub mod respond;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};

use crate::clients::Client;
use crate::error::ProxyError;
use crate::limits::{Caps, Reservation};
use crate::log::{AccessRecord, rfc3339_ms};
use crate::relay::ClientBody;
use crate::rewrite::CLIENT_REQUEST_ID;
use crate::route::Route;
use crate::state::GatewayState;
use crate::stream::ProxyBody;

/// Our request id header to the client. Azure's own `x-request-id` is left
/// alone.
pub static GATEWAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-aoai-lb-request-id");

/// Everything one request carries from phase to phase.
pub struct RequestCtx {
    /// When the gateway received the request.
    pub start: Instant,
    /// Method, URI, headers and extensions of the client's request.
    pub parts: http::request::Parts,
    /// The client's body until [`classify`] reads it.
    pub incoming: Option<ClientBody>,
    /// The client's body, read into memory (empty for GET and HEAD).
    pub body: Bytes,
    /// The body's caps and prompt, parsed on first use
    /// ([`RequestCtx::parse_caps`]) and then shared by the client's token
    /// admission and rate-limit steering. `Some(None)`: parsed, not a JSON
    /// object. Adding `stream_options` to the body later changes neither.
    caps: Option<Option<Caps>>,
    /// Where the request goes (set by [`classify`]).
    pub route: Route,
    /// The client side of a WebSocket upgrade.
    pub client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The client, once [`identify`] recognised it; `None` in
    /// unauthenticated mode.
    pub client: Option<Arc<Client>>,
    /// What [`admit`] reserved against the client's limits; settled with
    /// the real usage when the response ends ([`account`]).
    pub reservation: Option<Reservation>,
    /// How the response's token usage will be read (set before forwarding
    /// by [`account::plan_usage`]); `None` for non-inference requests.
    pub usage: Option<account::UsagePlan>,
    /// The access record being filled in.
    pub record: AccessRecord,
    /// Time spent waiting on instances (for the overhead metric).
    pub upstream_wait: Duration,
    /// Set while instances are being tried: if the request is dropped then
    /// (the client went away), the record is written with status 499.
    awaiting_upstream: bool,
}

impl RequestCtx {
    /// The context of a request just received: its id (the client's
    /// `x-ms-client-request-id` when usable, else a new one) and a record.
    pub fn new(req: Request<ClientBody>) -> Self {
        let start = Instant::now();
        let (parts, body) = req.into_parts();
        let request_id = match parts.headers.get(&CLIENT_REQUEST_ID) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => new_request_id(),
        };
        let record = AccessRecord {
            request_id,
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            ..AccessRecord::placeholder()
        };
        Self {
            start,
            parts,
            incoming: Some(body),
            body: Bytes::new(),
            caps: None,
            route: Route::default(),
            client_upgrade: None,
            client: None,
            reservation: None,
            usage: None,
            record,
            upstream_wait: Duration::ZERO,
            awaiting_upstream: false,
        }
    }

    /// Parses the body's caps unless done already; [`RequestCtx::caps`]
    /// then reads them. Only requests that estimate their tokens pay for
    /// the parse.
    pub fn parse_caps(&mut self) {
        if self.caps.is_none() {
            self.caps = Some(Caps::parse(&self.body));
        }
    }

    /// The caps [`RequestCtx::parse_caps`] parsed: `None` before it ran
    /// or when the body is not a JSON object.
    pub fn caps(&self) -> Option<&Caps> {
        self.caps.as_ref().and_then(Option::as_ref)
    }

    /// Moves the record out (for the phase that writes it).
    pub fn take_record(&mut self) -> AccessRecord {
        self.awaiting_upstream = false;
        std::mem::replace(&mut self.record, AccessRecord::placeholder())
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if self.awaiting_upstream {
            let rec = &mut self.record;
            // 499: nginx's code for "client closed request", the common
            // convention in access logs.
            rec.status = 499;
            rec.error = Some("client_disconnected");
            rec.total_ms = crate::log::ms(self.start.elapsed());
            rec.timestamp = rfc3339_ms(SystemTime::now());
            rec.emit();
        }
    }
}

/// Runs the phases in order. An `Err` is answered by
/// [`account::reject`].
///
/// # Errors
/// The first phase error, as the [`ProxyError`] to answer with.
pub async fn run(
    gw: &GatewayState,
    ctx: &mut RequestCtx,
) -> Result<Response<ProxyBody>, ProxyError> {
    identify::identify(gw, ctx).await?;
    if let Some(t) = ctx.record.trace.as_mut() {
        t.client.clone_from(&ctx.client);
    }
    classify::classify(gw, ctx).await?;
    admit::permit(gw, ctx)?;
    classify::deployment_exists(gw, ctx)?;
    admit::admit_strict(gw, ctx).await?;
    admit::admit(gw, ctx)?;
    account::plan_usage(ctx);
    let sent = forward::forward(gw, ctx).await?;
    respond::respond(gw, ctx, sent)
}

/// A client id is reused when it is short and printable: it goes into
/// logs and upstream headers.
fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// 32 lowercase hex characters.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for c in out.iter_mut().rev() {
        *c = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_32_hex_chars() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_unprintable_or_huge_client_request_ids() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        let long = "a".repeat(200);
        assert!(!valid_request_id(&HeaderValue::from_str(&long).unwrap()));
    }
}
