//! Failover, cooldowns, the circuit breaker and the retry table, against
//! simulated instances with injected faults.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use aoai_sim::Fault;
use common::*;
use http::{HeaderMap, Method, StatusCode};

fn served_by(h: &HeaderMap) -> String {
    h.get("x-aoai-sim-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

fn fail(status: u16, count: Option<u32>) -> Fault {
    Fault::Fail {
        count,
        status,
        body: None,
        retry_after_ms: None,
    }
}

/// Two sims; `sim0` priority 1, `sim1` priority 2, so attempts go in order.
async fn ordered_pair(extra: serde_json::Value) -> (Vec<aoai_sim::SimHandle>, TestGateway) {
    let sims = sims(2).await;
    let mut extra = extra;
    extra["instances"] = serde_json::json!([{"priority": 1}, {"priority": 2}]);
    let gw = start_gateway(&config_with(&sims, extra), Some(CLIENT_KEY)).await;
    (sims, gw)
}

async fn chat(gw: &TestGateway) -> (StatusCode, HeaderMap, bytes::Bytes) {
    send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await
}

#[tokio::test]
async fn respects_priority() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    for _ in 0..20 {
        let (s, h, _) = chat(&gw).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(served_by(&h), "sim0");
    }
    assert_eq!(sims[1].request_count(), 0);
}

#[tokio::test]
async fn skips_a_cooled_instance_for_retry_after_ms() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 429,
        body: None,
        retry_after_ms: Some(700),
    });
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1", "429 fails over at once");
    let (_, h, _) = chat(&gw).await;
    assert_eq!(served_by(&h), "sim1", "the cooled instance is skipped");
    assert_eq!(sims[0].request_count(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, h, _) = chat(&gw).await;
    assert_eq!(served_by(&h), "sim0", "back after the cooldown");
}

#[tokio::test]
async fn answers_429_at_once_when_every_instance_is_cooling() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    for (s, ms) in sims.iter().zip([3000, 2000]) {
        s.inject(Fault::Fail {
            count: None,
            status: 429,
            body: None,
            retry_after_ms: Some(ms),
        });
    }
    let (s, h, body) = chat(&gw).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(ms > 1500 && ms <= 2000, "{ms}");
    assert_eq!(h["retry-after"], "2");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "429");
    // The next request is answered without contacting anyone.
    let started = Instant::now();
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.get("retry-after-ms").is_some());
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 2);
}

#[tokio::test]
async fn does_not_retry_a_content_filter_400() {
    let cfgs = (0..2)
        .map(|i| {
            aoai_sim::InstanceConfig::new(format!("sim{i}")).fault(Fault::ContentFilter {
                trigger: "forbidden-word".into(),
            })
        })
        .collect();
    let sims = start_sims(cfgs).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let body = r#"{"messages":[{"role":"user","content":"say forbidden-word"}]}"#;
    let (s, _, resp) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        body,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(
        v["error"]["code"], "content_filter",
        "Azure's body, unchanged"
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 1);
}

#[tokio::test]
async fn fails_over_on_backend_401_and_403() {
    let sims = sims(2).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"priority":1,"api_key":"revoked-key"},{"priority":2}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
    assert_eq!(sims[0].journal().pop().unwrap().status, 401);

    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    sims[0].inject(fail(403, Some(1)));
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
}

#[tokio::test]
async fn fails_over_on_5xx_and_connection_resets() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    for status in [500, 502, 503, 504, 408] {
        sims[0].inject(fail(status, Some(1)));
        let (s, h, _) = chat(&gw).await;
        assert_eq!(s, StatusCode::OK, "{status}");
        assert_eq!(served_by(&h), "sim1", "{status}");
    }
    sims[0].inject(Fault::ResetBeforeResponse { count: Some(1) });
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
}

#[tokio::test]
async fn fails_over_on_deployment_not_found_but_not_on_resource_not_found() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("sim0").deployments(&["other"]),
        aoai_sim::InstanceConfig::new("sim1"),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[{"priority":1},{"priority":2}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
    assert_eq!(sims[0].request_count(), 1);

    // No api-version: Azure's 404 "Resource not found" is the client's
    // problem and comes back as is.
    let (s, _, body) = send(
        Method::POST,
        &format!("{}/openai/deployments/other/chat/completions", gw.url()),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("Resource not found"));
    assert_eq!(sims[1].request_count(), 1, "not retried");
}

