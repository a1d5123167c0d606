//! Named clients through the real binary: keys from the environment
//! (`key_env`), `API_KEY` next to named clients, the `client` field of the
//! access line, start-up without `API_KEY`, and one-line refusals of bad
//! `clients` entries that never echo a key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

const EXIT_WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn serves_clients_whose_keys_come_from_the_environment_without_api_key() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [
            {"name": "env-team", "key_env": ["ENV_TEAM_KEY_OLD", "ENV_TEAM_KEY_NEW"], "rpm": 50}
        ]}),
    );
    let port = free_port().to_string();
    let admin = free_port().to_string();
    let bin = spawn_binary(
        &[],
        &[
            ("OPENAI_INSTANCES", doc.as_str()),
            ("ENV_TEAM_KEY_OLD", "env-old-secret-1"),
            ("ENV_TEAM_KEY_NEW", "env-new-secret-2"),
            ("PORT", port.as_str()),
            ("ADMIN_PORT", admin.as_str()),
            ("HOST", "127.0.0.1"),
        ],
    );
    let (addr, admin_addr) = bin.wait_listening(Duration::from_secs(15));
    let url = format!("http://{addr}{}", chat_path("gpt-4o"));
    for key in ["env-old-secret-1", "env-new-secret-2"] {
        let (s, h, _) = send(Method::POST, &url, &key_headers(key), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK, "{key}");
        assert_eq!(h["x-ratelimit-limit-requests"], "50");
    }
    let (s, _, _) = send(Method::POST, &url, &key_headers("nope"), chat_body(false)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let rec = bin
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains("\"aoai_lb::access\"") && l.contains("\"status\":200")
        })
        .unwrap_or_else(|| panic!("no access line: {:#?}", bin.lines()));
    let rec: serde_json::Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["client"], "env-team");
    let unauthorized = bin
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains("\"aoai_lb::access\"") && l.contains("\"status\":401")
        })
        .unwrap();
    let unauthorized: serde_json::Value = serde_json::from_str(&unauthorized).unwrap();
    assert!(unauthorized["client"].is_null(), "{unauthorized}");

    let (_, _, view) = send(
        Method::GET,
        &format!("http://{admin_addr}/admin/clients"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    let view = String::from_utf8(view.to_vec()).unwrap();
    assert!(view.contains("env-team"), "{view}");
    for line in bin.all_text().iter().chain(std::iter::once(&view)) {
        assert!(
            !line.contains("env-old-secret-1") && !line.contains("env-new-secret-2"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn api_key_stays_client_default_next_to_named_clients() {
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"clients": [{"name": "team-a", "key": "team-a-key"}]}),
    );
    let (bin, addr) = spawn_gateway_binary(&doc);
    let url = format!("http://{addr}{}", chat_path("gpt-4o"));
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    let rec = bin
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains("\"aoai_lb::access\"")
        })
        .unwrap();
    let rec: serde_json::Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["client"], "default");
}

#[test]
fn refuses_bad_client_entries_on_one_line_naming_the_field() {
    let url = "https://a.example.com";
    let inst = format!(r#"{{"name":"a","url":"{url}","api_key":"backend-key"}}"#);
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!(
                r#"{{"instances":[{inst}],"clients":[{{"name":"a","key":"client-secret-9","rpm":"fast"}}]}}"#
            ),
            &["clients[0].rpm"],
        ),
        (
            format!(
                r#"{{"instances":[{inst}],"clients":[{{"name":"a","key":["client-secret-9"]}},{{"name":"b","key":"client-secret-9"}}]}}"#
            ),
            &["clients[1].key", "client \\\"a\\\""],
        ),
        (
            format!(r#"{{"instances":[{inst}],"clients":[{{"name":"a","key":12345678}}]}}"#),
            &["clients[0].key"],
        ),
        (
            format!(
                r#"{{"instances":[{inst}],"clients":[{{"name":"a","key_env":"NOT_SET_ANYWHERE_42"}}]}}"#
            ),
            &["clients[0].key_env[0]", "NOT_SET_ANYWHERE_42"],
        ),
        (
            format!(
                r#"{{"instances":[{inst}],"clients":[{{"name":"a","key":"client-secret-9","token_quota":{{"tokens":10,"period":"year"}}}}]}}"#
            ),
            &["clients[0].token_quota.period"],
        ),
    ];
    for (doc, expect) in cases {
        let (status, lines) = run_binary(&[], &[("OPENAI_INSTANCES", &doc)], EXIT_WAIT);
        assert_eq!(status.code(), Some(1), "{doc}: {lines:#?}");
        assert_eq!(lines.len(), 1, "exactly one line: {lines:#?}");
        let line = &lines[0].1;
        assert!(line.contains("invalid configuration"), "{line}");
        for e in expect {
            assert!(line.contains(e), "{e:?} not in {line}");
        }
        for secret in ["client-secret-9", "12345678", "backend-key"] {
            assert!(!line.contains(secret), "{secret} echoed: {line}");
        }
    }
}

#[test]
fn still_refuses_to_start_without_any_key_or_opt_out() {
    let sims_doc = r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"}]}"#;
    let (status, lines) = run_binary(&[], &[("OPENAI_INSTANCES", sims_doc)], EXIT_WAIT);
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].1.contains("API_KEY is not set"), "{lines:#?}");
}

#[tokio::test]
async fn the_demo_prints_and_serves_two_named_clients() {
    let port = free_port().to_string();
    let bin = spawn_binary(
        &["--demo", "--host", "127.0.0.1", "--admin-port", "0"],
        &[("PORT", &port), ("LOG_FORMAT", "json")],
    );
    let (addr, _) = bin.wait_listening(Duration::from_secs(20));
    for (name, key, _) in aoai_lb::demo::CLIENTS {
        let line = bin
            .wait_for_line(Duration::from_secs(5), |l| l.contains(key))
            .unwrap_or_else(|| panic!("{name}'s key printed: {:#?}", bin.lines()));
        assert!(line.contains(name), "{line}");
        let (s, h, _) = send(
            Method::POST,
            &format!("http://{addr}{}", chat_path("gpt-4o")),
            &key_headers(key),
            chat_body(false),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{name}");
        if name == "team-a" {
            assert_eq!(h["x-ratelimit-limit-requests"], "60");
        }
    }
    let (s, _, _) = send(
        Method::POST,
        &format!("http://{addr}{}", chat_path("gpt-4o-mini")),
        &key_headers(aoai_lb::demo::CLIENTS[0].1),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "team-a may use gpt-4o only");
}
