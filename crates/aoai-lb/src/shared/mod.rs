//! State shared between replicas through Redis (the optional `redis`
//! block): 429 cooldowns, object-id affinity and client quotas.
//!
//! Owns the Redis connection, the background tasks that talk to it and the
//! health state. Nothing here runs on a request's path except
//! [`Shared::lookup_object`] (one `GET` with `redis.lookup_timeout_ms`, only
//! for an object id this replica does not know) and, in `strict` quota
//! mode, the quota script. Everything else a request does is a
//! non-blocking `try_send` onto a bounded queue ([`Shared::publish_cooldown`],
//! [`Shared::remember`], [`Shared::forget`]) or a read of local atomics:
//! the functions a request calls are synchronous, so they cannot wait on
//! Redis.
//!
//! - **Cooldowns.** A 429 is published as the *remaining* milliseconds
//!   (replica clocks differ; Redis' own key TTL carries the deadline).
//!   One script extends the key `{P cd}:<instance>` (never shortens it)
//!   and publishes on `P events`; every replica applies the message at
//!   once and polls every key's `PTTL` each `sync_interval_ms` as a
//!   backstop for lost messages. Applying uses the local
//!   [`crate::backend::Backend::cool_down`], which never shortens either.
//! - **Affinity.** Object id → instance *name* (`P aff:<id>`), written and
//!   deleted in the background.
//! - **Health.** The poll is the health check: after [`DEGRADE_AFTER`]
//!   failures in a row the replica is degraded (one warning line, metric
//!   `aoai_lb_redis_up` 0) and runs on local state only; the first success
//!   brings it back (one info line), and it re-publishes its active
//!   cooldowns. Requests never fail or wait because of Redis.
//! - **The breaker stays local**: connect and TLS failures can be specific
//!   to one replica.
//! - **One server or a cluster** (`redis.cluster`, detected by default):
//!   the same commands go through a [`conn::Conn`]; every script's keys
//!   share one hash tag, so nothing here ever spans two slots.

pub mod config;
pub mod conn;
pub mod quota;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::{Notify, mpsc};

pub use config::{ClusterMode, QuotaMode, RedisConfig};
use conn::Conn;

use crate::proxy::Gateway;
use crate::state::GatewayState;

/// 1 while this replica shares state through Redis, 0 while degraded (or
/// not connected yet).
pub const REDIS_UP: &str = "aoai_lb_redis_up";
/// Redis commands by `op` and `outcome` (`ok`, `error`, `timeout`).
pub const REDIS_OPS_TOTAL: &str = "aoai_lb_redis_ops_total";
/// Redis command latency by `op`.
pub const REDIS_OP_SECONDS: &str = "aoai_lb_redis_op_seconds";
/// Writes dropped (queue full or Redis degraded), by `kind`.
pub const REDIS_DROPPED_TOTAL: &str = "aoai_lb_redis_dropped_total";
/// Cooldowns learnt from other replicas, by `source` (`pubsub`, `poll`).
pub const SHARED_COOLDOWNS_APPLIED_TOTAL: &str = "aoai_lb_shared_cooldowns_applied_total";
/// Histogram buckets for [`REDIS_OP_SECONDS`]: 100 µs to 1 s.
pub const REDIS_OP_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Failed polls in a row before the replica is degraded to local state.
/// With the defaults that is within 3 × (1 s + 250 ms).
pub const DEGRADE_AFTER: u32 = 3;
/// Writes waiting for Redis; beyond this they are dropped and counted.
const WRITE_QUEUE: usize = 1024;
/// A shared cooldown is applied only when it is longer than the local one
/// by more than this: re-applying what is already known would only move
/// the deadline by the round trip.
const COOLDOWN_SLACK_MS: u64 = 100;

/// Extends `KEYS[1]` to `ARGV[1]` ms unless it already lives longer, then
/// publishes the remaining ms on `ARGV[2]` as `<ms> <replica> <instance>`.
/// Returns the remaining ms. Redis 6 compatible (no `PEXPIRE GT`), one key.
const COOLDOWN_SCRIPT: &str = r"
local ms = tonumber(ARGV[1])
local cur = redis.call('PTTL', KEYS[1])
if cur < ms then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ms)
  cur = ms
