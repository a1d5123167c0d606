//! Connection-level protection: header deadline (slowloris), connection
//! cap, header limits and bytes that are not HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NONE: &[(&str, &str)] = &[];

/// Reads until EOF or error, bounded by `limit`. Returns the bytes read and
/// whether the peer closed within the limit.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn gateway_with(server: serde_json::Value) -> (Vec<aoai_sim::SimHandle>, TestGateway) {
    let sims = sims(1).await;
    let doc = config_with(&sims, serde_json::json!({ "server": server }));
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    (sims, gw)
}

#[tokio::test]
async fn closes_a_connection_that_sends_headers_too_slowly() {
    let (_sims, gw) = gateway_with(serde_json::json!({"header_read_timeout_ms": 300})).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "slow headers must be cut off");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn closes_a_connection_that_sends_nothing() {
    let (_sims, gw) = gateway_with(serde_json::json!({"header_read_timeout_ms": 300})).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "an idle new connection must be closed");
    // A partial HTTP/2 preface is not a way around the deadline either.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed);
}

#[tokio::test]
async fn keeps_serving_a_connection_that_is_quick() {
    let (_sims, gw) = gateway_with(serde_json::json!({"header_read_timeout_ms": 300})).await;
    let c = client();
    for _ in 0..3 {
        let (s, _, _) =
            send_with(&c, Method::GET, &format!("{}/healthz", gw.url()), NONE, "").await;
        assert_eq!(s, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test]
async fn keeps_an_idle_keep_alive_connection_longer_than_the_header_deadline() {
    let (_sims, gw) = gateway_with(
        serde_json::json!({"header_read_timeout_ms": 300, "keep_alive_timeout_ms": 5000}),
    )
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "same connection reused"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
}

#[tokio::test]
async fn closes_keep_alive_connections_idle_past_the_limit() {
    let (_sims, gw) = gateway_with(
        serde_json::json!({"header_read_timeout_ms": 300, "keep_alive_timeout_ms": 500}),
    )
    .await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(closed, "idle connection closed");
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn sheds_connections_over_the_cap_at_once() {
    let (_sims, gw) = gateway_with(serde_json::json!({"max_connections": 2})).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let mut third = TcpStream::connect(gw.addr()).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(
        closed && bytes.is_empty(),
        "over the cap: closed without an answer"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Freeing a slot lets a new client in.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if buf[..n].starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn survives_bytes_that_are_not_http() {
    let (_sims, gw) = gateway_with(serde_json::json!({})).await;
    let junk: [&[u8]; 4] = [
        b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ];
    for bytes in junk {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let _ = s.write_all(bytes).await;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "junk connection closed");
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK, "still serving");
}

#[tokio::test]
async fn rejects_too_many_or_too_large_headers() {
    let (sims, gw) = gateway_with(serde_json::json!({"max_headers": 10})).await;
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..20 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let _ = s.write_all(big.as_bytes()).await;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn speaks_http2_with_prior_knowledge() {
    let (_sims, gw) = gateway_with(serde_json::json!({})).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .get(format!("{}/health", gw.url()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}
