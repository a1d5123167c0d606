//! The inference operations that bill tokens: chat completions, completions and
//! embeddings, non-streamed and streamed, with Azure's framing and annotations.
//!
//! Token accounting follows the service (see `tokens`): prompt tokens from the
//! real tokenizer of the deployment's model with OpenAI's chat framing; a reply
//! of `reply_tokens` one-token words (fewer when `max_tokens` /
//! `max_completion_tokens` cut it, then `finish_reason` is `length`); hidden
//! reasoning tokens for reasoning models, spent first from the same budget and
//! never sent as text; `cached_tokens` from the prompt cache; `n` choices
//! multiply the completion. Admission reserves Azure's character-based estimate
//! (see `ratelimit`).

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
use crate::tokens::{Encoding, Prompt};
pub(crate) use crate::tokens::{reply_text, token_text};
use crate::usage::{Billing, Usage};

/// The first SSE event of every chat stream: Azure's prompt annotation.
static PROMPT_FILTER_EVENT: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(format!(
        "data: {{\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"prompt_filter_results\":[{{\"prompt_index\":0,\"content_filter_results\":{FILTER_RESULTS_SAFE}}}],\"choices\":[],\"usage\":null}}\n\n"
    ))
});

/// The final SSE event of every stream.
pub(crate) const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// The first api-version that accepts `stream_options` (older ones answer 400).
pub const STREAM_OPTIONS_SINCE: &str = "2024-09-01";

/// Rough token count for operations that are not tokenized (image prompts,
/// speech input): `ceil(chars / 4)`, at least 1.
pub(crate) fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
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

/// What the model will generate for one choice, and what admission reserves.
pub(crate) struct Plan {
    /// Visible content tokens per choice.
    pub(crate) tokens: u32,
    /// Hidden reasoning tokens per choice (spent before the first content token).
    pub(crate) reasoning: u32,
    pub(crate) finish: &'static str,
    /// Completion tokens admission reserves per choice.
    pub(crate) reserve: u64,
}

/// Reasoning first, then content, both within `max` when the request sets it.
pub(crate) fn plan(ctx: &Ctx, dep: &str, max: Option<u32>) -> Plan {
    let cfg = &ctx.inst.cfg;
    let reply = cfg.reply_tokens_for(Some(dep));
    let reasoning = cfg.reasoning_tokens_for(dep);
    let (reasoning, tokens) = match max {
        Some(m) => {
            let r = reasoning.min(m);
            (r, reply.min(m - r))
        }
        None => (reasoning, reply),
    };
    let default = cfg.rate_limit_for(dep).and_then(|rl| rl.default_max_tokens);
    Plan {
        tokens,
        reasoning,
        finish: if tokens < reply { "length" } else { "stop" },
        reserve: u64::from(
            max.or(default)
                .unwrap_or(cfg.reasoning_tokens_for(dep) + reply),
        ),
    }
}

