//! The rest of the Azure surface: images, audio, models, files, batches,
//! responses, the v1 routes and the realtime WebSocket.

use crate::common;

use aoai_sim::{InstanceConfig, Outcome};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BOUNDARY: &str = "simtestboundary";

fn form(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, data) in fields {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

async fn post_form(url: &str, body: Vec<u8>) -> Resp {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    send(
        Method::POST,
        url,
        &[("api-key", KEY), ("content-type", &ct)],
        body,
    )
    .await
}

async fn get(url: &str) -> Resp {
    send(Method::GET, url, &[("api-key", KEY)], "").await
}

#[tokio::test]
async fn images_return_urls_or_base64_png() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = format!(
        "{}/openai/deployments/dalle/images/generations?{V}",
        sim.url()
    );
    let v = post_json(&url, json!({"prompt":"a cat","n":2}))
        .await
        .json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["data"][0]["url"].as_str().unwrap().ends_with(".png"));
    assert_eq!(v["data"][0]["revised_prompt"], "a cat");
    let v = post_json(&url, json!({"prompt":"a cat","response_format":"b64_json"}))
        .await
        .json();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let r = post_json(&url, json!({"n":1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn transcription_honours_every_response_format() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = format!(
        "{}/openai/deployments/whisper/audio/transcriptions?{V}",
        sim.url()
    );
    let audio = vec![7u8; 3200];
    let r = post_form(&url, form(&[("file", Some("a.wav"), &audio)])).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["text"],
        "Simulated transcription of 3200 bytes of audio."
    );
    let r = post_form(
        &url,
        form(&[
            ("file", Some("a.wav"), &audio),
            ("response_format", None, b"text"),
        ]),
    )
    .await;
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(
        r.text(),
        "Simulated transcription of 3200 bytes of audio.\n"
    );
    let r = post_form(
        &url,
        form(&[
            ("file", Some("a.wav"), &audio),
            ("response_format", None, b"srt"),
        ]),
    )
    .await;
    assert!(
        r.text()
            .starts_with("1\n00:00:00,000 --> 00:00:01,000\nSimulated"),
        "{}",
        r.text()
    );
    let r = post_form(
        &url,
        form(&[
            ("file", Some("a.wav"), &audio),
            ("response_format", None, b"vtt"),
        ]),
    )
    .await;
    assert!(
        r.text()
            .starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n"),
        "{}",
        r.text()
    );
    let r = post_form(
        &url,
        form(&[
            ("file", Some("a.wav"), &audio),
            ("response_format", None, b"verbose_json"),
        ]),
    )
    .await;
    assert_eq!(r.json()["task"], "transcribe");
    let r = post_form(&url, form(&[("response_format", None, b"json")])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post_json(&url, json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let turl = format!(
        "{}/openai/deployments/whisper/audio/translations?{V}",
        sim.url()
    );
    let r = post_form(&turl, form(&[("file", Some("a.mp3"), b"abc")])).await;
    assert_eq!(
        r.json()["text"],
        "Simulated translation of 3 bytes of audio."
    );
}

#[tokio::test]
async fn speech_returns_audio_bytes_with_an_audio_content_type() {
    let sim = one(InstanceConfig::new("a")).await;
    let url = format!("{}/openai/deployments/tts/audio/speech?{V}", sim.url());
    let r = post_json(&url, json!({"input":"hello world","voice":"alloy"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("audio/mpeg"));
    assert!(r.body.len() > 100);
    let r = post_json(
        &url,
        json!({"input":"hello","voice":"alloy","response_format":"wav"}),
    )
    .await;
    assert_eq!(r.header("content-type"), Some("audio/wav"));
    assert_eq!(&r.body[..4], b"RIFF");
}

#[tokio::test]
async fn models_list_the_served_deployments() {
    let sim = one(InstanceConfig::new("a").deployments(&["gpt-4o", "emb"])).await;
    let v = get(&format!("{}/openai/models?{V}", sim.url()))
        .await
        .json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["gpt-4o", "emb"]);
    let v = get(&format!("{}/openai/v1/models", sim.url())).await.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&format!("{}/openai/models", sim.url())).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn files_round_trip_in_memory() {
    let sim = one(InstanceConfig::new("a")).await;
    let base = format!("{}/openai/files", sim.url());
    let content = b"{\"custom_id\":\"1\"}\n";
    let r = post_form(
        &format!("{base}?{V}"),
        form(&[
            ("purpose", None, b"batch"),
            ("file", Some("in.jsonl"), content),
        ]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let f = r.json();
    let id = f["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-"));
    assert_eq!(f["bytes"], content.len());
    assert_eq!(f["filename"], "in.jsonl");
    let list = get(&format!("{base}?{V}")).await.json();
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert_eq!(
        get(&format!("{base}/{id}?{V}")).await.json()["purpose"],
        "batch"
    );
    let c = get(&format!("{base}/{id}/content?{V}")).await;
    assert_eq!(&c.body[..], content);
    // The v1 surface sees the same store.
    assert_eq!(
        get(&format!("{}/openai/v1/files/{id}", sim.url()))
            .await
            .status,
        StatusCode::OK
    );
    let d = send(
        Method::DELETE,
        &format!("{base}/{id}?{V}"),
        &[("api-key", KEY)],
        "",
    )
    .await
    .json();
    assert_eq!(d["deleted"], true);
    assert_eq!(
        get(&format!("{base}/{id}?{V}")).await.status,
        StatusCode::NOT_FOUND
    );
    // Another instance does not know the id.
    let other = one(InstanceConfig::new("b")).await;
    let r = get(&format!("{}/openai/files/{id}?{V}", other.url())).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn batches_are_created_retrieved_and_listed() {
    let sim = one(InstanceConfig::new("a")).await;
    let lines = b"{\"custom_id\":\"r1\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\",\"messages\":[]}}\n{\"custom_id\":\"r2\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{\"model\":\"gpt-4o\",\"messages\":[]}}\n";
    let f = post_form(
        &format!("{}/openai/files?{V}", sim.url()),
        form(&[
            ("purpose", None, b"batch"),
            ("file", Some("b.jsonl"), lines),
        ]),
    )
    .await
    .json();
    let url = format!("{}/openai/batches?{V}", sim.url());
    let b = post_json(&url, json!({"input_file_id": f["id"], "endpoint": "/chat/completions", "completion_window": "24h"})).await.json();
    assert_eq!(b["object"], "batch");
    assert_eq!(b["status"], "validating");
    let id = b["id"].as_str().unwrap();
    let b = get(&format!("{}/openai/batches/{id}?{V}", sim.url()))
        .await
        .json();
    assert_eq!(b["status"], "completed");
    assert_eq!(b["request_counts"]["total"], 2);
    let out = get(&format!(
        "{}/openai/files/{}/content?{V}",
        sim.url(),
        b["output_file_id"].as_str().unwrap()
    ))
    .await
    .text();
    assert_eq!(out.lines().count(), 2);
    assert!(out.contains("\"custom_id\":\"r2\""));
    let list = get(&url).await.json();
    assert_eq!(list["data"][0]["id"], id);
    let bad = post_json(
        &url,
        json!({"input_file_id": "file-nope", "endpoint": "/chat/completions"}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn responses_are_stored_and_chain_through_previous_response_id() {
    let sim = one(InstanceConfig::new("a").deployments(&["gpt-4o"])).await;
    let url = format!(
        "{}/openai/responses?api-version=2025-04-01-preview",
        sim.url()
    );
    let first = post_json(&url, json!({"model":"gpt-4o","input":"hello"})).await;
    assert_eq!(first.status, StatusCode::OK);
    let first = first.json();
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"][0]["content"][0]["type"], "output_text");
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"));
    let got = get(&format!(
        "{}/openai/responses/{id}?api-version=2025-04-01-preview",
        sim.url()
    ))
    .await
    .json();
    assert_eq!(got["id"], id);
    let v1 = format!("{}/openai/v1/responses", sim.url());
    let second = post_json(
        &v1,
        json!({"model":"gpt-4o","input":"again","previous_response_id": id}),
    )
    .await
    .json();
    assert_eq!(second["previous_response_id"], id);
    assert!(
        second["usage"]["input_tokens"].as_u64().unwrap()
            > first["usage"]["total_tokens"].as_u64().unwrap()
    );
    let missing = post_json(
        &v1,
        json!({"model":"gpt-4o","input":"x","previous_response_id":"resp_nope"}),
    )
    .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.json()["error"]["code"],
        "previous_response_not_found"
    );
    let r = post_json(&v1, json!({"model":"other","input":"x"})).await;
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    // Dated responses still need api-version.
    let r = post_json(
        &format!("{}/openai/responses", sim.url()),
        json!({"model":"gpt-4o","input":"x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn streamed_response_emits_typed_events() {
    let sim = one(InstanceConfig::new("a").reply_tokens(2)).await;
    let r = post_json(
        &format!("{}/openai/v1/responses", sim.url()),
        json!({"model":"m","input":"hi","stream":true}),
    )
    .await;
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let text = r.text();
    let types: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(types.first(), Some(&"response.created"));
    assert_eq!(types.last(), Some(&"response.completed"));
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "response.output_text.delta")
            .count(),
        2
    );
}

#[tokio::test]
async fn v1_embeddings_take_the_deployment_from_model() {
    let sim = one(InstanceConfig::new("a")).await;
    let r = send(
        Method::POST,
        &format!("{}/openai/v1/embeddings", sim.url()),
        &[("authorization", "Bearer sim-key")],
        json!({"model":"emb","input":"x","dimensions":8}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["data"][0]["embedding"].as_array().unwrap().len(),
        8
    );
    let r = post_json(
        &format!("{}/openai/v1/embeddings", sim.url()),
        json!({"input":"x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn realtime_websocket_greets_and_answers() {
    let sim = one(InstanceConfig::new("a").reply_tokens(2)).await;
    let url = format!(
        "ws://{}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-rt",
        sim.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("api-key", KEY.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(resp.headers().get("apim-request-id").is_some());
    let next = |m: Option<Result<Message, _>>| -> serde_json::Value {
        match m.unwrap().unwrap() {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    let hello = next(recv(&mut ws).await);
    assert_eq!(hello["type"], "session.created");
    assert_eq!(hello["session"]["model"], "gpt-rt");
    ws.send(Message::text(
        json!({"type":"session.update","session":{"voice":"echo"}}).to_string(),
    ))
    .await
    .unwrap();
    let upd = next(recv(&mut ws).await);
    assert_eq!(upd["type"], "session.updated");
    assert_eq!(upd["session"]["voice"], "echo");
    ws.send(Message::text(json!({"type":"response.create"}).to_string()))
        .await
        .unwrap();
    let mut types = Vec::new();
    for _ in 0..20 {
        let v = next(recv(&mut ws).await);
        let t = v["type"].as_str().unwrap().to_owned();
        types.push(t.clone());
        if t == "response.done" {
            break;
        }
    }
    assert_eq!(
        types,
        [
            "response.created",
            "response.text.delta",
            "response.text.delta",
            "response.text.done",
            "response.done"
        ]
    );
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut ws).await.unwrap().unwrap(),
        Message::Binary(vec![1u8, 2, 3].into())
    );
    assert_eq!(sim.journal()[0].outcome, Outcome::Upgraded);
    assert_eq!(sim.journal()[0].status, 101);
    assert_eq!(sim.open_connections(), 1);
    sim.stop();
    let end = tokio::time::timeout(std::time::Duration::from_secs(2), ws.next())
        .await
        .unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
}

#[tokio::test]
async fn realtime_accepts_key_in_query_and_rejects_a_bad_one() {
    let sim = one(InstanceConfig::new("a")).await;
    let ok = format!(
        "ws://{}/openai/v1/realtime?model=m&api-key={KEY}",
        sim.addr()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ok).await.unwrap();
    assert!(matches!(recv(&mut ws).await, Some(Ok(Message::Text(_)))));
    assert_eq!(
        sim.journal()[0].query.as_deref(),
        Some("model=m&api-key=***")
    );
    let bad = format!(
        "ws://{}/openai/v1/realtime?model=m&api-key=nope",
        sim.addr()
    );
    let err = tokio_tungstenite::connect_async(bad).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("unexpected {other:?}"),
    }
}
