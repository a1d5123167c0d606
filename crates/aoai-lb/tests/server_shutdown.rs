//! Graceful shutdown: readiness goes first, the listener stops after the
//! drain delay, in-flight streams finish, then the process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

const NONE: &[(&str, &str)] = &[];

/// A sim whose streamed reply (16 tokens, the test body's `max_tokens`)
/// lasts about 3.2 s: longer than the drain delays used below, so the
/// stream is still running when the listener closes.
async fn slow_sim() -> Vec<aoai_sim::SimHandle> {
    start_sims(vec![
        aoai_sim::InstanceConfig::new("slow")
            .api_key("slow-backend-key-93ab")
            .latency(50, 200)
            .reply_tokens(16),
    ])
    .await
}

/// True when a new connection to `addr` is refused.
async fn refused(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn readyz_turns_503_while_draining_and_the_stream_still_finishes() {
    let sims = slow_sim().await;
    let doc = config_with(
        &sims,
        serde_json::json!({"server": {"drain_delay_ms": 1500, "shutdown_grace_ms": 10000}}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let stream =
        tokio::spawn(
            async move { send_stream(Method::POST, &url, &auth(), chat_body(true)).await },
        );
    // Let the stream get going before shutting down.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (s, _, _) = send(Method::GET, &format!("{}/readyz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK);

    gw.handle.shutdown();
    assert!(gw.handle.is_draining());
    let (s, _, body) = send(Method::GET, &format!("{}/readyz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], br#"{"status":"draining"}"#);
    // Liveness is unaffected by the drain.
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK);

    // After the drain delay the listener is closed while the stream runs.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(!stream.is_finished(), "the stream outlives the drain delay");
    assert!(refused(gw.addr()).await, "listener closed after the delay");

    let streamed = stream.await.unwrap();
    assert_eq!(streamed.status, StatusCode::OK);
    assert!(streamed.error.is_none(), "{:?}", streamed.error);
    let events = streamed.sse_data();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), gw.handle.wait())
        .await
        .expect("server stops once the drain is over");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn closes_streams_that_outlive_the_grace_period() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("endless")
            .latency(20, 200)
            .reply_tokens(200),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"server": {"drain_delay_ms": 0, "shutdown_grace_ms": 300}}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let stream =
        tokio::spawn(
            async move { send_stream(Method::POST, &url, &auth(), chat_body(true)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    gw.handle.shutdown();
    tokio::time::timeout(Duration::from_secs(5), gw.handle.wait())
        .await
        .expect("stops after the grace period");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let streamed = stream.await.unwrap();
    let events = streamed.sse_data();
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_complete_then_exits_zero() {
    let sims = slow_sim().await;
    let doc = config_with(
        &sims,
        serde_json::json!({"server": {"drain_delay_ms": 1500, "shutdown_grace_ms": 10000}}),
    );
    let dir = std::env::temp_dir().join(format!("aoai-lb-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    std::fs::write(&file, &doc).unwrap();
    let mut bin = spawn_binary(
        &[
            "--config",
            file.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-port",
            "0",
        ],
        &[("API_KEY", CLIENT_KEY)],
    );
    let (addr, _) = bin.wait_listening(Duration::from_secs(20));
    let url = format!("http://{addr}{}", chat_path("gpt-4o"));
    let stream =
        tokio::spawn(
            async move { send_stream(Method::POST, &url, &auth(), chat_body(true)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.signal("TERM");
    // Readiness flips as soon as the signal is handled, while the listener
    // still accepts (the signal is asynchronous, so poll briefly).
    let signalled = Instant::now();
    let deadline = signalled + Duration::from_millis(1400);
    loop {
        let (s, _, _) = send(Method::GET, &format!("http://{addr}/readyz"), NONE, "").await;
        if s == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(s, StatusCode::OK);
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then the listener closes while the stream is still running.
    tokio::time::sleep(
        (signalled + Duration::from_millis(1800)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert!(!stream.is_finished(), "the stream outlives the drain delay");
    assert!(refused(addr).await, "listener closed after the delay");

    let streamed = stream.await.unwrap();
    assert_eq!(streamed.status, StatusCode::OK);
    assert!(streamed.error.is_none(), "{:?}", streamed.error);
    assert_eq!(
        streamed.sse_data().last().map(String::as_str),
        Some("[DONE]")
    );
    let status = bin
        .wait_exit(Duration::from_secs(15))
        .expect("exits after the drain");
    assert_eq!(status.code(), Some(0), "{:#?}", bin.lines());
    let text = bin.all_text();
    let at = |m: &str| text.iter().position(|l| l.contains(m));
    let (shutting, access, stopped) = (
        at("shutting down").expect("shutdown line"),
        at("aoai_lb::access").expect("access line"),
        at("\"stopped\"").expect("stopped line"),
    );
    assert!(
        shutting < access && access < stopped,
        "the stream ended during the drain: {text:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
