//! Rate-limit prediction for one lane (one instance × one upstream
//! deployment): how much of Azure's deployment-wide quota is left right
//! now, so the selector can skip a lane before it answers 429.
//!
//! Azure admits a request by an estimate (prompt + `max_tokens` × `n`)
//! that it reserves for 60 s, and counts requests over 10 s (RPM / 6).
//! Its answers carry `x-ratelimit-remaining-tokens` and
//! `x-ratelimit-remaining-requests`, both shared by every caller of the
//! deployment. A lane keeps:
//! - a [`Ledger`] of the estimates this gateway sent, over the last 60 s
//!   (tokens) and 10 s (requests);
//! - the last observation of the remaining-* headers, re-expressed as the
//!   load of *other* callers at that moment (what the headers say is used,
//!   minus what this gateway's ledger explains);
//! - the limits: configured, else read from `x-ratelimit-limit-*`, else
//!   the smallest limit consistent with every observation (remaining + own
//!   reservations at the time).
//!
//! The prediction is `limit − own reservations still in the window −
//! other callers' load`, where the other callers' load decays linearly to
//! zero over the window (their admission times are unknown), or over the
//! `retry-after` of a 429. Right after an observation the prediction
//! equals what Azure said; in between, the ledger moves it exactly for
//! this gateway's own traffic.
//!
//! Everything here is pure: time is passed in (ms on
//! [`crate::backend::Clock`]), nothing reads a clock or a header map.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Azure's token window: a reservation returns 60 s after admission.
pub const TOKEN_WINDOW_MS: u64 = 60_000;
/// Azure's request window: RPM is enforced as RPM / 6 per 10 s.
pub const REQUEST_WINDOW_MS: u64 = 10_000;
/// Share added to a request's estimate before comparing it with the
/// predicted room, for the sub-second burst rules and estimate error.
pub const MARGIN: f64 = 0.05;
/// PTU utilization (percent) at or above which a lane is skipped.
pub const UTILIZATION_SKIP_PCT: f64 = 95.0;
/// Most lanes one instance keeps state for (an instance without a
/// `deployments` map serves any name; this bounds memory and metric
/// labels).
pub const MAX_LANES_PER_INSTANCE: usize = 256;

const BUCKET_MS: u64 = 100;
/// Buckets a reservation stays in: it leaves between 60.0 and 60.1 s after
/// it was sent, never earlier than Azure frees it.
const TOKEN_BUCKETS: u64 = TOKEN_WINDOW_MS / BUCKET_MS + 1;
const REQUEST_BUCKETS: u64 = REQUEST_WINDOW_MS / BUCKET_MS + 1;
const RING: usize = TOKEN_BUCKETS as usize;

/// Configured limits of one lane (`deployments` entry object).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneLimits {
    /// Tokens per minute; `None` = learn it.
    pub tpm: Option<u64>,
    /// Requests per minute; `None` = learn it.
    pub rpm: Option<u64>,
}

impl LaneLimits {
    /// Requests per 10 s window, as Azure counts them: `ceil(rpm / 6)`.
    pub fn requests_per_window(&self) -> Option<u64> {
        self.rpm.map(|r| r.div_ceil(6))
    }
}

/// This gateway's own reservations: a ring of 100 ms buckets covering the
/// last 60 s, with running sums for the 60 s token window and the 10 s
/// request window. Never negative (saturating), and everything added
/// leaves both windows.
#[derive(Debug, Clone)]
pub struct Ledger {
    tokens: Box<[u64; RING]>,
    requests: Box<[u32; RING]>,
    /// Bucket number the ring has been advanced to.
    head: u64,
    tok_sum: u64,
    req_sum: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            tokens: Box::new([0; RING]),
            requests: Box::new([0; RING]),
            head: 0,
            tok_sum: 0,
            req_sum: 0,
        }
    }
}

/// What one sent request put in the ledger, to take back if the instance
/// never admitted it (a 429, a connection failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    bucket: u64,
    tokens: u64,
}

impl Ledger {
    fn slot(bucket: u64) -> usize {
        (bucket % RING as u64) as usize
    }

