//! Named clients against the real gateway and in-process aoai-sim
//! instances: permissions (403), rates (429 with the exact wait), the
//! oversize 429, token quotas, priority groups and spillover, client rate
//! headers, metrics and the admin view. Rate and quota tests run on a
//! manual clock, so every wait is exact and nothing sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aoai_lb::backend::Clock;
use aoai_sim::SimHandle;
use common::*;
use http::{HeaderMap, Method, StatusCode};

/// 2026-11-29T23:59:00Z: a minute before a day (not a month) rolls over.
const T0: u64 = 1_795_996_740_000;

async fn start(config: &str, key: Option<&str>, clock: &Clock) -> TestGateway {
    start_gateway_with(config, key, |o| o.clock = clock.clone()).await
}

/// A chat body asking for at most `max_tokens`.
fn body(max_tokens: u64) -> String {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    })
    .to_string()
}

/// What admission reserves for `body` on the chat path.
fn estimate(body: &str) -> u64 {
    aoai_lb::limits::estimate_tokens(
        "/openai/deployments/gpt-4o/chat/completions",
        "gpt-4o",
        body.as_bytes(),
        4096,
    )
}

async fn chat(
    gw: &TestGateway,
    key: &str,
    body: &str,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (s, h, b) = send(Method::POST, &url, &key_headers(key), body.to_owned()).await;
    let v = serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null);
    (s, h, v)
}

