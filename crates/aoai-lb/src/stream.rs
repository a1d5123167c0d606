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
//! - shows every data chunk to its [`BodyEnd`] and tells it exactly once
//!   how the body ended (end, abort or drop). What happens then (the
//!   access record, the breaker, the in-flight slot, usage and limits) is
//!   the business of the `BodyEnd`, not of this module.
//!
//! Also owns [`ProxyBody`], the body type of every response the gateway
//! returns.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use http_body_util::combinators::BoxBody;

use crate::pipeline::account::Account;
use crate::pool::UpstreamBody;
use tokio::time::Sleep;

/// The error type of response bodies served by the gateway.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway returns: the two common
/// shapes by their own types, so serving them needs no dynamic call per
/// frame; anything else boxed.
pub enum ProxyBody {
    /// A complete in-memory body made by the gateway (errors, probes).
    Full(Full<Bytes>),
    /// An instance's body streaming through with accounting. Boxed all the
    /// same (about 1 KiB): the response moves through several futures on
    /// its way out, and each would reserve room for it inline, in every
    /// connection's task.
    Upstream(Box<Tracked<UpstreamBody, Account>>),
    /// The rarer shapes: a buffered error answer, a sniffed creation answer.
    Boxed(BoxBody<Bytes, BodyError>),
}

impl ProxyBody {
    /// Boxes any body with the gateway's error type.
    pub fn boxed<B>(b: B) -> Self
    where
        B: Body<Data = Bytes, Error = BodyError> + Send + Sync + 'static,
    {
        ProxyBody::Boxed(BoxBody::new(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(f) => Poll::Ready(f.map(|f| f.map_err(|never| match never {}))),
                Poll::Pending => Poll::Pending,
            },
            ProxyBody::Upstream(b) => Pin::new(b.as_mut()).poll_frame(cx),
            ProxyBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Boxed(b) => b.size_hint(),
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyBody::Full(_) => "ProxyBody::Full",
            ProxyBody::Upstream(_) => "ProxyBody::Upstream",
            ProxyBody::Boxed(_) => "ProxyBody::Boxed",
        })
    }
}

/// A complete in-memory body.
pub fn full_body(b: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::Full(Full::new(b.into()))
}

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
    /// The access-log `error` value.
    pub fn label(self) -> &'static str {
        match self {
            StreamError::Idle => "stream_idle_timeout",
            StreamError::Upstream => "upstream_aborted",
        }
    }
}

/// How a response body ended, told to its [`BodyEnd`] exactly once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ended {
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// When the first non-empty chunk went out.
    pub first_byte: Option<Instant>,
    /// `None` for a clean end; else the access-log reason
    /// (`stream_idle_timeout`, `upstream_aborted`, `client_disconnected`).
    pub error: Option<&'static str>,
    /// True when the instance is to blame (idle gap, broken body), so the
    /// breaker should hear of it.
    pub failed: bool,
}

/// What a [`Tracked`] body reports to while it streams and when it ends.
pub trait BodyEnd: Send + 'static {
    /// Sees every data chunk on its way to the client and returns what is
    /// sent instead. The default passes the chunk through unchanged.
    fn data(&mut self, chunk: Bytes) -> Bytes {
        chunk
    }

    /// Bytes held back by [`BodyEnd::data`] that go out after the
    /// instance's body ended cleanly (sent before the end). The default has
    /// none.
    fn flush(&mut self) -> Option<Bytes> {
        None
    }

    /// True when [`BodyEnd::data`] may change the body's length, so the
    /// instance's size hint no longer holds. Asked once, when the body is
    /// wrapped. The default is false.
    fn rewrites(&self) -> bool {
        false
    }

    /// Called exactly once: at the end of the body, when it fails, or when
    /// it is dropped unfinished (the client went away).
    fn ended(self, how: Ended);
}

/// A response body passed through frame by frame, with accounting.
pub struct Tracked<B: Body, E: BodyEnd> {
    inner: B,
    idle: Option<Duration>,
    /// Armed on the first wait for the instance, so a body that is already
    /// buffered never touches the timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
    last_activity: Instant,
    bytes: u64,
    first_byte: Option<Instant>,
    finish: Option<E>,
    /// Held-back bytes still to send after the instance's body ended.
    tail: Option<Bytes>,
    /// The end may change the body's length (see [`BodyEnd::rewrites`]).
    rewrites: bool,
}

