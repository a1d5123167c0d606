//! Token counts the way the service counts them: the real BPE encodings
//! (`o200k_base`, `cl100k_base`, from the `tiktoken-rs` crate, which ships the
//! same rank files the Python `tiktoken` package downloads) and OpenAI's
//! documented chat framing.
//!
//! Also owns the two things derived from token counts that are not billing:
//! Azure's character-based admission estimate, and the deterministic reply text,
//! whose words are each exactly one token in both encodings so that re-tokenizing
//! a reply gives back the completion count the simulator reported.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// A BPE encoding the simulator counts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o-series, gpt-oss, and any unknown name.
    O200kBase,
    /// gpt-4 (before 4o), gpt-35-turbo, text-embedding-* models.
    Cl100kBase,
}

impl Encoding {
    /// The encoding a model uses, by name (case-insensitive): `cl100k_base`
    /// for the gpt-4 family before 4o (a name containing `gpt-4` but not
    /// `gpt-4o`, `gpt-4.1`, `gpt-4.5`), gpt-35 / gpt-3.5, text-embedding-*,
    /// ada-002, davinci-002 and babbage-002; `o200k_base` for everything else
    /// (gpt-4o, gpt-4.1, gpt-5, o-series and unrecognised names). Deployment
    /// names such as `prod-gpt-35-turbo` work because the test is "contains",
    /// the same rule the gateway's estimator uses.
    pub fn for_model(model: &str) -> Encoding {
        let n = model.to_ascii_lowercase();
        let old_gpt4 = n.contains("gpt-4")
            && !["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-41", "gpt-45"]
                .iter()
                .any(|x| n.contains(x));
        let cl100k = [
            "gpt-35",
            "gpt-3.5",
            "text-embedding",
            "ada-002",
            "davinci-002",
            "babbage-002",
        ];
        if old_gpt4 || cl100k.iter().any(|x| n.contains(x)) {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    /// The encoding's name as `tiktoken` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    fn bpe(self) -> &'static CoreBPE {
        // Each encoding's rank table is parsed once per process, on first use.
        match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// Token ids of `text`, special-token strings counted as ordinary text (as
    /// the service does with user content).
    pub fn encode(self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        self.bpe().encode_ordinary(text)
    }

    /// Number of tokens of `text`.
    pub fn count(self, text: &str) -> u64 {
        self.encode(text).len() as u64
    }
}

/// Whether a model name is a reasoning model (o-series, gpt-5 except the
/// `-chat` variants, codex-mini), which spends hidden reasoning tokens.
pub fn is_reasoning_model(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    if m.starts_with("gpt-5") {
        return !m.contains("-chat");
    }
    ["o1", "o3", "o4", "codex-mini"]
        .iter()
        .any(|p| m.starts_with(p))
}

/// Tokens of OpenAI's chat framing: every message costs 3 tokens
/// (`<|start|>{role}<|message|>…<|end|>`), a `name` one more, and the reply is
/// primed with 3 (`<|start|>assistant<|message|>`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token for a message's `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens of an image part of a prompt (one low-detail tile).
pub const IMAGE_TOKENS: u64 = 85;
/// Tokens that prime the assistant's reply, once per request.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// Stand-in id for framing tokens in a prompt's id sequence (used only to find
/// shared prefixes for prompt caching; never a real token).
const FRAME_ID: u32 = u32::MAX;
/// Stand-in id for the tokens of an image part.
const IMAGE_ID: u32 = u32::MAX - 1;

/// A prompt being counted: its token ids, framing included, and the characters
/// of its text for Azure's admission estimate.
#[derive(Debug, Default)]
pub(crate) struct Prompt {
    pub(crate) ids: Vec<u32>,
    /// Characters of the text pieces (no framing), for the admission estimate.
    pub(crate) chars: u64,
    /// Tokens given directly as token arrays (completions, embeddings).
    pub(crate) raw_tokens: u64,
    /// The text pieces, one per line, for the content filter.
    pub(crate) text: String,
}

impl Prompt {
    pub(crate) fn tokens(&self) -> u64 {
        self.ids.len() as u64
    }

    fn frame(&mut self, n: u64) {
        for _ in 0..n {
            self.ids.push(FRAME_ID);
        }
    }

    /// Tokens of a piece of text; only content (`estimated`) counts toward
    /// the admission estimate, framing strings such as roles do not.
    fn piece(&mut self, enc: Encoding, s: &str, estimated: bool) {
        if estimated {
            self.chars += s.chars().count() as u64;
        }
        self.ids.extend(enc.encode(s));
        self.text.push_str(s);
        self.text.push('\n');
    }

    fn text(&mut self, enc: Encoding, s: &str) {
        self.piece(enc, s, true);
    }

    /// Azure's admission estimate of the prompt: `ceil(chars / 4)` of the
    /// content (message contents, tool-call arguments, prompts, inputs,
    /// instructions; not roles or names) plus the length of token arrays, at
    /// least 1. Character-based, as Azure's is, so it differs from the real
    /// count on purpose.
    pub(crate) fn estimate(&self) -> u64 {
        (self.chars.div_ceil(4) + self.raw_tokens).max(1)
    }

    /// A message `content`: a string, or an array of parts, each counted by
    /// its `text` (chat `text`, Responses `input_text`) or as an image
    /// (`image_url`, `input_image`: 85 tokens, a low-detail tile). Other parts
    /// (audio, files) count 0.
    fn content(&mut self, enc: Encoding, v: &Value) {
        match v {
            Value::String(s) => self.text(enc, s),
            Value::Array(parts) => {
                for p in parts {
                    match p.get("type").and_then(Value::as_str) {
                        Some("image_url" | "input_image") => {
                            self.ids.extend([IMAGE_ID; IMAGE_TOKENS as usize]);
                        }
                        _ => {
                            if let Some(Value::String(t)) = p.get("text") {
                                self.text(enc, t);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Tool (or function) definitions: the tokens of their compact JSON
    /// (keys sorted), an approximation of the service's internal rendering.
    /// Not part of the admission estimate.
    pub(crate) fn tools(&mut self, enc: Encoding, v: Option<&Value>) {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            self.piece(enc, &v.to_string(), false);
        }
    }

    /// One framed message: 3 tokens, then `role`, `content`, `name` (+1),
    /// `tool_call_id`, each tool call's function `name` and `arguments`, and a
    /// Responses item's `output` and `arguments`.
    pub(crate) fn message(&mut self, enc: Encoding, m: &Value) {
        self.frame(TOKENS_PER_MESSAGE);
        let Value::Object(o) = m else {
            return;
        };
        for (key, estimated) in [
            ("role", false),
            ("tool_call_id", false),
            ("output", true),
            ("arguments", true),
        ] {
            if let Some(Value::String(s)) = o.get(key) {
                self.piece(enc, s, estimated);
            }
        }
        if let Some(c) = o.get("content") {
            self.content(enc, c);
        }
        if let Some(Value::String(n)) = o.get("name") {
            self.piece(enc, n, false);
            self.frame(TOKENS_PER_NAME);
        }
        if let Some(Value::Array(calls)) = o.get("tool_calls") {
            for c in calls {
                for (key, estimated) in [("name", false), ("arguments", true)] {
                    if let Some(Value::String(s)) = c.get("function").and_then(|f| f.get(key)) {
                        self.piece(enc, s, estimated);
                    }
                }
            }
        }
    }

    /// Close a framed prompt with the reply priming.
    pub(crate) fn finish(&mut self) {
        self.frame(REPLY_PRIMING_TOKENS);
    }

    /// A whole chat prompt: each message framed, plus the reply priming.
    pub(crate) fn chat(enc: Encoding, messages: &[Value]) -> Prompt {
        let mut p = Prompt::default();
        for m in messages {
            p.message(enc, m);
        }
        p.finish();
        p
    }

    /// A chat request's prompt: its messages, then its `tools` and legacy
    /// `functions` definitions.
    pub(crate) fn chat_request(
        enc: Encoding,
        messages: &[Value],
        tools: [Option<&Value>; 2],
    ) -> Prompt {
        let mut p = Prompt::chat(enc, messages);
        for t in tools {
            p.tools(enc, t);
        }
        p
    }

    /// Unframed input (completions `prompt`, embeddings `input`): a string, an
    /// array of strings, a token array, or an array of token arrays.
    pub(crate) fn plain(enc: Encoding, v: &Value) -> Prompt {
        let mut p = Prompt::default();
        p.plain_item(enc, v, true);
        p
    }

    fn plain_item(&mut self, enc: Encoding, v: &Value, top: bool) {
        match v {
            Value::String(s) => self.text(enc, s),
            Value::Number(n) => {
                self.raw_tokens += 1;
                self.ids
                    .push(n.as_u64().and_then(|x| u32::try_from(x).ok()).unwrap_or(0));
            }
            Value::Array(items) if top || items.iter().all(Value::is_number) => {
                for it in items {
                    self.plain_item(enc, it, false);
                }
            }
            _ => {}
        }
    }
}

/// Number of tokens of a plain piece of text in `enc` (what the cross-check
/// compares with Python `tiktoken`).
pub fn count_text(enc: Encoding, text: &str) -> u64 {
    enc.count(text)
}

/// Prompt tokens of a chat request's `messages` in `enc`, framing included.
pub fn count_chat(enc: Encoding, messages: &[Value]) -> u64 {
    Prompt::chat(enc, messages).tokens()
}

/// Words a reply is made of; reply token `i` is `WORDS[i % 16]`, with a leading
/// space after the first. Each word, with and without its leading space, is a
/// single token in both `o200k_base` and `cl100k_base` (a unit test checks it),
/// so any prefix of a reply re-tokenizes to exactly its number of words.
const WORDS: [&str; 16] = [
    "This",
    "is",
    "a",
    "simulated",
    "reply",
    "from",
    "the",
    "Azure",
    "model",
    "with",
    "steady",
    "words",
    "and",
    "exact",
    "token",
    "counts",
];

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn models_map_to_their_encodings() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "GPT-4.1",
            "o3-mini",
            "gpt-5",
            "o1",
            "anything",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::O200kBase, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-35-turbo",
            "text-embedding-3-small",
            "text-embedding-ada-002",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::Cl100kBase, "{m}");
        }
    }

    #[test]
    fn reasoning_models_are_recognised_by_name() {
        for m in [
            "o1",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "codex-mini",
        ] {
            assert!(is_reasoning_model(m), "{m}");
        }
        for m in ["gpt-4o", "gpt-5-chat", "gpt-4.1", "text-embedding-3-small"] {
            assert!(!is_reasoning_model(m), "{m}");
        }
    }

    #[test]
    fn every_reply_word_is_one_token_in_both_encodings() {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for i in 0..WORDS.len() as u32 * 2 {
                assert_eq!(
                    enc.count(&token_text(i)),
                    1,
                    "{:?} {:?}",
                    enc,
                    token_text(i)
                );
            }
            for n in [0, 1, 5, 16, 17, 100] {
                assert_eq!(enc.count(&reply_text(n)), u64::from(n), "{enc:?} n={n}");
            }
        }
    }

    #[test]
    fn known_strings_have_tiktokens_counts() {
        // Figures from Python tiktoken 0.14.0.
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count(""), 0);
        assert_eq!(Encoding::O200kBase.count("<|endoftext|>"), 7);
    }

    #[test]
    fn chat_framing_adds_three_per_message_one_per_name_and_three_for_the_reply() {
        let enc = Encoding::O200kBase;
        let msgs = [
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "name": "ann", "content": [{"type": "text", "text": "hello world"}]}),
        ];
        let expected = 3
            + enc.count("system")
            + enc.count("You are terse.")
            + 3
            + enc.count("user")
            + enc.count("hello world")
            + enc.count("ann")
            + 1
            + 3;
        assert_eq!(count_chat(enc, &msgs), expected);
    }

