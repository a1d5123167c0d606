//! The upstream HTTP/1 connection pool, one per worker thread.
//!
//! By default (`upstream.http1: "relay"`) a request goes out through the
//! lean client of [`crate::relay::client`]: an idle connection is the bare
//! socket, taken from the list, written to and read from by the request's
//! own future, and put back by the response body when it has ended. With
//! `upstream.http1: "hyper"` the connections are `hyper::client::conn`
//! senders, as described below; both kinds follow the same rules.
//!
//! The gateway runs one single-threaded runtime per CPU, so each thread keeps
//! its own idle connections to each instance in a thread-local list: a
//! request takes a sender from the list without a lock, sends on it, and puts
//! it back as soon as the response head has arrived. No task is spawned per
//! request (one task per connection drives it), and nothing is shared
//! between threads. A sender whose response body is still streaming is not
//! ready: a checkout passes over it, and it is usable again once the body
//! has ended.
//!
//! - At most `upstream.pool_max_idle_per_host` connections per instance and
//!   thread are kept, and one unused for `upstream.pool_idle_timeout` is
//!   closed (by a sweep on each thread), so memory falls back after a burst.
//! - A pooled connection found closed before the request went out (the
//!   instance closed it while idle) is replaced by a fresh one and the
//!   request sent there. Once the request may have been written, the error
//!   is returned: the instance may have acted on it.
//! - HTTP/2: an `https` instance that picks h2 by ALPN is served by the
//!   hyper-util client, which multiplexes requests over one connection. The
//!   first connection to such an instance tells; later requests on that
//!   thread go to the hyper-util client directly.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::Connection as _;
use tower_service::Service as _;

use crate::relay::client::{self, ExchangeError, Io, LeanBody};
use crate::upstream::{TimedConnector, UpstreamClient};

type Sender = http1::SendRequest<Full<Bytes>>;

