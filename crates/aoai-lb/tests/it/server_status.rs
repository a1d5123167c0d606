//! The admin status page and its `/admin/status` document: what an operator
//! sees of a throttled instance, the headers that keep the page to itself,
//! and that no key or backend URL ever shows. (The page itself runs in a
//! real browser in `tests/status-page/`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};
use sha2::Digest as _;

const NONE: &[(&str, &str)] = &[];
const SIM_KEY: &str = "status-sim-key-a81f";

async fn status(gw: &TestGateway) -> serde_json::Value {
    let (s, headers, body) = send(
        Method::GET,
        &format!("{}/admin/status", gw.admin_url()),
        NONE,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "no-store");
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn serves_the_page_with_a_policy_that_allows_only_its_own_script() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (s, headers, body) = send(Method::GET, &format!("{}/", gw.admin_url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    let html = String::from_utf8(body.to_vec()).unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("admin/status"));
    // Not on the public listener.
    let (s, _, _) = send(Method::GET, &format!("{}/", gw.url()), NONE, "").await;
    assert_ne!(s, StatusCode::OK);
}

#[tokio::test]
async fn the_admin_routes_only_read() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    for path in ["/", "/admin/status"] {
        let (s, _, _) = send(Method::POST, &format!("{}{path}", gw.admin_url()), NONE, "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
}

#[tokio::test]
async fn shows_a_cooling_instance_with_the_429_that_caused_it_and_no_key() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("status-ptu")
            .api_key(SIM_KEY)
            .fault(aoai_sim::Fault::Fail {
                count: Some(1),
                status: 429,
                body: None,
                retry_after_ms: Some(30_000),
            }),
        aoai_sim::InstanceConfig::new("status-paygo").api_key(SIM_KEY),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances": [{"priority": 1}, {"priority": 2}]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK, "served by the second instance");

    let v = status(&gw).await;
    let text = v.to_string();
    for secret in [SIM_KEY, CLIENT_KEY] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    for s in &sims {
        assert!(!text.contains(&s.url()), "backend URL in {text}");
    }
    let ptu = &v["instances"][0];
    assert_eq!(ptu["name"], "status-ptu");
    assert_eq!(ptu["state"], "cooling");
    let left = ptu["cooldown_remaining_ms"].as_u64().unwrap();
    assert!(left > 25_000 && left <= 30_000, "{left}");
    let t = &ptu["last_throttle"];
    assert_eq!(t["status"], 429);
    assert_eq!(t["cooldown_ms"], 30_000);
    assert_eq!(
        t["headers"][0],
        serde_json::json!(["retry-after-ms", "30000"])
    );
    assert_eq!(ptu["unavailable"][0]["kind"], "cooling");
    assert!(ptu["unavailable"][0]["until_ago_ms"].as_i64().unwrap() < 0);
    let throttled: u64 = ptu["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_u64().unwrap())
        .sum();
    assert_eq!(throttled, 1);

    let paygo = &v["instances"][1];
    assert_eq!(paygo["state"], "ok");
    assert!(paygo["last_throttle"].is_null());
    let ok: u64 = paygo["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_u64().unwrap())
        .sum();
    assert_eq!(ok, 1);
    assert_eq!(v["bucket_ms"], 5_000);

    // The request shows in the per-deployment rates, with its tokens.
    let d = &v["deployments"][0];
    assert_eq!(d["name"], "gpt-4o");
    assert_eq!(d["requests_per_min"], 1);
    assert!(d["tokens_per_min"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["rejected_per_min"], 0);
}

#[tokio::test]
async fn names_the_version_replica_and_the_configuration_in_use() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let v = status(&gw).await;
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["replica"].is_string());
    assert_eq!(v["draining"], false);
    let c = &v["config"];
    // The first 16 hex digits of what `sha256sum` prints for the document.
    let full = hex::encode(sha2::Sha256::digest(doc.as_bytes()));
    assert_eq!(c["hash"], full[..16]);
    assert_eq!(c["generation"], 1);
    assert!(c["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        v.get("clients").is_none(),
        "no clients section without clients"
    );
}
