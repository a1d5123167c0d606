//! Phase 6: the response body on its way to the client.
//!
//! Owns [`Tracked`], a pass-through body wrapper. Frames go to the client
//! as they arrive, never collected, so each SSE event is flushed as soon as
//! the instance sends it. Along the way it:
//! - counts bytes and notes the time of the first byte;
//! - enforces the idle timeout between chunks (no total deadline);
//! - turns an upstream failure mid-body into a body error, which makes
//!   hyper abort the client's response (connection reset / stream reset)
//!   instead of ending it cleanly, so the client can tell;
//! - when the client goes away, hyper drops the body, which drops the
//!   upstream body and so cancels the upstream request at once;
//! - writes the access record exactly once (end, abort or drop), feeds the
//!   breaker on a mid-body failure and releases the in-flight slot.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::backend::{Clock, InFlight};
use crate::config::BreakerConfig;
use crate::log::{AccessRecord, ms, rfc3339_ms};

/// The error type of response bodies served by the gateway.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Why a response body ended badly. Messages never name an instance URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No chunk arrived within `timeouts.stream_idle`.
    #[error("upstream response body was idle for longer than the stream idle timeout")]
    Idle,
    /// The instance's connection failed mid-body.
    #[error("upstream response body ended abnormally")]
    Upstream,
}

impl StreamError {
    fn label(self) -> &'static str {
        match self {
            StreamError::Idle => "stream_idle_timeout",
            StreamError::Upstream => "upstream_aborted",
        }
    }
}

/// What is settled when the body ends.
pub struct Finish {
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
}

impl Finish {
    fn complete(
        mut self,
        bytes: u64,
        first_byte: Option<Instant>,
        error: Option<&'static str>,
        failed: bool,
    ) {
        let end = Instant::now();
        let r = &mut self.record;
        r.bytes = bytes;
        r.ttfb_ms = first_byte.map(|t| ms(t.duration_since(self.start)));
        r.total_ms = ms(end.duration_since(self.start));
        if r.error.is_none() {
            r.error = error;
        }
        r.timestamp = rfc3339_ms(SystemTime::now());
        if failed && let Some(slot) = &self.in_flight {
            slot.backend()
                .record_failure(self.clock.now_ms(), slot.is_probe(), &self.breaker);
        }
        let m = crate::proxy::global_metrics();
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

/// A response body passed through frame by frame, with accounting.
pub struct Tracked<B: Body> {
    inner: B,
    idle: Option<Duration>,
    /// Armed on the first wait for the instance, so a body that is already
    /// buffered never touches the timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
    last_activity: Instant,
    bytes: u64,
    first_byte: Option<Instant>,
    finish: Option<Finish>,
}

impl<B: Body> Tracked<B> {
    /// Wraps `inner`. With `idle`, a gap longer than that between frames
    /// aborts the body with [`StreamError::Idle`].
    pub fn new(inner: B, idle: Option<Duration>, finish: Finish) -> Self {
        Self {
            inner,
            idle,
            sleep: None,
            last_activity: Instant::now(),
            bytes: 0,
            first_byte: None,
            finish: Some(finish),
        }
    }

    fn settle(&mut self, error: Option<&'static str>, failed: bool) {
        if let Some(f) = self.finish.take() {
            f.complete(self.bytes, self.first_byte, error, failed);
        }
    }

    /// True when the idle timer fired for real (not merely re-armed).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(d) = self.idle else {
            return false;
        };
        let deadline = self.last_activity + d;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            // The timer is armed once and only pushed forward when it
            // fires, instead of being reset on every chunk.
            let deadline = self.last_activity + d;
            if deadline <= Instant::now() {
                return true;
            }
            sleep.as_mut().reset(deadline.into());
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.finish.is_none() && this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if this.idle_expired(cx) {
                    this.settle(Some(StreamError::Idle.label()), true);
                    return Poll::Ready(Some(Err(Box::new(StreamError::Idle))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.first_byte.is_none() && !data.is_empty() {
                        this.first_byte = Some(Instant::now());
                    }
                    this.bytes += data.len() as u64;
                    if this.idle.is_some() {
                        this.last_activity = Instant::now();
                    }
                }
                if this.inner.is_end_stream() {
                    this.settle(None, false);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                // The lower-level error is not passed on: it may describe
                // the instance's address.
                this.settle(Some(StreamError::Upstream.label()), true);
                Poll::Ready(Some(Err(Box::new(StreamError::Upstream))))
            }
            Poll::Ready(None) => {
                this.settle(None, false);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for Tracked<B> {
    fn drop(&mut self) {
        // Reached with the record unwritten only when hyper stopped
        // polling: either the body was complete (known length) or the
        // client went away. Dropping `inner` right after cancels the
        // upstream request.
        if self.finish.is_some() {
            let error = (!self.inner.is_end_stream()).then_some("client_disconnected");
            self.settle(error, false);
        }
    }
}

/// Polls a body to completion for tests and small local bodies.
pub async fn drain<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Result<Vec<u8>, B::Error> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::config::Config;
    use http::{HeaderValue, Method};
    use http_body_util::{Full, StreamBody};
    use std::sync::Arc;

    fn backend() -> Arc<Backend> {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#,
        )
        .unwrap();
        Arc::new(Backend::new(0, c.instances[0].clone(), &c.circuit_breaker).unwrap())
    }

    fn finish(b: &Arc<Backend>) -> Finish {
        Finish {
            record: AccessRecord {
                timestamp: String::new(),
                level: "INFO",
                target: "aoai_lb::access",
                message: "request",
                request_id: HeaderValue::from_static("t"),
                apim_request_id: None,
                method: Method::POST,
                path: "/".into(),
                deployment: None,
                attempts: Vec::new(),
                instance: None,
                status: 200,
                ttfb_ms: None,
                total_ms: 0.0,
                bytes: 0,
                streamed: false,
                error: None,
                trace: None,
            },
            start: Instant::now(),
            in_flight: b.try_acquire(1),
            breaker: BreakerConfig::default(),
            clock: Clock::new(),
        }
    }

    #[tokio::test]
    async fn passes_bytes_through_and_releases_the_slot_at_the_end() {
        let b = backend();
        let body = Tracked::new(Full::new(Bytes::from_static(b"hello")), None, finish(&b));
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
            finish(&b),
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
            finish(&b),
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
