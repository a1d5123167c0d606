//! Phase 3 (choice): which instance gets the next attempt.
//!
//! Rule: among the candidates (instances serving the deployment, not yet
//! tried for this request, and available per the [`HealthView`]), take the
//! lowest priority number that has any; within it, weighted
//! power-of-two-choices: draw two distinct instances with probability
//! proportional to weight and keep the one with the lower [`Score`].
//!
//! Two seams keep later signals out of this file's logic:
//! - [`HealthView`] says whether an instance may be used now. The default
//!   reads the local cooldown and breaker; a view over state shared between
//!   replicas (e.g. cooldowns in Redis) can wrap it.
//! - [`Score`] ranks two available instances. The default is in-flight
//!   requests over weight; latency or `x-ratelimit-remaining-*` can be
//!   folded in by another implementation.
//!
//! Rate-limit steering ([`Selector::pick_steered`], see [`crate::steer`])
//! adds a third signal, each candidate's predicted [`Headroom`]: a
//! candidate without room for the request is skipped like a cooling one;
//! within a priority group the room left is added to the score; and when
//! no candidate in any group has room, the one with the most room is
//! taken rather than refusing (the prediction is an estimate).
//!
//! The selector holds no lock and allocates nothing per pick.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::{Backend, Unavailable};
use crate::lane::{Headroom, SkipReason};

/// How much a lane's room counts against in-flight requests in the score:
/// a lane with no token room left scores as if it had this many more
/// requests in flight per unit of weight than a lane with all its room.
pub const ROOM_WEIGHT: f64 = 4.0;

/// The rate-limit signal for one pick.
pub struct Steering<'a> {
    /// The candidate's predicted room for this request; `None` = no
    /// opinion (taken as room).
    pub room: &'a dyn Fn(&Backend) -> Option<Headroom>,
    /// Told of every available candidate passed over for lack of room
    /// (not of the one taken as a fallback).
    pub skipped: &'a mut dyn FnMut(&Backend, SkipReason),
    /// Whether a candidate without room may be taken when none has room
    /// (the fallback). `false` makes such a pick `None`.
    pub allow_fallback: bool,
    /// Set by the pick when it returned a candidate without room.
    pub fell_back: bool,
}

/// Most instances one gateway supports (the per-request tried set is a
/// 128-bit mask).
pub const MAX_INSTANCES: usize = 128;

/// Whether an instance may take a request now.
pub trait HealthView: Send + Sync {
    /// `Ok` when usable at `now` ([`crate::backend::Clock`] ms).
    ///
    /// # Errors
    /// Why it is not usable: cooling (with the deadline) or breaker open.
    fn check(&self, backend: &Backend, now: u64) -> Result<(), Unavailable>;
}

/// The gateway's own view: the instance's local cooldown and breaker.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalHealth;

impl HealthView for LocalHealth {
    fn check(&self, backend: &Backend, now: u64) -> Result<(), Unavailable> {
        backend.check(now)
    }
}

/// Ranks available instances; lower is better.
pub trait Score: Send + Sync {
    /// The score of `backend` right now.
    fn score(&self, backend: &Backend) -> f64;
}

/// Default score: `in_flight / weight`, so load is compared in proportion
/// to each instance's share. Idle instances tie, and a tie keeps the first
/// (weight-proportional) draw, so light traffic splits by weight too.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastLoaded;

impl Score for LeastLoaded {
    fn score(&self, backend: &Backend) -> f64 {
        f64::from(backend.in_flight()) / backend.config.weight
    }
}

/// A set of backend indices (tried or skipped for this request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSet(u128);

impl IndexSet {
    /// Adds `i` (ignored beyond [`MAX_INSTANCES`]).
    pub fn insert(&mut self, i: usize) {
        if i < MAX_INSTANCES {
            self.0 |= 1u128 << i;
        }
    }

    /// Whether `i` is in the set.
    pub fn contains(&self, i: usize) -> bool {
        i < MAX_INSTANCES && self.0 & (1u128 << i) != 0
    }
}

/// The instance selector.
pub struct Selector {
    health: Box<dyn HealthView>,
    score: Box<dyn Score>,
    /// Backend indices ordered by priority (stable within a priority).
    order: Vec<usize>,
    /// Ranges of `order` with one priority each, lowest number first.
    groups: Vec<Range<usize>>,
}

