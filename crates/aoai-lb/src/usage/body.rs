//! The top-level `usage` of a JSON response body, found while the body
//! passes through.
//!
//! [`BodyUsage`] follows the JSON structure byte by byte across chunks
//! (depth, strings, escapes) without keeping the body: only the value of a
//! top-level `usage` key is copied (a few hundred bytes, capped), and
//! scanning stops once it has been read. Chat, completions, embeddings and
//! Responses bodies all carry their usage there. A `usage` key nested
//! deeper (inside `output`, a tool's arguments, ...) is never taken for it.

use super::{Usage, parse_usage_object};

/// Longest `usage` value kept; Azure's is about 300 bytes.
const MAX_VALUE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Looking for the key.
    Scan,
    /// The key `usage` ended; waiting for `:`.
    Colon,
    /// Copying the value until the top-level object continues or ends.
    Value,
    /// Read (or given up): nothing more to do.
    Done,
}

/// Finds the top-level `usage` of a JSON object streamed in chunks.
pub struct BodyUsage {
    depth: u32,
    in_str: bool,
    escaped: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    /// The key string being read at depth 1.
    in_key: bool,
    /// Bytes of that key matched against `usage` so far; `None` on a
    /// mismatch.
    key_pos: Option<usize>,
    phase: Phase,
    value: Vec<u8>,
    result: Option<Usage>,
}

impl Default for BodyUsage {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyUsage {
    /// A tracker at the start of a body.
    pub fn new() -> Self {
        Self {
            depth: 0,
            in_str: false,
            escaped: false,
            expect_key: false,
            in_key: false,
            key_pos: None,
            phase: Phase::Scan,
            value: Vec::new(),
            result: None,
        }
    }

    /// The usage, once its value has been read completely.
    pub fn usage(&self) -> Option<Usage> {
        self.result
    }

