//! Client `rpm` and `tpm` across replicas: leases from a shared window.
//!
//! Redis keeps, per client and dimension, the amounts *granted* to
//! replicas over the last [`SPAN_MS`] in one hash (one field per second of
//! Redis time, `TIME`, never a replica's clock). One script
//! ([`TAKE_SCRIPT`]) drops expired seconds, sums the rest and grants
//! `min(want, limit - used)`; a client's keys share one hash tag, so it
//! runs on one slot of a clustered cache.
//!
//! **Lease mode** (default). Each replica holds a small lease per client
//! and dimension ([`lease_size`]: `limit / (8 × replicas)`, at least 1) and
//! admits from it with atomics; a background task tops leases up. A lease
//! is usable for [`LEASE_TTL_MS`] after it was granted; what is left then
//! is re-dated to the current second in Redis (so it keeps counting) and
//! topped up again. Why the total never exceeds the limit: a request
//! admitted at time `u` used tokens granted at `g` with `u - g <
//! LEASE_TTL_MS`, and Redis counts every grant for `SPAN_MS = 60 s +
//! LEASE_TTL_MS + 1 s` (the last second for rounding to whole seconds), so
//! everything admitted within any 60 s was granted within one `SPAN_MS`,
//! whose grants never exceed the limit. The price, stated: at full demand
//! the replicas together admit at least `limit × 60 / 63` minus what they
//! hold unused, at most one lease each (`limit / 8` together), per 60 s.
//! A request larger than what the lease holds (a big `tpm` estimate) is
//! refused with a short `retry-after-ms`, and the next top-up asks for
//! that much.
//!
//! `tpm` counts the admission estimate (prompt + the most it may
//! generate, as Azure does at admission); the replica's own window is
//! still reconciled with the real usage, the shared one is not: that only
//! ever under-counts use, never over-admits.
//!
//! **Strict mode.** One script call per limited request, all-or-nothing
//! over `rpm` and `tpm`, bounded by `op_timeout_ms`: exact across replicas,
//! at the cost of one round trip per request.
//!
//! **Redis down.** With leases: each replica admits from a local bucket of
//! `limit / replicas` per 60 s, `replicas` being the count last seen in
//! Redis (every replica heartbeats into a sorted set), so the total stays
//! near the limit. Strict mode falls back the same way. Before Redis has
//! ever answered, only the replica's own windows apply.
//!
//! **Token quotas** (`token_quota`, per UTC day or month) use leases too,
//! whatever `quota_mode` says (a quota is spent over a day or a month: a
//! round trip per request would buy nothing). Redis keeps one hash per
//! client (`{tag}:quota`: the period id and the tokens granted in it);
//! [`QUOTA_SCRIPT`] works out the period from Redis time, so the period
//! rolls over at 00:00 UTC of Redis' clock for every replica at once, and
//! grants `min(want, tokens - used)`. A replica admits a request while its
//! lease ([`quota_lease_size`]: `tokens / (64 × replicas)`, at least 1) is
//! above zero and charges the request's estimate; the account phase gives
//! back what the response did not use ([`QuotaLease::settle`]). A lease may
//! so go below zero by at most one request (an *overdraft*, admitted only
//! while the lease was positive); the next top-up reports it to Redis
//! before asking for more. The bound, stated: together the replicas use at
//! most `tokens` plus one request's estimate per replica (plus whatever
//! responses used beyond their estimate), and once every replica has seen
//! traffic past the quota, no more than that is left unused. A request
//! that finds the lease empty while Redis still has tokens waits for one
//! top-up (at most `op_timeout_ms`), then is admitted or refused with a
//! short `retry-after-ms` (429); once Redis says the period is used up, it
//! is refused like the local quota (403 `QuotaExceeded`, renewing at the
//! next period of Redis time).
//!
//! While degraded, a replica keeps charging its lease and may go below
//! zero by its share (`1 / replicas`) of what Redis last said was left;
//! on recovery the whole overdraft is reported. A clean shutdown returns
//! what is left of every lease ([`release`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::{QuotaMode, RedisConfig, Shared};
use crate::clients::Client;
use crate::config::{QuotaPeriod, TokenQuota};
use crate::state::GatewayState;

/// How often leases are checked and topped up.
pub const TOP_UP_INTERVAL: Duration = Duration::from_millis(200);
/// How long a lease may be drawn on after it was granted.
pub const LEASE_TTL_MS: u64 = 2_000;
/// How long Redis counts a grant: the 60 s window, the lease's life and a
/// second for rounding grants to whole seconds.
pub const SPAN_MS: u64 = 60_000 + LEASE_TTL_MS + 1_000;
/// A lease is renewed when it has less than this left to live.
const RENEW_AHEAD_MS: u64 = 3 * 200;
/// The 60 s window of `rpm` and `tpm`.
const WINDOW_MS: u64 = 60_000;

