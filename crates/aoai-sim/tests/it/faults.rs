//! Every fault, the 429 quota model, the journal and instance lifecycle, as a
//! gateway would experience them.

use crate::common;

use std::time::{Duration, Instant};

use aoai_sim::{Fault, InstanceConfig, Outcome};
use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn raw_chat(dep: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /openai/deployments/{dep}/chat/completions?{V} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn fail_fault_fails_the_next_n_requests_with_canonical_body() {
    let sim = one(InstanceConfig::new("a").fault(Fault::Fail {
        count: Some(2),
        status: 500,
        body: None,
        retry_after_ms: None,
    }))
    .await;
    let url = chat_url(&sim.url(), "d");
    for _ in 0..2 {
        let r = post_json(&url, chat_body("x")).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.text(), aoai_sim::bodies::SERVER_ERROR);
        assert!(r.header("apim-request-id").is_some());
    }
    assert_eq!(post_json(&url, chat_body("x")).await.status, StatusCode::OK);
    let j = sim.journal();
    assert_eq!(j[0].outcome, Outcome::Faulted);
    assert_eq!(j[0].fault.as_deref(), Some("fail"));
    assert_eq!(j[0].status, 500);
    assert_eq!(j[0].deployment.as_deref(), Some("d"));
    assert_eq!(j[2].outcome, Outcome::Completed);
}

