//! The inference operations that bill tokens: chat completions, completions and
//! embeddings, non-streamed and streamed, with Azure's framing and annotations.
//!
//! Token accounting is deliberately simple and documented: a prompt costs
//! `ceil(chars / 4)` tokens (at least 1); a reply is one token per word; the quota
//! charge is the prompt estimate plus `max_tokens` (or `max_completion_tokens`),
//! or plus the reply length the simulator will generate when neither is sent.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::azure::{self, FILTER_RESULTS_SAFE};
use crate::body::Timed;
use crate::service::{Ctx, Op, Payload, Reply, SSE};

/// Words a reply is made of; token `i` is `WORDS[i % len]`.
const WORDS: [&str; 16] = [
    "This",
    "is",
    "a",
    "simulated",
    "reply",
    "from",
    "the",
    "Azure",
    "OpenAI",
    "simulator",
    "with",
    "deterministic",
    "words",
    "and",
    "steady",
    "pace.",
];

/// The first SSE event of every chat stream: Azure's prompt annotation.
static PROMPT_FILTER_EVENT: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(format!(
        "data: {{\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"prompt_filter_results\":[{{\"prompt_index\":0,\"content_filter_results\":{FILTER_RESULTS_SAFE}}}],\"choices\":[],\"usage\":null}}\n\n"
    ))
});

/// The final SSE event of every stream.
pub(crate) const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Estimated tokens of a prompt: `ceil(chars / 4)`, at least 1.
pub(crate) fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// Text of reply token `i` (a leading space on all but the first).
pub(crate) fn token_text(i: u32) -> String {
    let w = WORDS[i as usize % WORDS.len()];
    if i == 0 {
        w.to_owned()
    } else {
        format!(" {w}")
    }
}

/// A whole reply of `n` tokens.
pub(crate) fn reply_text(n: u32) -> String {
    let mut s = String::with_capacity(n as usize * 8);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[i as usize % WORDS.len()]);
    }
    s
}

/// Append the text of a message `content` (string or array of parts) to `out`.
pub(crate) fn push_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => {
                        out.push_str(s);
                        out.push('\n');
                    }
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push_str(t);
                            out.push('\n');
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The deployment a request addresses: the path's, else the body's `model`.
pub(crate) fn deployment<'a>(
    path_dep: Option<&'a str>,
    model: Option<&'a str>,
) -> Result<&'a str, Reply> {
    match path_dep.or(model) {
        Some(d) if !d.is_empty() => Ok(d),
        _ => Err(Reply::bad_request(
            "Missing required parameter: 'model'.",
            Some("model"),
            Some("missing_required_parameter"),
        )),
    }
}

/// How long the reply is and why it stops.
pub(crate) struct Plan {
    pub(crate) tokens: u32,
    pub(crate) finish: &'static str,
    pub(crate) cost_tokens: u64,
}

pub(crate) fn plan(ctx: &Ctx, dep: &str, max: Option<u32>) -> Plan {
    let reply = ctx.inst.cfg.reply_tokens_for(Some(dep));
    let (tokens, finish) = match max {
        Some(m) if m < reply => (m, "length"),
        _ => (reply, "stop"),
    };
    Plan {
        tokens,
        finish,
        cost_tokens: u64::from(max.unwrap_or(reply)),
    }
}

