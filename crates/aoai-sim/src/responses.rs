//! The Responses API: create (deployment from the body `model`), stored per
//! instance so that retrieve and `previous_response_id` work, with the typed SSE
//! events of a streamed response.
//!
//! A follow-up response counts the previous response's total tokens as part of
//! its input, as the service does when it replays the conversation.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::azure;
use crate::body::Timed;
use crate::openai::{
    deployment, estimate_tokens, latency, plan, push_text, reply_text, token_text,
};
use crate::service::{Ctx, Op, Payload, Reply, SSE};

#[derive(Deserialize)]
struct ResponseRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    store: Option<bool>,
}

fn input_text(v: &Value, out: &mut String) {
    match v {
        Value::Array(items) => {
            for it in items {
                match it.get("content") {
                    Some(c) => push_text(c, out),
                    None => push_text(it, out),
                }
            }
        }
        other => push_text(other, out),
    }
}

pub(crate) fn create(ctx: &Ctx) -> Result<Reply, Reply> {
    let req: ResponseRequest = ctx.json()?;
    let dep = deployment(None, req.model.as_deref())?;
    let mut prompt = String::new();
    if let Some(i) = &req.instructions {
        prompt.push_str(i);
        prompt.push('\n');
    }
    input_text(&req.input, &mut prompt);
    let mut input_tokens = estimate_tokens(&prompt);
    if let Some(prev) = &req.previous_response_id {
        let Some(p) = ctx.inst.store.response(prev) else {
            return Err(Reply::bad_request(
                &format!("Previous response with id '{prev}' not found."),
                Some("previous_response_id"),
                Some("previous_response_not_found"),
            )
            .with_deployment(dep));
        };
        input_tokens += p["usage"]["total_tokens"].as_u64().unwrap_or(0);
    }
    let p = plan(ctx, dep, req.max_output_tokens);
    let remaining = ctx.admit(dep, Op::Responses, input_tokens + p.cost_tokens)?;
    ctx.filter(&prompt).map_err(|e| e.with_deployment(dep))?;
    let id = format!("resp_{}", azure::uuid().replace('-', ""));
    let msg_id = format!("msg_{}", azure::uuid().replace('-', ""));
    let model = ctx.inst.cfg.model.clone().unwrap_or_else(|| dep.to_owned());
    let text = reply_text(p.tokens);
    let status = if p.finish == "length" {
        "incomplete"
    } else {
        "completed"
    };
    let output_tokens = u64::from(p.tokens);
    let message = json!({
        "type": "message",
        "id": msg_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    });
    let full = json!({
        "id": id,
        "object": "response",
        "created_at": azure::unix_now(),
        "status": status,
        "error": null,
        "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": [message],
        "parallel_tool_calls": true,
        "previous_response_id": req.previous_response_id,
        "store": req.store.unwrap_or(true),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": null,
        "metadata": {},
    });
    if req.store.unwrap_or(true) {
        ctx.inst.store.put_response(id.clone(), full.clone());
    }
    let (ttft, per_tok) = latency(ctx, dep);
    let mut reply = if req.stream.unwrap_or(false) {
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(stream_events(ctx, dep, &full, &msg_id, p.tokens, per_tok));
        r.delay = ctx.delay(Some(dep), ttft);
        r.header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
    } else {
        let mut r = Reply::ok_json(full.to_string());
        r.delay = ctx.delay(Some(dep), ttft + per_tok * p.tokens);
        r
    };
    reply.remaining = Some(remaining);
    Ok(reply.with_deployment(dep))
}

/// The typed events of a streamed response, each `event: <type>` + `data:`.
fn stream_events(
    ctx: &Ctx,
    dep: &str,
    full: &Value,
    msg_id: &str,
    tokens: u32,
    per_tok: Duration,
) -> VecDeque<Timed> {
    let mut seq = 0u64;
    let mut frames = VecDeque::new();
    let mut push = |delay: Duration, mut v: Value| {
        v["sequence_number"] = json!(seq);
        seq += 1;
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        frames.push_back(Timed {
            delay,
            data: Bytes::from(format!("event: {ty}\ndata: {v}\n\n")),
        });
    };
    let mut pending = full.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    push(
        Duration::ZERO,
        json!({"type": "response.created", "response": pending}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.in_progress", "response": pending}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    for i in 0..tokens {
        push(
            ctx.delay(Some(dep), per_tok),
            json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0, "content_index": 0,
                   "delta": token_text(i)}),
        );
    }
    let text = full["output"][0]["content"][0]["text"].clone();
    push(
        Duration::ZERO,
        json!({"type": "response.output_text.done", "item_id": msg_id, "output_index": 0, "content_index": 0, "text": text}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.content_part.done", "item_id": msg_id, "output_index": 0, "content_index": 0,
               "part": full["output"][0]["content"][0]}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.output_item.done", "output_index": 0, "item": full["output"][0]}),
    );
    push(
        Duration::ZERO,
        json!({"type": "response.completed", "response": full}),
    );
    frames
}