#[tokio::test]
async fn fails_over_when_a_backend_hangs_past_the_header_timeout() {
    let (sims, gw) =
        ordered_pair(serde_json::json!({"timeouts":{"response_headers_ms":300}})).await;
    sims[0].inject(Fault::Hang {
        count: None,
        ms: None,
    });
    let started = Instant::now();
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn answers_504_when_every_backend_hangs() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"timeouts":{"response_headers_ms":200}}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    sims[0].inject(Fault::Hang {
        count: None,
        ms: None,
    });
    let (s, _, body) = chat(&gw).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("127.0.0.1"), "{text}");
}

#[tokio::test]
async fn opens_the_breaker_after_repeated_5xx() {
    let (sims, gw) = ordered_pair(serde_json::json!({
        "circuit_breaker": {"failure_threshold": 2, "open_ms": 60000, "max_open_ms": 60000}
    }))
    .await;
    sims[0].inject(fail(500, None));
    for _ in 0..6 {
        let (s, h, _) = chat(&gw).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(served_by(&h), "sim1");
    }
    assert_eq!(sims[0].request_count(), 2, "open breaker stops the traffic");
    let (s, _, body) = send(
        Method::GET,
        &format!("{}/admin/backends", gw.admin_url()),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let text = v.to_string();
    assert!(text.contains("\"open\""), "{text}");
    assert!(!text.contains("sim-key"), "{text}");
}

#[tokio::test]
async fn returns_the_last_upstream_error_unchanged() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    sims[0].inject(Fault::Fail {
        count: None,
        status: 500,
        body: Some("first".into()),
        retry_after_ms: None,
    });
    sims[1].inject(Fault::Fail {
        count: None,
        status: 503,
        body: Some(r#"{"error":{"code":"overloaded","message":"second"}}"#.into()),
        retry_after_ms: None,
    });
    let (s, h, body) = chat(&gw).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        &body[..],
        br#"{"error":{"code":"overloaded","message":"second"}}"#
    );
    assert_eq!(served_by(&h), "sim1");
    assert!(h.get("apim-request-id").is_some());
}

#[tokio::test]
async fn answers_502_when_no_backend_is_reachable() {
    let port = free_port();
    let doc = format!(
        r#"{{"instances":[{{"name":"gone","url":"http://127.0.0.1:{port}","api_key":"k"}}],"timeouts":{{"connect_ms":500}}}}"#
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let (s, _, body) = chat(&gw).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    let text = String::from_utf8_lossy(&body);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]["code"].is_string());
    assert!(!text.contains(&port.to_string()), "{text}");
}

#[tokio::test]
async fn replays_the_body_on_the_next_instance() {
    let (sims, gw) = ordered_pair(serde_json::json!({})).await;
    sims[0].inject(fail(503, Some(1)));
    let body = chat_body(false);
    let (s, _, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    let a = sims[0].journal().pop().unwrap();
    let b = sims[1].journal().pop().unwrap();
    assert_eq!(a.body_sha256, b.body_sha256);
    assert_eq!(b.body_len, body.len());
}

#[tokio::test]
async fn probes_an_open_breaker_once_its_period_ends() {
    let (sims, gw) = ordered_pair(serde_json::json!({
        "circuit_breaker": {"failure_threshold": 1, "open_ms": 300, "max_open_ms": 1000}
    }))
    .await;
    sims[0].inject(fail(500, Some(1)));
    let (_, h, _) = chat(&gw).await;
    assert_eq!(served_by(&h), "sim1");
    let (_, h, _) = chat(&gw).await;
    assert_eq!(served_by(&h), "sim1", "open: skipped");
    assert_eq!(sims[0].request_count(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, h, _) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        served_by(&h),
        "sim0",
        "half-open: one probe, which succeeds"
    );
    let (_, h, _) = chat(&gw).await;
    assert_eq!(served_by(&h), "sim0", "closed again");
}
