//! Azure's admission model for standard deployments, per deployment:
//!
//! - **tokens**: each admitted request reserves its estimate (prompt estimate +
//!   `max_tokens` × `n`) for exactly 60 s from its admission; a request is
//!   admitted when the reservations still in the window plus its own estimate
//!   fit in the TPM. The reservation is never corrected to the real usage, and
//!   tokens come back request by request, 60 s after each admission (a rolling
//!   window, not a minute that resets), as measured on Azure.
//! - **requests**: `ceil(rpm / 6)` requests per rolling 10 s.
//!
//! A refused request reserves nothing. Its refusal says exactly when enough room
//! frees up: the instant the reservation (or request) that makes room leaves
//! its window. Time comes from the instance's [`crate::SimClock`].

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Window of the request budget.
pub(crate) const REQ_WINDOW: Duration = Duration::from_secs(10);
/// Window of the token budget.
pub(crate) const TOK_WINDOW: Duration = Duration::from_secs(60);

/// Remaining-requests figure reported when a deployment has no request quota.
pub const UNLIMITED_REMAINING_REQUESTS: u64 = 100_000;
/// Remaining-tokens figure reported when a deployment has no token quota.
pub const UNLIMITED_REMAINING_TOKENS: u64 = 10_000_000;

/// Quota left after a request, for `x-ratelimit-remaining-*`, and the limits
/// when the deployment sends `x-ratelimit-limit-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remaining {
    pub requests: u64,
    pub tokens: u64,
    /// `(requests per 10 s, tokens per minute)`, sent only when configured.
    pub limits: Option<(u64, u64)>,
    /// A PTU deployment's utilization, sent instead of the remaining pair.
    pub utilization: Option<crate::ptu::Utilization>,
}

impl Remaining {
    pub(crate) const UNLIMITED: Remaining = Remaining {
        requests: UNLIMITED_REMAINING_REQUESTS,
        tokens: UNLIMITED_REMAINING_TOKENS,
        limits: None,
        utilization: None,
    };

    /// What a PTU deployment reports: its utilization only.
    pub(crate) fn ptu(u: crate::ptu::Utilization) -> Remaining {
        Remaining {
            utilization: Some(u),
            ..Remaining::UNLIMITED
        }
    }
}

/// Why and for how long a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// True when the token budget refused it (also when both did), false when
    /// only the request budget did.
    pub tokens: bool,
    /// True when the request's estimate exceeds the whole TPM: it can never be
    /// admitted.
    pub too_large: bool,
    /// When the request would fit: the later of the two budgets' waits.
    pub retry_after: Duration,
    /// When the next request leaves the 10 s window.
    pub reset_requests: Duration,
    /// When the next reservation leaves the 60 s window.
    pub reset_tokens: Duration,
    pub remaining: Remaining,
}

#[derive(Default)]
struct Lane {
    /// Admission instant and reserved tokens, oldest first.
    tokens: VecDeque<(Instant, u64)>,
    reserved: u64,
    /// Admission instants, oldest first.
    requests: VecDeque<Instant>,
}

impl Lane {
    fn expire(&mut self, now: Instant) {
        while let Some(&(t, c)) = self.tokens.front() {
            if t + TOK_WINDOW > now {
                break;
            }
            self.reserved -= c;
            self.tokens.pop_front();
        }
        while let Some(&t) = self.requests.front() {
            if t + REQ_WINDOW > now {
                break;
            }
            self.requests.pop_front();
        }
    }

    fn remaining(&self, rl: &RateLimit) -> Remaining {
        let rlim = req_limit(rl);
        Remaining {
            requests: if rl.rpm == 0 {
                UNLIMITED_REMAINING_REQUESTS
            } else {
                rlim.saturating_sub(self.requests.len() as u64)
            },
            tokens: if rl.tpm == 0 {
                UNLIMITED_REMAINING_TOKENS
            } else {
                u64::from(rl.tpm).saturating_sub(self.reserved)
            },
            limits: rl.limit_headers.then_some((rlim, u64::from(rl.tpm))),
            utilization: None,
        }
    }

    /// Wait until `cost` more tokens fit, and whether they ever can.
    fn token_wait(&self, tpm: u64, cost: u64, now: Instant) -> (Duration, bool) {
        if cost > tpm {
            let last = self.tokens.back().map_or(now, |&(t, _)| t + TOK_WINDOW);
            let wait = last.saturating_duration_since(now);
            return (if wait.is_zero() { TOK_WINDOW } else { wait }, true);
        }
        let mut left = self.reserved;
        for &(t, c) in &self.tokens {
            if left + cost <= tpm {
                break;
            }
            left -= c;
            if left + cost <= tpm {
                return ((t + TOK_WINDOW).saturating_duration_since(now), false);
            }
        }
        (Duration::ZERO, false)
    }
}

