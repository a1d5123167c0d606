//! The recent past of one instance, for the status page: what its attempts
//! ended in over the last few minutes, when it was unavailable, and why it
//! was last throttled.
//!
//! Attempts are counted in fixed time buckets ([`BUCKET_MS`] each, the last
//! [`BUCKETS`] of them) with atomics, because every attempt records one and
//! the hot path takes no lock. A bucket is reused when its time comes round
//! again; an increment racing with that reset can be lost, which costs the
//! page one count at a bucket boundary and nothing else.
//!
//! Cooldowns and breaker openings are rare, so they go under a mutex: the
//! last [`MAX_INTERVALS`] periods of unavailability and the headers of the
//! last 429. Those header values come from the instance, never from a
//! client, and are kept only if short and printable (the page still renders
//! them as text).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use http::HeaderMap;

use crate::backend::Outcome;

/// Width of one history bucket: 5 s.
pub const BUCKET_MS: u64 = 5_000;
/// Buckets kept: 60, so the history covers the last 5 minutes.
pub const BUCKETS: usize = 60;
/// Periods of unavailability kept per instance.
pub const MAX_INTERVALS: usize = 32;
/// The 429 response headers worth showing, in the order the cooldown
/// reads them, then the remaining-quota headers.
pub const THROTTLE_HEADERS: [&str; 6] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
];
/// Longest header value kept.
const MAX_HEADER_VALUE: usize = 64;

/// How an attempt counts on the status page's strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// The instance answered (including 4xx that are the client's business).
    Ok,
    /// 429.
    Throttled,
    /// 5xx, timeout, connection or key failure.
    Failed,
}

impl From<Outcome> for Tally {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ok | Outcome::ClientError | Outcome::DeploymentNotFound => Tally::Ok,
            Outcome::Throttled => Tally::Throttled,
            Outcome::ServerError
            | Outcome::Timeout
            | Outcome::ConnectError
            | Outcome::BackendAuthError => Tally::Failed,
        }
    }
}

/// Why an instance could not take requests for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unavailability {
    /// Cooling down after a 429.
    Cooling,
    /// Circuit breaker open after failures.
    BreakerOpen,
}

/// One period of unavailability, in gateway clock ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub kind: Unavailability,
    pub from_ms: u64,
    pub until_ms: u64,
}

/// The last 429 an instance answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    /// Gateway clock ms when it arrived.
    pub at_ms: u64,
    /// The status (429).
    pub status: u16,
    /// The cooldown the gateway derived from it.
    pub cooldown_ms: u64,
    /// Those of [`THROTTLE_HEADERS`] the response carried, as sent.
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct Bucket {
    /// Which bucket number (time / BUCKET_MS) the counts belong to.
    epoch: AtomicU64,
    ok: AtomicU32,
    throttled: AtomicU32,
    failed: AtomicU32,
}

#[derive(Default)]
struct Events {
    intervals: VecDeque<Interval>,
    last_throttle: Option<Throttle>,
}

/// Counts for one bucket, as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub ok: u32,
    pub throttled: u32,
    pub failed: u32,
}

