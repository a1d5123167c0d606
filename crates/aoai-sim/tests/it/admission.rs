//! Azure's admission model on a controllable clock: rolling 60 s token
//! reservations of the estimate, a rolling 10 s request budget of rpm / 6, the
//! remaining (and optional limit) headers, and 429s whose `retry-after-ms` is
//! exactly when room frees up, with the `policy-id` of the budget that refused.

use crate::common;

use std::time::Duration;

use aoai_sim::{InstanceConfig, RateLimit, SimClock};
use common::*;
use http::{Method, StatusCode};
use serde_json::json;

fn body(prompt: &str, max_tokens: u32) -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn tokens_reserve_the_character_estimate_plus_max_tokens_times_n() {
    let clock = SimClock::manual();
    let sim = one(InstanceConfig::new("a").rate_limit(0, 1000).clock(clock)).await;
    let url = chat_url(&sim.url(), "d");
    // 12 characters -> 3 estimated tokens, + 100 max_tokens.
    let r = post_json(&url, body("abcdefghijkl", 100)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("897"));
    // n = 3 reserves max_tokens three times: 3 + 300.
    let mut b = body("abcdefghijkl", 100);
    b["n"] = json!(3);
    let r = post_json(&url, b).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("594"));
    // max_completion_tokens counts like max_tokens.
    let r = post_json(
        &url,
        json!({"messages": [{"role": "user", "content": "abcd"}], "max_completion_tokens": 93}),
    )
    .await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("500"));
    // Embeddings reserve their input estimate only.
    let r = post_json(
        &format!("{}/openai/deployments/d/embeddings?{V}", sim.url()),
        json!({"input": "abcdefgh"}),
    )
    .await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("498"));
    // Answers that reserve nothing still report what is left.
    let r = send(Method::POST, &url, &[], "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("498"));
}