/// Requests allowed per 10 s window: `ceil(rpm / 6)`.
pub(crate) fn req_limit(rl: &RateLimit) -> u64 {
    u64::from(rl.rpm).div_ceil(6)
}

/// State kept per deployment name behind one short-held lock, created on
/// first use: the standard quota's lanes and the PTU buckets.
pub(crate) struct PerDeployment<T>(Mutex<HashMap<String, T>>);

impl<T> Default for PerDeployment<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T: Default> PerDeployment<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, T>> {
        // Plain numbers: a panic elsewhere cannot leave them worse than off.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on `deployment`'s state, created first if needed.
    pub(crate) fn with<R>(&self, deployment: &str, f: impl FnOnce(&mut T) -> R) -> R {
        let mut deps = self.lock();
        match deps.get_mut(deployment) {
            Some(t) => f(t),
            None => f(deps.entry(deployment.to_owned()).or_default()),
        }
    }

    /// Runs `f` on `deployment`'s state, if it has any (nothing is created).
    pub(crate) fn read<R>(&self, deployment: &str, f: impl FnOnce(Option<&T>) -> R) -> R {
        f(self.lock().get(deployment))
    }
}

/// Per-deployment admission state of one instance.
#[derive(Default)]
pub(crate) struct RateLimiter {
    deps: PerDeployment<Lane>,
}

impl RateLimiter {
    /// Reserve `cost` tokens and one request on `deployment`, or refuse.
    pub(crate) fn charge(
        &self,
        deployment: &str,
        rl: RateLimit,
        cost: u64,
        now: Instant,
    ) -> Result<Remaining, Refusal> {
        self.deps.with(deployment, |lane| {
            lane.expire(now);
            let rlim = req_limit(&rl);
            let tpm = u64::from(rl.tpm);
            let req_blocked = rl.rpm > 0 && lane.requests.len() as u64 >= rlim;
            let tok_blocked = rl.tpm > 0 && lane.reserved + cost > tpm;
            if req_blocked || tok_blocked {
                let req_wait = if req_blocked {
                    // The request whose departure brings the count below the limit.
                    let idx = lane.requests.len() - rlim as usize;
                    lane.requests.get(idx).map_or(Duration::ZERO, |&t| {
                        (t + REQ_WINDOW).saturating_duration_since(now)
                    })
                } else {
                    Duration::ZERO
                };
                let (tok_wait, too_large) = if tok_blocked {
                    lane.token_wait(tpm, cost, now)
                } else {
                    (Duration::ZERO, false)
                };
                let next = |t: Option<Instant>, w: Duration| {
                    t.map_or(Duration::ZERO, |t| (t + w).saturating_duration_since(now))
                };
                return Err(Refusal {
                    tokens: tok_blocked,
                    too_large,
                    retry_after: req_wait.max(tok_wait).max(Duration::from_millis(1)),
                    reset_requests: next(lane.requests.front().copied(), REQ_WINDOW),
                    reset_tokens: next(lane.tokens.front().map(|&(t, _)| t), TOK_WINDOW),
                    remaining: lane.remaining(&rl),
                });
            }
            if rl.rpm > 0 {
                lane.requests.push_back(now);
            }
            if rl.tpm > 0 && cost > 0 {
                lane.tokens.push_back((now, cost));
                lane.reserved += cost;
            }
            Ok(lane.remaining(&rl))
        })
    }

