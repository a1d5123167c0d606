//! Talking to instances, with failover (the forward phase's engine).
//!
//! Owns reading the client's body into memory up to the cap so it can be
//! replayed, the per-attempt timeouts, and the failover loop over the
//! upstream client ([`crate::upstream`]):
//!
//! | Instance answer                                  | Action                          |
//! |--------------------------------------------------|---------------------------------|
//! | connect/TLS error, no headers in time            | next instance; breaker failure  |
//! | 429                                              | next instance; cool this one    |
//! | 500, 502, 503, 504                               | next instance; breaker failure  |
//! | 408                                              | next instance                   |
//! | 401, 403 (the instance's key is wrong)           | next instance; breaker failure  |
//! | 404 with code `DeploymentNotFound`               | next instance                   |
//! | anything else (2xx, 3xx, other 4xx)              | returned to the client as is    |
//!
//! Each instance is tried at most once per request. Once response headers
//! are returned, nothing is retried (see [`crate::stream`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};

use crate::backend::{Backend, InFlight, Outcome, Unavailable};
use crate::config::CooldownConfig;
use crate::error::ProxyError;
use crate::log::{Attempt, InstanceName, ms};
use crate::rewrite;
use crate::route::Route;
use crate::select::{IndexSet, Steering};
use crate::state::GatewayState;
use crate::steer;

/// Longest wait for the first token of an Entra ID credential (only the
/// requests that arrive before its first fetch completes wait).
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for a new token after a backend 401, before the replay.
const REPLAY_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// Largest error body (429, 5xx, 401/403, 404) kept in memory so it can be
/// returned unchanged if no other instance does better. Azure's error
/// bodies are a few hundred bytes.
const MAX_ERROR_BODY: usize = 256 * 1024;

