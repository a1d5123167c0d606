//! Token accounting against the simulator's own ledger: for every case,
//! `aoai_lb_tokens_total` equals what the instances report having produced.
//!
//! Each test uses its own instances (unique names) and deployments, so the
//! process-wide metrics recorder can be shared by tests running at once:
//! every figure is read for that test's instance and deployment labels.
//!
//! Estimated figures (old api-version, a client leaving mid-stream) are
//! compared within a stated tolerance; the simulator and the gateway count
//! with the same tokenizers and the same chat framing, and every reply word
//! of the simulator is one token, so in these cases the estimate is exact
//! except for what was in flight when a stream was cut.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_sim::{Fault, InstanceConfig, SimHandle};
use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

/// Sum of `aoai_lb_tokens_total` over the series with these labels.
fn tokens(text: &str, instance: &str, deployment: &str, kind: &str, source: &str) -> u64 {
    let want = [
        format!("instance=\"{instance}\""),
        format!("deployment=\"{deployment}\""),
        format!("kind=\"{kind}\""),
        format!("source=\"{source}\""),
    ];
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    metric_sum(text, "aoai_lb_tokens_total", &want) as u64
}

/// The four kinds the gateway counted for (instance, deployment), from one
/// source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counted {
    prompt: u64,
    completion: u64,
    cached: u64,
    reasoning: u64,
}

fn counted(text: &str, instance: &str, deployment: &str, source: &str) -> Counted {
    Counted {
        prompt: tokens(text, instance, deployment, "prompt", source),
        completion: tokens(text, instance, deployment, "completion", source),
        cached: tokens(text, instance, deployment, "cached", source),
        reasoning: tokens(text, instance, deployment, "reasoning", source),
    }
}

fn ledger(sim: &SimHandle, deployment: &str) -> Counted {
    let u = sim.usage().deployment(deployment);
    Counted {
        prompt: u.prompt_tokens,
        completion: u.completion_tokens,
        cached: u.cached_tokens,
        reasoning: u.reasoning_tokens,
    }
}

/// Instances named `{test}-{i}`.
async fn named_sims(test: &str, n: usize) -> Vec<SimHandle> {
    start_sims(
        (0..n)
            .map(|i| InstanceConfig::new(format!("{test}-{i}")))
            .collect(),
    )
    .await
}

/// Waits (bounded) until the gateway's figures for `instance` stop
/// changing: the access phase runs when the body ends, a moment after the
/// client has read it.
async fn settled(gw: &TestGateway, instance: &str, deployment: &str, source: &str) -> Counted {
    let mut last = None;
    for _ in 0..50 {
        let c = counted(&gw.metrics().await, instance, deployment, source);
        if last == Some(c) && c != Counted::default() {
            return c;
        }
        last = Some(c);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    last.unwrap_or_default()
}

fn dated(deployment: &str, op: &str, api_version: &str) -> String {
    format!("/openai/deployments/{deployment}/{op}?api-version={api_version}")
}

const NEW: &str = "2024-10-21";
const OLD: &str = "2024-06-01";

fn chat(stream: bool, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Count the tokens of this sentence, please."}
        ],
        "max_tokens": 40,
        "stream": stream,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v.to_string()
}

