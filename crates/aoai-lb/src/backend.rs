//! Phase 3 (state): what the gateway knows about each instance right now.
//!
//! Owns the per-instance live state: in-flight requests, the 429 cooldown
//! deadline, the circuit breaker (consecutive failures, exponential open
//! period, a single half-open probe), a latency EWMA and counters. All of it
//! is atomics, so the hot path never takes a lock; races between concurrent
//! updates only ever make a decision one request stale, never inconsistent
//! in a way that loses an instance.
//!
//! Time is milliseconds since the gateway started ([`Clock`]); `0` means
//! "no deadline".

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use crate::activity::{Activity, Unavailability};
use crate::config::{BackendCredential, BreakerConfig, InstanceConfig};
use crate::credential::TokenCache;

/// Monotonic milliseconds since the gateway was built, and the wall-clock
/// time that goes with them.
///
/// The real clock reads [`Instant`] and [`SystemTime`]. A manual clock
/// ([`Clock::manual`]) stands still until [`Clock::advance`] moves it, so
/// that tests of cooldowns, windows and quota periods are exact. Clones
/// share the same time.
#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    manual: Option<Arc<ManualTime>>,
}

#[derive(Debug)]
struct ManualTime {
    /// Milliseconds since the clock was made.
    elapsed_ms: AtomicU64,
    /// Unix time in ms when the clock was made.
    unix_start_ms: u64,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            manual: None,
        }
    }

    /// A clock that starts at Unix time `unix_ms` and moves only when
    /// [`Clock::advance`] is called.
    pub fn manual(unix_ms: u64) -> Self {
        Self {
            start: Instant::now(),
            manual: Some(Arc::new(ManualTime {
                elapsed_ms: AtomicU64::new(0),
                unix_start_ms: unix_ms,
            })),
        }
    }

    /// Moves a manual clock forward by `ms` (no effect on the real one).
    pub fn advance(&self, ms: u64) {
        if let Some(m) = &self.manual {
            m.elapsed_ms.fetch_add(ms, Ordering::AcqRel);
        }
    }

    /// Milliseconds since start, plus one so that `0` stays free to mean
    /// "no deadline".
    pub fn now_ms(&self) -> u64 {
        let elapsed = match &self.manual {
            Some(m) => m.elapsed_ms.load(Ordering::Acquire),
            None => u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1),
        };
        elapsed.saturating_add(1)
    }

    /// Milliseconds since the Unix epoch (UTC), for calendar periods.
    pub fn unix_ms(&self) -> u64 {
        match &self.manual {
            Some(m) => m
                .unix_start_ms
                .saturating_add(m.elapsed_ms.load(Ordering::Acquire)),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Circuit breaker state as shown in the admin output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the open period ends.
    Open,
    /// The open period ended; one probe request decides.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

/// Per-instance metric handles, created on first use so that they bind to
/// whatever recorder is installed by then.
pub struct BackendMetrics {
    /// `aoai_lb_in_flight{instance}`.
    pub in_flight: metrics::Gauge,
    /// `aoai_lb_cooldowns_total{instance}`.
    pub cooldowns: metrics::Counter,
    /// `aoai_lb_breaker_open{instance}`.
    pub breaker_open: metrics::Gauge,
    /// `aoai_lb_upstream_attempts_total{instance, outcome}` by [`Outcome`].
    pub attempts: [metrics::Counter; Outcome::ALL.len()],
}

impl BackendMetrics {
    fn new(name: &str) -> Self {
        let instance = name.to_owned();
        Self {
            in_flight: metrics::gauge!("aoai_lb_in_flight", "instance" => instance.clone()),
            cooldowns: metrics::counter!("aoai_lb_cooldowns_total", "instance" => instance.clone()),
            breaker_open: metrics::gauge!("aoai_lb_breaker_open", "instance" => instance.clone()),
            attempts: Outcome::ALL.map(|o| {
                metrics::counter!("aoai_lb_upstream_attempts_total", "instance" => instance.clone(), "outcome" => o.as_str())
            }),
        }
    }
}

/// The result of one attempt on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 1xx–3xx, or a 4xx that is the client's business (see `ClientError`).
    Ok,
    /// A 4xx returned as is (400, 404 "Resource not found", ...).
    ClientError,
    /// 429.
    Throttled,
    /// 408, 500, 502, 503, 504.
    ServerError,
    /// No response headers within the timeout.
    Timeout,
    /// Connect, TLS or protocol failure before response headers.
    ConnectError,
    /// 401/403 from the instance: its key is wrong.
    BackendAuthError,
    /// 404 `DeploymentNotFound`: the instance lacks the deployment.
    DeploymentNotFound,
}

impl Outcome {
    /// Every outcome, in metric-handle order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::Throttled,
        Outcome::ServerError,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::BackendAuthError,
        Outcome::DeploymentNotFound,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::Throttled => "throttled",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::BackendAuthError => "backend_auth_error",
            Outcome::DeploymentNotFound => "deployment_not_found",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether another instance should be tried after this outcome.
    pub fn retry_elsewhere(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::ClientError)
    }
}

