//! The time the admission model and the prompt cache see.
//!
//! A [`SimClock`] is the system's monotonic clock plus an offset that tests can
//! move forward, or a frozen instant that moves only when told to. Instances
//! that share a clock (pass the same one to each [`crate::InstanceConfig`]) see
//! the same time, so a test can advance a whole fleet at once. Latency (time to
//! first token, per-token delays) stays on real time: only quota windows follow
//! this clock.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Inner {
    /// Real instant the clock was created at.
    origin: Instant,
    /// Nanoseconds added to real time: `advance` adds, `resume` subtracts the
    /// time spent frozen (so it can be negative).
    offset_ns: AtomicI64,
    /// When frozen: nanoseconds since `origin` at which time stands still.
    frozen: AtomicBool,
    frozen_at_ns: AtomicU64,
    /// Serialises freeze/resume against concurrent advances.
    lock: Mutex<()>,
}

/// A clock for the admission windows; cheap to clone, clones share one time.
///
/// Default: [`SimClock::system`]. A clock never goes backwards.
#[derive(Debug, Clone)]
pub struct SimClock {
    inner: Arc<Inner>,
}

impl Default for SimClock {
    fn default() -> Self {
        Self::system()
    }
}

impl PartialEq for SimClock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl SimClock {
    /// Real time, movable forward with [`SimClock::advance`].
    pub fn system() -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                offset_ns: AtomicI64::new(0),
                frozen: AtomicBool::new(false),
                frozen_at_ns: AtomicU64::new(0),
                lock: Mutex::new(()),
            }),
        }
    }

    /// A clock that stands still until [`SimClock::advance`] moves it: time in
    /// the admission model then depends only on what the test does.
    pub fn manual() -> Self {
        let c = Self::system();
        c.freeze();
        c
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current instant.
    pub fn now(&self) -> Instant {
        self.inner.origin + Duration::from_nanos(self.elapsed_ns())
    }

    /// Time since the clock was created (offsets included).
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns())
    }

    fn elapsed_ns(&self) -> u64 {
        let i = &self.inner;
        if i.frozen.load(Ordering::Acquire) {
            i.frozen_at_ns.load(Ordering::Acquire)
        } else {
            nanos(i.origin.elapsed()).saturating_add_signed(i.offset_ns.load(Ordering::Acquire))
        }
    }

    /// Move time forward by `d` (a frozen clock stays frozen at the new time).
    pub fn advance(&self, d: Duration) {
        let _g = self.guard();
        let i = &self.inner;
        if i.frozen.load(Ordering::Acquire) {
            let t = i.frozen_at_ns.load(Ordering::Acquire);
            i.frozen_at_ns
                .store(t.saturating_add(nanos(d)), Ordering::Release);
        }
        let o = i.offset_ns.load(Ordering::Acquire);
        let d = i64::try_from(nanos(d)).unwrap_or(i64::MAX);
        i.offset_ns.store(o.saturating_add(d), Ordering::Release);
    }

    /// Stop time at the current instant.
    pub fn freeze(&self) {
        let _g = self.guard();
        let now = self.elapsed_ns();
        self.inner.frozen_at_ns.store(now, Ordering::Release);
        self.inner.frozen.store(true, Ordering::Release);
    }

    /// Let time run again from where it stands.
    pub fn resume(&self) {
        let _g = self.guard();
        let i = &self.inner;
        if !i.frozen.load(Ordering::Acquire) {
            return;
        }
        let at = i.frozen_at_ns.load(Ordering::Acquire);
        // Real time kept running while frozen: shift the offset so that the
        // clock continues from `at`, never jumping back or forward.
        let real = i128::from(nanos(i.origin.elapsed()));
        let offset = i128::from(at) - real;
        let offset = i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
        i.offset_ns.store(offset, Ordering::Release);
        i.frozen.store(false, Ordering::Release);
    }

    /// Whether the clock is frozen.
    pub fn is_frozen(&self) -> bool {
        self.inner.frozen.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = SimClock::manual();
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(10));
        assert_eq!(c.now(), t0 + Duration::from_secs(10));
    }

    #[test]
    fn system_clock_runs_and_can_be_pushed_forward() {
        let c = SimClock::system();
        let t0 = c.now();
        c.advance(Duration::from_secs(60));
        assert!(c.now() >= t0 + Duration::from_secs(60));
    }

    #[test]
    fn resume_continues_from_the_frozen_time_without_jumping() {
        let c = SimClock::system();
        c.freeze();
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(20));
        c.resume();
        let t1 = c.now();
        assert!(t1 >= t0);
        assert!(t1 < t0 + Duration::from_millis(15), "{:?}", t1 - t0);
    }

    #[test]
    fn clones_share_one_time() {
        let a = SimClock::manual();
        let b = a.clone();
        a.advance(Duration::from_secs(3));
        assert_eq!(a.now(), b.now());
        assert_eq!(a, b);
        assert_ne!(a, SimClock::manual());
    }
}
