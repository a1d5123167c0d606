//! Azure standard-deployment quota: tokens per 60 s window and requests per 10 s
//! window (`ceil(rpm / 6)` each), per deployment, charged up front from an estimate
//! as Azure does (prompt estimate + `max_tokens`).
//!
//! Windows are fixed, aligned to when the deployment was first used. A request
//! that does not fit is refused without being charged; the refusal says how long
//! until the window that blocks it ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

const REQ_WINDOW: Duration = Duration::from_secs(10);
const TOK_WINDOW: Duration = Duration::from_secs(60);

/// Remaining-requests figure reported when a deployment has no request quota.
pub const UNLIMITED_REMAINING_REQUESTS: u64 = 100_000;
/// Remaining-tokens figure reported when a deployment has no token quota.
pub const UNLIMITED_REMAINING_TOKENS: u64 = 10_000_000;

/// Quota left after a request, for `x-ratelimit-remaining-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remaining {
    pub requests: u64,
    pub tokens: u64,
}

impl Remaining {
    pub(crate) const UNLIMITED: Remaining = Remaining {
        requests: UNLIMITED_REMAINING_REQUESTS,
        tokens: UNLIMITED_REMAINING_TOKENS,
    };
}

/// Why and for how long a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// True when the token quota refused it, false for the request quota.
    pub tokens: bool,
    pub retry_after: Duration,
    pub reset_requests: Duration,
    pub reset_tokens: Duration,
    pub remaining: Remaining,
}

struct Window {
    start: Instant,
    used: u64,
}

impl Window {
    fn roll(&mut self, now: Instant, len: Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= len {
            // Keep windows aligned to the first use, as a fixed-window counter does.
            match u32::try_from(elapsed.as_nanos() / len.as_nanos()) {
                Ok(periods) => self.start += len.saturating_mul(periods),
                Err(_) => self.start = now,
            }
            self.used = 0;
        }
    }

    fn reset_in(&self, now: Instant, len: Duration) -> Duration {
        (self.start + len).saturating_duration_since(now)
    }
}

struct DepState {
    req: Window,
    tok: Window,
}

/// Per-deployment quota state of one instance.
#[derive(Default)]
pub(crate) struct RateLimiter {
    deps: Mutex<HashMap<String, DepState>>,
}

fn req_limit(rl: &RateLimit) -> u64 {
    u64::from(rl.rpm).div_ceil(6)
}

impl RateLimiter {
    /// Charge `cost` tokens and one request to `deployment`, or refuse.
    pub(crate) fn charge(
        &self,
        deployment: &str,
        rl: RateLimit,
        cost: u64,
        now: Instant,
    ) -> Result<Remaining, Refusal> {
        let mut deps = self
            .deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = match deps.get_mut(deployment) {
            Some(s) => s,
            None => deps.entry(deployment.to_owned()).or_insert(DepState {
                req: Window {
                    start: now,
                    used: 0,
                },
                tok: Window {
                    start: now,
                    used: 0,
                },
            }),
        };
        st.req.roll(now, REQ_WINDOW);
        st.tok.roll(now, TOK_WINDOW);
        let rlim = req_limit(&rl);
        let tlim = u64::from(rl.tpm);
        let remaining = |st: &DepState| Remaining {
            requests: if rl.rpm == 0 {
                UNLIMITED_REMAINING_REQUESTS
            } else {
                rlim.saturating_sub(st.req.used)
            },
            tokens: if rl.tpm == 0 {
                UNLIMITED_REMAINING_TOKENS
            } else {
                tlim.saturating_sub(st.tok.used)
            },
        };
        let req_blocked = rl.rpm > 0 && st.req.used >= rlim;
        let tok_blocked = rl.tpm > 0 && st.tok.used.saturating_add(cost) > tlim;
        if req_blocked || tok_blocked {
            let reset_requests = st.req.reset_in(now, REQ_WINDOW);
            let reset_tokens = st.tok.reset_in(now, TOK_WINDOW);
            let retry_after = match (req_blocked, tok_blocked) {
                (true, true) => reset_requests.max(reset_tokens),
                (false, true) => reset_tokens,
                _ => reset_requests,
            };
            return Err(Refusal {
                tokens: tok_blocked,
                retry_after: retry_after.max(Duration::from_millis(1)),
                reset_requests,
                reset_tokens,
                remaining: remaining(st),
            });
        }
        st.req.used += 1;
        st.tok.used = st.tok.used.saturating_add(cost);
        Ok(remaining(st))
    }

