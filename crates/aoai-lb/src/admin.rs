//! The admin listener: Prometheus `/metrics` and JSON `/admin/backends`.
//!
//! It listens on its own port (`ADMIN_PORT`, default 8001) so it can be kept
//! off the public ingress. It answers plain HTTP/1.1, has no auth and no
//! connection cap of its own, and serves only what is safe to show to an
//! operator: instance names and live state, never a key or a URL.
//! It stays up while the public listener drains, so the drain can be
//! watched, and stops last.

use std::convert::Infallible;
use std::time::Duration;

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

/// Serves the admin routes until `stop` is cancelled.
pub async fn run<H: Handler>(
    listener: TcpListener,
    handler: H,
    prometheus: PrometheusHandle,
    stop: CancellationToken,
) {
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
                let handler = handler.clone();
                let prometheus = prometheus.clone();
                let stop = stop.clone();
                tracker.spawn(async move {
                    let svc = service_fn(move |req| {
                        let resp = answer(&req, &handler, &prometheus);
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

fn answer<H: Handler>(
    req: &Request<Incoming>,
    handler: &H,
    prometheus: &PrometheusHandle,
) -> Response<Full<Bytes>> {
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
                Bytes::from(prometheus.render()),
            )
        }
        "/admin/backends" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(handler.backends_json()),
        ),
        "/healthz" => reply(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(br#"{"status":"ok"}"#),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(br#"{"error":"not found; try /metrics or /admin/backends"}"#),
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
