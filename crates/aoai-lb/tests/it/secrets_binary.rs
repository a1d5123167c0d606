//! No key ever leaves its place: the real binary, configured through
//! `OPENAI_INSTANCES` and `API_KEY` like the seed app, runs a mixed
//! workload (successes, streams, a bad client key, a client key in the
//! query, 429s, 5xx, a revoked backend key, bad requests, an oversized body,
//! an unknown deployment, all instances cooling). Then no backend key and no
//! client key may appear in any output line, in `/metrics`, in any error
//! body or in `/admin/backends`; and the instances' journals show that the
//! client's credentials never reached a backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_sim::Fault;
use common::*;
use http::{Method, StatusCode};

const KEY_A: &str = "backend-key-alpha-9f3a77e1d2";
const KEY_B: &str = "backend-key-bravo-41c0b8aa65";
/// What the gateway is configured with for `charlie`, which expects
/// another key: a revoked or mistyped backend key.
const KEY_C_WRONG: &str = "backend-key-charlie-revoked-5e6f";
const KEY_C_REAL: &str = "backend-key-charlie-real-0d1e";
const CLIENT: &str = "client-key-secret-7d4e2b19aa";

fn fail(status: u16, count: u32, retry_after_ms: Option<u64>) -> Fault {
    Fault::Fail {
        count: Some(count),
        status,
        body: None,
        retry_after_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_appears_in_logs_metrics_error_bodies_or_admin_and_none_reaches_a_backend() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("alpha")
            .api_key(KEY_A)
            .latency(2, 1),
        aoai_sim::InstanceConfig::new("bravo")
            .api_key(KEY_B)
            .latency(2, 1),
        aoai_sim::InstanceConfig::new("charlie").api_key(KEY_C_REAL),
    ])
    .await;
    let keys = [KEY_A, KEY_B, KEY_C_WRONG];
    let instances: Vec<serde_json::Value> = sims
        .iter()
        .zip(keys)
        .map(|(s, k)| {
            serde_json::json!({
                "name": s.name(), "url": s.url(), "api_key": k,
                "deployments": ["gpt-4o", "emb"],
            })
        })
        .collect();
    let doc = serde_json::json!({
        "instances": instances,
        "max_request_body_bytes": 4096,
    })
    .to_string();
    let mut bin = spawn_binary(
        &["--host", "127.0.0.1", "--port", "0", "--admin-port", "0"],
        &[
            ("OPENAI_INSTANCES", doc.as_str()),
            ("API_KEY", CLIENT),
            ("RUST_LOG", "trace"),
        ],
    );
    let (addr, admin) = bin.wait_listening(Duration::from_secs(20));
    let base = format!("http://{addr}");
    let json = ("content-type", "application/json".to_owned());
    let bearer = vec![("authorization", format!("Bearer {CLIENT}")), json.clone()];
    let api_key = vec![("api-key", CLIENT.to_owned()), json.clone()];
    let both = vec![
        ("api-key", CLIENT.to_owned()),
        ("authorization", format!("Bearer {CLIENT}")),
        json.clone(),
    ];
    let wrong = vec![("api-key", format!("{CLIENT}x")), json.clone()];
    let chat = |d: &str| format!("{base}{}", chat_path(d));

    let mut bodies: Vec<(String, StatusCode, Vec<u8>)> = Vec::new();
    let mut record = |what: &str, s: StatusCode, b: &[u8]| {
        bodies.push((what.to_owned(), s, b.to_vec()));
    };

    // Successes, plain and streamed, with each way of sending the key.
    for (i, h) in [&bearer, &api_key, &both]
        .into_iter()
        .cycle()
        .take(9)
        .enumerate()
    {
        let r = send_stream(Method::POST, &chat("gpt-4o"), h, chat_body(i % 2 == 0)).await;
        assert_eq!(r.status, StatusCode::OK);
        record("ok", r.status, &r.body());
    }
    // Backend failures: a 429 and 5xx on alpha and bravo, failed over.
    sims[0].inject(fail(429, 1, Some(300)));
    sims[1].inject(fail(500, 2, None));
    sims[1].inject(fail(503, 1, None));
    for _ in 0..6 {
        let (s, _, b) = send(Method::POST, &chat("gpt-4o"), &bearer, chat_body(false)).await;
        record("failover", s, &b);
    }
    // Client mistakes.
    let (s, _, b) = send(Method::POST, &chat("gpt-4o"), &wrong, chat_body(false)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    record("wrong key", s, &b);
    let (s, _, b) = send(
        Method::POST,
        &format!("{}&api-key={CLIENT}", chat("gpt-4o")),
        std::slice::from_ref(&json),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    record("key in query", s, &b);
    let (s, _, b) = send(
        Method::POST,
        &format!("{base}/openai/v1/chat/completions"),
        &bearer,
        "{\"model\":",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    record("bad json", s, &b);
    let (s, _, b) = send(Method::POST, &chat("gpt-4o"), &bearer, "x".repeat(10_000)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    record("too large", s, &b);
    let (s, _, b) = send(
        Method::POST,
        &chat("unknown-dep"),
        &bearer,
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    record("no deployment", s, &b);
    let (s, _, b) = send(
        Method::POST,
        &format!("{base}/openai/deployments/gpt-4o/../x"),
        &bearer,
        "{}",
    )
    .await;
    record("dot segment", s, &b);
    // Everything throttled: the gateway's own 429.
    for sim in &sims {
        sim.inject(Fault::Fail {
            count: None,
            status: 429,
            body: None,
            retry_after_ms: Some(2_000),
        });
    }
    for _ in 0..3 {
        let (s, _, b) = send(Method::POST, &chat("gpt-4o"), &api_key, chat_body(false)).await;
        record("all cooling", s, &b);
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (_, st, _) in &bodies {
        *by_status.entry(st.as_u16()).or_default() += 1;
    }
    println!("secrets workload statuses: {by_status:?}");
    assert!(
        by_status.keys().any(|s| *s == 429 || *s >= 500),
        "the workload reached throttling or backend failures: {by_status:?}"
    );

    let (s, _, metrics) = send(
        Method::GET,
        &format!("http://{admin}/metrics"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, backends) = send(
        Method::GET,
        &format!("http://{admin}/admin/backends"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    bin.signal("TERM");
    let status = bin.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    let lines = bin.all_text();

    let secrets = [KEY_A, KEY_B, KEY_C_WRONG, KEY_C_REAL, CLIENT];
    let metrics = String::from_utf8_lossy(&metrics);
    let backends = String::from_utf8_lossy(&backends);
    for secret in secrets {
        for line in &lines {
            assert!(!line.contains(secret), "key in an output line: {line}");
        }
        assert!(!metrics.contains(secret), "key in /metrics");
        assert!(!backends.contains(secret), "key in /admin/backends");
        for (what, s, b) in &bodies {
            if *s == StatusCode::OK {
                continue;
            }
            let text = String::from_utf8_lossy(b);
            assert!(
                !text.contains(secret),
                "key in the {what} error body: {text}"
            );
        }
    }
    // Error bodies do not name a backend either.
    for (what, s, b) in &bodies {
        let text = String::from_utf8_lossy(b);
        if !s.is_success() {
            for sim in &sims {
                assert!(
                    !text.contains(&sim.addr().to_string()),
                    "backend address in the {what} body: {text}"
                );
            }
        }
    }

    // The backends saw only their own key, once, and never the client's.
    let mut seen = 0;
    for sim in &sims {
        for e in sim.journal() {
            seen += 1;
            assert!(
                e.header("authorization").is_none(),
                "{} got authorization",
                sim.name()
            );
            let api_keys = e.headers.iter().filter(|(k, _)| k == "api-key").count();
            assert_eq!(api_keys, 1, "{} got {api_keys} api-key headers", sim.name());
            assert!(
                !e.query.as_deref().unwrap_or("").contains(CLIENT),
                "client key in a query upstream"
            );
            for (k, v) in &e.headers {
                assert!(!v.contains(CLIENT), "client key upstream in {k}");
            }
        }
    }
    // The revoked key was refused by its instance (so its value was sent
    // only there) and those requests were served elsewhere.
    let charlie = sims[2].journal();
    assert!(
        charlie.iter().all(|e| e.status == 401 || e.status == 429),
        "{charlie:?}"
    );
    let served_ok = bodies
        .iter()
        .filter(|(_, s, _)| *s == StatusCode::OK)
        .count();
    println!(
        "FIGURE secrets lines={} metrics_bytes={} error_bodies={} requests_upstream={seen} ok={served_ok} leaks=0",
        lines.len(),
        metrics.len(),
        bodies.iter().filter(|(_, s, _)| !s.is_success()).count(),
    );
    assert!(lines.len() > 20, "the binary logged the workload");
}