/// Reads the client's body into memory, refusing more than `limit` bytes.
///
/// A declared `Content-Length` over the cap is refused before reading
/// anything; otherwise reading stops at the first byte past the cap, so an
/// unbounded body is never read to its end.
///
/// # Errors
/// [`ProxyError::BodyTooLarge`] over the cap, [`ProxyError::ClientBody`]
/// when the client's body fails.
pub async fn read_body(
    body: crate::relay::ClientBody,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, ProxyError> {
    use crate::relay::{BodyFailure, ClientBody};
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match body {
        ClientBody::Hyper(body) => read_capped(body, limit, None).await.map_err(|e| match e {
            ReadError::TooLarge => ProxyError::BodyTooLarge { limit },
            ReadError::Failed | ReadError::Idle => ProxyError::ClientBody,
        }),
        ClientBody::Ready(b) if b.len() > limit => Err(ProxyError::BodyTooLarge { limit }),
        ClientBody::Ready(b) => Ok(b),
        ClientBody::Relay(r) => r.read(limit).await.map_err(|e| match e {
            BodyFailure::TooLarge => ProxyError::BodyTooLarge { limit },
            BodyFailure::Failed => ProxyError::ClientBody,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadError {
    TooLarge,
    Failed,
    Idle,
}

/// Collects a body up to `limit` bytes, with an optional gap timeout. A
/// single-frame body is returned without copying.
async fn read_capped<B>(
    mut body: B,
    limit: usize,
    idle: Option<Duration>,
) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        let next = body.frame();
        let frame = match idle {
            Some(d) => tokio::time::timeout(d, next)
                .await
                .map_err(|_| ReadError::Idle)?,
            None => next.await,
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| ReadError::Failed)?.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit {
            return Err(ReadError::TooLarge);
        }
        match (&mut first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut buf = BytesMut::with_capacity(f.len() + data.len());
                buf.extend_from_slice(f);
                buf.extend_from_slice(&data);
                rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// What the failover loop ended with.
pub enum Sent {
    /// An instance's response to stream back as is.
    Stream {
        /// The response, body unread.
        response: crate::pool::UpstreamResponse,
        /// The instance's in-flight slot, held until the body ends.
        slot: InFlight,
    },
    /// An instance's response whose body was already read: an error kept
    /// as the last answer, or a non-retryable 404.
    Buffered {
        /// Status and headers as the instance sent them.
        parts: http::response::Parts,
        /// The body as the instance sent it.
        body: Bytes,
        /// The instance that answered.
        backend: Arc<Backend>,
    },
    /// No instance gave a usable answer.
    Failed(ProxyError),
}

/// How a response status is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Returned to the client.
    Final(Outcome),
    /// Tried elsewhere.
    Retry(Outcome),
    /// 404: depends on the body's code.
    Check404,
}

fn verdict(status: StatusCode) -> Verdict {
    match status.as_u16() {
        429 => Verdict::Retry(Outcome::Throttled),
        408 | 500 | 502 | 503 | 504 => Verdict::Retry(Outcome::ServerError),
        401 | 403 => Verdict::Retry(Outcome::BackendAuthError),
        404 => Verdict::Check404,
        400..=499 => Verdict::Final(Outcome::ClientError),
        _ => Verdict::Final(Outcome::Ok),
    }
}

/// Whether an error body is Azure's `DeploymentNotFound`.
fn is_deployment_not_found(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Outer {
        error: Option<InnerErr>,
    }
    #[derive(serde::Deserialize)]
    struct InnerErr {
        code: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Outer>(body)
        .ok()
        .and_then(|o| o.error)
        .and_then(|e| e.code)
        .is_some_and(|c| c.as_str() == Some("DeploymentNotFound"))
}

/// One request's input to the failover loop.
pub struct Outgoing<'a> {
    /// Method of the client request.
    pub method: &'a Method,
    /// The client path (without query).
    pub path: &'a str,
    /// The client query string.
    pub query: Option<&'a str>,
    /// Headers prepared by [`rewrite::prepare_request_headers`].
    pub headers: &'a HeaderMap,
    /// Routing result.
    pub route: &'a Route,
    /// The buffered client body.
    pub body: &'a Bytes,
    /// The body's caps and prompt as parsed for the request, for the
    /// steering estimate (`None`: not parsed, or not a JSON object).
    pub caps: Option<&'a crate::limits::Caps>,
    /// A WebSocket handshake: sent over HTTP/1.1 so it can be upgraded.
    pub websocket: bool,
    /// Instances this request must not use (outside the client's
    /// priority groups).
    pub excluded: IndexSet,
    /// The request's trace context while tracing is on: each attempt
    /// carries its own `traceparent`.
    pub trace: Option<&'a crate::otel::RequestTrace>,
}

/// The deployment whose lanes steer this request: its deployment while
/// `routing.rate_limit_aware` is on.
pub fn steered_deployment<'a>(gw: &GatewayState, route: &'a Route) -> Option<&'a str> {
    route
        .deployment
        .as_deref()
        .filter(|_| gw.config.routing.rate_limit_aware)
}

/// Tries candidates in selector order until one gives an answer to return.
/// Every attempt is appended to `attempts`, every instance passed over for
/// lack of rate-limit room to `skipped`; `upstream_wait` accumulates
/// time spent waiting on instances (for the overhead metric).
pub async fn failover(
    gw: &GatewayState,
    out: &Outgoing<'_>,
    attempts: &mut Vec<Attempt>,
    skipped: &mut Vec<steer::Skip>,
    upstream_wait: &mut Duration,
) -> Sent {
    let dep = out.route.deployment.as_deref();
    // Rate-limit steering: the request's Azure-style estimate, and which
    // instances were already reported as skipped.
    let steering = steered_deployment(gw, out.route);
    let estimate = steering.map_or(0, |_| steer::estimate(out.path, out.caps));
    let mut skipped_set = IndexSet::default();
    // A lane without predicted room is tried as a fallback (no lane has
    // room) until one such attempt meets a 429: that confirms the
    // prediction, and the lanes with even less room are not tried.
    let mut allow_fallback = true;
    // Picks that found nothing, redone in case a lane gained room since.
    let mut repicks = 0;
    let serves = |b: &Backend| {
        !out.excluded.contains(b.index)
            && dep.is_none_or(|d| b.config.backend_deployment(d).is_some())
    };
    let mut exclude = IndexSet::default();
    let mut last_response: Option<(http::response::Parts, Bytes, Arc<Backend>)> = None;
    let mut last_failure: Option<ProxyError> = None;
    let mut rng = fastrand::Rng::new();
    let timeouts = gw.config.timeouts;

    // A named stateful object lives on one instance. A known one goes
    // there first; an unknown one is looked up instance by instance, and a
    // 404 is then not final.
    let object = out.route.affinity_key.as_deref();
    let mut pinned = object.and_then(|id| gw.affinity.get(id, gw.clock.now_ms()));
    // Unknown here: another replica may have seen it created. One bounded
    // look-up, then today's search across the instances.
    if pinned.is_none()
        && let (Some(id), Some(shared)) = (object, &gw.shared)
        && let Some(name) = shared.lookup_object(id).await
    {
        pinned = gw.backends.iter().position(|b| b.name() == name);
        if let Some(i) = pinned {
            gw.affinity.remember(id, i, gw.clock.now_ms());
        }
    }

    loop {
        let now = gw.clock.now_ms();
        let mut fallback = false;
        let next = match pinned.take() {
            Some(p) if p < gw.backends.len() && serves(&gw.backends[p]) => {
                if let Err(Unavailable::Cooling(until)) =
                    gw.selector.health().check(&gw.backends[p], now)
                {
                    // No other instance holds the object: the client must
                    // wait for this one.
                    return Sent::Failed(ProxyError::AllCooling {
                        retry_after_ms: until.saturating_sub(now).max(1),
                    });
                }
                Some(p)
            }
            _ => match steering {
                Some(d) => {
                    let room = |b: &Backend| steer::headroom(b, d, estimate, now);
                    let mut note = |b: &Backend, reason| {
                        if !skipped_set.contains(b.index) {
                            skipped_set.insert(b.index);
                            steer::count_skip(b, reason);
                            skipped.push(steer::Skip {
                                instance: crate::log::InstanceName(Arc::clone(
                                    &gw.backends[b.index],
                                )),
                                reason: crate::lane::SkipReason::as_str(reason),
                            });
                        }
                    };
                    let mut steer = Steering {
                        room: &room,
                        skipped: &mut note,
                        allow_fallback,
                        fell_back: false,
                    };
                    let pick = gw.selector.pick_steered(
                        &gw.backends,
                        serves,
                        exclude,
                        now,
                        &mut rng,
                        &mut steer,
                    );
                    fallback = steer.fell_back;
                    pick
                }
                None => gw
                    .selector
                    .pick(&gw.backends, serves, exclude, now, &mut rng),
            },
        };
        let Some(i) = next else {
            if steering.is_some() && repicks < 1 {
                repicks += 1;
                continue;
            }
            break;
        };
        exclude.insert(i);
        let backend = &gw.backends[i];
        let Some(mut slot) = backend.try_acquire(now) else {
            // Lost the half-open probe to another request.
            continue;
        };
        // An Entra ID credential: the cached token. Only before the first
        // fetch has completed does this wait; without a valid token the
        // instance is skipped (it is not the instance's fault).
        let token = match &backend.token {
            None => None,
            Some(cache) => match cache
                .bearer(FIRST_TOKEN_WAIT.min(timeouts.response_headers))
                .await
            {
                Some(t) => Some(t),
                None => continue,
            },
        };
        let req = match build_request(out, backend, dep, token.as_ref().map(|t| &t.header)) {
            Ok(r) => r,
            Err(e) => return Sent::Failed(e),
        };
        // Azure reserves the estimate when it admits the request: count it
        // in the lane's ledger now.
        let lane = steering
            .and_then(|d| steer::lane(backend, d))
            .map(|(lane, limits)| {
                let sent = lane.with(|s| s.send(now, estimate));
                (lane, limits, sent)
            });
        let observe = |headers: &HeaderMap, status: StatusCode, retry_after_ms: u64| {
            if let Some((lane, limits, sent)) = &lane {
                let r = steer::reading(headers, status, retry_after_ms);
                lane.with(|s| s.observe(gw.clock.now_ms(), sent, &r, limits));
            }
        };

        let mut started = Instant::now();
        let mut result =
            tokio::time::timeout(timeouts.response_headers, send_one(gw, out.websocket, req)).await;
        let mut elapsed = started.elapsed();

        // A 401 to a token: fetch a new one and replay once on this
        // instance. A second 401 (or no newer token) fails over below.
        if let (Some(cache), Some(sent)) = (&backend.token, &token)
            && matches!(&result, Ok(Ok(r)) if r.status() == StatusCode::UNAUTHORIZED)
            && let Some(fresh) = cache.refresh_after_401(sent, REPLAY_TOKEN_WAIT).await
        {
            record(
                backend,
                attempts,
                Outcome::BackendAuthError,
                Some(StatusCode::UNAUTHORIZED),
                started,
                elapsed,
            );
            *upstream_wait += elapsed;
            drop(result);
            let req = match build_request(out, backend, dep, Some(&fresh.header)) {
                Ok(r) => r,
                Err(e) => return Sent::Failed(e),
            };
            started = Instant::now();
            result =
                tokio::time::timeout(timeouts.response_headers, send_one(gw, out.websocket, req))
                    .await;
            elapsed = started.elapsed();
        }

        let (outcome, status) = match result {
            Err(_) => {
                backend.record_failure(
                    gw.clock.now_ms(),
                    slot.is_probe(),
                    &gw.config.circuit_breaker,
                );
                last_failure = Some(ProxyError::UpstreamTimeout);
                (Outcome::Timeout, None)
            }
            Ok(Err(_)) => {
                // Never reached the instance: nothing was reserved.
                if let Some((lane, _, sent)) = &lane {
                    lane.with(|s| s.refund(gw.clock.now_ms(), sent));
                }
                // The error text is not kept: it can name the instance.
                backend.record_failure(
                    gw.clock.now_ms(),
                    slot.is_probe(),
                    &gw.config.circuit_breaker,
                );
                last_failure = Some(ProxyError::UpstreamConnect);
                (Outcome::ConnectError, None)
            }
            Ok(Ok(response)) => {
                let status = response.status();
                if status != StatusCode::TOO_MANY_REQUESTS {
                    slot.end_cooldown_probe();
                    observe(response.headers(), status, 0);
                }
                let v = match verdict(status) {
                    // An object named in the body and missing on this
                    // instance is a 400 ("Previous response with id ... not
                    // found"): read it to see whether it names the object.
                    Verdict::Final(_) if object.is_some() && status == StatusCode::BAD_REQUEST => {
                        Verdict::Check404
                    }
                    v => v,
                };
                if let Verdict::Final(outcome) = v {
                    if let Some(id) = object
                        && status.is_success()
                    {
                        if *out.method == Method::DELETE {
                            gw.affinity.forget(id);
                            if let Some(shared) = &gw.shared {
                                shared.forget(id);
                            }
                        } else {
                            let now = gw.clock.now_ms();
                            // Found by searching: worth telling the other
                            // replicas (a known id is not written again).
                            if gw.affinity.get(id, now) != Some(i)
                                && let Some(shared) = &gw.shared
                            {
                                shared.remember(id, backend.name());
                            }
                            gw.affinity.remember(id, i, now);
                        }
                    }
                    backend.record_success(slot.is_probe());
                    backend.record_latency(ms(elapsed));
                    record(backend, attempts, outcome, Some(status), started, elapsed);
                    *upstream_wait += elapsed;
                    return Sent::Stream { response, slot };
                }
                let (parts, body) = response.into_parts();
                let read = read_capped(body, MAX_ERROR_BODY, Some(timeouts.stream_idle)).await;
                elapsed = started.elapsed();
                let body = read.ok();
                let outcome = match v {
                    Verdict::Retry(o) => o,
                    _ if body.as_deref().is_some_and(is_deployment_not_found) => {
                        Outcome::DeploymentNotFound
                    }
                    _ => Outcome::ClientError,
                };
                let now = gw.clock.now_ms();
                match outcome {
                    Outcome::Throttled => {
                        backend.record_success(slot.is_probe());
                        let ms =
                            cooldown_ms(&parts.headers, &gw.config.cooldown, SystemTime::now());
                        backend.cool_down(now, ms);
                        observe(&parts.headers, status, ms);
                        if fallback {
                            allow_fallback = false;
                            if let Some((lane, _, _)) = &lane {
                                lane.with(|s| s.block_fallback(now));
                            }
                        }
                        if let Some(shared) = &gw.shared {
                            // What the instance now has left (a longer
                            // cooldown may have been running already).
                            let left = backend
                                .cooling_until(now)
                                .map_or(ms, |u| u.saturating_sub(now));
                            shared.publish_cooldown(backend.name(), left);
                        }
                        backend
                            .activity()
                            .throttled(now, status.as_u16(), ms, &parts.headers);
                    }
                    Outcome::ServerError if status != StatusCode::REQUEST_TIMEOUT => {
                        backend.record_failure(now, slot.is_probe(), &gw.config.circuit_breaker);
                    }
                    Outcome::BackendAuthError => {
                        backend.record_failure(now, slot.is_probe(), &gw.config.circuit_breaker);
                    }
                    _ => backend.record_success(slot.is_probe()),
                }
                // Looking up an object: this instance does not hold it, the
                // next one may.
                let object_miss = object.is_some_and(|id| {
                    status == StatusCode::NOT_FOUND
                        || (status == StatusCode::BAD_REQUEST
                            && body.as_deref().is_some_and(|b| mentions(b, id)))
                });
                if outcome == Outcome::ClientError && !object_miss {
                    record(backend, attempts, outcome, Some(status), started, elapsed);
                    *upstream_wait += elapsed;
                    return match body {
                        Some(body) => Sent::Buffered {
                            parts,
                            body,
                            backend: Arc::clone(backend),
                        },
                        None => Sent::Failed(ProxyError::UpstreamConnect),
                    };
                }
                match body {
                    Some(body) => last_response = Some((parts, body, Arc::clone(backend))),
                    None => last_failure = Some(ProxyError::UpstreamConnect),
                }
                (outcome, Some(status))
            }
        };
        record(backend, attempts, outcome, status, started, elapsed);
        *upstream_wait += elapsed;
        drop(slot);
    }

    let now = gw.clock.now_ms();
    if let Some(retry_after_ms) = gw.selector.all_cooling(&gw.backends, serves, now) {
        return Sent::Failed(ProxyError::AllCooling { retry_after_ms });
    }
    // Steering: nothing was tried because every lane is cooling or out of
    // room as a 429 confirmed; the same answer as when all are cooling,
    // with the wait until the first lane is predicted to have room.
    if let Some(d) = steering
        && last_response.is_none()
        && last_failure.is_none()
        && let Some(retry_after_ms) =
            steer::out_of_room_wait(gw.selector.health(), &gw.backends, serves, d, estimate, now)
    {
        return Sent::Failed(ProxyError::AllCooling { retry_after_ms });
    }
    if let Some((parts, body, backend)) = last_response {
        return Sent::Buffered {
            parts,
            body,
            backend,
        };
    }
    Sent::Failed(last_failure.unwrap_or(ProxyError::NoBackend))
}

/// True when an error body names the object id (quoted or not).
fn mentions(body: &[u8], id: &str) -> bool {
    let id = id.as_bytes();
    !id.is_empty() && body.windows(id.len()).any(|w| w == id)
}

/// The request for one attempt on `backend`: its URL and deployment name,
/// the body with `model` rewritten where needed, the prepared headers.
/// One attempt: a WebSocket handshake through the HTTP/1.1-only hyper-util
/// client (its upgrade needs it), anything else through the per-thread pool.
async fn send_one(
    gw: &GatewayState,
    websocket: bool,
    req: Request<Full<Bytes>>,
) -> Result<crate::pool::UpstreamResponse, crate::pool::PoolError> {
    if websocket {
        gw.client_h1
            .request(req)
            .await
            .map(|r| r.map(crate::pool::UpstreamBody::Hyper))
            .map_err(crate::pool::PoolError::Client)
    } else {
        gw.upstream.request(req).await
    }
}

fn build_request(
    out: &Outgoing<'_>,
    backend: &Backend,
    dep: Option<&str>,
    bearer: Option<&http::HeaderValue>,
) -> Result<Request<Full<Bytes>>, ProxyError> {
    let backend_dep = dep.and_then(|d| backend.config.backend_deployment(d));
    let uri = rewrite::upstream_uri(backend, out.path, out.query, out.route, backend_dep)
        .map_err(|_| ProxyError::Internal)?;
    let mut req = Request::new(Full::new(rewrite::upstream_body(
        out.method,
        out.body,
        out.route,
        backend_dep,
    )));
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = rewrite::attempt_headers(out.headers, backend, bearer);
    if let Some(t) = out.trace {
        req.headers_mut().insert(
            crate::otel::TRACEPARENT.clone(),
            t.traceparent(backend.index),
        );
    }
    Ok(req)
}

/// Largest list document read from one instance for merging.
const MAX_LIST_BODY: usize = 8 * 1024 * 1024;

/// Asks every available instance for a list of per-resource objects (files,
/// batches, ...) at once and merges the answers (see
/// [`crate::affinity::merge_lists`]).
///
/// Returns `None` when fewer than two instances are available (the normal
/// failover path serves it) or no instance answered with a list; then the
/// caller falls back to failover, which returns the last error as is.
pub async fn merged_list(
    gw: &GatewayState,
    out: &Outgoing<'_>,
    attempts: &mut Vec<Attempt>,
    upstream_wait: &mut Duration,
) -> Option<Sent> {
    let now = gw.clock.now_ms();
    let targets: Vec<&Arc<Backend>> = gw
        .backends
        .iter()
        .filter(|b| !out.excluded.contains(b.index) && gw.selector.health().check(b, now).is_ok())
        .collect();
    if targets.len() < 2 {
        return None;
    }
    let timeouts = gw.config.timeouts;
    let calls = targets.iter().map(|backend| async move {
        let slot = backend.try_acquire(now)?;
        let token = match &backend.token {
            None => None,
            Some(cache) => Some(cache.current()?),
        };
        let req = build_request(out, backend, None, token.as_ref().map(|t| &t.header)).ok()?;
        let started = Instant::now();
        let result = tokio::time::timeout(timeouts.response_headers, gw.client.request(req)).await;
        let (outcome, answer) = match result {
            Err(_) => (Outcome::Timeout, None),
            Ok(Err(_)) => (Outcome::ConnectError, None),
            Ok(Ok(response)) => {
                let status = response.status();
                let (parts, body) = response.into_parts();
                let body = read_capped(body, MAX_LIST_BODY, Some(timeouts.stream_idle))
                    .await
                    .ok();
                let outcome = match verdict(status) {
                    Verdict::Final(o) | Verdict::Retry(o) => o,
                    Verdict::Check404 => Outcome::ClientError,
                };
                (outcome, body.map(|b| (parts, b)))
            }
        };
        drop(slot);
        Some((
            Arc::clone(backend),
            outcome,
            answer,
            started,
            started.elapsed(),
        ))
    });
    let results = futures_util::future::join_all(calls).await;

    let mut lists = Vec::new();
    let mut first: Option<(http::response::Parts, Arc<Backend>)> = None;
    for (backend, outcome, answer, started, elapsed) in results.into_iter().flatten() {
        let status = answer.as_ref().map(|(p, _)| p.status);
        record(&backend, attempts, outcome, status, started, elapsed);
        *upstream_wait = (*upstream_wait).max(elapsed);
        if let Some((parts, body)) = answer
            && parts.status.is_success()
        {
            lists.push(body);
            if first.is_none() {
                first = Some((parts, backend));
            }
        }
    }
    let (mut parts, backend) = first?;
    let body = crate::affinity::merge_lists(&lists)?;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Some(Sent::Buffered {
        parts,
        body,
        backend,
    })
}

fn record(
    backend: &Arc<Backend>,
    attempts: &mut Vec<Attempt>,
    outcome: Outcome,
    status: Option<StatusCode>,
    started: Instant,
    elapsed: Duration,
) {
    backend.count_attempt(outcome);
    attempts.push(Attempt {
        instance: InstanceName(Arc::clone(backend)),
        outcome: outcome.as_str(),
        status: status.map(|s| s.as_u16()),
        ms: ms(elapsed),
        started,
    });
}

/// How long to cool an instance after a 429: `retry-after-ms`, else
/// `retry-after` (seconds or an HTTP date), else `x-ratelimit-reset-requests`
/// / `x-ratelimit-reset-tokens`, else `cooldown.default_ms`; at least 1 ms
/// and at most `cooldown.max_ms`. Zero or negative values count as absent
/// (the Responses API sends `x-ratelimit-reset-tokens: 0`).
pub fn cooldown_ms(headers: &HeaderMap, cfg: &CooldownConfig, now: SystemTime) -> u64 {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let positive = |x: f64| (x.is_finite() && x > 0.0).then_some(x);
    let ms = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(positive)
        .or_else(|| {
            text("retry-after").and_then(|v| match v.parse::<f64>() {
                Ok(secs) => positive(secs * 1000.0),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()
                    .and_then(|t| t.duration_since(now).ok())
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .and_then(positive),
            })
        })
        .or_else(|| {
            text("x-ratelimit-reset-requests")
                .and_then(parse_reset)
                .and_then(positive)
        })
        .or_else(|| {
            text("x-ratelimit-reset-tokens")
                .and_then(parse_reset)
                .and_then(positive)
        });
    match ms {
        // Saturating float-to-int conversion; the cap applies after.
        Some(ms) => (ms.ceil() as u64).clamp(1, cfg.max_ms),
        None => cfg.default_ms.clamp(1, cfg.max_ms),
    }
}

/// `x-ratelimit-reset-*` in ms: plain seconds (`"12"`, `"0.5"`) or a Go-style
/// duration (`"1m30s"`, `"250ms"`, `"6m0s"`).
fn parse_reset(v: &str) -> Option<f64> {
    if let Ok(secs) = v.parse::<f64>() {
        return Some(secs * 1000.0);
    }
    let mut total = 0.0;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    const CFG: CooldownConfig = CooldownConfig {
        default_ms: 10_000,
        max_ms: 60_000,
    };

    #[test]
    fn cooldown_prefers_retry_after_ms_then_retry_after() {
        let now = SystemTime::now();
        assert_eq!(
            cooldown_ms(
                &h(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
                &CFG,
                now
            ),
            1500
        );
        assert_eq!(cooldown_ms(&h(&[("retry-after", "3")]), &CFG, now), 3000);
        assert_eq!(cooldown_ms(&h(&[("retry-after", "0.25")]), &CFG, now), 250);
        assert_eq!(cooldown_ms(&h(&[]), &CFG, now), 10_000);
    }

    #[test]
    fn cooldown_reads_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        let mut m = HeaderMap::new();
        m.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        assert_eq!(cooldown_ms(&m, &CFG, now), 7000);
    }

    #[test]
    fn cooldown_falls_back_to_ratelimit_reset_and_caps() {
        let now = SystemTime::now();
        assert_eq!(
            cooldown_ms(&h(&[("x-ratelimit-reset-requests", "2s")]), &CFG, now),
            2000
        );
        assert_eq!(
            cooldown_ms(&h(&[("x-ratelimit-reset-tokens", "1m30s")]), &CFG, now),
            60_000
        );
        assert_eq!(
            cooldown_ms(
                &h(&[
                    ("x-ratelimit-reset-tokens", "0"),
                    ("x-ratelimit-reset-requests", "250ms")
                ]),
                &CFG,
                now
            ),
            250
        );
        assert_eq!(
            cooldown_ms(&h(&[("retry-after", "86400")]), &CFG, now),
            60_000
        );
        assert_eq!(
            cooldown_ms(&h(&[("x-ratelimit-reset-tokens", "-1")]), &CFG, now),
            10_000
        );
    }

    #[test]
    fn classifies_statuses_per_the_retry_table() {
        for s in [408, 429, 500, 502, 503, 504, 401, 403] {
            assert!(
                matches!(verdict(StatusCode::from_u16(s).unwrap()), Verdict::Retry(_)),
                "{s}"
            );
        }
        for s in [200, 201, 204, 400, 409, 413, 422] {
            assert!(
                matches!(verdict(StatusCode::from_u16(s).unwrap()), Verdict::Final(_)),
                "{s}"
            );
        }
        assert_eq!(verdict(StatusCode::NOT_FOUND), Verdict::Check404);
    }

    #[test]
    fn recognises_deployment_not_found_bodies() {
        assert!(is_deployment_not_found(
            br#"{"error":{"code":"DeploymentNotFound","message":"x"}}"#
        ));
        assert!(!is_deployment_not_found(
            br#"{"error":{"code":"404","message":"Resource not found"}}"#
        ));
        assert!(!is_deployment_not_found(b"not json"));
    }

    #[tokio::test]
    async fn read_capped_stops_past_the_limit() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_capped(body, 5, None).await, Err(ReadError::TooLarge));
        let body = Full::new(Bytes::from_static(b"01234"));
        assert_eq!(
            read_capped(body, 5, None).await.unwrap(),
            Bytes::from_static(b"01234")
        );
    }
}