/// The model name reported in bodies, JSON-quoted.
pub(crate) fn model_json(ctx: &Ctx, dep: &str) -> String {
    let m = ctx.inst.cfg.model.as_deref().unwrap_or(dep);
    serde_json::to_string(m).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Time to first token and per-token delay for `dep`, unjittered.
pub(crate) fn latency(ctx: &Ctx, dep: &str) -> (Duration, Duration) {
    let l = ctx.inst.cfg.latency_for(Some(dep));
    (
        Duration::from_millis(l.ttft_ms),
        Duration::from_millis(l.per_token_ms),
    )
}

/// Run one deployment-scoped operation.
pub(crate) fn operation(ctx: &Ctx, path_dep: Option<&str>, op: Op) -> Reply {
    let r = match op {
        Op::Chat => chat(ctx, path_dep),
        Op::Completions => completions(ctx, path_dep),
        Op::Embeddings => embeddings(ctx, path_dep),
        Op::Images | Op::ImageEdits => crate::media::images(ctx, path_dep, op),
        Op::Transcriptions | Op::Translations => crate::media::transcribe(ctx, path_dep, op),
        Op::Speech => crate::media::speech(ctx, path_dep),
        Op::Responses => crate::responses::create(ctx),
    };
    r.unwrap_or_else(|e| e)
}

fn sse(json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}

fn frame(delay: Duration, data: Bytes) -> Timed {
    Timed { delay, data }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Option<Vec<Message>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    model: Option<String>,
}

fn usage_json(prompt: u64, completion: u64) -> String {
    format!(
        r#"{{"completion_tokens":{completion},"completion_tokens_details":{{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0}},"prompt_tokens":{prompt},"prompt_tokens_details":{{"audio_tokens":0,"cached_tokens":0}},"total_tokens":{}}}"#,
        prompt + completion
    )
}

fn chat(ctx: &Ctx, path_dep: Option<&str>) -> Result<Reply, Reply> {
    let req: ChatRequest = ctx.json()?;
    let dep = deployment(path_dep, req.model.as_deref())?;
    let Some(messages) = req.messages.as_ref().filter(|m| !m.is_empty()) else {
        return Err(Reply::bad_request(
            "'messages' is a required property",
            Some("messages"),
            None,
        )
        .with_deployment(dep));
    };
    let mut prompt = String::new();
    for m in messages {
        push_text(&m.content, &mut prompt);
    }
    let prompt_tokens = estimate_tokens(&prompt);
    let p = plan(ctx, dep, req.max_completion_tokens.or(req.max_tokens));
    let n = req.n.unwrap_or(1).clamp(1, 10);
    let remaining = ctx.admit(dep, Op::Chat, prompt_tokens + p.cost_tokens * u64::from(n))?;
    ctx.filter(&prompt).map_err(|e| e.with_deployment(dep))?;
    let model = model_json(ctx, dep);
    let id = azure::object_id("chatcmpl-");
    let created = azure::unix_now();
    let (ttft, per_tok) = latency(ctx, dep);
    let mut reply = if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let frames = chat_stream_frames(
            ctx,
            dep,
            &id,
            created,
            &model,
            &p,
            per_tok,
            include_usage.then_some(prompt_tokens),
        );
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(frames);
        r.delay = ctx.delay(Some(dep), ttft);
        r.header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
    } else {
        let text = reply_text(p.tokens);
        let mut s = String::with_capacity(900 + text.len() * n as usize);
        s.push_str(r#"{"choices":["#);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                r#"{{"content_filter_results":{FILTER_RESULTS_SAFE},"finish_reason":"{}","index":{i},"logprobs":null,"message":{{"annotations":[],"content":"{text}","refusal":null,"role":"assistant"}}}}"#,
                p.finish
            );
        }
        let _ = write!(
            s,
            r#"],"created":{created},"id":"{id}","model":{model},"object":"chat.completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{FILTER_RESULTS_SAFE}}}],"system_fingerprint":"fp_sim","usage":{}}}"#,
            usage_json(prompt_tokens, u64::from(p.tokens) * u64::from(n))
        );
        let mut r = Reply::ok_json(s);
        r.delay = ctx.delay(Some(dep), ttft + per_tok * p.tokens);
        r
    };
    reply.remaining = Some(remaining);
    Ok(reply.with_deployment(dep))
}

#[allow(clippy::too_many_arguments)]
fn chat_stream_frames(
    ctx: &Ctx,
    dep: &str,
    id: &str,
    created: u64,
    model: &str,
    p: &Plan,
    per_tok: Duration,
    usage_prompt: Option<u64>,
) -> VecDeque<Timed> {
    let mut frames = VecDeque::with_capacity(p.tokens as usize + 5);
    let head = format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"system_fingerprint":"fp_sim","choices":[{{"index":0,"delta":"#
    );
    frames.push_back(frame(Duration::ZERO, PROMPT_FILTER_EVENT.clone()));
    frames.push_back(frame(
        Duration::ZERO,
        sse(&format!(
            r#"{head}{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null,"content_filter_results":{{}}}}],"usage":null}}"#
        )),
    ));
    for i in 0..p.tokens {
        let t = token_text(i);
        frames.push_back(frame(
            ctx.delay(Some(dep), per_tok),
            sse(&format!(
                r#"{head}{{"content":"{t}"}},"logprobs":null,"finish_reason":null,"content_filter_results":{FILTER_RESULTS_SAFE}}}],"usage":null}}"#
            )),
        ));
    }
    frames.push_back(frame(
        Duration::ZERO,
        sse(&format!(
            r#"{head}{{}},"logprobs":null,"finish_reason":"{}","content_filter_results":{{}}}}],"usage":null}}"#,
            p.finish
        )),
    ));
    if let Some(prompt) = usage_prompt {
        frames.push_back(frame(
            Duration::ZERO,
            sse(&format!(
                r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"system_fingerprint":"fp_sim","choices":[],"usage":{}}}"#,
                usage_json(prompt, u64::from(p.tokens))
            )),
        ));
    }
    frames.push_back(frame(Duration::ZERO, Bytes::from_static(DONE_EVENT)));
    frames
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    model: Option<String>,
}