impl Selector {
    /// A selector over `backends` with the default health view and score.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        Self::with(backends, Box::new(LocalHealth), Box::new(LeastLoaded))
    }

    /// A selector with custom signals.
    pub fn with(
        backends: &[Arc<Backend>],
        health: Box<dyn HealthView>,
        score: Box<dyn Score>,
    ) -> Self {
        let mut order: Vec<usize> = (0..backends.len().min(MAX_INSTANCES)).collect();
        order.sort_by_key(|&i| backends[i].config.priority);
        let mut groups = Vec::new();
        let mut start = 0;
        for i in 1..=order.len() {
            if i == order.len()
                || backends[order[i]].config.priority != backends[order[start]].config.priority
            {
                groups.push(start..i);
                start = i;
            }
        }
        Self {
            health,
            score,
            order,
            groups,
        }
    }

    /// The health view in use.
    pub fn health(&self) -> &dyn HealthView {
        self.health.as_ref()
    }

    /// Picks the next instance, or `None` when no candidate is available.
    ///
    /// `serves` says whether an instance serves the request's deployment;
    /// `exclude` holds instances already tried (or found unclaimable) for
    /// this request.
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        serves: impl Fn(&Backend) -> bool,
        exclude: IndexSet,
        now: u64,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let mut ignore = |_: &Backend, _: SkipReason| {};
        let mut steer = Steering {
            room: &|_| None,
            skipped: &mut ignore,
            allow_fallback: true,
            fell_back: false,
        };
        self.pick_steered(backends, serves, exclude, now, rng, &mut steer)
    }

    /// [`Selector::pick`] with each candidate's rate-limit room: the
    /// lowest priority group with a candidate that has room, weighted
    /// power-of-two-choices there on score + [`ROOM_WEIGHT`] × (1 − share
    /// of the token limit left). When no available candidate has room,
    /// the one with the most (largest [`Headroom::slack`], the higher
    /// priority on a tie) among those that may serve as a fallback
    /// ([`Headroom::fallback`]), unless [`Steering::allow_fallback`] is
    /// off.
    pub fn pick_steered(
        &self,
        backends: &[Arc<Backend>],
        serves: impl Fn(&Backend) -> bool,
        exclude: IndexSet,
        now: u64,
        rng: &mut fastrand::Rng,
        steer: &mut Steering<'_>,
    ) -> Option<usize> {
        let mut avail = [0u8; MAX_INSTANCES];
        let mut fraction = [1.0f64; MAX_INSTANCES];
        let mut short = [(0u8, SkipReason::Tokens); MAX_INSTANCES];
        let mut n_short = 0;
        let mut best_short: Option<(usize, f64)> = None;
        let report = |steer: &mut Steering<'_>, short: &[(u8, SkipReason)], taken: usize| {
            for &(i, reason) in short {
                if usize::from(i) != taken {
                    (steer.skipped)(&backends[usize::from(i)], reason);
                }
            }
        };
        for g in &self.groups {
            let mut n = 0;
            let mut total = 0.0;
            for &i in &self.order[g.clone()] {
                let b = &backends[i];
                if exclude.contains(i) || !serves(b) || self.health.check(b, now).is_err() {
                    continue;
                }
                let room = (steer.room)(b).unwrap_or(Headroom::UNKNOWN);
                // i < MAX_INSTANCES = 128, so it fits in a u8.
                if let Err(reason) = room.fits {
                    short[n_short] = (i as u8, reason);
                    n_short += 1;
                    if room.fallback && best_short.is_none_or(|(_, s)| room.slack > s) {
                        best_short = Some((i, room.slack));
                    }
                    continue;
                }
                avail[n] = i as u8;
                fraction[n] = room.fraction;
                n += 1;
                total += b.config.weight;
            }
            let taken = match n {
                0 => continue,
                1 => usize::from(avail[0]),
                _ => {
                    let list = &avail[..n];
                    let weight = |k: usize| backends[usize::from(list[k])].config.weight;
                    let a = weighted(list.len(), &weight, total, None, rng);
                    let b = weighted(list.len(), &weight, total - weight(a), Some(a), rng);
                    let score = |k: usize| {
                        self.score.score(&backends[usize::from(list[k])])
                            + ROOM_WEIGHT * (1.0 - fraction[k])
                    };
                    // Ties keep the first draw, so an idle group splits
                    // exactly by weight.
                    usize::from(if score(b) < score(a) {
                        list[b]
                    } else {
                        list[a]
                    })
                }
            };
            report(steer, &short[..n_short], taken);
            return Some(taken);
        }
        let Some((taken, _)) = best_short.filter(|_| steer.allow_fallback) else {
            report(steer, &short[..n_short], usize::MAX);
            return None;
        };
        report(steer, &short[..n_short], taken);
        steer.fell_back = true;
        Some(taken)
    }

    /// When every instance that serves the deployment is cooling down,
    /// the time (ms from `now`) until the first one is free.
    pub fn all_cooling(
        &self,
        backends: &[Arc<Backend>],
        serves: impl Fn(&Backend) -> bool,
        now: u64,
    ) -> Option<u64> {
        let mut first: Option<u64> = None;
        for b in backends.iter().filter(|b| serves(b)) {
            match self.health.check(b, now) {
                Err(Unavailable::Cooling(until)) => {
                    first = Some(first.map_or(until, |f| f.min(until)));
                }
                _ => return None,
            }
        }
        first.map(|until| until.saturating_sub(now).max(1))
    }
}

