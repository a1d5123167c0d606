//! Token usage as a client sees it and as the ledger records it: real tokenizer
//! counts, reasoning and cached tokens, `n` choices, the `include_usage` chunk
//! and its api-version gate, Responses usage, and what a cut stream costs.
// Helpers fail loudly: a broken helper is a failed test.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use aoai_sim::{Fault, InstanceConfig, Usage};
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn usage_of(v: &Value) -> (u64, u64, u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
    )
}

fn events(text: &str) -> Vec<Value> {
    text.split_terminator("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn ledger_records_exactly_the_usage_each_reply_reports() {
    let sim = one(InstanceConfig::new("a").reply_tokens(6)).await;
    let url = chat_url(&sim.url(), "gpt-4o");
    let mut want = Usage::default();
    for prompt in ["one", "a somewhat longer prompt, with punctuation!"] {
        let v = post_json(&url, chat_body(prompt)).await.json();
        let (p, c, cached, r) = usage_of(&v);
        want.requests += 1;
        want.prompt_tokens += p;
        want.completion_tokens += c;
        want.cached_tokens += cached;
        want.reasoning_tokens += r;
    }
    let emb = post_json(
        &format!("{}/openai/deployments/emb/embeddings?{V}", sim.url()),
        json!({"input": ["hello world", "again"]}),
    )
    .await
    .json();
    assert_eq!(emb["usage"]["prompt_tokens"], 3);
    let report = sim.usage();
    assert_eq!(report.instance, "a");
    assert_eq!(report.deployment("gpt-4o"), want);
    assert_eq!(
        report.deployment("emb"),
        Usage {
            requests: 1,
            prompt_tokens: 3,
            ..Usage::default()
        }
    );
    assert_eq!(report.total.requests, 3);
    sim.clear_usage();
    assert_eq!(sim.usage().total, Usage::default());
}

#[tokio::test]
async fn n_choices_multiply_completion_tokens_in_bodies_streams_and_the_ledger() {
    let sim = one(InstanceConfig::new("a").reply_tokens(4)).await;
    let url = chat_url(&sim.url(), "d");
    let mut body = chat_body("hi");
    body["n"] = json!(2);
    let v = post_json(&url, body.clone()).await.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let evs = events(&post_json(&url, body).await.text());
    let mut text = [String::new(), String::new()];
    for e in &evs {
        for c in e["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text[c["index"].as_u64().unwrap() as usize].push_str(t);
            }
        }
    }
    assert_eq!(text[0], "This is a simulated");
    assert_eq!(text[1], text[0]);
    let last = evs.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);
    assert!(eventually(|| sim.usage().deployment("d").completion_tokens == 16).await);
}

#[tokio::test]
async fn reasoning_models_spend_hidden_tokens_that_never_appear_as_text() {
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(5)
        .deployment_model("think", "o3-mini")
        .deployment_reasoning_tokens("think", 20))
    .await;
    let url = chat_url(&sim.url(), "think");
    let v = post_json(&url, chat_body("why?")).await.json();
    assert_eq!(v["model"], "o3-mini");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "This is a simulated reply"
    );
    let (_, completion, _, reasoning) = usage_of(&v);
    assert_eq!((completion, reasoning), (25, 20));
    // The budget pays for reasoning first: 22 leaves 2 visible tokens.
    let mut body = chat_body("why?");
    body["max_completion_tokens"] = json!(22);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let evs = events(&post_json(&url, body).await.text());
    let text: String = evs
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "This is");
    assert!(
        evs.iter()
            .any(|e| e["choices"][0]["finish_reason"] == "length")
    );
    let u = &evs.last().unwrap()["usage"];
    assert_eq!(u["completion_tokens"], 22);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 20);
    // Non-reasoning models spend none.
    let v = post_json(&chat_url(&sim.url(), "gpt-4o"), chat_body("why?"))
        .await
        .json();
    assert_eq!(usage_of(&v).3, 0);
    assert!(
        eventually(|| {
            let u = sim.usage().deployment("think");
            u.reasoning_tokens == 40 && u.completion_tokens == 47
        })
        .await
    );
}

