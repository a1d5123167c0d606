//! The Responses API: create (deployment from the body `model`), stored per
//! instance so that retrieve and `previous_response_id` work, with the typed SSE
//! events of a streamed response.
//!
//! Input tokens use the chat framing (see `tokens`): `instructions` as a
//! system message, a string `input` as one user message, each input item as a
//! message. A follow-up response counts the previous response's total tokens as
//! part of its input, as the service does when it replays the conversation.
//! Usage arrives in the body and, streamed, in `response.completed`.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::azure;
use crate::body::Timed;
use crate::openai::{
    billing, cached, deployment, encoding, latency, model_json, plan, reply_text, token_text, usage,
};
use crate::service::{Ctx, Op, Payload, Reply, SSE};
use crate::tokens::Prompt;

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
    #[serde(default)]
    tools: Option<Value>,
}

/// The framed prompt of a request: instructions, then the input.
fn prompt(ctx: &Ctx, dep: &str, req: &ResponseRequest) -> Prompt {
    let enc = encoding(ctx, dep);
    let mut p = Prompt::default();
    if let Some(i) = &req.instructions {
        p.message(enc, &json!({"role": "system", "content": i}));
    }
    match &req.input {
        Value::Array(items) => {
            for it in items {
                p.message(enc, it);
            }
        }
        Value::Null => {}
        other => p.message(enc, &json!({"role": "user", "content": other})),
    }
    p.finish();
    p.tools(enc, req.tools.as_ref());
    p
}

pub(crate) fn create(ctx: &Ctx) -> Result<Reply, Reply> {
    let req: ResponseRequest = ctx.json()?;
    let dep = deployment(None, req.model.as_deref())?;
    let prompt = prompt(ctx, dep, &req);
    let mut input_tokens = prompt.tokens();
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
    let remaining = ctx.admit(dep, Op::Responses, prompt.estimate() + p.reserve)?;
    ctx.filter(&prompt.text)
        .map_err(|e| e.with_deployment(dep))?;
    let u = usage(input_tokens, cached(ctx, dep, &prompt), &p, 1);
    let id = format!("resp_{}", azure::uuid().replace('-', ""));
    let msg_id = format!("msg_{}", azure::uuid().replace('-', ""));
    let model: Value = serde_json::from_str(&model_json(ctx, dep)).unwrap_or(Value::Null);
    let text = reply_text(p.tokens);
    let status = if p.finish == "length" {
        "incomplete"
    } else {
        "completed"
    };
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
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens(),
        },
        "user": null,
        "metadata": {},
    });
    if req.store.unwrap_or(true) {
        ctx.inst.store.put_response(id.clone(), full.clone());
    }
    let (ttft, per_tok) = latency(ctx, dep);
    let thinking = per_tok * p.reasoning;
    let stream = req.stream.unwrap_or(false);
    let mut reply = if stream {
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(stream_events(ctx, dep, &full, &msg_id, p.tokens, per_tok));
        r.delay = ctx.delay(Some(dep), ttft + thinking);
        r.header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
    } else {
        let mut r = Reply::ok_json(full.to_string());
        r.delay = ctx.delay(Some(dep), ttft + thinking + per_tok * p.tokens);
        r
    };
    reply.billing = Some(billing(dep, &u, stream));
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
        // Each text delta carries one output token.
        let tokens = u32::from(ty == "response.output_text.delta");
        frames.push_back(Timed {
            delay,
            data: Bytes::from(format!("event: {ty}\ndata: {v}\n\n")),
            tokens,
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
