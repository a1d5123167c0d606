//! The client-facing HTTP server: listener, connection limits, health
//! routes and graceful shutdown.
//!
//! Each accepted connection is served by the relay ([`crate::relay`], the
//! lean HTTP/1 server) or, for HTTP/2 with prior knowledge, WebSocket
//! handshakes and with `server.http1: "hyper"`, by hyper. This module owns
//! everything that is about connections rather than requests:
//! - the runtime shape: with `workers` > 1 ([`ServeOptions::workers`]) the
//!   public port is served by that many threads, each running its own
//!   single-threaded Tokio runtime and accepting on its own listener bound
//!   to the same address with `SO_REUSEPORT`. The kernel spreads new
//!   connections over the listeners, and a connection then lives on one
//!   thread from accept to close: no work stealing and no cross-thread
//!   wake-ups on the request path. The first listener is served by the
//!   runtime that called [`serve`], which also runs the admin listener,
//!   the configuration reloader and the shutdown sequence;
//! - a cap on open connections: one over the cap is closed at once, so an
//!   overload sheds new clients instead of slowing everyone;
//! - a deadline for the first request head of a connection (slowloris), a
//!   longer one for keep-alive idle time and later request heads, a header
//!   count limit and a bounded read buffer (which bounds the header size);
//! - `/health`, `/openai/health` (the seed app's routes), `/healthz`
//!   (liveness) and `/readyz` (readiness), answered before the gateway and
//!   without auth. Readiness means "this replica can answer": the
//!   configuration is loaded and the listener is up (both true before the
//!   first request is served) and it is not draining. It never depends on
//!   the backends: when every instance is cooling down, every replica is in
//!   the same state, and a 503 there would make the ingress drop all of
//!   them at once, so clients would get the ingress's error instead of the
//!   gateway's 429 with `retry-after-ms`. Backend health is in `/metrics`
//!   (`aoai_lb_instance_available`) and on the admin status page;
//! - graceful shutdown in phases: `/readyz` turns 503 (while the listener
//!   still accepts for `server.drain_delay`, so load balancers notice), the
//!   listener stops accepting, in-flight requests and streams get
//!   `server.shutdown_grace` to finish, then whatever is left is closed.
//!
//! Everything else goes to a [`Handler`], in production the
//! [`crate::proxy::Gateway`].

use crate::credential::AzureEnv;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Clock;
use crate::config::{Config, ServerConfig};
use crate::relay::{self, ClientBody, Http1Server, Outcome, Rewind};
use crate::secret::Secret;

/// Largest read buffer per connection. hyper refuses a request head that
/// does not fit (431), so this is also the cap on total header bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What the server forwards to: the gateway, or a stand-in in tests.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The response body type.
    type Body: http_body::Body<Data = Bytes, Error = Self::BodyError> + Send + 'static;
    /// The body's error type.
    type BodyError: Into<Box<dyn std::error::Error + Send + Sync>>;

    /// Answers one request that is not a health route.
    fn handle(&self, req: Request<ClientBody>)
    -> impl Future<Output = Response<Self::Body>> + Send;

    /// Brings the gauges that describe current backend state
    /// (`aoai_lb_instance_available`) up to date; called before each
    /// `/metrics` scrape. Default: nothing to refresh.
    fn refresh_gauges(&self) {}

    /// The `/admin/backends` document, as JSON bytes. Never contains a key.
    fn backends_json(&self) -> Vec<u8>;

    /// The `/admin/clients` document, as JSON bytes: each client's limits,
    /// current window use and quota left. Never contains a key or a key
    /// hash. Default: no clients.
    fn clients_json(&self) -> Vec<u8> {
        b"{\"clients\":[]}".to_vec()
    }

    /// The `/admin/redis` document: whether state is shared through Redis
    /// and how that goes. Default: `{"configured":false}`.
    fn redis_json(&self) -> Vec<u8> {
        b"{\"configured\":false}".to_vec()
    }

    /// The gateway's part of `/admin/status`: instances and, when known,
    /// per-client and per-deployment rates. Never contains a key.
    fn status(&self) -> crate::status::GatewayStatus {
        crate::status::GatewayStatus::default()
    }
}

