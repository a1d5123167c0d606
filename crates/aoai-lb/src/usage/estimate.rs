//! Token estimates with the models' own tokenizers (o200k_base, cl100k_base).
//!
//! Used where the instance reports no usage: a stream on an api-version too
//! old for `stream_options`, a legacy completions stream, and a stream cut
//! before its usage arrived (the client went away, the instance failed).
//! Such figures are marked [`super::Source::Estimated`].
//!
//! [`prompt_tokens`] is also the prompt estimate for admission against a
//! client's token limit (prompt plus the request's output cap is what Azure
//! reserves).
//!
//! The encoders are built on first use, once per process (about 0.2 s and
//! a few tens of MiB for o200k); [`warm_up`] builds them in the background
//! at start-up so no request waits for that.
//!
//! Accuracy: text is counted exactly as the tokenizer counts it. The chat
//! framing follows OpenAI's published rule (3 tokens per message, 1 more
//! for a `name`, 3 to prime the reply; Responses `instructions` framed as a
//! system message); images count 85 tokens each (a
//! low-detail tile) and tool definitions count as their JSON text, both
//! approximations. Streamed completion text is counted piece by piece as
//! the events carried it; hidden reasoning tokens are never in the text, so
//! an estimate for an o-series or gpt-5 stream is low by those.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use super::Endpoint;

/// Which tokenizer a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series, and any unknown name.
    O200k,
    /// gpt-4 (not 4o/4.1/4.5), gpt-3.5/gpt-35, text-embedding-*, ada.
    Cl100k,
}

/// Tokens per image part of a prompt (a low-detail image).
pub const IMAGE_TOKENS: u64 = 85;

impl Encoding {
    /// The encoding for a model or deployment name. Deployment names are
    /// often the model's name; anything unrecognised is taken to be a
    /// current (o200k) model.
    pub fn for_model(name: &str) -> Encoding {
        let n = name.to_ascii_lowercase();
        let old_gpt4 = n.contains("gpt-4")
            && !n.contains("gpt-4o")
            && !n.contains("gpt-4.1")
            && !n.contains("gpt-4.5")
            && !n.contains("gpt-41")
            && !n.contains("gpt-45");
        if old_gpt4
            || n.contains("gpt-35")
            || n.contains("gpt-3.5")
            || n.contains("text-embedding")
            || n.contains("ada-002")
            || n.contains("davinci-002")
            || n.contains("babbage-002")
        {
            Encoding::Cl100k
        } else {
            Encoding::O200k
        }
    }

    fn cell(self) -> &'static OnceLock<Option<CoreBPE>> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200k => &O200K,
            Encoding::Cl100k => &CL100K,
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        self.cell()
            .get_or_init(|| match self {
                Encoding::O200k => tiktoken_rs::o200k_base().ok(),
                Encoding::Cl100k => tiktoken_rs::cl100k_base().ok(),
            })
            .as_ref()
    }

    /// Whether the encoder is built (counting will not pay for building
    /// it).
    pub fn is_ready(self) -> bool {
        self.cell().get().is_some()
    }

    /// Tokens of `text` (special-token text counts as ordinary text). If
    /// the encoder could not be built (it is compiled in, so this does not
    /// happen in practice), one token per 4 bytes.
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self.bpe() {
            Some(bpe) => bpe.count_ordinary(text) as u64,
            None => (text.len() as u64).div_ceil(4),
        }
    }
}

/// Builds both encoders on a background thread, so the first estimate does
/// not pay for it. Safe to call more than once.
pub fn warm_up() {
    let _ = std::thread::Builder::new()
        .name("aoai-lb-tokenizer".into())
        .spawn(|| {
            Encoding::O200k.count("warm");
            Encoding::Cl100k.count("warm");
        });
}

