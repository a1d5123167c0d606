//! The upstream HTTP/1 client (`upstream.http1`), through the real binary:
//! the lean client (the default) and hyper's, side by side.

use std::time::Duration;

use http::{Method, StatusCode};

use crate::common::*;

/// A gateway process with one worker thread (so one per-thread pool) in
/// front of `sims`, with `upstream.http1 = client`.
fn gateway(sims: &[aoai_sim::SimHandle], client: &str) -> (Binary, std::net::SocketAddr) {
    let doc = config_with(sims, serde_json::json!({"upstream": {"http1": client}}));
    let (bin, addr, _) = spawn_gateway_binary_with_env(&doc, &[("AOAI_LB_WORKERS", "1")]);
    (bin, addr)
}

#[tokio::test]
async fn either_client_serves_streams_and_bodies_over_one_reused_connection() {
    for client in ["relay", "hyper"] {
        let sims = sims(1).await;
        let (_bin, addr) = gateway(&sims, client);
        let url = format!("http://{addr}{}", chat_path("gpt-4o"));
        for i in 0..6 {
            let (status, headers, body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
            assert_eq!(status, StatusCode::OK, "{client} #{i}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{client}");
            assert!(headers.contains_key("apim-request-id"), "{client}");
            let r = send_stream(Method::POST, &url, &auth(), chat_body(true)).await;
            assert_eq!(r.status, StatusCode::OK, "{client} #{i}");
            assert!(r.error.is_none(), "{client}: {:?}", r.error);
            assert_eq!(
                r.sse_data().last().map(String::as_str),
                Some("[DONE]"),
                "{client}"
            );
        }
        // Twelve requests one after the other, on one worker thread: one
        // connection to the instance, kept for the next request.
        assert_eq!(sims[0].request_count(), 12, "{client}");
        assert_eq!(sims[0].open_connections(), 1, "{client}");
    }
}

#[tokio::test]
async fn a_body_the_instance_cuts_short_reaches_the_client_as_an_error_and_the_next_request_succeeds()
 {
    let sims = sims(1).await;
    let (_bin, addr) = gateway(&sims, "relay");
    let url = format!("http://{addr}{}", chat_path("gpt-4o"));
    sims[0].inject(aoai_sim::Fault::CloseMidStream {
        count: Some(1),
        after_chunks: 2,
    });
    let r = send_stream(Method::POST, &url, &auth(), chat_body(true)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.error.is_some(), "the cut reaches the client");
    // The next request goes out on a new connection and succeeds.
    let (status, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sims[0].request_count(), 2);
}

#[test]
fn an_unknown_upstream_client_stops_start_up_naming_the_field() {
    let doc = r#"{"upstream":{"http1":"h3"},"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#;
    let (status, lines) = run_binary(
        &[],
        &[
            ("OPENAI_INSTANCES", doc),
            ("API_KEY", CLIENT_KEY),
            ("PORT", "0"),
            ("HOST", "127.0.0.1"),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].1.contains("upstream.http1"), "{lines:#?}");
}
