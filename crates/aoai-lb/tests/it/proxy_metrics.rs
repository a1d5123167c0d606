//! The gateway's Prometheus series, read from the admin listener. The test
//! runs in a process of its own ([`alone`]) so that the process-wide
//! recorder sees only its requests and the counts are exact.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aoai_sim::Fault;
use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn exports_request_attempt_cooldown_and_error_series() {
    if !alone(
        module_path!(),
        "exports_request_attempt_cooldown_and_error_series",
    ) {
        return;
    }
    let sims = sims(2).await;
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
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    for _ in 0..3 {
        let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _, _) = send(Method::POST, &url, &[("api-key", "nope")], "{}").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, _, body) = send(
        Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let v = |name: &str, labels: &[&str]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(
        v(
            "aoai_lb_requests_total",
            &[r#"instance="sim1""#, r#"code="2xx""#]
        ),
        3.0
    );
    assert_eq!(
        v(
            "aoai_lb_requests_total",
            &[r#"instance="none""#, r#"code="4xx""#]
        ),
        1.0
    );
    assert_eq!(
        v(
            "aoai_lb_upstream_attempts_total",
            &[r#"instance="sim0""#, r#"outcome="throttled""#]
        ),
        1.0
    );
    assert_eq!(
        v(
            "aoai_lb_upstream_attempts_total",
            &[r#"instance="sim1""#, r#"outcome="ok""#]
        ),
        3.0
    );
    assert_eq!(v("aoai_lb_cooldowns_total", &[r#"instance="sim0""#]), 1.0);
    assert_eq!(
        v("aoai_lb_client_errors_total", &[r#"reason="unauthorized""#]),
        1.0
    );
    assert_eq!(v("aoai_lb_in_flight", &[r#"instance="sim1""#]), 0.0);
    assert_eq!(v("aoai_lb_breaker_open", &[r#"instance="sim0""#]), 0.0);
    assert!(v("aoai_lb_overhead_seconds_count", &[]) >= 4.0);
    assert!(
        v(
            "aoai_lb_request_duration_seconds_count",
            &[r#"streamed="false""#]
        ) >= 4.0
    );
    assert!(!text.contains("sim-key"));
    assert!(!text.contains("127.0.0.1"), "no URLs in labels");
}
