//! The request lifecycle of one instance, in the order Azure applies its rules:
//! admin routes → read body → journal → faults → route → `api-version` → auth →
//! deployment → quota → operation → latency → common headers.
//!
//! The router is hand-written over the path's segments: it allocates nothing and
//! keeps the common case (a chat completion) a handful of string compares.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::azure;
use crate::body::{Meter, SimBody, Timed, Tracker};
use crate::fault::Applied;
use crate::journal::{Outcome, Record, mask_credential};
use crate::ratelimit::{Refusal, Remaining};
use crate::server::{ConnShared, Instance};
use crate::usage::Billing;

pub(crate) const JSON: HeaderValue = HeaderValue::from_static("application/json");
pub(crate) const SSE: HeaderValue = HeaderValue::from_static("text/event-stream; charset=utf-8");
pub(crate) const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

// Header names built once: `from_static` validates its input on every call.
const H_APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
const H_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const H_REGION: HeaderName = HeaderName::from_static("x-ms-region");
const H_REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const H_REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const H_UTILIZATION: HeaderName = HeaderName::from_static("azure-openai-deployment-utilization");
const H_LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const H_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const H_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
const H_DEPLOYMENT_NAME: HeaderName = HeaderName::from_static("x-ms-deployment-name");
const H_INSTANCE: HeaderName = HeaderName::from_static("x-aoai-sim-instance");

/// A deployment-scoped operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Chat,
    Completions,
    Embeddings,
    Images,
    ImageEdits,
    Transcriptions,
    Translations,
    Speech,
    Responses,
}

