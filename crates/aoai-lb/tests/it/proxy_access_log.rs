//! The access line, read from the real binary's stdout: one JSON line per
//! request with the attempts, ids and timings, and never a key or a
//! query string.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_sim::Fault;
use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn writes_one_access_line_per_request_with_every_attempt() {
    let sims = sims(2).await;
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 503,
        body: None,
        retry_after_ms: None,
    });
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"priority":1},{"priority":2}]}),
    );
    let (bin, addr) = spawn_gateway_binary(&doc);
    let url = format!(
        "http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview&api-key=leak-me"
    );
    let mut headers = auth();
    headers.push(("x-ms-client-request-id", "log-test-id".to_owned()));
    let (s, h, _) = send(Method::POST, &url, &headers, chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    let apim = h["apim-request-id"].to_str().unwrap().to_owned();

    let rec = bin
        .wait_for_message(Duration::from_secs(5), "request")
        .unwrap_or_else(|| panic!("no access line: {:#?}", bin.lines()));
    assert_eq!(rec["target"], "aoai_lb::access");
    assert_eq!(rec["level"], "INFO");
    assert_eq!(rec["request_id"], "log-test-id");
    assert_eq!(rec["apim_request_id"], apim.as_str());
    assert_eq!(rec["method"], "POST");
    assert_eq!(rec["path"], "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(rec["deployment"], "gpt-4o");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["instance"], "sim1");
    assert_eq!(rec["streamed"], false);
    assert!(rec["bytes"].as_u64().unwrap() > 0);
    assert!(rec["total_ms"].as_f64().unwrap() >= rec["ttfb_ms"].as_f64().unwrap());
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec}");
    assert_eq!(attempts[0]["instance"], "sim0");
    assert_eq!(attempts[0]["outcome"], "server_error");
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[1]["outcome"], "ok");
    assert!(rec["timestamp"].as_str().unwrap().ends_with('Z'));

    // A local error is logged too, once.
    let (s, _, _) = send(
        Method::POST,
        &format!("http://{addr}/openai/deployments/gpt-4o/chat/completions"),
        &[("api-key", "wrong-client-key-9d")],
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let unauthorized = bin.wait_for_line(Duration::from_secs(5), |l| {
        l.contains("\"unauthorized\"") && l.contains("aoai_lb::access")
    });
    assert!(unauthorized.is_some(), "{:#?}", bin.lines());

    let text = bin.all_text().join("\n");
    for secret in [CLIENT_KEY, "sim-key", "leak-me", "wrong-client-key-9d"] {
        assert!(!text.contains(secret), "{secret} appears in the output");
    }
    let access_lines = bin
        .all_text()
        .iter()
        .filter(|l| l.contains("\"aoai_lb::access\""))
        .count();
    assert_eq!(access_lines, 2, "exactly one line per request");

    // A client that leaves while the instance is still thinking: the
    // upstream request is cancelled and the line still written, once.
    sims[0].inject(Fault::Hang {
        count: None,
        ms: None,
    });
    sims[1].inject(Fault::Hang {
        count: None,
        ms: None,
    });
    {
        use tokio::io::AsyncWriteExt;
        let body = chat_body(false);
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            chat_path("gpt-4o"),
            body.len()
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Dropping the socket closes the connection.
    }
    let line = bin.wait_for_line(Duration::from_secs(5), |l| {
        l.contains("\"client_disconnected\"") && l.contains("aoai_lb::access")
    });
    let rec: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(rec["status"], 499);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sims[0].journal().last().unwrap().outcome != aoai_sim::Outcome::ClientAborted {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
