//! Phase 6: settling a request once its response has ended.
//!
//! [`Account`] rides along with a response body ([`crate::stream::Tracked`])
//! and runs once when the body ends, fails or is dropped: it feeds the
//! breaker on a mid-body failure, records the duration, settles the
//! admission reservation with the usage read from the body (or with the
//! estimate when no usage is known), writes the access record and releases
//! the in-flight slot, in that order.
//!
//! [`reject`] is the same phase for an answer the gateway gives itself.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Response};

use crate::backend::{Clock, InFlight};
use crate::clients::Client;
use crate::config::BreakerConfig;
use crate::error::ProxyError;
use crate::limits::Reservation;
use crate::log::{AccessRecord, ms, rfc3339_ms};
use crate::state::GatewayState;
use crate::stream::{BodyEnd, Ended, ProxyBody, full_body};
use crate::usage::meter::Meter;
use crate::usage::{Endpoint, inject};
use crate::{route, usage};

use super::{GATEWAY_REQUEST_ID, RequestCtx};

pub use crate::usage::Usage;

/// Reads a response's token usage from the body on its way to the client.
pub trait UsageMeter: Send + Sync {
    /// Sees every data chunk; returns the bytes to send instead (to remove
    /// an event the gateway itself asked for; empty while held back).
    fn data(&mut self, chunk: Bytes) -> Bytes;

    /// Bytes still held back when the instance's body ended cleanly.
    fn flush(&mut self) -> Option<Bytes> {
        None
    }

    /// True when [`UsageMeter::data`] may change the body's length.
    fn rewrites(&self) -> bool {
        false
    }

    /// True when [`UsageMeter::finish`] would have to build a tokenizer
    /// first (the first estimate of the process).
    fn estimate_is_slow(&self, _complete: bool) -> bool {
        false
    }

    /// The usage once the body has ended (`complete` false when it was cut
    /// short); `None` when nothing can be said.
    fn finish(&mut self, complete: bool) -> Option<Usage>;
}

impl UsageMeter for Meter {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        Meter::data(self, chunk)
    }

    fn flush(&mut self) -> Option<Bytes> {
        Meter::flush(self)
    }

    fn rewrites(&self) -> bool {
        Meter::strips(self)
    }

    fn estimate_is_slow(&self, complete: bool) -> bool {
        Meter::estimate_is_slow(self, complete)
    }

    fn finish(&mut self, complete: bool) -> Option<Usage> {
        Meter::finish(self, complete)
    }
}

/// How the usage of a request will be read, decided before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePlan {
    /// The inference endpoint.
    pub endpoint: Endpoint,
    /// The gateway added `include_usage`: the usage chunk is removed.
    pub strip: bool,
}

/// Decides how `ctx`'s usage will be read (inference endpoints only) and,
/// for a streaming chat request that did not ask for usage on an
/// api-version that accepts it, makes the body that goes upstream carry
/// `stream_options.include_usage` (see [`crate::usage::inject`]).
pub fn plan_usage(ctx: &mut RequestCtx) {
    if ctx.parts.method != Method::POST || !route::body_is_json(&ctx.parts.headers) {
        return;
    }
    let path = ctx.parts.uri.path();
    let Some(endpoint) = Endpoint::from_path(path) else {
        return;
    };
    let strip = match inject::plan(endpoint, path, ctx.parts.uri.query(), &ctx.body) {
        inject::Plan::Injected(body) => {
            ctx.body = body;
            // Splice offsets (the `model` value) moved with the bytes.
            if ctx.route.model_span.is_some()
                && route::apply_body_model(&mut ctx.route, &ctx.body).is_err()
            {
                return;
            }
            true
        }
        _ => false,
    };
    ctx.usage = Some(UsagePlan { endpoint, strip });
}

