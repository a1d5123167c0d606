//! The transparent proxy: auth, routing, rewriting and byte-exact bodies,
//! checked against what each simulated instance recorded in its journal.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn with(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut h = auth();
    h.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    h
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn balances_requests_across_instances() {
    let sims = sims(2).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let c = client();
    for _ in 0..40 {
        let (s, _, _) = send_with(
            &c,
            Method::POST,
            &format!("{}{}", gw.url(), chat_path("gpt-4o")),
            &auth(),
            chat_body(false),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (a, b) = (sims[0].request_count(), sims[1].request_count());
    assert_eq!(a + b, 40);
    assert!(a >= 8 && b >= 8, "uneven split {a}/{b}");
}

#[tokio::test]
async fn rejects_client_key_in_query() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview&api-key={CLIENT_KEY}",
        gw.url()
    );
    let (s, _, body) = send(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "401");
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn rejects_a_wrong_key_without_contacting_a_backend() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    for h in [
        vec![("api-key", "nope")],
        vec![("authorization", "Bearer nope")],
        vec![],
    ] {
        let (s, _, body) = send(Method::POST, &url, &h, chat_body(false)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(!String::from_utf8_lossy(&body).contains(&sims[0].url()));
    }
    let (s, _, _) = send(
        Method::POST,
        &url,
        &[
            ("api-key", CLIENT_KEY),
            ("content-type", "application/json"),
        ],
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the api-key header is accepted");
    assert_eq!(sims[0].request_count(), 1);
}

#[tokio::test]
async fn strips_credentials_and_hop_by_hop_headers() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let headers = with(&[
        ("api-key", CLIENT_KEY),
        ("connection", "keep-alive, x-private"),
        ("x-private", "secret-hop"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("x-custom", "kept"),
        ("host", "gateway.example"),
    ]);
    let (s, h, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &headers,
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let j = sims[0].journal();
    let e = j.last().unwrap();
    // The sim answers 200 only with its own key, so the instance key went up.
    assert_eq!(e.header("api-key"), Some("***"));
    assert_eq!(e.header("authorization"), None);
    for gone in ["x-private", "keep-alive", "proxy-connection", "te"] {
        assert_eq!(e.header(gone), None, "{gone} must not go upstream");
    }
    assert_eq!(e.header("x-custom"), Some("kept"));
    assert_eq!(e.header("host"), Some(sims[0].addr().to_string().as_str()));
    assert!(e.headers.iter().all(|(_, v)| !v.contains(CLIENT_KEY)));
    // Response: hop-by-hop gone, Azure's headers kept.
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("apim-request-id").is_some());
    assert!(h.get("x-ratelimit-remaining-requests").is_some());
}

#[tokio::test]
async fn client_key_never_goes_upstream_in_unauthenticated_mode_either() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), None).await;
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &[("authorization", "Bearer whatever-the-client-sent")],
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.header("authorization"), None);
}

#[tokio::test]
async fn keeps_the_query_string_untouched() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let q = "api-version=2025-01-01-preview&x=a%2Fb&empty=&x=2";
    let (s, _, _) = send(
        Method::POST,
        &format!(
            "{}/openai/deployments/gpt-4o/chat/completions?{q}",
            gw.url()
        ),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sims[0].journal().pop().unwrap().query.as_deref(), Some(q));
}

#[tokio::test]
async fn adds_the_openai_prefix_when_missing() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (s, _, _) = send(
        Method::POST,
        &format!(
            "{}/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview",
            gw.url()
        ),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        sims[0].journal().pop().unwrap().path,
        "/openai/deployments/gpt-4o/chat/completions"
    );
}

#[tokio::test]
async fn rewrites_the_deployment_segment_and_leaves_the_body_alone() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("ptu").deployments(&["gpt-4o-ptu"]),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"deployments":{"gpt-4o":"gpt-4o-ptu"}}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.path, "/openai/deployments/gpt-4o-ptu/chat/completions");
    assert_eq!(
        e.body_sha256,
        sha(body.as_bytes()),
        "dated paths keep the body"
    );
}

#[tokio::test]
async fn rewrites_only_the_body_model_on_v1() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("ptu").deployments(&["gpt-4o-ptu"]),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"deployments":{"gpt-4o":"gpt-4o-ptu"}}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let body = "{\n  \"messages\": [{\"role\":\"user\",\"content\":\"model: gpt-4o\"}],\n  \"model\" :  \"gpt-4o\",\n  \"temperature\": 0.50\n}";
    let expected = body.replacen("\"gpt-4o\",", "\"gpt-4o-ptu\",", 1);
    let (s, _, resp) = send(
        Method::POST,
        &format!("{}/openai/v1/chat/completions", gw.url()),
        &auth(),
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{resp:?}");
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.deployment.as_deref(), Some("gpt-4o-ptu"));
    assert_eq!(e.body_len, expected.len());
    assert_eq!(e.body_sha256, sha(expected.as_bytes()));
}

