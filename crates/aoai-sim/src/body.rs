//! Response bodies: a whole buffer on the fast path, or a timed sequence of
//! frames for streams, dripped bodies and bodies cut short by a fault.
//!
//! A timed body owns the request's journal tracker, so the journal learns how the
//! response really ended: `Completed` is written just before the last frame is
//! handed to the connection (so a client that has seen the whole body always
//! finds the entry finished), `Faulted` when a fault cuts it, and
//! `ClientAborted` when the body is dropped early because the client went away.
//!
//! A timed body also meters a stream's completion tokens into the usage ledger
//! as each frame carrying them is handed to the connection, so a stream cut
//! short is billed for what was sent and no more.

use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::journal::Outcome;
use crate::server::Instance;

/// Error a cut body reports to the connection, which then closes it uncleanly.
#[derive(Debug, thiserror::Error)]
#[error("response body cut by a simulated fault")]
pub struct BodyCut;

/// Records the end of one request in the journal exactly once.
pub(crate) struct Tracker {
    inst: Arc<Instance>,
    seq: u64,
    pub(crate) status: u16,
    pub(crate) deployment: Option<String>,
    pub(crate) fault: Option<&'static str>,
    done: bool,
}

impl Tracker {
    pub(crate) fn new(inst: Arc<Instance>, seq: u64) -> Self {
        Self {
            inst,
            seq,
            status: 0,
            deployment: None,
            fault: None,
            done: false,
        }
    }

    /// The instance this request belongs to.
    pub(crate) fn instance(&self) -> Arc<Instance> {
        self.inst.clone()
    }

    pub(crate) fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.inst.journal.finish(
            self.seq,
            self.status,
            outcome,
            self.deployment.as_deref(),
            self.fault,
        );
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped unfinished: either the instance was stopped under the request
        // or the client went away (hyper drops the request's future then).
        let outcome = if self.inst.shutdown.is_cancelled() {
            Outcome::Stopped
        } else {
            Outcome::ClientAborted
        };
        self.finish(outcome);
    }
}

/// One frame of a timed body and how long to wait before sending it.
pub(crate) struct Timed {
    pub(crate) delay: Duration,
    pub(crate) data: Bytes,
    /// Completion tokens this frame carries (content chunks: 1 per choice chunk).
    pub(crate) tokens: u32,
}

/// Where a stream's completion tokens are recorded.
pub(crate) struct Meter {
    pub(crate) inst: Arc<Instance>,
    pub(crate) deployment: String,
}

pub(crate) struct TimedBody {
    frames: VecDeque<Timed>,
    /// One timer per body, re-armed for each delayed frame.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Number of frames after which the body fails instead of ending.
    cut_after: Option<usize>,
    sent: usize,
    yielded_before_cut: bool,
    tracker: Option<Tracker>,
    meter: Option<Meter>,
}

enum Inner {
    Full(Option<Bytes>),
    Timed(Box<TimedBody>),
}

/// The body type of every response the simulator sends.
pub struct SimBody {
    inner: Inner,
}

impl SimBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self {
            inner: Inner::Full(if b.is_empty() { None } else { Some(b) }),
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            inner: Inner::Full(None),
        }
    }

    pub(crate) fn timed(
        frames: VecDeque<Timed>,
        cut_after: Option<usize>,
        tracker: Option<Tracker>,
        meter: Option<Meter>,
    ) -> Self {
        Self {
            inner: Inner::Timed(Box::new(TimedBody {
                frames,
                sleep: None,
                armed: false,
                cut_after,
                sent: 0,
                yielded_before_cut: false,
                tracker,
                meter,
            })),
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = BodyCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Timed(t) => t.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Timed(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Timed(_) => SizeHint::default(),
        }
    }
}

impl TimedBody {
    fn finish(&mut self, outcome: Outcome) {
        if let Some(mut t) = self.tracker.take() {
            t.finish(outcome);
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyCut>>> {
        if self.cut_after.is_some_and(|k| self.sent >= k) {
            // Give the connection one chance to flush what was sent, so the client
            // really receives the first K chunks before the cut.
            if !self.yielded_before_cut {
                self.yielded_before_cut = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.finish(Outcome::Faulted);
            return Poll::Ready(Some(Err(BodyCut)));
        }
        let Some(front) = self.frames.front_mut() else {
            self.finish(Outcome::Completed);
            return Poll::Ready(None);
        };
        if !front.delay.is_zero() {
            let deadline = tokio::time::Instant::now() + front.delay;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            front.delay = Duration::ZERO;
            self.armed = true;
        }
        if self.armed {
            if self
                .sleep
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_pending())
            {
                return Poll::Pending;
            }
            self.armed = false;
        }
        let Some(frame) = self.frames.pop_front() else {
            return Poll::Ready(None);
        };
        self.sent += 1;
        if frame.tokens > 0
            && let Some(m) = &self.meter
        {
            m.inst
                .ledger
                .completion(&m.deployment, u64::from(frame.tokens));
        }
        if self.frames.is_empty() && self.cut_after.is_none() {
            self.finish(Outcome::Completed);
        }
        Poll::Ready(Some(Ok(Frame::data(frame.data))))
    }
}
