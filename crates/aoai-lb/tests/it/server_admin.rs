//! The admin listener: Prometheus metrics and the backends document, on
//! their own port, never showing a key or a backend URL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};

const NONE: &[(&str, &str)] = &[];
const KEY_A: &str = "backend-key-alpha-1d9e";
const KEY_B: &str = "backend-key-bravo-77c2";

/// Two instances named `{prefix}-alpha` (priority 1, takes every request)
/// and `{prefix}-bravo` (priority 2), after one plain and one streamed
/// request. The recorder is process-wide, so each test uses its own names.
async fn setup(prefix: &str) -> (Vec<aoai_sim::SimHandle>, TestGateway) {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new(format!("{prefix}-alpha")).api_key(KEY_A),
        aoai_sim::InstanceConfig::new(format!("{prefix}-bravo")).api_key(KEY_B),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances": [{"priority": 1, "weight": 2.0}, {"priority": 2}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    for stream in [false, true] {
        let (s, _, _) = send(
            Method::POST,
            &format!("{}{}", gw.url(), chat_path("gpt-4o")),
            &auth(),
            chat_body(stream),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    (sims, gw)
}

fn assert_no_secret(text: &str, sims: &[aoai_sim::SimHandle]) {
    for secret in [KEY_A, KEY_B, CLIENT_KEY] {
        assert!(!text.contains(secret), "a key leaked: {text}");
    }
    for s in sims {
        assert!(!text.contains(&s.url()), "a backend URL leaked: {text}");
    }
}

#[tokio::test]
async fn serves_prometheus_metrics_with_aoai_lb_names_and_no_key() {
    let (sims, gw) = setup("metrics").await;
    let (s, headers, body) = send(
        Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        NONE,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    for name in [
        "aoai_lb_requests_total{",
        "aoai_lb_upstream_attempts_total{",
        "aoai_lb_request_duration_seconds_bucket{",
        "aoai_lb_overhead_seconds_bucket{",
        "# HELP aoai_lb_requests_total",
        "# TYPE aoai_lb_request_duration_seconds histogram",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // This gateway's own requests were recorded, not just some earlier one's.
    assert!(
        text.contains(
            r#"aoai_lb_requests_total{instance="metrics-alpha",code="2xx",client="default"} 2"#
        ),
        "{text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.starts_with("aoai_lb_"), "foreign metric name: {line}");
    }
    assert_no_secret(&text, &sims);
}

#[tokio::test]
async fn lists_backends_as_json_without_keys_or_urls() {
    let (sims, gw) = setup("backends").await;
    let (s, headers, body) = send(
        Method::GET,
        &format!("{}/admin/backends", gw.admin_url()),
        NONE,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_no_secret(&text, &sims);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let backends = v["backends"].as_array().expect("backends array");
    assert_eq!(backends.len(), 2);
    assert_eq!(backends[0]["name"], "backends-alpha");
    assert_eq!(backends[0]["priority"], 1);
    assert_eq!(backends[0]["weight"], 2.0);
    assert_eq!(backends[1]["priority"], 2);
    for b in backends {
        for field in [
            "in_flight",
            "cooldown_remaining_ms",
            "breaker",
            "latency_ewma_ms",
        ] {
            assert!(b.get(field).is_some(), "{field} missing in {b}");
        }
        assert_eq!(b["breaker"], "closed");
    }
}

#[tokio::test]
async fn keeps_admin_routes_off_the_public_listener() {
    let (sims, gw) = setup("public").await;
    assert_ne!(gw.handle.admin_addr().port(), gw.handle.local_addr().port());
    let before: usize = sims.iter().map(aoai_sim::SimHandle::request_count).sum();
    for path in ["/metrics", "/admin/backends"] {
        let (s, _, body) = send(Method::GET, &format!("{}{path}", gw.url()), NONE, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("aoai_lb_"));
    }
    let after: usize = sims.iter().map(aoai_sim::SimHandle::request_count).sum();
    assert_eq!(before, after);
    let (s, _, _) = send(
        Method::GET,
        &format!("{}/nothing", gw.admin_url()),
        NONE,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