/// One configured instance with its live state.
pub struct Backend {
    /// Position in the configuration document.
    pub index: usize,
    /// The configuration (name, URL, key, priority, weight, deployments).
    pub config: InstanceConfig,
    /// `scheme://host[:port]` followed by the URL's path prefix, no
    /// trailing slash: request paths are appended to it.
    pub base: String,
    /// The URL's scheme and authority, parsed once: each attempt's URI is
    /// put together from them and the path ([`crate::rewrite::upstream_uri`])
    /// instead of parsing the whole URI string again.
    pub scheme: http::uri::Scheme,
    /// See `scheme`.
    pub authority: http::uri::Authority,
    /// The URL's path prefix, no trailing slash (empty for none): the end
    /// of `base`.
    pub prefix: String,
    /// The `Host` header for this instance.
    pub host: HeaderValue,
    /// The `api-key` header of a key credential, marked sensitive so
    /// HTTP/2 never indexes it; `None` with an Entra ID credential.
    pub api_key: Option<HeaderValue>,
    /// The token cache of an Entra ID credential, shared with every
    /// instance configured with the same one.
    pub token: Option<Arc<TokenCache>>,
    base_open_ms: u64,
    /// Shared with the instance's successor when a reload keeps its name
    /// and URL, so cooldown, breaker, in-flight count and latency carry
    /// over.
    state: Arc<State>,
    metrics: OnceLock<BackendMetrics>,
    activity: Arc<Activity>,
    /// Rate-limit prediction per upstream deployment ([`crate::lane`]);
    /// carried over a reload like `state`.
    lanes: Arc<crate::lane::LaneTable>,
}

struct State {
    in_flight: AtomicU32,
    cooldown_until: AtomicU64,
    breaker: AtomicU8,
    failures: AtomicU32,
    open_until: AtomicU64,
    open_ms: AtomicU64,
    probing: AtomicBool,
    /// f64 bits of the latency EWMA in ms; 0 = no sample yet.
    latency_ewma: AtomicU64,
    requests: AtomicU64,
    failures_total: AtomicU64,
}

/// How long other requests keep skipping an instance whose cooldown has
/// ended while the one probe sent to it waits for response headers.
pub const COOLDOWN_PROBE_HOLD_MS: u64 = 1_000;

/// Why an instance cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Cooling down after a 429 until this [`Clock`] time.
    Cooling(u64),
    /// Breaker open (or its single probe is already out).
    BreakerOpen,
    /// An Entra ID credential without a valid token (the token endpoint
    /// failed); available again as soon as a token arrives.
    NoToken,
}

/// Weight of a new latency sample in the EWMA.
const EWMA_ALPHA: f64 = 0.2;