impl<B: Body, E: BodyEnd> Tracked<B, E> {
    /// Wraps `inner`. With `idle`, a gap longer than that between frames
    /// aborts the body with [`StreamError::Idle`].
    pub fn new(inner: B, idle: Option<Duration>, finish: E) -> Self {
        let rewrites = finish.rewrites();
        Self {
            inner,
            idle,
            sleep: None,
            last_activity: Instant::now(),
            bytes: 0,
            first_byte: None,
            finish: Some(finish),
            tail: None,
            rewrites,
        }
    }

    fn count(&mut self, data: &Bytes) {
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(Instant::now());
        }
        self.bytes += data.len() as u64;
    }

    /// The instance's body ended cleanly: keeps what the end still has to
    /// send (counted now) and settles.
    fn end_cleanly(&mut self) {
        if let Some(tail) = self.finish.as_mut().and_then(BodyEnd::flush)
            && !tail.is_empty()
        {
            self.count(&tail);
            self.tail = Some(tail);
        }
        self.settle(None, false);
    }

    fn settle(&mut self, error: Option<&'static str>, failed: bool) {
        if let Some(f) = self.finish.take() {
            f.ended(Ended {
                bytes: self.bytes,
                first_byte: self.first_byte,
                error,
                failed,
            });
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

impl<B, E> Body for Tracked<B, E>
where
    B: Body<Data = Bytes> + Unpin,
    E: BodyEnd + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(tail) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if this.finish.is_none() && this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle_expired(cx) {
                        this.settle(Some(StreamError::Idle.label()), true);
                        return Poll::Ready(Some(Err(Box::new(StreamError::Idle))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if this.idle.is_some() {
                                this.last_activity = Instant::now();
                            }
                            let data = match this.finish.as_mut() {
                                Some(f) => f.data(data),
                                None => data,
                            };
                            if data.is_empty() && !this.inner.is_end_stream() {
                                // Held back entirely: nothing to send yet.
                                continue;
                            }
                            this.count(&data);
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    if this.inner.is_end_stream() {
                        this.end_cleanly();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(_))) => {
                    // The lower-level error is not passed on: it may
                    // describe the instance's address.
                    this.settle(Some(StreamError::Upstream.label()), true);
                    return Poll::Ready(Some(Err(Box::new(StreamError::Upstream))));
                }
                Poll::Ready(None) => {
                    if this.finish.is_some() {
                        this.end_cleanly();
                    }
                    return Poll::Ready(this.tail.take().map(|t| Ok(Frame::data(t))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrites {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B: Body, E: BodyEnd> Drop for Tracked<B, E> {
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
    use http_body_util::{Full, StreamBody};
    use std::sync::{Arc, Mutex};

    /// Records how the body ended; upper-cases what it sees.
    struct Probe(Arc<Mutex<Vec<Ended>>>);

    impl BodyEnd for Probe {
        fn data(&mut self, chunk: Bytes) -> Bytes {
            Bytes::from(chunk.to_ascii_uppercase())
        }
        fn ended(self, how: Ended) {
            self.0.lock().unwrap().push(how);
        }
    }

    #[tokio::test]
    async fn tells_the_end_once_and_sends_what_the_end_returns() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let body = Tracked::new(
            Full::new(Bytes::from_static(b"hello")),
            None,
            Probe(seen.clone()),
        );
        assert_eq!(drain(body).await.unwrap(), b"HELLO");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].bytes, 5);
        assert_eq!(seen[0].error, None);
        assert!(!seen[0].failed);
    }

    #[tokio::test]
    async fn a_dropped_unfinished_body_ends_as_a_client_disconnect() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let chunks =
            futures_util::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>();
        let body = Tracked::new(
            StreamBody::new(Box::pin(chunks)),
            Some(Duration::from_secs(60)),
            Probe(seen.clone()),
        );
        drop(body);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].error, Some("client_disconnected"));
        assert!(!seen[0].failed);
    }
}