/// The model name reported in bodies, JSON-quoted.
pub(crate) fn model_json(ctx: &Ctx, dep: &str) -> String {
    serde_json::to_string(ctx.inst.cfg.model_for(dep)).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The tokenizer of `dep`'s model.
pub(crate) fn encoding(ctx: &Ctx, dep: &str) -> Encoding {
    Encoding::for_model(ctx.inst.cfg.model_for(dep))
}

/// Time to first token and per-token delay for `dep`, unjittered.
pub(crate) fn latency(ctx: &Ctx, dep: &str) -> (Duration, Duration) {
    let l = ctx.inst.cfg.latency_for(Some(dep));
    (
        Duration::from_millis(l.ttft_ms),
        Duration::from_millis(l.per_token_ms),
    )
}

/// 400 for `stream_options` on an api-version older than 2024-09-01-preview,
/// with the body Azure sends. The v1 surface and non-dated versions
/// (`preview`, `latest`) accept it.
pub(crate) fn check_stream_options(ctx: &Ctx, dep: &str, present: bool) -> Result<(), Reply> {
    let v = ctx.api_version.as_str();
    let dated = v.len() >= 10 && v.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    if present && dated && &v[..10] < STREAM_OPTIONS_SINCE {
        return Err(
            Reply::json(StatusCode::BAD_REQUEST, azure::UNRECOGNIZED_STREAM_OPTIONS)
                .with_deployment(dep),
        );
    }
    Ok(())
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
    Timed {
        delay,
        data,
        tokens: 0,
    }
}

fn token_frame(delay: Duration, data: Bytes) -> Timed {
    Timed {
        delay,
        data,
        tokens: 1,
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn include_usage(o: Option<&StreamOptions>) -> bool {
    o.and_then(|o| o.include_usage).unwrap_or(false)
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Option<Vec<Value>>,
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
    /// Tool and legacy function definitions, counted as prompt tokens.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
}

/// Chat's `usage` object, keys in Azure's (alphabetical) order.
pub(crate) fn usage_json(u: &Usage) -> String {
    format!(
        r#"{{"completion_tokens":{},"completion_tokens_details":{{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":{},"rejected_prediction_tokens":0}},"prompt_tokens":{},"prompt_tokens_details":{{"audio_tokens":0,"cached_tokens":{}}},"total_tokens":{}}}"#,
        u.completion_tokens,
        u.reasoning_tokens,
        u.prompt_tokens,
        u.cached_tokens,
        u.total_tokens()
    )
}

/// Cached tokens of `prompt` on `dep` (0 when caching is off for it).
pub(crate) fn cached(ctx: &Ctx, dep: &str, prompt: &Prompt) -> u64 {
    if !ctx.inst.cfg.prompt_cache_for(dep) {
        return 0;
    }
    ctx.inst
        .prompt_cache
        .lookup(dep, &prompt.ids, ctx.inst.clock.now())
}

/// The usage of one request: `n` choices of `p`.
pub(crate) fn usage(prompt: u64, cached: u64, p: &Plan, n: u32) -> Usage {
    let n = u64::from(n);
    Usage {
        requests: 1,
        prompt_tokens: prompt,
        completion_tokens: n * u64::from(p.tokens + p.reasoning),
        cached_tokens: cached,
        reasoning_tokens: n * u64::from(p.reasoning),
        throttled: 0,
    }
}

/// Billing of a reply: the whole usage up front for a body sent in one piece;
/// for a stream, everything but the content tokens, which its frames carry.
pub(crate) fn billing(dep: &str, u: &Usage, stream: bool) -> Billing {
    let mut upfront = *u;
    if stream {
        upfront.completion_tokens = u.reasoning_tokens;
    }
    Billing {
        deployment: dep.to_owned(),
        upfront,
    }
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
    check_stream_options(ctx, dep, req.stream_options.is_some())?;
    let prompt = Prompt::chat_request(
        encoding(ctx, dep),
        messages,
        [req.tools.as_ref(), req.functions.as_ref()],
    );
    let p = plan(ctx, dep, req.max_completion_tokens.or(req.max_tokens));
    let n = req.n.unwrap_or(1).clamp(1, 128);
    let remaining = ctx.admit(dep, Op::Chat, prompt.estimate() + p.reserve * u64::from(n))?;
    ctx.filter(&prompt.text)
        .map_err(|e| e.with_deployment(dep))?;
    let u = usage(prompt.tokens(), cached(ctx, dep, &prompt), &p, n);
    let model = model_json(ctx, dep);
    let id = azure::object_id("chatcmpl-");
    let created = azure::unix_now();
    let (ttft, per_tok) = latency(ctx, dep);
    let thinking = per_tok * p.reasoning;
    let stream = req.stream.unwrap_or(false);
    let mut reply = if stream {
        let head = ChunkHead {
            id: &id,
            created,
            model: &model,
            object: "chat.completion.chunk",
        };
        let usage_chunk = include_usage(req.stream_options.as_ref()).then_some(&u);
        let frames = chat_stream_frames(ctx, dep, &head, &p, n, per_tok, usage_chunk);
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(frames);
        r.delay = ctx.delay(Some(dep), ttft + thinking);
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
            usage_json(&u)
        );
        let mut r = Reply::ok_json(s);
        r.delay = ctx.delay(Some(dep), ttft + thinking + per_tok * p.tokens);
        r
    };
    reply.billing = Some(billing(dep, &u, stream));
    reply.remaining = Some(remaining);
    Ok(reply.with_deployment(dep))
}

/// The fields every chunk of one stream shares.
struct ChunkHead<'a> {
    id: &'a str,
    created: u64,
    /// JSON-quoted.
    model: &'a str,
    object: &'a str,
}

impl ChunkHead<'_> {
    /// One chunk in Azure's key order: `choices`, `created`, `id`, `model`,
    /// `object`, `system_fingerprint`, `usage`.
    fn chunk(&self, choices: &str, usage: &str) -> Bytes {
        sse(&format!(
            r#"{{"choices":[{choices}],"created":{},"id":"{}","model":{},"object":"{}","system_fingerprint":"fp_sim","usage":{usage}}}"#,
            self.created, self.id, self.model, self.object
        ))
    }
}