end
redis.call('PUBLISH', ARGV[2], cur .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return cur
";

/// How long an affinity entry lives in Redis: as long as in the local
/// table (30 days).
const AFFINITY_TTL_S: u64 = crate::affinity::DEFAULT_TTL_MS / 1000;

/// A write for the background writer.
enum Write {
    Cooldown { instance: String, ms: u64 },
    Remember { id: String, instance: String },
    Forget { id: String },
}

impl Write {
    fn kind(&self) -> &'static str {
        match self {
            Write::Cooldown { .. } => "cooldown",
            Write::Remember { .. } | Write::Forget { .. } => "affinity",
        }
    }
}

/// Why a command did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpError {
    /// No answer within the timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// Redis answered with an error, or the connection failed.
    #[error("{0}")]
    Redis(String),
    /// Not connected yet (the background tasks have not started).
    #[error("not connected")]
    NotStarted,
}

/// Health as shown by `/admin/redis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Started, no answer yet.
    Connecting,
    /// Sharing.
    Up,
    /// Local-only until Redis answers again.
    Degraded,
}

/// The connection to Redis and the replica's view of it. One per process;
/// a reload keeps it (changes to the `redis` block apply at restart).
pub struct Shared {
    cfg: RedisConfig,
    /// The configured endpoint, credentials included.
    info: redis::ConnectionInfo,
    /// `redis.ca_file`'s certificates.
    ca_pem: Option<Vec<u8>>,
    client: redis::Client,
    /// Random id of this process, so it ignores its own messages.
    replica: String,
    /// Set once: at [`Shared::start`] for `"cluster": false`, else at the
    /// first successful connect (which settles the mode).
    conn: OnceLock<Conn>,
    /// Nodes of the cluster last learnt, for the subscriber.
    nodes: Mutex<Vec<(String, u16)>>,
    up: AtomicBool,
    health: Mutex<HealthState>,
    writes: mpsc::Sender<Write>,
    queue: Mutex<Option<mpsc::Receiver<Write>>>,
    poll_now: Notify,
    cooldown_script: redis::Script,
    /// Client quotas shared through leases ([`quota`]).
    pub quotas: quota::Quotas,
    applied_pubsub: AtomicU64,
    applied_poll: AtomicU64,
    dropped: AtomicU64,
    lookups: AtomicU64,
    lookup_hits: AtomicU64,
}

struct HealthState {
    health: Health,
    since: Instant,
    last_error: Option<String>,
}