    /// Moves the windows to `now`, dropping what left them.
    pub fn advance(&mut self, now: u64) {
        let to = now / BUCKET_MS;
        if to <= self.head {
            return;
        }
        if to - self.head >= TOKEN_BUCKETS {
            self.tokens.fill(0);
            self.requests.fill(0);
            self.tok_sum = 0;
            self.req_sum = 0;
            self.head = to;
            return;
        }
        for k in self.head + 1..=to {
            // Bucket k - REQUEST_BUCKETS leaves the request window; its
            // slot still holds it (it is younger than the token window).
            if let Some(old) = k.checked_sub(REQUEST_BUCKETS) {
                let n = self.requests[Self::slot(old)];
                self.req_sum = self.req_sum.saturating_sub(u64::from(n));
            }
            // Slot k is reused: it held bucket k - TOKEN_BUCKETS, whose
            // requests have already left their window.
            let s = Self::slot(k);
            self.tok_sum = self.tok_sum.saturating_sub(self.tokens[s]);
            self.tokens[s] = 0;
            self.requests[s] = 0;
        }
        self.head = to;
    }

    /// Records one request reserving `tokens` at `now`.
    pub fn add(&mut self, now: u64, tokens: u64) -> Entry {
        self.advance(now);
        let bucket = self.head.max(now / BUCKET_MS);
        let s = Self::slot(bucket);
        self.tokens[s] = self.tokens[s].saturating_add(tokens);
        self.requests[s] = self.requests[s].saturating_add(1);
        self.tok_sum = self.tok_sum.saturating_add(tokens);
        self.req_sum = self.req_sum.saturating_add(1);
        Entry { bucket, tokens }
    }

    /// Takes an entry back (the instance reserved nothing for it). An
    /// entry that already left a window is not counted there any more.
    pub fn refund(&mut self, now: u64, e: Entry) {
        self.advance(now);
        let s = Self::slot(e.bucket);
        if e.bucket + TOKEN_BUCKETS > self.head {
            let t = e.tokens.min(self.tokens[s]);
            self.tokens[s] -= t;
            self.tok_sum = self.tok_sum.saturating_sub(t);
        }
        if e.bucket + REQUEST_BUCKETS > self.head && self.requests[s] > 0 {
            self.requests[s] -= 1;
            self.req_sum = self.req_sum.saturating_sub(1);
        }
    }

    /// Tokens reserved in the last 60 s, as of the last `advance`.
    pub fn tokens(&self) -> u64 {
        self.tok_sum
    }

    /// Requests sent in the last 10 s, as of the last `advance`.
    pub fn requests(&self) -> u64 {
        self.req_sum
    }
}

/// Why a lane was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Predicted token room below the request's estimate plus margin.
    Tokens,
    /// No request left in the 10 s budget.
    Requests,
    /// PTU utilization at or above [`UTILIZATION_SKIP_PCT`].
    Utilization,
}

impl SkipReason {
    /// Every reason, in metric-handle order.
    pub const ALL: [SkipReason; 3] = [
        SkipReason::Tokens,
        SkipReason::Requests,
        SkipReason::Utilization,
    ];

    /// The `reason` label: `tokens`, `requests` or `utilization`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Tokens => "tokens",
            SkipReason::Requests => "requests",
            SkipReason::Utilization => "utilization",
        }
    }

    /// Position in [`SkipReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether a lane can take a request now, and how much room it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headroom {
    /// `Err` with the first dimension that is short.
    pub fits: Result<(), SkipReason>,
    /// Predicted room over what the request needs, in the tightest known
    /// dimension (≥ 1 when it fits; `f64::INFINITY` when nothing is
    /// known). The fallback when no lane fits takes the largest.
    pub slack: f64,
    /// Predicted token room as a share of the limit, 0..=1 (1 when
    /// unknown); folded into the selector's score.
    pub fraction: f64,
    /// Whether the lane may be tried when no lane has room (false for a
    /// minute after such a try met a 429: the prediction was confirmed).
    pub fallback: bool,
}

impl Headroom {
    /// Nothing known: the lane is taken as having room.
    pub const UNKNOWN: Headroom = Headroom {
        fits: Ok(()),
        slack: f64::INFINITY,
        fraction: 1.0,
        fallback: true,
    };
}