impl Backend {
    /// Builds the live state for one instance.
    ///
    /// # Errors
    /// The field (`url` or `api_key`) that cannot go into an HTTP header.
    pub fn new(
        index: usize,
        config: InstanceConfig,
        breaker: &BreakerConfig,
    ) -> Result<Self, &'static str> {
        let url = &config.url;
        let host_str = url.host_str().ok_or("url")?;
        let host = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_owned(),
        };
        let prefix = url.path().trim_end_matches('/');
        let base = format!("{}://{}{}", url.scheme(), host, prefix);
        let scheme = http::uri::Scheme::try_from(url.scheme()).map_err(|_| "url")?;
        let authority = http::uri::Authority::try_from(host.as_str()).map_err(|_| "url")?;
        let prefix = prefix.to_owned();
        let host = HeaderValue::from_str(&host).map_err(|_| "url")?;
        let api_key = match &config.credential {
            BackendCredential::ApiKey(k) => {
                let mut v = HeaderValue::from_str(k.expose()).map_err(|_| "api_key")?;
                v.set_sensitive(true);
                Some(v)
            }
            BackendCredential::Entra(_) => None,
        };
        Ok(Self {
            index,
            config,
            base,
            scheme,
            authority,
            prefix,
            host,
            api_key,
            token: None,
            base_open_ms: breaker.open_ms,
            state: Arc::new(State {
                in_flight: AtomicU32::new(0),
                cooldown_until: AtomicU64::new(0),
                breaker: AtomicU8::new(CLOSED),
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                open_ms: AtomicU64::new(breaker.open_ms),
                probing: AtomicBool::new(false),
                latency_ewma: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                failures_total: AtomicU64::new(0),
            }),
            metrics: OnceLock::new(),
            activity: Arc::new(Activity::new()),
            lanes: Arc::default(),
        })
    }

    /// Builds the instance at `index` of a reloaded configuration that
    /// keeps the name and URL of `previous`: the new settings (priority,
    /// weight, deployments, key) with the live state of `previous`, which
    /// requests still in flight on it keep updating. A changed breaker
    /// period applies from the next time the breaker closes.
    ///
    /// # Errors
    /// As [`Backend::new`].
    pub fn carry_over(
        index: usize,
        config: InstanceConfig,
        breaker: &BreakerConfig,
        previous: &Backend,
    ) -> Result<Self, &'static str> {
        let mut b = Self::new(index, config, breaker)?;
        b.state = Arc::clone(&previous.state);
        b.activity = Arc::clone(&previous.activity);
        b.lanes = Arc::clone(&previous.lanes);
        Ok(b)
    }

    /// Whether `config` names the same endpoint: same name and same URL.
    /// Only then does state carry over a reload; a new URL is a new
    /// instance, whatever its name.
    pub fn same_endpoint(&self, config: &InstanceConfig) -> bool {
        self.config.name == config.name && self.config.url == config.url
    }

    /// The instance name from the configuration.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Metric handles for this instance.
    pub fn metrics(&self) -> &BackendMetrics {
        self.metrics
            .get_or_init(|| BackendMetrics::new(&self.config.name))
    }

    /// The recent past, for the status page.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// This instance's lanes (one per upstream deployment used).
    pub fn lanes(&self) -> &crate::lane::LaneTable {
        &self.lanes
    }

    /// Requests currently being served (including streaming bodies).
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    /// The cooldown deadline, if it is still in the future.
    pub fn cooling_until(&self, now: u64) -> Option<u64> {
        let until = self.state.cooldown_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Breaker state at `now`.
    pub fn breaker_state(&self, now: u64) -> BreakerState {
        if self.state.breaker.load(Ordering::Acquire) == CLOSED {
            BreakerState::Closed
        } else if now >= self.state.open_until.load(Ordering::Relaxed) {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }

    /// Whether the instance could take a request at `now`, without
    /// claiming anything.
    pub fn check(&self, now: u64) -> Result<(), Unavailable> {
        if let Some(t) = &self.token
            && !t.usable()
        {
            return Err(Unavailable::NoToken);
        }
        if let Some(until) = self.cooling_until(now) {
            return Err(Unavailable::Cooling(until));
        }
        match self.breaker_state(now) {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => Err(Unavailable::BreakerOpen),
            BreakerState::HalfOpen if self.state.probing.load(Ordering::Relaxed) => {
                Err(Unavailable::BreakerOpen)
            }
            BreakerState::HalfOpen => Ok(()),
        }
    }

    /// Claims the instance for one attempt: for a half-open breaker this
    /// takes the single probe slot, and fails if another request has it.
    /// On success the in-flight count is raised; the returned guard lowers
    /// it when dropped.
    pub fn try_acquire(self: &std::sync::Arc<Self>, now: u64) -> Option<InFlight> {
        let mut probe = false;
        let mut cooldown_hold = 0;
        if self.breaker_state(now) == BreakerState::HalfOpen {
            if self
                .state
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return None;
            }
            probe = true;
        } else {
            self.check(now).ok()?;
            // A cooldown that has ended but not been confirmed: exactly one
            // request probes the instance; the others keep skipping it for
            // up to COOLDOWN_PROBE_HOLD_MS, until the probe has its answer.
            let until = self.state.cooldown_until.load(Ordering::Acquire);
            if until != 0 {
                let hold = now
                    .saturating_add(COOLDOWN_PROBE_HOLD_MS)
                    .max(until.saturating_add(1))
                    | 1;
                self.state
                    .cooldown_until
                    .compare_exchange(until, hold, Ordering::AcqRel, Ordering::Relaxed)
                    .ok()?;
                cooldown_hold = hold;
            }
        }
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        self.metrics().in_flight.increment(1.0);
        Some(InFlight {
            backend: std::sync::Arc::clone(self),
            probe,
            cooldown_hold,
        })
    }

    /// Cools the instance down until `now + ms`. A later, shorter cooldown
    /// never shortens an existing longer one.
    pub fn cool_down(&self, now: u64, ms: u64) {
        // Cooldown deadlines are even and probe holds odd, so a 429 that
        // answers a probe always replaces the hold and the probe's
        // release (a compare-and-swap on the hold) cannot undo it.
        let until = now.saturating_add(ms).max(2) & !1;
        let cell = &self.state.cooldown_until;
        let mut cur = cell.load(Ordering::Acquire);
        loop {
            let next = if cur & 1 == 1 { until } else { cur.max(until) };
            if next == cur {
                return;
            }
            match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
        self.metrics().cooldowns.increment(1);
        self.activity
            .unavailable(Unavailability::Cooling, now, until.max(now));
    }

    /// Records a success for the breaker (any response that is not a
    /// server-side failure).
    pub fn record_success(&self, probe: bool) {
        self.state.failures.store(0, Ordering::Relaxed);
        if probe || self.state.breaker.load(Ordering::Relaxed) != CLOSED {
            self.close_breaker();
        }
    }

    /// Records a 5xx, timeout or connection failure. Opens the breaker at
    /// the threshold; a failed probe reopens it for twice as long (capped).
    pub fn record_failure(&self, now: u64, probe: bool, cfg: &BreakerConfig) {
        self.state.failures_total.fetch_add(1, Ordering::Relaxed);
        if probe {
            let next = self
                .state
                .open_ms
                .load(Ordering::Relaxed)
                .saturating_mul(2)
                .min(cfg.max_open_ms);
            self.state.open_ms.store(next, Ordering::Relaxed);
            self.open_breaker(now, next);
            return;
        }
        let n = self.state.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.failure_threshold && self.state.breaker.load(Ordering::Relaxed) == CLOSED {
            let ms = self.state.open_ms.load(Ordering::Relaxed);
            self.open_breaker(now, ms);
        }
    }

    fn open_breaker(&self, now: u64, ms: u64) {
        self.state
            .open_until
            .store(now.saturating_add(ms), Ordering::Relaxed);
        self.state.breaker.store(OPEN, Ordering::Release);
        self.state.probing.store(false, Ordering::Release);
        self.metrics().breaker_open.set(1.0);
        self.activity
            .unavailable(Unavailability::BreakerOpen, now, now.saturating_add(ms));
    }

    fn close_breaker(&self) {
        self.state.breaker.store(CLOSED, Ordering::Release);
        self.state.probing.store(false, Ordering::Release);
        // The backoff starts over from the configured period.
        self.state
            .open_ms
            .store(self.base_open_ms, Ordering::Relaxed);
        self.metrics().breaker_open.set(0.0);
    }

    /// Adds a time-to-headers sample to the latency EWMA.
    pub fn record_latency(&self, ms: f64) {
        let cell = &self.state.latency_ewma;
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let old = f64::from_bits(cur);
            let new = if old == 0.0 {
                ms
            } else {
                old + EWMA_ALPHA * (ms - old)
            };
            match cell.compare_exchange_weak(
                cur,
                new.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(v) => cur = v,
            }
        }
    }

    /// The latency EWMA in ms (0 before the first sample).
    pub fn latency_ewma_ms(&self) -> f64 {
        f64::from_bits(self.state.latency_ewma.load(Ordering::Relaxed))
    }

    /// Attempts started on this instance.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Failures (5xx, timeouts, connection errors) recorded.
    pub fn failures(&self) -> u64 {
        self.state.failures_total.load(Ordering::Relaxed)
    }

    /// Counts one attempt outcome in the metrics.
    pub fn count_attempt(&self, o: Outcome) {
        self.metrics().attempts[o.index()].increment(1);
        self.activity
            .record(crate::activity::history_now_ms(), o.into());
    }
}