/// KEYS: one hash per dimension. ARGV: span, all-or-nothing (1/0), then per
/// key: limit, want, amount to re-date, the second it was granted in.
/// Returns `{second, wait_ms, grant_1, .., grant_n}`; `wait_ms` is how long
/// until the largest shortfall would fit (0 when everything was granted).
/// All-or-nothing with a shortfall grants nothing, but still returns what
/// each key could have granted, so the caller sees which one was short.
pub const TAKE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = math.floor(now / 1000)
local span = tonumber(ARGV[1])
local all = ARGV[2] == '1'
local grants = {}
local wait = 0
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 4
  local limit = tonumber(ARGV[base + 1])
  local want = tonumber(ARGV[base + 2])
  local move = tonumber(ARGV[base + 3])
  local from = ARGV[base + 4]
  if move > 0 and from ~= tostring(sec) then
    local had = tonumber(redis.call('HGET', KEYS[i], from) or '0')
    local moved = math.min(had, move)
    if moved > 0 then
      if had - moved > 0 then
        redis.call('HSET', KEYS[i], from, had - moved)
      else
        redis.call('HDEL', KEYS[i], from)
      end
      redis.call('HINCRBY', KEYS[i], sec, moved)
    end
  end
  local h = redis.call('HGETALL', KEYS[i])
  local used = 0
  local live = {}
  for j = 1, #h, 2 do
    local s = tonumber(h[j])
    local a = tonumber(h[j + 1])
    if (s + 1) * 1000 + span <= now then
      redis.call('HDEL', KEYS[i], h[j])
    else
      used = used + a
      live[#live + 1] = {s, a}
    end
  end
  local g = math.min(want, math.max(0, limit - used))
  if g < want then
    table.sort(live, function(x, y) return x[1] < y[1] end)
    local need = used + want - limit
    local freed = 0
    local w = span
    for _, p in ipairs(live) do
      freed = freed + p[2]
      if freed >= need then
        w = (p[1] + 1) * 1000 + span - now
        break
      end
    end
    if w > wait then wait = w end
  end
  grants[i] = g
end
local commit = not (all and wait > 0)
local out = {sec, wait}
for i = 1, #KEYS do
  if commit and grants[i] > 0 then redis.call('HINCRBY', KEYS[i], sec, grants[i]) end
  redis.call('PEXPIRE', KEYS[i], span + 2000)
  out[#out + 1] = grants[i]
end
return out
";

/// Registers this replica until `ARGV[2]` ms from now (Redis time) and
/// returns how many replicas are registered.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
";

/// KEYS[1]: a client's quota hash (fields `p`: the period id, `used`: the
/// tokens granted or reported in it). ARGV: `day` or `month`, the quota,
/// tokens wanted, a signed amount to add to `used` first (an overdraft to
/// report, or a lease given back), and the period that amount belongs to
/// (`0`: the current one). The period comes from Redis time, numbered as
/// [`crate::limits`] does (days since 1970, or `year × 12 + month`).
/// Returns `{period, granted, used, renews_at_unix_ms}`.
pub const QUOTA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local period = day
local renews = (day + 1) * 86400000
if ARGV[1] == 'month' then
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  period = y * 12 + m
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  if nm <= 2 then ny = ny - 1 end
  local era2 = math.floor(ny / 400)
  local yoe2 = ny - era2 * 400
  local mp2 = nm > 2 and nm - 3 or nm + 9
  local doy2 = math.floor((153 * mp2 + 2) / 5)
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + doy2
  renews = (era2 * 146097 + doe2 - 719468) * 86400000
end
local limit = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local charge = tonumber(ARGV[4])
local used = 0
if tonumber(redis.call('HGET', KEYS[1], 'p') or '-1') == period then
  used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
end
if charge ~= 0 and (ARGV[5] == '0' or tonumber(ARGV[5]) == period) then
  used = math.max(0, used + charge)
end
local g = math.min(want, math.max(0, limit - used))
used = used + g
redis.call('HSET', KEYS[1], 'p', string.format('%d', period), 'used', string.format('%d', used))
redis.call('PEXPIRE', KEYS[1], renews - now + 86400000)
return {period, g, used, renews}
";

/// KEYS[1]: a `rpm` or `tpm` hash; gives back up to ARGV[2] of what was
/// granted in second ARGV[1] (an unused lease at shutdown). Returns what
/// was given back.
const RELEASE_SCRIPT: &str = r"
local had = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local back = math.min(had, tonumber(ARGV[2]))
if back > 0 then
  if had - back > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], had - back)
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
return back
";

/// The token-quota lease for `tokens` shared by `replicas`: a 64th of each
/// replica's share, at least 1. Small, because what a replica holds at
/// the end of a period is lost; a request larger than the lease is still
/// admitted (an overdraft), so the size only sets how often it is topped
/// up.
pub fn quota_lease_size(tokens: u64, replicas: u64) -> u64 {
    (tokens / (64 * replicas.max(1))).max(1)
}

/// One client's lease of its `token_quota`.
#[derive(Debug)]
pub struct QuotaLease {
    quota: TokenQuota,
    /// Tokens this replica may still charge; below zero is an overdraft
    /// not reported to Redis yet.
    balance: AtomicI64,
    /// The period (Redis' numbering) the balance belongs to; 0 = Redis
    /// has not answered yet.
    period: AtomicU64,
    /// When that period ends, Unix ms (Redis time).
    renews_at: AtomicU64,
    /// Tokens granted or reported in the period at the last top-up.
    last_used: AtomicU64,
    /// Redis said the period is used up.
    exhausted: AtomicBool,
    /// Woken after each top-up, for requests that found the lease empty.
    topped: Notify,
}