/// Estimated prompt tokens of a request `body` to `endpoint`, for the model
/// or deployment `model`: chat messages (with OpenAI's framing), a
/// completions `prompt`, an embeddings `input` (strings or token arrays),
/// a Responses `instructions` and `input`. 0 for a body that is not JSON.
pub fn prompt_tokens(endpoint: Endpoint, model: &str, body: &[u8]) -> u64 {
    prompt_tokens_in(Encoding::for_model(model), endpoint, body)
}

/// [`prompt_tokens`] with the encoding already chosen.
pub fn prompt_tokens_in(enc: Encoding, endpoint: Endpoint, body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let parts = PromptParts {
        messages: v.get("messages"),
        prompt: v.get("prompt"),
        input: v.get("input"),
        instructions: v.get("instructions"),
        tools: v.get("tools"),
        functions: v.get("functions"),
    };
    prompt_tokens_of(enc, endpoint, &parts)
}

/// The members of a request body that make its prompt (absent: `None`;
/// a JSON `null` counts as absent).
#[derive(Debug, Default, Clone, Copy)]
pub struct PromptParts<'a> {
    /// Chat `messages`.
    pub messages: Option<&'a Value>,
    /// Completions `prompt`.
    pub prompt: Option<&'a Value>,
    /// Embeddings or Responses `input`.
    pub input: Option<&'a Value>,
    /// Responses `instructions`.
    pub instructions: Option<&'a Value>,
    /// Tool definitions.
    pub tools: Option<&'a Value>,
    /// Legacy function definitions.
    pub functions: Option<&'a Value>,
}

/// [`prompt_tokens_in`] of a body already parsed into its parts.
pub fn prompt_tokens_of(enc: Encoding, endpoint: Endpoint, parts: &PromptParts<'_>) -> u64 {
    match endpoint {
        Endpoint::Chat => chat_prompt(enc, parts),
        Endpoint::Completions => parts.prompt.map_or(0, |p| inputs(enc, p)),
        Endpoint::Embeddings => parts.input.map_or(0, |i| inputs(enc, i)),
        Endpoint::Responses => responses_prompt(enc, parts),
    }
}

/// Completion tokens of streamed text kept as pieces (see
/// [`super::sse::SseScanner::streamed`]): each piece counted on its own, as
/// each event carried whole tokens, plus `extra` pieces past the cap at
/// one token each.
pub fn streamed_tokens(enc: Encoding, text: &str, pieces: &[u32], extra: u64) -> u64 {
    let mut total = extra;
    let mut start = 0usize;
    for &end in pieces {
        let end = end as usize;
        if let Some(piece) = text.get(start..end) {
            total += enc.count(piece);
        }
        start = end;
    }
    total
}

const PER_MESSAGE: u64 = 3;
const PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

fn chat_prompt(enc: Encoding, parts: &PromptParts<'_>) -> u64 {
    let mut n = REPLY_PRIMING;
    if let Some(messages) = parts.messages.and_then(Value::as_array) {
        n += messages.iter().map(|m| message(enc, m)).sum::<u64>();
    }
    for defs in [parts.tools, parts.functions].into_iter().flatten() {
        if !defs.is_null() {
            n += enc.count(&defs.to_string());
        }
    }
    n
}