#[tokio::test]
async fn over_tpm_is_a_429_whose_retry_after_ms_is_when_the_reservation_leaves() {
    let clock = SimClock::manual();
    let sim = one(InstanceConfig::new("a")
        .region("Sweden Central")
        .model("gpt-4o-2024-08-06")
        .rate_limit(0, 500)
        .clock(clock.clone()))
    .await;
    let url = chat_url(&sim.url(), "chat");
    assert_eq!(
        post_json(&url, body("abcd", 199)).await.status,
        StatusCode::OK
    ); // 200
    clock.advance(Duration::from_millis(12_345));
    assert_eq!(
        post_json(&url, body("abcd", 199)).await.status,
        StatusCode::OK
    ); // 400
    clock.advance(Duration::from_secs(10));
    let r = post_json(&url, body("abcd", 199)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // The first reservation leaves 60 s after its admission: 60 - 22.345 s.
    assert_eq!(r.header("retry-after-ms"), Some("37655"));
    assert_eq!(r.header("retry-after"), Some("38"));
    assert_eq!(r.header("policy-id"), Some("DeploymentRatelimit-Token"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("100"));
    assert_eq!(r.header("x-ms-deployment-name"), Some("chat"));
    assert_eq!(
        r.json(),
        json!({"error": {"code": "RateLimitReached", "message": "Your requests to gpt-4o-2024-08-06 for chat in Sweden Central have exceeded the token rate limit for your current OpenAI S0 pricing tier. This request was for ChatCompletions_Create under Azure OpenAI API version 2024-10-21. Please retry after 38 seconds. To increase your default rate limit, visit: https://aka.ms/oai/quotaincrease."}})
    );
    // One millisecond early is still too early; at the instant it fits.
    clock.advance(Duration::from_millis(37_654));
    let r = post_json(&url, body("abcd", 199)).await;
    assert_eq!(r.header("retry-after-ms"), Some("1"));
    clock.advance(Duration::from_millis(1));
    let r = post_json(&url, body("abcd", 199)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("100"));
    let u = sim.usage().deployment("chat");
    assert_eq!((u.requests, u.throttled), (3, 2));
}

#[tokio::test]
async fn requests_are_limited_to_a_sixth_of_rpm_per_rolling_ten_seconds() {
    let clock = SimClock::manual();
    let sim = one(InstanceConfig::new("a")
        .rate_limit(18, 0)
        .clock(clock.clone()))
    .await; // 3 per 10 s
    let url = chat_url(&sim.url(), "d");
    for left in ["2", "1"] {
        let r = post_json(&url, chat_body("x")).await;
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(left));
        clock.advance(Duration::from_secs(3));
    }
    let r = post_json(&url, chat_body("x")).await; // t = 6 s
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    clock.advance(Duration::from_millis(2500));
    let r = post_json(&url, chat_body("x")).await; // t = 8.5 s
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("policy-id"), Some("DeploymentRatelimit-Call"));
    assert_eq!(r.header("retry-after-ms"), Some("1500"));
    assert_eq!(r.header("retry-after"), Some("2"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeded the call rate limit")
    );
    // Rolling, not a window that resets: at 10 s only the first request left.
    clock.advance(Duration::from_millis(1500));
    let r = post_json(&url, chat_body("x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let r = post_json(&url, chat_body("x")).await;
    assert_eq!(r.header("retry-after-ms"), Some("3000"));
}

#[tokio::test]
async fn a_request_larger_than_the_whole_tpm_is_refused_every_time() {
    let clock = SimClock::manual();
    let sim = one(InstanceConfig::new("a")
        .rate_limit(0, 100)
        .clock(clock.clone()))
    .await;
    let url = chat_url(&sim.url(), "d");
    for _ in 0..2 {
        let r = post_json(&url, body("x", 500)).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.header("policy-id"), Some("DeploymentRatelimit-Token"));
        assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("100"));
        clock.advance(Duration::from_secs(120));
    }
    assert_eq!(post_json(&url, body("x", 99)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn limit_headers_and_default_reservation_are_configurable_per_deployment() {
    let clock = SimClock::manual();
    let sim = one(InstanceConfig::new("a")
        .reply_tokens(5)
        .rate_limit(600, 10_000)
        .deployment_admission(
            "big",
            RateLimit {
                rpm: 1200,
                tpm: 20_000,
                limit_headers: true,
                default_max_tokens: Some(4096),
            },
        )
        .clock(clock))
    .await;
    let r = post_json(&chat_url(&sim.url(), "big"), chat_body("abcd")).await;
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("200"));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("20000"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("199"));
    // No max_tokens: the configured default (4096) is reserved, not the 5 generated.
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("15903"));
    let r = post_json(&chat_url(&sim.url(), "small"), chat_body("abcd")).await;
    assert!(r.header("x-ratelimit-limit-tokens").is_none());
    // Without a default, the reply the simulator generates is reserved.
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("9994"));
}

#[tokio::test]
async fn instances_sharing_a_clock_move_together_and_admin_can_advance_it() {
    let clock = SimClock::manual();
    let sims = aoai_sim::start(vec![
        InstanceConfig::new("a")
            .rate_limit(6, 0)
            .clock(clock.clone()),
        InstanceConfig::new("b")
            .rate_limit(6, 0)
            .clock(clock.clone())
            .admin(true),
    ])
    .await
    .unwrap();
    for s in &sims {
        assert_eq!(
            post_json(&chat_url(&s.url(), "d"), chat_body("x"))
                .await
                .status,
            StatusCode::OK
        );
        let r = post_json(&chat_url(&s.url(), "d"), chat_body("x")).await;
        assert_eq!(r.header("retry-after-ms"), Some("10000"));
    }
    let r = send(
        Method::POST,
        &format!("{}/_sim/clock", sims[1].url()),
        &[],
        r#"{"advance_ms":10000}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["frozen"], true);
    assert_eq!(sims[0].clock(), clock);
    for s in &sims {
        assert_eq!(
            post_json(&chat_url(&s.url(), "d"), chat_body("x"))
                .await
                .status,
            StatusCode::OK
        );
    }
    let r = send(
        Method::POST,
        &format!("{}/_sim/clock", sims[1].url()),
        &[],
        r#"{"advance":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn without_a_quota_the_remaining_headers_read_the_documented_maxima() {
    let sim = one(InstanceConfig::new("a")).await;
    let r = post_json(&chat_url(&sim.url(), "d"), chat_body("x")).await;
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("100000"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("10000000"));
    assert!(r.header("x-ratelimit-limit-tokens").is_none());
}

#[tokio::test]
async fn a_ptu_deployment_reports_utilization_and_429s_over_100_percent_until_it_drains() {
    let clock = SimClock::manual();
    // 6,000 tokens a minute: 100 a second drain.
    let sim = one(InstanceConfig::new("a")
        .deployment_ptu("ptu", 6_000)
        .rate_limit(0, 1_000)
        .clock(clock.clone()))
    .await;
    let url = chat_url(&sim.url(), "ptu");
    // 12 characters -> 3 estimated tokens, + 2,997: 3,000, 50%.
    let r = post_json(&url, body("abcdefghijkl", 2_997)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("azure-openai-deployment-utilization"),
        Some("50.0%")
    );
    // Utilization instead of the standard quota's remaining pair, which
    // does not apply to a provisioned deployment.
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), None);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), None);
    // At 50% a request that takes it over is still admitted: 105%.
    let r = post_json(&url, body("abcdefghijkl", 3_297)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("azure-openai-deployment-utilization"),
        Some("105.0%")
    );
    // Over 100%: 429 until the 300 tokens over have drained, 3 s.
    clock.advance(Duration::from_millis(1_000));
    let r = post_json(&url, body("abcd", 1)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after-ms"), Some("2000"));
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(
        r.header("azure-openai-deployment-utilization"),
        Some("103.4%")
    );
    assert_eq!(r.header("policy-id"), None);
    assert_eq!(r.json()["error"]["code"], "429");
    clock.advance(Duration::from_millis(2_000));
    let r = post_json(&url, body("abcd", 59)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("azure-openai-deployment-utilization"),
        Some("101.0%")
    );
    // Answers that cost nothing report the utilization now; another
    // deployment of the instance keeps the standard quota.
    clock.advance(Duration::from_secs(30));
    let r = send(Method::POST, &url, &[], "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("azure-openai-deployment-utilization"),
        Some("51.0%")
    );
    let r = post_json(&chat_url(&sim.url(), "std"), body("abcd", 99)).await;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("900"));
    assert_eq!(r.header("azure-openai-deployment-utilization"), None);
    assert_eq!(sim.usage().deployment("ptu").throttled, 1);
}