    /// Feeds the next chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.phase == Phase::Done {
            return;
        }
        let mut i = 0;
        while i < chunk.len() {
            if self.in_str {
                // Jump to the next quote or backslash.
                let Some(k) = memchr::memchr2(b'"', b'\\', &chunk[i..]).filter(|_| !self.escaped)
                else {
                    if self.escaped {
                        // The byte after a backslash, whatever it is.
                        self.escaped = false;
                        self.key_byte(chunk[i]);
                        self.value_bytes(&chunk[i..=i]);
                        i += 1;
                        continue;
                    }
                    self.key_bytes(&chunk[i..]);
                    self.value_bytes(&chunk[i..]);
                    return;
                };
                let j = i + k;
                self.key_bytes(&chunk[i..j]);
                self.value_bytes(&chunk[i..=j]);
                i = j + 1;
                if chunk[j] == b'\\' {
                    self.escaped = true;
                    // Escapes never occur in the key we look for.
                    self.key_pos = None;
                } else {
                    self.in_str = false;
                    self.end_string();
                }
                if self.phase == Phase::Done {
                    return;
                }
                continue;
            }
            let b = chunk[i];
            i += 1;
            match self.phase {
                Phase::Colon => {
                    if b == b':' {
                        self.phase = Phase::Value;
                        continue;
                    }
                    if !b.is_ascii_whitespace() {
                        self.phase = Phase::Done;
                        return;
                    }
                    continue;
                }
                Phase::Value => {
                    if self.depth == 1 && (b == b',' || b == b'}') {
                        self.phase = Phase::Done;
                        self.result = parse_usage_object(self.value.trim_ascii());
                        self.value = Vec::new();
                        return;
                    }
                    self.value_bytes(&[b]);
                }
                Phase::Scan | Phase::Done => {}
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    if self.depth == 1 && self.expect_key {
                        self.in_key = true;
                        self.key_pos = Some(0);
                        self.expect_key = false;
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 && b == b'{' {
                        self.expect_key = true;
                    }
                    if self.depth == 1 && b == b'[' {
                        // A top-level array has no usage.
                        self.phase = Phase::Done;
                        return;
                    }
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.phase = Phase::Done;
                        return;
                    }
                }
                b',' if self.depth == 1 => self.expect_key = true,
                _ => {}
            }
        }
    }

    fn key_byte(&mut self, b: u8) {
        self.key_bytes(&[b]);
    }

    fn key_bytes(&mut self, bytes: &[u8]) {
        if !self.in_key {
            return;
        }
        if let Some(p) = self.key_pos {
            const KEY: &[u8] = b"usage";
            self.key_pos = (p + bytes.len() <= KEY.len() && KEY[p..p + bytes.len()] == *bytes)
                .then_some(p + bytes.len());
        }
    }

    fn value_bytes(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Value {
            return;
        }
        if self.value.len() + bytes.len() > MAX_VALUE {
            self.phase = Phase::Done;
            self.value = Vec::new();
            return;
        }
        self.value.extend_from_slice(bytes);
    }

    fn end_string(&mut self) {
        if self.phase == Phase::Value {
            // A string value: not a usage object, but copy on to its end.
            return;
        }
        if std::mem::take(&mut self.in_key) && self.key_pos == Some(5) {
            self.phase = Phase::Colon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed(parts: &[&[u8]]) -> Option<Usage> {
        let mut t = BodyUsage::new();
        for p in parts {
            t.push(p);
        }
        t.usage()
    }

    const CHAT: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"message":{"content":"the \"usage\":{\"prompt_tokens\":99} is text","role":"assistant"}}],"created":1,"id":"chatcmpl-1","model":"gpt-4o","object":"chat.completion","usage":{"completion_tokens":7,"completion_tokens_details":{"reasoning_tokens":2},"prompt_tokens":11,"prompt_tokens_details":{"cached_tokens":4},"total_tokens":18}}"#;

    #[test]
    fn reads_the_top_level_usage_of_a_chat_body() {
        let u = feed(&[CHAT.as_bytes()]).unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.reasoning),
            (11, 7, 4, 2)
        );
    }

    #[test]
    fn ignores_nested_usage_keys() {
        let body = br#"{"output":[{"usage":{"input_tokens":1000}}],"metadata":{"usage":{"prompt_tokens":5}},"usage":{"input_tokens":3,"output_tokens":4}}"#;
        let u = feed(&[body]).unwrap();
        assert_eq!((u.prompt, u.completion), (3, 4));
        let none = br#"{"output":[{"usage":{"input_tokens":1000}}]}"#;
        assert_eq!(feed(&[none]), None);
    }

    #[test]
    fn usage_first_or_null_or_in_an_array_body() {
        let u = feed(&[br#" { "usage" : { "prompt_tokens" : 2 } , "data":[] }"#]).unwrap();
        assert_eq!(u.prompt, 2);
        assert_eq!(feed(&[br#"{"usage":null,"x":1}"#]), None);
        assert_eq!(feed(&[br#"[{"usage":{"prompt_tokens":2}}]"#]), None);
        assert_eq!(feed(&[br#"{"usage":"{\"prompt_tokens\":2}"}"#]), None);
        assert_eq!(feed(&[b"not json"]), None);
    }

    #[test]
    fn keys_that_only_start_like_usage_are_not_it() {
        assert_eq!(feed(&[br#"{"usages":{"prompt_tokens":2}}"#]), None);
        assert_eq!(feed(&[br#"{"usag":{"prompt_tokens":2}}"#]), None);
        assert_eq!(feed(&[br#"{"u\u0073age":{"prompt_tokens":2}}"#]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_chunk_split_finds_the_same_usage(cuts in proptest::collection::vec(0usize..400, 0..10)) {
            let b = CHAT.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (b.len() + 1)).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut prev = 0;
            for c in cuts {
                parts.push(&b[prev..c]);
                prev = c;
            }
            parts.push(&b[prev..]);
            let u = feed(&parts).unwrap();
            prop_assert_eq!((u.prompt, u.completion, u.cached, u.reasoning), (11, 7, 4, 2));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = feed(&[&data]);
        }
    }
}
