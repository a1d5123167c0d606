//! The gateway: one request through every phase, in order.
//!
//! [`Gateway::handle`] runs: request id → authenticate ([`crate::auth`]) →
//! classify the path ([`crate::route`]) → read the body up to the cap and,
//! only where routing needs it, its `model` → candidates (404 when no
//! instance serves the deployment) → rewrite and send with failover
//! ([`crate::rewrite`], [`crate::send`]) → stream the response back
//! ([`crate::stream`]) → access record ([`crate::log`]).
//!
//! Errors the gateway answers itself are [`ProxyError`]s; responses from
//! instances go back with their status, headers (minus hop-by-hop) and body
//! unchanged.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::affinity::{self, AffinityTable, Sniff};
use crate::auth;
use crate::backend::{Backend, Clock};
use crate::config::Config;
use crate::error::{GatewayError, ProxyError};
use crate::log::{AccessRecord, InstanceName, rfc3339_ms};
use crate::rewrite::{self, CLIENT_REQUEST_ID};
use crate::route::{self, Scope};
use crate::secret::Secret;
use crate::select::{MAX_INSTANCES, Selector};
use crate::send::{self, Outgoing, Sent, UpstreamClient};
use crate::stream::{BodyError, Finish, Tracked};

/// The body type of every response the gateway returns.
pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// A complete in-memory body.
pub fn full_body(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Our request id header to the client. Azure's own `x-request-id` is left
/// alone.
pub static GATEWAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-aoai-lb-request-id");
static APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");

/// The load-balancing gateway. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// Shared state of a gateway.
pub struct Inner {
    /// The configuration it was built with.
    pub config: Arc<Config>,
    client_key: Option<Secret>,
    /// Instances in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// The instance selector.
    pub selector: Selector,
    /// The pooled upstream client (HTTP/1.1 and HTTP/2 by ALPN).
    pub client: UpstreamClient,
    /// An HTTP/1.1-only client for WebSocket handshakes.
    pub client_h1: UpstreamClient,
    /// Monotonic ms for cooldowns and breakers.
    pub clock: Clock,
    /// Which instance holds which stateful object.
    pub affinity: Arc<AffinityTable>,
    /// The trace exporter while tracing is on ([`crate::otel`]).
    pub tracing: Option<Arc<crate::otel::Tracing>>,
}

/// One instance in the `/admin/backends` document. Never holds a key or URL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// Configured name.
    pub name: String,
    /// Lower is preferred.
    pub priority: u32,
    /// Share within the priority.
    pub weight: f64,
    /// Requests being served now.
    pub in_flight: u32,
    /// Time left in a 429 cooldown; 0 when not cooling.
    pub cooldown_remaining_ms: u64,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Time-to-headers EWMA in ms (0 before any response).
    pub latency_ewma_ms: f64,
    /// Attempts started.
    pub requests: u64,
    /// 5xx, timeouts, connection and auth failures.
    pub failures: u64,
}

impl Gateway {
    /// Builds a gateway. `client_key` `None` is unauthenticated mode (only
    /// when the operator explicitly allowed it).
    ///
    /// # Errors
    /// Bad extra CA file, TLS set-up failure, more than 128 instances, or a
    /// host/key that cannot be a header value.
    pub fn new(
        config: Arc<Config>,
        client_key: Option<Secret>,
        tracing: Option<Arc<crate::otel::Tracing>>,
    ) -> Result<Gateway, GatewayError> {
        if config.instances.len() > MAX_INSTANCES {
            return Err(GatewayError::TooManyInstances { max: MAX_INSTANCES });
        }
        let backends = config
            .instances
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Backend::new(i, c.clone(), &config.circuit_breaker)
                    .map(Arc::new)
                    .map_err(|field| GatewayError::InvalidHeader { index: i, field })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let selector = Selector::new(&backends);
        let client = send::build_client(&config, true)?;
        let client_h1 = send::build_client(&config, false)?;
        Ok(Gateway {
            inner: Arc::new(Inner {
                config,
                client_key,
                backends,
                selector,
                client,
                client_h1,
                clock: Clock::new(),
                affinity: Arc::new(AffinityTable::default()),
                tracing,
            }),
        })
    }

