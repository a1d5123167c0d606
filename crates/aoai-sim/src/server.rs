//! Listening, connections and the handle tests hold: one listener per instance,
//! HTTP/1.1 with keep-alive (hyper), and a registry of open connections so an
//! instance can be killed abruptly, as a crashed Azure front end would be.
//!
//! Every connection keeps a duplicate of its socket. Through it the simulator can
//! reset a connection (SO_LINGER 0, then close) or shut it down at once from a
//! synchronous `stop()`, without waiting for the connection task to notice.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::SimClock;
use crate::config::InstanceConfig;
use crate::fault::{Fault, FaultSet};
use crate::journal::{Journal, JournalEntry};
use crate::prompt_cache::PromptCache;
use crate::ratelimit::RateLimiter;
use crate::store::Store;
use crate::usage::{Ledger, UsageReport};

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listening socket could not be created or bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Open connections of one instance.
pub(crate) struct ConnRegistry {
    open: AtomicUsize,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Weak<ConnShared>>>,
}

impl ConnRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<ConnShared>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the request handler may do to its own connection.
pub(crate) struct ConnShared {
    id: u64,
    sock: socket2::Socket,
    pub(crate) kill: CancellationToken,
    registry: Arc<ConnRegistry>,
}

impl ConnShared {
    /// Make the connection end with RST instead of FIN, then drop it.
    pub(crate) fn reset(&self) {
        let _ = self.sock.set_linger(Some(Duration::ZERO));
        self.kill.cancel();
    }

    fn shut_now(&self) {
        let _ = self.sock.set_linger(Some(Duration::ZERO));
        let _ = self.sock.shutdown(Shutdown::Both);
        self.kill.cancel();
    }
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.registry.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shared state of one running instance.
pub(crate) struct Instance {
    pub(crate) cfg: InstanceConfig,
    pub(crate) addr: SocketAddr,
    pub(crate) journal: Journal,
    pub(crate) faults: FaultSet,
    pub(crate) limiter: RateLimiter,
    /// Buckets of the provisioned (PTU) deployments.
    pub(crate) ptu: crate::ptu::PtuLimiter,
    pub(crate) ledger: Ledger,
    pub(crate) prompt_cache: PromptCache,
    pub(crate) clock: SimClock,
    pub(crate) store: Store,
    pub(crate) shutdown: CancellationToken,
    pub(crate) region_hv: http::HeaderValue,
    pub(crate) name_hv: http::HeaderValue,
    jitter: Mutex<fastrand::Rng>,
    registry: Arc<ConnRegistry>,
    listener: Mutex<Option<socket2::Socket>>,
}

impl Instance {
    /// Scale a delay by the configured seeded jitter.
    pub(crate) fn jittered(&self, d: Duration, pct: u8) -> Duration {
        if pct == 0 || d.is_zero() {
            return d;
        }
        let mut rng = self
            .jitter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        jitter(&mut rng, d, pct)
    }
}

/// `d` scaled by a factor drawn uniformly from `[1 - pct%, 1 + pct%]`.
pub(crate) fn jitter(rng: &mut fastrand::Rng, d: Duration, pct: u8) -> Duration {
    let j = f64::from(pct.min(100)) / 100.0;
    d.mul_f64((1.0 - j + 2.0 * j * rng.f64()).max(0.0))
}

/// A running instance. Cheap to clone; stopping one clone stops the instance.
#[derive(Clone)]
pub struct SimHandle {
    inst: Arc<Instance>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("name", &self.inst.cfg.name)
            .field("addr", &self.inst.addr)
            .finish()
    }
}

