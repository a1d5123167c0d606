//! Realtime: a WebSocket upgrade at `/openai/realtime?deployment=` (dated) and
//! `/openai/v1/realtime?model=`. The server sends `session.created`, then answers
//! each client event minimally (`session.updated`, `conversation.item.created`,
//! a short text response to `response.create`, an `error` for unknown types) and
//! echoes binary frames, which is enough to test a gateway's pass-through.
//!
//! The upgraded socket stays tied to its connection record, so `stop()` kills it
//! and `open_connections()` counts it.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::azure;
use crate::openai::{reply_text, token_text};
use crate::server::ConnShared;
use crate::service::{Ctx, Payload, Reply, query_param};

pub(crate) fn upgrade(
    ctx: &Ctx,
    v1: bool,
    on: Option<hyper::upgrade::OnUpgrade>,
    conn: Arc<ConnShared>,
) -> Reply {
    let q = ctx.parts.uri.query();
    let dep = query_param(q, if v1 { "model" } else { "deployment" })
        .or_else(|| query_param(q, "deployment"))
        .filter(|d| !d.is_empty());
    let Some(dep) = dep else {
        return Reply::bad_request(
            "Missing required query parameter: 'deployment'.",
            Some("deployment"),
            None,
        );
    };
    if !ctx.inst.cfg.serves(dep) {
        return Reply::json(StatusCode::NOT_FOUND, azure::DEPLOYMENT_NOT_FOUND)
            .with_deployment(dep);
    }
    let h = &ctx.parts.headers;
    let is_ws = h
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h.get(http::header::SEC_WEBSOCKET_KEY);
    let (Some(on), true, Some(key)) = (on, is_ws, key) else {
        return Reply::json(
            StatusCode::BAD_REQUEST,
            r#"{"error":{"code":"BadRequest","message":"Expected a WebSocket upgrade request."}}"#,
        )
        .with_deployment(dep);
    };
    let accept = derive_accept_key(key.as_bytes());
    // Browsers need one of their offered subprotocols echoed back; pick the first.
    let protocol = h
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let mut r = Reply::new(
        StatusCode::SWITCHING_PROTOCOLS,
        crate::service::JSON,
        bytes::Bytes::new(),
    )
    .header("upgrade", "websocket")
    .header("connection", "Upgrade")
    .header("sec-websocket-accept", accept);
    if let Some(p) = protocol {
        r = r.header("sec-websocket-protocol", p);
    }
    r.payload = Payload::Upgrade;
    let model = ctx.inst.cfg.model.clone().unwrap_or_else(|| dep.to_owned());
    let tokens = ctx.inst.cfg.reply_tokens_for(Some(dep));
    tokio::spawn(async move {
        let kill = conn.kill.clone();
        tokio::select! {
            () = kill.cancelled() => {}
            () = session(on, model, tokens) => {}
        }
        drop(conn);
    });
    r.with_deployment(dep)
}

fn event(ty: &str, mut body: Value) -> Message {
    body["type"] = json!(ty);
    body["event_id"] = json!(format!("event_{}", azure::uuid().replace('-', "")));
    Message::text(body.to_string())
}

async fn session(on: hyper::upgrade::OnUpgrade, model: String, tokens: u32) {
    let Ok(upgraded) = on.await else {
        return;
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let session_id = format!("sess_{}", azure::uuid().replace('-', ""));
    let mut session = json!({
        "id": session_id,
        "object": "realtime.session",
        "model": model,
        "modalities": ["text", "audio"],
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "turn_detection": null,
        "tools": [],
    });
    if ws
        .send(event("session.created", json!({ "session": session })))
        .await
        .is_err()
    {
        return;
    }
    while let Some(msg) = ws.next().await {
        let Ok(msg) = msg else { return };
        let replies: Vec<Message> = match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                let client_event = v.get("event_id").cloned().unwrap_or(Value::Null);
                match v.get("type").and_then(Value::as_str) {
                    Some("session.update") => {
                        if let Some(Value::Object(upd)) = v.get("session") {
                            for (k, val) in upd {
                                session[k] = val.clone();
                            }
                        }
                        vec![event("session.updated", json!({ "session": session }))]
                    }
                    Some("conversation.item.create") => {
                        let mut item = v.get("item").cloned().unwrap_or_else(|| json!({}));
                        if item.get("id").is_none() {
                            item["id"] = json!(format!("item_{}", azure::uuid().replace('-', "")));
                        }
                        vec![event(
                            "conversation.item.created",
                            json!({"previous_item_id": null, "item": item}),
                        )]
                    }
                    Some("input_audio_buffer.append") => vec![],
                    Some("input_audio_buffer.commit") => vec![event(
                        "input_audio_buffer.committed",
                        json!({"previous_item_id": null, "item_id": format!("item_{}", azure::uuid().replace('-', ""))}),
                    )],
                    Some("response.create") => response_events(tokens),
                    _ => vec![event(
                        "error",
                        json!({"error": {
                            "type": "invalid_request_error",
                            "code": "invalid_value",
                            "message": "Invalid or unknown client event type.",
                            "param": "type",
                            "event_id": client_event,
                        }}),
                    )],
                }
            }
            Message::Binary(b) => vec![Message::Binary(b)],
            Message::Close(_) => {
                let _ = ws.close(None).await;
                return;
            }
            _ => vec![],
        };
        for r in replies {
            if ws.send(r).await.is_err() {
                return;
            }
        }
    }
}

fn response_events(tokens: u32) -> Vec<Message> {
    let resp_id = format!("resp_{}", azure::uuid().replace('-', ""));
    let item_id = format!("item_{}", azure::uuid().replace('-', ""));
    let mut out = vec![event(
        "response.created",
        json!({"response": {"id": resp_id, "object": "realtime.response", "status": "in_progress", "output": []}}),
    )];
    for i in 0..tokens {
        out.push(event(
            "response.text.delta",
            json!({"response_id": resp_id, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": token_text(i)}),
        ));
    }
    let text = reply_text(tokens);
    out.push(event(
        "response.text.done",
        json!({"response_id": resp_id, "item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
    ));
    out.push(event(
        "response.done",
        json!({"response": {
            "id": resp_id, "object": "realtime.response", "status": "completed",
            "output": [{"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
                        "role": "assistant", "content": [{"type": "text", "text": text}]}],
            "usage": {"total_tokens": 1 + tokens, "input_tokens": 1, "output_tokens": tokens},
        }}),
    ));
    out
}
