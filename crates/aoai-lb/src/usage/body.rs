//! The top-level `usage` of a JSON response body, found while the body
//! passes through.
//!
//! [`BodyUsage`] follows the JSON structure across chunks (depth, strings,
//! escapes) without keeping the body: only the value of a top-level `usage`
//! key is copied (a few hundred bytes, capped), and scanning stops once it
//! has been read. Chat, completions, embeddings and Responses bodies all
//! carry their usage there. A `usage` key nested deeper (inside `output`, a
//! tool's arguments, ...) is never taken for it.
//!
//! Cost: this runs over every non-streaming inference body, so the scan
//! jumps instead of stepping: outside strings a table picks out the six
//! bytes that matter (`"{}[],`), inside strings the next `"` or `\` is
//! searched for (a short loop first, since most strings are a few bytes;
//! `memchr2` for the rest), and the `usage` value is taken as one slice of
//! the chunk (parsed in place when it does not straddle chunks) instead of
//! being copied byte by byte.

use super::{Usage, parse_usage_object};

/// Longest `usage` value kept; Azure's is about 300 bytes.
const MAX_VALUE: usize = 16 * 1024;

/// The bytes that change the scanner's state outside a string.
static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t[b',' as usize] = true;
    t
};

/// Where a string ends: the offset in `s` of the closing quote, or, when
/// `s` ends first, whether its last byte is an unpaired backslash (the
/// next chunk's first byte is then escaped). `escaped`: `s[0]` is escaped.
///
/// Eight bytes are tested at a time for a quote or a backslash, and the
/// first one found is located from the same test, so a string costs about
/// two instructions a byte and a short one little more than the call.
fn string_end(s: &[u8], escaped: bool) -> Result<usize, bool> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // The high bit of each byte of `x` that is zero, and of no other.
    let zero = |x: u64| !((x & LOW7).wrapping_add(LOW7) | x | LOW7);
    let mut i = usize::from(escaped);
    loop {
        while let Some(w) = s.get(i..i + 8) {
            let Ok(w) = <[u8; 8]>::try_from(w) else { break };
            let w = u64::from_le_bytes(w);
            let hits = zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')));
            if hits != 0 {
                i += (hits.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match s.get(i) {
            None => return Err(i > s.len()),
            Some(b'"') => return Ok(i),
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
        }
    }
}

/// The bytes that matter inside a value nested below the top-level object.
static NESTED: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// Skips what is nested below the top-level object: from `s[i]`, outside a
/// string at `depth` (2 or more), to just past the `}` or `]` that brings
/// the depth back to 1 (`Ok`). When `s` ends first: `Err(Some(escaped))`
/// inside a string (see [`string_end`]), `Err(None)` outside one. `depth`
/// follows either way.
///
/// Most of a body is nested (choices, content filter results), and there
/// only strings and brackets count: keys, commas and scalars are not
/// looked at, and the state stays in registers.
fn skip_nested(s: &[u8], mut i: usize, depth: &mut u32) -> Result<usize, Option<bool>> {
    let n = s.len();
    loop {
        while i < n && !NESTED[usize::from(s[i])] {
            i += 1;
        }
        let Some(&b) = s.get(i) else {
            return Err(None);
        };
        i += 1;
        match b {
            b'"' => match string_end(&s[i..], false) {
                Ok(k) => i += k + 1,
                Err(escaped) => return Err(Some(escaped)),
            },
            b'{' | b'[' => *depth += 1,
            _ => {
                *depth -= 1;
                if *depth == 1 {
                    return Ok(i);
                }
            }
        }
    }
}

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
    /// The start of the value, when it began in an earlier chunk.
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
        let n = chunk.len();
        let mut i = 0;
        // Where the value's bytes in this chunk start (while in `Value`):
        // the value is every byte from after the colon up to the `,` or
        // `}` that ends it at depth 1, so it is one slice per chunk.
        let mut value_from = 0;
        if self.in_str {
            // A string that began in an earlier chunk.
            match string_end(chunk, self.escaped) {
                Ok(q) => {
                    self.escaped = false;
                    self.in_str = false;
                    self.end_key(&chunk[..q]);
                    i = q + 1;
                }
                Err(escaped) => {
                    self.escaped = escaped;
                    self.key_bytes(chunk);
                    i = n;
                }
            }
        }
        while i < n {
            if self.depth >= 2 {
                // Inside a value nested below the top level (in `Scan` or
                // `Value`; `Colon` only ever follows a key at depth 1).
                match skip_nested(chunk, i, &mut self.depth) {
                    Ok(j) => i = j,
                    Err(inside) => {
                        if let Some(escaped) = inside {
                            self.in_str = true;
                            self.escaped = escaped;
                        }
                        i = n;
                    }
                }
                continue;
            }
            if self.phase == Phase::Colon {
                let b = chunk[i];
                i += 1;
                if b == b':' {
                    self.phase = Phase::Value;
                    value_from = i;
                } else if !b.is_ascii_whitespace() {
                    self.phase = Phase::Done;
                    return;
                }
                continue;
            }
            while i < n && !STRUCTURAL[usize::from(chunk[i])] {
                i += 1;
            }
            let Some(&b) = chunk.get(i) else { break };
            i += 1;
            if self.phase == Phase::Value && self.depth == 1 && (b == b',' || b == b'}') {
                self.finish_value(&chunk[value_from..i - 1]);
                return;
            }
            match b {
                b'"' => {
                    if self.depth == 1 && self.expect_key {
                        self.in_key = true;
                        self.key_pos = Some(0);
                        self.expect_key = false;
                    }
                    match string_end(&chunk[i..], false) {
                        Ok(k) => {
                            self.end_key(&chunk[i..i + k]);
                            i += k + 1;
                        }
                        Err(escaped) => {
                            self.in_str = true;
                            self.escaped = escaped;
                            self.key_bytes(&chunk[i..]);
                            i = n;
                        }
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 {
                        if b == b'[' {
                            // A top-level array has no usage.
                            self.phase = Phase::Done;
                            return;
                        }
                        self.expect_key = true;
                    }
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.give_up();
                        return;
                    }
                }
                _ => {
                    // A comma.
                    if self.depth == 1 {
                        self.expect_key = true;
                    }
                }
            }
        }
        if self.phase == Phase::Value {
            let rest = &chunk[value_from..];
            if self.value.len() + rest.len() > MAX_VALUE {
                self.give_up();
            } else {
                self.value.extend_from_slice(rest);
            }
        }
    }

    /// A string ended with `last` (its bytes in this chunk, escapes
    /// undecoded); when it was the key `usage`, its value comes next.
    fn end_key(&mut self, last: &[u8]) {
        if !self.in_key {
            return;
        }
        self.key_bytes(last);
        self.in_key = false;
        if self.key_pos == Some(5) {
            self.phase = Phase::Colon;
        }
    }

    /// The value ends with `tail` (the bytes of this chunk before the `,`
    /// or `}`); reads it, in place when it did not straddle chunks.
    fn finish_value(&mut self, tail: &[u8]) {
        self.phase = Phase::Done;
        if self.value.len() + tail.len() > MAX_VALUE {
            self.value = Vec::new();
            return;
        }
        self.result = if self.value.is_empty() {
            parse_usage_object(tail.trim_ascii())
        } else {
            self.value.extend_from_slice(tail);
            parse_usage_object(self.value.trim_ascii())
        };
        self.value = Vec::new();
    }

    fn give_up(&mut self) {
        self.phase = Phase::Done;
        self.value = Vec::new();
    }

    /// Matches the next raw bytes of a key against `usage`. A key with an
    /// escape never matches: the backslash is not in `usage`.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scanner this module had before it jumped over bytes: one byte
    /// at a time, kept to hold the faster one to the same answers.
    mod reference {
        use super::super::{MAX_VALUE, Usage, parse_usage_object};

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum RefPhase {
            Scan,
            Colon,
            Value,
            Done,
        }

        pub struct Reference {
            depth: u32,
            in_str: bool,
            escaped: bool,
            expect_key: bool,
            in_key: bool,
            key_pos: Option<usize>,
            phase: RefPhase,
            value: Vec<u8>,
            result: Option<Usage>,
        }

        impl Default for Reference {
            fn default() -> Self {
                Self::new()
            }
        }

        impl Reference {
            pub fn new() -> Self {
                Self {
                    depth: 0,
                    in_str: false,
                    escaped: false,
                    expect_key: false,
                    in_key: false,
                    key_pos: None,
                    phase: RefPhase::Scan,
                    value: Vec::new(),
                    result: None,
                }
            }

            pub fn usage(&self) -> Option<Usage> {
                self.result
            }

            pub fn push(&mut self, chunk: &[u8]) {
                if self.phase == RefPhase::Done {
                    return;
                }
                let mut i = 0;
                while i < chunk.len() {
                    if self.in_str {
                        // Jump to the next quote or backslash.
                        let Some(k) =
                            memchr::memchr2(b'"', b'\\', &chunk[i..]).filter(|_| !self.escaped)
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
                        if self.phase == RefPhase::Done {
                            return;
                        }
                        continue;
                    }
                    let b = chunk[i];
                    i += 1;
                    match self.phase {
                        RefPhase::Colon => {
                            if b == b':' {
                                self.phase = RefPhase::Value;
                                continue;
                            }
                            if !b.is_ascii_whitespace() {
                                self.phase = RefPhase::Done;
                                return;
                            }
                            continue;
                        }
                        RefPhase::Value => {
                            if self.depth == 1 && (b == b',' || b == b'}') {
                                self.phase = RefPhase::Done;
                                self.result = parse_usage_object(self.value.trim_ascii());
                                self.value = Vec::new();
                                return;
                            }
                            self.value_bytes(&[b]);
                        }
                        RefPhase::Scan | RefPhase::Done => {}
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
                                self.phase = RefPhase::Done;
                                return;
                            }
                        }
                        b'}' | b']' => {
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 0 {
                                self.phase = RefPhase::Done;
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
                    self.key_pos = (p + bytes.len() <= KEY.len()
                        && KEY[p..p + bytes.len()] == *bytes)
                        .then_some(p + bytes.len());
                }
            }

            fn value_bytes(&mut self, bytes: &[u8]) {
                if self.phase != RefPhase::Value {
                    return;
                }
                if self.value.len() + bytes.len() > MAX_VALUE {
                    self.phase = RefPhase::Done;
                    self.value = Vec::new();
                    return;
                }
                self.value.extend_from_slice(bytes);
            }

            fn end_string(&mut self) {
                if self.phase == RefPhase::Value {
                    // A string value: not a usage object, but copy on to its end.
                    return;
                }
                if std::mem::take(&mut self.in_key) && self.key_pos == Some(5) {
                    self.phase = RefPhase::Colon;
                }
            }
        }
    }

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

        #[test]
        fn agrees_with_the_byte_by_byte_scanner_however_the_body_is_cut(
            tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 0..48),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let body = tokens.concat();
            let parts = split(body.as_bytes(), cuts);
            let mut r = reference::Reference::new();
            r.push(body.as_bytes());
            let whole = r.usage();
            let mut r = reference::Reference::new();
            for p in &parts {
                r.push(p);
            }
            prop_assert_eq!(r.usage(), whole, "the reference itself depends on the cuts");
            prop_assert_eq!(feed(&parts), whole, "{:?} cut as {:?}", body, parts);
        }

        #[test]
        fn finds_the_top_level_usage_of_any_json_object(
            members in proptest::collection::vec(
                (proptest::sample::select(&["choices", "id", "usagE", "a"][..]), json_value()),
                0..6,
            ),
            usage in proptest::option::weighted(0.9, prop_oneof![
                3 => Just(serde_json::json!({"prompt_tokens": 7, "completion_tokens": 8})),
                1 => json_value(),
            ]),
            pretty in any::<bool>(),
            cuts in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let mut doc: serde_json::Map<String, serde_json::Value> =
                members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if let Some(u) = usage {
                doc.insert("usage".to_owned(), u);
            }
            let doc = serde_json::Value::Object(doc);
            let body = if pretty {
                serde_json::to_vec_pretty(&doc).unwrap()
            } else {
                serde_json::to_vec(&doc).unwrap()
            };
            let truth = doc
                .get("usage")
                .and_then(|u| parse_usage_object(&serde_json::to_vec(u).unwrap()));
            let parts = split(&body, cuts);
            prop_assert_eq!(feed(&parts), truth, "{}", String::from_utf8_lossy(&body));
            let mut r = reference::Reference::new();
            for p in &parts {
                r.push(p);
            }
            prop_assert_eq!(r.usage(), truth);
        }

        #[test]
        fn agrees_with_the_byte_by_byte_scanner_on_arbitrary_bytes(
            data in proptest::collection::vec(
                prop_oneof![
                    4 => proptest::sample::select(&b"{}[]\\\",: usage0"[..]),
                    1 => any::<u8>(),
                ],
                0..300,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let mut r = reference::Reference::new();
            r.push(&data);
            let parts = split(&data, cuts);
            prop_assert_eq!(feed(&parts), r.usage());
        }
    }

    /// Pieces of bodies: structure, keys that are or resemble `usage`,
    /// escapes, usage objects of both shapes, text that quotes them.
    const TOKENS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\n",
        "\"",
        "\\",
        "\\\"",
        "\"usage\"",
        "\"usage\":",
        "\"usage\" : ",
        "usage",
        "\"usag",
        "e\"",
        "\"usages\"",
        "\"u\\u0073age\"",
        "\"x\"",
        "\"text with \\\"usage\\\":{\\\"prompt_tokens\\\":9} inside, longer than sixteen\"",
        "null",
        "7",
        "{\"prompt_tokens\":3,\"completion_tokens\":4}",
        "{\"input_tokens\":5,\"output_tokens_details\":{\"reasoning_tokens\":1},\"output_tokens\":6}",
        "\"choices\":[{\"message\":{\"content\":\"hi\"}}]",
        "{\"usage\":{\"prompt_tokens\":1}}",
        CHAT,
    ];

    /// JSON values with `usage` keys (and look-alikes) at any depth,
    /// usage objects among the leaves, and strings holding quotes,
    /// backslashes and brackets.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{Value, json};
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0u64..100).prop_map(Value::from),
            proptest::sample::select(
                &[
                    "",
                    "usage",
                    "a\"b",
                    "x\\y",
                    "{[",
                    "}]",
                    "\"usage\":{\"prompt_tokens\":1}",
                    "a string that is longer than sixteen bytes, with \\\" in it",
                ][..]
            )
            .prop_map(Value::from),
            Just(json!({"prompt_tokens": 3, "completion_tokens": 4})),
            Just(
                json!({"input_tokens": 5, "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 2}})
            ),
        ];
        leaf.prop_recursive(5, 48, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(
                    (
                        proptest::sample::select(
                            &["usage", "choices", "a", "u\"sage", "usage\\"][..]
                        ),
                        inner
                    ),
                    0..4,
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    fn split(b: &[u8], cuts: Vec<usize>) -> Vec<&[u8]> {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (b.len() + 1)).collect();
        cuts.sort_unstable();
        let mut parts = Vec::new();
        let mut prev = 0;
        for c in cuts {
            parts.push(&b[prev..c]);
            prev = c;
        }
        parts.push(&b[prev..]);
        parts
    }

    #[test]
    fn a_usage_value_past_the_cap_is_not_read() {
        let big = format!(
            r#"{{"usage":{{"prompt_tokens":1,"pad":"{}"}}}}"#,
            "x".repeat(MAX_VALUE)
        );
        assert_eq!(feed(&[big.as_bytes()]), None);
        let (a, b) = big.as_bytes().split_at(100);
        assert_eq!(feed(&[a, b]), None);
        let fits = format!(
            r#"{{"usage":{{"prompt_tokens":1,"pad":"{}"}}}}"#,
            "x".repeat(MAX_VALUE - 100)
        );
        let (a, b) = fits.as_bytes().split_at(100);
        assert_eq!(feed(&[a, b]).map(|u| u.prompt), Some(1));
    }
}