/// What is settled when a response body ends.
pub struct Account {
    /// The record, complete except for the body-time fields.
    pub record: AccessRecord,
    /// When the gateway received the request.
    pub start: Instant,
    /// The in-flight slot of the instance serving the body, if any.
    pub in_flight: Option<InFlight>,
    /// For feeding a mid-body failure to the breaker.
    pub breaker: BreakerConfig,
    /// The gateway clock, for breaker deadlines.
    pub clock: Clock,
    /// The client the request came from.
    pub client: Option<Arc<Client>>,
    /// What admission reserved; settled here.
    pub reservation: Option<Reservation>,
    /// Reads the usage from the body, when the response has one.
    pub meter: Option<Box<dyn UsageMeter>>,
    /// The usage, once known.
    pub usage: Option<Usage>,
    /// Rates per client and deployment, for the status page.
    pub rates: Arc<crate::status::Rates>,
}

impl Account {
    /// The account of `ctx`'s response, with its record and the serving
    /// instance's slot.
    pub fn new(
        gw: &GatewayState,
        ctx: &mut RequestCtx,
        record: AccessRecord,
        in_flight: Option<InFlight>,
    ) -> Self {
        Self {
            record,
            start: ctx.start,
            in_flight,
            breaker: gw.config.circuit_breaker,
            clock: gw.clock.clone(),
            client: ctx.client.clone(),
            reservation: ctx.reservation.take(),
            meter: None,
            usage: None,
            rates: Arc::clone(&gw.rates),
        }
    }
}

impl BodyEnd for Account {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.meter {
            Some(m) => m.data(chunk),
            None => chunk,
        }
    }

    fn flush(&mut self) -> Option<Bytes> {
        self.meter.as_mut().and_then(|m| m.flush())
    }

    fn rewrites(&self) -> bool {
        self.meter.as_ref().is_some_and(|m| m.rewrites())
    }

    fn ended(self, how: Ended) {
        let end = Instant::now();
        // The first estimate of a process builds a tokenizer (a fraction of
        // a second): that must not hold up the connection's task.
        if self
            .meter
            .as_ref()
            .is_some_and(|m| m.estimate_is_slow(how.error.is_none()))
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn_blocking(move || self.complete(how, end));
            return;
        }
        self.complete(how, end);
    }
}

impl Account {
    /// Settles everything once the body has ended at `end`.
    fn complete(mut self, how: Ended, end: Instant) {
        if let Some(m) = &mut self.meter {
            self.usage = m.finish(how.error.is_none());
        }
        if let Some(u) = &self.usage {
            usage::count(
                self.client.as_deref().map_or("none", |c| &*c.name),
                self.record.deployment.as_deref().unwrap_or("none"),
                self.record.instance.as_ref().map_or("none", |i| i.as_str()),
                u,
            );
        }
        self.record.usage = self.usage;
        self.rates.record(
            self.client.as_deref().map(|c| &*c.name),
            self.record.deployment.as_deref(),
            self.usage.as_ref().map(Usage::total),
            false,
        );
        if let Some(r) = self.reservation.take() {
            match self.usage {
                Some(u) => r.settle(u.total()),
                None => r.keep_estimate(),
            }
        }
        let r = &mut self.record;
        r.bytes = how.bytes;
        r.ttfb_ms = how.first_byte.map(|t| ms(t.duration_since(self.start)));
        r.total_ms = ms(end.duration_since(self.start));
        if r.error.is_none() {
            r.error = how.error;
        }
        r.timestamp = rfc3339_ms(SystemTime::now());
        if how.failed
            && let Some(slot) = &self.in_flight
        {
            slot.backend()
                .record_failure(self.clock.now_ms(), slot.is_probe(), &self.breaker);
        }
        let m = crate::metrics::global();
        let h = if r.streamed {
            &m.duration_streamed
        } else {
            &m.duration_plain
        };
        h.record(end.duration_since(self.start).as_secs_f64());
        r.emit();
        // The in-flight slot is released here, with the record written.
        drop(self.in_flight.take());
    }
}

