//! Stateful-object affinity: files, batches and stored responses live on the
//! instance that created them, and follow-up requests must reach it.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aoai_sim::SimHandle;
use common::*;
use http::{Method, StatusCode};

const API: &str = "api-version=2025-04-01-preview";

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// How many requests each instance received for paths containing `needle`.
fn hits(sims: &[SimHandle], needle: &str) -> Vec<usize> {
    sims.iter()
        .map(|s| {
            s.journal()
                .iter()
                .filter(|e| e.path.contains(needle))
                .count()
        })
        .collect()
}

async fn upload(gw: &str, content: &str) -> (String, serde_json::Value) {
    let (ct, body) = multipart_file(content);
    let mut h: Vec<_> = auth()
        .into_iter()
        .filter(|(k, _)| *k != "content-type")
        .collect();
    h.push(("content-type", ct));
    let (s, _, b) = send(Method::POST, &format!("{gw}/openai/files?{API}"), &h, body).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    (v["id"].as_str().unwrap().to_owned(), v)
}

#[tokio::test]
async fn follow_up_requests_reach_the_instance_that_created_the_file() {
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (id, _) = upload(&gw.url(), "{\"custom_id\":\"1\"}\n").await;
    let owner = hits(&sims, "/openai/files")
        .iter()
        .position(|&n| n == 1)
        .unwrap();
    for s in &sims {
        s.clear_journal();
    }

    for _ in 0..10 {
        let (s, _, b) = send(
            Method::GET,
            &format!("{}/openai/files/{id}?{API}", gw.url()),
            &auth(),
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["id"], id.as_str());
    }
    let (s, _, content) = send(
        Method::GET,
        &format!("{}/openai/files/{id}/content?{API}", gw.url()),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&content[..], b"{\"custom_id\":\"1\"}\n");

    let counts = hits(&sims, &id);
    assert_eq!(counts[owner], 11, "{counts:?}");
    assert_eq!(
        counts.iter().sum::<usize>(),
        11,
        "only the owner was asked: {counts:?}"
    );
}

#[tokio::test]
async fn an_unknown_object_is_looked_up_across_instances_and_then_remembered() {
    let sims = sims(3).await;
    // Created straight on the last instance: the gateway never saw it.
    let (ct, body) = multipart_file("x");
    let (s, _, b) = send(
        Method::POST,
        &format!("{}/openai/files?{API}", sims[2].url()),
        &[("api-key", "sim-key".to_owned()), ("content-type", ct)],
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let id = json(&b)["id"].as_str().unwrap().to_owned();
    sims[2].clear_journal();

    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}/openai/files/{id}?{API}", gw.url());
    let (s, _, b) = send(Method::GET, &url, &auth(), "").await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a 404 from another instance is not final"
    );
    assert_eq!(json(&b)["id"], id.as_str());
    assert_eq!(hits(&sims, &id)[2], 1);

    for s in &sims {
        s.clear_journal();
    }
    let (s, _, _) = send(Method::GET, &url, &auth(), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        hits(&sims, &id),
        vec![0, 0, 1],
        "remembered after the look-up"
    );
}

#[tokio::test]
async fn an_object_no_instance_holds_gets_the_instances_404() {
    let sims = sims(2).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (s, _, b) = send(
        Method::GET,
        &format!("{}/openai/files/file-doesnotexist?{API}", gw.url()),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(json(&b)["error"].is_object());
    assert_eq!(
        hits(&sims, "file-doesnotexist"),
        vec![1, 1],
        "each asked once"
    );
}

#[tokio::test]
async fn a_batch_goes_to_the_instance_that_holds_its_input_file() {
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let line = r#"{"custom_id":"r1","method":"POST","url":"/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}}"#;
    let (file_id, _) = upload(&gw.url(), &format!("{line}\n")).await;
    let owner = hits(&sims, "/openai/files")
        .iter()
        .position(|&n| n == 1)
        .unwrap();

    let h = auth();
    for _ in 0..5 {
        let body = format!(
            r#"{{"input_file_id":"{file_id}","endpoint":"/chat/completions","completion_window":"24h"}}"#
        );
        let (s, _, b) = send(
            Method::POST,
            &format!("{}/openai/batches?{API}", gw.url()),
            &h,
            body,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let batch = json(&b)["id"].as_str().unwrap().to_owned();
        let (s, _, _) = send(
            Method::GET,
            &format!("{}/openai/batches/{batch}?{API}", gw.url()),
            &auth(),
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    let created = hits(&sims, "/openai/batches");
    assert_eq!(created[owner], 10, "{created:?}");
    assert_eq!(created.iter().sum::<usize>(), 10, "{created:?}");
}

#[tokio::test]
async fn a_previous_response_id_chain_stays_on_one_instance() {
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let h = auth();
    let url = format!("{}/openai/v1/responses", gw.url());
    let (s, _, b) = send(
        Method::POST,
        &url,
        &h,
        r#"{"model":"gpt-4o","input":"first"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let mut prev = json(&b)["id"].as_str().unwrap().to_owned();
    for turn in 0..6 {
        let body = format!(
            r#"{{"model":"gpt-4o","input":"turn {turn}","previous_response_id":"{prev}"}}"#
        );
        let (s, _, b) = send(Method::POST, &url, &h, body).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        prev = json(&b)["id"].as_str().unwrap().to_owned();
    }
    let served = hits(&sims, "/responses");
    assert_eq!(served.iter().filter(|&&n| n > 0).count(), 1, "{served:?}");
    assert_eq!(
        served.iter().sum::<usize>(),
        7,
        "no look-ups needed: {served:?}"
    );
}

#[tokio::test]
async fn file_lists_are_merged_across_instances() {
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(upload(&gw.url(), &format!("{i}\n")).await.0);
    }
    let holders = hits(&sims, "/openai/files");
    assert!(
        holders.iter().filter(|&&n| n > 0).count() >= 2,
        "uploads spread over instances: {holders:?}"
    );
    let (s, _, b) = send(
        Method::GET,
        &format!("{}/openai/files?{API}", gw.url()),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["object"], "list");
    let mut listed: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
}

#[tokio::test]
async fn deleting_a_file_reaches_its_instance() {
    let sims = sims(2).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (id, _) = upload(&gw.url(), "x\n").await;
    let url = format!("{}/openai/files/{id}?{API}", gw.url());
    let (s, _, b) = send(Method::DELETE, &url, &auth(), "").await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["deleted"], true);
    let (s, _, _) = send(Method::GET, &url, &auth(), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unknown_previous_response_id_in_the_body_is_looked_up_too() {
    let sims = sims(3).await;
    // Created straight on the last instance: as after a restart, or
    // through another replica of the gateway.
    let (s, _, b) = send(
        Method::POST,
        &format!("{}/openai/v1/responses", sims[2].url()),
        &[
            ("api-key", "sim-key".to_owned()),
            ("content-type", "application/json".to_owned()),
        ],
        r#"{"model":"gpt-4o","input":"first"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let prev = json(&b)["id"].as_str().unwrap().to_owned();

    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    for turn in 0..3 {
        let body = format!(
            r#"{{"model":"gpt-4o","input":"turn {turn}","previous_response_id":"{prev}"}}"#
        );
        let (s, _, b) = send(
            Method::POST,
            &format!("{}/openai/v1/responses", gw.url()),
            &auth(),
            body,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    }
    let served: Vec<usize> = sims
        .iter()
        .map(|s| {
            s.journal()
                .iter()
                .filter(|e| e.path.ends_with("/responses") && e.status == 200)
                .count()
        })
        .collect();
    assert_eq!(served, vec![0, 0, 4], "every turn served by the holder");
}
