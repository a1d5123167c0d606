//! The real binary's output under a mixed workload: one JSON access line per
//! request, and never a key in any line. Also: the seed README's curl works
//! against `aoai-lb --demo`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_sim::Fault;
use common::*;
use http::{Method, StatusCode};

const KEY_A: &str = "backend-secret-alpha-c0ffee01";
const KEY_B: &str = "backend-secret-bravo-c0ffee02";

#[tokio::test]
async fn never_logs_a_backend_or_client_key_under_a_mixed_workload() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("alpha")
            .api_key(KEY_A)
            .latency(5, 2)
            .fault(Fault::Fail {
                count: Some(1),
                status: 429,
                body: None,
                retry_after_ms: Some(200),
            }),
        aoai_sim::InstanceConfig::new("bravo")
            .api_key(KEY_B)
            .latency(5, 2)
            .fault(Fault::Fail {
                count: Some(1),
                status: 500,
                body: None,
                retry_after_ms: None,
            }),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances": [{"deployments": ["gpt-4o", "emb"]}, {}]}),
    );
    let dir = std::env::temp_dir().join(format!("aoai-lb-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    std::fs::write(&file, &doc).unwrap();
    let mut bin = spawn_binary(
        &[
            "--config",
            file.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-port",
            "0",
        ],
        &[("API_KEY", CLIENT_KEY), ("LOG_LEVEL", "debug")],
    );
    let (addr, admin) = bin.wait_listening(Duration::from_secs(20));
    let base = format!("http://{addr}");
    let json = ("content-type", "application/json".to_owned());
    let bearer = vec![
        ("authorization", format!("Bearer {CLIENT_KEY}")),
        json.clone(),
    ];
    let api_key = vec![("api-key", CLIENT_KEY.to_owned()), json.clone()];
    let wrong = vec![("api-key", format!("{CLIENT_KEY}-wrong")), json.clone()];

    let mut sent = 0;
    for i in 0..12 {
        let headers = if i % 2 == 0 { &bearer } else { &api_key };
        let s = send_stream(
            Method::POST,
            &format!("{base}{}", chat_path("gpt-4o")),
            headers,
            chat_body(i % 3 == 0),
        )
        .await;
        sent += 1;
        assert!(
            s.status.is_success() || s.status.as_u16() >= 429,
            "{}",
            s.status
        );
    }
    for (path, headers, body) in [
        (chat_path("gpt-4o"), &wrong, chat_body(false)),
        (
            format!(
                "/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview&api-key={CLIENT_KEY}"
            ),
            &json_only(),
            chat_body(false),
        ),
        (
            "/openai/deployments/emb/embeddings?api-version=2024-10-21".to_owned(),
            &api_key,
            r#"{"input":"hello"}"#.to_owned(),
        ),
        (
            "/openai/v1/chat/completions".to_owned(),
            &bearer,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
        ),
        (
            "/openai/models?api-version=2024-10-21".to_owned(),
            &bearer,
            String::new(),
        ),
    ] {
        let _ = send(Method::POST, &format!("{base}{path}"), headers, body).await;
        sent += 1;
    }
    let _ = send(
        Method::GET,
        &format!("http://{admin}/admin/backends"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    let _ = send(
        Method::GET,
        &format!("http://{admin}/metrics"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;

    bin.signal("TERM");
    let status = bin.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    let lines = bin.lines();
    for (_, line) in &lines {
        for secret in [KEY_A, KEY_B, CLIENT_KEY] {
            assert!(!line.contains(secret), "key in output: {line}");
        }
    }
    let access: Vec<serde_json::Value> = lines
        .iter()
        .filter(|(which, _)| *which == Stream::Stdout)
        .map(|(_, l)| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|_| panic!("not JSON: {l}"))
        })
        .filter(|v| v["target"] == "aoai_lb::access")
        .collect();
    assert_eq!(access.len(), sent, "one access line per request");
    for a in &access {
        assert!(a["timestamp"].is_string(), "{a}");
        assert!(a["request_id"].is_string(), "{a}");
        assert!(a["status"].is_u64(), "{a}");
        assert!(!a["path"].as_str().unwrap().contains('?'), "{a}");
    }
    assert!(
        access
            .iter()
            .any(|a| a["attempts"].as_array().is_some_and(|x| x.len() > 1)),
        "a failover was logged with its attempts"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn json_only() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/json".to_owned())]
}

#[tokio::test]
async fn the_seed_readme_curl_works_against_the_demo() {
    let port = free_port();
    let port_s = port.to_string();
    let mut bin = spawn_binary(
        &["--demo", "--host", "127.0.0.1", "--admin-port", "0"],
        &[("PORT", &port_s), ("LOG_FORMAT", "json")],
    );
    let (addr, _) = bin.wait_listening(Duration::from_secs(20));
    assert_eq!(addr.port(), port);
    let curl = bin
        .wait_for_line(Duration::from_secs(5), |l| l.starts_with("curl -X POST"))
        .expect("the demo prints a ready-to-paste curl");
    assert!(curl.contains(&format!("http://127.0.0.1:{port}/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview")), "{curl}");
    assert!(curl.contains("'Authorization: Bearer demo-key'"), "{curl}");

    // The seed README's request, byte for byte apart from the key.
    let body = r#"{
          "model": "gpt-4o",
          "messages": [
            {
              "role": "user",
              "content": [
                {
                  "type": "text",
                  "text": "hi"
                }
              ]
            }
          ],
          "max_tokens": 300
        }"#;
    let (s, _, resp) = send(
        Method::POST,
        &format!("http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer demo-key"),
        ],
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{resp:?}");
    let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");

    // Streaming shows tokens over time.
    let streamed = send_stream(
        Method::POST,
        &format!("http://{addr}{}", chat_path("gpt-4o")),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer demo-key"),
        ],
        chat_body(true),
    )
    .await;
    assert_eq!(streamed.status, StatusCode::OK);
    let first = streamed.chunks.first().unwrap().at;
    let last = streamed.chunks.last().unwrap().at;
    assert!(
        last - first >= Duration::from_millis(100),
        "{first:?}..{last:?}"
    );

    bin.signal("TERM");
    assert_eq!(
        bin.wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
}