/// One claimed attempt slot on a backend. Dropping it lowers the in-flight
/// count (and frees the half-open probe slot if it was never resolved).
pub struct InFlight {
    backend: std::sync::Arc<Backend>,
    probe: bool,
    /// Non-zero when this attempt is the single probe after a cooldown:
    /// the `cooldown_until` value it set while it is out.
    cooldown_hold: u64,
}

impl InFlight {
    /// The backend this slot belongs to.
    pub fn backend(&self) -> &std::sync::Arc<Backend> {
        &self.backend
    }

    /// Whether this attempt is the breaker's half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Ends a post-cooldown probe that got an answer other than a 429: the
    /// instance is free again for every request. A 429 has already moved
    /// the deadline (see [`Backend::cool_down`]), so it is left alone.
    pub fn end_cooldown_probe(&mut self) {
        if self.cooldown_hold != 0 {
            // Fails, as it should, when a new 429 has extended the cooldown.
            let _ = self.backend.state.cooldown_until.compare_exchange(
                self.cooldown_hold,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            self.cooldown_hold = 0;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics().in_flight.decrement(1.0);
        // A probe that ended without an answer (client went away, timeout)
        // lets the next request probe.
        self.end_cooldown_probe();
        if self.probe {
            // A probe that ended without a verdict (client went away) must
            // not keep the breaker half-open forever.
            self.backend.state.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Arc;

    fn backend() -> Arc<Backend> {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#,
        )
        .unwrap();
        Arc::new(Backend::new(0, c.instances[0].clone(), &c.circuit_breaker).unwrap())
    }

    #[test]
    fn lets_exactly_one_request_probe_when_a_cooldown_ends() {
        let b = backend();
        b.cool_down(0, 100);
        assert!(b.try_acquire(50).is_none(), "still cooling");
        let mut probe = b.try_acquire(100).expect("the probe");
        assert!(b.try_acquire(101).is_none(), "one probe at a time");
        assert!(matches!(b.check(101), Err(Unavailable::Cooling(_))));
        probe.end_cooldown_probe();
        assert!(b.try_acquire(102).is_some(), "free once the probe answered");
        assert!(b.try_acquire(103).is_some());
    }

    #[test]
    fn a_probe_answered_with_429_keeps_the_instance_cooling() {
        let b = backend();
        b.cool_down(0, 100);
        let mut probe = b.try_acquire(100).expect("the probe");
        b.cool_down(150, 5_000);
        probe.end_cooldown_probe();
        drop(probe);
        assert!(b.try_acquire(200).is_none());
        assert_eq!(b.cooling_until(200), Some(5_150 & !1));
    }

    #[test]
    fn a_429_in_the_same_millisecond_as_the_probe_still_cools() {
        let b = backend();
        b.cool_down(0, 1_000);
        // The probe leaves at 1,000 and its 429 asks for exactly the hold.
        let probe = b.try_acquire(1_000).expect("the probe");
        b.cool_down(1_000, COOLDOWN_PROBE_HOLD_MS);
        drop(probe);
        assert!(b.try_acquire(1_001).is_none(), "still cooling");
    }

    #[test]
    fn a_probe_that_never_answers_lets_the_next_request_probe() {
        let b = backend();
        b.cool_down(0, 100);
        drop(b.try_acquire(100).expect("the probe"));
        assert!(b.try_acquire(101).is_some());
    }
}