/// Where to listen and how to authenticate clients.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address or host name of the public listener. Default `0.0.0.0`.
    pub host: String,
    /// Public port; 0 picks a free one. Default 8000.
    pub port: u16,
    /// Host of the admin listener (`/metrics`, `/admin/backends`).
    /// Default: same as `host`.
    pub admin_host: Option<String>,
    /// Admin port; 0 picks a free one. Default 8001.
    pub admin_port: u16,
    /// The key clients must present. `None` is refused unless
    /// `allow_unauthenticated` is set.
    pub client_key: Option<Secret>,
    /// Serve without client auth (explicit operator opt-out).
    pub allow_unauthenticated: bool,
    /// Where the configuration came from, as the status page shows it:
    /// `OPENAI_INSTANCES`, `file <path>`, `demo`. Default `inline`.
    pub config_source: String,
    /// The configuration file, when there is one: it is reloaded on
    /// [`ServerControl::reload`] (`SIGHUP`) and, with `config_poll`, when
    /// its content changes (see [`crate::reload`]). Default `None`: the
    /// configuration is fixed for the life of the process.
    pub config_file: Option<std::path::PathBuf>,
    /// How often the configuration file is read for changes; `None` or
    /// zero reads it only on reload requests. Default 2 s.
    pub config_poll: Option<Duration>,
    /// The gateway's clock. Default: the real one; tests pass a manual
    /// [`Clock`] to step through cooldowns and limit windows.
    pub clock: Clock,
    /// The Azure identity variables (`IDENTITY_ENDPOINT`, `AZURE_*`) that
    /// Entra ID backend credentials read. Default: the process environment.
    pub azure_env: AzureEnv,
    /// The trace exporter, when tracing is on ([`crate::otel`]). Default
    /// `None`: no spans, no `traceparent` rewriting.
    pub tracing: Option<Arc<crate::otel::Tracing>>,
    /// Threads accepting and serving public connections, each with its own
    /// single-threaded runtime and `SO_REUSEPORT` listener; the calling
    /// runtime counts as one of them. Default 1: everything runs on the
    /// calling runtime with one plain listener. The binary sets it to
    /// [`crate::cpus::usable`] unless `AOAI_LB_WORKERS` says otherwise.
    pub workers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            port: 8000,
            admin_host: None,
            admin_port: 8001,
            client_key: None,
            allow_unauthenticated: false,
            config_source: "inline".to_owned(),
            config_file: None,
            config_poll: Some(crate::reload::DEFAULT_POLL),
            clock: Clock::new(),
            azure_env: AzureEnv::from_process(),
            tracing: None,
            workers: 1,
        }
    }
}

impl ServeOptions {
    /// Both listeners on 127.0.0.1 with ephemeral ports: for tests.
    pub fn local(client_key: Option<Secret>) -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 0,
            admin_host: None,
            admin_port: 0,
            allow_unauthenticated: client_key.is_none(),
            client_key,
            config_source: "inline".to_owned(),
            config_file: None,
            config_poll: Some(crate::reload::DEFAULT_POLL),
            clock: Clock::new(),
            azure_env: AzureEnv::from_process(),
            tracing: None,
            workers: 1,
        }
    }
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No client key and no explicit opt-out.
    #[error(
        "API_KEY is not set and no clients are configured: set API_KEY=<key> (or add clients with keys to the configuration) to require clients to send a key, or pass --allow-unauthenticated (ALLOW_UNAUTHENTICATED=true) to run an open proxy"
    )]
    MissingClientKey,
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: String,
        source: std::io::Error,
    },
    /// The gateway rejected the configuration.
    #[error("cannot start the gateway: {0}")]
    Gateway(String),
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start worker thread {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
}