    #[test]
    fn images_count_85_and_tool_definitions_their_json_text() {
        let enc = Encoding::O200kBase;
        let msgs = [json!({"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:,"}}
        ]})];
        assert_eq!(
            Prompt::chat(enc, &msgs).tokens(),
            3 + enc.count("user") + enc.count("look") + IMAGE_TOKENS + 3
        );
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let p = Prompt::chat_request(enc, &msgs, [Some(&tools), None]);
        assert_eq!(
            p.tokens(),
            Prompt::chat(enc, &msgs).tokens()
                + enc.count(r#"[{"function":{"name":"f","parameters":{}},"type":"function"}]"#)
        );
        // Neither images nor tools enter the character estimate.
        assert_eq!(p.estimate(), 1);
    }

    #[test]
    fn admission_estimate_counts_content_characters_only() {
        let p = Prompt::chat(
            Encoding::O200kBase,
            &[json!({"role": "user", "name": "someone", "content": "abcde"})],
        );
        assert_eq!(p.estimate(), 2);
    }

    #[test]
    fn admission_estimate_is_a_quarter_of_the_characters_rounded_up() {
        let p = Prompt::plain(Encoding::O200kBase, &json!("abcde"));
        assert_eq!(p.estimate(), 2);
        let p = Prompt::plain(Encoding::O200kBase, &json!([1, 2, 3]));
        assert_eq!((p.tokens(), p.estimate()), (3, 3));
        let p = Prompt::plain(Encoding::O200kBase, &json!(""));
        assert_eq!(p.estimate(), 1);
    }
}
