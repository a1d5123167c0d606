//! Shared helpers for the integration tests: a small hyper client and raw-socket
//! helpers for the cases a client library would hide (resets, cut bodies).
#![allow(dead_code)]
// Test helpers fail loudly: a broken helper is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const KEY: &str = "sim-key";
pub const V: &str = "api-version=2024-10-21";

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn post_json(url: &str, body: serde_json::Value) -> Resp {
    send(
        Method::POST,
        url,
        &[("api-key", KEY), ("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

pub fn chat_url(base: &str, dep: &str) -> String {
    format!("{base}/openai/deployments/{dep}/chat/completions?{V}")
}

pub fn chat_body(prompt: &str) -> serde_json::Value {
    serde_json::json!({"messages":[{"role":"user","content":prompt}]})
}

/// Each data frame of a streamed response with the time it arrived.
pub async fn stream_frames(
    url: &str,
    body: serde_json::Value,
) -> (StatusCode, HeaderMap, Vec<(Instant, Bytes)>, Option<String>) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    let mut error = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    frames.push((Instant::now(), d));
                }
            }
            Ok(Some(Err(e))) => {
                error = Some(e.to_string());
                break;
            }
            Ok(None) => break,
            Err(_) => {
                error = Some("timeout".into());
                break;
            }
        }
    }
    (parts.status, parts.headers, frames, error)
}

/// Poll `f` until it is true or two seconds pass.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// Start one instance on an ephemeral port.
pub async fn one(cfg: aoai_sim::InstanceConfig) -> aoai_sim::SimHandle {
    aoai_sim::start(vec![cfg]).await.unwrap().remove(0)
}

/// The next WebSocket message, failing the test after five seconds.
pub async fn recv<S: futures_util::Stream + Unpin>(ws: &mut S) -> Option<S::Item> {
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures_util::StreamExt::next(ws),
    )
    .await
    .expect("no WebSocket message within 5 s")
}