/// State shared by the accept loop and every connection.
struct Shared {
    cfg: ServerConfig,
    builder: auto::Builder<TokioExecutor>,
    /// Set first on shutdown: `/readyz` answers 503 from then on. Shared
    /// with the admin listener, whose status page shows it.
    draining: Arc<AtomicBool>,
    open: AtomicUsize,
    /// Shutdown requested: `/readyz` is 503; the listener keeps accepting
    /// for `drain_delay`.
    shutdown: CancellationToken,
    /// The listener has stopped: every connection finishes what it is
    /// doing and closes.
    closing: CancellationToken,
    /// Forced: close every connection now (grace period over).
    force: CancellationToken,
    /// Wakes the configuration reloader.
    reload: Arc<tokio::sync::Notify>,
    /// A configuration file is being watched.
    reloadable: AtomicBool,
}

/// A running server. Dropping it closes everything at once; call
/// [`ServerHandle::shutdown`] and [`ServerHandle::wait`] for a graceful stop.
pub struct ServerHandle {
    local: SocketAddr,
    admin: SocketAddr,
    shared: Arc<Shared>,
    admin_stop: CancellationToken,
    driver: Option<JoinHandle<()>>,
    workers: usize,
    /// Redis shared state, whose leases are given back once stopped.
    redis: Option<Arc<crate::shared::Shared>>,
}

impl ServerHandle {
    /// How many threads serve the public port (see
    /// [`ServeOptions::workers`]).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The public listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Starts a graceful shutdown: `/readyz` turns 503 at once; after
    /// `server.drain_delay` the listener stops accepting and in-flight
    /// requests get `server.shutdown_grace` to finish.
    /// Returns at once; [`ServerHandle::wait`] completes when done.
    pub fn shutdown(&self) {
        begin_shutdown(&self.shared);
    }

    /// A cloneable way to stop the server from elsewhere (a signal task).
    pub fn control(&self) -> ServerControl {
        ServerControl {
            shared: self.shared.clone(),
        }
    }

    /// Waits until the server has stopped (after [`ServerHandle::shutdown`],
    /// once in-flight work finished or the grace period ran out). With a
    /// `redis` block it then gives the unused part of this replica's
    /// quota leases back, bounded by `redis.op_timeout_ms`: shutdown is
    /// never longer than that because of Redis.
    pub async fn wait(mut self) {
        if let Some(driver) = self.driver.take() {
            let _ = driver.await;
        }
        if let Some(redis) = self.redis.take() {
            match crate::shared::quota::release(&redis).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(leases = n, "gave unused quota leases back to Redis"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not give unused quota leases back to Redis; they expire on their own"
                ),
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.driver.is_some() {
            begin_shutdown(&self.shared);
            self.shared.force.cancel();
            self.admin_stop.cancel();
        }
    }
}

/// Stops a running server; see [`ServerHandle::control`].
#[derive(Clone)]
pub struct ServerControl {
    shared: Arc<Shared>,
}

impl ServerControl {
    /// Same as [`ServerHandle::shutdown`].
    pub fn shutdown(&self) {
        begin_shutdown(&self.shared);
    }

    /// Asks for the configuration file to be read again now (what
    /// `SIGHUP` does). Returns false when the configuration does not come
    /// from a file, so there is nothing to reload.
    pub fn reload(&self) -> bool {
        if self.shared.reloadable.load(Ordering::Acquire) {
            // A permit is stored if the reloader is busy: it runs again.
            self.shared.reload.notify_one();
            true
        } else {
            false
        }
    }