impl QuotaLease {
    fn new(quota: TokenQuota) -> Self {
        Self {
            quota,
            balance: AtomicI64::new(0),
            period: AtomicU64::new(0),
            renews_at: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            topped: Notify::new(),
        }
    }

    fn kind(&self) -> &'static str {
        match self.quota.period {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }

    /// Charges `n` tokens if this replica may admit them: while Redis
    /// answers, when the lease is above zero (before Redis ever answered:
    /// always, the replica's own quota decides); while degraded, also
    /// below zero down to `1 / replicas` of what Redis last said was left.
    fn take(&self, n: u64, up: bool, replicas: u64, unix_ms: u64) -> Result<(), SharedRefusal> {
        let period = self.period.load(Ordering::Acquire);
        let floor = if period == 0 {
            i64::MIN
        } else if up {
            0
        } else {
            if crate::limits::period_id(self.quota.period, unix_ms) != period {
                // A new period began on this replica's clock while Redis
                // was away: nothing of the old one carries over.
                self.period.store(
                    crate::limits::period_id(self.quota.period, unix_ms),
                    Ordering::Release,
                );
                self.balance.store(0, Ordering::Release);
                self.last_used.store(0, Ordering::Release);
                self.exhausted.store(false, Ordering::Release);
                self.renews_at.store(
                    crate::limits::next_period_start(self.quota.period, unix_ms),
                    Ordering::Release,
                );
            }
            let left = self
                .quota
                .tokens
                .saturating_sub(self.last_used.load(Ordering::Acquire));
            -i64::try_from(left / replicas.max(1)).unwrap_or(i64::MAX)
        };
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let mut cur = self.balance.load(Ordering::Acquire);
        loop {
            if cur <= floor {
                return Err(if self.exhausted.load(Ordering::Acquire) || !up {
                    SharedRefusal::Quota {
                        tokens: self.quota.tokens,
                        renews_at_unix_ms: self.renews_at.load(Ordering::Acquire),
                    }
                } else {
                    SharedRefusal::QuotaLeaseShort {
                        tokens: self.quota.tokens,
                        retry_after_ms: retry_ms(),
                    }
                });
            }
            match self.balance.compare_exchange_weak(
                cur,
                cur.saturating_sub(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Replaces the charged `estimate` with the `tokens` the response
    /// really used.
    pub fn settle(&self, estimate: u64, tokens: u64) {
        let diff = i128::from(estimate) - i128::from(tokens);
        self.balance.fetch_add(
            i64::try_from(diff).unwrap_or(if diff > 0 { i64::MAX } else { i64::MIN }),
            Ordering::AcqRel,
        );
    }

    fn give_back(&self, n: u64) {
        self.balance
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    /// Whether a request that found the lease empty should wait for a
    /// top-up: Redis answers and has not said the period is used up.
    fn worth_waiting(&self) -> bool {
        self.period.load(Ordering::Acquire) != 0
            && self.balance.load(Ordering::Acquire) <= 0
            && !self.exhausted.load(Ordering::Acquire)
    }
}

/// The lease for `limit` shared by `replicas`: an eighth of each replica's
/// share, at least 1.
pub fn lease_size(limit: u64, replicas: u64) -> u64 {
    (limit / (8 * replicas.max(1))).clamp(1, limit.max(1))
}

/// One client's lease in one dimension.
#[derive(Debug, Default)]
pub struct Pool {
    limit: AtomicU64,
    /// Tokens (or requests) this replica may still admit; negative never
    /// (takes are compare-and-swap).
    balance: AtomicI64,
    /// The Redis second the current lease is dated in.
    second: AtomicU64,
    /// Gateway clock ms until which the lease may be drawn on; 0 = none.
    until: AtomicU64,
    /// The largest amount a request found missing since the last top-up.
    want: AtomicU64,
    /// Degraded mode: the fraction of a token accrued but not yet added.
    accrued: Mutex<f64>,
}

impl Pool {
    fn new(limit: u64) -> Self {
        let p = Self::default();
        p.limit.store(limit, Ordering::Relaxed);
        p
    }

    /// Takes `n` if the lease is valid at `now` and holds that much.
    fn take(&self, n: u64, now: u64) -> bool {
        if n == 0 {
            return true;
        }
        if self.until.load(Ordering::Acquire) <= now {
            self.want.fetch_max(n, Ordering::Relaxed);
            return false;
        }
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let mut cur = self.balance.load(Ordering::Acquire);
        loop {
            if cur < n {
                self.want
                    .fetch_max(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
                return false;
            }
            match self.balance.compare_exchange_weak(
                cur,
                cur - n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    fn give_back(&self, n: u64) {
        self.balance
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    fn balance(&self) -> u64 {
        u64::try_from(self.balance.load(Ordering::Acquire)).unwrap_or(0)
    }
}

/// One client's leases.
#[derive(Debug)]
pub struct ClientPools {
    /// `{<prefix>q:<first 16 hex of SHA-256 of the name>}`: the hash tag
    /// of its keys. The name itself may hold any character.
    tag: String,
    rpm: Option<Pool>,
    tpm: Option<Pool>,
    quota: Option<Arc<QuotaLease>>,
}

/// What admission took from the leases; given back if the request is then
/// refused by the replica's own windows.
#[derive(Debug, Default)]
pub struct Taken {
    pools: Option<Arc<ClientPools>>,
    requests: u64,
    tokens: u64,
    quota_tokens: u64,
}

impl Taken {
    /// Returns what was taken to the leases.
    pub fn give_back(self) {
        if let Some(p) = &self.pools {
            if let Some(rpm) = &p.rpm {
                rpm.give_back(self.requests);
            }
            if let Some(tpm) = &p.tpm {
                tpm.give_back(self.tokens);
            }
            if let Some(q) = &p.quota {
                q.give_back(self.quota_tokens);
            }
        }
    }

    /// The quota lease charged, for settling with the real usage.
    pub fn quota_lease(&self) -> Option<Arc<QuotaLease>> {
        self.pools
            .as_ref()
            .and_then(|p| p.quota.clone())
            .filter(|_| self.quota_tokens > 0)
    }
}

/// Why the shared limits refuse a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedRefusal {
    /// Requests per minute; retry after this many ms.
    Rpm { limit: u64, retry_after_ms: u64 },
    /// Tokens per minute; retry after this many ms.
    Tpm { limit: u64, retry_after_ms: u64 },
    /// The token quota of the period is used up across replicas.
    Quota { tokens: u64, renews_at_unix_ms: u64 },
    /// The quota lease is empty and its top-up did not come in time.
    QuotaLeaseShort { tokens: u64, retry_after_ms: u64 },
}

/// The replica's leases, by client name.
pub struct Quotas {
    mode: QuotaMode,
    enabled: bool,
    prefix: String,
    pools: ArcSwap<HashMap<Arc<str>, Arc<ClientPools>>>,
    /// Replicas registered in Redis at the last heartbeat (1 before any).
    replicas: AtomicU64,
    /// Woken when a request found a lease short.
    pub wanted: Notify,
    /// Redis has answered at least once: until then only the replica's
    /// own windows apply.
    ever_up: std::sync::atomic::AtomicBool,
}

impl Quotas {
    pub(crate) fn new(cfg: &RedisConfig) -> Self {
        Self {
            mode: cfg.quota_mode,
            enabled: cfg.share_quotas,
            prefix: cfg.key_prefix.clone(),
            pools: ArcSwap::from_pointee(HashMap::new()),
            replicas: AtomicU64::new(1),
            wanted: Notify::new(),
            ever_up: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether admission goes through [`Quotas::take`] (lease mode).
    pub fn leases(&self) -> bool {
        self.enabled && self.mode == QuotaMode::Lease
    }

    /// Whether admission goes through [`strict_take`] (strict mode).
    pub fn strict(&self) -> bool {
        self.enabled && self.mode == QuotaMode::Strict
    }

    /// Replicas last seen in Redis.
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    fn tag(&self, name: &str) -> String {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(name.as_bytes());
        let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("{{{}q:{hex}}}", self.prefix)
    }

    /// Takes one request and `tokens` from `client`'s leases at `now`
    /// (gateway clock): from the `rpm`/`tpm` leases when `rates` (lease
    /// mode, or strict mode while Redis is away), and from the token-quota
    /// lease always. `up` says whether Redis answers; `unix_ms` is the
    /// replica's wall clock, used only while degraded. A client with no
    /// limits, or unknown to the leases yet (Redis never answered), passes
    /// untouched. Never waits.
    ///
    /// # Errors
    /// The dimension whose lease is short; nothing is taken then.
    pub fn take(
        &self,
        client: &Client,
        tokens: u64,
        now: u64,
        unix_ms: u64,
        rates: bool,
        up: bool,
    ) -> Result<Taken, SharedRefusal> {
        if !self.enabled {
            return Ok(Taken::default());
        }
        let Some(pools) = self.pools.load().get(&client.name).cloned() else {
            return Ok(Taken::default());
        };
        // Before Redis ever answered, only the replica's own windows apply.
        let (rpm, tpm) = if rates && self.ever_up.load(Ordering::Acquire) {
            (pools.rpm.as_ref(), pools.tpm.as_ref())
        } else {
            (None, None)
        };
        let requests = u64::from(rpm.is_some());
        if let Some(rpm) = rpm
            && !rpm.take(1, now)
        {
            self.wanted.notify_one();
            return Err(SharedRefusal::Rpm {
                limit: rpm.limit.load(Ordering::Relaxed),
                retry_after_ms: retry_ms(),
            });
        }
        let rate_tokens = if tpm.is_some() { tokens } else { 0 };
        if let Some(tpm) = tpm
            && !tpm.take(rate_tokens, now)
        {
            if let Some(rpm) = rpm {
                rpm.give_back(1);
            }
            self.wanted.notify_one();
            return Err(SharedRefusal::Tpm {
                limit: tpm.limit.load(Ordering::Relaxed),
                retry_after_ms: retry_ms(),
            });
        }
        let mut quota_tokens = 0;
        if let Some(q) = &pools.quota {
            if let Err(e) = q.take(tokens, up, self.replicas(), unix_ms) {
                if let Some(rpm) = rpm {
                    rpm.give_back(1);
                }
                if let Some(tpm) = tpm {
                    tpm.give_back(rate_tokens);
                }
                self.wanted.notify_one();
                return Err(e);
            }
            quota_tokens = tokens;
        }
        Ok(Taken {
            pools: Some(pools),
            requests,
            tokens: rate_tokens,
            quota_tokens,
        })
    }

    /// Waits (at most `limit`) for a top-up of `client`'s quota lease when
    /// it is empty while Redis still has tokens: the rare request that
    /// finds it so pays one background round trip rather than a refusal.
    /// Returns at once otherwise.
    pub async fn wait_for_quota(&self, client: &Client, limit: Duration) {
        if !self.enabled {
            return;
        }
        let Some(q) = self
            .pools
            .load()
            .get(&client.name)
            .and_then(|p| p.quota.clone())
        else {
            return;
        };
        if !q.worth_waiting() {
            return;
        }
        let topped = q.topped.notified();
        tokio::pin!(topped);
        topped.as_mut().enable();
        self.wanted.notify_one();
        let _ = tokio::time::timeout(limit, topped).await;
    }

    /// Forgets every `rpm`/`tpm` lease: after an outage the shared window
    /// moved on. Quota leases stay: their overdraft is reported at the
    /// next top-up, and a lease of a period that ended is dropped then.
    pub fn reset_leases(&self) {
        for p in self.pools.load().values() {
            for pool in [&p.rpm, &p.tpm].into_iter().flatten() {
                pool.until.store(0, Ordering::Release);
                pool.balance.store(0, Ordering::Release);
                pool.second.store(0, Ordering::Release);
            }
        }
        self.wanted.notify_one();
    }

    /// Makes the pool table match the clients of `gw` (new clients, new
    /// limits), keeping the leases of clients whose limits stay.
    fn sync_clients(&self, gw: &GatewayState) {
        let current = self.pools.load();
        let mut changed = false;
        let mut next = HashMap::new();
        for c in gw.clients.all() {
            let (rpm, tpm, quota) = (c.limits.rpm, c.limits.tpm, c.limits.token_quota);
            if rpm.is_none() && tpm.is_none() && quota.is_none() {
                continue;
            }
            let keep = current.get(&c.name).filter(|p| {
                p.rpm.as_ref().map(|x| x.limit.load(Ordering::Relaxed)) == rpm
                    && p.tpm.as_ref().map(|x| x.limit.load(Ordering::Relaxed)) == tpm
                    && p.quota.as_ref().map(|x| x.quota) == quota
            });
            let pools = match keep {
                Some(p) => Arc::clone(p),
                None => {
                    changed = true;
                    Arc::new(ClientPools {
                        tag: self.tag(&c.name),
                        rpm: rpm.map(Pool::new),
                        tpm: tpm.map(Pool::new),
                        quota: quota.map(|q| Arc::new(QuotaLease::new(q))),
                    })
                }
            };
            next.insert(Arc::clone(&c.name), pools);
        }
        if changed || next.len() != current.len() {
            self.pools.store(Arc::new(next));
        }
    }

    /// Degraded: refills every pool locally at `limit / replicas` per 60 s,
    /// up to that much, and keeps the leases valid.
    fn refill_locally(&self, now: u64, elapsed_ms: u64) {
        let replicas = self.replicas();
        for p in self.pools.load().values() {
            for pool in [&p.rpm, &p.tpm].into_iter().flatten() {
                let cap = pool.limit.load(Ordering::Relaxed).div_ceil(replicas);
                let mut acc = pool.accrued.lock().unwrap_or_else(PoisonError::into_inner);
                #[allow(clippy::cast_precision_loss)]
                let add = *acc + cap as f64 * elapsed_ms as f64 / WINDOW_MS as f64;
                let whole = add.floor();
                *acc = add - whole;
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let whole = whole as u64;
                let bal = pool.balance();
                let next = bal.saturating_add(whole).min(cap).max(bal.min(cap));
                pool.balance
                    .store(i64::try_from(next).unwrap_or(i64::MAX), Ordering::Release);
                pool.until
                    .store(now.saturating_add(LEASE_TTL_MS), Ordering::Release);
            }
        }
    }

    /// The leases for `/admin/redis`.
    pub fn status_json(&self) -> serde_json::Value {
        let pools = self.pools.load();
        let mut clients = serde_json::Map::new();
        for (name, p) in pools.iter() {
            let dim = |pool: &Option<Pool>| {
                pool.as_ref().map(|x| {
                    serde_json::json!({
                        "limit": x.limit.load(Ordering::Relaxed),
                        "lease_left": x.balance(),
                    })
                })
            };
            let quota = p.quota.as_ref().map(|q| {
                serde_json::json!({
                    "tokens": q.quota.tokens,
                    "period": q.kind(),
                    "lease_left": q.balance.load(Ordering::Relaxed),
                    "used_in_redis": q.last_used.load(Ordering::Relaxed),
                    "used_up": q.exhausted.load(Ordering::Relaxed),
                })
            });
            clients.insert(
                name.to_string(),
                serde_json::json!({"rpm": dim(&p.rpm), "tpm": dim(&p.tpm), "token_quota": quota}),
            );
        }
        serde_json::json!({
            "shared": self.enabled,
            "mode": match self.mode { QuotaMode::Lease => "lease", QuotaMode::Strict => "strict" },
            "replicas_seen": self.replicas(),
            "clients": clients,
        })
    }
}

/// What a client refused for a short lease is told: the next top-up.
fn retry_ms() -> u64 {
    u64::try_from(TOP_UP_INTERVAL.as_millis()).unwrap_or(200)
}

fn int(v: &redis::Value) -> i64 {
    match v {
        redis::Value::Int(i) => *i,
        _ => 0,
    }
}

/// One pass of the lease task: heartbeat, then top up every lease that is
/// expired, below half its size, or short for a waiting request. Degraded:
/// local refill.
pub(crate) async fn top_up(shared: &Shared, gw: &GatewayState, elapsed_ms: u64, beat: bool) {
    let q = &shared.quotas;
    q.sync_clients(gw);
    let now = gw.clock.now_ms();
    if !shared.is_up() {
        if q.leases() || q.strict() {
            q.refill_locally(now, elapsed_ms);
        }
        return;
    }
    let Ok(conn) = shared.connection() else {
        return;
    };
    if beat {
        let key = format!("{{{}cd}}replicas", shared.config().key_prefix);
        let ttl = u64::try_from(shared.config().sync_interval.as_millis())
            .unwrap_or(1_000)
            .saturating_mul(3);
        let script = redis::Script::new(HEARTBEAT_SCRIPT);
        let mut inv = script.prepare_invoke();
        inv.key(key).arg(&shared.replica).arg(ttl);
        let mut c = conn.clone();
        if let Ok(n) = shared
            .timed("heartbeat", shared.config().op_timeout, async move {
                inv.invoke_async::<u64>(&mut c).await
            })
            .await
        {
            q.replicas.store(n.max(1), Ordering::Relaxed);
        }
    }
    top_up_quotas(shared, gw, beat).await;
    if !q.leases() {
        return;
    }
    let replicas = q.replicas();
    let script = redis::Script::new(TAKE_SCRIPT);
    for p in q.pools.load().values() {
        for (pool, dim) in [(&p.rpm, "rpm"), (&p.tpm, "tpm")] {
            let Some(pool) = pool else { continue };
            let limit = pool.limit.load(Ordering::Relaxed);
            let size = lease_size(limit, replicas);
            let want_more = pool.want.swap(0, Ordering::AcqRel);
            let until = pool.until.load(Ordering::Acquire);
            let valid = until > now;
            // Renewed before it runs out, so that admission never finds
            // a lease that has just expired.
            let fresh = until > now.saturating_add(RENEW_AHEAD_MS);
            let bal = if valid { pool.balance() } else { 0 };
            if fresh && bal * 2 >= size && bal >= want_more {
                continue;
            }
            // Re-date what is left so it may be used for another lease
            // life, and ask for the rest of a lease (or what a request
            // found missing).
            let left = pool.balance();
            let target = size.max(want_more).min(limit);
            let want = target.saturating_sub(left);
            let mut inv = script.prepare_invoke();
            inv.key(format!("{}:{dim}", p.tag))
                .arg(SPAN_MS)
                .arg(0)
                .arg(limit)
                .arg(want)
                .arg(left)
                .arg(pool.second.load(Ordering::Acquire));
            let mut c = conn.clone();
            let reply = shared
                .timed("lease", shared.config().op_timeout, async move {
                    inv.invoke_async::<Vec<redis::Value>>(&mut c).await
                })
                .await;
            let Ok(reply) = reply else {
                // Not re-dated: the lease stays as it was and expires.
                continue;
            };
            let second =
                u64::try_from(int(reply.first().unwrap_or(&redis::Value::Nil))).unwrap_or(0);
            let granted =
                u64::try_from(int(reply.get(2).unwrap_or(&redis::Value::Nil))).unwrap_or(0);
            pool.second.store(second, Ordering::Release);
            if !valid {
                // An expired lease's rest was re-dated too: usable again.
                pool.balance
                    .store(i64::try_from(left).unwrap_or(i64::MAX), Ordering::Release);
            }
            pool.give_back(granted);
            pool.until.store(
                gw.clock.now_ms().saturating_add(LEASE_TTL_MS),
                Ordering::Release,
            );
        }
    }
    q.ever_up.store(true, Ordering::Release);
}

/// Tops up the token-quota leases that are low, reports overdrafts, and
/// re-reads the used-up ones at each beat (a new period may have begun).
async fn top_up_quotas(shared: &Shared, gw: &GatewayState, beat: bool) {
    let q = &shared.quotas;
    let Ok(conn) = shared.connection() else {
        return;
    };
    let replicas = q.replicas();
    let unix_now = gw.clock.unix_ms();
    let script = redis::Script::new(QUOTA_SCRIPT);
    for p in q.pools.load().values() {
        let Some(lease) = &p.quota else { continue };
        let size = quota_lease_size(lease.quota.tokens, replicas);
        let period = lease.period.load(Ordering::Acquire);
        let bal = lease.balance.load(Ordering::Acquire);
        let exhausted = lease.exhausted.load(Ordering::Acquire);
        let rolled = period != 0 && unix_now >= lease.renews_at.load(Ordering::Acquire);
        let low = bal.saturating_mul(2) < i64::try_from(size).unwrap_or(i64::MAX);
        let due = period == 0 || rolled || bal < 0 || (exhausted && beat) || (!exhausted && low);
        if !due {
            continue;
        }
        let charge = (-bal).max(0);
        let want = if exhausted && !rolled && period != 0 {
            0
        } else {
            size
        };
        let mut inv = script.prepare_invoke();
        inv.key(format!("{}:quota", p.tag))
            .arg(lease.kind())
            .arg(lease.quota.tokens)
            .arg(want)
            .arg(charge)
            .arg(period);
        let mut c = conn.clone();
        let reply = shared
            .timed("quota_lease", shared.config().op_timeout, async move {
                inv.invoke_async::<Vec<i64>>(&mut c).await
            })
            .await;
        if let Ok(r) = reply
            && let [new_period, granted, used, renews] = r[..]
        {
            let new_period = u64::try_from(new_period).unwrap_or(0);
            if new_period != period && period != 0 {
                // A new period: what was left of the old one is void.
                lease.balance.store(granted, Ordering::Release);
            } else {
                // The reported overdraft is settled; takes since the read
                // stay charged.
                lease
                    .balance
                    .fetch_add(charge.saturating_add(granted), Ordering::AcqRel);
            }
            let used = u64::try_from(used).unwrap_or(0);
            lease.last_used.store(used, Ordering::Release);
            lease
                .renews_at
                .store(u64::try_from(renews).unwrap_or(0), Ordering::Release);
            lease
                .exhausted
                .store(used >= lease.quota.tokens, Ordering::Release);
            lease.period.store(new_period, Ordering::Release);
        }
        lease.topped.notify_waiters();
    }
}

/// Gives back to Redis what is left of every lease (at shutdown, once no
/// request is in flight), and reports quota overdrafts: the other
/// replicas may use it at once rather than after the leases expire.
/// Bounded by `op_timeout_ms` altogether; the leases are empty afterwards
/// whatever the outcome. Returns the number of leases given back, or why
/// not.
///
/// # Errors
/// Redis is degraded, failed or did not answer in time.
pub async fn release(shared: &Shared) -> Result<usize, super::OpError> {
    let q = &shared.quotas;
    // One pipeline to a single server; separate commands to a cluster,
    // where the clients' keys live in different slots.
    let mut cmds = Vec::new();
    for p in q.pools.load().values() {
        for (pool, dim) in [(&p.rpm, "rpm"), (&p.tpm, "tpm")] {
            let Some(pool) = pool else { continue };
            let left = pool.balance.swap(0, Ordering::AcqRel);
            pool.until.store(0, Ordering::Release);
            let second = pool.second.load(Ordering::Acquire);
            if left > 0 && second > 0 {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(RELEASE_SCRIPT)
                    .arg(1)
                    .arg(format!("{}:{dim}", p.tag))
                    .arg(second)
                    .arg(left);
                cmds.push(cmd);
            }
        }
        if let Some(lease) = &p.quota {
            let left = lease.balance.swap(0, Ordering::AcqRel);
            let period = lease.period.load(Ordering::Acquire);
            if left != 0 && period != 0 {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(QUOTA_SCRIPT)
                    .arg(1)
                    .arg(format!("{}:quota", p.tag))
                    .arg(lease.kind())
                    .arg(lease.quota.tokens)
                    .arg(0)
                    .arg(-left)
                    .arg(period);
                cmds.push(cmd);
            }
        }
    }
    let count = cmds.len();
    if count == 0 {
        return Ok(0);
    }
    if !shared.is_up() {
        return Err(super::OpError::Redis("degraded".to_owned()));
    }
    let conn = shared.connection()?;
    shared
        .timed("release", shared.config().op_timeout, async move {
            let replies = conn.each::<redis::Value>(cmds).await?;
            match replies.into_iter().find_map(|v| v.extract_error().err()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
        .await?;
    Ok(count)
}

/// Strict mode: one all-or-nothing take of one request and `tokens` for
/// `client`, bounded by `op_timeout_ms`. `Ok(None)` when Redis could not
/// decide (degraded, slow, failing): the caller falls back to local
/// admission.
///
/// # Errors
/// The dimension that does not fit, with the wait Redis computed.
pub async fn strict_take(
    shared: &Shared,
    client: &Client,
    tokens: u64,
) -> Result<Option<()>, SharedRefusal> {
    let (rpm, tpm) = (client.limits.rpm, client.limits.tpm);
    if rpm.is_none() && tpm.is_none() {
        return Ok(Some(()));
    }
    if !shared.is_up() {
        return Ok(None);
    }
    let Ok(mut conn) = shared.connection() else {
        return Ok(None);
    };
    let q = &shared.quotas;
    let tag = q.tag(&client.name);
    let script = redis::Script::new(TAKE_SCRIPT);
    let mut inv = script.prepare_invoke();
    // Strict grants are used at once: counted for the window plus the
    // rounding second only.
    inv.arg(WINDOW_MS + 1_000).arg(1);
    let mut dims = Vec::new();
    if let Some(limit) = rpm {
        inv.key(format!("{tag}:rpm"))
            .arg(limit)
            .arg(1)
            .arg(0)
            .arg(0);
        dims.push((limit, 1, true));
    }
    if let Some(limit) = tpm {
        inv.key(format!("{tag}:tpm"))
            .arg(limit)
            .arg(tokens)
            .arg(0)
            .arg(0);
        dims.push((limit, tokens, false));
    }
    let reply = shared
        .timed("strict_take", shared.config().op_timeout, async move {
            inv.invoke_async::<Vec<redis::Value>>(&mut conn).await
        })
        .await;
    let Ok(reply) = reply else {
        return Ok(None);
    };
    let wait = u64::try_from(int(reply.get(1).unwrap_or(&redis::Value::Nil))).unwrap_or(0);
    if wait == 0 {
        return Ok(Some(()));
    }
    // The first dimension that could not grant all it was asked.
    let short = dims.iter().enumerate().find(|(i, (_, want, _))| {
        u64::try_from(int(reply.get(i + 2).unwrap_or(&redis::Value::Nil))).unwrap_or(0) < *want
    });
    let refusal = match short {
        Some((_, &(limit, _, false))) => SharedRefusal::Tpm {
            limit,
            retry_after_ms: wait,
        },
        Some((_, &(limit, _, true))) => SharedRefusal::Rpm {
            limit,
            retry_after_ms: wait,
        },
        None => SharedRefusal::Rpm {
            limit: rpm.or(tpm).unwrap_or(0),
            retry_after_ms: wait,
        },
    };
    Err(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_an_eighth_of_a_replicas_share_and_at_least_one() {
        assert_eq!(lease_size(600, 3), 25);
        assert_eq!(lease_size(20, 2), 1);
        assert_eq!(lease_size(1, 5), 1);
        assert_eq!(lease_size(100_000, 1), 12_500);
    }

    #[test]
    fn a_quota_lease_admits_while_positive_and_overdraws_by_one_request_at_most() {
        let q = QuotaLease::new(TokenQuota {
            tokens: 1_000,
            period: QuotaPeriod::Day,
        });
        // Before Redis ever answered: the replica's own quota decides.
        assert!(q.take(500, true, 2, 0).is_ok());
        assert_eq!(q.balance.load(Ordering::Relaxed), -500);
        // Redis granted: the overdraft was reported, 30 left.
        let day = 20_786;
        q.period.store(day, Ordering::Relaxed);
        q.balance.store(30, Ordering::Relaxed);
        q.last_used.store(900, Ordering::Relaxed);
        assert!(q.take(25, true, 2, 0).is_ok());
        assert!(q.take(25, true, 2, 0).is_ok(), "5 left: one overdraft");
        assert_eq!(
            q.take(1, true, 2, 0),
            Err(SharedRefusal::QuotaLeaseShort {
                tokens: 1_000,
                retry_after_ms: 200
            })
        );
        q.exhausted.store(true, Ordering::Relaxed);
        q.renews_at.store(7, Ordering::Relaxed);
        assert_eq!(
            q.take(1, true, 2, 0),
            Err(SharedRefusal::Quota {
                tokens: 1_000,
                renews_at_unix_ms: 7
            })
        );
        // What the response did not use comes back: -20 + 21.
        q.settle(25, 4);
        assert!(q.take(10, true, 2, 0).is_ok());
        // Degraded, same day: down to half of the 100 Redis said was left.
        let unix = day * 86_400_000 + 1;
        q.balance.store(0, Ordering::Relaxed);
        assert!(q.take(30, false, 2, unix).is_ok());
        assert!(q.take(30, false, 2, unix).is_ok(), "-30 > -50");
        assert!(q.take(1, false, 2, unix).is_err(), "-60: its share is used");
        // A new day on the replica's clock while degraded: a fresh start.
        assert!(q.take(1, false, 2, unix + 86_400_000).is_ok());
        assert_eq!(q.period.load(Ordering::Relaxed), day + 1);
    }

    #[test]
    fn a_pool_admits_only_from_a_valid_lease_and_records_what_was_missing() {
        let p = Pool::new(100);
        assert!(!p.take(1, 10), "no lease yet");
        p.give_back(5);
        p.until.store(1_000, Ordering::Release);
        assert!(p.take(3, 10));
        assert!(!p.take(3, 10), "2 left");
        assert_eq!(p.want.load(Ordering::Relaxed), 3);
        assert!(p.take(2, 10));
        assert!(!p.take(1, 1_000), "expired");
        assert!(p.take(0, 5_000), "nothing to take is always fine");
    }
}
