//! The admin listener: Prometheus `/metrics`, JSON `/admin/backends`,
//! `/admin/redis` and `/admin/status`, and the status page at `/` (see [`crate::status`]).
//!
//! It listens on its own port (`ADMIN_PORT`, default 8001) so it can be kept
//! off the public ingress. It answers plain HTTP/1.1, has no auth and no
//! connection cap of its own, and serves only what is safe to show to an
//! operator: instance names and live state, never a key or a URL. Every
//! route only reads (GET or HEAD), so a page elsewhere that makes a browser
//! send requests here changes nothing.
//! It stays up while the public listener drains, so the drain can be
//! watched, and stops last.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::Handler;
use crate::status::{self, ConfigInfo, ServerInfo};

/// What the admin routes read.
#[derive(Clone)]
pub struct Admin<H> {
    /// The gateway (instances, clients).
    pub handler: H,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The configuration in use; replaced on reload.
    pub config_info: Arc<ArcSwap<ConfigInfo>>,
    /// Set when shutdown begins.
    pub draining: Arc<AtomicBool>,
    /// When serving started.
    pub started: SystemTime,
}

/// Serves the admin routes until `stop` is cancelled.
pub async fn run<H: Handler>(listener: TcpListener, admin: Admin<H>, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let admin = admin.clone();
                let stop = stop.clone();
                tracker.spawn(async move {
                    let svc = service_fn(move |req| {
                        let resp = answer(&req, &admin);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

fn answer<H: Handler>(req: &Request<Incoming>, admin: &Admin<H>) -> Response<Full<Bytes>> {
    let handler = &admin.handler;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            Bytes::from_static(br#"{"error":"method not allowed"}"#),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            handler.refresh_gauges();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(admin.prometheus.render()),
            )
        }
        "/admin/backends" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(handler.backends_json()),
        ),
        "/admin/redis" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(handler.redis_json()),
        ),
        "/admin/clients" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(handler.clients_json()),
        ),
        "/admin/status" => {
            let server = ServerInfo {
                started: admin.started,
                draining: admin.draining.load(Ordering::Acquire),
            };
            reply(
                StatusCode::OK,
                "application/json",
                Bytes::from(status::document(
                    server,
                    &admin.config_info.load(),
                    handler.status(),
                )),
            )
        }
        "/" | "/index.html" => page(),
        // Browsers ask for it on every page; "no icon" rather than a 404.
        "/favicon.ico" => reply(StatusCode::NO_CONTENT, "image/x-icon", Bytes::new()),
        "/healthz" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(br#"{"status":"ok"}"#),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(
                br#"{"error":"not found; try /, /metrics, /admin/status or /admin/backends"}"#,
            ),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The status page, with headers that keep it to itself: the policy allows
/// its own inline script and style only, and no site may frame it.
fn page() -> Response<Full<Bytes>> {
    let mut resp = reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(status::PAGE.as_bytes()),
    );
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(status::content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