/// Why an upstream request failed. The text never names the instance.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// TCP connect or TLS handshake failed or timed out.
    #[error("connecting to the instance failed")]
    Connect,
    /// The HTTP/1 exchange failed (the connection broke, or the response
    /// head was invalid).
    #[error("the HTTP/1 exchange with the instance failed")]
    Http(#[source] hyper::Error),
    /// The hyper-util client (HTTP/2 instances) failed.
    #[error("the request to the instance failed")]
    Client(#[source] hyper_util::client::legacy::Error),
    /// The lean client's exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The request had no scheme or authority.
    #[error("the upstream URI has no scheme or authority")]
    Uri,
}

/// The error of an upstream response body.
pub type UpstreamBodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of an instance's response, from either client.
#[derive(Debug)]
pub enum UpstreamBody {
    /// From hyper (HTTP/2, WebSocket handshakes, `upstream.http1: "hyper"`).
    Hyper(Incoming),
    /// From the lean HTTP/1 client.
    Lean(LeanBody<Home>),
}

impl From<Incoming> for UpstreamBody {
    fn from(b: Incoming) -> Self {
        UpstreamBody::Hyper(b)
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, UpstreamBodyError>>> {
        use std::task::Poll;
        let r = match self.get_mut() {
            UpstreamBody::Hyper(b) => match std::pin::Pin::new(b).poll_frame(cx) {
                Poll::Ready(r) => r.map(|f| f.map_err(UpstreamBodyError::from)),
                Poll::Pending => return Poll::Pending,
            },
            UpstreamBody::Lean(b) => match std::pin::Pin::new(b).poll_frame(cx) {
                Poll::Ready(r) => r.map(|f| f.map_err(UpstreamBodyError::from)),
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::Lean(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::Lean(b) => b.size_hint(),
        }
    }
}

/// An instance's response as the pipeline sees it.
pub type UpstreamResponse = Response<UpstreamBody>;

fn hyper_response(r: Response<Incoming>) -> UpstreamResponse {
    r.map(UpstreamBody::Hyper)
}

/// Distinguishes the pools of different gateway states (a reload builds a
/// new one; tests run many in one process) in the thread-local lists.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Hash, PartialEq, Eq, Clone)]
struct Key {
    pool: u64,
    https: bool,
    authority: Authority,
}

struct Parked {
    sender: Sender,
    since: Instant,
}

/// An idle connection of the lean client.
struct Idle {
    io: Io,
    since: Instant,
}

/// Where a lean response body returns its connection: this thread's list
/// for the instance, unless it is full.
pub struct Home {
    key: Key,
    max_idle: usize,
    idle_timeout: Duration,
}

impl client::Home for Home {
    fn park(self, io: Io) {
        if self.max_idle == 0 {
            return;
        }
        let kept = LANES.with(|l| {
            let mut lanes = l.borrow_mut();
            let lane = lanes.entry(self.key).or_insert_with_key(Lane::new);
            if lane.idle.len() < self.max_idle {
                lane.idle.push(Idle {
                    io,
                    since: Instant::now(),
                });
                true
            } else {
                false
            }
        });
        if kept {
            start_sweeper(self.idle_timeout);
        }
    }
}

enum Checkout {
    Ready(Sender),
    /// Parked connections, none ready (their responses are still streaming).
    Busy,
    Empty,
}

struct Lane {
    parked: Vec<Parked>,
    /// The lean client's idle connections, most recently used last.
    idle: Vec<Idle>,
    /// The instance answered h2 by ALPN: use the hyper-util client.
    h2: bool,
    /// The `Host` header for the instance, made once.
    host: Option<HeaderValue>,
}

impl Lane {
    fn new(key: &Key) -> Self {
        let host = key.authority.host();
        let value = match key.authority.port_u16() {
            Some(443) if key.https => HeaderValue::from_str(host),
            Some(80) if !key.https => HeaderValue::from_str(host),
            Some(_) => HeaderValue::from_str(key.authority.as_str()),
            None => HeaderValue::from_str(host),
        };
        Self {
            parked: Vec::new(),
            idle: Vec::new(),
            h2: false,
            host: value.ok(),
        }
    }
}

thread_local! {
    static LANES: RefCell<HashMap<Key, Lane>> = RefCell::new(HashMap::new());
    static SWEEPING: Cell<bool> = const { Cell::new(false) };
}

/// The per-thread HTTP/1 pool, with the hyper-util client for HTTP/2
/// instances. Cheap to share: the connections live in thread-locals.
pub struct Upstream {
    id: u64,
    connector: TimedConnector,
    h2: UpstreamClient,
    max_idle: usize,
    idle_timeout: Duration,
    lean: bool,
}

impl Upstream {
    /// A pool connecting with `connector` (which may offer h2 by ALPN) and
    /// handing h2 instances to `h2`. `max_idle` connections per instance and
    /// thread at most, each closed after `idle_timeout` unused. With `lean`,
    /// HTTP/1 instances are served by the lean client, else by hyper's.
    pub fn new(
        connector: TimedConnector,
        h2: UpstreamClient,
        max_idle: usize,
        idle_timeout: Duration,
        lean: bool,
    ) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connector,
            h2,
            max_idle,
            idle_timeout,
            lean,
        }
    }

    /// Sends `req` (absolute URI) and returns the response head with its
    /// streaming body.
    ///
    /// # Errors
    /// [`PoolError`] when no connection could be made or the exchange
    /// failed; a pooled connection that was closed before the request was
    /// written is replaced transparently.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Result<UpstreamResponse, PoolError> {
        let uri = req.uri();
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(PoolError::Uri);
        };
        let key = Key {
            pool: self.id,
            https: scheme == Scheme::HTTPS,
            authority,
        };
        let (h2, host) = LANES.with(|l| {
            let mut lanes = l.borrow_mut();
            if let Some(lane) = lanes.get(&key) {
                return (lane.h2, lane.host.clone());
            }
            let lane = Lane::new(&key);
            let found = (lane.h2, lane.host.clone());
            lanes.insert(key.clone(), lane);
            found
        });
        if h2 {
            return self.via_h2(req).await;
        }
        if self.lean {
            return self.lean_request(req, key, host).await;
        }
        self.hyper_request(req, key, host, scheme).await
    }

    /// The lean client: an idle connection of this thread if one is open,
    /// else a new one (which may turn out to speak h2).
    async fn lean_request(
        &self,
        req: Request<Full<Bytes>>,
        key: Key,
        host: Option<HeaderValue>,
    ) -> Result<UpstreamResponse, PoolError> {
        use http_body_util::BodyExt as _;
        let (parts, mut body) = req.into_parts();
        // A `Full` body is one frame, or none when empty.
        let body = match body.frame().await {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            Some(Err(never)) => match never {},
            None => Bytes::new(),
        };
        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let host = host
            .as_ref()
            .map_or(key.authority.as_str().as_bytes(), HeaderValue::as_bytes);
        let out = client::Outgoing {
            method: &parts.method,
            target,
            headers: &parts.headers,
            host,
            body: &body,
        };
        while let Some(io) = self.take_idle(&key) {
            match client::exchange(io, true, &out, self.home(&key)).await {
                Ok(r) => return Ok(r.map(UpstreamBody::Lean)),
                // Closed while idle: the next one, or a new one.
                Err(ExchangeError::NotSent) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some(io) = self.connect(parts.uri.clone(), &key).await? else {
            return self
                .via_h2(Request::from_parts(parts, Full::new(body)))
                .await;
        };
        let r = client::exchange(Io::from_connected(io), false, &out, self.home(&key)).await?;
        Ok(r.map(UpstreamBody::Lean))
    }

    /// A new connection to the instance, or `None` when it chose h2 by
    /// ALPN: the lane is then marked so that later requests go to the
    /// hyper-util client directly, and the caller sends this one there.
    async fn connect(
        &self,
        uri: Uri,
        key: &Key,
    ) -> Result<Option<crate::upstream::ConnectStream>, PoolError> {
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|_| PoolError::Connect)?;
        if !io.connected().is_negotiated_h2() {
            return Ok(Some(io));
        }
        drop(io);
        LANES.with(|l| {
            l.borrow_mut()
                .entry(key.clone())
                .or_insert_with(|| Lane::new(key))
                .h2 = true;
        });
        Ok(None)
    }

    /// Sends through the hyper-util client (instances that speak h2).
    async fn via_h2(&self, req: Request<Full<Bytes>>) -> Result<UpstreamResponse, PoolError> {
        self.h2
            .request(req)
            .await
            .map(hyper_response)
            .map_err(PoolError::Client)
    }

    fn home(&self, key: &Key) -> Home {
        Home {
            key: key.clone(),
            max_idle: self.max_idle,
            idle_timeout: self.idle_timeout,
        }
    }

    /// The most recently used idle lean connection of this thread that has
    /// not expired; expired ones met on the way are closed.
    fn take_idle(&self, key: &Key) -> Option<Io> {
        LANES.with(|l| {
            let mut lanes = l.borrow_mut();
            let lane = lanes.get_mut(key)?;
            let now = Instant::now();
            while let Some(idle) = lane.idle.pop() {
                if now.duration_since(idle.since) <= self.idle_timeout {
                    return Some(idle.io);
                }
            }
            None
        })
    }

    /// hyper's HTTP/1 client over this thread's parked senders.
    async fn hyper_request(
        &self,
        mut req: Request<Full<Bytes>>,
        key: Key,
        host: Option<HeaderValue>,
        scheme: Scheme,
    ) -> Result<UpstreamResponse, PoolError> {
        let uri = req.uri().clone();
        to_origin_form(&mut req, host);
        let mut yielded = false;
        loop {
            let mut sender = match self.checkout(&key) {
                Checkout::Ready(sender) => sender,
                // A connection whose response body has just ended becomes
                // ready when its task next runs: let it run once before
                // opening another connection.
                Checkout::Busy if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                Checkout::Busy | Checkout::Empty => break,
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.park(key, sender);
                    return Ok(hyper_response(response));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the connection was closing. Next one.
                    Some(back) => req = back,
                    None => return Err(PoolError::Http(e.into_error())),
                },
            }
        }

        let Some(io) = self.connect(uri, &key).await? else {
            restore_absolute_form(&mut req, scheme, key.authority);
            return self.via_h2(req).await;
        };
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Http)?;
        // The one task per connection: it ends when the connection closes.
        tokio::spawn(conn);
        let response = sender.send_request(req).await.map_err(PoolError::Http)?;
        self.park(key, sender);
        Ok(hyper_response(response))
    }

    /// The most recently parked sender that is ready; closed and expired
    /// ones met on the way are dropped, busy ones stay.
    fn checkout(&self, key: &Key) -> Checkout {
        LANES.with(|l| {
            let mut lanes = l.borrow_mut();
            let Some(lane) = lanes.get_mut(key) else {
                return Checkout::Empty;
            };
            let now = Instant::now();
            let mut i = lane.parked.len();
            while i > 0 {
                i -= 1;
                let p = &lane.parked[i];
                if p.sender.is_closed() || now.duration_since(p.since) > self.idle_timeout {
                    lane.parked.swap_remove(i);
                } else if p.sender.is_ready() {
                    return Checkout::Ready(lane.parked.swap_remove(i).sender);
                }
            }
            if lane.parked.is_empty() {
                Checkout::Empty
            } else {
                Checkout::Busy
            }
        })
    }

    /// Keeps `sender` for later requests, unless the lane is full (then the
    /// connection closes once its response has ended).
    fn park(&self, key: Key, sender: Sender) {
        if self.max_idle == 0 {
            return;
        }
        LANES.with(|l| {
            let mut lanes = l.borrow_mut();
            let lane = lanes.entry(key).or_insert_with_key(Lane::new);
            if lane.parked.len() < self.max_idle {
                lane.parked.push(Parked {
                    sender,
                    since: Instant::now(),
                });
            }
        });
        start_sweeper(self.idle_timeout);
    }
}