fn chat_stream_frames(
    ctx: &Ctx,
    dep: &str,
    head: &ChunkHead<'_>,
    p: &Plan,
    n: u32,
    per_tok: Duration,
    usage: Option<&Usage>,
) -> VecDeque<Timed> {
    let mut frames = VecDeque::with_capacity((p.tokens as usize + 2) * n as usize + 3);
    frames.push_back(frame(Duration::ZERO, PROMPT_FILTER_EVENT.clone()));
    for i in 0..n {
        frames.push_back(frame(
            Duration::ZERO,
            head.chunk(
                &format!(
                    r#"{{"content_filter_results":{{}},"delta":{{"content":"","refusal":null,"role":"assistant"}},"finish_reason":null,"index":{i},"logprobs":null}}"#
                ),
                "null",
            ),
        ));
    }
    for t in 0..p.tokens {
        let text = token_text(t);
        for i in 0..n {
            // Choices advance together: one delay per step, then one chunk each.
            let delay = if i == 0 {
                ctx.delay(Some(dep), per_tok)
            } else {
                Duration::ZERO
            };
            frames.push_back(token_frame(
                delay,
                head.chunk(
                    &format!(
                        r#"{{"content_filter_results":{FILTER_RESULTS_SAFE},"delta":{{"content":"{text}"}},"finish_reason":null,"index":{i},"logprobs":null}}"#
                    ),
                    "null",
                ),
            ));
        }
    }
    for i in 0..n {
        frames.push_back(frame(
            Duration::ZERO,
            head.chunk(
                &format!(
                    r#"{{"content_filter_results":{{}},"delta":{{}},"finish_reason":"{}","index":{i},"logprobs":null}}"#,
                    p.finish
                ),
                "null",
            ),
        ));
    }
    if let Some(u) = usage {
        frames.push_back(frame(Duration::ZERO, head.chunk("", &usage_json(u))));
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
    n: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    model: Option<String>,
}

/// Completions' `usage` object (no details, as the service sends it).
fn completion_usage_json(u: &Usage) -> String {
    format!(
        r#"{{"completion_tokens":{},"prompt_tokens":{},"total_tokens":{}}}"#,
        u.completion_tokens,
        u.prompt_tokens,
        u.total_tokens()
    )
}

fn completions(ctx: &Ctx, path_dep: Option<&str>) -> Result<Reply, Reply> {
    let req: CompletionRequest = ctx.json()?;
    let dep = deployment(path_dep, req.model.as_deref())?;
    check_stream_options(ctx, dep, req.stream_options.is_some())?;
    let prompt = Prompt::plain(encoding(ctx, dep), &req.prompt);
    // Completions default to 16 tokens when max_tokens is absent, as the API does.
    let p = plan(ctx, dep, Some(req.max_tokens.unwrap_or(16)));
    let n = req.n.unwrap_or(1).clamp(1, 128);
    // `best_of` candidates are generated (and reserved) even though `n` are returned.
    let generated = req.best_of.unwrap_or(n).clamp(n, 128);
    let remaining = ctx.admit(
        dep,
        Op::Completions,
        prompt.estimate() + p.reserve * u64::from(generated),
    )?;
    ctx.filter(&prompt.text)
        .map_err(|e| e.with_deployment(dep))?;
    let u = usage(prompt.tokens(), 0, &p, generated);
    let model = model_json(ctx, dep);
    let id = azure::object_id("cmpl-");
    let created = azure::unix_now();
    let (ttft, per_tok) = latency(ctx, dep);
    let stream = req.stream.unwrap_or(false);
    let mut reply = if stream {
        let mut frames = VecDeque::with_capacity((p.tokens as usize + 1) * n as usize + 3);
        frames.push_back(frame(Duration::ZERO, PROMPT_FILTER_EVENT.clone()));
        let chunk = |choice: &str, usage: &str| {
            sse(&format!(
                r#"{{"choices":[{choice}],"created":{created},"id":"{id}","model":{model},"object":"text_completion","system_fingerprint":null,"usage":{usage}}}"#
            ))
        };
        for t in 0..p.tokens {
            let text = token_text(t);
            for i in 0..n {
                let delay = if i == 0 {
                    ctx.delay(Some(dep), per_tok)
                } else {
                    Duration::ZERO
                };
                frames.push_back(token_frame(
                    delay,
                    chunk(
                        &format!(
                            r#"{{"content_filter_results":{FILTER_RESULTS_SAFE},"finish_reason":null,"index":{i},"logprobs":null,"text":"{text}"}}"#
                        ),
                        "null",
                    ),
                ));
            }
        }
        for i in 0..n {
            frames.push_back(frame(
                Duration::ZERO,
                chunk(
                    &format!(
                        r#"{{"content_filter_results":{{}},"finish_reason":"{}","index":{i},"logprobs":null,"text":""}}"#,
                        p.finish
                    ),
                    "null",
                ),
            ));
        }
        if include_usage(req.stream_options.as_ref()) {
            frames.push_back(frame(Duration::ZERO, chunk("", &completion_usage_json(&u))));
        }
        frames.push_back(frame(Duration::ZERO, Bytes::from_static(DONE_EVENT)));
        let mut r = Reply::new(StatusCode::OK, SSE, Bytes::new());
        r.payload = Payload::Frames(frames);
        r.delay = ctx.delay(Some(dep), ttft + per_tok * p.reasoning);
        r.header("cache-control", "no-cache")
            .header("x-accel-buffering", "no")
    } else {
        let text = reply_text(p.tokens);
        let mut s = String::with_capacity(700 + text.len() * n as usize);
        s.push_str(r#"{"choices":["#);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                r#"{{"content_filter_results":{FILTER_RESULTS_SAFE},"finish_reason":"{}","index":{i},"logprobs":null,"text":"{text}"}}"#,
                p.finish
            );
        }
        let _ = write!(
            s,
            r#"],"created":{created},"id":"{id}","model":{model},"object":"text_completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{FILTER_RESULTS_SAFE}}}],"system_fingerprint":null,"usage":{}}}"#,
            completion_usage_json(&u)
        );
        let mut r = Reply::ok_json(s);
        r.delay = ctx.delay(Some(dep), ttft + per_tok * (p.reasoning + p.tokens));
        r
    };
    // Only `n` of the `best_of` candidates are streamed; the others are spent
    // up front like reasoning.
    let mut b = billing(dep, &u, stream);
    if stream {
        b.upfront.completion_tokens += u64::from(generated - n) * u64::from(p.tokens);
    }
    reply.billing = Some(b);
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
    let inputs: Vec<Vec<u8>> = match &req.input {
        Value::String(s) => vec![s.as_bytes().to_vec()],
        Value::Array(items) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                vec![req.input.to_string().into_bytes()]
            } else {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::String(s) => out.push(s.as_bytes().to_vec()),
                        Value::Array(toks) if toks.iter().all(Value::is_number) => {
                            out.push(it.to_string().into_bytes());
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
    let prompt = Prompt::plain(encoding(ctx, dep), &req.input);
    let remaining = ctx.admit(dep, Op::Embeddings, prompt.estimate())?;
    let prompt_tokens = prompt.tokens();
    let base64 = req.encoding_format.as_deref() == Some("base64");
    let mut s = String::with_capacity(64 + inputs.len() * dims * 12);
    s.push_str(r#"{"data":["#);
    for (i, text) in inputs.iter().enumerate() {
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
    r.billing = Some(Billing {
        deployment: dep.to_owned(),
        upfront: Usage {
            requests: 1,
            prompt_tokens,
            ..Usage::default()
        },
    });
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
    fn rough_estimate_rounds_up_and_is_never_zero() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[test]
    fn usage_object_is_valid_json_in_azure_key_order() {
        let u = Usage {
            requests: 1,
            prompt_tokens: 7,
            completion_tokens: 5,
            cached_tokens: 2,
            reasoning_tokens: 3,
            throttled: 0,
        };
        let s = usage_json(&u);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["total_tokens"], 12);
        assert_eq!(v["completion_tokens_details"]["reasoning_tokens"], 3);
        assert_eq!(v["prompt_tokens_details"]["cached_tokens"], 2);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(s.starts_with(
            r#"{"completion_tokens":5,"completion_tokens_details":{"accepted_prediction_tokens":0,"#
        ));
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
