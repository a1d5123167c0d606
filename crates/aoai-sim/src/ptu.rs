//! Azure's admission model for provisioned-throughput (PTU) deployments, per
//! deployment: a leaky bucket of tokens.
//!
//! Microsoft describes PTU admission as "a leaky-bucket variant": each request
//! adds its estimated cost, utilization drains at a rate set by the
//! provisioned capacity, and once utilization is over 100% requests get 429
//! with `retry-after-ms` set to the time until it is below 100% again. The
//! simulator models exactly that, simply:
//!
//! - **Capacity**: `tokens_per_minute` ([`crate::config::Ptu`]), what the
//!   deployment's PTUs process per minute. The bucket drains continuously at
//!   that rate.
//! - **Utilization** = tokens in the bucket ÷ `tokens_per_minute` × 100: 100%
//!   is one minute of capacity waiting. In steady state this equals the tokens
//!   admitted over the last minute against the capacity of a minute.
//! - **Admission**: a request is admitted while utilization is at most 100%,
//!   even if its own cost takes it over (the check is "over 100%", as
//!   documented); its cost (the same estimate as the standard model: prompt
//!   estimate + output reservation) goes into the bucket. It is not corrected
//!   to the real usage afterwards, and cached prompt tokens are not taken off
//!   (Azure does both; with the simulator's default reservation the estimate
//!   is the real usage).
//! - **Refusal**: over 100%, 429 with `retry-after-ms` = exactly when the
//!   bucket drains back to 100%. A refused request adds nothing.
//!
//! Time comes from the instance's [`crate::SimClock`], so a manual clock moves
//! the drain too.

use std::time::{Duration, Instant};

use crate::config::Ptu;
use crate::ratelimit::PerDeployment;

/// A deployment's utilization in tenths of a percent (so it compares
/// exactly); sent as `azure-openai-deployment-utilization: 73.5%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Utilization(pub u64);

impl Utilization {
    fn of(level: u128, ptu: Ptu) -> Self {
        // Rounded up: a bucket just over 100% never reads as 100.0%.
        let permille = (level * 1_000).div_ceil(full(ptu));
        Self(u64::try_from(permille).unwrap_or(u64::MAX))
    }

    /// The header value, one decimal: `73.5%`.
    pub(crate) fn header(self) -> String {
        format!("{}.{}%", self.0 / 10, self.0 % 10)
    }
}

/// A refused request: when the bucket is back at 100%, and where it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PtuRefusal {
    pub retry_after: Duration,
    pub utilization: Utilization,
}

/// Levels are kept in token-milliseconds (tokens × 60 000) so that the
/// drain, `tokens_per_minute` a millisecond, is exact integer arithmetic.
#[derive(Debug, Default)]
struct Bucket {
    /// Token-milliseconds waiting, as of `at`.
    level: u128,
    at: Option<Instant>,
}

impl Bucket {
    fn drain(&mut self, ptu: Ptu, now: Instant) {
        let Some(at) = self.at else {
            self.at = Some(now);
            return;
        };
        // Whole milliseconds only; the rest carries over to the next drain.
        let ms = now.saturating_duration_since(at).as_millis();
        self.level = self.level.saturating_sub(ms * rate(ptu));
        self.at = Some(at + Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)));
    }
}

/// Token-milliseconds drained per millisecond.
fn rate(ptu: Ptu) -> u128 {
    u128::from(ptu.tokens_per_minute.max(1))
}

/// The level of 100% utilization: a minute of capacity.
fn full(ptu: Ptu) -> u128 {
    rate(ptu) * 60_000
}

/// Per-deployment buckets of one instance.
#[derive(Default)]
pub(crate) struct PtuLimiter {
    deps: PerDeployment<Bucket>,
}