/// Closes this thread's connections that are closed or unused for longer
/// than their timeout, every quarter timeout (at least every second); ends
/// when nothing is parked, to start again with the next park.
fn start_sweeper(idle_timeout: Duration) {
    if SWEEPING.with(Cell::get) || tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    SWEEPING.with(|s| s.set(true));
    let period = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    tokio::spawn(async move {
        // Clears the flag however the task ends (a runtime shut down too).
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                let _ = SWEEPING.try_with(|s| s.set(false));
            }
        }
        let _done = Done;
        loop {
            tokio::time::sleep(period).await;
            let now = Instant::now();
            let empty = LANES.with(|l| {
                let mut lanes = l.borrow_mut();
                lanes.retain(|_, lane| {
                    lane.parked.retain(|p| {
                        !p.sender.is_closed()
                            && (!p.sender.is_ready() || now.duration_since(p.since) <= idle_timeout)
                    });
                    lane.idle.retain_mut(|i| {
                        now.duration_since(i.since) <= idle_timeout && i.io.is_open()
                    });
                    !lane.parked.is_empty() || !lane.idle.is_empty() || lane.h2
                });
                lanes
                    .values()
                    .all(|lane| lane.parked.is_empty() && lane.idle.is_empty())
            });
            if empty {
                break;
            }
        }
    });
}