    /// Quota left without charging anything (for responses that cost nothing).
    pub(crate) fn peek(&self, deployment: &str, rl: RateLimit, now: Instant) -> Remaining {
        let mut deps = self
            .deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ru, tu) = match deps.get_mut(deployment) {
            Some(st) => {
                st.req.roll(now, REQ_WINDOW);
                st.tok.roll(now, TOK_WINDOW);
                (st.req.used, st.tok.used)
            }
            None => (0, 0),
        };
        Remaining {
            requests: if rl.rpm == 0 {
                UNLIMITED_REMAINING_REQUESTS
            } else {
                req_limit(&rl).saturating_sub(ru)
            },
            tokens: if rl.tpm == 0 {
                UNLIMITED_REMAINING_TOKENS
            } else {
                u64::from(rl.tpm).saturating_sub(tu)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_is_enforced_per_ten_second_window() {
        let rl = RateLimit { rpm: 60, tpm: 0 };
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..10 {
            let r = lim.charge("d", rl, 1, t0).unwrap();
            assert_eq!(r.requests, 9 - i);
        }
        let refused = lim
            .charge("d", rl, 1, t0 + Duration::from_secs(3))
            .unwrap_err();
        assert!(!refused.tokens);
        assert_eq!(refused.retry_after, Duration::from_secs(7));
        assert!(lim.charge("d", rl, 1, t0 + Duration::from_secs(10)).is_ok());
        // Another deployment has its own quota.
        assert!(lim.charge("e", rl, 1, t0).is_ok());
    }

    #[test]
    fn tpm_refuses_a_request_that_does_not_fit_and_does_not_charge_it() {
        let rl = RateLimit { rpm: 0, tpm: 100 };
        let lim = RateLimiter::default();
        let t0 = Instant::now();
        assert_eq!(lim.charge("d", rl, 60, t0).unwrap().tokens, 40);
        let refused = lim
            .charge("d", rl, 60, t0 + Duration::from_secs(20))
            .unwrap_err();
        assert!(refused.tokens);
        assert_eq!(refused.retry_after, Duration::from_secs(40));
        assert_eq!(refused.remaining.tokens, 40);
        assert_eq!(lim.charge("d", rl, 40, t0).unwrap().tokens, 0);
        assert_eq!(
            lim.charge("d", rl, 60, t0 + Duration::from_secs(61))
                .unwrap()
                .tokens,
            40
        );
    }

    proptest::proptest! {
        /// Whatever the arrival pattern, a fixed window never admits more than
        /// its quota: requests per 10 s window and tokens per 60 s window.
        #[test]
        fn never_admits_more_than_the_quota_per_window(
            rpm in 1u32..120,
            tpm in 1u32..5_000,
            steps in proptest::collection::vec((0u64..3_000, 0u64..400), 1..200),
        ) {
            let rl = RateLimit { rpm, tpm };
            let lim = RateLimiter::default();
            let t0 = Instant::now();
            let mut now_ms = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            // Windows are aligned to the deployment's first request.
            let first = steps[0].0;
            for (gap, cost) in steps {
                now_ms += gap;
                if lim.charge("d", rl, cost, t0 + Duration::from_millis(now_ms)).is_ok() {
                    admitted.push((now_ms - first, cost));
                }
            }
            for w in 0..=(now_ms / 10_000) {
                let n = admitted.iter().filter(|(t, _)| t / 10_000 == w).count() as u64;
                proptest::prop_assert!(n <= u64::from(rpm).div_ceil(6));
            }
            for w in 0..=(now_ms / 60_000) {
                let used: u64 = admitted.iter().filter(|(t, _)| t / 60_000 == w).map(|(_, c)| c).sum();
                proptest::prop_assert!(used <= u64::from(tpm));
            }
        }
    }
}
