//! Response streaming: events flushed as they arrive, idle and mid-stream
//! failures aborting the client's response, and client disconnects
//! cancelling the upstream request.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use aoai_sim::Fault;
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

#[tokio::test]
async fn streams_sse_events_as_they_arrive() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("slow")
            .latency(20, 150)
            .reply_tokens(6),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let r = send_stream(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = r.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(r.chunks.len() >= 4, "{} chunks", r.chunks.len());
    let first = r.chunks.first().unwrap().at;
    let last = r.chunks.last().unwrap().at;
    // Tokens are 150 ms apart upstream: a buffering proxy would deliver
    // everything at the end.
    assert!(
        last - first >= Duration::from_millis(500),
        "first {first:?} last {last:?}"
    );
    assert!(
        first < Duration::from_millis(400),
        "first event at {first:?}"
    );
}

#[tokio::test]
async fn aborts_the_client_response_when_the_stream_goes_idle() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"timeouts":{"stream_idle_ms":300}}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    sims[0].inject(Fault::Drip {
        count: Some(1),
        bytes: 16,
        interval_ms: 5000,
    });
    let started = Instant::now();
    let r = send_stream(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.error.is_some(), "an idle stream must not end cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn aborts_the_client_response_when_the_backend_closes_mid_stream() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    sims[0].inject(Fault::CloseMidStream {
        count: Some(1),
        after_chunks: 2,
    });
    let r = send_stream(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.chunks.is_empty(), "events before the cut arrive");
    assert!(
        r.error.is_some(),
        "the client sees an error, not a clean end"
    );
    assert!(!r.sse_data().iter().any(|d| d == "[DONE]"));

    // The same on a non-streamed body with a known length.
    sims[0].inject(Fault::CloseMidStream {
        count: Some(1),
        after_chunks: 1,
    });
    let r = send_stream(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert!(r.error.is_some(), "a truncated body must not end cleanly");
}

#[tokio::test]
async fn cancels_the_upstream_request_when_the_client_disconnects() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("long")
            .latency(10, 100)
            .reply_tokens(200),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let req = http::Request::post(format!("{}{}", gw.url(), chat_path("gpt-4o")))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
            true,
        ))))
        .unwrap();
    {
        let c = client();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap();
        assert!(first.is_some());
        // Dropping the body and the client closes the connection.
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = sims[0].journal().pop().unwrap();
        if e.outcome == aoai_sim::Outcome::ClientAborted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream still running: {:?}",
            e.outcome
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