/// One framed message (chat message or Responses input item): 3 tokens,
/// then its `role`, `content`, `name` (+1), `tool_call_id`, tool calls'
/// function names and arguments, and a Responses item's `output` and
/// `arguments`.
fn message(enc: Encoding, m: &Value) -> u64 {
    let mut n = PER_MESSAGE;
    for key in ["role", "tool_call_id", "output", "arguments"] {
        n += enc.count(m[key].as_str().unwrap_or(""));
    }
    n += content(enc, &m["content"]);
    if let Some(name) = m["name"].as_str() {
        n += enc.count(name) + PER_NAME;
    }
    if let Some(calls) = m["tool_calls"].as_array() {
        for c in calls {
            n += enc.count(c["function"]["name"].as_str().unwrap_or(""));
            n += enc.count(c["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    n
}

/// `instructions` as a system message, then the input (a string is one
/// user message), then the reply priming.
fn responses_prompt(enc: Encoding, parts: &PromptParts<'_>) -> u64 {
    let mut n = REPLY_PRIMING;
    if let Some(i) = parts.instructions.and_then(Value::as_str) {
        n += PER_MESSAGE + enc.count("system") + enc.count(i);
    }
    match parts.input {
        Some(Value::Array(items)) => n += items.iter().map(|m| message(enc, m)).sum::<u64>(),
        None | Some(Value::Null) => {}
        Some(other) => n += PER_MESSAGE + enc.count("user") + content(enc, other),
    }
    if let Some(tools) = parts.tools.filter(|t| !t.is_null()) {
        n += enc.count(&tools.to_string());
    }
    n
}

/// A message's content: a string, or parts with `text` (chat `text`,
/// Responses `input_text`) or an image.
fn content(enc: Encoding, c: &Value) -> u64 {
    match c {
        Value::String(s) => enc.count(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p["type"].as_str() {
                Some("image_url" | "input_image") => IMAGE_TOKENS,
                _ => enc.count(p["text"].as_str().unwrap_or("")),
            })
            .sum(),
        _ => 0,
    }
}

/// A prompt or input: a string, an array of strings, an array of token
/// ids, or an array of token-id arrays.
fn inputs(enc: Encoding, v: &Value) -> u64 {
    match v {
        Value::String(s) => enc.count(s),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => enc.count(s),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_tokenizer_by_model_family() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-5",
            "o3-mini",
            "my-deployment",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::O200k, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-32k",
            "gpt-35-turbo",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
            "text-embedding-ada-002",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::Cl100k, "{m}");
        }
    }

    #[test]
    fn counts_like_tiktoken() {
        // The counts Python tiktoken gives for these strings (the
        // simulator cross-checks its own counts against it).
        assert_eq!(Encoding::O200k.count("hello world"), 2);
        assert_eq!(Encoding::Cl100k.count("hello world"), 2);
        assert_eq!(Encoding::O200k.count(""), 0);
        assert_eq!(Encoding::O200k.count("<|endoftext|>"), 7);
    }

    #[test]
    fn chat_prompts_count_framing_and_text() {
        let body = br#"{"messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":[{"type":"text","text":"hello world"},{"type":"image_url","image_url":{"url":"x"}}],"name":"bob"}]}"#;
        let e = Encoding::O200k;
        let want = 3
            + (3 + e.count("system") + e.count("You are helpful."))
            + (3 + e.count("user") + e.count("hello world") + IMAGE_TOKENS + e.count("bob") + 1);
        assert_eq!(prompt_tokens(Endpoint::Chat, "gpt-4o", body), want);
    }

    #[test]
    fn embeddings_and_completions_count_inputs() {
        assert_eq!(
            prompt_tokens(
                Endpoint::Embeddings,
                "text-embedding-3-small",
                br#"{"input":["hello world",[1,2,3]]}"#
            ),
            5
        );
        assert_eq!(
            prompt_tokens(
                Endpoint::Completions,
                "gpt-35-turbo-instruct",
                br#"{"prompt":"hello world"}"#
            ),
            2
        );
        assert_eq!(prompt_tokens(Endpoint::Chat, "gpt-4o", b"not json"), 0);
    }

    #[test]
    fn responses_prompts_count_instructions_and_input() {
        let e = Encoding::O200k;
        let got = prompt_tokens(
            Endpoint::Responses,
            "gpt-4o",
            br#"{"instructions":"be brief","input":"hello world"}"#,
        );
        assert_eq!(
            got,
            3 + e.count("system")
                + e.count("be brief")
                + 3
                + e.count("user")
                + e.count("hello world")
                + 3
        );
    }

    #[test]
    fn streamed_text_counts_piece_by_piece() {
        let text = "Hello world!";
        assert_eq!(streamed_tokens(Encoding::O200k, text, &[5, 11, 12], 2), 5);
    }
}