    /// Per-instance live state for the admin listener.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let now = self.inner.clock.now_ms();
        self.inner
            .backends
            .iter()
            .map(|b| BackendStatus {
                name: b.name().to_owned(),
                priority: b.config.priority,
                weight: b.config.weight,
                in_flight: b.in_flight(),
                cooldown_remaining_ms: b.cooling_until(now).map_or(0, |u| u - now),
                breaker: b.breaker_state(now).as_str(),
                latency_ewma_ms: b.latency_ewma_ms(),
                requests: b.requests(),
                failures: b.failures(),
            })
            .collect()
    }

    /// True while at least one instance could take a request (for
    /// `/readyz`).
    pub fn any_available(&self) -> bool {
        let now = self.inner.clock.now_ms();
        self.inner
            .backends
            .iter()
            .any(|b| self.inner.selector.health().check(b, now).is_ok())
    }

    /// Answers one client request. Never fails: every error becomes an
    /// OpenAI-shaped response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let gw = &*self.inner;
        let (mut parts, body) = req.into_parts();

        let request_id = match parts.headers.get(&CLIENT_REQUEST_ID) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => new_request_id(),
        };
        let mut rec = AccessRecord {
            timestamp: String::new(),
            level: "INFO",
            target: "aoai_lb::access",
            message: "request",
            request_id,
            apim_request_id: None,
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            deployment: None,
            attempts: Vec::new(),
            instance: None,
            status: 0,
            ttfb_ms: None,
            total_ms: 0.0,
            bytes: 0,
            streamed: false,
            error: None,
            trace: gw.tracing.as_ref().map(|t| t.begin(&parts.headers)),
        };

        if let Err(e) = auth::authenticate(gw.client_key.as_ref(), &parts.headers) {
            return local_error(e, rec, start);
        }
        let mut route = match route::classify(&parts.method, parts.uri.path()) {
            Ok(r) => r,
            Err(b) => return local_error(ProxyError::BadRequest(b), rec, start),
        };
        let websocket = rewrite::is_websocket_upgrade(&parts.headers);
        let client_upgrade = if websocket {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };

        let body = if parts.method == Method::GET || parts.method == Method::HEAD {
            drop(body);
            Bytes::new()
        } else {
            match send::read_body(body, &parts.headers, gw.config.max_request_body_bytes).await {
                Ok(b) => b,
                Err(e) => return local_error(e, rec, start),
            }
        };
        match route.scope {
            Scope::BodyModel if route::body_is_json(&parts.headers) => {
                if let Err(b) = route::apply_body_model(&mut route, &body) {
                    return local_error(ProxyError::BadRequest(b), rec, start);
                }
            }
            Scope::BodyModel => route.scope = Scope::Any,
            Scope::QueryDeployment => {
                if let Err(b) = route::apply_query_deployment(&mut route, parts.uri.query()) {
                    return local_error(ProxyError::BadRequest(b), rec, start);
                }
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
            route.affinity_key = affinity::body_reference(&body);
        }
        rec.deployment.clone_from(&route.deployment);

        if let Some(dep) = route.deployment.as_deref()
            && !gw
                .backends
                .iter()
                .any(|b| b.config.backend_deployment(dep).is_some())
        {
            return local_error(ProxyError::DeploymentNotFound, rec, start);
        }

        // Upgrade headers go up only when the client connection can really
        // be upgraded (HTTP/1.1); HTTP/2 forbids them.
        rewrite::prepare_request_headers(
            &mut parts.headers,
            &rec.request_id,
            client_upgrade.is_some(),
        );
        let trace = rec.trace.clone();
        let out = Outgoing {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            route: &route,
            body: &body,
            websocket: client_upgrade.is_some(),
            trace: trace.as_ref(),
        };
        let mut upstream_wait = std::time::Duration::ZERO;
        // If the client goes away while instances are tried, hyper drops
        // this future; the guard still writes the access record.
        let mut pending = Pending {
            rec,
            start,
            armed: true,
        };
        let merged = if affinity::is_mergeable_list(&parts.method, parts.uri.path()) {
            send::merged_list(gw, &out, &mut pending.rec.attempts, &mut upstream_wait).await
        } else {
            None
        };
        let sent = match merged {
            Some(sent) => sent,
            None => send::failover(gw, &out, &mut pending.rec.attempts, &mut upstream_wait).await,
        };
        let creation = affinity::is_creation(&parts.method, parts.uri.path());
        let mut rec = pending.take();

        let (mut rparts, body, slot, backend) = match sent {
            Sent::Failed(e) => return local_error(e, rec, start),
            Sent::Stream { response, slot }
                if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
            {
                return match client_upgrade {
                    Some(client) => tunnel(response, slot, client, rec, start),
                    None => local_error(ProxyError::Internal, rec, start),
                };
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
        backend.count_response(rec.status);
        global_metrics()
            .overhead
            .record(start.elapsed().saturating_sub(upstream_wait).as_secs_f64());

        let finish = Finish {
            record: rec,
            start,
            in_flight: slot,
            breaker: gw.config.circuit_breaker,
            clock: gw.clock,
        };
        let body: ProxyBody = match body {
            Either::Stream(b) if creation && rparts.status.is_success() => {
                let b = Sniff::new(
                    b,
                    Arc::clone(&gw.affinity),
                    backend.index,
                    gw.clock.now_ms(),
                );
                BoxBody::new(Tracked::new(
                    b,
                    Some(gw.config.timeouts.stream_idle),
                    finish,
                ))
            }
            Either::Stream(b) => BoxBody::new(Tracked::new(
                b,
                Some(gw.config.timeouts.stream_idle),
                finish,
            )),
            Either::Full(b) => BoxBody::new(Tracked::new(b, None, finish)),
        };
        Response::from_parts(rparts, body)
    }
}

/// Writes the access record of a request whose future was dropped (the
/// client disconnected) before a response existed.
struct Pending {
    rec: AccessRecord,
    start: Instant,
    armed: bool,
}

impl Pending {
    fn take(&mut self) -> AccessRecord {
        self.armed = false;
        std::mem::replace(&mut self.rec, AccessRecord::placeholder())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            let rec = &mut self.rec;
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

/// Joins the client's and the instance's upgraded connections and copies
/// bytes both ways until either side closes. The access record is written
/// when the tunnel ends; the in-flight slot is held until then.
fn tunnel(
    mut response: Response<Incoming>,
    slot: crate::backend::InFlight,
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
    slot.backend().count_response(rec.status);
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

/// Process-wide metric handles, created on first use (after the recorder
/// is installed) so the hot path skips the registry lookup.
pub(crate) struct GlobalMetrics {
    pub(crate) overhead: metrics::Histogram,
    pub(crate) duration_streamed: metrics::Histogram,
    pub(crate) duration_plain: metrics::Histogram,
}

pub(crate) fn global_metrics() -> &'static GlobalMetrics {
    static CELL: std::sync::OnceLock<GlobalMetrics> = std::sync::OnceLock::new();
    CELL.get_or_init(|| GlobalMetrics {
        overhead: metrics::histogram!("aoai_lb_overhead_seconds"),
        duration_streamed: metrics::histogram!("aoai_lb_request_duration_seconds", "streamed" => "true"),
        duration_plain: metrics::histogram!("aoai_lb_request_duration_seconds", "streamed" => "false"),
    })
}

enum Either {
    Stream(Incoming),
    Full(Full<Bytes>),
}

/// Answers `e` from the gateway itself and writes the access record now:
/// the body is a few hundred bytes in memory.
fn local_error(e: ProxyError, mut rec: AccessRecord, start: Instant) -> Response<ProxyBody> {
    let mut resp = e.clone().into_response(full_body);
    resp.headers_mut()
        .insert(GATEWAY_REQUEST_ID.clone(), rec.request_id.clone());
    let status = resp.status().as_u16();
    metrics::counter!("aoai_lb_client_errors_total", "reason" => e.label()).increment(1);
    metrics::counter!("aoai_lb_requests_total", "instance" => "none", "code" => status_class(status))
        .increment(1);
    let elapsed = start.elapsed();
    let m = global_metrics();
    m.duration_plain.record(elapsed.as_secs_f64());
    if rec.attempts.is_empty() {
        m.overhead.record(elapsed.as_secs_f64());
    }
    rec.status = status;
    rec.error = Some(e.label());
    rec.total_ms = crate::log::ms(elapsed);
    rec.timestamp = rfc3339_ms(SystemTime::now());
    rec.emit();
    resp
}

fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
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