impl Op {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Op::Chat => "chat",
            Op::Completions => "completions",
            Op::Embeddings => "embeddings",
            Op::Images | Op::ImageEdits => "images",
            Op::Transcriptions => "transcriptions",
            Op::Translations => "translations",
            Op::Speech => "speech",
            Op::Responses => "responses",
        }
    }

    fn from_tail(tail: &str) -> Option<Op> {
        Some(match tail {
            "chat/completions" => Op::Chat,
            "completions" => Op::Completions,
            "embeddings" => Op::Embeddings,
            "images/generations" => Op::Images,
            "images/edits" => Op::ImageEdits,
            "audio/transcriptions" => Op::Transcriptions,
            "audio/translations" => Op::Translations,
            "audio/speech" => Op::Speech,
            _ => return None,
        })
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// Dated surface, deployment in the path.
    Deployment(&'a str, Op),
    /// v1 surface (or dated `/responses`), deployment in the body `model`.
    BodyModel(Op),
    Models,
    Model(&'a str),
    Files,
    File(&'a str),
    FileContent(&'a str),
    Batches,
    Batch(&'a str),
    BatchCancel(&'a str),
    Response(&'a str),
    Realtime,
    NotFound,
}

/// Parse `path` into a route; the flag is true on the v1 surface.
pub(crate) fn route<'a>(method: &Method, path: &'a str) -> (Route<'a>, bool) {
    let Some(rest) = path.strip_prefix("/openai/") else {
        return (Route::NotFound, false);
    };
    let (rest, v1) = match rest.strip_prefix("v1/") {
        Some(r) => (r, true),
        None if rest == "v1" => ("", true),
        None => (rest, false),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let get = method == Method::GET;
    let post = method == Method::POST;
    let del = method == Method::DELETE;
    let r = if let Some(d) = rest.strip_prefix("deployments/").filter(|_| !v1) {
        match d.split_once('/') {
            Some((dep, tail)) if post && !dep.is_empty() => {
                Op::from_tail(tail).map_or(Route::NotFound, |op| Route::Deployment(dep, op))
            }
            _ => Route::NotFound,
        }
    } else {
        let mut seg = rest.splitn(3, '/');
        let a = seg.next().unwrap_or("");
        let b = seg.next();
        let c = seg.next();
        match (a, b, c) {
            ("models", None, None) if get => Route::Models,
            ("models", Some(id), None) if get && !id.is_empty() => Route::Model(id),
            ("files", None, None) if get || post => Route::Files,
            ("files", Some(id), None) if (get || del) && !id.is_empty() => Route::File(id),
            ("files", Some(id), Some("content")) if get && !id.is_empty() => Route::FileContent(id),
            ("batches", None, None) if get || post => Route::Batches,
            ("batches", Some(id), None) if get && !id.is_empty() => Route::Batch(id),
            ("batches", Some(id), Some("cancel")) if post && !id.is_empty() => {
                Route::BatchCancel(id)
            }
            ("responses", None, None) if post => Route::BodyModel(Op::Responses),
            ("responses", Some(id), None) if (get || del) && !id.is_empty() => Route::Response(id),
            ("realtime", None, None) if get => Route::Realtime,
            _ if v1 && post => Op::from_tail(rest).map_or(Route::NotFound, Route::BodyModel),
            _ => Route::NotFound,
        }
    };
    (r, v1)
}

/// The value of `key` in a raw query string (no percent-decoding: the values this
/// simulator reads are plain tokens).
pub(crate) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// What one request produced, before the common headers and fault shaping.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: HeaderValue,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) payload: Payload,
    pub(crate) deployment: Option<String>,
    pub(crate) remaining: Option<Remaining>,
    /// Usage to record in the ledger once the reply is sent.
    pub(crate) billing: Option<Billing>,
    /// Wait before sending headers (time to first token, or the whole reply time).
    pub(crate) delay: Duration,
    pub(crate) outcome: Outcome,
}

pub(crate) enum Payload {
    Full(Bytes),
    Frames(VecDeque<Timed>),
    /// Switch protocols; the response is a bare 101 with these headers.
    Upgrade,
}

impl Reply {
    pub(crate) fn new(
        status: StatusCode,
        content_type: HeaderValue,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            payload: Payload::Full(body.into()),
            deployment: None,
            remaining: None,
            billing: None,
            delay: Duration::ZERO,
            outcome: Outcome::Completed,
        }
    }

    pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::new(status, JSON, body)
    }

    pub(crate) fn ok_json(body: impl Into<Bytes>) -> Self {
        Self::json(StatusCode::OK, body)
    }

    pub(crate) fn not_found() -> Self {
        Self::json(StatusCode::NOT_FOUND, azure::RESOURCE_NOT_FOUND)
    }

    pub(crate) fn bad_request(message: &str, param: Option<&str>, code: Option<&str>) -> Self {
        Self::json(
            StatusCode::BAD_REQUEST,
            azure::invalid_request(message, param, code),
        )
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((HeaderName::from_static(name), v));
        }
        self
    }

    pub(crate) fn with_deployment(mut self, dep: &str) -> Self {
        self.deployment = Some(dep.to_owned());
        self
    }
}

/// Everything a handler may need about the request.
pub(crate) struct Ctx {
    pub(crate) inst: Arc<Instance>,
    pub(crate) parts: http::request::Parts,
    pub(crate) body: Bytes,
    pub(crate) api_version: String,
}

impl Ctx {
    /// Deployment check, then the admission model: reserve `cost` tokens and
    /// one request, or 429 (counted as `throttled` in the ledger).
    pub(crate) fn admit(&self, dep: &str, op: Op, cost: u64) -> Result<Remaining, Reply> {
        if !self.inst.cfg.serves(dep) {
            return Err(
                Reply::json(StatusCode::NOT_FOUND, azure::DEPLOYMENT_NOT_FOUND)
                    .with_deployment(dep),
            );
        }
        if let Some(ptu) = self.inst.cfg.ptu_for(dep) {
            return self
                .inst
                .ptu
                .charge(dep, ptu, cost, self.inst.clock.now())
                .map(Remaining::ptu)
                .map_err(|r| {
                    self.inst.ledger.throttled(dep);
                    ptu_rate_limited(op, &self.api_version, &r).with_deployment(dep)
                });
        }
        let Some(rl) = self.inst.cfg.rate_limit_for(dep) else {
            return Ok(Remaining::UNLIMITED);
        };
        self.inst
            .limiter
            .charge(dep, rl, cost, self.inst.clock.now())
            .map_err(|r| {
                self.inst.ledger.throttled(dep);
                let body = azure::rate_limit_reached(&azure::RateLimitMessage {
                    model: self.inst.cfg.model_for(dep),
                    deployment: dep,
                    region: &self.inst.cfg.region,
                    op: op.key(),
                    api_version: &self.api_version,
                    retry_after: r.retry_after,
                    tokens: r.tokens,
                });
                rate_limited(body, &r).with_deployment(dep)
            })
    }

    /// Content-filter check of a prompt (after charging: Azure bills filtered prompts).
    pub(crate) fn filter(&self, prompt: &str) -> Result<(), Reply> {
        if self.inst.faults.content_filtered(prompt) {
            return Err(Reply::json(StatusCode::BAD_REQUEST, azure::CONTENT_FILTER));
        }
        Ok(())
    }

    /// Parse the JSON body into `T`, or Azure-style 400.
    pub(crate) fn json<'de, T: serde::Deserialize<'de>>(&'de self) -> Result<T, Reply> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let msg = if e.is_syntax() || e.is_eof() {
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)".to_owned()
            } else {
                format!("Invalid request body: {e}")
            };
            Reply::bad_request(&msg, None, None)
        })
    }

    /// Scale a delay by this deployment's jitter.
    pub(crate) fn delay(&self, dep: Option<&str>, d: Duration) -> Duration {
        let pct = self.inst.cfg.latency_for(dep).jitter_pct;
        self.inst.jittered(d, pct)
    }
}