/// The request line wants origin form (`/path?query`) and a `Host` header
/// (the authority, without a default port), as hyper-util's client sends
/// them.
fn to_origin_form(req: &mut Request<Full<Bytes>>, host: Option<HeaderValue>) {
    if let Some(host) = host
        && !req.headers().contains_key(header::HOST)
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
}

/// Undoes [`to_origin_form`] for the hyper-util client.
fn restore_absolute_form(req: &mut Request<Full<Bytes>>, scheme: Scheme, authority: Authority) {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = req.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req.headers_mut().remove(header::HOST);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    /// An HTTP/1 server on 127.0.0.1 counting the connections it accepted.
    /// `/slow` answers with a body that ends after 300 ms; with `close`,
    /// every connection is closed after its first response (as an instance
    /// closing idle connections does), without `Connection: close`.
    async fn server(close: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let served = Arc::clone(&served);
                        async move {
                            served.fetch_add(1, Ordering::SeqCst);
                            let body = if req.uri().path() == "/slow" {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
                                >(1);
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    let _ = tx
                                        .send(Ok(hyper::body::Frame::data(Bytes::from("late"))))
                                        .await;
                                });
                                http_body_util::StreamBody::new(tokio_stream_rx(rx)).boxed()
                            } else {
                                Full::new(Bytes::from(req.uri().path().to_owned()))
                                    .map_err(|never| match never {})
                                    .boxed()
                            };
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    if close {
                        let mut conn = std::pin::pin!(conn);
                        // Serve one exchange, then drop the connection.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), conn.as_mut()).await;
                    } else {
                        let _ = conn.await;
                    }
                });
            }
        });
        (port, accepted)
    }

    fn tokio_stream_rx<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    fn upstream(max_idle: usize, lean: bool) -> Upstream {
        let config = Config::from_json(
            r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#,
        )
        .unwrap();
        Upstream::new(
            crate::upstream::build_connector(&config, true).unwrap(),
            crate::upstream::build_client(&config, true).unwrap(),
            max_idle,
            Duration::from_secs(30),
            lean,
        )
    }

    fn get(port: u16, path: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn text(r: UpstreamResponse) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reuses_one_connection_for_requests_in_sequence_in_origin_form() {
        for lean in [false, true] {
            let (port, accepted) = server(false).await;
            let up = upstream(8, lean);
            for path in ["/a", "/b?x=1", "/c"] {
                let r = up.request(get(port, path)).await.unwrap();
                // The server echoes the request target: origin form.
                assert_eq!(text(r).await, path.split('?').next().unwrap());
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn a_connection_still_streaming_a_body_is_not_reused_until_it_ends() {
        for lean in [false, true] {
            let (port, accepted) = server(false).await;
            let up = upstream(8, lean);
            let slow = up.request(get(port, "/slow")).await.unwrap();
            let quick = up.request(get(port, "/quick")).await.unwrap();
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            assert_eq!(text(quick).await, "/quick");
            assert_eq!(text(slow).await, "late");
            // Both idle now: no third connection.
            tokio::task::yield_now().await;
            let again = up.request(get(port, "/again")).await.unwrap();
            assert_eq!(text(again).await, "/again");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_the_instance_closed_is_replaced_by_a_fresh_one() {
        for lean in [false, true] {
            let (port, accepted) = server(true).await;
            let up = upstream(8, lean);
            let r = up.request(get(port, "/one")).await.unwrap();
            assert_eq!(text(r).await, "/one");
            // The server drops the connection after 50 ms.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = up.request(get(port, "/two")).await.unwrap();
            assert_eq!(text(r).await, "/two");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn keeps_no_more_connections_than_the_cap() {
        for lean in [false, true] {
            let (port, accepted) = server(false).await;
            let up = upstream(1, lean);
            let a = up.request(get(port, "/slow")).await.unwrap();
            let b = up.request(get(port, "/slow")).await.unwrap();
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            let _ = (text(a).await, text(b).await);
            let key = Key {
                pool: up.id,
                https: false,
                authority: format!("127.0.0.1:{port}").parse().unwrap(),
            };
            let parked = LANES.with(|l| {
                l.borrow()
                    .get(&key)
                    .map_or(0, |lane| lane.parked.len() + lane.idle.len())
            });
            assert_eq!(parked, 1);
        }
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_a_connect_error() {
        for lean in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            drop(listener);
            let e = upstream(8, lean).request(get(port, "/")).await.unwrap_err();
            assert!(matches!(e, PoolError::Connect), "{e:?}");
        }
    }

    /// A blocking TLS server on 127.0.0.1 offering only http/1.1 by ALPN,
    /// answering every request on a connection with `hello`. Returns its
    /// port, the CA file to trust and the count of accepted connections.
    fn tls_server() -> (u16, std::path::PathBuf, Arc<AtomicUsize>) {
        use std::io::{Read, Write};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_file = std::env::temp_dir().join(format!(
            "aoai-lb-pool-ca-{}-{:08x}.pem",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server = Arc::new(server);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let server = Arc::clone(&server);
                // A thread per connection: a pooled one stays open.
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(server).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while tls.read(&mut byte).unwrap_or(0) == 1 {
                        head.push(byte[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            head.clear();
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if tls.write_all(reply).and_then(|()| tls.flush()).is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        (port, ca_file, accepted)
    }

    #[tokio::test]
    async fn speaks_http1_over_tls_and_reuses_the_connection() {
        let (port, ca_file, accepted) = tls_server();
        for lean in [true, false] {
            let config = Config::from_json(&format!(
                r#"{{"instances":[{{"name":"a","url":"https://127.0.0.1:{port}","api_key":"k"}}],
                    "upstream":{{"extra_ca_file":{:?}}}}}"#,
                ca_file.to_str().unwrap()
            ))
            .unwrap();
            let up = Upstream::new(
                crate::upstream::build_connector(&config, true).unwrap(),
                crate::upstream::build_client(&config, true).unwrap(),
                8,
                Duration::from_secs(30),
                lean,
            );
            for _ in 0..3 {
                let req = Request::builder()
                    .uri(format!("https://127.0.0.1:{port}/openai/models"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = up.request(req).await.unwrap();
                assert!(matches!(r.body(), UpstreamBody::Lean(_)) == lean);
                assert_eq!(text(r).await, "hello");
            }
        }
        // One connection per client kind, each reused for its three requests.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_file(ca_file);
    }
}