    /// Ends the grace period now: every open connection is closed.
    pub fn abort(&self) {
        begin_shutdown(&self.shared);
        self.shared.force.cancel();
    }
}

fn begin_shutdown(shared: &Shared) {
    // Order matters: readiness goes first so a probe during the drain
    // already sees 503.
    shared.draining.store(true, Ordering::Release);
    shared.shutdown.cancel();
}

/// Starts the gateway's public and admin listeners.
///
/// # Errors
/// [`ServeError::MissingClientKey`] when no key is given and
/// unauthenticated mode was not chosen; [`ServeError::Bind`] when a port is
/// taken; [`ServeError::Gateway`] when the gateway cannot be built.
pub async fn spawn(config: Arc<Config>, opts: ServeOptions) -> Result<ServerHandle, ServeError> {
    if opts.client_key.is_none() && config.clients.is_empty() && !opts.allow_unauthenticated {
        return Err(ServeError::MissingClientKey);
    }
    // The recorder must exist before the gateway caches its metric handles;
    // handles taken earlier would record nowhere.
    crate::metrics::install()?;
    let gateway = crate::proxy::Gateway::with_env(
        config.clone(),
        opts.client_key.clone(),
        opts.clock.clone(),
        &opts.azure_env,
        opts.tracing.clone(),
    )
    .map_err(|e| ServeError::Gateway(e.to_string()))?;
    if let Some(shared) = gateway.state().shared.clone() {
        shared.start(gateway.clone());
    }
    let info = crate::status::ConfigInfo::new(&config.digest, opts.config_source.clone());
    crate::reload::publish(&info, None, std::time::SystemTime::now());
    let info = Arc::new(arc_swap::ArcSwap::from_pointee(info));
    let file = opts.config_file.clone();
    let poll = opts.config_poll;
    let mut handle = serve(gateway.clone(), config.server, opts, info.clone()).await?;
    handle.redis = gateway.state().shared.clone();
    if let Some(path) = file {
        let reloader = crate::reload::Reloader::new(path, gateway, info, config.digest.clone());
        handle.shared.reloadable.store(true, Ordering::Release);
        tokio::spawn(reloader.run(
            handle.shared.reload.clone(),
            poll,
            handle.admin_stop.clone(),
        ));
    }
    Ok(handle)
}

impl Handler for crate::proxy::Gateway {
    type Body = crate::proxy::ProxyBody;
    type BodyError = <crate::proxy::ProxyBody as http_body::Body>::Error;

    fn handle(
        &self,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Response<Self::Body>> + Send {
        crate::proxy::Gateway::handle(self, req)
    }

    fn refresh_gauges(&self) {
        for c in self.credentials() {
            metrics::gauge!("aoai_lb_token_expires_in_seconds", "credential" => c.label.clone())
                .set(c.expires_in_secs() as f64);
        }
        for b in self.backends() {
            let available =
                b.cooldown_remaining_ms == 0 && b.breaker != "open" && b.unavailable.is_none();
            metrics::gauge!(crate::metrics::INSTANCE_AVAILABLE, "instance" => b.name)
                .set(if available { 1.0 } else { 0.0 });
        }
        self.refresh_lane_gauges();
    }

    fn backends_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "backends": self.backends() }))
            .unwrap_or_else(|_| b"{\"backends\":[]}".to_vec())
    }

    fn clients_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "clients": self.clients() }))
            .unwrap_or_else(|_| b"{\"clients\":[]}".to_vec())
    }

    fn status(&self) -> crate::status::GatewayStatus {
        crate::proxy::Gateway::status(self)
    }

    fn redis_json(&self) -> Vec<u8> {
        match &self.state().shared {
            Some(s) => serde_json::to_vec(&s.status_json())
                .unwrap_or_else(|_| b"{\"configured\":true}".to_vec()),
            None => b"{\"configured\":false}".to_vec(),
        }
    }
}