impl PtuLimiter {
    /// Adds `cost` tokens to `deployment`'s bucket and returns the
    /// utilization with them, or refuses while utilization is over 100%.
    pub(crate) fn charge(
        &self,
        deployment: &str,
        ptu: Ptu,
        cost: u64,
        now: Instant,
    ) -> Result<Utilization, PtuRefusal> {
        self.deps.with(deployment, |b| {
            b.drain(ptu, now);
            if b.level > full(ptu) {
                let ms = (b.level - full(ptu)).div_ceil(rate(ptu));
                return Err(PtuRefusal {
                    retry_after: Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)),
                    utilization: Utilization::of(b.level, ptu),
                });
            }
            b.level = b.level.saturating_add(u128::from(cost) * 60_000);
            Ok(Utilization::of(b.level, ptu))
        })
    }

    /// The utilization now, without adding anything (for answers that cost
    /// nothing).
    pub(crate) fn peek(&self, deployment: &str, ptu: Ptu, now: Instant) -> Utilization {
        self.deps.with(deployment, |b| {
            b.drain(ptu, now);
            Utilization::of(b.level, ptu)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTU: Ptu = Ptu {
        tokens_per_minute: 6_000,
    };

    #[test]
    fn utilization_is_the_bucket_against_a_minute_of_capacity() {
        let lim = PtuLimiter::default();
        let t0 = Instant::now();
        assert_eq!(lim.charge("d", PTU, 1_500, t0), Ok(Utilization(250)));
        assert_eq!(lim.charge("d", PTU, 1_500, t0), Ok(Utilization(500)));
        // Another deployment has its own bucket.
        assert_eq!(lim.charge("e", PTU, 60, t0), Ok(Utilization(10)));
        assert_eq!(Utilization(735).header(), "73.5%");
        assert_eq!(Utilization(1_000).header(), "100.0%");
    }

    #[test]
    fn the_bucket_drains_at_the_provisioned_rate() {
        let lim = PtuLimiter::default();
        let t0 = Instant::now();
        lim.charge("d", PTU, 3_000, t0).unwrap();
        // 6,000 per minute: 100 tokens a second.
        assert_eq!(
            lim.peek("d", PTU, t0 + Duration::from_secs(10)),
            Utilization(334)
        );
        assert_eq!(
            lim.peek("d", PTU, t0 + Duration::from_secs(30)),
            Utilization(0)
        );
        assert_eq!(
            lim.peek("d", PTU, t0 + Duration::from_secs(90)),
            Utilization(0)
        );
    }

    #[test]
    fn over_100_percent_refuses_until_it_drains_back_to_100() {
        let lim = PtuLimiter::default();
        let t0 = Instant::now();
        lim.charge("d", PTU, 5_900, t0).unwrap();
        // At 98.4% a request is still admitted, even one that takes it over.
        assert_eq!(lim.charge("d", PTU, 400, t0), Ok(Utilization(1_050)));
        // 6,300 waiting, 300 over: 3 s at 100 tokens a second.
        let refused = lim.charge("d", PTU, 1, t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(3));
        assert_eq!(refused.utilization, Utilization(1_050));
        // A refusal adds nothing.
        assert_eq!(
            lim.charge("d", PTU, 1, t0 + Duration::from_millis(2_999))
                .unwrap_err()
                .retry_after,
            Duration::from_millis(1)
        );
        assert_eq!(
            lim.charge("d", PTU, 60, t0 + Duration::from_secs(3)),
            Ok(Utilization(1_010))
        );
    }

    proptest::proptest! {
        /// Whatever the arrivals: a refusal's `retry_after` is exactly when
        /// the same request is admitted (if nothing else came), the bucket
        /// never holds more than a minute of capacity plus one request, and
        /// after a minute of quiet it is empty.
        #[test]
        fn refusals_wait_exactly_and_the_bucket_always_drains(
            tpm in 1u32..100_000,
            steps in proptest::collection::vec((0u64..3_000, 0u64..20_000), 1..100),
        ) {
            let ptu = Ptu { tokens_per_minute: tpm };
            let lim = PtuLimiter::default();
            let t0 = Instant::now();
            let mut now = t0;
            let mut biggest = 0u64;
            for (gap, cost) in steps {
                now += Duration::from_millis(gap);
                match lim.charge("d", ptu, cost, now) {
                    Ok(u) => {
                        biggest = biggest.max(cost);
                        let bound = (u64::from(tpm) + biggest) * 1_000 / u64::from(tpm) + 1;
                        proptest::prop_assert!(u.0 <= bound, "{:?} > {}", u, bound);
                    }
                    Err(r) => {
                        proptest::prop_assert!(r.utilization.0 > 1_000);
                        let before = now + r.retry_after - Duration::from_millis(1);
                        if r.retry_after > Duration::from_millis(1) {
                            proptest::prop_assert!(lim.peek("d", ptu, before).0 > 1_000);
                        }
                        now += r.retry_after;
                        proptest::prop_assert!(lim.charge("d", ptu, cost, now).is_ok());
                        biggest = biggest.max(cost);
                    }
                }
            }
            let drained = now + Duration::from_millis(60_000 * (2 + biggest / u64::from(tpm)));
            proptest::prop_assert_eq!(lim.peek("d", ptu, drained), Utilization(0));
        }
    }
}