fn completions(ctx: &Ctx, path_dep: Option<&str>) -> Result<Reply, Reply> {
    let req: CompletionRequest = ctx.json()?;
    let dep = deployment(path_dep, req.model.as_deref())?;
    let mut prompt = String::new();
    push_text(&req.prompt, &mut prompt);
    let prompt_tokens = estimate_tokens(&prompt);
    // Completions default to 16 tokens when max_tokens is absent, as the API does.
    let p = plan(ctx, dep, Some(req.max_tokens.unwrap_or(16)));
    let remaining = ctx.admit(dep, Op::Completions, prompt_tokens + p.cost_tokens)?;
    ctx.filter(&prompt).map_err(|e| e.with_deployment(dep))?;
    let model = model_json(ctx, dep);
    let id = azure::object_id("cmpl-");
    let created = azure::unix_now();
    let (ttft, per_tok) = latency(ctx, dep);
    let usage = format!(
        r#"{{"completion_tokens":{},"prompt_tokens":{prompt_tokens},"total_tokens":{}}}"#,
        p.tokens,
        prompt_tokens + u64::from(p.tokens)
    );
    let mut reply = if req.stream.unwrap_or(false) {
        let mut frames = VecDeque::with_capacity(p.tokens as usize + 4);
        frames.push_back(frame(Duration::ZERO, PROMPT_FILTER_EVENT.clone()));
        let head = format!(
            r#"{{"id":"{id}","object":"text_completion","created":{created},"model":{model},"choices":[{{"text":"#
        );
        for i in 0..p.tokens {
            frames.push_back(frame(
                ctx.delay(Some(dep), per_tok),
                sse(&format!(
                    r#"{head}"{}","index":0,"logprobs":null,"finish_reason":null,"content_filter_results":{FILTER_RESULTS_SAFE}}}],"usage":null}}"#,
                    token_text(i)
                )),
            ));
        }
        frames.push_back(frame(
            Duration::ZERO,
            sse(&format!(
                r#"{head}"","index":0,"logprobs":null,"finish_reason":"{}","content_filter_results":{{}}}}],"usage":null}}"#,
                p.finish
            )),
        ));
        if req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
        {
            frames.push_back(frame(
                Duration::ZERO,
                sse(&format!(
                    r#"{{"id":"{id}","object":"text_completion","created":{created},"model":{model},"choices":[],"usage":{usage}}}"#
                )),
            ));
        }
        frames.push_back(frame(Duration::ZERO, Bytes::from_static(DONE_EVENT)));
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(frames);
        r.delay = ctx.delay(Some(dep), ttft);
        r.header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
    } else {
        let body = format!(
            r#"{{"choices":[{{"content_filter_results":{FILTER_RESULTS_SAFE},"finish_reason":"{}","index":0,"logprobs":null,"text":"{}"}}],"created":{created},"id":"{id}","model":{model},"object":"text_completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{FILTER_RESULTS_SAFE}}}],"system_fingerprint":null,"usage":{usage}}}"#,
            p.finish,
            reply_text(p.tokens)
        );
        let mut r = Reply::ok_json(body);
        r.delay = ctx.delay(Some(dep), ttft + per_tok * p.tokens);
        r
    };
    reply.remaining = Some(remaining);
    Ok(reply.with_deployment(dep))
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    input: Value,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

/// Largest accepted `dimensions`.
const MAX_DIMENSIONS: usize = 8192;

/// A unit vector determined only by `seed_text`; asking for fewer dimensions
/// gives the renormalised prefix, as text-embedding-3 models do.
pub fn embedding_vector(seed_text: &[u8], dims: usize) -> Vec<f32> {
    let h = Sha256::digest(seed_text);
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&h[..8]);
    let mut rng = fastrand::Rng::with_seed(u64::from_le_bytes(seed));
    let mut v: Vec<f32> = (0..dims).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

fn embeddings(ctx: &Ctx, path_dep: Option<&str>) -> Result<Reply, Reply> {
    let req: EmbeddingRequest = ctx.json()?;
    let dep = deployment(path_dep, req.model.as_deref())?;
    // Each input is identified by its exact text (or its token array's JSON).
    let inputs: Vec<(Vec<u8>, u64)> = match &req.input {
        Value::String(s) => vec![(s.as_bytes().to_vec(), estimate_tokens(s))],
        Value::Array(items) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                vec![(req.input.to_string().into_bytes(), items.len() as u64)]
            } else {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::String(s) => out.push((s.as_bytes().to_vec(), estimate_tokens(s))),
                        Value::Array(toks) if toks.iter().all(Value::is_number) => {
                            out.push((it.to_string().into_bytes(), toks.len() as u64));
                        }
                        _ => return Err(invalid_input(dep)),
                    }
                }
                out
            }
        }
        _ => return Err(invalid_input(dep)),
    };
    let dims = req.dimensions.unwrap_or(ctx.inst.cfg.embedding_dimensions);
    if dims == 0 || dims > MAX_DIMENSIONS {
        return Err(Reply::bad_request(
            &format!("Invalid value for 'dimensions': {dims}."),
            Some("dimensions"),
            Some("invalid_value"),
        )
        .with_deployment(dep));
    }
    let prompt_tokens: u64 = inputs.iter().map(|(_, t)| t).sum();
    let remaining = ctx.admit(dep, Op::Embeddings, prompt_tokens)?;
    let base64 = req.encoding_format.as_deref() == Some("base64");
    let mut s = String::with_capacity(64 + inputs.len() * dims * 12);
    s.push_str(r#"{"data":["#);
    for (i, (text, _)) in inputs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = embedding_vector(text, dims);
        s.push_str(r#"{"embedding":"#);
        if base64 {
            use base64::Engine as _;
            let mut raw = Vec::with_capacity(v.len() * 4);
            for x in &v {
                raw.extend_from_slice(&x.to_le_bytes());
            }
            s.push('"');
            s.push_str(&base64::engine::general_purpose::STANDARD.encode(raw));
            s.push('"');
        } else {
            s.push_str(&serde_json::to_string(&v).unwrap_or_default());
        }
        let _ = write!(s, r#","index":{i},"object":"embedding"}}"#);
    }
    let _ = write!(
        s,
        r#"],"model":{},"object":"list","usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#,
        model_json(ctx, dep)
    );
    let mut r = Reply::ok_json(s);
    let (ttft, _) = latency(ctx, dep);
    r.delay = ctx.delay(Some(dep), ttft);
    r.remaining = Some(remaining);
    Ok(r.with_deployment(dep))
}

fn invalid_input(dep: &str) -> Reply {
    Reply::bad_request("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", Some("input"), None)
        .with_deployment(dep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_rounds_up_and_is_never_zero() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[test]
    fn reply_has_one_word_per_token() {
        assert_eq!(reply_text(3), "This is a");
        assert_eq!(reply_text(0), "");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_with_prefix_property() {
        let a = embedding_vector(b"hello", 1536);
        assert_eq!(a, embedding_vector(b"hello", 1536));
        assert_ne!(a, embedding_vector(b"hello!", 1536));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        let short = embedding_vector(b"hello", 4);
        let ratio = short[0] / a[0];
        for i in 0..4 {
            assert!((short[i] / a[i] - ratio).abs() < 1e-3);
        }
    }

    #[test]
    fn prompt_filter_event_matches_azure() {
        let s = std::str::from_utf8(&PROMPT_FILTER_EVENT).unwrap();
        assert!(s.starts_with(r#"data: {"id":"","object":"","created":0,"model":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":"#));
        assert!(s.ends_with("\"choices\":[],\"usage\":null}\n\n"));
    }
}