/// Starts the listeners in front of any [`Handler`]. `spawn` is this with
/// the gateway; tests use it with stand-ins.
///
/// # Errors
/// [`ServeError::Bind`] when a listener cannot bind.
pub async fn serve<H: Handler>(
    handler: H,
    cfg: ServerConfig,
    opts: ServeOptions,
    config_info: Arc<arc_swap::ArcSwap<crate::status::ConfigInfo>>,
) -> Result<ServerHandle, ServeError> {
    let prometheus = crate::metrics::install()?;
    let workers = opts.workers.max(1);
    let (listener, extra) = if workers == 1 {
        (bind("public", &opts.host, opts.port).await?, Vec::new())
    } else {
        bind_shared(&opts.host, opts.port, workers).await?
    };
    let admin_host = opts.admin_host.as_deref().unwrap_or(&opts.host);
    let admin_listener = bind("admin", admin_host, opts.admin_port).await?;
    let local = local_addr("public", &listener, &opts.host)?;
    let admin = local_addr("admin", &admin_listener, admin_host)?;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // hyper runs this timer from the end of one response to the end of
        // the next request head, so it is the keep-alive idle limit too. The
        // first request of a connection has the shorter
        // `header_read_timeout`, enforced in `serve_connection`.
        .header_read_timeout(cfg.keep_alive_timeout.max(cfg.header_read_timeout))
        .max_headers(cfg.max_headers)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEAD_BYTES).unwrap_or(u32::MAX))
        // HTTP/2 has no header deadline between requests; pings find peers
        // that vanished without closing.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));

    let shared = Arc::new(Shared {
        cfg,
        builder,
        draining: Arc::new(AtomicBool::new(false)),
        open: AtomicUsize::new(0),
        shutdown: CancellationToken::new(),
        closing: CancellationToken::new(),
        force: CancellationToken::new(),
        reload: Arc::new(tokio::sync::Notify::new()),
        reloadable: AtomicBool::new(false),
    });
    let tracker = TaskTracker::new();
    let mut stopped = Vec::with_capacity(extra.len());
    for (i, std_listener) in extra.into_iter().enumerate() {
        stopped.push(start_worker(
            i + 1,
            std_listener,
            handler.clone(),
            shared.clone(),
            tracker.clone(),
        )?);
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(crate::admin::run(
        admin_listener,
        crate::admin::Admin {
            handler: handler.clone(),
            prometheus,
            config_info,
            draining: shared.draining.clone(),
            started: std::time::SystemTime::now(),
        },
        admin_stop.clone(),
    ));
    let driver = tokio::spawn(drive(
        listener,
        handler,
        shared.clone(),
        tracker,
        admin_stop.clone(),
        admin_task,
        stopped,
    ));
    tracing::info!(
        address = %local,
        admin_address = %admin,
        workers,
        http1 = shared.cfg.http1.as_str(),
        "listening"
    );
    Ok(ServerHandle {
        local,
        admin,
        shared,
        admin_stop,
        driver: Some(driver),
        workers,
        redis: None,
    })
}

async fn bind(listener: &'static str, host: &str, port: u16) -> Result<TcpListener, ServeError> {
    // A bare IPv6 address needs brackets to be parsed together with a port.
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            listener,
            addr,
            source,
        })
}

/// Binds `count` listeners to the same address with `SO_REUSEPORT`: the
/// first on the calling runtime, the others as std listeners for the worker
/// threads to register with their own runtimes.
///
/// `SO_REUSEPORT` would also let a second process of the same user bind the
/// port and silently take a share of the connections; a plain bind first
/// checks that the port is free, so a port in use fails start-up as it does
/// with one listener.
async fn bind_shared(
    host: &str,
    port: u16,
    count: usize,
) -> Result<(TcpListener, Vec<std::net::TcpListener>), ServeError> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let fail = |source| ServeError::Bind {
        listener: "public",
        addr: addr.clone(),
        source,
    };
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(&addr)
        .await
        .map_err(fail)?
        .collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        "the host name resolves to no address",
    );
    for sa in resolved {
        match bind_group(sa, count) {
            Ok(group) => return Ok(group),
            Err(e) => last = e,
        }
    }
    Err(fail(last))
}

fn bind_group(
    sa: SocketAddr,
    count: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    if sa.port() != 0 {
        drop(std::net::TcpListener::bind(sa)?);
    }
    let first = reuseport_listener(sa)?;
    // With port 0 the first bind picks the port; the others join it.
    let sa = first.local_addr()?;
    let mut rest = Vec::with_capacity(count.saturating_sub(1));
    for _ in 1..count {
        rest.push(reuseport_listener(sa)?.into_std()?);
    }
    Ok((first, rest))
}

fn reuseport_listener(sa: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if sa.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(sa)?;
    // The backlog Tokio's own `TcpListener::bind` uses.
    socket.listen(1024)
}