#[tokio::test]
async fn non_streamed_chat_counts_exactly_what_the_instance_reports() {
    let sims = start_sims(vec![
        InstanceConfig::new("nonstream-0").deployment_model("o3-mini-ns", "o3-mini"),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    for dep in ["gpt-4o-ns", "o3-mini-ns"] {
        for n in [1, 2] {
            let url = format!("{}{}", gw.url(), dated(dep, "chat/completions", NEW));
            let body = chat(false, serde_json::json!({"n": n}));
            let (s, _, _) = send(Method::POST, &url, &auth(), body).await;
            assert_eq!(s, StatusCode::OK);
        }
        let got = settled(&gw, "nonstream-0", dep, "reported").await;
        let want = ledger(&sims[0], dep);
        assert_eq!(got, want, "{dep}");
        assert!(want.prompt > 0 && want.completion > 0);
    }
    let text = gw.metrics().await;
    assert!(
        ledger(&sims[0], "o3-mini-ns").reasoning > 0,
        "a reasoning model spends reasoning tokens"
    );
    assert_eq!(
        counted(&text, "nonstream-0", "gpt-4o-ns", "estimated"),
        Counted::default()
    );
}

#[tokio::test]
async fn cached_prompt_tokens_are_counted() {
    let sims = start_sims(vec![InstanceConfig::new("cached-0").prompt_cache(true)]).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let body = serde_json::json!({
        "messages": [{"role": "system", "content": long}, {"role": "user", "content": "hi"}],
        "max_tokens": 8,
    })
    .to_string();
    let url = format!(
        "{}{}",
        gw.url(),
        dated("gpt-4o-cache", "chat/completions", NEW)
    );
    for _ in 0..2 {
        let (s, _, _) = send(Method::POST, &url, &auth(), body.clone()).await;
        assert_eq!(s, StatusCode::OK);
    }
    let want = ledger(&sims[0], "gpt-4o-cache");
    assert!(want.cached > 0, "the second request hits the prompt cache");
    assert_eq!(
        settled(&gw, "cached-0", "gpt-4o-cache", "reported").await,
        want
    );
}

#[tokio::test]
async fn streams_count_exactly_whether_the_client_or_the_gateway_asked_for_usage() {
    let sims = named_sims("streams", 1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let cases = [
        (
            "gpt-4o-asked",
            serde_json::json!({"stream_options": {"include_usage": true}}),
        ),
        ("gpt-4o-injected", serde_json::json!({})),
        ("gpt-4o-injected-n2", serde_json::json!({"n": 2})),
    ];
    for (dep, extra) in cases {
        let url = format!("{}{}", gw.url(), dated(dep, "chat/completions", NEW));
        let asked = extra.get("stream_options").is_some();
        let r = send_stream(Method::POST, &url, &auth(), chat(true, extra)).await;
        assert_eq!(r.status, StatusCode::OK);
        let data = r.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let usage_chunks = data.iter().filter(|d| d.contains("\"usage\":{")).count();
        assert_eq!(
            usage_chunks,
            usize::from(asked),
            "{dep}: usage chunk only when asked"
        );
        let got = settled(&gw, "streams-0", dep, "reported").await;
        assert_eq!(got, ledger(&sims[0], dep), "{dep}");
    }
}

#[tokio::test]
async fn an_injected_stream_gives_the_client_the_bytes_the_instance_sends_without_usage() {
    let sims = named_sims("bytes", 1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let path = dated("gpt-4o-bytes", "chat/completions", NEW);
    let body = chat(true, serde_json::json!({"n": 2}));
    let through = send_stream(
        Method::POST,
        &format!("{}{path}", gw.url()),
        &auth(),
        body.clone(),
    )
    .await;
    // The gateway's figures before the same request goes to the instance
    // directly (its ledger then counts both).
    let got = settled(&gw, "bytes-0", "gpt-4o-bytes", "reported").await;
    assert_eq!(got, ledger(&sims[0], "gpt-4o-bytes"));
    let direct = send_stream(
        Method::POST,
        &format!("{}{path}", sims[0].url()),
        &[
            ("api-key", sims[0].config().api_key.as_str()),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(through.status, StatusCode::OK);
    assert_eq!(direct.status, StatusCode::OK);
    // Ids and timestamps differ between two requests; every other byte is
    // the same.
    let norm = |b: &[u8]| {
        let s = String::from_utf8(b.to_vec()).unwrap();
        let id = s
            .split("\"id\":\"")
            .nth(2)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_owned();
        let mut out = s.replace(&id, "ID");
        while let Some(at) = out.find("\"created\":") {
            let end = at + 10 + out[at + 10..].find(|c: char| !c.is_ascii_digit()).unwrap();
            out.replace_range(at..end, "\"created\"=0");
        }
        out
    };
    assert_eq!(norm(&through.body()), norm(&direct.body()));
    assert!(!String::from_utf8_lossy(&through.body()).contains("\"usage\":{"));
}

#[tokio::test]
async fn an_old_api_version_stream_is_estimated_and_sends_no_stream_options() {
    let sims = named_sims("old", 1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!(
        "{}{}",
        gw.url(),
        dated("gpt-4o-old", "chat/completions", OLD)
    );
    let r = send_stream(
        Method::POST,
        &url,
        &auth(),
        chat(true, serde_json::json!({"n": 2})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "no stream_options went to an api-version that refuses it"
    );
    let got = settled(&gw, "old-0", "gpt-4o-old", "estimated").await;
    let want = ledger(&sims[0], "gpt-4o-old");
    // Same tokenizer and framing as the simulator: exact here (the stated
    // tolerance for estimates is 2%).
    assert_eq!((got.prompt, got.completion), (want.prompt, want.completion));
    assert_eq!(
        counted(&gw.metrics().await, "old-0", "gpt-4o-old", "reported"),
        Counted::default()
    );
}

#[tokio::test]
async fn embeddings_and_responses_count_exactly() {
    let sims = named_sims("emb", 1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!(
        "{}{}",
        gw.url(),
        dated("text-embedding-3-small", "embeddings", NEW)
    );
    let (s, _, _) = send(
        Method::POST,
        &url,
        &auth(),
        r#"{"input":["hello world","counting tokens exactly"]}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let got = settled(&gw, "emb-0", "text-embedding-3-small", "reported").await;
    assert_eq!(got, ledger(&sims[0], "text-embedding-3-small"));

    let url = format!("{}/openai/v1/responses", gw.url());
    for stream in [false, true] {
        let body = serde_json::json!({
            "model": "gpt-4o-resp",
            "instructions": "Be brief.",
            "input": "Say something about tokens.",
            "stream": stream,
        })
        .to_string();
        let r = send_stream(Method::POST, &url, &auth(), body).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let got = settled(&gw, "emb-0", "gpt-4o-resp", "reported").await;
    assert_eq!(got, ledger(&sims[0], "gpt-4o-resp"));
}

#[tokio::test]
async fn a_throttled_attempt_that_failed_over_costs_nothing() {
    let sims = named_sims("failover", 2).await;
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 429,
        body: None,
        retry_after_ms: Some(60_000),
    });
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"priority":1},{"priority":2}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!(
        "{}{}",
        gw.url(),
        dated("gpt-4o-fo", "chat/completions", NEW)
    );
    let r = send_stream(
        Method::POST,
        &url,
        &auth(),
        chat(true, serde_json::json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = settled(&gw, "failover-1", "gpt-4o-fo", "reported").await;
    assert_eq!(got, ledger(&sims[1], "gpt-4o-fo"));
    let text = gw.metrics().await;
    for source in ["reported", "estimated"] {
        assert_eq!(
            counted(&text, "failover-0", "gpt-4o-fo", source),
            Counted::default()
        );
    }
    assert_eq!(ledger(&sims[0], "gpt-4o-fo"), Counted::default());
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_charged_an_estimate_of_what_was_streamed() {
    let sims = start_sims(vec![
        InstanceConfig::new("leave-0")
            .latency(0, 20)
            .reply_tokens(200),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!(
        "{}{}",
        gw.url(),
        dated("gpt-4o-leave", "chat/completions", NEW)
    );
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
            true,
            serde_json::json!({"max_tokens": 200}),
        ))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut seen = 0;
    while seen < 10 {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(d) = f.into_data() {
            seen += String::from_utf8_lossy(&d)
                .matches("\"content\":\"")
                .count();
        }
    }
    drop(body);
    // The instance notices the cancelled request and stops counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = settled(&gw, "leave-0", "gpt-4o-leave", "estimated").await;
    let want = ledger(&sims[0], "gpt-4o-leave");
    assert_eq!(got.prompt, want.prompt);
    assert!(want.completion < 200, "the stream was cut: {want:?}");
    // What was in flight between the instance and the gateway when the
    // client left: at most a couple of events.
    assert!(
        got.completion.abs_diff(want.completion) <= 2,
        "gateway {got:?} vs instance {want:?}"
    );
}

#[tokio::test]
async fn the_real_binary_logs_and_exports_the_usage_of_an_injected_stream() {
    let sims = named_sims("binary", 1).await;
    let doc = config_for(&sims);
    let (bin, addr, admin) = spawn_gateway_binary_with_admin(&doc);
    let url = format!("http://{addr}{}", dated("gpt-4o", "chat/completions", NEW));
    let body = r#"{"messages":[{"role":"user","content":"Say hi"}],"stream":true}"#;
    let r = send_stream(Method::POST, &url, &auth(), body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.sse_data().iter().all(|d| !d.contains("\"usage\":{")));
    let rec = bin
        .wait_for_message(Duration::from_secs(5), "request")
        .unwrap_or_else(|| panic!("no access line: {:#?}", bin.lines()));
    println!("EXAMPLE access {rec}");
    let want = ledger(&sims[0], "gpt-4o");
    assert_eq!(
        rec["usage"],
        serde_json::json!({
            "prompt": want.prompt,
            "completion": want.completion,
            "cached": want.cached,
            "reasoning": want.reasoning,
            "source": "reported",
        })
    );
    let text = get_ok(&format!("http://{admin}/metrics")).await;
    for l in text
        .lines()
        .filter(|l| l.starts_with("aoai_lb_tokens_total{"))
    {
        println!("EXAMPLE metric {l}");
    }
    assert_eq!(counted(&text, "binary-0", "gpt-4o", "reported"), want);
}

#[tokio::test]
async fn v1_streams_are_injected_and_counted_under_the_client_facing_deployment() {
    let sims = named_sims("v1", 1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"deployments": {"gpt-4o-v1": "gpt-4o-backend"}}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}/openai/v1/chat/completions", gw.url());
    let body = serde_json::json!({
        "model": "gpt-4o-v1",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "stream": true,
    })
    .to_string();
    let r = send_stream(Method::POST, &url, &auth(), body).await;
    assert_eq!(r.status, StatusCode::OK);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.iter().all(|d| !d.contains("\"usage\":{")));
    let got = settled(&gw, "v1-0", "gpt-4o-v1", "reported").await;
    let want = ledger(&sims[0], "gpt-4o-backend");
    assert!(want.prompt > 0, "the instance saw its own deployment name");
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_legacy_completions_stream_without_include_usage_is_estimated() {
    let sims = named_sims("legacy", 1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!(
        "{}{}",
        gw.url(),
        dated("gpt-35-turbo-instruct", "completions", NEW)
    );
    let body = r#"{"prompt":"Once upon a time","max_tokens":12,"stream":true}"#;
    let r = send_stream(Method::POST, &url, &auth(), body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    let got = settled(&gw, "legacy-0", "gpt-35-turbo-instruct", "estimated").await;
    let want = ledger(&sims[0], "gpt-35-turbo-instruct");
    assert!(want.completion > 0);
    assert_eq!((got.prompt, got.completion), (want.prompt, want.completion));
}