#[tokio::test]
async fn injected_429_carries_retry_headers_and_azure_body() {
    let sim = one(InstanceConfig::new("a")).await;
    sim.inject(Fault::Fail {
        count: Some(1),
        status: 429,
        body: None,
        retry_after_ms: Some(1500),
    });
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("retry-after-ms"), Some("1500"));
    assert_eq!(r.header("x-ratelimit-reset-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-reset-tokens"), Some("2"));
    let v = r.json();
    assert_eq!(v["error"]["code"], "429");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("ChatCompletions_Create"), "{msg}");
    assert!(msg.contains("2024-10-21"), "{msg}");
    // Custom body and status are sent verbatim.
    sim.inject(Fault::Fail {
        count: None,
        status: 503,
        body: Some("upstream sad".into()),
        retry_after_ms: None,
    });
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text(), "upstream sad");
    sim.clear_faults();
    assert_eq!(
        post_json(&chat_url(&sim.url(), "d"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn fail_fraction_fails_about_that_share_reproducibly() {
    let run = || async {
        let sim = one(InstanceConfig::new("a").fault(Fault::FailFraction {
            fraction: 0.3,
            status: 503,
            seed: 42,
        }))
        .await;
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(
                post_json(&chat_url(&sim.url(), "d"), chat_body("x"))
                    .await
                    .status
                    .as_u16(),
            );
        }
        out
    };
    let a = run().await;
    assert_eq!(a, run().await);
    let fails = a.iter().filter(|s| **s == 503).count();
    assert!((4..=20).contains(&fails), "{fails}");
}

#[tokio::test]
async fn rate_limit_returns_429_with_retry_after_and_reset_headers() {
    let sim = one(InstanceConfig::new("a").rate_limit(12, 0)).await; // 2 per 10 s
    let url = chat_url(&sim.url(), "d");
    let r1 = post_json(&url, chat_body("x")).await;
    assert_eq!(r1.header("x-ratelimit-remaining-requests"), Some("1"));
    let r2 = post_json(&url, chat_body("x")).await;
    assert_eq!(r2.header("x-ratelimit-remaining-requests"), Some("0"));
    let r = post_json(&url, chat_body("x")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((1..=10).contains(&secs), "{secs}");
    assert!(ms > 8000 && ms <= 10_000, "{ms}");
    assert_eq!(secs, ms.div_ceil(1000));
    assert!(r.header("x-ratelimit-reset-requests").is_some());
    assert!(r.header("x-ratelimit-reset-tokens").is_some());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("call rate limit")
    );
    // Another deployment has its own quota.
    assert_eq!(
        post_json(&chat_url(&sim.url(), "e"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn token_quota_charges_prompt_estimate_plus_max_tokens() {
    let sim = one(InstanceConfig::new("a").rate_limit(0, 100)).await;
    let url = chat_url(&sim.url(), "d");
    let mut body = chat_body("abc"); // "abc\n" = 1 token
    body["max_tokens"] = json!(49);
    let r = post_json(&url, body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("50"));
    let r = post_json(&url, body.clone()).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    let r = post_json(&url, body).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token rate limit")
    );
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(secs > 50 && secs <= 60, "{secs}");
}

#[tokio::test]
async fn hang_with_duration_delays_headers_then_answers() {
    let sim = one(InstanceConfig::new("a").fault(Fault::Hang {
        count: Some(1),
        ms: Some(300),
    }))
    .await;
    let t = Instant::now();
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let t = Instant::now();
    post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn hang_forever_holds_until_the_client_leaves_and_is_journaled() {
    let sim = one(InstanceConfig::new("a").fault(Fault::Hang {
        count: None,
        ms: None,
    }))
    .await;
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(&raw_chat(
        "d",
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    ))
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(read.is_err(), "no byte may arrive while hanging");
    assert!(eventually(|| sim.request_count() == 1).await);
    assert_eq!(sim.journal()[0].outcome, Outcome::InFlight);
    drop(s);
    assert!(eventually(|| sim.journal()[0].outcome == Outcome::ClientAborted).await);
    assert!(eventually(|| sim.open_connections() == 0).await);
}

#[tokio::test]
async fn reset_before_response_sends_no_byte_and_resets() {
    let sim =
        one(InstanceConfig::new("a").fault(Fault::ResetBeforeResponse { count: Some(1) })).await;
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(&raw_chat(
        "d",
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    ))
    .await
    .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.is_empty());
    let err = r.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(sim.journal()[0].outcome, Outcome::Faulted);
    // The next request is served.
    assert_eq!(
        post_json(&chat_url(&sim.url(), "d"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn close_mid_stream_cuts_the_sse_after_k_chunks() {
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(6)
        .fault(Fault::CloseMidStream {
            count: Some(1),
            after_chunks: 3,
        }))
    .await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    let (status, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(err.is_some(), "the body must end in an error, not cleanly");
    let all: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let text = String::from_utf8(all).unwrap();
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(eventually(|| sim.journal()[0].outcome == Outcome::Faulted).await);
    // Only once.
    let (_, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), body).await;
    assert!(err.is_none());
    assert!(String::from_utf8_lossy(&frames.last().unwrap().1).contains("[DONE]"));
}

#[tokio::test]
async fn close_mid_stream_beyond_the_stream_length_still_withholds_done() {
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(2)
        .fault(Fault::CloseMidStream {
            count: Some(1),
            after_chunks: 100,
        }))
    .await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    let (_, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), body).await;
    assert!(err.is_some());
    let text: String = frames
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(text.contains("finish_reason\":\"stop"), "{text}");
}

#[tokio::test]
async fn close_mid_stream_on_a_plain_reply_sends_half_the_body() {
    let sim = one(InstanceConfig::new("a").fault(Fault::CloseMidStream {
        count: Some(1),
        after_chunks: 1,
    }))
    .await;
    let (status, headers, frames, err) =
        stream_frames(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(status, StatusCode::OK);
    let len: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
    let got: usize = frames.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(got, len / 2);
    assert!(err.is_some());
}

#[tokio::test]
async fn drip_sends_the_body_slowly_in_small_pieces() {
    let sim = one(InstanceConfig::new("a").fault(Fault::Drip {
        count: Some(1),
        bytes: 200,
        interval_ms: 40,
    }))
    .await;
    let t = Instant::now();
    let (status, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(err.is_none());
    let all: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let v: serde_json::Value = serde_json::from_slice(&all).unwrap();
    assert_eq!(v["object"], "chat.completion");
    let pieces = all.len().div_ceil(200) as u32;
    assert!(pieces >= 3);
    assert!(t.elapsed() >= Duration::from_millis(40) * (pieces - 1));
    assert_eq!(sim.journal()[0].fault.as_deref(), Some("drip"));
    assert!(eventually(|| sim.journal()[0].outcome == Outcome::Completed).await);
}

#[tokio::test]
async fn content_filter_trigger_gets_azure_400() {
    let sim = one(InstanceConfig::new("a").fault(Fault::ContentFilter {
        trigger: "forbidden".into(),
    }))
    .await;
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("a forbidden prompt")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["error"]["code"], "content_filter");
    assert_eq!(
        v["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
    assert_eq!(
        v["error"]["innererror"]["content_filter_result"]["sexual"]["filtered"],
        true
    );
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("a fine prompt")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn journal_records_requests_with_masked_secrets() {
    let sim = one(InstanceConfig::new("a")).await;
    let body = chat_body("journal me").to_string();
    let r = send(
        Method::POST,
        &chat_url(&sim.url(), "gpt-4o"),
        &[("api-key", KEY), ("x-custom", "1")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    send(
        Method::POST,
        &format!("{}/openai/v1/chat/completions", sim.url()),
        &[("authorization", "Bearer sim-key")],
        json!({"model":"m2","messages":[{"role":"user","content":"x"}]}).to_string(),
    )
    .await;
    assert_eq!(sim.request_count(), 2);
    let j = sim.journal();
    let e = &j[0];
    assert_eq!(e.method, "POST");
    assert_eq!(e.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(e.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(e.header("api-key"), Some("***"));
    assert_eq!(e.header("X-Custom"), Some("1"));
    assert_eq!(e.body_len, body.len());
    use sha2::Digest;
    assert_eq!(
        e.body_sha256,
        hex::encode(sha2::Sha256::digest(body.as_bytes()))
    );
    assert_eq!(e.deployment.as_deref(), Some("gpt-4o"));
    assert_eq!(e.status, 200);
    assert_eq!(e.outcome, Outcome::Completed);
    assert_eq!(j[1].header("authorization"), Some("Bearer ***"));
    assert_eq!(j[1].deployment.as_deref(), Some("m2"));
    assert!(j[1].seq > j[0].seq);
    let dbg = format!("{j:?}");
    assert!(!dbg.contains("sim-key"));
    sim.clear_journal();
    assert_eq!(sim.request_count(), 0);
    assert!(sim.journal().is_empty());
}

#[tokio::test]
async fn journal_ring_is_bounded() {
    let sim = one(InstanceConfig::new("a").journal_capacity(3)).await;
    for _ in 0..5 {
        post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    }
    assert_eq!(sim.request_count(), 5);
    let j = sim.journal();
    assert_eq!(j.len(), 3);
    assert_eq!(j[0].seq, 2);
}

#[tokio::test]
async fn streaming_client_that_leaves_is_journaled_as_aborted() {
    let sim = one(InstanceConfig::new("a").reply_tokens(50).latency(0, 50)).await;
    let body = r#"{"stream":true,"messages":[{"role":"user","content":"x"}]}"#;
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(&raw_chat("d", body)).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0);
    drop(s);
    assert!(eventually(|| sim.journal()[0].outcome == Outcome::ClientAborted).await);
}

#[tokio::test]
async fn stop_drops_open_connections_and_refuses_new_ones() {
    let sim = one(InstanceConfig::new("a").reply_tokens(100).latency(0, 100)).await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    let url = chat_url(&sim.url(), "d");
    let streaming = tokio::spawn(async move { stream_frames(&url, body).await });
    assert!(eventually(|| sim.open_connections() == 1).await);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    sim.stop();
    let (_, _, _, err) = streaming.await.unwrap();
    assert!(err.is_some(), "the stream must end in an error");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(tokio::net::TcpStream::connect(sim.addr()).await.is_err());
    assert!(eventually(|| sim.open_connections() == 0).await);
    assert!(eventually(|| sim.journal()[0].outcome == Outcome::Stopped).await);
    // The same address can be served again.
    let again = aoai_sim::start_on(sim.addr(), sim.config().clone().latency(0, 0))
        .await
        .unwrap();
    assert_eq!(
        post_json(&chat_url(&again.url(), "d"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn open_connections_counts_keep_alive_connections() {
    let sim = one(InstanceConfig::new("a")).await;
    let c = client();
    let req = http::Request::post(chat_url(&sim.url(), "d"))
        .header("api-key", KEY)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat_body("x").to_string(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    use http_body_util::BodyExt;
    resp.into_body().collect().await.unwrap();
    assert!(eventually(|| sim.open_connections() == 1).await);
    drop(c);
    assert!(eventually(|| sim.open_connections() == 0).await);
}

#[tokio::test]
async fn admin_routes_are_off_by_default_and_journaled_as_ordinary_requests() {
    let sim = one(InstanceConfig::new("a")).await;
    let r = send(Method::GET, &format!("{}/_sim/journal", sim.url()), &[], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(sim.request_count(), 1);
}

#[tokio::test]
async fn admin_routes_manage_faults_and_journal_without_being_journaled() {
    let sim = one(InstanceConfig::new("a").admin(true)).await;
    let admin = |m: Method, p: &'static str, b: &'static str| {
        let url = format!("{}/_sim/{p}", sim.url());
        async move { send(m, &url, &[], b).await }
    };
    let r = admin(
        Method::POST,
        "faults",
        r#"{"kind":"fail","count":2,"status":502}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let f = admin(Method::GET, "faults", "").await.json();
    assert_eq!(f[0]["kind"], "fail");
    assert_eq!(f[0]["count"], 2);
    assert_eq!(
        post_json(&chat_url(&sim.url(), "d"), chat_body("x"))
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        sim.faults()[0],
        Fault::Fail {
            count: Some(1),
            status: 502,
            body: None,
            retry_after_ms: None
        }
    );
    let j = admin(Method::GET, "journal", "").await.json();
    assert_eq!(j["request_count"], 1);
    assert_eq!(j["entries"][0]["fault"], "fail");
    assert_eq!(
        j["entries"][0]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "api-key")
            .unwrap()[1],
        "***"
    );
    assert_eq!(
        admin(Method::DELETE, "faults", "").await.status,
        StatusCode::OK
    );
    assert!(sim.faults().is_empty());
    assert_eq!(
        admin(Method::DELETE, "journal", "").await.status,
        StatusCode::OK
    );
    assert_eq!(sim.request_count(), 0);
    let r = admin(
        Method::POST,
        "faults",
        r#"{"kind":"drip","bytes":"many","interval_ms":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("bytes"), "{}", r.text());
    assert_eq!(sim.request_count(), 0);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let body = r#"{"messages":[{"role":"user","content":"x"}]}"#;
    let sim = one(InstanceConfig::new("a").idle_timeout(200)).await;
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(&raw_chat("d", body)).await.unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the idle connection must be closed")
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    assert!(eventually(|| sim.open_connections() == 0).await);

    // Without the setting, an idle connection stays open.
    let sim = one(InstanceConfig::new("b")).await;
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(&raw_chat("d", body)).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0);
    let more = tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await;
    assert!(more.is_err(), "the connection stayed open and silent");
}