/// Index in `0..n` drawn with probability proportional to `weight`,
/// skipping `skip`.
fn weighted(
    n: usize,
    weight: &impl Fn(usize) -> f64,
    total: f64,
    skip: Option<usize>,
    rng: &mut fastrand::Rng,
) -> usize {
    let mut x = rng.f64() * total;
    let mut last = 0;
    for k in 0..n {
        if Some(k) == skip {
            continue;
        }
        last = k;
        x -= weight(k);
        if x < 0.0 {
            return k;
        }
    }
    // Rounding can leave a sliver; the last eligible index takes it.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerConfig, Config};
    use proptest::prelude::*;

    fn backends(spec: &[(u32, f64)]) -> Vec<Arc<Backend>> {
        let instances: Vec<String> = spec
            .iter()
            .enumerate()
            .map(|(i, (p, w))| {
                format!(
                    r#"{{"name":"b{i}","url":"http://127.0.0.1:{}","api_key":"k","priority":{p},"weight":{w}}}"#,
                    1000 + i
                )
            })
            .collect();
        let doc = format!(r#"{{"instances":[{}]}}"#, instances.join(","));
        let cfg = Config::from_json(&doc).unwrap();
        cfg.instances
            .into_iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Backend::new(i, c, &BreakerConfig::default()).unwrap()))
            .collect()
    }

    fn all(_: &Backend) -> bool {
        true
    }

    #[test]
    fn uses_the_lowest_priority_with_an_available_instance() {
        let bs = backends(&[(2, 1.0), (1, 1.0), (1, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..50 {
            let i = sel
                .pick(&bs, all, IndexSet::default(), 10, &mut rng)
                .unwrap();
            assert_ne!(i, 0);
        }
        bs[1].cool_down(10, 1000);
        bs[2].cool_down(10, 1000);
        assert_eq!(
            sel.pick(&bs, all, IndexSet::default(), 10, &mut rng),
            Some(0)
        );
    }

    #[test]
    fn skips_tried_and_unserving_instances() {
        let bs = backends(&[(1, 1.0), (1, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(2);
        let mut ex = IndexSet::default();
        ex.insert(0);
        assert_eq!(sel.pick(&bs, all, ex, 10, &mut rng), Some(1));
        ex.insert(1);
        assert_eq!(sel.pick(&bs, all, ex, 10, &mut rng), None);
        let only_b0 = |b: &Backend| b.index == 0;
        assert_eq!(
            sel.pick(&bs, only_b0, IndexSet::default(), 10, &mut rng),
            Some(0)
        );
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let bs = backends(&[(1, 1.0), (1, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(3);
        let _held: Vec<_> = (0..5).map(|_| bs[0].try_acquire(10).unwrap()).collect();
        for _ in 0..50 {
            assert_eq!(
                sel.pick(&bs, all, IndexSet::default(), 10, &mut rng),
                Some(1)
            );
        }
    }

    #[test]
    fn all_cooling_reports_the_earliest_free_instance() {
        let bs = backends(&[(1, 1.0), (2, 1.0)]);
        let sel = Selector::new(&bs);
        bs[0].cool_down(100, 5000);
        assert_eq!(sel.all_cooling(&bs, all, 100), None);
        bs[1].cool_down(100, 1200);
        assert_eq!(sel.all_cooling(&bs, all, 100), Some(1200));
        assert_eq!(sel.all_cooling(&bs, all, 600), Some(700));
    }

    #[test]
    fn a_shorter_cooldown_never_shortens_a_longer_one() {
        let bs = backends(&[(1, 1.0)]);
        bs[0].cool_down(100, 5000);
        bs[0].cool_down(200, 10);
        assert_eq!(bs[0].cooling_until(300), Some(5100));
    }

    #[test]
    fn breaker_opens_after_threshold_and_allows_one_probe() {
        let bs = backends(&[(1, 1.0)]);
        // Defaults: 3 failures, open 5 s, doubling up to 60 s.
        let cfg = BreakerConfig::default();
        let b = &bs[0];
        b.record_failure(10, false, &cfg);
        b.record_failure(10, false, &cfg);
        assert!(b.check(10).is_ok());
        b.record_failure(10, false, &cfg);
        assert_eq!(b.check(50), Err(Unavailable::BreakerOpen));
        // After the open period: exactly one probe.
        let probe = b.try_acquire(5011).unwrap();
        assert!(probe.is_probe());
        assert!(b.try_acquire(5011).is_none());
        // Failed probe: open again for twice as long.
        b.record_failure(5011, true, &cfg);
        drop(probe);
        assert_eq!(b.check(5011 + 9_999), Err(Unavailable::BreakerOpen));
        let probe = b.try_acquire(5011 + 10_000).unwrap();
        assert!(probe.is_probe());
        b.record_success(probe.is_probe());
        drop(probe);
        assert!(b.check(15_012).is_ok());
        assert!(b.try_acquire(15_012).is_some_and(|g| !g.is_probe()));
        // Closed again: the backoff starts over at 5 s.
        for _ in 0..3 {
            b.record_failure(20_000, false, &cfg);
        }
        assert!(b.check(25_001).is_ok());
    }

    #[test]
    fn a_custom_score_plugs_in_without_changing_the_selector() {
        // E.g. latency or x-ratelimit-remaining-* folded into one number.
        struct PreferLast;
        impl Score for PreferLast {
            fn score(&self, b: &Backend) -> f64 {
                -(b.index as f64)
            }
        }
        let bs = backends(&[(1, 1.0), (1, 1.0), (1, 1.0)]);
        let sel = Selector::with(&bs, Box::new(LocalHealth), Box::new(PreferLast));
        let mut rng = fastrand::Rng::with_seed(5);
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            seen[sel
                .pick(&bs, all, IndexSet::default(), 10, &mut rng)
                .unwrap()] += 1;
        }
        // Power of two choices: the lowest-ranked one only wins when drawn
        // against itself, which cannot happen.
        assert_eq!(seen[0], 0, "{seen:?}");
        assert!(seen[2] > seen[1], "{seen:?}");
    }

    #[test]
    fn a_shared_health_view_can_veto_instances() {
        // E.g. cooldowns published by other replicas.
        struct Shared(u64);
        impl HealthView for Shared {
            fn check(&self, b: &Backend, now: u64) -> Result<(), Unavailable> {
                if b.index == 0 {
                    return Err(Unavailable::Cooling(self.0));
                }
                LocalHealth.check(b, now)
            }
        }
        let bs = backends(&[(1, 1.0), (2, 1.0)]);
        let sel = Selector::with(&bs, Box::new(Shared(500)), Box::new(LeastLoaded));
        let mut rng = fastrand::Rng::with_seed(6);
        assert_eq!(
            sel.pick(&bs, all, IndexSet::default(), 10, &mut rng),
            Some(1)
        );
        bs[1].cool_down(10, 1000);
        assert_eq!(sel.pick(&bs, all, IndexSet::default(), 10, &mut rng), None);
        assert_eq!(sel.all_cooling(&bs, all, 10), Some(490));
    }

    /// Room per backend index: `Some(slack)` fits when slack >= 1.
    fn room_of(rooms: &[f64]) -> impl Fn(&Backend) -> Option<Headroom> + '_ {
        move |b: &Backend| {
            let slack = rooms[b.index];
            Some(Headroom {
                fits: if slack >= 1.0 {
                    Ok(())
                } else {
                    Err(SkipReason::Tokens)
                },
                slack,
                fraction: (slack / 10.0).min(1.0),
                fallback: slack >= 0.1,
            })
        }
    }

    fn steered(
        sel: &Selector,
        bs: &[Arc<Backend>],
        rooms: &[f64],
        rng: &mut fastrand::Rng,
    ) -> (Option<usize>, Vec<usize>) {
        let mut skipped = Vec::new();
        let mut note = |b: &Backend, _: SkipReason| skipped.push(b.index);
        let room = room_of(rooms);
        let mut steer = Steering {
            room: &room,
            skipped: &mut note,
            allow_fallback: true,
            fell_back: false,
        };
        let picked = sel.pick_steered(bs, all, IndexSet::default(), 10, rng, &mut steer);
        let fell_back = steer.fell_back;
        assert_eq!(
            fell_back,
            picked.is_some_and(|i| rooms[i] < 1.0),
            "fell_back says whether the pick lacked room"
        );
        (picked, skipped)
    }

    #[test]
    fn skips_a_lane_without_room_like_a_cooling_one() {
        let bs = backends(&[(1, 1.0), (1, 1.0), (2, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50 {
            let (p, skipped) = steered(&sel, &bs, &[0.5, 3.0, 9.0], &mut rng);
            assert_eq!(p, Some(1));
            assert_eq!(skipped, vec![0]);
        }
        // The whole first group is short: the next group takes it.
        let (p, skipped) = steered(&sel, &bs, &[0.5, 0.2, 9.0], &mut rng);
        assert_eq!(p, Some(2));
        assert_eq!(skipped, vec![0, 1]);
    }

    #[test]
    fn falls_back_to_the_lane_with_most_room_when_none_has_enough() {
        let bs = backends(&[(1, 1.0), (1, 1.0), (2, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(8);
        let (p, skipped) = steered(&sel, &bs, &[0.5, 0.2, 0.7], &mut rng);
        assert_eq!(p, Some(2), "most room wins, whatever its priority");
        assert_eq!(skipped, vec![0, 1], "the one taken is not a skip");
        // A cooling lane is still never taken.
        bs[2].cool_down(10, 1000);
        let (p, _) = steered(&sel, &bs, &[0.5, 0.2, 0.7], &mut rng);
        assert_eq!(p, Some(0));
        // A lane whose shortage was confirmed is not a fallback.
        let (p, _) = steered(&sel, &bs, &[0.05, 0.2, 0.7], &mut rng);
        assert_eq!(p, Some(1));
        let (p, skipped) = steered(&sel, &bs, &[0.05, 0.02, 0.7], &mut rng);
        assert_eq!(p, None);
        assert_eq!(skipped, vec![0, 1]);
        // Without the fallback: nothing.
        let mut skipped = Vec::new();
        let mut note = |b: &Backend, _: SkipReason| skipped.push(b.index);
        let room = room_of(&[0.5, 0.2, 0.7]);
        let mut steer = Steering {
            room: &room,
            skipped: &mut note,
            allow_fallback: false,
            fell_back: false,
        };
        let p = sel.pick_steered(&bs, all, IndexSet::default(), 10, &mut rng, &mut steer);
        assert_eq!(p, None);
        assert_eq!(skipped, vec![0, 1]);
    }

    #[test]
    fn room_left_is_folded_into_the_score() {
        let bs = backends(&[(1, 1.0), (1, 1.0)]);
        let sel = Selector::new(&bs);
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..50 {
            let (p, skipped) = steered(&sel, &bs, &[2.0, 10.0], &mut rng);
            assert_eq!(p, Some(1), "idle, so room decides");
            assert!(skipped.is_empty());
        }
        // Enough in flight on the roomier lane outweighs its room.
        let _held: Vec<_> = (0..5).map(|_| bs[1].try_acquire(10).unwrap()).collect();
        let (p, _) = steered(&sel, &bs, &[2.0, 10.0], &mut rng);
        assert_eq!(p, Some(0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn never_picks_an_unavailable_instance_while_one_is_available(
            spec in prop::collection::vec((1u32..4, 1u32..5, 0u8..3), 1..8),
            seed in any::<u64>(),
        ) {
            let bs = backends(&spec.iter().map(|(p, w, _)| (*p, f64::from(*w))).collect::<Vec<_>>());
            let cfg = BreakerConfig { failure_threshold: 1, open_ms: 1000, max_open_ms: 1000 };
            for (b, (_, _, state)) in bs.iter().zip(&spec) {
                match state {
                    1 => b.cool_down(10, 1000),
                    2 => b.record_failure(10, false, &cfg),
                    _ => {}
                }
            }
            let sel = Selector::new(&bs);
            let mut rng = fastrand::Rng::with_seed(seed);
            let available: Vec<usize> = spec.iter().enumerate().filter(|(_, s)| s.2 == 0).map(|(i, _)| i).collect();
            let picked = sel.pick(&bs, all, IndexSet::default(), 20, &mut rng);
            if available.is_empty() {
                prop_assert_eq!(picked, None);
            } else {
                let i = picked.unwrap();
                prop_assert!(available.contains(&i));
                let best = available.iter().map(|&k| spec[k].0).min().unwrap();
                prop_assert_eq!(spec[i].0, best, "priority respected");
            }
        }

        #[test]
        fn never_picks_a_lane_without_room_while_one_with_room_is_available(
            spec in prop::collection::vec((1u32..4, 1u32..5, 0u32..30, any::<bool>()), 1..8),
            seed in any::<u64>(),
        ) {
            let bs = backends(&spec.iter().map(|(p, w, _, _)| (*p, f64::from(*w))).collect::<Vec<_>>());
            for (b, s) in bs.iter().zip(&spec) {
                if s.3 {
                    b.cool_down(10, 1000);
                }
            }
            let rooms: Vec<f64> = spec.iter().map(|s| f64::from(s.2) / 10.0).collect();
            let sel = Selector::new(&bs);
            let mut rng = fastrand::Rng::with_seed(seed);
            let (picked, skipped) = steered(&sel, &bs, &rooms, &mut rng);
            let usable: Vec<usize> = (0..spec.len()).filter(|&i| !spec[i].3).collect();
            let roomy: Vec<usize> = usable.iter().copied().filter(|&i| rooms[i] >= 1.0).collect();
            if usable.is_empty() {
                prop_assert_eq!(picked, None);
            } else if roomy.is_empty() {
                // Lanes with slack below 0.1 stand for confirmed shortages:
                // never a fallback.
                let fallbacks: Vec<usize> = usable.iter().copied().filter(|&i| rooms[i] >= 0.1).collect();
                if fallbacks.is_empty() {
                    prop_assert_eq!(picked, None);
                    prop_assert_eq!(skipped.len(), usable.len());
                } else {
                    let i = picked.unwrap();
                    let most = fallbacks.iter().map(|&k| rooms[k]).fold(f64::MIN, f64::max);
                    prop_assert!(rooms[i] >= most);
                    prop_assert_eq!(skipped.len(), usable.len() - 1);
                }
            } else {
                let i = picked.unwrap();
                prop_assert!(roomy.contains(&i));
                let best = roomy.iter().map(|&k| spec[k].0).min().unwrap();
                prop_assert_eq!(spec[i].0, best, "priority respected among lanes with room");
                prop_assert!(!skipped.contains(&i));
                prop_assert!(skipped.iter().all(|k| rooms[*k] < 1.0 && !spec[*k].3));
            }
        }

        #[test]
        fn idle_picks_follow_weights(
            weights in prop::collection::vec(1u32..5, 2..5),
            seed in any::<u64>(),
        ) {
            let bs = backends(&weights.iter().map(|w| (1, f64::from(*w))).collect::<Vec<_>>());
            let sel = Selector::new(&bs);
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = 20_000;
            let mut counts = vec![0u32; bs.len()];
            for _ in 0..n {
                counts[sel.pick(&bs, all, IndexSet::default(), 10, &mut rng).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (c, w) in counts.iter().zip(&weights) {
                let expected = f64::from(*w) / f64::from(total);
                let got = f64::from(*c) / f64::from(n);
                prop_assert!((got - expected).abs() < 0.03, "got {got} expected {expected}");
            }
        }
    }
}
