//! Graceful shutdown: readiness goes first, the listener stops after the
//! drain delay, in-flight streams finish, then the process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_lb::config::Config;
use aoai_lb::secret::Secret;
use aoai_lb::server::{ServeOptions, ServerHandle};
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

async fn start_with_workers(doc: &str, workers: usize, port: u16) -> ServerHandle {
    let config = Arc::new(Config::from_json(doc).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.workers = workers;
    opts.port = port;
    aoai_lb::server::spawn(config, opts).await.unwrap()
}

#[tokio::test]
async fn with_two_workers_streams_on_either_listener_finish_during_the_drain() {
    let sims = slow_sim().await;
    let doc = config_with(
        &sims,
        serde_json::json!({"server": {"drain_delay_ms": 300, "shutdown_grace_ms": 10000}}),
    );
    let handle = start_with_workers(&doc, 2, 0).await;
    assert_eq!(handle.workers(), 2);
    let addr = handle.local_addr();
    // One connection per stream: the kernel hashes each new connection to
    // one of the two listeners, so both workers get some of the eight.
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let url = format!("http://{addr}{}", chat_path("gpt-4o"));
            tokio::spawn(
                async move { send_stream(Method::POST, &url, &auth(), chat_body(true)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.shutdown();
    let (s, _, _) = send(Method::GET, &format!("http://{addr}/readyz"), NONE, "").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..8 {
        assert!(refused(addr).await, "both listeners closed after the delay");
    }
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "the streams outlive the drain delay"
    );
    for s in streams {
        let streamed = s.await.unwrap();
        assert_eq!(streamed.status, StatusCode::OK);
        assert!(streamed.error.is_none(), "{:?}", streamed.error);
        assert_eq!(
            streamed.sse_data().last().map(String::as_str),
            Some("[DONE]")
        );
    }
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("server stops once the drain is over");
}

#[tokio::test]
async fn with_two_workers_a_port_in_use_still_fails_start_up() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let first = start_with_workers(&doc, 2, 0).await;
    let port = first.local_addr().port();
    let config = Arc::new(Config::from_json(&doc).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.workers = 2;
    opts.port = port;
    let second = aoai_lb::server::spawn(config, opts).await;
    let e = second.err().expect("the port is taken").to_string();
    assert!(e.starts_with("cannot listen on 127.0.0.1:"), "{e}");
    // The first server still answers on its port.
    let (s, _, _) = send(
        Method::GET,
        &format!("http://127.0.0.1:{port}/healthz"),
        NONE,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
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
        // Two worker threads whatever this machine's CPU count: the drain
        // must cover the second listener and its connections too.
        &[("API_KEY", CLIENT_KEY), ("AOAI_LB_WORKERS", "2")],
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