/// Starts worker thread `index`: a single-threaded runtime accepting on
/// its own listener. The returned receiver completes when the thread has
/// finished (its connections closed).
fn start_worker<H: Handler>(
    index: usize,
    listener: std::net::TcpListener,
    handler: H,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) -> Result<tokio::sync::oneshot::Receiver<()>, ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Worker { index, source })?;
    let (done, stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("aoai-lb-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => worker_accept(l, handler, shared, tracker).await,
                    // Dropping the listener takes it out of the port's
                    // group: the other workers get its share.
                    Err(e) => tracing::error!(worker = index, error = %e, "worker cannot listen"),
                }
            });
            let _ = done.send(());
        })
        .map_err(|source| ServeError::Worker { index, source })?;
    Ok(stopped)
}

/// A worker thread's accept loop: accepts until the listener is to close
/// (the driver on the first runtime decides when, see [`drive`]), then
/// keeps its runtime running until the connections it serves have ended.
async fn worker_accept<H: Handler>(
    listener: TcpListener,
    handler: H,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) {
    let mut shed = ShedLog::default();
    loop {
        tokio::select! {
            biased;
            () = shared.force.cancelled() => break,
            () = shared.closing.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => admit(stream, &handler, &shared, &tracker, &mut shed),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    // The tracker spans every worker; it completes once the driver has
    // closed it and all connections are gone. A forced stop whose driver
    // is gone (the handle dropped with its runtime) must not leave this
    // thread behind: connections end at once on `force`.
    tokio::select! {
        () = tracker.wait() => {}
        () = async {
            shared.force.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } => {}
    }
}

fn local_addr(
    listener: &'static str,
    l: &TcpListener,
    host: &str,
) -> Result<SocketAddr, ServeError> {
    l.local_addr().map_err(|source| ServeError::Bind {
        listener,
        addr: host.to_owned(),
        source,
    })
}

/// Accepts until shutdown, then drains within the grace period.
async fn drive<H: Handler>(
    listener: TcpListener,
    handler: H,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<()>,
    workers: Vec<tokio::sync::oneshot::Receiver<()>>,
) {
    let drain_delay = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain_delay);
    let mut shutting_down = false;
    let mut shed = ShedLog::default();
    loop {
        tokio::select! {
            biased;
            () = shared.force.cancelled() => break,
            () = shared.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                tracing::info!(
                    delay_ms = u64::try_from(shared.cfg.drain_delay.as_millis()).unwrap_or(u64::MAX),
                    "not ready; still accepting during the drain delay"
                );
                drain_delay
                    .as_mut()
                    .reset(tokio::time::Instant::now() + shared.cfg.drain_delay);
            }
            () = &mut drain_delay, if shutting_down => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => admit(stream, &handler, &shared, &tracker, &mut shed),
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    shared.closing.cancel();
    tracker.close();
    let open = shared.open.load(Ordering::Acquire);
    tracing::info!(
        open_connections = open,
        grace_ms = u64::try_from(shared.cfg.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
        "draining"
    );
    if tokio::time::timeout(shared.cfg.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open_connections = shared.open.load(Ordering::Acquire),
            "grace period over; closing remaining connections"
        );
        shared.force.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    // The worker threads end once their connections have: at the latest
    // a second after the forced close above.
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
}

/// Counts an open connection for as long as it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let now = self.0.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(crate::metrics::OPEN_CONNECTIONS).set(now as f64);
    }
}

/// Rate-limits the "connection limit reached" warning: under overload it
/// would otherwise be one line per rejected connection.
#[derive(Default)]
struct ShedLog {
    last_warn: Option<tokio::time::Instant>,
    unreported: u64,
}

const SHED_WARN_EVERY: Duration = Duration::from_secs(10);

impl ShedLog {
    fn rejected(&mut self, max_connections: usize) {
        self.unreported += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= SHED_WARN_EVERY)
        {
            tracing::warn!(
                rejected = self.unreported,
                max_connections,
                "connection limit reached: closing new connections at once"
            );
            self.last_warn = Some(now);
            self.unreported = 0;
        }
    }
}