/// One reading of the rate-limit headers of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// `x-ratelimit-remaining-tokens` (absent or negative: `None`).
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-limit-requests` (Azure's 10 s budget).
    pub limit_requests: Option<u64>,
    /// `azure-openai-deployment-utilization`, in percent.
    pub utilization: Option<f64>,
    /// A 429: which budget ran out, from `policy-id`, and its
    /// `retry-after` in ms.
    pub throttled: Option<Throttle>,
}

/// What a 429 said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// `DeploymentRatelimit-Token` (or no/unknown `policy-id`).
    pub tokens: bool,
    /// `DeploymentRatelimit-Call` (or no/unknown `policy-id`).
    pub requests: bool,
    /// When the instance said to retry (ms).
    pub retry_after_ms: u64,
}

/// Other callers' load at an observation: decays linearly to zero over
/// `horizon_ms` from `at`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Foreign {
    at: u64,
    load: f64,
    horizon_ms: u64,
}

impl Foreign {
    fn now(&self, now: u64) -> f64 {
        let age = now.saturating_sub(self.at) as f64;
        let h = self.horizon_ms.max(1) as f64;
        self.load * (1.0 - age / h).max(0.0)
    }
}

/// The predicted state of a lane at some time (for the admin output and
/// metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Token limit in use (configured, from headers, or inferred).
    pub tpm: Option<u64>,
    /// Requests per 10 s in use.
    pub requests_per_10s: Option<u64>,
    /// Predicted tokens left now; `None` when nothing is known.
    pub remaining_tokens: Option<i64>,
    /// Predicted requests left in the 10 s budget now.
    pub remaining_requests: Option<i64>,
    /// This gateway's reservations in the last 60 s.
    pub own_tokens: u64,
    /// This gateway's requests in the last 10 s.
    pub own_requests: u64,
    /// Last PTU utilization seen, decayed to now (percent).
    pub utilization: Option<f64>,
    /// Milliseconds since the last header observation.
    pub observed_ms_ago: Option<u64>,
}

/// The mutable state of one lane.
#[derive(Debug, Clone, Default)]
pub struct LaneState {
    ledger: Ledger,
    limit_tokens_header: Option<u64>,
    limit_requests_header: Option<u64>,
    inferred_tokens: u64,
    inferred_requests: u64,
    foreign_tokens: Option<Foreign>,
    foreign_requests: Option<Foreign>,
    utilization: Option<Foreign>,
    last_seen: Option<u64>,
    /// Until when the lane is not tried as a fallback (no lane has room).
    fallback_blocked_until: u64,
}

/// A sent request: its ledger entry and the own reservations at that
/// moment (itself included), which is what the instance's answer to it
/// reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// When it was sent.
    pub at: u64,
    entry: Entry,
    own_tokens: u64,
    own_requests: u64,
}

impl LaneState {
    fn tpm(&self, cfg: &LaneLimits) -> Option<u64> {
        cfg.tpm
            .or(self.limit_tokens_header)
            .or((self.inferred_tokens > 0).then_some(self.inferred_tokens))
    }

    fn req_limit(&self, cfg: &LaneLimits) -> Option<u64> {
        cfg.requests_per_window()
            .or(self.limit_requests_header)
            .or((self.inferred_requests > 0).then_some(self.inferred_requests))
    }

    /// Records a request reserving `estimate` tokens, sent at `now`.
    pub fn send(&mut self, now: u64, estimate: u64) -> Sent {
        let entry = self.ledger.add(now, estimate);
        Sent {
            at: now,
            entry,
            own_tokens: self.ledger.tokens(),
            own_requests: self.ledger.requests(),
        }
    }

    /// Takes a sent request back: the instance never admitted it.
    pub fn refund(&mut self, now: u64, sent: &Sent) {
        self.ledger.refund(now, sent.entry);
    }

    /// Re-anchors the prediction on the headers of the answer to `sent`.
    /// A 429 was not admitted: its reservation is refunded, and the budget
    /// its `policy-id` names is taken as empty until its `retry-after`.
    pub fn observe(&mut self, now: u64, sent: &Sent, r: &Reading, cfg: &LaneLimits) {
        let (mut own_tok, mut own_req) = (sent.own_tokens, sent.own_requests);
        if r.throttled.is_some() {
            self.refund(now, sent);
            own_tok = own_tok.saturating_sub(sent.entry.tokens);
            own_req = own_req.saturating_sub(1);
        }
        if let Some(l) = r.limit_tokens.filter(|&l| l > 0) {
            self.limit_tokens_header = Some(l);
        }
        if let Some(l) = r.limit_requests.filter(|&l| l > 0) {
            self.limit_requests_header = Some(l);
        }
        let mut rem_tok = r.remaining_tokens;
        let mut rem_req = r.remaining_requests;
        let mut tok_horizon = TOKEN_WINDOW_MS;
        let mut req_horizon = REQUEST_WINDOW_MS;
        if let Some(t) = r.throttled {
            if t.tokens {
                rem_tok = Some(0);
                tok_horizon = t.retry_after_ms.clamp(1, TOKEN_WINDOW_MS);
            }
            if t.requests {
                rem_req = Some(0);
                req_horizon = t.retry_after_ms.clamp(1, REQUEST_WINDOW_MS);
            }
        }
        // Observations can arrive out of order (a slow answer to an older
        // request): only a newer one re-anchors.
        let newer = |f: &Option<Foreign>| f.is_none_or(|f| sent.at >= f.at);
        if let Some(rem) = rem_tok {
            if r.throttled.is_none() {
                self.inferred_tokens = self.inferred_tokens.max(rem.saturating_add(own_tok));
            }
            if newer(&self.foreign_tokens)
                && let Some(limit) = self.tpm(cfg)
            {
                let load = limit.saturating_sub(rem).saturating_sub(own_tok);
                self.foreign_tokens = Some(Foreign {
                    at: sent.at,
                    load: load as f64,
                    horizon_ms: tok_horizon,
                });
            }
        }
        if let Some(rem) = rem_req {
            if r.throttled.is_none() {
                self.inferred_requests = self.inferred_requests.max(rem.saturating_add(own_req));
            }
            if newer(&self.foreign_requests)
                && let Some(limit) = self.req_limit(cfg)
            {
                let load = limit.saturating_sub(rem).saturating_sub(own_req);
                self.foreign_requests = Some(Foreign {
                    at: sent.at,
                    load: load as f64,
                    horizon_ms: req_horizon,
                });
            }
        }
        if let Some(u) = r.utilization.filter(|u| u.is_finite() && *u >= 0.0) {
            self.utilization = Some(Foreign {
                at: sent.at,
                load: u,
                horizon_ms: TOKEN_WINDOW_MS,
            });
        }
        if rem_tok.is_some() || rem_req.is_some() || r.utilization.is_some() {
            self.last_seen = Some(self.last_seen.map_or(now, |t| t.max(now)));
        }
    }

    /// The prediction at `now`.
    pub fn predict(&mut self, now: u64, cfg: &LaneLimits) -> Prediction {
        self.ledger.advance(now);
        self.prediction(now, self.ledger.tokens(), self.ledger.requests(), cfg)
    }

    /// The prediction at `now` with the given own reservations.
    fn prediction(
        &self,
        now: u64,
        own_tokens: u64,
        own_requests: u64,
        cfg: &LaneLimits,
    ) -> Prediction {
        let tpm = self.tpm(cfg);
        let req = self.req_limit(cfg);
        let room = |limit: Option<u64>, own: u64, foreign: &Option<Foreign>| {
            limit.map(|l| {
                let f = foreign.map_or(0.0, |f| f.now(now));
                let r = l as f64 - own as f64 - f.ceil();
                r as i64
            })
        };
        Prediction {
            tpm,
            requests_per_10s: req,
            remaining_tokens: room(tpm, own_tokens, &self.foreign_tokens),
            remaining_requests: room(req, own_requests, &self.foreign_requests),
            own_tokens,
            own_requests,
            utilization: self.utilization.map(|u| u.now(now)),
            observed_ms_ago: self.last_seen.map(|t| now.saturating_sub(t)),
        }
    }

    /// Whether a request estimated at `estimate` tokens fits at `now`.
    pub fn headroom(&mut self, now: u64, estimate: u64, cfg: &LaneLimits) -> Headroom {
        let p = self.predict(now, cfg);
        Headroom {
            fallback: now >= self.fallback_blocked_until,
            ..headroom(&p, estimate)
        }
    }

    /// A try on this lane while it had no predicted room met a 429: the
    /// prediction is confirmed, so the lane is not tried that way again
    /// for the next 60 s (the ledger follows it exactly meanwhile).
    pub fn block_fallback(&mut self, now: u64) {
        self.fallback_blocked_until = now.saturating_add(TOKEN_WINDOW_MS);
    }

    /// Milliseconds from `now` until a request of `estimate` tokens is
    /// predicted to fit, as this gateway's reservations leave the windows
    /// and other callers' load fades (at least 1; at most 60.1 s, when
    /// everything has left).
    pub fn time_until_room(&mut self, now: u64, estimate: u64, cfg: &LaneLimits) -> u64 {
        self.ledger.advance(now);
        if headroom(&self.predict(now, cfg), estimate).fits.is_ok() {
            return 1;
        }
        let head = self.ledger.head;
        let (mut tok, mut req) = (self.ledger.tokens(), self.ledger.requests());
        for k in 1..=TOKEN_BUCKETS {
            let b = head + k;
            if let Some(old) = b.checked_sub(TOKEN_BUCKETS) {
                tok = tok.saturating_sub(self.ledger.tokens[Ledger::slot(old)]);
            }
            if let Some(old) = b.checked_sub(REQUEST_BUCKETS).filter(|&o| o <= head) {
                req = req.saturating_sub(u64::from(self.ledger.requests[Ledger::slot(old)]));
            }
            let t = b * BUCKET_MS;
            let p = self.prediction(t, tok, req, cfg);
            let utilization_ok = p.utilization.is_none_or(|u| u < UTILIZATION_SKIP_PCT);
            if headroom(&p, estimate).fits.is_ok() && utilization_ok {
                return t.saturating_sub(now).max(1);
            }
        }
        TOKEN_WINDOW_MS + BUCKET_MS
    }
}

/// Judges a prediction against a request's estimate.
pub fn headroom(p: &Prediction, estimate: u64) -> Headroom {
    let mut fits = Ok(());
    let mut slack = f64::INFINITY;
    if let Some(room) = p.remaining_tokens {
        let need = estimate as f64 * (1.0 + MARGIN);
        let ratio = if need > 0.0 {
            room as f64 / need
        } else if room >= 0 {
            f64::INFINITY
        } else {
            0.0
        };
        if ratio < 1.0 {
            fits = Err(SkipReason::Tokens);
        }
        slack = slack.min(ratio);
    }
    if let Some(room) = p.remaining_requests {
        let ratio = room as f64;
        if ratio < 1.0 && fits.is_ok() {
            fits = Err(SkipReason::Requests);
        }
        slack = slack.min(ratio);
    }
    if let Some(u) = p.utilization
        && u >= UTILIZATION_SKIP_PCT
    {
        if fits.is_ok() {
            fits = Err(SkipReason::Utilization);
        }
        slack = slack.min((100.0 - u).max(0.0) / (100.0 - UTILIZATION_SKIP_PCT));
    }
    let fraction = match (p.remaining_tokens, p.tpm) {
        (Some(r), Some(l)) if l > 0 => (r as f64 / l as f64).clamp(0.0, 1.0),
        _ => 1.0,
    };
    Headroom {
        fits,
        slack,
        fraction,
        fallback: true,
    }
}

/// One lane: its state behind a short-held lock.
#[derive(Debug, Default)]
pub struct Lane {
    state: Mutex<LaneState>,
}

impl Lane {
    /// Runs `f` on the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut LaneState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s)
    }
}

/// The lanes of one instance, by upstream deployment name. Kept across a
/// reload that keeps the instance.
#[derive(Debug, Default)]
pub struct LaneTable {
    lanes: RwLock<HashMap<String, Arc<Lane>>>,
}

impl LaneTable {
    /// The lane for `deployment`, made on first use; `None` once the
    /// instance has [`MAX_LANES_PER_INSTANCE`] lanes.
    pub fn get(&self, deployment: &str) -> Option<Arc<Lane>> {
        if let Some(l) = self
            .lanes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(deployment)
        {
            return Some(Arc::clone(l));
        }
        let mut w = self.lanes.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = w.get(deployment) {
            return Some(Arc::clone(l));
        }
        if w.len() >= MAX_LANES_PER_INSTANCE {
            return None;
        }
        let l = Arc::new(Lane::default());
        w.insert(deployment.to_owned(), Arc::clone(&l));
        Some(l)
    }

    /// The lane for `deployment` if one exists (never makes one).
    pub fn find(&self, deployment: &str) -> Option<Arc<Lane>> {
        self.lanes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(deployment)
            .cloned()
    }

    /// Every lane, sorted by deployment name.
    pub fn all(&self) -> Vec<(String, Arc<Lane>)> {
        let mut v: Vec<_> = self
            .lanes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, l)| (k.clone(), Arc::clone(l)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TPM: LaneLimits = LaneLimits {
        tpm: Some(10_000),
        rpm: Some(60),
    };

    fn reading(tok: u64, req: u64) -> Reading {
        Reading {
            remaining_tokens: Some(tok),
            remaining_requests: Some(req),
            ..Reading::default()
        }
    }

    #[test]
    fn own_reservations_leave_after_sixty_seconds_and_requests_after_ten() {
        let mut l = Ledger::default();
        l.add(1_000, 500);
        l.add(5_000, 300);
        l.advance(10_000);
        assert_eq!((l.tokens(), l.requests()), (800, 2));
        l.advance(11_100);
        assert_eq!((l.tokens(), l.requests()), (800, 1));
        l.advance(60_999);
        assert_eq!(l.tokens(), 800, "never freed before Azure frees it");
        l.advance(61_100);
        assert_eq!((l.tokens(), l.requests()), (300, 0));
        l.advance(65_100);
        assert_eq!(l.tokens(), 0);
    }

    #[test]
    fn a_refund_takes_back_exactly_the_entry() {
        let mut l = Ledger::default();
        let a = l.add(1_000, 500);
        l.add(1_000, 200);
        l.refund(2_000, a);
        assert_eq!((l.tokens(), l.requests()), (200, 1));
        // A refund after the entry left its windows changes nothing.
        let b = l.add(3_000, 100);
        l.advance(70_000);
        l.refund(70_000, b);
        assert_eq!((l.tokens(), l.requests()), (0, 0));
    }

    #[test]
    fn alone_on_a_deployment_the_prediction_follows_the_ledger() {
        let mut s = LaneState::default();
        let sent = s.send(1_000, 2_000);
        s.observe(1_200, &sent, &reading(8_000, 9), &TPM);
        let p = s.predict(1_300, &TPM);
        assert_eq!(p.remaining_tokens, Some(8_000));
        assert_eq!(p.remaining_requests, Some(9));
        for t in [2_000, 3_000, 4_000] {
            s.send(t, 2_000);
        }
        assert_eq!(s.predict(4_100, &TPM).remaining_tokens, Some(2_000));
        assert!(s.headroom(4_100, 2_000, &TPM).fits == Err(SkipReason::Tokens));
        assert!(s.headroom(4_100, 1_900, &TPM).fits.is_ok());
        // The first reservation leaves 60 s after it was sent.
        assert_eq!(s.predict(61_100, &TPM).remaining_tokens, Some(4_000));
        assert_eq!(s.predict(64_200, &TPM).remaining_tokens, Some(10_000));
    }

    #[test]
    fn other_callers_load_is_read_from_the_headers_and_decays() {
        let mut s = LaneState::default();
        let sent = s.send(0, 1_000);
        // Someone else holds 6,000: 10,000 - 1,000 own - 6,000.
        s.observe(100, &sent, &reading(3_000, 9), &TPM);
        assert_eq!(s.predict(0, &TPM).remaining_tokens, Some(3_000));
        // Half the window later half of the foreign load is assumed gone.
        assert_eq!(s.predict(30_000, &TPM).remaining_tokens, Some(6_000));
        assert_eq!(s.predict(60_100, &TPM).remaining_tokens, Some(10_000));
        // A new observation re-anchors.
        let sent = s.send(61_000, 1_000);
        s.observe(61_050, &sent, &reading(1_000, 9), &TPM);
        assert_eq!(s.predict(61_000, &TPM).remaining_tokens, Some(1_000));
    }

    #[test]
    fn a_429_empties_the_budget_its_policy_names_until_its_retry_after() {
        let mut s = LaneState::default();
        let sent = s.send(0, 1_000);
        let r = Reading {
            throttled: Some(Throttle {
                tokens: true,
                requests: false,
                retry_after_ms: 20_000,
            }),
            ..Reading::default()
        };
        s.observe(50, &sent, &r, &TPM);
        let p = s.predict(0, &TPM);
        assert_eq!(p.own_tokens, 0, "a refused request reserves nothing");
        assert_eq!(p.remaining_tokens, Some(0));
        assert_eq!(p.remaining_requests, Some(10), "requests untouched");
        assert_eq!(s.predict(10_000, &TPM).remaining_tokens, Some(5_000));
        assert_eq!(s.predict(20_000, &TPM).remaining_tokens, Some(10_000));

        let sent = s.send(30_000, 10);
        let r = Reading {
            throttled: Some(Throttle {
                tokens: false,
                requests: true,
                retry_after_ms: 4_000,
            }),
            ..Reading::default()
        };
        s.observe(30_010, &sent, &r, &TPM);
        assert_eq!(s.headroom(30_020, 10, &TPM).fits, Err(SkipReason::Requests));
        assert!(s.headroom(34_000, 10, &TPM).fits.is_ok());
    }

    #[test]
    fn limits_come_from_headers_else_from_what_the_headers_imply() {
        let none = LaneLimits::default();
        let mut s = LaneState::default();
        assert_eq!(s.predict(0, &none).remaining_tokens, None);
        assert_eq!(s.headroom(0, 1_000_000, &none), Headroom::UNKNOWN);
        let sent = s.send(0, 500);
        s.observe(10, &sent, &reading(9_500, 19), &none);
        let p = s.predict(10, &none);
        assert_eq!((p.tpm, p.requests_per_10s), (Some(10_000), Some(20)));
        let sent = s.send(20, 500);
        let r = Reading {
            limit_tokens: Some(30_000),
            limit_requests: Some(50),
            ..reading(20_000, 40)
        };
        s.observe(30, &sent, &r, &none);
        let p = s.predict(20, &none);
        assert_eq!((p.tpm, p.requests_per_10s), (Some(30_000), Some(50)));
        assert_eq!(p.remaining_tokens, Some(20_000));
        // Configured limits win over both.
        assert_eq!(s.predict(30, &TPM).tpm, Some(10_000));
    }

    #[test]
    fn older_answers_do_not_re_anchor() {
        let mut s = LaneState::default();
        let first = s.send(0, 1_000);
        let second = s.send(100, 1_000);
        s.observe(200, &second, &reading(5_000, 8), &TPM);
        s.observe(300, &first, &reading(9_000, 9), &TPM);
        assert_eq!(s.predict(100, &TPM).remaining_tokens, Some(5_000));
    }

    #[test]
    fn high_ptu_utilization_skips_the_lane_until_it_drains() {
        let mut s = LaneState::default();
        let none = LaneLimits::default();
        let sent = s.send(0, 100);
        let r = Reading {
            utilization: Some(99.0),
            ..Reading::default()
        };
        s.observe(10, &sent, &r, &none);
        assert_eq!(
            s.headroom(10, 100, &none).fits,
            Err(SkipReason::Utilization)
        );
        assert!(s.headroom(5_000, 100, &none).fits.is_ok());
    }

    #[test]
    fn predicts_when_a_request_will_fit_and_blocks_a_confirmed_fallback() {
        let mut s = LaneState::default();
        s.send(0, 4_000);
        s.send(10_000, 4_000);
        // 2,000 left: 3,000 (+5%) fits once the first reservation leaves.
        assert_eq!(s.time_until_room(20_000, 3_000, &TPM), 40_100);
        assert_eq!(s.time_until_room(20_000, 1_000, &TPM), 1);
        // More than the whole limit: never, so the whole window.
        assert_eq!(s.time_until_room(20_000, 20_000, &TPM), 60_100);
        assert!(s.headroom(20_000, 3_000, &TPM).fallback);
        s.block_fallback(20_000);
        assert!(!s.headroom(20_000, 3_000, &TPM).fallback);
        assert!(s.headroom(80_000, 3_000, &TPM).fallback);
    }

    #[test]
    fn the_score_fraction_is_the_share_of_the_limit_left() {
        let mut s = LaneState::default();
        s.send(0, 2_500);
        let h = s.headroom(0, 100, &TPM);
        assert!((h.fraction - 0.75).abs() < 1e-9, "{h:?}");
        assert!(h.slack > 1.0);
    }

    #[test]
    fn the_lane_table_is_bounded() {
        let t = LaneTable::default();
        for i in 0..MAX_LANES_PER_INSTANCE {
            assert!(t.get(&format!("d{i}")).is_some());
        }
        assert!(t.get("one-too-many").is_none());
        assert!(t.get("d0").is_some());
        assert!(t.find("nope").is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u64, u64),
        Refund(usize),
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..300, 0u64..5_000).prop_map(|(g, t)| Op::Add(g, t)),
            (0usize..64).prop_map(Op::Refund),
            (0u64..20_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a plain list of live entries: the running sums always
        /// equal what is still in each window (so they never go negative
        /// or drift), and 60.1 s after the last entry everything has left.
        #[test]
        fn the_ledger_matches_a_brute_force_count_and_always_drains(
            ops in prop::collection::vec(op(), 1..300),
        ) {
            let mut l = Ledger::default();
            let mut now = 0u64;
            let mut live: Vec<(u64, u64, Entry, bool)> = Vec::new();
            for o in ops {
                match o {
                    Op::Add(gap, t) => {
                        now += gap;
                        let e = l.add(now, t);
                        live.push((now, t, e, true));
                    }
                    Op::Refund(i) => {
                        if let Some(x) = live.iter_mut().filter(|x| x.3).nth(i) {
                            x.3 = false;
                            l.refund(now, x.2);
                        }
                    }
                    Op::Wait(gap) => {
                        now += gap;
                        l.advance(now);
                    }
                }
                let bucket_now = now / BUCKET_MS;
                let tok: u64 = live
                    .iter()
                    .filter(|x| x.3 && x.2.bucket + TOKEN_BUCKETS > bucket_now)
                    .map(|x| x.1)
                    .sum();
                let req = live
                    .iter()
                    .filter(|x| x.3 && x.2.bucket + REQUEST_BUCKETS > bucket_now)
                    .count() as u64;
                prop_assert_eq!(l.tokens(), tok);
                prop_assert_eq!(l.requests(), req);
                // Nothing leaves before Azure frees it.
                for x in live.iter().filter(|x| x.3) {
                    if now < x.0 + TOKEN_WINDOW_MS {
                        prop_assert!(x.2.bucket + TOKEN_BUCKETS > bucket_now);
                    }
                }
            }
            l.advance(now + TOKEN_WINDOW_MS + BUCKET_MS);
            prop_assert_eq!((l.tokens(), l.requests()), (0, 0));
        }

        /// Whatever the observations, the prediction never exceeds the
        /// limit and returns to the full limit once the window is quiet.
        #[test]
        fn predicted_room_stays_below_the_limit_and_recovers(
            steps in prop::collection::vec((0u64..5_000, 0u64..3_000, 0u64..12_000, any::<bool>()), 1..100),
        ) {
            let mut s = LaneState::default();
            let mut now = 0;
            for (gap, est, rem, throttled) in steps {
                now += gap;
                let sent = s.send(now, est);
                let r = Reading {
                    remaining_tokens: Some(rem),
                    throttled: throttled.then_some(Throttle { tokens: true, requests: false, retry_after_ms: 5_000 }),
                    ..Reading::default()
                };
                s.observe(now, &sent, &r, &TPM);
                let p = s.predict(now, &TPM);
                prop_assert!(p.remaining_tokens.unwrap() <= 10_000);
            }
            let p = s.predict(now + TOKEN_WINDOW_MS + BUCKET_MS, &TPM);
            prop_assert_eq!(p.remaining_tokens, Some(10_000));
            prop_assert_eq!(p.own_tokens, 0);
        }
    }
}
