//! Health routes and readiness, answered by the server before the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn answers_the_seed_health_routes_without_auth() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    for path in ["/health", "/openai/health"] {
        let (status, headers, body) = send(
            Method::GET,
            &format!("{}{path}", gw.url()),
            &[] as &[(&str, &str)],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(&body[..], br#"{"status":"healthy"}"#, "{path}");
    }
    assert_eq!(sims[0].request_count(), 0, "health never reaches a backend");
}

#[tokio::test]
async fn answers_liveness_and_readiness() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let none: &[(&str, &str)] = &[];
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), none, "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = send(Method::GET, &format!("{}/readyz", gw.url()), none, "").await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
}

#[tokio::test]
async fn other_paths_still_require_the_client_key() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (s, _, _) = send(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(sims[0].request_count(), 1);
}

#[tokio::test]
async fn readyz_stays_200_while_every_instance_is_cooling_down() {
    // Every replica sees the same throttling: a 503 here would take all of
    // them out of the ingress at once and hide the gateway's exact 429.
    let sims = start_sims(vec![aoai_sim::InstanceConfig::new("ready-busy").fault(
        aoai_sim::Fault::Fail {
            count: None,
            status: 429,
            body: None,
            retry_after_ms: Some(60_000),
        },
    )])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let none: &[(&str, &str)] = &[];
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let (s, headers, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "answered by the gateway");
    assert!(headers.contains_key("retry-after-ms"));

    let (s, _, body) = send(Method::GET, &format!("{}/readyz", gw.url()), none, "").await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(&body[..], br#"{"status":"ready"}"#);
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), none, "").await;
    assert_eq!(s, StatusCode::OK);

    // Backend health is reported where it belongs: the metrics.
    let (_, _, body) = send(
        Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        none,
        "",
    )
    .await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(r#"aoai_lb_instance_available{instance="ready-busy"} 0"#),
        "{text}"
    );
}

#[tokio::test]
async fn reports_an_instance_that_can_take_requests_as_available() {
    let sims = start_sims(vec![aoai_sim::InstanceConfig::new("ready-idle")]).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let none: &[(&str, &str)] = &[];
    let (_, _, body) = send(
        Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        none,
        "",
    )
    .await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(r#"aoai_lb_instance_available{instance="ready-idle"} 1"#),
        "{text}"
    );
}