/// The recent activity of one instance.
pub struct Activity {
    buckets: Box<[Bucket]>,
    events: Mutex<Events>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds on a process-wide monotonic clock. History buckets use it
/// rather than the gateway clock so that recording an attempt needs no
/// clock passed in; both run at the same rate.
pub fn history_now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Activity {
    /// No history yet.
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            events: Mutex::new(Events::default()),
        }
    }

    /// Counts one attempt at `now` (from [`history_now_ms`]).
    pub fn record(&self, now: u64, tally: Tally) {
        let epoch = now / BUCKET_MS;
        let b = &self.buckets[slot(epoch)];
        let seen = b.epoch.load(Ordering::Acquire);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.ok.store(0, Ordering::Relaxed);
            b.throttled.store(0, Ordering::Relaxed);
            b.failed.store(0, Ordering::Relaxed);
        }
        let cell = match tally {
            Tally::Ok => &b.ok,
            Tally::Throttled => &b.throttled,
            Tally::Failed => &b.failed,
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    /// The last [`BUCKETS`] buckets up to `now`, oldest first; the last is
    /// the current, partly elapsed one.
    pub fn history(&self, now: u64) -> Vec<Counts> {
        let current = now / BUCKET_MS;
        (0..BUCKETS as u64)
            .rev()
            .map(|back| {
                let Some(epoch) = current.checked_sub(back) else {
                    return Counts::default();
                };
                let b = &self.buckets[slot(epoch)];
                if b.epoch.load(Ordering::Acquire) != epoch {
                    return Counts::default();
                }
                Counts {
                    ok: b.ok.load(Ordering::Relaxed),
                    throttled: b.throttled.load(Ordering::Relaxed),
                    failed: b.failed.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Notes that the instance is unavailable from `from_ms` until
    /// `until_ms` (gateway clock). A period that overlaps or touches the
    /// last one of the same kind extends it.
    pub fn unavailable(&self, kind: Unavailability, from_ms: u64, until_ms: u64) {
        let mut ev = self.lock();
        if let Some(last) = ev.intervals.back_mut()
            && last.kind == kind
            && from_ms <= last.until_ms
        {
            last.until_ms = last.until_ms.max(until_ms);
            return;
        }
        if ev.intervals.len() == MAX_INTERVALS {
            ev.intervals.pop_front();
        }
        ev.intervals.push_back(Interval {
            kind,
            from_ms,
            until_ms,
        });
    }

    /// Periods of unavailability that end after `since`, oldest first.
    pub fn intervals(&self, since: u64) -> Vec<Interval> {
        self.lock()
            .intervals
            .iter()
            .filter(|i| i.until_ms > since)
            .copied()
            .collect()
    }

    /// Records the 429 that started or extended a cooldown.
    pub fn throttled(&self, at_ms: u64, status: u16, cooldown_ms: u64, headers: &HeaderMap) {
        let headers = THROTTLE_HEADERS
            .iter()
            .filter_map(|name| {
                let v = headers.get(*name)?.to_str().ok()?.trim();
                (!v.is_empty()
                    && v.len() <= MAX_HEADER_VALUE
                    && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
                .then(|| (*name, v.to_owned()))
            })
            .collect();
        self.lock().last_throttle = Some(Throttle {
            at_ms,
            status,
            cooldown_ms,
            headers,
        });
    }

    /// The last 429, if any.
    pub fn last_throttle(&self) -> Option<Throttle> {
        self.lock().last_throttle.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Events> {
        // The data is plain values: a panic elsewhere cannot leave it torn.
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn slot(epoch: u64) -> usize {
    (epoch % BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn counts_attempts_in_the_bucket_of_their_time() {
        let a = Activity::new();
        a.record(1_000, Tally::Ok);
        a.record(4_999, Tally::Throttled);
        a.record(5_000, Tally::Failed);
        let h = a.history(5_001);
        assert_eq!(h.len(), BUCKETS);
        assert_eq!(
            h[BUCKETS - 2],
            Counts {
                ok: 1,
                throttled: 1,
                failed: 0
            }
        );
        assert_eq!(
            h[BUCKETS - 1],
            Counts {
                ok: 0,
                throttled: 0,
                failed: 1
            }
        );
    }

    #[test]
    fn forgets_buckets_older_than_the_window() {
        let a = Activity::new();
        a.record(1_000, Tally::Failed);
        let later = 1_000 + BUCKET_MS * BUCKETS as u64;
        assert!(a.history(later).iter().all(|c| *c == Counts::default()));
        // The slot is reused for the new time and starts from zero.
        a.record(later, Tally::Ok);
        let h = a.history(later);
        assert_eq!(h[BUCKETS - 1].ok, 1);
        assert_eq!(h[BUCKETS - 1].failed, 0);
    }

    #[test]
    fn merges_overlapping_cooldowns_and_keeps_a_bounded_list() {
        let a = Activity::new();
        a.unavailable(Unavailability::Cooling, 100, 1_000);
        a.unavailable(Unavailability::Cooling, 500, 2_000);
        assert_eq!(a.intervals(0).len(), 1);
        assert_eq!(a.intervals(0)[0].until_ms, 2_000);
        for i in 0..100 {
            a.unavailable(
                Unavailability::BreakerOpen,
                10_000 * (i + 1),
                10_000 * (i + 1) + 5,
            );
        }
        assert_eq!(a.intervals(0).len(), MAX_INTERVALS);
        assert!(a.intervals(u64::MAX - 1).is_empty());
    }

    #[test]
    fn keeps_only_short_printable_rate_limit_headers() {
        let a = Activity::new();
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        h.insert("retry-after", HeaderValue::from_static("2"));
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_str(&"9".repeat(100)).unwrap(),
        );
        h.insert("api-key", HeaderValue::from_static("never-kept"));
        a.throttled(42, 429, 1_500, &h);
        let t = a.last_throttle().unwrap();
        assert_eq!(t.status, 429);
        assert_eq!(
            t.headers,
            vec![
                ("retry-after-ms", "1500".to_owned()),
                ("retry-after", "2".to_owned())
            ]
        );
    }

    #[test]
    fn tallies_outcomes_as_the_strip_shows_them() {
        assert_eq!(Tally::from(Outcome::ClientError), Tally::Ok);
        assert_eq!(Tally::from(Outcome::Throttled), Tally::Throttled);
        assert_eq!(Tally::from(Outcome::Timeout), Tally::Failed);
    }
}