fn requests(sims: &[SimHandle]) -> u64 {
    sims.iter().map(|s| s.request_count() as u64).sum()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn refuses_a_deployment_outside_the_clients_list_without_contacting_an_instance() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [
            {"name": "dep-limited", "key": "dep-key", "deployments": ["gpt-4o-mini"]}
        ]}),
    );
    let gw = start(&doc, None, &Clock::new()).await;
    let (s, _, v) = chat(&gw, "dep-key", &body(16)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "DeploymentNotAllowed");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("dep-limited") && msg.contains("gpt-4o"),
        "{msg}"
    );
    assert_eq!(requests(&sims), 0, "no instance contacted");

    let url = format!("{}{}", gw.url(), chat_path("gpt-4o-mini"));
    let (s, _, _) = send(Method::POST, &url, &key_headers("dep-key"), body(16)).await;
    assert_eq!(s, StatusCode::OK);

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"aoai_lb_client_rejections_total{client="dep-limited",reason="deployment"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"code="2xx",client="dep-limited"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn answers_429_over_rpm_with_the_exact_wait_and_admits_after_it() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [{"name": "rpm-team", "key": "rpm-key", "rpm": 2}]}),
    );
    let clock = Clock::manual(T0);
    let gw = start(&doc, None, &clock).await;
    assert_eq!(chat(&gw, "rpm-key", &body(16)).await.0, StatusCode::OK);
    clock.advance(10_000);
    assert_eq!(chat(&gw, "rpm-key", &body(16)).await.0, StatusCode::OK);
    clock.advance(10_000);

    let (s, h, v) = chat(&gw, "rpm-key", &body(16)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // The first request leaves the window 60 s after it was admitted.
    assert_eq!(header(&h, "retry-after-ms"), Some("40000"));
    assert_eq!(header(&h, "retry-after"), Some("40"));
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(v["error"]["code"], "429");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'rpm-team'") && msg.contains("2 requests per minute"),
        "{msg}"
    );
    assert_eq!(
        requests(&sims),
        2,
        "the refused request reached no instance"
    );

    clock.advance(39_999);
    let (s, h, _) = chat(&gw, "rpm-key", &body(16)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&h, "retry-after-ms"), Some("1"));
    clock.advance(1);
    assert_eq!(chat(&gw, "rpm-key", &body(16)).await.0, StatusCode::OK);
    assert_eq!(requests(&sims), 3);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"aoai_lb_client_rejections_total{client="rpm-team",reason="rpm"} 2"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn answers_429_over_tpm_until_the_reservation_leaves_the_window() {
    let sims = sims(1).await;
    let (small, full) = (body(500), body(1000));
    // The limit is exactly what the second request reserves: it fits only
    // in an empty window, whatever the first one finally cost.
    let tpm = estimate(&full);
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [{"name": "tpm-team", "key": "tpm-key", "tpm": tpm}]}),
    );
    let clock = Clock::manual(T0);
    let gw = start(&doc, None, &clock).await;
    let (s, h, _) = chat(&gw, "tpm-key", &small).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        header(&h, "x-ratelimit-limit-tokens"),
        Some(tpm.to_string().as_str())
    );
    let remaining: u64 = header(&h, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, tpm - estimate(&small));

    clock.advance(15_000);
    let (s, h, v) = chat(&gw, "tpm-key", &full).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(header(&h, "retry-after-ms"), Some("45000"));
    assert_eq!(header(&h, "retry-after"), Some("45"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'tpm-team'") && msg.contains(&format!("{tpm} tokens per minute")),
        "{msg}"
    );
    assert_eq!(requests(&sims), 1);

    let view: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/admin/clients").await).unwrap();
    let c = view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tpm-team")
        .unwrap();
    let used = c["tpm"]["used"].as_u64().unwrap();
    assert!(used > 0 && used <= estimate(&small), "{c}");

    clock.advance(45_000);
    assert_eq!(chat(&gw, "tpm-key", &full).await.0, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn never_admits_a_request_larger_than_the_whole_tpm() {
    let sims = sims(1).await;
    let tpm = estimate(&body(1000));
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [{"name": "big-team", "key": "big-key", "tpm": tpm}]}),
    );
    let gw = start(&doc, None, &Clock::manual(T0)).await;
    let (s, h, v) = chat(&gw, "big-key", &body(5000)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(header(&h, "x-should-retry"), Some("false"));
    assert!(h.get("retry-after-ms").is_none() && h.get("retry-after").is_none());
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Request too large") && msg.contains("'big-team'"),
        "{msg}"
    );
    assert_eq!(requests(&sims), 0);
    // Nothing was reserved: a request that fits goes through at once.
    assert_eq!(chat(&gw, "big-key", &body(1000)).await.0, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn refuses_with_quota_exceeded_until_the_day_rolls_over() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [
            {"name": "quota-team", "key": "quota-key", "token_quota": {"tokens": 1, "period": "day"}}
        ]}),
    );
    let clock = Clock::manual(T0);
    let gw = start(&doc, None, &clock).await;
    assert_eq!(chat(&gw, "quota-key", &body(16)).await.0, StatusCode::OK);
    let (s, h, v) = chat(&gw, "quota-key", &body(16)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "QuotaExceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'quota-team'") && msg.contains("2026-11-30T00:00:00.000Z"),
        "{msg}"
    );
    assert!(h.get("retry-after-ms").is_none());
    assert_eq!(requests(&sims), 1);

    let view = gw.admin_get("/admin/clients").await;
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    let c = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "quota-team")
        .unwrap();
    assert_eq!(c["token_quota"]["remaining"], 0, "{c}");

    clock.advance(60_000);
    assert_eq!(chat(&gw, "quota-key", &body(16)).await.0, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains(r#"aoai_lb_client_rejections_total{client="quota-team",reason="quota"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_without_group_2_never_spills_over_and_loses_its_spillover_header() {
    let sims = sims(2).await;
    let doc = config_with(
        &sims,
        serde_json::json!({
            "instances": [{"priority": 1}, {"priority": 2}],
            "clients": [
                {"name": "ptu-only", "key": "ptu-key", "priorities": [1]},
                {"name": "may-spill", "key": "spill-key", "priorities": [1, 2]}
            ]
        }),
    );
    let gw = start(&doc, None, &Clock::manual(T0)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let spill_header = |key: &str| {
        let mut h = key_headers(key);
        h.push(("x-ms-spillover-deployment", "gpt-4o-paygo".to_owned()));
        h
    };
    let last_header = |sim: &SimHandle| {
        sim.journal()
            .last()
            .unwrap()
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("x-ms-spillover-deployment"))
    };
    let (s, _, _) = send(Method::POST, &url, &spill_header("ptu-key"), body(16)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !last_header(&sims[0]),
        "stripped for a client that may not spill"
    );
    let (s, _, _) = send(Method::POST, &url, &spill_header("spill-key"), body(16)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(last_header(&sims[0]), "kept for a client that may spill");

    // The PTU instance is full: only the client with group 2 goes on.
    sims[0].inject(aoai_sim::Fault::Fail {
        count: None,
        status: 429,
        body: None,
        retry_after_ms: Some(30_000),
    });
    let (s, h, _) = chat(&gw, "ptu-key", &body(16)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.get("retry-after-ms").is_some());
    assert_eq!(sims[1].request_count(), 0, "never sent to pay-as-you-go");
    let (s, h, _) = chat(&gw, "spill-key", &body(16)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(header(&h, "x-aoai-sim-instance"), Some("sim1"));
    gw.shutdown().await;
}

#[tokio::test]
async fn rotated_keys_and_api_key_each_name_their_client() {
    let sims = sims(1).await;
    let sha: String = aoai_lb::clients::hash_key(b"hashed-key-2")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [
            {"name": "rotating", "key": ["old-key-1", "new-key-1"], "rpm": 100},
            {"name": "hashed", "key_sha256": sha}
        ]}),
    );
    let gw = start(&doc, Some("seed-api-key"), &Clock::manual(T0)).await;
    for key in ["old-key-1", "new-key-1"] {
        let (s, h, _) = chat(&gw, key, &body(16)).await;
        assert_eq!(s, StatusCode::OK, "{key}");
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), Some("100"));
    }
    assert_eq!(chat(&gw, "hashed-key-2", &body(16)).await.0, StatusCode::OK);
    // API_KEY is client `default`, unlimited: the instance's headers pass.
    let (s, h, _) = chat(&gw, "seed-api-key", &body(16)).await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(header(&h, "x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(
        chat(&gw, "unknown-key", &body(16)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let metrics = gw.metrics().await;
    for client in ["rotating", "hashed", "default"] {
        assert!(
            metrics.contains(&format!(r#"code="2xx",client="{client}"}}"#)),
            "{client}: {metrics}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_clients_shows_limits_and_use_but_no_key_or_hash() {
    let sims = sims(1).await;
    let sha: String = aoai_lb::clients::hash_key(b"hashed-secret-77")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let plain_hash: String = aoai_lb::clients::hash_key(b"plain-secret-55")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [
            {"name": "team-a", "key": "plain-secret-55", "deployments": ["gpt-4o"],
             "rpm": 600, "tpm": 200000, "priorities": [1],
             "token_quota": {"tokens": 50000000, "period": "month"}},
            {"name": "team-b", "key_sha256": sha}
        ]}),
    );
    let gw = start(&doc, Some("seed-secret-33"), &Clock::manual(T0)).await;
    assert_eq!(
        chat(&gw, "plain-secret-55", &body(16)).await.0,
        StatusCode::OK
    );
    let text = gw.admin_get("/admin/clients").await;
    for secret in [
        "plain-secret-55",
        "hashed-secret-77",
        "seed-secret-33",
        sha.as_str(),
        plain_hash.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "team-a", "team-b"]);
    let a = &v["clients"][1];
    assert_eq!(a["rpm"]["limit"], 600);
    assert_eq!(a["rpm"]["used"], 1);
    assert_eq!(a["rpm"]["remaining"], 599);
    assert_eq!(a["tpm"]["limit"], 200000);
    assert_eq!(a["deployments"], serde_json::json!(["gpt-4o"]));
    assert_eq!(a["priorities"], serde_json::json!([1]));
    assert_eq!(a["token_quota"]["period"], "month");
    assert_eq!(a["token_quota"]["renews_at"], "2026-12-01T00:00:00.000Z");
    assert!(a["token_quota"]["remaining"].as_u64().unwrap() < 50_000_000);
    assert!(v["clients"][2]["rpm"].is_null());
    gw.shutdown().await;
}