/// Answers `e` from the gateway itself and writes the access record now:
/// the body is a few hundred bytes in memory. A reservation taken for the
/// request is released: no instance produced tokens for it.
pub fn reject(gw: &GatewayState, ctx: &mut RequestCtx, e: ProxyError) -> Response<ProxyBody> {
    if let Some(r) = ctx.reservation.take() {
        r.settle(0);
    }
    let mut rec = ctx.take_record();
    gw.rates.record(
        ctx.client.as_deref().map(|c| &*c.name),
        rec.deployment.as_deref(),
        None,
        true,
    );
    let mut resp = e.clone().into_response(full_body);
    resp.headers_mut()
        .insert(GATEWAY_REQUEST_ID.clone(), rec.request_id.clone());
    if let Some(client) = &ctx.client {
        super::admit::rate_headers(gw, client, resp.headers_mut());
    }
    let status = resp.status().as_u16();
    metrics::counter!("aoai_lb_client_errors_total", "reason" => e.label()).increment(1);
    if let Some((client, reason)) = e.rejection() {
        metrics::counter!(crate::metrics::CLIENT_REJECTIONS_TOTAL, "client" => client.to_string(), "reason" => reason)
            .increment(1);
    }
    let client = ctx
        .client
        .as_ref()
        .map_or_else(|| "none".to_owned(), |c| c.name.to_string());
    metrics::counter!("aoai_lb_requests_total", "instance" => "none", "code" => status_class(status), "client" => client)
        .increment(1);
    let elapsed = ctx.start.elapsed();
    let m = crate::metrics::global();
    m.duration_plain.record(elapsed.as_secs_f64());
    if rec.attempts.is_empty() {
        m.overhead.record(elapsed.as_secs_f64());
    }
    rec.status = status;
    rec.error = Some(e.label());
    rec.total_ms = ms(elapsed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::config::Config;
    use crate::stream::{Tracked, drain};
    use http::{HeaderValue, Method};
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};
    use std::time::Duration;

    fn backend() -> Arc<Backend> {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#,
        )
        .unwrap();
        Arc::new(Backend::new(0, c.instances[0].clone(), &c.circuit_breaker).unwrap())
    }

    fn account(b: &Arc<Backend>) -> Account {
        let mut record = AccessRecord::placeholder();
        record.request_id = HeaderValue::from_static("t");
        record.method = Method::POST;
        record.path = "/".into();
        record.status = 200;
        Account {
            record,
            start: Instant::now(),
            in_flight: b.try_acquire(1),
            breaker: BreakerConfig::default(),
            clock: Clock::new(),
            client: None,
            reservation: None,
            meter: None,
            usage: None,
            rates: Arc::default(),
        }
    }

    #[tokio::test]
    async fn passes_bytes_through_and_releases_the_slot_at_the_end() {
        let b = backend();
        let body = Tracked::new(Full::new(Bytes::from_static(b"hello")), None, account(&b));
        assert_eq!(b.in_flight(), 1);
        let out = drain(body).await.unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(b.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_idle_gap_fails_the_body_instead_of_ending_it() {
        let b = backend();
        use futures_util::StreamExt as _;
        let chunks = futures_util::stream::iter(vec![Ok::<_, std::convert::Infallible>(
            Frame::data(Bytes::from_static(b"data: 1\n\n")),
        )])
        .chain(futures_util::stream::pending());
        let body = Tracked::new(
            StreamBody::new(Box::pin(chunks)),
            Some(Duration::from_millis(50)),
            account(&b),
        );
        let started = Instant::now();
        let r = drain(body).await;
        assert!(r.is_err(), "an idle stream must end with an error");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(b.failures(), 1, "fed to the breaker");
        assert_eq!(b.in_flight(), 0);
    }

    #[tokio::test]
    async fn dropping_an_unfinished_body_releases_the_slot() {
        let b = backend();
        let chunks =
            futures_util::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>();
        let body = Tracked::new(
            StreamBody::new(Box::pin(chunks)),
            Some(Duration::from_secs(60)),
            account(&b),
        );
        assert_eq!(b.in_flight(), 1);
        drop(body);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(
            b.failures(),
            0,
            "a client leaving is not the instance's fault"
        );
    }
}