/// Azure's 429 from the admission model: `retry-after-ms` (exact),
/// `retry-after` (seconds, rounded up), `policy-id` naming the budget that
/// refused (`DeploymentRatelimit-Token` or `DeploymentRatelimit-Call`) and the
/// reset headers.
pub(crate) fn rate_limited(body: String, r: &Refusal) -> Reply {
    let ms = u64::try_from(r.retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut reply = Reply::json(StatusCode::TOO_MANY_REQUESTS, body)
        .header("retry-after", azure::ceil_secs(r.retry_after))
        .header("retry-after-ms", ms)
        .header(
            "policy-id",
            if r.tokens {
                azure::POLICY_TOKENS
            } else {
                azure::POLICY_CALLS
            },
        )
        .header(
            "x-ratelimit-reset-requests",
            azure::ceil_secs(r.reset_requests),
        )
        .header("x-ratelimit-reset-tokens", azure::ceil_secs(r.reset_tokens));
    reply.remaining = Some(r.remaining);
    reply
}

/// A provisioned deployment's 429 while its utilization is over 100%:
/// `retry-after-ms` until it is back at 100%, `retry-after` (seconds, rounded
/// up) and the utilization header. No `policy-id`: the token/call policies
/// are the standard deployments' quota.
fn ptu_rate_limited(op: Op, api_version: &str, r: &crate::ptu::PtuRefusal) -> Reply {
    let ms = u64::try_from(r.retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let body = azure::ptu_too_many_requests(op.key(), api_version, r.retry_after);
    let mut reply = Reply::json(StatusCode::TOO_MANY_REQUESTS, body)
        .header("retry-after", azure::ceil_secs(r.retry_after))
        .header("retry-after-ms", ms);
    reply.remaining = Some(Remaining::ptu(r.utilization));
    reply
}

fn fault_reply(
    status: u16,
    body: Option<String>,
    retry_after_ms: Option<u64>,
    op: Op,
    api_version: &str,
) -> Reply {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry = retry_after_ms.or((status == 429).then_some(1000));
    let text = match body {
        Some(b) => b,
        None if status == 429 => azure::too_many_requests(
            op.key(),
            api_version,
            Duration::from_millis(retry.unwrap_or(1000)),
            true,
        ),
        None => azure::canonical_error(status),
    };
    let ct = if text.trim_start().starts_with(['{', '[']) {
        JSON
    } else {
        TEXT
    };
    let mut reply = Reply::new(code, ct, text);
    if let Some(ms) = retry {
        let d = Duration::from_millis(ms);
        reply = reply
            .header("retry-after", azure::ceil_secs(d))
            .header("retry-after-ms", ms);
        if status == 429 {
            reply = reply
                .header("x-ratelimit-reset-requests", azure::ceil_secs(d))
                .header("x-ratelimit-reset-tokens", azure::ceil_secs(d));
            reply.remaining = Some(Remaining {
                requests: 0,
                tokens: 0,
                limits: None,
                utilization: None,
            });
        }
    }
    reply.outcome = Outcome::Faulted;
    reply
}

/// Append `q` to `out` with any `api-key` value masked (realtime accepts the key
/// in the query, and the journal must never hold it).
fn push_masked_query(out: &mut String, q: &str) {
    if !q.contains("api-key=") {
        out.push_str(q);
        return;
    }
    for (i, kv) in q.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(if kv.starts_with("api-key=") {
            "api-key=***"
        } else {
            kv
        });
    }
}

fn journal_entry(parts: &http::request::Parts, body: &[u8]) -> Record {
    let mut headers = String::with_capacity(256);
    for (k, v) in &parts.headers {
        let name = k.as_str();
        let value = String::from_utf8_lossy(v.as_bytes());
        headers.push_str(name);
        headers.push('\0');
        if name == "api-key" || name == "authorization" {
            headers.push_str(&mask_credential(name, &value));
        } else {
            // NUL separates the fields; HTTP forbids it in values anyway.
            headers.push_str(&value.replace('\0', ""));
        }
        headers.push('\0');
    }
    let path = parts.uri.path();
    let mut path_and_query = String::with_capacity(path.len() + 64);
    path_and_query.push_str(path);
    if let Some(q) = parts.uri.query() {
        path_and_query.push('?');
        push_masked_query(&mut path_and_query, q);
    }
    Record {
        seq: 0,
        received_at_ms: azure::unix_now_ms(),
        method: parts.method.clone(),
        path_and_query,
        path_len: path.len(),
        headers,
        body_len: body.len(),
        body_sha256: Sha256::digest(body).into(),
        deployment: None,
        status: 0,
        outcome: Outcome::InFlight,
        fault: None,
    }
}

/// Serve one request.
pub(crate) async fn handle(
    inst: Arc<Instance>,
    conn: Arc<ConnShared>,
    mut req: Request<Incoming>,
) -> Result<Response<SimBody>, Infallible> {
    if inst.cfg.admin && req.uri().path().starts_with("/_sim/") {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Ok(crate::admin::handle(&inst, &parts, &body));
    }
    let upgrade = if req.uri().path().ends_with("/realtime") {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let (parts, body) = req.into_parts();
    let (body, too_large) = match Limited::new(body, inst.cfg.max_body_bytes).collect().await {
        Ok(c) => (c.to_bytes(), false),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                (Bytes::new(), true)
            } else {
                // The client went away mid-body; nothing can be answered.
                let mut t =
                    Tracker::new(inst.clone(), inst.journal.push(journal_entry(&parts, &[])));
                t.finish(Outcome::ClientAborted);
                return Ok(Response::new(SimBody::empty()));
            }
        }
    };
    let seq = inst.journal.push(journal_entry(&parts, &body));
    let mut tracker = Tracker::new(inst.clone(), seq);
    let client_request_id = parts.headers.get("x-ms-client-request-id").cloned();

    let op_hint = match route(&parts.method, parts.uri.path()).0 {
        Route::Deployment(dep, op) => {
            // Known before any fault strikes, so faulted requests name it too.
            tracker.deployment = Some(dep.to_owned());
            op
        }
        Route::BodyModel(op) => op,
        _ => Op::Chat,
    };
    let api_version = query_param(parts.uri.query(), "api-version")
        .unwrap_or("")
        .to_owned();

    let mut body_fault = None;
    if let Some(applied) = inst.faults.take() {
        tracker.fault = Some(applied.kind());
        match applied {
            Applied::Fail {
                status,
                body,
                retry_after_ms,
            } => {
                let reply = fault_reply(status, body, retry_after_ms, op_hint, &api_version);
                return Ok(finish(&inst, reply, tracker, None, client_request_id));
            }
            Applied::Reset => {
                tracker.finish(Outcome::Faulted);
                conn.reset();
                std::future::pending::<()>().await;
            }
            Applied::Hang(Some(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Applied::Hang(None) => std::future::pending::<()>().await,
            other @ (Applied::CloseMidStream(_) | Applied::Drip { .. }) => {
                body_fault = Some(other);
            }
        }
    }

    let ctx = Ctx {
        inst: inst.clone(),
        parts,
        body,
        api_version,
    };
    let reply = if too_large {
        Reply::json(
            StatusCode::PAYLOAD_TOO_LARGE,
            r#"{"error":{"code":"RequestEntityTooLarge","message":"The request body is too large."}}"#,
        )
    } else {
        dispatch(&ctx, upgrade, conn)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    Ok(finish(&inst, reply, tracker, body_fault, client_request_id))
}

fn dispatch(ctx: &Ctx, upgrade: Option<hyper::upgrade::OnUpgrade>, conn: Arc<ConnShared>) -> Reply {
    let (route_, v1) = route(&ctx.parts.method, ctx.parts.uri.path());
    if route_ == Route::NotFound {
        return Reply::not_found();
    }
    if !v1 && ctx.api_version.is_empty() {
        return Reply::not_found();
    }
    let realtime = route_ == Route::Realtime;
    if let Err(refused) = crate::access::check(
        &ctx.inst,
        &ctx.parts.headers,
        ctx.parts.uri.query(),
        realtime,
    ) {
        return refused;
    }
    match route_ {
        Route::Deployment(dep, op) => {
            if !ctx.inst.cfg.serves(dep) {
                return Reply::json(StatusCode::NOT_FOUND, azure::DEPLOYMENT_NOT_FOUND)
                    .with_deployment(dep);
            }
            crate::openai::operation(ctx, Some(dep), op)
        }
        Route::BodyModel(op) => crate::openai::operation(ctx, None, op),
        Route::Realtime => crate::realtime::upgrade(ctx, v1, upgrade, conn),
        other => crate::store::handle(ctx, other),
    }
}

/// Add the common headers, shape the body for a body-level fault, and settle the
/// journal entry (or hand it to the body when the body outlives this call).
fn finish(
    inst: &Instance,
    reply: Reply,
    mut tracker: Tracker,
    body_fault: Option<Applied>,
    client_request_id: Option<HeaderValue>,
) -> Response<SimBody> {
    tracker.status = reply.status.as_u16();
    if tracker.deployment.is_none() {
        tracker.deployment = reply.deployment.clone();
    }
    let remaining = reply.remaining.unwrap_or_else(|| {
        // The route's deployment when the reply names none (401, 404, faults).
        tracker
            .deployment
            .as_deref()
            .map_or(Remaining::UNLIMITED, |d| {
                if let Some(ptu) = inst.cfg.ptu_for(d) {
                    Remaining::ptu(inst.ptu.peek(d, ptu, inst.clock.now()))
                } else if let Some(rl) = inst.cfg.rate_limit_for(d) {
                    inst.limiter.peek(d, rl, inst.clock.now())
                } else {
                    Remaining::UNLIMITED
                }
            })
    });
    let mut resp = Response::new(SimBody::empty());
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    h.reserve(12 + reply.headers.len());
    if !matches!(reply.payload, Payload::Upgrade) {
        h.insert(header::CONTENT_TYPE, reply.content_type.clone());
    }
    for name in [H_APIM_REQUEST_ID, H_REQUEST_ID] {
        if let Ok(v) = HeaderValue::try_from(azure::uuid()) {
            h.insert(name, v);
        }
    }
    h.insert(H_REGION, inst.region_hv.clone());
    if let Some(u) = remaining.utilization {
        // A provisioned deployment reports its utilization instead.
        if let Ok(v) = HeaderValue::from_str(&u.header()) {
            h.insert(H_UTILIZATION, v);
        }
    } else {
        h.insert(H_REMAINING_REQUESTS, HeaderValue::from(remaining.requests));
        h.insert(H_REMAINING_TOKENS, HeaderValue::from(remaining.tokens));
    }
    if let Some((req, tok)) = remaining.limits {
        h.insert(H_LIMIT_REQUESTS, HeaderValue::from(req));
        h.insert(H_LIMIT_TOKENS, HeaderValue::from(tok));
    }
    if let Some(v) = client_request_id {
        h.insert(H_CLIENT_REQUEST_ID, v);
    }
    if let Some(v) = reply
        .deployment
        .as_deref()
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert(H_DEPLOYMENT_NAME, v);
    }
    h.insert(H_INSTANCE, inst.name_hv.clone());
    for (k, v) in reply.headers {
        h.append(k, v);
    }

    let outcome = reply.outcome;
    // The reply goes out now: what it bills up front is recorded now; a
    // stream's content tokens are recorded by its body as they are sent.
    let billing = reply.billing;
    let bill = |extra: u64| {
        if let Some(b) = &billing {
            let mut u = b.upfront;
            u.completion_tokens += extra;
            inst.ledger.record(&b.deployment, &u);
        }
    };
    let meter = || {
        billing.as_ref().map(|b| Meter {
            inst: tracker.instance(),
            deployment: b.deployment.clone(),
        })
    };
    let body = match (reply.payload, body_fault) {
        (Payload::Upgrade, _) => {
            tracker.finish(Outcome::Upgraded);
            SimBody::empty()
        }
        (Payload::Full(b), None) => {
            bill(0);
            tracker.finish(outcome);
            SimBody::full(b)
        }
        (Payload::Full(b), Some(Applied::CloseMidStream(_))) => {
            // Half a JSON body reports no usage: nothing is billed.
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            let half = b.slice(..b.len() / 2);
            let frames = VecDeque::from([Timed {
                delay: Duration::ZERO,
                data: half,
                tokens: 0,
            }]);
            SimBody::timed(frames, Some(1), Some(tracker), None)
        }
        (Payload::Full(b), Some(Applied::Drip { bytes, interval_ms })) => {
            bill(0);
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            SimBody::timed(drip(&b, bytes, interval_ms), None, Some(tracker), None)
        }
        (Payload::Frames(frames), Some(Applied::CloseMidStream(k))) => {
            // A stream shorter than K chunks is still cut before its last chunk,
            // so the fault always bites.
            let k = (k as usize).min(frames.len().saturating_sub(1));
            bill(0);
            let meter = meter();
            SimBody::timed(frames, Some(k), Some(tracker), meter)
        }
        (Payload::Frames(frames), Some(Applied::Drip { bytes, interval_ms })) => {
            // Re-chunked bytes lose their token marks: bill the content up front.
            let mut all = Vec::new();
            let mut tokens = 0u64;
            for f in &frames {
                all.extend_from_slice(&f.data);
                tokens += u64::from(f.tokens);
            }
            bill(tokens);
            SimBody::timed(drip(&all, bytes, interval_ms), None, Some(tracker), None)
        }
        (Payload::Frames(frames), _) => {
            bill(0);
            let meter = meter();
            SimBody::timed(frames, None, Some(tracker), meter)
        }
        (Payload::Full(b), Some(_)) => {
            bill(0);
            tracker.finish(outcome);
            SimBody::full(b)
        }
    };
    *resp.body_mut() = body;
    resp
}

fn drip(all: &[u8], bytes: usize, interval_ms: u64) -> VecDeque<Timed> {
    let interval = Duration::from_millis(interval_ms);
    all.chunks(bytes.max(1))
        .enumerate()
        .map(|(i, c)| Timed {
            delay: if i == 0 { Duration::ZERO } else { interval },
            data: Bytes::copy_from_slice(c),
            tokens: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_maps_the_dated_and_v1_surfaces() {
        let p = Method::POST;
        assert_eq!(
            route(&p, "/openai/deployments/gpt-4o/chat/completions"),
            (Route::Deployment("gpt-4o", Op::Chat), false)
        );
        assert_eq!(
            route(&p, "/openai/v1/chat/completions"),
            (Route::BodyModel(Op::Chat), true)
        );
        assert_eq!(
            route(&p, "/openai/responses"),
            (Route::BodyModel(Op::Responses), false)
        );
        assert_eq!(
            route(&Method::GET, "/openai/files/file-1/content"),
            (Route::FileContent("file-1"), false)
        );
        assert_eq!(
            route(&Method::GET, "/openai/deployments/x/chat/completions").0,
            Route::NotFound
        );
        assert_eq!(route(&p, "/other").0, Route::NotFound);
        assert_eq!(
            route(&Method::GET, "/openai/v1/models"),
            (Route::Models, true)
        );
    }

    #[test]
    fn query_param_finds_exact_keys() {
        assert_eq!(
            query_param(Some("a=1&api-version=2024-10-21"), "api-version"),
            Some("2024-10-21")
        );
        assert_eq!(query_param(Some("xapi-version=1"), "api-version"), None);
        assert_eq!(query_param(None, "a"), None);
    }

    #[test]
    fn query_keys_are_masked_in_the_journal() {
        let mut out = String::new();
        push_masked_query(&mut out, "deployment=d&api-key=secret&x=1");
        assert_eq!(out, "deployment=d&api-key=***&x=1");
    }
}