    /// Quota left without reserving anything (for answers that cost nothing).
    pub(crate) fn peek(&self, deployment: &str, rl: RateLimit, now: Instant) -> Remaining {
        self.deps.read(deployment, |lane| match lane {
            None => Lane::default().remaining(&rl),
            Some(lane) => {
                // Count without mutating: what `expire` would leave.
                let reserved: u64 = lane
                    .tokens
                    .iter()
                    .filter(|(t, _)| *t + TOK_WINDOW > now)
                    .map(|(_, c)| c)
                    .sum();
                let requests = lane
                    .requests
                    .iter()
                    .filter(|t| **t + REQ_WINDOW > now)
                    .count();
                let mut view = Lane {
                    tokens: VecDeque::new(),
                    reserved,
                    requests: VecDeque::new(),
                };
                view.requests.resize(requests, now);
                view.remaining(&rl)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(rpm: u32, tpm: u32) -> RateLimit {
        RateLimit {
            rpm,
            tpm,
            ..RateLimit::default()
        }
    }

    #[test]
    fn rpm_is_a_rolling_ten_second_budget_of_a_sixth() {
        let rl = rl(60, 0);
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            let r = lim
                .charge("d", rl, 1, t0 + Duration::from_secs(i / 2))
                .unwrap();
            assert_eq!(r.requests, 9 - i);
        }
        // The 11th waits for the first to leave, 10 s after its admission.
        let refused = lim
            .charge("d", rl, 1, t0 + Duration::from_secs(6))
            .unwrap_err();
        assert!(!refused.tokens);
        assert_eq!(refused.retry_after, Duration::from_secs(4));
        // Rolling: at t0+10 s only the two requests of t0 have left.
        let r = lim
            .charge("d", rl, 1, t0 + Duration::from_secs(10))
            .unwrap();
        assert_eq!(r.requests, 1);
        // Another deployment has its own budget.
        assert!(lim.charge("e", rl, 1, t0).is_ok());
    }

    #[test]
    fn tokens_return_sixty_seconds_after_each_admission() {
        let rl = rl(0, 100);
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        assert_eq!(lim.charge("d", rl, 30, t0).unwrap().tokens, 70);
        let t20 = t0 + Duration::from_secs(20);
        assert_eq!(lim.charge("d", rl, 50, t20).unwrap().tokens, 20);
        // 40 fits once the 30 reserved at t0 leave (50 free): at t0 + 60 s.
        let refused = lim
            .charge("d", rl, 40, t0 + Duration::from_secs(30))
            .unwrap_err();
        assert!(refused.tokens && !refused.too_large);
        assert_eq!(refused.retry_after, Duration::from_secs(30));
        assert_eq!(refused.remaining.tokens, 20);
        // 80 needs both reservations gone: until t20 + 60 s.
        let refused = lim
            .charge("d", rl, 80, t0 + Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(50));
        // Exactly at t0 + 60 s the first reservation has left.
        assert_eq!(
            lim.charge("d", rl, 40, t0 + Duration::from_secs(60))
                .unwrap()
                .tokens,
            10
        );
        // The peek agrees with what a charge would see.
        assert_eq!(lim.peek("d", rl, t0 + Duration::from_secs(80)).tokens, 60);
    }

    #[test]
    fn a_request_larger_than_the_whole_tpm_is_never_admitted() {
        let rl = rl(0, 100);
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        let refused = lim.charge("d", rl, 101, t0).unwrap_err();
        assert!(refused.too_large);
        assert_eq!(refused.retry_after, TOK_WINDOW);
        let refused = lim
            .charge("d", rl, 101, t0 + Duration::from_secs(600))
            .unwrap_err();
        assert!(refused.too_large);
        assert_eq!(lim.charge("d", rl, 100, t0).unwrap().tokens, 0);
    }

    #[test]
    fn limits_are_reported_only_when_configured() {
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        assert_eq!(lim.charge("d", rl(120, 1000), 1, t0).unwrap().limits, None);
        let with = RateLimit {
            limit_headers: true,
            ..rl(120, 1000)
        };
        assert_eq!(
            lim.charge("e", with, 1, t0).unwrap().limits,
            Some((20, 1000))
        );
    }

    proptest::proptest! {
        /// Whatever the arrival pattern: no rolling 10 s window holds more than
        /// the request budget, no rolling 60 s window more than the TPM, a
        /// refused request admitted at its `retry_after` (if nothing else came)
        /// fits, and after 60 s of quiet the whole quota is back.
        #[test]
        fn rolling_windows_never_overbook_and_always_drain(
            rpm in 1u32..120,
            tpm in 1u32..5_000,
            steps in proptest::collection::vec((0u64..3_000, 0u64..400), 1..200),
        ) {
            let rl = rl(rpm, tpm);
            let lim = RateLimiter::default();
            let t0 = Instant::now();
            let mut now_ms = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, cost) in steps {
                now_ms += gap;
                let now = t0 + Duration::from_millis(now_ms);
                match lim.charge("d", rl, cost, now) {
                    Ok(_) => admitted.push((now_ms, cost)),
                    Err(r) => {
                        if !r.too_large {
                            // A probe on a copy of the state: admitted at retry_after.
                            let probe = RateLimiter::default();
                            for &(t, c) in &admitted {
                                let _ = probe.charge("d", rl, c, t0 + Duration::from_millis(t));
                            }
                            proptest::prop_assert!(probe.charge("d", rl, cost, now + r.retry_after).is_ok());
                        }
                    }
                }
            }
            for &(start, _) in &admitted {
                let n = admitted.iter().filter(|(t, _)| *t >= start && *t < start + 10_000).count() as u64;
                proptest::prop_assert!(n <= u64::from(rpm).div_ceil(6));
                let used: u64 = admitted.iter().filter(|(t, _)| *t >= start && *t < start + 60_000).map(|(_, c)| c).sum();
                proptest::prop_assert!(used <= u64::from(tpm));
            }
            let later = t0 + Duration::from_millis(now_ms + 60_000);
            let left = lim.peek("d", rl, later);
            proptest::prop_assert_eq!(left.tokens, u64::from(tpm));
            proptest::prop_assert_eq!(left.requests, u64::from(rpm).div_ceil(6));
        }
    }
}