#[tokio::test]
async fn a_repeated_long_prompt_reports_cached_tokens_in_steps_of_128() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = chat_url(&sim.url(), "gpt-4o");
    // " word" is one token: 1300 of them make a prompt well past 1024 tokens.
    let long = " word".repeat(1300);
    let first = post_json(&url, chat_body(&long)).await.json();
    let (prompt, _, cached, _) = usage_of(&first);
    assert_eq!(prompt, 3 + 1 + 1300 + 3);
    assert_eq!(cached, 0);
    let second = post_json(&url, chat_body(&long)).await.json();
    let (_, _, cached, _) = usage_of(&second);
    // The longest 1024 + 128k prefix that fits in 1307 tokens.
    assert_eq!(cached, 1280);
    assert_eq!(sim.usage().deployment("gpt-4o").cached_tokens, 1280);
    // Switched off, nothing is cached.
    let off = one(InstanceConfig::new("b").prompt_cache(false)).await;
    let url = chat_url(&off.url(), "gpt-4o");
    post_json(&url, chat_body(&long)).await;
    assert_eq!(
        usage_of(&post_json(&url, chat_body(&long)).await.json()).2,
        0
    );
}

#[tokio::test]
async fn stream_options_on_an_api_version_before_2024_09_01_preview_is_a_400() {
    let sim = one(InstanceConfig::new("a")).await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    for version in ["2024-06-01", "2024-08-01-preview", "2024-05-01-preview"] {
        let url = format!(
            "{}/openai/deployments/d/chat/completions?api-version={version}",
            sim.url()
        );
        let r = post_json(&url, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{version}");
        assert_eq!(r.text(), aoai_sim::bodies::UNRECOGNIZED_STREAM_OPTIONS);
        // Completions follow the same rule.
        let url = url.replace("/chat/completions", "/completions");
        let r = post_json(
            &url,
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{version}");
    }
    for version in ["2024-09-01-preview", "2024-10-21", "2025-04-01-preview"] {
        let url = format!(
            "{}/openai/deployments/d/chat/completions?api-version={version}",
            sim.url()
        );
        assert_eq!(
            post_json(&url, body.clone()).await.status,
            StatusCode::OK,
            "{version}"
        );
    }
    let mut v1 = body.clone();
    v1["model"] = json!("d");
    let r = post_json(&format!("{}/openai/v1/chat/completions", sim.url()), v1).await;
    assert_eq!(r.status, StatusCode::OK);
    // The same old version without stream_options streams normally, without usage.
    let url = format!(
        "{}/openai/deployments/d/chat/completions?api-version=2024-06-01",
        sim.url()
    );
    let mut plain = chat_body("x");
    plain["stream"] = json!(true);
    let r = post_json(&url, plain).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(events(&r.text()).iter().all(|e| e["usage"].is_null()));
    // Only the five streams that were served count; the 400s cost nothing.
    assert!(eventually(|| sim.usage().deployment("d").requests == 5).await);
    assert_eq!(sim.usage().deployment("d").throttled, 0);
}

#[tokio::test]
async fn a_stream_without_include_usage_is_still_recorded_in_full() {
    let sim = one(InstanceConfig::new("a").reply_tokens(7)).await;
    let mut body = chat_body("hello");
    body["stream"] = json!(true);
    let text = post_json(&chat_url(&sim.url(), "d"), body).await.text();
    assert!(events(&text).iter().all(|e| e["usage"].is_null()));
    assert!(
        eventually(|| sim.usage().deployment("d")
            == Usage {
                requests: 1,
                prompt_tokens: 8,
                completion_tokens: 7,
                ..Usage::default()
            })
        .await
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_billed_for_the_tokens_sent_so_far() {
    let sim = one(InstanceConfig::new("a").reply_tokens(50).latency(0, 40)).await;
    let body = r#"{"messages":[{"role":"user","content":"hello"}],"stream":true}"#;
    let req = format!(
        "POST /openai/deployments/d/chat/completions?{V} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    // Read until at least three content chunks arrived, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got)
        .matches("\"delta\":{\"content\":\"")
        .count()
        < 4
    {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // The role chunk has "content":"" too; every other one is a token.
    assert!(eventually(|| sim.journal()[0].outcome == aoai_sim::Outcome::ClientAborted).await);
    let u = sim.usage().deployment("d");
    assert_eq!(u.requests, 1);
    assert_eq!(u.prompt_tokens, 8);
    assert!(
        (3..50).contains(&u.completion_tokens),
        "billed {} of 50",
        u.completion_tokens
    );
}

#[tokio::test]
async fn a_stream_cut_by_a_fault_is_billed_for_the_chunks_it_sent() {
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(10)
        .fault(Fault::CloseMidStream {
            count: Some(1),
            after_chunks: 5,
        }))
    .await;
    let mut body = chat_body("hello");
    body["stream"] = json!(true);
    let (_, _, frames, err) = stream_frames(&chat_url(&sim.url(), "d"), body).await;
    assert!(err.is_some());
    // Prompt annotation, role chunk, then 3 content chunks.
    assert_eq!(frames.len(), 5);
    assert!(eventually(|| sim.usage().deployment("d").completion_tokens == 3).await);
    assert_eq!(sim.usage().deployment("d").prompt_tokens, 8);
}

#[tokio::test]
async fn responses_report_framed_input_tokens_in_the_body_and_in_response_completed() {
    let sim = one(InstanceConfig::new("a").reply_tokens(6)).await;
    let url = format!("{}/openai/v1/responses", sim.url());
    let v = post_json(
        &url,
        json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "hello"}),
    )
    .await
    .json();
    // system message: 3 + "system" (1) + "Be brief." (3); user: 3 + 1 + 1; priming 3.
    assert_eq!(v["usage"]["input_tokens"], 15);
    assert_eq!(v["usage"]["output_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 21);
    let r = post_json(
        &url,
        json!({"model": "gpt-4o", "input": [{"role": "user", "content": "hello"}], "stream": true}),
    )
    .await;
    let text = r.text();
    let completed = text
        .split("\n\n")
        .find(|e| e.starts_with("event: response.completed"))
        .unwrap();
    let data: Value = serde_json::from_str(completed.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["response"]["usage"]["input_tokens"], 8);
    assert_eq!(data["response"]["usage"]["output_tokens"], 6);
    assert!(
        eventually(|| sim.usage().deployment("gpt-4o")
            == Usage {
                requests: 2,
                prompt_tokens: 23,
                completion_tokens: 12,
                ..Usage::default()
            })
        .await
    );
}

#[tokio::test]
async fn usage_ledger_is_served_on_the_admin_surface() {
    let sim = one(InstanceConfig::new("east").admin(true).reply_tokens(3)).await;
    post_json(&chat_url(&sim.url(), "gpt-4o"), chat_body("hello")).await;
    let r = send(Method::GET, &format!("{}/_sim/usage", sim.url()), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["instance"], "east");
    assert_eq!(
        v["deployments"]["gpt-4o"],
        json!({"requests": 1, "prompt_tokens": 8, "completion_tokens": 3, "cached_tokens": 0, "reasoning_tokens": 0, "throttled": 0})
    );
    assert_eq!(v["total"]["prompt_tokens"], 8);
    let back: aoai_sim::UsageReport = serde_json::from_value(v).unwrap();
    assert_eq!(back, sim.usage());
    let r = send(
        Method::DELETE,
        &format!("{}/_sim/usage", sim.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.usage().total, Usage::default());
}

#[tokio::test]
async fn ledgers_of_a_fleet_merge_per_deployment() {
    let sims = aoai_sim::start(vec![
        InstanceConfig::new("a").reply_tokens(2),
        InstanceConfig::new("b").reply_tokens(3),
    ])
    .await
    .unwrap();
    for s in &sims {
        post_json(&chat_url(&s.url(), "d"), chat_body("hello")).await;
    }
    let all = aoai_sim::UsageReport::merged(&sims.iter().map(|s| s.usage()).collect::<Vec<_>>());
    assert_eq!(all.deployment("d").requests, 2);
    assert_eq!(all.deployment("d").completion_tokens, 5);
    assert_eq!(all.deployment("d").prompt_tokens, 16);
}
