//! Chat, completions and embeddings as a client sees them: shapes, SSE framing
//! byte for byte, latency, Azure's routing rules and common headers.

use crate::common;

use std::time::Duration;

use aoai_sim::InstanceConfig;
use common::*;
use http::{Method, StatusCode};
use serde_json::json;

const SAFE: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

#[tokio::test]
async fn non_streaming_chat_returns_a_chat_completion_with_usage() {
    let sim = one(InstanceConfig::new("a").reply_tokens(5)).await;
    let r = post_json(
        &chat_url(&sim.url(), "gpt-4o"),
        chat_body("hello there, sim"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "This is a simulated reply"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // o200k_base: 3 per message + "user" (1) + "hello there, sim" (4) + 3 priming.
    assert_eq!(v["usage"]["prompt_tokens"], 11);
    assert_eq!(v["usage"]["total_tokens"], 16);
    assert_eq!(
        v["prompt_filter_results"][0]["content_filter_results"],
        serde_json::from_str::<serde_json::Value>(SAFE).unwrap()
    );
}

#[tokio::test]
async fn max_tokens_below_reply_length_stops_with_length() {
    let sim = one(InstanceConfig::new("a").reply_tokens(8)).await;
    let mut body = chat_body("hi");
    body["max_tokens"] = json!(3);
    body["n"] = json!(2);
    let v = post_json(&chat_url(&sim.url(), "d"), body).await.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn every_response_carries_azure_common_headers() {
    let sim = one(InstanceConfig::new("a").region("Sweden Central")).await;
    let r = send(
        Method::POST,
        &chat_url(&sim.url(), "d"),
        &[("api-key", KEY), ("x-ms-client-request-id", "abc-123")],
        chat_body("x").to_string(),
    )
    .await;
    for h in [
        "apim-request-id",
        "x-request-id",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(r.header(h).is_some(), "missing {h}");
    }
    assert_eq!(r.header("x-ms-region"), Some("Sweden Central"));
    assert_eq!(r.header("x-ms-client-request-id"), Some("abc-123"));
    assert_eq!(r.header("x-aoai-sim-instance"), Some("a"));
    // Errors carry them too.
    let r = send(Method::POST, &chat_url(&sim.url(), "d"), &[], "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("apim-request-id").is_some());
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());
}

#[tokio::test]
async fn streaming_chat_is_framed_exactly_as_azure_sends_it() {
    let sim = one(InstanceConfig::new("a").reply_tokens(3)).await;
    let mut body = chat_body("hello");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post_json(&chat_url(&sim.url(), "gpt-4o"), body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert!(r.header("content-length").is_none());
    let text = r.text();
    // Ids and timestamps are random; read them from the first content chunk.
    let second = text.split("\n\n").nth(1).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(second.strip_prefix("data: ").unwrap()).unwrap();
    let id = v["id"].as_str().unwrap();
    let created = v["created"].as_u64().unwrap();
    // Azure's key order: choices, created, id, model, object, system_fingerprint, usage.
    let chunk = |choices: &str, usage: &str| {
        format!(
            "data: {{\"choices\":[{choices}],\"created\":{created},\"id\":\"{id}\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_sim\",\"usage\":{usage}}}\n\n"
        )
    };
    let mut expected = String::new();
    expected.push_str(&format!(
        "data: {{\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"prompt_filter_results\":[{{\"prompt_index\":0,\"content_filter_results\":{SAFE}}}],\"choices\":[],\"usage\":null}}\n\n"
    ));
    expected.push_str(&chunk(
        r#"{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}"#,
        "null",
    ));
    for word in ["This", " is", " a"] {
        expected.push_str(&chunk(
            &format!(
                r#"{{"content_filter_results":{SAFE},"delta":{{"content":"{word}"}},"finish_reason":null,"index":0,"logprobs":null}}"#
            ),
            "null",
        ));
    }
    expected.push_str(&chunk(
        r#"{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,"logprobs":null}"#,
        "null",
    ));
    // The usage chunk: "choices":[] and the usage of the whole request;
    // prompt: 3 + "user" (1) + "hello" (1) + 3 = 8 tokens in o200k_base.
    expected.push_str(&chunk(
        "",
        r#"{"completion_tokens":3,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":8,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":11}"#,
    ));
    expected.push_str("data: [DONE]\n\n");
    assert_eq!(text, expected);
}

#[tokio::test]
async fn streaming_without_include_usage_has_no_usage_chunk() {
    let sim = one(InstanceConfig::new("a").reply_tokens(2)).await;
    let mut body = chat_body("hello");
    body["stream"] = json!(true);
    let text = post_json(&chat_url(&sim.url(), "d"), body).await.text();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    // filter, role, 2 tokens, finish, DONE
    assert_eq!(events.len(), 6, "{text}");
    assert_eq!(events[5], "data: [DONE]");
    for e in &events[..5] {
        let v: serde_json::Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert!(v["usage"].is_null());
        assert!(v.get("usage").is_some(), "every chunk carries usage:null");
    }
}

#[tokio::test]
async fn stream_chunks_are_spaced_by_the_latency_model() {
    let sim = one(InstanceConfig::new("a").reply_tokens(4).latency(150, 60)).await;
    let mut body = chat_body("hello");
    body["stream"] = json!(true);
    let started = std::time::Instant::now();
    let (status, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(err.is_none(), "{err:?}");
    // prompt filter, role, 4 tokens, finish, DONE: each its own chunk.
    assert_eq!(frames.len(), 8);
    // Token k (1-based) leaves no earlier than ttft + k * per_token; delays are
    // relative to the previous chunk, so these lower bounds hold under any load.
    for k in 1..=4u32 {
        let at = frames[1 + k as usize].0.duration_since(started);
        let due = Duration::from_millis(150 + 60 * u64::from(k));
        assert!(at >= due, "token {k} at {at:?}, due {due:?}");
    }
    // Headers and the prompt annotation wait for the first token's ttft only.
    let first = frames[0].0.duration_since(started);
    assert!(first >= Duration::from_millis(150), "{first:?}");
}

#[tokio::test]
async fn non_streaming_reply_takes_ttft_plus_every_token() {
    let sim = one(InstanceConfig::new("a").reply_tokens(5).latency(100, 20)).await;
    let t = std::time::Instant::now();
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::OK);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
}

#[tokio::test]
async fn missing_api_version_is_404_resource_not_found() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = format!("{}/openai/deployments/d/chat/completions", sim.url());
    let r = post_json(&url, chat_body("x")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"404","message":"Resource not found"}}"#
    );
    // ... but optional on v1.
    let r = post_json(
        &format!("{}/openai/v1/chat/completions", sim.url()),
        json!({"model":"d","messages":[{"role":"user","content":"x"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["model"], "d");
}

#[tokio::test]
async fn unknown_paths_are_resource_not_found() {
    let sim = one(InstanceConfig::new("a")).await;
    for path in ["/", "/openai/deployments/d/nope", "/openai/v1/nope"] {
        let r = post_json(&format!("{}{path}?{V}", sim.url()), json!({})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn unserved_deployment_is_404_deployment_not_found() {
    let sim = one(InstanceConfig::new("a").deployments(&["gpt-4o"])).await;
    let r = post_json(&chat_url(&sim.url(), "gpt-35"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    assert_eq!(r.text(), aoai_sim::bodies::DEPLOYMENT_NOT_FOUND,);
    let r = post_json(
        &format!("{}/openai/v1/chat/completions", sim.url()),
        json!({"model":"gpt-35","messages":[{"role":"user","content":"x"}]}),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    let r = post_json(&chat_url(&sim.url(), "gpt-4o"), chat_body("x")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_with_azure_body() {
    let sim = one(InstanceConfig::new("a").api_key("k1")).await;
    let url = chat_url(&sim.url(), "d");
    for headers in [
        vec![],
        vec![("api-key", "nope")],
        vec![("authorization", "Bearer nope")],
    ] {
        let r = send(Method::POST, &url, &headers, chat_body("x").to_string()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.text(), aoai_sim::bodies::UNAUTHORIZED);
    }
    for headers in [
        vec![("api-key", "k1")],
        vec![("authorization", "Bearer k1")],
    ] {
        let r = send(Method::POST, &url, &headers, chat_body("x").to_string()).await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn invalid_json_is_400() {
    let sim = one(InstanceConfig::new("a")).await;
    let r = send(
        Method::POST,
        &chat_url(&sim.url(), "d"),
        &[("api-key", KEY)],
        "{not json",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"]["message"].is_string());
    let r = post_json(&chat_url(&sim.url(), "d"), json!({"messages": []})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn completions_return_text_completion() {
    let sim = one(InstanceConfig::new("a").reply_tokens(4)).await;
    let url = format!("{}/openai/deployments/d/completions?{V}", sim.url());
    let v = post_json(&url, json!({"prompt":"Say this", "max_tokens": 10}))
        .await
        .json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "This is a simulated");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let r = post_json(&url, json!({"prompt":"Say this", "stream": true})).await;
    let text = r.text();
    assert!(text.starts_with("data: {\"id\":\"\",\"object\":\"\""));
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(text.contains("\"object\":\"text_completion\""));
}

#[tokio::test]
async fn embeddings_are_deterministic_and_honour_dimensions() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = format!("{}/openai/deployments/emb/embeddings?{V}", sim.url());
    let a = post_json(&url, json!({"input":"hello"})).await.json();
    let b = post_json(&url, json!({"input":"hello"})).await.json();
    assert_eq!(a["data"][0]["embedding"], b["data"][0]["embedding"]);
    assert_eq!(a["object"], "list");
    assert_eq!(a["data"][0]["object"], "embedding");
    assert_eq!(a["data"][0]["embedding"].as_array().unwrap().len(), 1536);
    // "hello" is one token; embeddings have no framing.
    assert_eq!(a["usage"]["prompt_tokens"], 1);
    let c = post_json(&url, json!({"input":["hello","world"], "dimensions": 256}))
        .await
        .json();
    assert_eq!(c["data"].as_array().unwrap().len(), 2);
    assert_eq!(c["data"][1]["index"], 1);
    assert_eq!(c["data"][0]["embedding"].as_array().unwrap().len(), 256);
    assert_ne!(c["data"][0]["embedding"], c["data"][1]["embedding"]);
    let d = post_json(
        &url,
        json!({"input":"hello", "dimensions": 4, "encoding_format":"base64"}),
    )
    .await
    .json();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(d["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 16);
    let first = f32::from_le_bytes(raw[..4].try_into().unwrap());
    assert_eq!(first, aoai_sim::embedding_vector(b"hello", 4)[0]);
    let bad = post_json(&url, json!({"input": 5})).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn jitter_moves_delays_within_the_configured_band() {
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(1)
        .latency(60, 0)
        .jitter(80, 7))
    .await;
    let mut took = Vec::new();
    for _ in 0..6 {
        let t = std::time::Instant::now();
        post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
        took.push(t.elapsed().as_millis() as i64);
    }
    // 60 ms +-80% is [12, 108] ms; a sleep is never shorter than asked.
    assert!(took.iter().all(|t| *t >= 12), "{took:?}");
    assert!(took.iter().any(|t| (t - 60).abs() > 5), "{took:?}");
}

#[tokio::test]
async fn per_deployment_overrides_apply_to_that_deployment_only() {
    let sim = one(InstanceConfig::new("a")
        .deployment_latency("slow", 300, 0)
        .deployment_rate_limit("tight", 6, 0))
    .await;
    let t = std::time::Instant::now();
    post_json(&chat_url(&sim.url(), "fast"), chat_body("x")).await;
    assert!(t.elapsed() < Duration::from_millis(250));
    let t = std::time::Instant::now();
    post_json(&chat_url(&sim.url(), "slow"), chat_body("x")).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        post_json(&chat_url(&sim.url(), "tight"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post_json(&chat_url(&sim.url(), "tight"), chat_body("x"))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        post_json(&chat_url(&sim.url(), "fast"), chat_body("x"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn remaining_quota_headers_reflect_the_quota_on_every_response() {
    let sim = one(InstanceConfig::new("a").rate_limit(600, 1000)).await;
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("abcd")).await; // 1 + 8 tokens
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("99"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("991"));
    // A response that costs nothing still reports what is left.
    let r = send(
        Method::GET,
        &format!("{}/openai/models?{V}", sim.url()),
        &[("api-key", KEY)],
        "",
    )
    .await;
    assert_eq!(
        r.header("x-ratelimit-remaining-requests"),
        Some(aoai_sim::UNLIMITED_REMAINING_REQUESTS.to_string().as_str())
    );
    // Without a quota the figures are the documented "unlimited" ones.
    let free = one(InstanceConfig::new("b")).await;
    let r = post_json(&chat_url(&free.url(), "d"), chat_body("x")).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("10000000"));
}