#[tokio::test]
async fn answers_deployment_not_found_without_contacting_a_backend() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("a").deployments(&["gpt-4o"]),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"deployments":["gpt-4o"]}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let (s, _, body) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("o3-mini")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "DeploymentNotFound");
    let (s, _, body) = send(
        Method::POST,
        &format!("{}/openai/v1/chat/completions", gw.url()),
        &auth(),
        r#"{"model":"o3-mini","messages":[]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "DeploymentNotFound");
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn rejects_dot_segments_and_encoded_slashes() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    for path in [
        "/openai/deployments/../../admin",
        "/openai/deployments/%2e%2e/chat/completions",
        "/openai/deployments/a%2Fb/chat/completions",
        "/openai/deployments/a%5cb/chat/completions",
        "/openai/deployments/%ff/chat/completions",
    ] {
        let (s, _, body) = send(
            Method::POST,
            &format!("{}{path}?api-version=2025-01-01-preview", gw.url()),
            &auth(),
            chat_body(false),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}");
        error_code(&body);
    }
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn rejects_malformed_json_when_routing_needs_the_model() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (s, _, body) = send(
        Method::POST,
        &format!("{}/openai/v1/chat/completions", gw.url()),
        &auth(),
        r#"{"model":"gpt-4o","messages":"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(sims[0].request_count(), 0);
    // A dated path never parses the body: the backend judges it.
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        "{not json",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(sims[0].request_count(), 1);
}

#[tokio::test]
async fn refuses_bodies_over_the_cap_with_413() {
    let sims = sims(1).await;
    let doc = config_with(&sims, serde_json::json!({"max_request_body_bytes": 1024}));
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let big = format!(r#"{{"messages":[],"pad":"{}"}}"#, "x".repeat(4096));
    let (s, _, body) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        big,
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    error_code(&body);
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn passes_201_and_204_through() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    sims[0].inject(aoai_sim::Fault::Fail {
        count: Some(1),
        status: 201,
        body: Some("created-body".into()),
        retry_after_ms: None,
    });
    let (s, _, body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(&body[..], b"created-body");
    sims[0].inject(aoai_sim::Fault::Fail {
        count: Some(1),
        status: 204,
        body: Some(String::new()),
        retry_after_ms: None,
    });
    let (s, _, body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(body.is_empty());
    assert_eq!(sims[0].request_count(), 2);
}

#[tokio::test]
async fn get_and_head_send_no_body() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}/openai/models?api-version=2025-01-01-preview", gw.url());
    let (s, _, _) = send(Method::GET, &url, &auth(), "a body that must not go up").await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, body) = send(Method::HEAD, &url, &auth(), "nor this one").await;
    assert!(body.is_empty());
    let j = sims[0].journal();
    assert_eq!(j.len(), 2);
    assert!(j.iter().all(|e| e.body_len == 0), "{j:?}");
    assert_eq!(j[1].method, "HEAD");
}

#[tokio::test]
async fn round_trips_multipart_and_binary_bodies_byte_for_byte() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    // Multipart upload with every byte value in the file part.
    let audio: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8).collect();
    let boundary = "----aoailbboundary7MA4YWxkTrZu0gW";
    let mut form = Vec::new();
    form.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    form.extend_from_slice(&audio);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut h = auth();
    h.retain(|(k, _)| *k != "content-type");
    h.push((
        "content-type",
        format!("multipart/form-data; boundary={boundary}"),
    ));
    let (s, _, resp) = send(
        Method::POST,
        &format!(
            "{}/openai/deployments/whisper/audio/transcriptions?api-version=2025-01-01-preview",
            gw.url()
        ),
        &h,
        form.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{resp:?}");
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.body_len, form.len());
    assert_eq!(e.body_sha256, sha(&form));

    // Binary response: what the gateway returns equals what the instance sends.
    let speech = r#"{"model":"tts","input":"hello there, this is a test","response_format":"wav"}"#;
    let path = "/openai/deployments/tts/audio/speech?api-version=2025-01-01-preview";
    let (s, via_gw_headers, via_gw) = send(
        Method::POST,
        &format!("{}{path}", gw.url()),
        &auth(),
        speech,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, direct) = send(
        Method::POST,
        &format!("{}{path}", sims[0].url()),
        &[("api-key", "sim-key"), ("content-type", "application/json")],
        speech,
    )
    .await;
    assert!(via_gw.len() > 1000);
    assert_eq!(sha(&via_gw), sha(&direct));
    assert_eq!(via_gw_headers["content-type"], "audio/wav");
}

#[tokio::test]
async fn carries_the_request_id_both_ways() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (_, h, _) = send(
        Method::POST,
        &url,
        &with(&[("x-ms-client-request-id", "client-id-123")]),
        chat_body(false),
    )
    .await;
    assert_eq!(h["x-aoai-lb-request-id"], "client-id-123");
    assert!(h.get("x-request-id").is_some(), "Azure's id is kept");
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.header("x-ms-client-request-id"), Some("client-id-123"));

    let (_, h, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    let id = h["x-aoai-lb-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.header("x-ms-client-request-id"), Some(id.as_str()));
}

#[tokio::test]
async fn stops_reading_a_chunked_body_at_the_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sims = sims(1).await;
    let doc = config_with(&sims, serde_json::json!({"max_request_body_bytes": 4096}));
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        chat_path("gpt-4o")
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // Keep sending without ever ending the body: the gateway must answer
    // once the cap is passed instead of waiting for the end.
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    let mut answer = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for _ in 0..64 {
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(std::time::Duration::from_millis(50), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(sims[0].request_count(), 0);
}

#[tokio::test]
async fn rejects_a_request_target_that_is_not_a_path() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let req = format!(
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(sims[0].request_count(), 0);
}