fn admit<H: Handler>(
    stream: TcpStream,
    handler: &H,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    shed: &mut ShedLog,
) {
    let open = shared.open.fetch_add(1, Ordering::AcqRel) + 1;
    if open > shared.cfg.max_connections {
        shared.open.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(crate::metrics::REJECTED_CONNECTIONS_TOTAL).increment(1);
        shed.rejected(shared.cfg.max_connections);
        // Dropping the stream closes it: an overloaded server sheds the
        // newcomer rather than queueing it.
        drop(stream);
        return;
    }
    metrics::gauge!(crate::metrics::OPEN_CONNECTIONS).set(open as f64);
    let guard = OpenGuard(shared.clone());
    let _ = stream.set_nodelay(true);
    tracker.spawn(serve_connection(stream, handler.clone(), guard));
}

async fn serve_connection<H: Handler>(stream: TcpStream, handler: H, guard: OpenGuard) {
    let shared = guard.0.clone();
    let first_deadline = tokio::time::Instant::now() + shared.cfg.header_read_timeout;
    if shared.cfg.http1 == Http1Server::Hyper {
        // Boxed, as below: inline, hyper's connection state would count in
        // the size of every relay connection's task too.
        Box::pin(serve_hyper(stream, handler, &shared, first_deadline)).await;
        drop(guard);
        return;
    }
    let limits = relay::Limits {
        header_read_timeout: shared.cfg.header_read_timeout,
        keep_alive_timeout: shared.cfg.keep_alive_timeout,
        max_headers: shared.cfg.max_headers,
        max_head_bytes: MAX_HEAD_BYTES,
    };
    let outcome = tokio::select! {
        biased;
        () = shared.force.cancelled() => Outcome::Closed,
        o = relay::serve(
            stream,
            limits,
            |req| route(req, &handler, &shared),
            &shared.closing,
        ) => o,
    };
    if let Outcome::Handoff {
        stream,
        read,
        deadline,
    } = outcome
    {
        // Boxed so that relay connections do not carry the size of hyper's
        // connection state in their task.
        Box::pin(serve_hyper(
            Rewind::new(stream, read),
            handler,
            &shared,
            deadline,
        ))
        .await;
    }
    drop(guard);
}

/// Serves a connection with hyper (HTTP/2, WebSocket handshakes, or every
/// connection with `server.http1: "hyper"`).
async fn serve_hyper<H, I>(
    io: I,
    handler: H,
    shared: &Arc<Shared>,
    first_deadline: tokio::time::Instant,
) where
    H: Handler,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // hyper's header timeout starts once HTTP/1 parsing starts; a client
    // that connects and sends nothing (or only part of the HTTP/2 preface)
    // is caught by this first-request deadline instead.
    let seen = Arc::new(AtomicBool::new(false));
    let svc = {
        let seen = seen.clone();
        let shared = shared.clone();
        service_fn(move |req: Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            let handler = handler.clone();
            let shared = shared.clone();
            async move {
                Ok::<_, Infallible>(route(req.map(ClientBody::Hyper), &handler, &shared).await)
            }
        })
    };
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let first_deadline = tokio::time::sleep_until(first_deadline);
    tokio::pin!(first_deadline);
    let mut first_checked = false;
    let mut graceful = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = &mut first_deadline, if !first_checked => {
                first_checked = true;
                if !seen.load(Ordering::Relaxed) {
                    break;
                }
            }
            () = shared.closing.cancelled(), if !graceful => {
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
            () = shared.force.cancelled() => break,
        }
    }
}

type RouteBody<H> = Either<Full<Bytes>, <H as Handler>::Body>;

async fn route<H: Handler>(
    req: Request<ClientBody>,
    handler: &H,
    shared: &Shared,
) -> Response<RouteBody<H>> {
    match req.uri().path() {
        "/health" | "/openai/health" => json(StatusCode::OK, br#"{"status":"healthy"}"#),
        "/healthz" => json(StatusCode::OK, br#"{"status":"ok"}"#),
        "/readyz" => {
            if shared.draining.load(Ordering::Acquire) {
                json(StatusCode::SERVICE_UNAVAILABLE, br#"{"status":"draining"}"#)
            } else {
                json(StatusCode::OK, br#"{"status":"ready"}"#)
            }
        }
        _ => handler.handle(req).await.map(Either::Right),
    }
}

fn json<B>(status: StatusCode, body: &'static [u8]) -> Response<Either<Full<Bytes>, B>> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from_static(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