impl Shared {
    /// Builds the client from `cfg` without connecting: start-up never
    /// waits on Redis. [`Shared::start`] connects in the background.
    ///
    /// # Errors
    /// The URL cannot be turned into connection settings (validated
    /// before, so in practice never).
    pub fn new(cfg: RedisConfig) -> Result<Arc<Shared>, OpError> {
        use redis::IntoConnectionInfo as _;
        let info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| OpError::Redis(format!("redis.url: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &cfg.password {
            settings = settings.set_password(p.expose());
        }
        let info = info.set_redis_settings(settings);
        let ca_pem = cfg.ca_file.as_deref().map(read_ca_file).transpose()?;
        let client = node_client(&info, ca_pem.as_deref())
            .map_err(|e| OpError::Redis(format!("redis.url: {e}")))?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let replica = format!("{:016x}", fastrand::u64(..));
        Ok(Arc::new(Shared {
            quotas: quota::Quotas::new(&cfg),
            cfg,
            info,
            ca_pem,
            client,
            replica,
            conn: OnceLock::new(),
            nodes: Mutex::new(Vec::new()),
            up: AtomicBool::new(false),
            health: Mutex::new(HealthState {
                health: Health::Connecting,
                since: Instant::now(),
                last_error: None,
            }),
            writes: tx,
            queue: Mutex::new(Some(rx)),
            poll_now: Notify::new(),
            cooldown_script: redis::Script::new(COOLDOWN_SCRIPT),
            applied_pubsub: AtomicU64::new(0),
            applied_poll: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            lookup_hits: AtomicU64::new(0),
        }))
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Starts the background tasks (poll and health, writer, subscriber,
    /// lease top-ups) for `gateway`. Called once, inside the runtime; later
    /// calls do nothing.
    pub fn start(self: &Arc<Self>, gateway: Gateway) {
        let Some(rx) = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if self.cfg.cluster == ClusterMode::Off {
            if let Err(e) = self.connect_single() {
                tracing::warn!(error = %e, "Redis: cannot set up the connection; shared state is off");
                return;
            }
        } else {
            tokio::spawn(Arc::clone(self).connect());
        }
        metrics::gauge!(REDIS_UP).set(0.0);
        tokio::spawn(Arc::clone(self).sync_loop(gateway.clone()));
        tokio::spawn(Arc::clone(self).writer(rx));
        if self.cfg.pubsub && self.cfg.share_cooldowns {
            tokio::spawn(Arc::clone(self).subscriber(gateway.clone()));
        }
        if self.cfg.share_quotas {
            tokio::spawn(Arc::clone(self).lease_loop(gateway));
        }
    }

    /// The connection manager for one server: lazy, so nothing waits here.
    fn connect_single(&self) -> Result<(), OpError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.cfg.connect_timeout))
            .set_response_timeout(Some(self.cfg.op_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(2);
        let c = redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| OpError::Redis(e.to_string()))?;
        let _ = self.conn.set(Conn::Single(c));
        Ok(())
    }

    /// The cluster client: the configured endpoint is the seed, the rest
    /// of the nodes come from `CLUSTER SLOTS`. Each node connection has
    /// the same connect and response timeouts as a single server's; a
    /// command follows at most two redirections or retries, and the
    /// caller's timeout bounds the whole.
    fn cluster_client(&self) -> Result<redis::cluster::ClusterClient, OpError> {
        let mut b = redis::cluster::ClusterClientBuilder::new(vec![conn::db0(&self.info)])
            .connection_timeout(self.cfg.connect_timeout)
            .response_timeout(self.cfg.op_timeout)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100);
        if let Some(pem) = &self.ca_pem {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        b.build().map_err(|e| OpError::Redis(e.to_string()))
    }

    /// Settles standalone or cluster (`"cluster": "auto"` asks the
    /// endpoint) and connects, retrying until it works. Until then every
    /// command fails with [`OpError::NotStarted`], so the replica degrades
    /// and serves from local state like with any unreachable Redis.
    async fn connect(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let cluster = match self.cfg.cluster {
                ClusterMode::On => Ok(true),
                ClusterMode::Off => Ok(false),
                ClusterMode::Auto => conn::is_cluster(&self.client, self.cfg.connect_timeout).await,
            };
            let attempt = match cluster {
                Ok(false) => self.connect_single(),
                Ok(true) => match self.cluster_client() {
                    Ok(client) => {
                        // Slot map and one connection per node; bounded
                        // like one connect per node in turn.
                        let limit = self.cfg.connect_timeout.saturating_mul(2);
                        match tokio::time::timeout(limit, client.get_async_connection()).await {
                            Ok(Ok(c)) => {
                                let _ = self.conn.set(Conn::Cluster(c));
                                Ok(())
                            }
                            Ok(Err(e)) => Err(OpError::Redis(e.to_string())),
                            Err(_) => Err(OpError::Timeout(
                                u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                            )),
                        }
                    }
                    // Only a bad configuration fails here: no retry helps.
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis: cannot set up the cluster client; shared state is off");
                        return;
                    }
                },
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => {
                    tracing::debug!(
                        mode = self.conn.get().map_or("-", Conn::mode),
                        "connected to Redis"
                    );
                    self.poll_now.notify_one();
                    return;
                }
                Err(e) => {
                    self.health
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .last_error = Some(e.to_string());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// True while Redis answers (not degraded, not still connecting).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn cooldown_key(&self, instance: &str) -> String {
        // One hash tag for every instance: the poll is one slot.
        format!("{{{}cd}}:{instance}", self.cfg.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.cfg.key_prefix)
    }

    fn affinity_key(&self, id: &str) -> String {
        format!("{}aff:{id}", self.cfg.key_prefix)
    }

    fn enqueue(&self, w: Write) {
        let kind = w.kind();
        if !self.is_up() || self.writes.try_send(w).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(REDIS_DROPPED_TOTAL, "kind" => kind).increment(1);
        }
    }

    /// Tells the other replicas that `instance` cools down for `ms` more
    /// milliseconds. Never waits: the write is queued (or dropped while
    /// degraded; it is re-published on recovery).
    pub fn publish_cooldown(&self, instance: &str, ms: u64) {
        if self.cfg.share_cooldowns && ms > 0 {
            self.enqueue(Write::Cooldown {
                instance: instance.to_owned(),
                ms,
            });
        }
    }

    /// Records in the background that `instance` holds object `id`.
    pub fn remember(&self, id: &str, instance: &str) {
        if self.cfg.share_affinity {
            self.enqueue(Write::Remember {
                id: id.to_owned(),
                instance: instance.to_owned(),
            });
        }
    }

    /// Removes object `id` in the background (it was deleted).
    pub fn forget(&self, id: &str) {
        if self.cfg.share_affinity {
            self.enqueue(Write::Forget { id: id.to_owned() });
        }
    }

    /// The instance name another replica recorded for object `id`: one
    /// `GET` bounded by `redis.lookup_timeout_ms`. `None` when unknown,
    /// degraded, slow or failing: the caller falls back to asking the
    /// instances.
    pub async fn lookup_object(&self, id: &str) -> Option<String> {
        if !self.cfg.share_affinity || !self.is_up() {
            return None;
        }
        let mut conn = self.conn.get()?.clone();
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let key = self.affinity_key(id);
        let found: Option<String> = self
            .timed("lookup", self.cfg.lookup_timeout, async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await
            .ok()
            .flatten();
        if found.is_some() {
            self.lookup_hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Runs one command future with a timeout, counting it by `op` and
    /// outcome and timing it.
    pub(crate) async fn timed<T>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, OpError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, fut).await {
            Err(_) => Err(OpError::Timeout(
                u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            )),
            Ok(Err(e)) => Err(OpError::Redis(e.to_string())),
            Ok(Ok(v)) => Ok(v),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(OpError::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        metrics::counter!(REDIS_OPS_TOTAL, "op" => op, "outcome" => outcome).increment(1);
        metrics::histogram!(REDIS_OP_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
        result
    }

    pub(crate) fn connection(&self) -> Result<Conn, OpError> {
        self.conn.get().cloned().ok_or(OpError::NotStarted)
    }

    /// Applies a cooldown learnt from Redis to the instance named
    /// `instance`, unless the local one already lasts as long.
    fn apply_cooldown(&self, gw: &GatewayState, instance: &str, ms: u64, source: &'static str) {
        let Some(b) = gw.backends.iter().find(|b| b.name() == instance) else {
            return;
        };
        let now = gw.clock.now_ms();
        let local = b.cooling_until(now).map_or(0, |u| u.saturating_sub(now));
        if local.saturating_add(COOLDOWN_SLACK_MS) >= ms {
            return;
        }
        b.cool_down(now, ms.min(gw.config.cooldown.max_ms));
        match source {
            "pubsub" => self.applied_pubsub.fetch_add(1, Ordering::Relaxed),
            _ => self.applied_poll.fetch_add(1, Ordering::Relaxed),
        };
        metrics::counter!(SHARED_COOLDOWNS_APPLIED_TOTAL, "source" => source).increment(1);
        tracing::debug!(
            instance,
            remaining_ms = ms,
            source,
            "cooldown learnt from another replica"
        );
    }

    /// Polls every instance's shared cooldown (the health check too).
    async fn poll(&self, gw: &GatewayState) -> Result<(), OpError> {
        let mut conn = self.connection()?;
        if !self.cfg.share_cooldowns {
            return self
                .timed("ping", self.cfg.op_timeout, async move {
                    redis::cmd("PING").query_async::<String>(&mut conn).await
                })
                .await
                .map(|_| ());
        }
        let cmds = gw
            .backends
            .iter()
            .map(|b| {
                let mut cmd = redis::cmd("PTTL");
                cmd.arg(self.cooldown_key(b.name()));
                cmd
            })
            .collect();
        let ttls: Vec<i64> = self
            .timed("poll", self.cfg.op_timeout, async move {
                conn.each::<i64>(cmds).await
            })
            .await?;
        for (b, ttl) in gw.backends.iter().zip(ttls) {
            if let Ok(ms) = u64::try_from(ttl)
                && ms > 0
            {
                self.apply_cooldown(gw, b.name(), ms, "poll");
            }
        }
        Ok(())
    }

    fn mark_up(&self, gw: &GatewayState) {
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if h.health == Health::Up {
            return;
        }
        let was = h.health;
        let outage = h.since.elapsed();
        h.health = Health::Up;
        h.since = Instant::now();
        drop(h);
        self.up.store(true, Ordering::Release);
        metrics::gauge!(REDIS_UP).set(1.0);
        if was == Health::Degraded {
            tracing::info!(
                outage_ms = u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
                "Redis answers again: shared state is back on"
            );
        } else {
            tracing::info!(
                key_prefix = %self.cfg.key_prefix,
                "shared state through Redis is on"
            );
        }
        // What this replica learnt alone while cut off is worth telling.
        let now = gw.clock.now_ms();
        for b in &gw.backends {
            if let Some(until) = b.cooling_until(now) {
                self.publish_cooldown(b.name(), until.saturating_sub(now));
            }
        }
        self.quotas.reset_leases();
    }

    fn mark_down(&self, error: &OpError) {
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        h.last_error = Some(error.to_string());
        if h.health == Health::Degraded {
            return;
        }
        h.health = Health::Degraded;
        h.since = Instant::now();
        drop(h);
        self.up.store(false, Ordering::Release);
        metrics::gauge!(REDIS_UP).set(0.0);
        tracing::warn!(
            error = %error,
            failures = DEGRADE_AFTER,
            "Redis does not answer: this replica runs on local state (cooldowns, affinity, quotas) until it does"
        );
    }

    async fn sync_loop(self: Arc<Self>, gateway: Gateway) {
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(self.cfg.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.poll_now.notified() => {}
            }
            let gw = gateway.state();
            match self.poll(&gw).await {
                Ok(()) => {
                    failures = 0;
                    self.mark_up(&gw);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == DEGRADE_AFTER {
                        let e = self.diagnose(e).await;
                        self.mark_down(&e);
                    } else if failures > DEGRADE_AFTER {
                        self.mark_down(&e);
                    } else {
                        self.health
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .last_error = Some(e.to_string());
                    }
                }
            }
        }
    }

    /// While the connection manager retries in the background, commands
    /// only time out and the real cause (refused, TLS certificate, AUTH) is
    /// hidden: one direct connect attempt, bounded by `connect_timeout_ms`,
    /// names it for the degraded-mode warning and `/admin/redis`.
    ///
    /// A single-server connection that meets `MOVED` is talking to a
    /// cluster: the message says which setting to change.
    async fn diagnose(&self, e: OpError) -> OpError {
        if matches!(self.conn.get(), Some(Conn::Single(_)))
            && let OpError::Redis(text) = &e
            && (text.contains("Moved") || text.contains("MOVED"))
        {
            return OpError::Redis(format!(
                "{text}; the server is a Redis Cluster: set redis.cluster to \"auto\" or true"
            ));
        }
        let attempt = tokio::time::timeout(
            self.cfg.connect_timeout,
            self.client.get_multiplexed_async_connection(),
        )
        .await;
        match attempt {
            Ok(Err(cause)) => OpError::Redis(format!("{e}; connecting: {cause}")),
            _ => e,
        }
    }

    async fn writer(self: Arc<Self>, mut rx: mpsc::Receiver<Write>) {
        while let Some(w) = rx.recv().await {
            if !self.is_up() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(REDIS_DROPPED_TOTAL, "kind" => w.kind()).increment(1);
                continue;
            }
            let Ok(mut conn) = self.connection() else {
                continue;
            };
            let limit = self.cfg.op_timeout;
            // Failures are counted by `timed`; the poll decides health.
            let _ = match w {
                Write::Cooldown { instance, ms } => {
                    let mut inv = self.cooldown_script.prepare_invoke();
                    inv.key(self.cooldown_key(&instance))
                        .arg(ms)
                        .arg(self.channel())
                        .arg(&self.replica)
                        .arg(&instance);
                    self.timed("publish_cooldown", limit, async move {
                        inv.invoke_async::<i64>(&mut conn).await.map(|_| ())
                    })
                    .await
                }
                Write::Remember { id, instance } => {
                    let key = self.affinity_key(&id);
                    self.timed("affinity_set", limit, async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(instance)
                            .arg("EX")
                            .arg(AFFINITY_TTL_S)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await
                }
                Write::Forget { id } => {
                    let key = self.affinity_key(&id);
                    self.timed("affinity_del", limit, async move {
                        redis::cmd("DEL")
                            .arg(key)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await
                }
            };
        }
    }

    /// Listens on the events channel, with its own connection and its own
    /// reconnect loop; after each (re)subscription it asks for a poll, so
    /// nothing published while it was away is missed for long.
    ///
    /// In a cluster, `PUBLISH` reaches every node, so it listens on one
    /// node and moves to the next one of the slot map whenever that node
    /// stops answering.
    async fn subscriber(self: Arc<Self>, gateway: Gateway) {
        let mut backoff = Duration::from_millis(100);
        let channel = self.channel();
        let mut turn = 0usize;
        loop {
            let client = match self.conn.get() {
                // Not connected yet: standalone or cluster is not settled.
                // Checked often, so the subscription follows the first
                // connect closely.
                None => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Some(Conn::Single(_)) => Some(self.client.clone()),
                Some(c @ Conn::Cluster(_)) => {
                    turn = turn.wrapping_add(1);
                    self.node_for_pubsub(c, turn).await
                }
            };
            let connected = match client {
                None => None,
                Some(client) => {
                    tokio::time::timeout(self.cfg.connect_timeout, client.get_async_pubsub())
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            };
            if let Some(mut ps) = connected {
                let subscribed =
                    tokio::time::timeout(self.cfg.op_timeout, ps.subscribe(&channel)).await;
                if matches!(subscribed, Ok(Ok(()))) {
                    backoff = Duration::from_millis(100);
                    self.poll_now.notify_one();
                    let mut messages = ps.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if let Some((ms, replica, instance)) = parse_event(&text)
                            && replica != self.replica
                        {
                            self.apply_cooldown(&gateway.state(), instance, ms, "pubsub");
                        }
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// A client for the `turn`-th node of the cluster (the configured
    /// endpoint counts as one), refreshing the node list from `CLUSTER
    /// SLOTS` first when the cluster answers.
    async fn node_for_pubsub(&self, c: &Conn, turn: usize) -> Option<redis::Client> {
        if let Ok(Ok(found)) = tokio::time::timeout(self.cfg.op_timeout, c.nodes()).await
            && !found.is_empty()
        {
            *self.nodes.lock().unwrap_or_else(PoisonError::into_inner) = found;
        }
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let seed = match self.info.addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => Some((h.clone(), *p)),
            _ => None,
        };
        if let Some(seed) = seed
            && !nodes.contains(&seed)
        {
            nodes.push(seed);
        }
        let (host, port) = nodes.get(turn % nodes.len().max(1))?.clone();
        let info = conn::at_node(&self.info, &host, port);
        node_client(&info, self.ca_pem.as_deref()).ok()
    }

    async fn lease_loop(self: Arc<Self>, gateway: Gateway) {
        let mut tick = tokio::time::interval(quota::TOP_UP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut last_beat: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.quotas.wanted.notified() => {}
            }
            let elapsed = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
            last = Instant::now();
            let beat = last_beat.is_none_or(|b| b.elapsed() >= self.cfg.sync_interval);
            if beat && self.is_up() {
                last_beat = Some(Instant::now());
            }
            let gw = gateway.state();
            quota::top_up(&self, &gw, elapsed, beat).await;
        }
    }

    /// The `/admin/redis` document. Never contains the URL, a user name
    /// or the password.
    pub fn status_json(&self) -> serde_json::Value {
        let h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        serde_json::json!({
            "configured": true,
            "state": match h.health {
                Health::Connecting => "connecting",
                Health::Up => "up",
                Health::Degraded => "degraded",
            },
            "since_ms": u64::try_from(h.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "last_error": h.last_error,
            "replica": self.replica,
            "key_prefix": self.cfg.key_prefix,
            "tls": self.cfg.url.scheme() == "rediss",
            "cluster": match self.cfg.cluster {
                ClusterMode::Auto => serde_json::json!("auto"),
                ClusterMode::On => serde_json::json!(true),
                ClusterMode::Off => serde_json::json!(false),
            },
            // What the connection is: `standalone`, `cluster`, or `null`
            // until the first connect settled it.
            "mode": self.conn.get().map(Conn::mode),
            "pubsub": self.cfg.pubsub,
            "share": {
                "cooldowns": self.cfg.share_cooldowns,
                "affinity": self.cfg.share_affinity,
                "quotas": self.cfg.share_quotas,
            },
            "quota_mode": match self.cfg.quota_mode {
                QuotaMode::Lease => "lease",
                QuotaMode::Strict => "strict",
            },
            "cooldowns_applied": {
                "pubsub": self.applied_pubsub.load(Ordering::Relaxed),
                "poll": self.applied_poll.load(Ordering::Relaxed),
            },
            "dropped_writes": self.dropped.load(Ordering::Relaxed),
            "object_lookups": self.lookups.load(Ordering::Relaxed),
            "object_lookup_hits": self.lookup_hits.load(Ordering::Relaxed),
            "quotas": self.quotas.status_json(),
        })
    }
}

/// A client for `info`, trusting `ca_pem` instead of the web PKI roots when
/// given.
fn node_client(
    info: &redis::ConnectionInfo,
    ca_pem: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    match ca_pem {
        None => redis::Client::open(info.clone()),
        Some(pem) => redis::Client::build_with_tls(
            info.clone(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
    }
}

/// Reads `redis.ca_file`, which must hold at least one PEM certificate.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, OpError> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = std::fs::read(path).map_err(|e| {
        OpError::Redis(format!(
            "redis.ca_file: {}: cannot read ({})",
            path.display(),
            e.kind()
        ))
    })?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .filter(Result::is_ok)
        .count();
    if certs == 0 {
        return Err(OpError::Redis(format!(
            "redis.ca_file: {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(pem)
}

/// `<ms> <replica> <instance>` (the instance name may hold spaces).
fn parse_event(text: &str) -> Option<(u64, &str, &str)> {
    let mut parts = text.splitn(3, ' ');
    let ms = parts.next()?.parse().ok()?;
    let replica = parts.next()?;
    let instance = parts.next()?;
    Some((ms, replica, instance))
}

/// Describes the metrics of this module (called by
/// [`crate::metrics::install`]).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        REDIS_UP,
        Unit::Count,
        "1 while this replica shares state through Redis, 0 while it runs on local state (degraded, or not connected yet)"
    );
    describe_counter!(
        REDIS_OPS_TOTAL,
        Unit::Count,
        "Redis commands by op (poll, ping, publish_cooldown, affinity_set, affinity_del, lookup, lease, quota_lease, release, strict_take, heartbeat) and outcome (ok, error, timeout); only lookup and strict_take run on a request's path"
    );
    describe_histogram!(
        REDIS_OP_SECONDS,
        Unit::Seconds,
        "Redis command latency by op, timeouts included"
    );
    describe_counter!(
        REDIS_DROPPED_TOTAL,
        Unit::Count,
        "Writes to Redis dropped because Redis was degraded or the queue was full, by kind (cooldown, affinity)"
    );
    describe_counter!(
        SHARED_COOLDOWNS_APPLIED_TOTAL,
        Unit::Count,
        "Cooldowns learnt from other replicas, by source (pubsub, poll)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_whose_instance_names_hold_spaces() {
        assert_eq!(
            parse_event("1500 abc east us 2"),
            Some((1500, "abc", "east us 2"))
        );
        assert_eq!(parse_event("x abc east"), None);
        assert_eq!(parse_event("10 abc"), None);
    }
}