impl SimHandle {
    /// Base URL, e.g. `http://127.0.0.1:18000` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.inst.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.inst.addr
    }

    /// The instance's configured name.
    pub fn name(&self) -> &str {
        &self.inst.cfg.name
    }

    /// The configuration the instance was started with (faults added at run time
    /// are not included), e.g. to start it again on the same address after `stop`.
    pub fn config(&self) -> &InstanceConfig {
        &self.inst.cfg
    }

    /// Entries still held by the journal ring, oldest first.
    pub fn journal(&self) -> Vec<JournalEntry> {
        self.inst.journal.entries()
    }

    /// Forget every journal entry and reset `request_count`.
    pub fn clear_journal(&self) {
        self.inst.journal.clear();
    }

    /// Requests recorded since start or the last clear (not capped by the ring).
    pub fn request_count(&self) -> usize {
        self.inst.journal.recorded()
    }

    /// The usage ledger: per deployment, the requests and tokens this instance
    /// reported (streams: produced and sent), and its 429s. See
    /// [`crate::Usage`] for exactly what counts.
    pub fn usage(&self) -> UsageReport {
        self.inst.ledger.report(&self.inst.cfg.name)
    }

    /// Zero the usage ledger (the admission windows and the prompt cache are
    /// left as they are).
    pub fn clear_usage(&self) {
        self.inst.ledger.clear();
    }

    /// Forget every cached prompt prefix.
    pub fn clear_prompt_cache(&self) {
        self.inst.prompt_cache.clear();
    }

    /// The clock of the admission windows (the one given to
    /// [`InstanceConfig::clock`], or the instance's own system clock); advance it
    /// to move reservations out of their windows without waiting.
    pub fn clock(&self) -> SimClock {
        self.inst.clock.clone()
    }

    /// Add a fault at run time; it applies from the next request.
    pub fn inject(&self, f: Fault) {
        self.inst.faults.add(f);
    }

    /// Remove every fault, including those configured at start-up.
    pub fn clear_faults(&self) {
        self.inst.faults.clear();
    }

    /// Faults still active, with what is left of their counts.
    pub fn faults(&self) -> Vec<Fault> {
        self.inst.faults.snapshot()
    }

    /// Currently open TCP connections (an upgraded WebSocket counts as one).
    pub fn open_connections(&self) -> usize {
        self.inst.registry.open.load(Ordering::Relaxed)
    }

    /// Whether `stop` has been called.
    pub fn is_stopped(&self) -> bool {
        self.inst.shutdown.is_cancelled()
    }

    /// Stop listening and drop every open connection abruptly (RST where the
    /// kernel allows), as if the instance died. New connections are refused from
    /// the moment this returns; `open_connections` reaches 0 shortly after, once
    /// the connection tasks have unwound.
    pub fn stop(&self) {
        self.inst.shutdown.cancel();
        let listener = self
            .inst
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(l) = listener {
            // On Linux, shutting down a listening socket takes it out of LISTEN at
            // once, so connects are refused before the accept task even wakes.
            let _ = l.shutdown(Shutdown::Read);
        }
        let conns: Vec<Arc<ConnShared>> = self
            .inst
            .registry
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for c in conns {
            c.shut_now();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<(std::net::TcpListener, socket2::Socket)> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // Lets a stopped instance be started again on the same port at once.
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    let dup = sock.try_clone()?;
    Ok((sock.into(), dup))
}

/// Start one instance on `addr` (port 0 picks an ephemeral port).
///
/// Fails with [`SimError::Bind`] when the address cannot be bound. Must be called
/// inside a Tokio runtime; the instance runs until [`SimHandle::stop`].
pub async fn start_on(addr: SocketAddr, cfg: InstanceConfig) -> Result<SimHandle, SimError> {
    let (std_listener, dup) = bind(addr).map_err(|source| SimError::Bind { addr, source })?;
    let listener =
        TcpListener::from_std(std_listener).map_err(|source| SimError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let region_hv = http::HeaderValue::from_str(&cfg.region)
        .unwrap_or_else(|_| http::HeaderValue::from_static(crate::config::DEFAULT_REGION));
    let name_hv = http::HeaderValue::from_str(&cfg.name)
        .unwrap_or_else(|_| http::HeaderValue::from_static("sim"));
    let inst = Arc::new(Instance {
        journal: Journal::new(cfg.journal_capacity),
        faults: FaultSet::new(&cfg.faults),
        limiter: RateLimiter::default(),
        ptu: crate::ptu::PtuLimiter::default(),
        ledger: Ledger::default(),
        prompt_cache: PromptCache::default(),
        clock: cfg.clock.clone().unwrap_or_default(),
        store: Store::default(),
        shutdown: CancellationToken::new(),
        region_hv,
        name_hv,
        jitter: Mutex::new(fastrand::Rng::with_seed(cfg.latency.seed)),
        registry: Arc::new(ConnRegistry {
            open: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }),
        listener: Mutex::new(Some(dup)),
        addr: local,
        cfg,
    });
    tokio::spawn(accept_loop(inst.clone(), listener));
    Ok(SimHandle { inst })
}

/// Start every instance on its own ephemeral port on 127.0.0.1.
pub async fn start(instances: Vec<InstanceConfig>) -> Result<Vec<SimHandle>, SimError> {
    let mut out = Vec::with_capacity(instances.len());
    for cfg in instances {
        out.push(start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await?);
    }
    Ok(out)
}

async fn accept_loop(inst: Arc<Instance>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = inst.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _peer)) => s,
            Err(e) => {
                if inst.shutdown.is_cancelled() {
                    break;
                }
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(instance = %inst.cfg.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let dup = match socket2::SockRef::from(&stream).try_clone() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(instance = %inst.cfg.name, error = %e, "cannot track connection");
                continue;
            }
        };
        let reg = inst.registry.clone();
        let id = reg.next.fetch_add(1, Ordering::Relaxed);
        reg.open.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnShared {
            id,
            sock: dup,
            kill: inst.shutdown.child_token(),
            registry: reg.clone(),
        });
        reg.lock().insert(id, Arc::downgrade(&conn));
        tokio::spawn(serve_conn(inst.clone(), conn, stream));
    }
}

async fn serve_conn(inst: Arc<Instance>, conn: Arc<ConnShared>, stream: tokio::net::TcpStream) {
    let kill = conn.kill.clone();
    let svc_conn = conn.clone();
    let idle_timeout_ms = inst.cfg.idle_timeout_ms;
    let svc = service_fn(move |req| crate::service::handle(inst.clone(), svc_conn.clone(), req));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
    if let Some(ms) = idle_timeout_ms {
        // hyper arms its header-read timer whenever the connection waits for a
        // request head, which on a keep-alive connection is exactly idle time.
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_millis(ms));
    }
    let http = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::select! {
        _ = http => {}
        () = kill.cancelled() => {}
    }
    drop(conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_reproducible_for_a_seed_and_stays_in_its_band() {
        let d = Duration::from_millis(100);
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..100)
                .map(|_| jitter(&mut rng, d, 30))
                .collect::<Vec<_>>()
        };
        let a = run(9);
        assert_eq!(a, run(9));
        assert_ne!(a, run(10));
        assert!(
            a.iter()
                .all(|x| *x >= Duration::from_millis(70) && *x <= Duration::from_millis(130))
        );
        assert!(a.iter().any(|x| *x < Duration::from_millis(90)));
        assert!(a.iter().any(|x| *x > Duration::from_millis(110)));
    }
}
